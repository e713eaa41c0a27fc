"""The `distill` stage (offline mode): the tuned teacher labels prompts, filters keep the samples
worth learning from, and the student learns from them with alpha * CE + (1 - alpha) * KD over the
teacher's top-k log-probs.

    prompts -> TeacherGenerator (n samples, top-k) -> RewardScorer -> filter -> Trainer (student)

What the teacher wrote is journaled under content-addressed batch ids (teacher, sampling, prompts):
a later job that names this one in `reuse_journal_of` replays it and generates nothing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
from stillroom.v1 import job_pb2 as pb

from actors import datasets, filters
from actors.batches import batch_id, make_batch, replay, shard, training_arrays
from actors.models import inference_dtype, model_dir
from actors.pipeline import LoopConfig, TrainLoop
from actors.queues import Journal
from actors.reward import scorer_spec
from actors.sft import encode, step_order, train_rows
from actors.students import from_config, from_teacher_layers
from actors.supervisor import StageContext
from actors.teacher import GeneratorSpec, SamplingParams
from actors.trainer import Objective, TrainerSpec


@dataclass(frozen=True)
class DistillConfig:
    on_policy_fraction: float  # lambda: the share of steps that train on the student's own samples
    on_policy_objective: Objective
    num_samples: int
    filter: str
    min_reward: float
    min_agreement: float
    sampling: SamplingParams
    objective: Objective
    prompts_per_step: int
    epochs: int
    max_steps: int
    learning_rate: float
    eval_prompts: int

    @classmethod
    def of(cls, p: pb.DistillStage) -> DistillConfig:
        n = p.num_samples or 4
        sampling = SamplingParams(
            n=n, max_new_tokens=p.max_new_tokens or 64, temperature=1.0, topk_logprobs=p.top_k or 8
        )
        objective = Objective(
            "distill",
            alpha=p.alpha if p.HasField("alpha") else 0.5,
            kd_loss=p.kd_loss or "forward_kl",
            jsd_beta=p.jsd_beta or 0.5,
            temperature=p.temperature or 1.0,
        )
        on_policy = getattr(p, "lambda") or (1.0 if p.mode == "on_policy" else 0.0)
        student_kd = Objective(
            "distill",
            alpha=0.0,
            kd_loss=p.kd_loss or "reverse_kl",
            jsd_beta=p.jsd_beta or 0.5,
            temperature=p.temperature or 1.0,
        )
        return cls(
            on_policy,
            student_kd,
            n,
            p.filter or "majority_vote",
            p.min_reward,
            p.min_agreement,
            sampling,
            objective,
            p.prompts_per_step or 8,
            p.optim.epochs or 1,
            p.optim.max_steps,
            p.optim.learning_rate or 5e-4,
            p.eval_prompts or 16,
        )


def batch_key(teacher: str, sampling: SamplingParams, prompts: list[str]) -> str:
    """A content address for one batch of teacher output: same teacher, sampling and prompts, same id."""
    h = hashlib.sha256(json.dumps([teacher, sampling.__dict__, prompts], sort_keys=True).encode())
    return "distill-" + h.hexdigest()[:24]


def prompt_batches(rows: list[dict], teacher: str, cfg: DistillConfig, seed: int = 0) -> list[pa.RecordBatch]:
    """One batch per step. The teacher writes the first epoch's batches (with max_steps, only
    max_steps / epochs of them); later epochs replay what it wrote, in a new seeded order,
    generating nothing."""
    rows = datasets.as_prompts(rows)
    per_epoch = -(-len(rows) // cfg.prompts_per_step)
    steps = cfg.max_steps or cfg.epochs * per_epoch
    first = []
    for lo in range(0, min(per_epoch, -(-steps // cfg.epochs)) * cfg.prompts_per_step, cfg.prompts_per_step):
        chunk = rows[lo : lo + cfg.prompts_per_step]
        columns = {k: [r.get(k) for r in chunk] for k in chunk[0]}
        first.append(make_batch(batch_key(teacher, cfg.sampling, columns["prompt"]), columns))
    batches, rng = list(first), np.random.default_rng(seed)
    for epoch in range(1, cfg.epochs):
        for i in rng.permutation(len(first)):
            copy = make_batch(f"{batch_id(first[i])}#{epoch}", first[i].to_pydict())
            batches.append(replay(copy, batch_id(first[i])))
    return batches[:steps]


def keep(batch: pa.RecordBatch, cfg: DistillConfig) -> tuple[list[int], dict[str, float]]:
    """Indices of the samples the filter keeps, group by group (n samples per prompt)."""
    n, rows = cfg.num_samples, batch.num_rows
    rewards = batch.column("reward").to_pylist()
    completions = batch.column("completion").to_pylist()
    kept, agreement = [], []
    for lo in range(0, rows, n):
        group = rewards[lo : lo + n]
        if cfg.filter == "best_of_n":
            chosen = filters.best_of_n(group)
        elif cfg.filter == "min_reward":
            chosen = filters.min_reward(group, cfg.min_reward)
        elif cfg.filter == "valid_only":
            chosen = filters.valid_only(group)
        else:  # majority_vote: among samples the rewards call valid, when there are rewards
            valid = filters.valid_only(group) if any(r is not None for r in group) else None
            chosen, agree = filters.majority_vote(completions[lo : lo + n], valid)
            agreement.append(agree)
            chosen = chosen if agree >= cfg.min_agreement else []
        kept += [lo + i for i in chosen]
    metrics = {"distill/kept_fraction": len(kept) / max(rows, 1)}
    if agreement:
        metrics["distill/agreement"] = float(np.mean(agreement))
    return kept, metrics


def prepare(
    batch: pa.RecordBatch, cfg: DistillConfig, student_tokenizer=None
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Filter, then the student's arrays. With a student tokenizer (it differs from the teacher's),
    the kept texts are tokenized again for the student and only sequence-level KD (CE) is possible."""
    kept, metrics = keep(batch, cfg)
    if not kept:
        return {}, metrics
    batch = batch.take(pa.array(kept))
    if student_tokenizer is not None:
        texts = [
            datasets.Example(p, c)
            for p, c in zip(batch.column("prompt").to_pylist(), batch.column("completion").to_pylist(), strict=True)
        ]
        return training_arrays(make_batch("retokenized", encode(student_tokenizer, texts, 4096)), pad_id=0), metrics
    metrics["distill/topk_bytes_per_token"] = float(cfg.sampling.topk_logprobs * (4 + 2))  # int32 id + float16
    return training_arrays(batch, pad_id=0), metrics


