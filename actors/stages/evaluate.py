"""The `evaluate` stage: the ladder side by side on held-out data (data.test, else data.eval):
the base teacher (alone, few-shot, with retrieval), each tuned teacher and the student (alone and
with retrieval); per rung each metric (any reward function) as a mean (with its 95% Wilson interval,
<metric>/ci_low and /ci_high, where every row scored 0 or 1), decoding tokens/s, size and the
seconds its stages took to make it. With a target, the cheapest rung that meets it is
recommended. Writes eval/report.json and eval/report.md.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import ray
from stillroom.actors.common import datasets
from stillroom.actors.common.job_report import eval_table
from stillroom.actors.common.ladder import (
    CI_LOW,
    FEW_SHOT,
    RAG,
    build_seconds,
    proportion_interval,
    recommend,
    retained,
    retained_warnings,
    rung_model,
    with_shots,
    with_split,
)
from stillroom.actors.common.stages import MEASURED, UPDATE, metric_names
from stillroom.actors.models.loading import model_dir
from stillroom.actors.roles.generator import GeneratorSpec, SamplingParams
from stillroom.actors.roles.scorer import scorer_spec
from stillroom.actors.runtime.batches import rows_batch
from stillroom.actors.runtime.context import StageContext, StageFailed
from stillroom.actors.runtime.restarts import retrying
from stillroom.actors.stages.index import retrieved
from stillroom.actors.stages.wiring import held_out
from stillroom.v1 import job_pb2 as pb


def candidates(spec: pb.JobSpec, ctx: StageContext) -> dict[str, GeneratorSpec]:
    """The models to compare: what the job started from, and every model its stages produced
    (registered under the names stillroom.actors.common.stages.produced_models gives them)."""
    # each generator picks its dtype on its own hardware (bfloat16 where it multiplies it natively)
    models = {"base_teacher": GeneratorSpec(str(model_dir(spec.teacher)), frozen=True, seed=spec.seed)}
    for name, (path, adapter) in ctx.outputs.get("models", {}).items():
        models[name] = GeneratorSpec(path, adapter_path=adapter, frozen=True, seed=spec.seed)
    return models


def size_bytes(spec: GeneratorSpec) -> int:
    paths = [Path(spec.model_path)] + ([Path(spec.adapter_path)] if spec.adapter_path else [])
    return sum(f.stat().st_size for p in paths for f in p.glob("*.safetensors"))


def run(params: pb.EvaluateStage, spec: pb.JobSpec, ctx: StageContext) -> None:
    """Every rung on the held-out rows: each model alone, with retrieved passages (+rag) and the
    base with examples in its prompt (+fewshot), on data.test and on data.test_updated when the job
    has it; then the report, the recommendation, the gates."""
    splits = held_out_splits(params, spec, ctx)  # before the roles: retrieval holds a role of its own
    greedy = SamplingParams(n=1, max_new_tokens=params.max_new_tokens or 64, temperature=0.0)
    roles = ctx.roles(spec.resources, ("generator", "scorer"))
    # user metric code runs in the scorer role (its worker processes), never in the supervisor
    (scorer,) = roles.start("scorer", scorer_spec(params.metrics, ctx.reward_modules))
    results: dict[str, dict] = {}
    lineage, (seconds, index_stages) = ctx.outputs.get("lineage", {}), stage_costs(spec, ctx)
    models, chosen = candidates(spec, ctx), set(params.rungs)
    if chosen:  # a model none of whose rungs is asked for is not even loaded
        models = {name: m for name, m in models.items() if any(rung_model(r) == name for r in chosen)}
    for done, (name, gen_spec) in enumerate(models.items()):
        ctx.check_cancelled()
        (generator,) = roles.start("generator", gen_spec)
        # one untimed answer first: the first call pays for loading and warming the model
        ray.get(generator.generate.remote(rows_batch("warmup", splits[""][""][:1]), greedy))
        for rung, metrics in score_model(name, generator, scorer, splits, greedy, ctx.warn, chosen).items():
            cost = build_seconds(rung, lineage, seconds, index_stages)
            results[rung] = metrics = metrics | {"size_bytes": size_bytes(gen_spec), "build_s": cost}
            ctx.metrics({f"eval/{rung}/{k}": v for k, v in metrics.items()})
        roles.stop("generator")
        ctx.progress(done + 1, len(models), "models")
    short = report_retained(params, ctx, results, lineage)
    write_report(params, ctx, results, {split: len(v[""]) for split, v in splits.items()}, short)


def report_retained(params: pb.EvaluateStage, ctx: StageContext, results: dict[str, dict], lineage: dict) -> list[str]:
    """Each student rung's retained/<metric> (its metric / its teacher's) into its results and the
    job's metrics; a warning event for each below min_retained (default 0.8), saying by how much.
    Returns the warnings."""
    names = sorted(metric_names(params.metrics) - set(MEASURED))
    for rung, kept in retained(results, lineage, names).items():
        results[rung].update(kept)
        ctx.metrics({f"eval/{rung}/{k}": v for k, v in kept.items()})
    minimum = params.min_retained if params.HasField("min_retained") else 0.8
    short = retained_warnings(results, lineage, minimum) if minimum > 0 else []
    for line in short:
        ctx.warn(line)
    return short


def held_out_splits(params: pb.EvaluateStage, spec: pb.JobSpec, ctx: StageContext) -> dict[str, dict[str, list]]:
    """split ("" for data.test, UPDATE for data.test_updated) -> its prompt variants. Without
    data.test_updated, data.test's +rag rungs retrieve from data.test_corpus when it is set."""
    held = held_out(spec)
    if not held.path:
        raise StageFailed("evaluate needs held-out data: set data.test (or data.eval)")
    update, fresh = spec.data.test_updated, spec.data.test_corpus
    splits = {"": prompt_variants(params, spec, ctx, held, fresh if fresh.path and not update.path else None)}
    if update.path:
        splits[UPDATE] = prompt_variants(params, spec, ctx, update, fresh)
    return splits


