"""The supervisor of one job: runs its stages in order and keeps the job's event log.

A plain class, made a named, detached Ray actor here (launch_supervisor). The control service pulls
events with events_since(cursor) and asks for cancellation with cancel(); the stages run in a
background thread so both calls answer while a stage works. Every event is also appended to the
attempt's event file (runtime/eventlog.py), which outlives the supervisor.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback
from pathlib import Path

import ray
from stillroom.actors.common import job_report
from stillroom.actors.common.stages import runner
from stillroom.actors.runtime.cluster import NAMESPACE, RESTARTS, supervisor_name
from stillroom.actors.runtime.context import Cancelled, StageContext, StageFailed
from stillroom.actors.runtime.eventlog import EventLog, attempt_files, read_events
from stillroom.actors.runtime.tracking import trackers
from stillroom.v1 import job_pb2 as pb

log = logging.getLogger("stillroom.supervisor")
# a stage an earlier supervisor of this job (or the job it resumes) finished
SKIPPED = "finished in an earlier run (a restarted supervisor, or the job this one resumes): skipped, its outputs kept"


class Supervisor:
    def __init__(
        self,
        job_id: str,
        spec: bytes,
        artifact_dir: str,
        reward_modules: tuple[str, ...] = (),
        resume: str = "",
        event_file: str = "",
    ):
        """resume: JSON {"finished": [stage names], "outputs": {...}} of an earlier supervisor of
        this job (or of the job it resumes): those stages are skipped, their outputs handed on.
        event_file: where this attempt's events are appended as they happen (none: memory only)."""
        self.job_id = job_id
        self.reward_modules = tuple(reward_modules)  # the operator's allow-list, for RewardScorers
        self.spec = pb.JobSpec.FromString(spec)
        self.artifact_dir = Path(artifact_dir)
        self.log = EventLog(event_file or None)
        self.trackers = trackers(self.spec.tracking, job_id, self.artifact_dir, self._warn)
        self.log.on_append = self.trackers  # TensorBoard, MLflow: live
        self.event_file = event_file
        self._cancelled = threading.Event()
        self._thread: threading.Thread | None = None
        earlier = json.loads(resume) if resume else {}
        self.finished: set[str] = set(earlier.get("finished", ()))
        # passed from stage to stage (the tuned policy, the models to evaluate)
        self.outputs: dict = earlier.get("outputs", {})

    def __repr__(self) -> str:
        return f"Supervisor({self.job_id}, stages={[s.name for s in self.spec.stages]})"

    def start(self) -> None:
        """Start running the stages; a second call does nothing."""
        if self._thread is None:
            self._thread = threading.Thread(target=self.run, name=f"{self.job_id}-stages", daemon=True)
            self._thread.start()

    def events_since(self, cursor: int) -> tuple[list[bytes], int]:
        return self.log.since(cursor)

    def cancel(self) -> None:
        self._cancelled.set()

    def ping(self) -> str:
        return self.job_id

    def run(self) -> None:
        """The job: each stage in order; the first failure or a cancel ends it. The report is
        written before the job's final state, so a finished job always has it."""
        state, stage, message = self._run_stages()
        self._write_report()
        self._job_state(state, stage, message)

    def _run_stages(self) -> tuple[int, str, str]:
        for stage in self.spec.stages:
            kind = stage.WhichOneof("kind")
            if stage.name in self.finished:
                self._context(stage.name).log(SKIPPED)
                continue
            ctx = self._context(stage.name, kind)
            try:
                ctx.check_cancelled()
                self._stage_state(stage.name, pb.STAGE_STATE_RUNNING)
                started = time.monotonic()
                try:
                    runner(kind)(getattr(stage, kind), self.spec, ctx)
                finally:
                    ctx.close()
                # what the stage cost (the evaluate stage prices each rung with it); kept with its outputs
                self.outputs.setdefault("stage_seconds", {})[stage.name] = round(time.monotonic() - started, 3)
            except Cancelled:
                self._stage_state(stage.name, pb.STAGE_STATE_CANCELLED)
                return pb.JOB_STATE_CANCELLED, "", "cancelled"
            except Exception as e:  # noqa: BLE001 - a stage's failure fails the job, not the actor
                reason = str(e) if isinstance(e, StageFailed) else f"{type(e).__name__}: {e}"
                log.error("job %s stage %s failed:\n%s", self.job_id, stage.name, traceback.format_exc())
                self._stage_state(stage.name, pb.STAGE_STATE_FAILED, reason)
                return pb.JOB_STATE_FAILED, stage.name, reason
            self._stage_state(stage.name, pb.STAGE_STATE_SUCCEEDED, outputs=json.dumps(self.outputs))
            if stage is not self.spec.stages[-1]:
                self._refresh_report()
        return pb.JOB_STATE_SUCCEEDED, "", "all stages succeeded"

    def _context(self, stage: str, kind: str = "") -> StageContext:
        return StageContext(
            self.job_id,
            stage,
            self.artifact_dir,
            self.log,
            self._cancelled,
            self.spec.seed,
            self.outputs,
            self.reward_modules,
            kind,
        )

    def _render_report(self) -> Path:
        """report/report.md with plots from the events of every supervisor the job had (their
        event files), so a restarted job's report is whole. Rendered after each stage too, so a
        running job's report and plots show the stages done so far."""
        files = attempt_files(self.artifact_dir) if self.event_file else []
        records = [r for f in files for r in read_events(f)] if files else self.log.since(0)[0]
        events = [pb.Event.FromString(b) for b in records]
        return job_report.render(self.job_id, self.spec, events, self.artifact_dir / "report")

    def _refresh_report(self) -> None:
        try:
            self._render_report()
        except Exception:  # noqa: BLE001 - the report is refreshed again after the next stage
            log.exception("job %s: the report could not be refreshed", self.job_id)

    def _write_report(self) -> None:
        """The final report, registered with the tensorboard/<stage>/ files (closed). A report that
        cannot be written costs a log line, never the job's outcome."""
        ctx = self._context("")
        try:
            path = self._render_report()
            self.trackers.close()  # written as the metrics came (runtime/tracking.py)
            ctx.artifact_tree(path.parent, "report")
            ctx.artifact_tree(self.artifact_dir / "tensorboard", "metrics")
        except Exception:  # noqa: BLE001
            log.exception("job %s: the report could not be written", self.job_id)

    def _warn(self, message: str) -> None:
        self.log.append(pb.Event(type=pb.EVENT_TYPE_LOG, message=f"warning: {message}"))

    def _stage_state(self, stage: str, state: int, message: str = "", outputs: str = "") -> None:
        self.log.append(
            pb.Event(type=pb.EVENT_TYPE_STAGE_STATE, stage=stage, stage_state=state, message=message, outputs=outputs)
        )

    def _job_state(self, state: int, stage: str = "", message: str = "") -> None:
        self.log.append(pb.Event(type=pb.EVENT_TYPE_JOB_STATE, job_state=state, stage=stage, message=message))


SupervisorActor = ray.remote(num_cpus=0, **RESTARTS["supervisor"])(Supervisor)


def launch_supervisor(
    job_id: str,
    spec: bytes,
    artifact_dir: str,
    reward_modules: tuple[str, ...] = (),
    resume: str = "",
    event_file: str = "",
):
    """Create (or find, after a crash between create and record) the job's detached supervisor."""
    return SupervisorActor.options(
        name=supervisor_name(job_id), namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote(job_id, spec, artifact_dir, reward_modules, resume, event_file)


def resume_state(events: list[pb.Event], keep: int | None = None) -> str:
    """What a new supervisor continues from, out of a job's stored events: the stages that
    succeeded (the first `keep` of them, if given) and the outputs the last of those handed on
    (JSON for Supervisor's `resume`)."""
    finished = [e for e in events if e.type == pb.EVENT_TYPE_STAGE_STATE and e.stage_state == pb.STAGE_STATE_SUCCEEDED]
    finished = finished[:keep] if keep is not None else finished
    outputs = json.loads(finished[-1].outputs) if finished and finished[-1].outputs else {}
    return json.dumps({"finished": [e.stage for e in finished], "outputs": outputs})