def foreign_tokenizer(teacher: str, student: str):
    """The student's tokenizer when its vocabulary differs from the teacher's, else None."""
    from transformers import AutoTokenizer

    t, s = AutoTokenizer.from_pretrained(teacher), AutoTokenizer.from_pretrained(student)
    return None if t.get_vocab() == s.get_vocab() else s


def student_dir(spec: pb.JobSpec, params: pb.DistillStage, teacher: str, adapter: str, out: Path) -> str:
    """The student: a path, or made from the teacher (a subset of its layers, from the base or the
    tuned teacher) or from the teacher's config made smaller."""
    if spec.student.path:
        return str(model_dir(spec.student))
    target = out / "student-init"
    if not (target / "config.json").exists():
        init = params.student_init
        if init.keep_every_nth_layer:
            tuned = adapter if init.from_tuned else ""
            from_teacher_layers(teacher, target, every=init.keep_every_nth_layer, adapter=tuned)
        else:
            from_config(teacher, target, **dict(init.config_overrides))
    return str(target)


def held_out_kl(loop: TrainLoop, prompts: list[str], cfg: DistillConfig) -> float:
    """The student's forward KL to the teacher (over the teacher's top-k + tail) on held-out prompts,
    on the teacher's own greedy answers."""
    generator, trainers = loop.roles.actors["generator"][0], loop.roles.actors["trainer"]
    greedy = SamplingParams(
        n=1, max_new_tokens=cfg.sampling.max_new_tokens, temperature=0.0, topk_logprobs=cfg.sampling.topk_logprobs
    )
    samples = ray.get(generator.generate.remote(make_batch("eval", {"prompt": prompts}), greedy))
    arrays = training_arrays(samples, pad_id=0)
    total, count = ray.get(trainers[0].eval_kd.remote(arrays))
    return total / max(count, 1)


