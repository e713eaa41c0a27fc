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
    "index": "stillroom.actors.stages.index:run",
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


def job_models(spec, upto: int | None = None) -> list[str]:
    """Every rung the evaluate stage at index `upto` (else one after the last stage) scores:
    base_teacher first, then the model each stage produces, each also with retrieved passages
    ("+rag") when the job has `retrieval`; "base_teacher+fewshot" when that stage asks for it."""
    names = ["base_teacher"]
    for stage in spec.stages[:upto]:
        kind = stage.WhichOneof("kind")
        names += produced_models(kind, stage.name, getattr(stage, kind))
    names += [f"{n}+rag" for n in names] if spec.HasField("retrieval") else []
    evaluate = spec.stages[upto] if upto is not None and upto < len(spec.stages) else None
    if evaluate is not None and evaluate.WhichOneof("kind") == "evaluate" and evaluate.evaluate.few_shot:
        names.append("base_teacher+fewshot")
    return names


# What the evaluate stage measures of every model besides its metrics (the reward functions).
MEASURED = ("tokens_per_s", "seconds_per_prompt", "parameters", "size_bytes", "build_s")
UPDATE = "@update"  # a metric's suffix on data.test_updated (the rows labelled by the updated corpus)


def metric_label(name: str) -> str:
    """The name a reward function's scores go by in the evaluation report, as the scorer labels
    them (roles/scorer.py): a built-in's name, a module function's own (pkg.mod:fn -> fn), a reward
    model's last path part."""
    return name.split(":")[-1].rsplit("/", 1)[-1]


def metric_names(metrics) -> set[str]:
    """What gates and targets may name: each metric (RewardFunction) by its label, also on the
    update split, and what is MEASURED."""
    return {metric_label(m.name) + split for m in metrics for split in ("", UPDATE)} | set(MEASURED)
