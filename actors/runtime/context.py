"""What a stage may do to the outside world (StageContext): report progress and metrics, write
artifacts, start role actors, notice cancellation."""

from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import replace
from pathlib import Path

from stillroom.actors.common.stages import produced_models
from stillroom.actors.runtime.cluster import DEFAULT_CPUS, Placement, RoleGroup, cluster_capacity
from stillroom.actors.runtime.eventlog import EventLog
from stillroom.v1 import job_pb2 as pb

MODEL_ROLES = ("generator", "student", "trainer")  # the roles that run a model: they want a GPU where there is one


def with_auto_gpus(placements: dict[str, Placement], gpus: float) -> dict[str, Placement]:
    """resources.auto_gpus: each model role without num_gpus gets 1 GPU per replica where the
    cluster's `gpus` cover all of their replicas, else 1/k with k = ceil(replicas / gpus), so all
    fit at once (3 replicas on 2 GPUs: 1/2 each). Without GPUs, the placements as they are."""
    wanting = [r for r in MODEL_ROLES if r in placements and not placements[r].num_gpus]
    replicas = sum(placements[r].replicas for r in wanting)
    if gpus <= 0 or not replicas:
        return placements
    share = 1.0 if gpus >= replicas else 1.0 / math.ceil(replicas / gpus)
    return {r: replace(p, num_gpus=share) if r in wanting else p for r, p in placements.items()}


class Cancelled(Exception):
    """Raised inside a stage at its next check after the job was cancelled."""


class StageFailed(Exception):
    """A stage's own, user-facing reason to fail the job (e.g. an audit threshold crossed)."""


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

    def roles(
        self,
        resources: pb.Resources,
        roles: tuple[str, ...] = ("generator", "scorer", "trainer"),
        overlap: bool = False,
    ):
        """The stage's role actors' placement group, sized from the job's resources (`overlap`: its
        roles compute at the same time, so each gets its own threads). This supervisor owns it; it
        is closed when the stage ends, however it ends."""
        placements = {r: Placement.of(getattr(resources, r), DEFAULT_CPUS.get(r, 1.0), overlap) for r in roles}
        if resources.auto_gpus:
            placements = with_auto_gpus(placements, cluster_capacity().get("GPU", 0.0))
        self._warn_idle_gpus(placements)
        group = RoleGroup(self.job_id, placements)
        self._groups.append(group)
        return group

    def _warn_idle_gpus(self, placements: dict[str, Placement]) -> None:
        """num_gpus defaults to 0, so on a GPU cluster a recipe that names none runs every model on
        CPU without a word: say so, naming the roles and the fix."""
        gpus = cluster_capacity().get("GPU", 0.0)
        idle = [r for r in MODEL_ROLES if r in placements and not placements[r].num_gpus]
        if gpus and idle:
            fields = ", ".join(f"resources.{r}.num_gpus" for r in idle)
            self.warn(
                f"the cluster has {gpus:g} GPU(s), but {fields} unset (0): {', '.join(idle)} run on CPU in stage "
                f"{self.stage}; give each num_gpus: 1 in the recipe's resources, or set resources.auto_gpus"
            )

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

    def warn(self, message: str) -> None:
        """A log event a user should act on: `stillroom watch` shows it as a warning."""
        self.log(f"warning: {message}")

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
        self.offer_model(self.model_name, model, adapter)
        self.outputs["policy_lineage"] = self.outputs["lineage"][self.model_name]

    @property
    def model_name(self) -> str:
        """The name this stage's (first) model goes by (stages.produced_models)."""
        return produced_models(self._kind, self.stage)[0]

    def offer_model(self, name: str, model: str, adapter: str = "", lineage: list[str] | None = None) -> None:
        """Name a model for the evaluate stage (names from stage_registry.produced_models), and
        the stages that made it: by default those that made the policy it came from, and this one."""
        self.outputs.setdefault("models", {})[name] = (model, adapter)
        made_by = lineage if lineage is not None else [*self.outputs.get("policy_lineage", []), self.stage]
        self.outputs.setdefault("lineage", {})[name] = made_by

    def check_cancelled(self) -> None:
        if self._cancelled.is_set():
            raise Cancelled()

    def is_cancelled(self) -> bool:
        return self._cancelled.is_set()