def _report(metrics: dict[str, float], ctx: StageContext, total: int) -> None:
    ctx.metrics(metrics)
    if "train/step" in metrics:
        ctx.progress(int(metrics["train/step"]), total, "steps")


def on_policy_loop(
    loop: TrainLoop, batches: list[pa.RecordBatch], cfg: DistillConfig, ctx: StageContext, seed: int
) -> None:
    """GKD: each step trains either on the student's own samples, graded token by token by the
    teacher (probability lambda), or on filtered teacher samples; the student's new weights then go
    to the generators that sample from it. Synchronous by nature: the next samples need them."""
    roles = loop.roles.actors
    student, teacher, scorer = roles["student"][0], roles["generator"][0], roles["scorer"][0]
    own = SamplingParams(n=cfg.num_samples, max_new_tokens=cfg.sampling.max_new_tokens, temperature=1.0)
    rng = np.random.default_rng(seed)
    ray.get(student.load_weights.remote(ray.get(roles["trainer"][0].weights.remote()), 0))
    for step, batch in enumerate(batches):
        ctx.check_cancelled()
        if rng.random() < cfg.on_policy_fraction:
            samples = ray.get(
                teacher.score_topk.remote(student.generate.remote(batch, own), cfg.sampling.topk_logprobs)
            )
            arrays, metrics, objective = (
                training_arrays(samples, pad_id=0),
                {"distill/on_policy": 1.0},
                cfg.on_policy_objective,
            )
        else:
            scored = ray.get(scorer.score.remote(teacher.generate.remote(batch, cfg.sampling)))
            arrays, metrics = prepare(scored, cfg)
            metrics["distill/on_policy"], objective = 0.0, cfg.objective
        if arrays:
            shards = [shard(arrays, r, len(roles["trainer"])) for r in range(len(roles["trainer"]))]
            results = ray.get(
                [t.train_step.remote(s, objective) for t, s in zip(roles["trainer"], shards, strict=True)]
            )
            metrics.update({k: float(np.mean([m[k] for m in results])) for k in ("loss", "loss/kd", "loss/ce")})
        ray.get(student.load_weights.remote(ray.get(roles["trainer"][0].weights.remote()), step + 1))
        ctx.metrics(metrics)
        ctx.progress(step + 1, len(batches), "steps")


