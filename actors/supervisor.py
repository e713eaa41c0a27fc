"""The supervisor of one job: runs its stages in order and keeps the job's event log.

A plain class, made a named, detached Ray actor in actors/ray_actors.py. The control service pulls
events with events_since(cursor) and asks for cancellation with cancel(); the stages run in a
background thread so both calls answer while a stage works.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import traceback
from pathlib import Path

from stillroom.v1 import job_pb2 as pb

from actors.stage_registry import produced_models, runner

log = logging.getLogger("stillroom.supervisor")


class Cancelled(Exception):
    """Raised inside a stage at its next check after the job was cancelled."""


class StageFailed(Exception):
    """A stage's own, user-facing reason to fail the job (e.g. an audit threshold crossed)."""


class EventLog:
    """Append-only, thread-safe list of serialized Events."""

    def __init__(self) -> None:
        self._events: list[bytes] = []
        self._lock = threading.Lock()

    def append(self, event: pb.Event) -> None:
        event.time.GetCurrentTime()
        with self._lock:
            self._events.append(event.SerializeToString())

    def since(self, cursor: int) -> tuple[list[bytes], int]:
        with self._lock:
            return self._events[cursor:], len(self._events)


class StageContext:
    """What a stage may do to the outside world: report, write artifacts, notice cancellation."""

    def __init__(
        self,
        job_id: str,
        stage: str,
        artifact_dir: Path,
        log_: EventLog,
        cancelled: threading.Event,
        seed: int = 0,
        outputs: dict | None = None,
        reward_modules: tuple[str, ...] = (),
        kind: str = "",
    ):
        self.job_id, self.stage, self.artifact_dir, self.seed, self._kind = job_id, stage, artifact_dir, seed, kind
        self._log, self._cancelled = log_, cancelled
        self._groups: list = []
        # What earlier stages of the job produced, for later ones: "policy_model" (a model directory)
        # and "policy_adapter" (a PEFT adapter on it), set by fine-tune stages.
        self.outputs = outputs if outputs is not None else {}
        self.reward_modules = reward_modules

    def roles(self, resources: pb.Resources, roles: tuple[str, ...] = ("generator", "scorer", "trainer")):
        """The stage's role actors' placement group, sized from the job's resources. This
        supervisor owns it; it is closed when the stage ends, however it ends."""
        from actors.ray_actors import Placement, RoleGroup

        group = RoleGroup(self.job_id, {r: Placement.of(getattr(resources, r)) for r in roles})
        self._groups.append(group)
        return group

    def close(self) -> None:
        for group in self._groups:
            group.close()
        self._groups.clear()

    def progress(self, done: int, total: int, unit: str) -> None:
        self._log.append(
            pb.Event(
                type=pb.EVENT_TYPE_PROGRESS, stage=self.stage, progress=pb.Progress(done=done, total=total, unit=unit)
            )
        )

    def metrics(self, values: dict[str, float]) -> None:
        self._log.append(
            pb.Event(type=pb.EVENT_TYPE_METRICS, stage=self.stage, metrics={k: float(v) for k, v in values.items()})
        )

    def log(self, message: str) -> None:
        self._log.append(pb.Event(type=pb.EVENT_TYPE_LOG, stage=self.stage, message=message))

    def artifact(self, path: Path, kind: str) -> pb.Artifact:
        """Register a file already written under artifact_dir."""
        data = path.read_bytes()
        artifact = pb.Artifact(
            name=str(path.relative_to(self.artifact_dir)),
            kind=kind,
            uri=path.as_uri(),
            size_bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            stage=self.stage,
        )
        self._log.append(pb.Event(type=pb.EVENT_TYPE_ARTIFACT, stage=self.stage, artifact=artifact))
        return artifact

    def artifact_tree(self, root: Path, kind: str) -> list[pb.Artifact]:
        """Register every file under a directory written under artifact_dir (a model, an adapter)."""
        return [self.artifact(p, kind) for p in sorted(root.rglob("*")) if p.is_file()]

    def set_policy(self, model: str, adapter: str = "") -> None:
        """The tuned teacher this stage produced: later stages start from it."""
        self.outputs["policy_model"] = model
        self.outputs.pop("policy_adapter", None)
        if adapter:
            self.outputs["policy_adapter"] = adapter
        self.offer_model(produced_models(self._kind, self.stage)[0], model, adapter)

    def offer_model(self, name: str, model: str, adapter: str = "") -> None:
        """Name a model for the evaluate stage (names from stage_registry.produced_models)."""
        self.outputs.setdefault("models", {})[name] = (model, adapter)

    def check_cancelled(self) -> None:
        if self._cancelled.is_set():
            raise Cancelled()

    def is_cancelled(self) -> bool:
        return self._cancelled.is_set()


class Supervisor:
    def __init__(self, job_id: str, spec: bytes, artifact_dir: str, reward_modules: tuple[str, ...] = ()):
        self.job_id = job_id
        self.reward_modules = tuple(reward_modules)  # the operator's allow-list, for RewardScorers
        self.spec = pb.JobSpec.FromString(spec)
        self.artifact_dir = Path(artifact_dir)
        self.log = EventLog()
        self._cancelled = threading.Event()
        self._thread: threading.Thread | None = None
        self.outputs: dict = {}  # passed from stage to stage (the tuned policy, the models to evaluate)

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
            ctx = self._context(stage.name, kind)
            try:
                ctx.check_cancelled()
                self._stage_state(stage.name, pb.STAGE_STATE_RUNNING)
                try:
                    runner(kind)(getattr(stage, kind), self.spec, ctx)
                finally:
                    ctx.close()
            except Cancelled:
                self._stage_state(stage.name, pb.STAGE_STATE_CANCELLED)
                return pb.JOB_STATE_CANCELLED, "", "cancelled"
            except Exception as e:  # noqa: BLE001 - a stage's failure fails the job, not the actor
                reason = str(e) if isinstance(e, StageFailed) else f"{type(e).__name__}: {e}"
                log.error("job %s stage %s failed:\n%s", self.job_id, stage.name, traceback.format_exc())
                self._stage_state(stage.name, pb.STAGE_STATE_FAILED, reason)
                return pb.JOB_STATE_FAILED, stage.name, reason
            self._stage_state(stage.name, pb.STAGE_STATE_SUCCEEDED)
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

    def _write_report(self) -> None:
        """report/report.md with plots, and tensorboard/<stage>/ event files, from the event log.
        A report that cannot be written costs a log line, never the job's outcome."""
        from actors import report
        from actors.metrics import write_tensorboard

        events = [pb.Event.FromString(b) for b in self.log.since(0)[0]]
        ctx = self._context("")
        try:
            path = report.render(self.job_id, self.spec, events, self.artifact_dir / "report")
            write_tensorboard(report.series(events), self.artifact_dir / "tensorboard")
            ctx.artifact_tree(path.parent, "report")
            ctx.artifact_tree(self.artifact_dir / "tensorboard", "metrics")
        except Exception:  # noqa: BLE001
            log.exception("job %s: the report could not be written", self.job_id)

    def _stage_state(self, stage: str, state: int, message: str = "") -> None:
        self.log.append(pb.Event(type=pb.EVENT_TYPE_STAGE_STATE, stage=stage, stage_state=state, message=message))

    def _job_state(self, state: int, stage: str = "", message: str = "") -> None:
        self.log.append(pb.Event(type=pb.EVENT_TYPE_JOB_STATE, job_state=state, stage=stage, message=message))