def prompt_variants(
    params: pb.EvaluateStage, spec: pb.JobSpec, ctx: StageContext, ref: pb.DatasetRef, corpus: pb.DatasetRef | None
) -> dict[str, list]:
    """A split's prompts as each kind of rung sees them: "" (alone), +rag (from `corpus`, else
    data.corpus), +fewshot."""
    plain = datasets.load_ref(ref).examples()[: params.limit or None]
    variants = {"": [ex.prompt_row() for ex in plain]}
    if spec.HasField("retrieval"):
        variants[RAG] = [ex.prompt_row() for ex in retrieved(ctx, spec, plain, corpus=corpus)]
    if params.few_shot:
        shots = [ex for ex in datasets.load_ref(spec.data.train).examples() if ex.completion][: params.few_shot]
        variants[FEW_SHOT] = [with_shots(shots, ex).prompt_row() for ex in plain]
    return variants


def score_model(
    name: str, generator, scorer, splits: dict, greedy: SamplingParams, on_retry, chosen: set[str] = frozenset()
) -> dict[str, dict]:
    """rung -> metrics, for each rung of one model (those `chosen`, when any are); a metric on the
    update split is suffixed UPDATE."""
    out: dict[str, dict] = {}
    for split, variants in splits.items():
        for suffix, rows in variants.items():
            if (suffix == FEW_SHOT and name != "base_teacher") or (chosen and name + suffix not in chosen):
                continue
            metrics = evaluate_model(generator, scorer, rows, greedy, on_retry=on_retry)
            if split:  # decoding speed and size are the model's: measured once, on data.test
                metrics = {with_split(k, split): v for k, v in metrics.items() if k not in MEASURED}
            out.setdefault(name + suffix, {}).update(metrics)
    return out


def stage_costs(spec: pb.JobSpec, ctx: StageContext) -> tuple[dict[str, float], list[str]]:
    """(wall seconds of each finished stage, the job's index stages)."""
    return ctx.outputs.get("stage_seconds", {}), [s.name for s in spec.stages if s.WhichOneof("kind") == "index"]


def write_report(
    params: pb.EvaluateStage, ctx: StageContext, results: dict[str, dict], rows: dict[str, int], short: list[str] = ()
) -> None:
    """eval/report.json and report.md (the table, the recommended rung, the gates, the students
    that keep too little of their teachers: `short`); the stage fails if a gate does not hold."""
    out = ctx.artifact_dir / ctx.stage
    out.mkdir(parents=True, exist_ok=True)
    verdicts = [gate_verdict(g, results) for g in params.gates]
    advice = recommendation(params.target, results) if params.target.metric else ""
    (out / "report.json").write_text(json.dumps(results, indent=2))  # rungs in the order the job made them
    (out / "report.md").write_text(
        f"# Evaluation on {rows['']} held-out rows"
        + (f" (and {rows[UPDATE]} labelled by the updated corpus: the {UPDATE} columns)" if UPDATE in rows else "")
        + "\n\n"
        + eval_table(results)
        + (f"\n{advice}\n" if advice else "")
        + "".join(f"\n- {'PASS' if ok else 'FAIL'}: {text}" for ok, text in verdicts)
        + "".join(f"\n- WARNING: {text}" for text in short)
    )
    ctx.artifact(out / "report.json", "report")
    ctx.artifact(out / "report.md", "report")
    if advice:
        ctx.log(advice.splitlines()[0])
    for ok, text in verdicts:
        ctx.log(("gate passed: " if ok else "gate failed: ") + text)
    failed = [text for ok, text in verdicts if not ok]
    if failed:
        raise StageFailed("; ".join(failed))


