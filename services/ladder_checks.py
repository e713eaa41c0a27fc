"""Checks of the evaluate stages against the rest of the job: the rungs they score exist, gates
compare two of them on a metric the stage measures (by its 95% lower bound only where it has an
interval), a target names such a metric, and a metric on the policy-update split (`<metric>@update`)
has that split. Pure: reads only the spec."""

from __future__ import annotations

from stillroom.actors.common.ladder import RETAINED
from stillroom.actors.common.stages import MEASURED, UPDATE, job_models, metric_names
from stillroom.services.violations import Violations
from stillroom.v1 import job_pb2 as pb


def check_evaluate_stages(spec: pb.JobSpec, v: Violations) -> None:
    for i, stage in enumerate(spec.stages):
        if stage.WhichOneof("kind") == "evaluate":
            p, made = f"stages[{i}].evaluate", job_models(spec, upto=i)
            scored = _check_rungs(stage.evaluate, made, p, v)
            _check_gates(stage.evaluate, made, scored, p, v)
            _check_update_metrics(spec, stage.evaluate, p, v)


def _check_rungs(e: pb.EvaluateStage, made: list[str], p: str, v: Violations) -> list[str]:
    """The rungs the stage scores: those it names (each a rung of this job, once), else all."""
    for k, rung in enumerate(e.rungs):
        v.check(rung in made, f"{p}.rungs[{k}]", f"{rung!r} is not a rung of this job ({', '.join(made)})")
        v.check(rung not in e.rungs[:k], f"{p}.rungs[{k}]", f"{rung!r} is named twice")
    return list(e.rungs) or made


def _check_gates(e: pb.EvaluateStage, made: list[str], scored: list[str], p: str, v: Violations) -> None:
    """Each gate compares two rungs the stage scores on a metric it measures, or one rung with
    `min` (no baseline); retained/<metric> (a student's fraction of its teacher's) on student rungs."""
    metrics = metric_names(e.metrics)
    kept = {RETAINED + m for m in metrics - set(MEASURED)}
    for j, gate in enumerate(e.gates):
        g = f"{p}.gates[{j}]"
        for role in ("model", "baseline") if gate.baseline else ("model",):
            name = getattr(gate, role)
            if name not in made:
                v.check(False, f"{g}.{role}", f"{name!r} is not a model of this job ({', '.join(made)})")
            else:
                v.check(name in scored, f"{g}.{role}", f"{name!r} is not among {p}.rungs")
        v.check(gate.model != gate.baseline, f"{g}.baseline", "must differ from model")
        if gate.metric in kept:
            v.check(gate.model.startswith("student"), f"{g}.metric", f"{gate.metric} is measured on student rungs")
        else:
            v.check(gate.metric in metrics, f"{g}.metric", f"must be one of {', '.join(sorted(metrics | kept))}")
        _check_ci_low(gate, g, v)
        v.number(gate.min_margin, f"{g}.min_margin")
        v.number(gate.min, f"{g}.min")
    if e.target.metric or e.target.min:
        v.check(e.target.metric in metrics, f"{p}.target.metric", f"must be one of {', '.join(sorted(metrics))}")
        v.number(e.target.min, f"{p}.target.min")


# Built-in metrics whose per-row scores are graded, not 0/1: their mean has no Wilson interval.
GRADED = ("json_fields", "length_penalty")


def _check_ci_low(gate: pb.EvalGate, g: str, v: Violations) -> None:
    """use_ci_low needs a metric the stage gives a 95% interval: a mean of per-row 0/1 scores (a
    function's name; what a module's function scores is known only when it has run)."""
    if not gate.use_ci_low:
        return
    base = gate.metric.removesuffix(UPDATE)
    v.check(
        not (base in MEASURED or base in GRADED or base.startswith(RETAINED)),
        f"{g}.use_ci_low",
        f"{gate.metric} has no 95% interval: only a metric that is a mean of per-row 0/1 scores has one "
        "(exact_match, numeric_match, json_exact, json_valid, regex_format, or such a function of a module)",
    )


def _check_update_metrics(spec: pb.JobSpec, e: pb.EvaluateStage, p: str, v: Violations) -> None:
    """A gate or target on `<metric>@update` needs the split it is measured on."""
    if spec.data.test_updated.path:
        return
    named = [("target", e.target.metric)] + [(f"gates[{j}]", g.metric) for j, g in enumerate(e.gates)]
    for where, metric in named:
        if metric.endswith(UPDATE):
            v.check(False, f"{p}.{where}.metric", f"{metric} is measured on data.test_updated")
