"""The ladder's bookkeeping, pure: few-shot prompts, what each rung cost to make, and which rung to
stop at. A rung is a model (base_teacher, teacher_<stage>, student, ...) alone, with retrieved
passages ("+rag"), or, for the base model, with examples in its prompt ("+fewshot").
"""

from __future__ import annotations

import math
from dataclasses import replace

from stillroom.actors.common.datasets import Example

RAG, FEW_SHOT = "+rag", "+fewshot"


def with_shots(shots: list[Example], ex: Example) -> Example:
    """The example with labelled examples before it: as earlier user/assistant turns of the
    conversation (what a chat template renders), and as text for a model without one."""
    turns = [
        t
        for s in shots
        for t in ({"role": "user", "content": s.prompt}, {"role": "assistant", "content": s.completion or ""})
    ]
    turns += ex.messages or [{"role": "user", "content": ex.prompt}]
    text = "".join(f"{s.prompt}\n{s.completion or ''}\n\n" for s in shots) + ex.prompt
    return replace(ex, prompt=text, messages=turns)


def rung_model(rung: str) -> str:
    """The model a rung runs: "student+rag" -> "student"."""
    return rung.removesuffix(RAG).removesuffix(FEW_SHOT)


def build_seconds(
    rung: str, lineage: dict[str, list[str]], seconds: dict[str, float], index_stages: list[str]
) -> float:
    """Wall seconds of the stages that made a rung: those that trained its model (a student's
    include its teacher's), and the index stages for a +rag rung. The base model costs nothing."""
    stages = list(lineage.get(rung_model(rung), []))
    if rung.endswith(RAG):
        stages += index_stages
    return float(sum(seconds.get(s, 0.0) for s in stages))


def recommend(results: dict[str, dict[str, float]], metric: str, minimum: float) -> tuple[str | None, list[str]]:
    """The cheapest rung (seconds to make, then parameters) whose `metric` is at least `minimum`,
    and a line for each costlier rung saying how much it adds on that metric. (None, lines) when
    no rung meets it: each line says by how much the rung falls short."""
    order = sorted(results, key=lambda r: (results[r].get("build_s", 0.0), results[r].get("parameters", 0.0)))
    value = {r: results[r].get(metric, math.nan) for r in order}
    meets = [r for r in order if value[r] >= minimum]
    if not meets:
        return None, [f"{r}: {metric} {value[r]:.3f}, {minimum - value[r]:.3f} short of {minimum:g}" for r in order]
    best = meets[0]
    costlier = order[order.index(best) + 1 :]
    return best, [
        f"{r}: {metric} {value[r]:.3f} ({value[r] - value[best]:+.3f} over {best}), "
        f"{results[r].get('build_s', 0.0) - results[best].get('build_s', 0.0):+.0f} s more to make"
        for r in costlier
    ]


RETAINED = "retained/"  # retained/<metric>: a student rung's metric / its teacher rung's


def teacher_rung(rung: str, lineage: dict[str, list[str]]) -> str | None:
    """The rung a student rung was distilled from, as it runs (same suffix): the model whose
    lineage is the student's without its last stage (base_teacher when that is empty). None for a
    rung that is no student, or whose teacher is unknown."""
    model = rung_model(rung)
    if not model.startswith("student") or model not in lineage:
        return None
    made_by = lineage[model][:-1]
    if not made_by:
        return "base_teacher" + rung[len(model) :]
    found = [m for m, stages in lineage.items() if stages == made_by and not m.startswith("student")]
    return found[0] + rung[len(model) :] if found else None


def retained(results: dict[str, dict[str, float]], lineage: dict[str, list[str]], metrics: list[str]) -> dict:
    """student rung -> {retained/<metric>: student / teacher} for each metric both rungs have
    (a teacher at 0 or below leaves it out: nothing to keep a fraction of)."""
    out: dict[str, dict[str, float]] = {}
    for rung in results:
        teacher = teacher_rung(rung, lineage)
        if teacher is None or teacher not in results:
            continue
        for m in metrics:
            s, t = results[rung].get(m, math.nan), results[teacher].get(m, math.nan)
            if not (math.isnan(s) or math.isnan(t)) and t > 0:
                out.setdefault(rung, {})[RETAINED + m] = s / t
    return out


def retained_warnings(results: dict[str, dict[str, float]], lineage: dict[str, list[str]], minimum: float) -> list[str]:
    """A line for each distilled student rung's retained/<metric> below `minimum`, saying by how much."""
    lines = []
    for rung, metrics in results.items():
        teacher = teacher_rung(rung, lineage)
        if rung_model(rung) != "student" or teacher is None:
            continue
        for name, value in metrics.items():
            if name.startswith(RETAINED) and value < minimum:
                m = name.removeprefix(RETAINED)
                lines.append(
                    f"{rung} keeps {value:.0%} of {teacher}'s {m} ({metrics[m]:.3f} vs {results[teacher][m]:.3f}), "
                    f"{minimum - value:.0%} short of min_retained {minimum:g}"
                )
    return lines


Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: a two-sided 95% interval
CI_LOW, CI_HIGH = "/ci_low", "/ci_high"  # <metric>/ci_low, <metric>/ci_high: its 95% Wilson interval


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (successes of n): centre (p + z²/2n) / (1 + z²/n),
    half-width z sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n). Unlike p ± z sqrt(p(1-p)/n) it stays in
    [0, 1] and is not zero-width at 0 or n successes. (nan, nan) for n = 0."""
    if n <= 0:
        return math.nan, math.nan
    p, z2 = successes / n, z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion_interval(name: str, scores: list[float]) -> dict[str, float]:
    """{<name>/ci_low, <name>/ci_high} when `scores` are per-row 0/1 outcomes (exact match, valid
    JSON: their mean is a proportion, so Wilson applies); {} for graded scores (a fraction of
    fields right, a length penalty), whose mean is no proportion."""
    if not scores or any(s not in (0.0, 1.0) for s in scores):
        return {}
    low, high = wilson(sum(scores), len(scores))
    return {name + CI_LOW: low, name + CI_HIGH: high}


def with_split(metric: str, split: str) -> str:
    """A metric's name on a split: json_exact/ci_low on @update -> json_exact@update/ci_low."""
    for tail in (CI_LOW, CI_HIGH):
        if metric.endswith(tail):
            return metric.removesuffix(tail) + split + tail
    return metric + split