def recommendation(target: pb.EvalTarget, results: dict[str, dict]) -> str:
    """What the report says about the ladder: the rung to stop at for the target, and the rest
    (the "recommended" log event's text)."""
    best, lines = recommend(results, target.metric, target.min)
    head = (
        f"recommended: {best}, the cheapest rung with {target.metric} >= {target.min:g}"
        if best
        else f"no rung reaches {target.metric} >= {target.min:g}"
    )
    return head + "".join(f"\n- {line}" for line in lines)


def gate_verdict(gate: pb.EvalGate, results: dict[str, dict]) -> tuple[bool, str]:
    """(passed, what was compared and by how much). Without a baseline: model's metric >= gate.min.
    With use_ci_low the model is judged by its metric's 95% lower bound (<metric>/ci_low); a
    metric without an interval (not a mean of 0/1 scores) fails the gate, saying so."""
    shown = gate.metric + CI_LOW if gate.use_ci_low else gate.metric
    if gate.use_ci_low and gate.model in results and shown not in results[gate.model]:
        return False, f"{gate.model} {gate.metric} has no 95% interval (its per-row scores are not all 0 or 1)"
    if not gate.baseline:
        a = results.get(gate.model, {}).get(shown, float("nan"))
        ok = a >= gate.min
        return ok, f"{gate.model} {shown} {a:.3f} ({'at least' if ok else 'below'} {gate.min:g})"
    for name in (gate.model, gate.baseline):
        if name not in results:
            return False, f"{name} was not evaluated (models: {', '.join(results)})"
    a, b = results[gate.model].get(shown, float("nan")), results[gate.baseline].get(gate.metric, float("nan"))
    ok = a - b > gate.min_margin
    return ok, (
        f"{gate.model} {shown} {a:.3f} vs {gate.baseline} {gate.metric} {b:.3f}: {a - b:+.3f} "
        f"({'beats' if ok else 'does not beat'} it by more than {gate.min_margin:g})"
    )


def evaluate_model(
    generator,
    scorer,
    rows: list[dict],
    greedy: SamplingParams,
    batch_size: int = 16,
    on_retry: Callable[[str], None] = lambda message: None,
) -> dict[str, float]:
    """Greedy answers from a Generator actor, scored by a RewardScorer actor: each metric's mean,
    tokens/s, seconds per prompt, parameters. A generator or scorer that dies meanwhile is
    restarted by Ray and the chunk answered again (greedy: the same answers)."""
    scores: dict[str, list[float]] = {}
    tokens, seconds = 0, 0.0
    for lo in range(0, len(rows), batch_size):
        batch = rows_batch(f"eval/{lo}", rows[lo : lo + batch_size])
        samples, scored, took = retrying(partial(_answer, generator, scorer, batch, greedy), f"rows {lo}+", on_retry)
        seconds += took
        tokens += sum(len(ids) for ids in samples.column("completion_ids").to_pylist())
        for name in (n for n in scored.schema.names if n.startswith("rewards/")):
            scores.setdefault(name.removeprefix("rewards/"), []).extend(
                v for v in scored.column(name).to_pylist() if v is not None
            )
    metrics = {name: float(np.mean(v)) if v else float("nan") for name, v in scores.items()}
    for name, v in scores.items():  # 0/1 scores (exact match...): a 95% Wilson interval of the mean
        metrics |= proportion_interval(name, v)
    metrics["tokens_per_s"] = tokens / max(seconds, 1e-9)  # greedy decoding at this batch size
    metrics["seconds_per_prompt"] = seconds / max(len(rows), 1)
    metrics["parameters"] = float(ray.get(generator.num_parameters.remote()))
    return metrics


def _answer(generator, scorer, batch, greedy: SamplingParams):
    """(samples, scored samples, seconds the generation took) for one chunk."""
    started = time.perf_counter()
    samples = ray.get(generator.generate.remote(batch, greedy))
    took = time.perf_counter() - started
    return samples, ray.get(scorer.score.remote(samples)), took
