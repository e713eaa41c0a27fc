"""Which stage kinds this build can run, and the function that runs each.

The control plane reads AVAILABLE (to refuse a job at submit, not hours later); the supervisor calls
runner(kind). Imports of the stage modules are deferred: they pull in torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

# kind (the JobSpec Stage oneof field) -> "module:function"
_RUNNERS = {
    "audit": "stillroom.actors.stages.audit:run",
    "sft": "stillroom.actors.stages.sft:run",
    "grpo": "stillroom.actors.stages.grpo:run",
    "distill": "stillroom.actors.stages.distill:run",
    "evaluate": "stillroom.actors.stages.evaluate:run",
    "export": "stillroom.actors.stages.export:run",
}
AVAILABLE = tuple(_RUNNERS)


def runner(kind: str) -> Callable:
    module, fn = _RUNNERS[kind].split(":")
    return getattr(importlib.import_module(module), fn)


def produced_models(kind: str, stage_name: str, params=None) -> list[str]:
    """The names under which a stage offers models to later stages (the evaluate stage compares
    them all; its gates name them). The control plane checks gates against these at submit."""
    if kind in ("sft", "grpo"):
        return [f"teacher_{stage_name}"]
    if kind == "distill":
        return ["student"] + (["student_baseline"] if params is not None and params.baseline else [])
    return []


def job_models(spec) -> list[str]:
    """Every model name a job's stages will produce, base_teacher first."""
    names = ["base_teacher"]
    for stage in spec.stages:
        kind = stage.WhichOneof("kind")
        names += produced_models(kind, stage.name, getattr(stage, kind))
    return names


# What the evaluate stage measures of every model besides its metrics (the reward functions).
MEASURED = ("tokens_per_s", "seconds_per_prompt", "parameters", "size_bytes")
