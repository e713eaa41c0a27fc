"""Experiment tracking, live: the supervisor's event log hands every event to the job's trackers
(spec.tracking.report_to) as it is appended, so a running job shows in TensorBoard and MLflow.

    tensorboard  <artifacts>/<job>/tensorboard/<stage>/ event files, flushed per metrics event:
                 `tensorboard --logdir <artifacts>/<job>/tensorboard`
    mlflow       one MLflow run per stage ("<job>/<stage>", tags stillroom.job and stillroom.stage)
                 in the experiment named by the spec; closed FINISHED, FAILED or KILLED with the stage

A tracker that fails (an MLflow server gone) is dropped with a warning event; the job goes on.
A restarted supervisor writes to the same TensorBoard runs and the same MLflow runs.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path

from stillroom.actors.common.job_report import step_of
from stillroom.v1 import job_pb2 as pb

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "stillroom"
ENDED = {
    pb.STAGE_STATE_SUCCEEDED: "FINISHED",
    pb.STAGE_STATE_FAILED: "FAILED",
    pb.STAGE_STATE_CANCELLED: "KILLED",
}


class Steps:
    """The step of each metrics event: the stage's progress so far (job_report.step_of)."""

    def __init__(self) -> None:
        self.done: dict[str, float] = {}

    def __call__(self, event: pb.Event) -> int | None:
        """The event's step if it is a stage's metrics event, else None (progress is noted)."""
        if event.type == pb.EVENT_TYPE_PROGRESS:
            self.done[event.stage] = float(event.progress.done)
        if event.type == pb.EVENT_TYPE_METRICS and event.stage:
            return int(step_of(event, self.done))
        return None


class LiveTensorBoard:
    """Each metrics event into TensorBoard as it happens, one run per stage (root/<stage>/),
    flushed at once. A restarted supervisor adds its own event files to the same runs."""

    name = "tensorboard"

    def __init__(self, root) -> None:
        self.root = Path(root)
        self._writers: dict = {}
        self._steps = Steps()

    def __call__(self, event: pb.Event) -> None:
        step = self._steps(event)
        if step is not None:
            writer = self._writer(event.stage)
            for name, value in event.metrics.items():
                writer.add_scalar(name, value, step)
            writer.flush()

    def _writer(self, stage: str):
        if stage not in self._writers:
            # imported here: the supervisor imports this module, and the control plane imports the supervisor
            from torch.utils.tensorboard import SummaryWriter

            self._writers[stage] = SummaryWriter(log_dir=str(self.root / stage))
        return self._writers[stage]

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


def mlflow_key(name: str) -> str:
    """A metric name MLflow accepts (letters, digits, _ - . space : /): retrieval/recall@3 ->
    retrieval/recall_3."""
    return re.sub(r"[^\w\-. :/]", "_", name)


class LiveMLflow:
    """Each metrics event into the stage's MLflow run as it happens (MlflowClient.log_batch)."""

    name = "mlflow"

    def __init__(self, job_id: str, uri: str, experiment: str) -> None:
        if uri.startswith("file:"):  # MLflow 3 keeps its file store behind an explicit opt-in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow import MlflowClient

        self.job_id, self.client = job_id, MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment = found.experiment_id if found else self.client.create_experiment(experiment)
        self._runs: dict[str, str] = {}
        self._steps = Steps()

    def __call__(self, event: pb.Event) -> None:
        from mlflow.entities import Metric

        step = self._steps(event)
        if step is not None:
            at = event.time.ToMilliseconds()
            metrics = [Metric(mlflow_key(k), float(v), at, step) for k, v in sorted(event.metrics.items())]
            self.client.log_batch(self.run_id(event.stage), metrics=metrics)
        elif event.type == pb.EVENT_TYPE_STAGE_STATE and event.stage_state in ENDED and event.stage in self._runs:
            self.client.set_terminated(self._runs.pop(event.stage), ENDED[event.stage_state])

    def run_id(self, stage: str) -> str:
        """The stage's run: the one an earlier supervisor of this job opened, else a new one."""
        if stage not in self._runs:
            tags = {"stillroom.job": self.job_id, "stillroom.stage": stage}
            query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
            earlier = self.client.search_runs([self.experiment], filter_string=query, max_results=1)
            if earlier:
                self.client.update_run(earlier[0].info.run_id, status="RUNNING")
            run = (
                earlier[0]
                if earlier
                else self.client.create_run(self.experiment, tags=tags, run_name=f"{self.job_id}/{stage}")
            )
            self._runs[stage] = run.info.run_id
        return self._runs[stage]

    def close(self) -> None:
        for run_id in self._runs.values():
            self.client.set_terminated(run_id, "KILLED")  # a stage still open when the job ended
        self._runs.clear()


class Trackers:
    """The job's trackers as one event sink (EventLog's on_append). Thread-safe; a tracker that
    raises is closed and dropped, and `warn` says so."""

    def __init__(self, trackers: list, warn: Callable[[str], None]) -> None:
        self.trackers, self.warn = list(trackers), warn
        self._lock = threading.Lock()

    def __call__(self, event: pb.Event) -> None:
        failed = []
        with self._lock:
            for tracker in list(self.trackers):
                try:
                    tracker(event)
                except Exception as e:  # noqa: BLE001 - a tracker costs its own output, never the job
                    log.exception("tracker %s failed", tracker.name)
                    self.trackers.remove(tracker)
                    failed.append(f"{tracker.name} stopped recording metrics: {type(e).__name__}: {e}")
        for message in failed:  # outside the lock: the warning is an event, and comes back here
            self.warn(message)

    def close(self) -> None:
        with self._lock:
            for tracker in self.trackers:
                try:
                    tracker.close()
                except Exception:  # noqa: BLE001
                    log.exception("tracker %s did not close", tracker.name)


def trackers(spec: pb.TrackingSpec, job_id: str, artifact_dir: Path, warn: Callable[[str], None]) -> Trackers:
    """The trackers spec.report_to names (default: TensorBoard). One that cannot start (MLflow
    unreachable) is left out with a warning."""
    wanted = list(spec.report_to) or ["tensorboard"]
    made: list = []
    if "tensorboard" in wanted:
        made.append(LiveTensorBoard(artifact_dir / "tensorboard"))
    if "mlflow" in wanted:
        uri = (
            spec.mlflow_tracking_uri
            or os.environ.get("MLFLOW_TRACKING_URI")
            or f"file:{artifact_dir.parent / 'mlruns'}"
        )
        try:
            made.append(LiveMLflow(job_id, uri, spec.mlflow_experiment or DEFAULT_EXPERIMENT))
        except Exception as e:  # noqa: BLE001
            warn(f"mlflow at {uri} is not recording metrics: {type(e).__name__}: {e}")
    return Trackers(made, warn)