def run(params: pb.DistillStage, spec: pb.JobSpec, ctx: StageContext) -> None:
    """Stage entry point."""
    cfg = DistillConfig.of(params)
    teacher = ctx.outputs.get("policy_model") or str(model_dir(spec.teacher))
    adapter = ctx.outputs.get("policy_adapter", "")
    out = ctx.artifact_dir / ctx.stage
    student = student_dir(spec, params, teacher, adapter, out)
    source = spec.data.unlabeled if spec.data.unlabeled.path else spec.data.train
    rows = datasets.load_ref(source).rows
    held = spec.data.test if spec.data.test.path else spec.data.eval
    eval_prompts = [r["prompt"] for r in datasets.load_ref(held).rows[: cfg.eval_prompts]] if held.path else []
    journal_root = out / "journal"
    if params.reuse_journal_of:
        journal_root = ctx.artifact_dir.parent / params.reuse_journal_of / ctx.stage / "journal"
    roles = ctx.roles(spec.resources, ("generator", "scorer", "trainer") + ("student",) * bool(cfg.on_policy_fraction))
    roles.start(
        "generator", GeneratorSpec(teacher, adapter_path=adapter, frozen=True, dtype=inference_dtype(), seed=spec.seed)
    )
    roles.start("scorer", scorer_spec(params.rewards, ctx.reward_modules))
    trainer = TrainerSpec(
        student,
        adapter="none",
        learning_rate=cfg.learning_rate,
        seed=spec.seed,
        checkpoint_dir=str(out / "checkpoints"),
        zero_stage=params.optim.zero_stage,
    )
    batches = prompt_batches(rows, teacher + adapter, cfg, spec.seed)
    foreign = foreign_tokenizer(teacher, student)  # a student with its own vocabulary: text-level KD only
    if foreign is not None:
        eval_prompts = []  # a KL over the teacher's vocabulary means nothing for this student
    loop = TrainLoop(
        roles,
        trainer,
        Journal(journal_root),
        LoopConfig(
            sampling=cfg.sampling,
            prepare=partial(prepare, cfg=cfg, student_tokenizer=foreign),
            objective=cfg.objective,
            sync_every=0,
            max_staleness=params.max_ahead if params.HasField("max_ahead") else None,
            checkpoint_every=params.optim.checkpoint_every or 10,
        ),
        report=partial(_report, ctx=ctx, total=len(batches)),
        cancelled=ctx.is_cancelled,
    )
    loop.start_trainers()  # the student, before any training: the "before" of the held-out KL
    if eval_prompts:
        ctx.metrics({"eval/kl_before": held_out_kl(loop, eval_prompts, cfg)})
    if cfg.on_policy_fraction:
        roles.start("student", GeneratorSpec(student, seed=spec.seed))
        on_policy_loop(loop, batches, cfg, ctx, spec.seed)
    else:
        result = loop.run(batches)
        generated = len(batches) - result.replayed
        ctx.metrics(
            {
                "teacher/generated_batches": generated,
                "teacher/replayed_batches": result.replayed,
                "journal/bytes": Journal(journal_root).bytes(),
            }
        )
    if eval_prompts:
        ctx.metrics({"eval/kl_after": held_out_kl(loop, eval_prompts, cfg)})
    saved = save_student(roles.actors["trainer"], student, out / "student", ctx)
    ctx.outputs["student_model"] = saved
    ctx.offer_model("student", saved)
    if params.baseline:
        roles.stop("trainer")
        trainers = roles.start("trainer", replace(trainer, checkpoint_dir=str(out / "baseline-checkpoints")))
        train_baseline(trainers, student, spec, cfg, steps=len(batches), ctx=ctx)
        ctx.offer_model("student_baseline", save_student(trainers, student, out / "student-baseline", ctx))


def save_student(trainers: list, init: str, path: Path, ctx: StageContext) -> str:
    from transformers import AutoTokenizer

    ray.get([t.save_adapter.remote(str(path)) for t in trainers])
    AutoTokenizer.from_pretrained(init).save_pretrained(path)
    ctx.artifact_tree(path, "model")
    return str(path)


def train_baseline(trainers: list, student: str, spec: pb.JobSpec, cfg: DistillConfig, steps: int, ctx) -> None:
    """The same student init trained on data.train's gold answers alone, for as many steps of as
    many rows as the distillation had: what distillation must beat."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(student)
    gold = encode(tok, datasets.load_ref(spec.data.train).examples(), 4096)
    n = len(gold["prompt_ids"])
    epochs = -(-steps * cfg.prompts_per_step // n)  # ceil: enough passes over the gold rows
    order = step_order(n, cfg.prompts_per_step, spec.seed, epochs=epochs, max_steps=steps)
    for step, rows in enumerate(order):
        ctx.check_cancelled()
        metrics = train_rows(trainers, gold, rows, tok.pad_token_id or 0)
        ctx.metrics({f"baseline/{k}": v for k, v in metrics.items()} | {"step": step + 1})
        ctx.progress(step + 1, steps, "baseline steps")
