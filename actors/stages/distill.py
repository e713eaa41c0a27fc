"""The `distill` stage: the tuned teacher labels prompts, filters keep the samples worth learning
from, and the student learns from them with alpha * CE + (1 - alpha) * KD over the teacher's top-k
log-probs (offline); or, with `lambda`, from its own samples graded token by token by the teacher
(on-policy, GKD).

    prompts -> Generator (teacher: n samples, top-k) -> RewardScorer -> filter -> Trainer (student)

What the teacher wrote is journaled under content-addressed batch ids (teacher, sampling, prompts):
a later job that names this one in `reuse_journal_of` replays it and generates nothing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
from stillroom.actors.common import datasets
from stillroom.actors.models.loading import encode_examples, encode_prompt, model_dir
from stillroom.actors.models.students import from_config, from_teacher_layers
from stillroom.actors.roles.generator import GeneratorSpec, SamplingParams
from stillroom.actors.roles.scorer import scorer_spec
from stillroom.actors.runtime.batches import batch_id, make_batch, replay, rows_batch, training_arrays
from stillroom.actors.runtime.context import StageContext
from stillroom.actors.runtime.journal import Journal
from stillroom.actors.runtime.loop import TrainLoop
from stillroom.actors.runtime.restarts import TrainerGroup, run_steps, with_restarts
from stillroom.actors.runtime.trainers import eval_sums, prune_checkpoints, resume, save_checkpoint, weights
from stillroom.actors.stages.distill_samples import DistillConfig, prepare, without_passages
from stillroom.actors.stages.distill_until import BUDGET, KL, STEPS, Until, stop_message, train_until
from stillroom.actors.stages.index import prompt_rows, retrieved
from stillroom.actors.stages.on_policy import on_policy_loop
from stillroom.actors.stages.sft import step_order, train_rows
from stillroom.actors.stages.wiring import (
    FractionGuard,
    held_out,
    reward_failures,
    save_model,
    step_reporter,
    trainer_spec,
    tuned_policy,
)
from stillroom.v1 import job_pb2 as pb
from transformers import AutoTokenizer

# How student_init picks the layers it keeps, unless it says (measured: see README, issue 27).
DEFAULT_LAYER_CHOICE = "importance"


def run(params: pb.DistillStage, spec: pb.JobSpec, ctx: StageContext) -> None:
    """The teacher labels prompts, the filter keeps what is worth learning, the student learns it
    (or its own samples, graded by the teacher) until a held-out measure stops improving (or for
    the steps optim sets); held-out KL before and after; save the student (and, with `baseline`,
    its twin trained on the labelled rows alone)."""
    cfg = DistillConfig.of(params)
    teacher, adapter = tuned_policy(ctx, spec)
    out = ctx.artifact_dir / ctx.stage
    rows = prompt_rows(ctx, spec, prompt_source(spec))  # with passages (and their ids), under `retrieval`
    student = student_dir(spec, params, teacher, adapter, out, rows, ctx.log)
    foreign = foreign_tokenizer(teacher, student)  # a student with its own vocabulary: text-level KD only
    # the held-out KL's prompts, made as the training prompts are (before the roles: retrieval holds one)
    eval_rows = [] if foreign is not None else held_out_rows(ctx, spec, cfg.eval_prompts)
    cfg, until = budget(params, cfg, rows)
    roles = start_roles(ctx, spec, params, cfg, until, (teacher, adapter, student))
    batches = prompt_batches(rows, teacher + adapter, cfg, spec.seed)
    trainer = trainer_spec(student, params.optim, out, spec.seed, default_lr=5e-4, total_steps=len(batches))
    bare = AutoTokenizer.from_pretrained(teacher) if params.student_without_passages else None
    prepare_batch = partial(prepare, cfg=cfg, student_tokenizer=foreign, bare_tokenizer=bare)
    every = params.optim.checkpoint_every or 10
    guard = kept_fraction(cfg, reward_failures(step_reporter(ctx, len(batches)), cfg.max_reward_failures))

    def new_loop() -> TrainLoop:
        return TrainLoop(
            roles,
            trainer,
            Journal(journal_root(params, ctx)),
            cfg.loop(prepare_batch, every, rows, spec.seed),
            on_metrics=guard,
            cancelled=ctx.is_cancelled,
            on_warning=ctx.warn,
        )

    loop = new_loop()
    start = loop.start_trainers()  # the student, before any training: the "before" of the held-out KL
    probe = teacher_answers(loop, eval_rows, cfg, bare) if eval_rows else None
    if probe is not None:
        ctx.metrics({"eval/kl_before": held_out_kl(loop.trainers, probe)})
    chunks = Chunks(loop, new_loop, batches, cfg, ctx, spec.seed, every, prepare_batch)
    plateau = train_to_outcome(chunks, until, start, len(batches), measure_of(until, loop, probe, eval_rows, cfg), ctx)
    keep_best(chunks.group, plateau, chunks.trained, ctx)
    if not cfg.on_policy_fraction:
        ctx.metrics(teacher_metrics(chunks.replayed, chunks.trained, loop.journal))
    if probe is not None:
        ctx.metrics({"eval/kl_after": held_out_kl(loop.trainers, probe)})
    save = partial(save_model, ctx, tokenizer_of=student, path=out / "student", kind="model")
    ctx.outputs["student_model"] = with_restarts(loop.trainers, save, "saving the student")
    ctx.offer_model("student", ctx.outputs["student_model"])
    if params.baseline:
        roles.stop("trainer")
        group = TrainerGroup(
            roles, replace(trainer, checkpoint_dir=str(out / "baseline-checkpoints")), on_restart=ctx.warn
        )
        train_baseline(group, student, spec, cfg, chunks.trained or len(batches), ctx, every)
        ctx.offer_model("student_baseline", save_model(ctx, group.actors, student, out / "student-baseline", "model"))


def budget(params: pb.DistillStage, cfg: DistillConfig, rows: list[dict]) -> tuple[DistillConfig, Until | None]:
    """The stopping rule, and the settings its budget needs: as many passes over the prompts as
    until.max_steps takes, every pass after the first replayed from the journal."""
    per_pass = -(-len(rows) // cfg.prompts_per_step)
    until = Until.of(params, per_pass)
    if until:
        cfg = replace(cfg, max_steps=until.max_steps, epochs=-(-until.max_steps // per_pass))
    return cfg, until


def start_roles(ctx: StageContext, spec: pb.JobSpec, params: pb.DistillStage, cfg: DistillConfig, until, models):
    """The teacher's generator and the scorer; the student's generator when it samples (on-policy)
    or is measured by a reward (until.metric). `models`: (teacher, its adapter, student)."""
    teacher, adapter, student = models
    student_role = bool(cfg.on_policy_fraction) or bool(until and until.metric != KL)
    names = ("generator", "scorer", "trainer") + ("student",) * student_role
    # Offline, the teacher generates while the student trains: each role its own threads. On-policy
    # steps take turns (sample, grade, train), each on every core.
    overlap = cfg.max_ahead != 0 and not cfg.on_policy_fraction
    roles = ctx.roles(spec.resources, names, overlap=overlap)
    # the frozen teacher picks its dtype on its own hardware (bfloat16 where it multiplies it natively)
    roles.start("generator", GeneratorSpec(teacher, adapter_path=adapter, frozen=True, seed=spec.seed))
    roles.start("scorer", scorer_spec(params.rewards, ctx.reward_modules))
    if student_role:
        roles.start("student", GeneratorSpec(student, seed=spec.seed))
    return roles


class Chunks:
    """Training steps done..end-1, offline (a fresh TrainLoop per chunk: its queues and serve loops
    start and end with it; the trainer group is shared) or on-policy; a checkpoint at each chunk's
    end, so a later chunk's restart never loses an earlier chunk's steps."""

    def __init__(self, loop: TrainLoop, new_loop, batches, cfg: DistillConfig, ctx: StageContext, seed, every, prepare):
        self.loop, self.new_loop, self.group, self.batches = loop, new_loop, loop.trainers, batches
        self.cfg, self.ctx, self.seed, self.every, self.prepare = cfg, ctx, seed, every, prepare
        self.replayed = self.trained = 0

    def __call__(self, done: int, end: int) -> None:
        self.group.cursor = done  # where the loop (or run_steps) starts
        if self.cfg.on_policy_fraction:
            on_policy_loop(self.loop, self.batches, self.cfg, self.ctx, self.seed, self.every, self.prepare, upto=end)
        else:
            loop = self.loop if self.loop is not None else self.new_loop()
            loop.trainers, self.loop = self.group, None
            result = loop.run(self.batches[:end])
            self.replayed += result.replayed
            if end % self.every:
                with_restarts(self.group, lambda actors: save_checkpoint(actors, end), "a checkpoint")
        self.trained = end


def train_to_outcome(chunks: Chunks, until: Until | None, start: int, total: int, measure, ctx: StageContext):
    """Train until the held-out measure plateaus (or the budget), or the fixed steps; say why it
    stopped (a log event and distill/stop_reason/<reason> = 1). Returns the evaluations (a
    Plateau; None without a measure)."""
    if until is None:
        chunks(start, total)
        reason, plateau = STEPS, None
    elif measure is None:
        ctx.warn(
            f"distill.until: no held-out {until.metric} to measure (no data.test / data.eval, or a student "
            f"with its own tokenizer): trained for until.max_steps {until.max_steps}"
        )
        chunks(start, total)
        reason, plateau = BUDGET, None
    else:
        reason, plateau = train_until(
            chunks,
            measure,
            until,
            start,
            ctx.metrics,
            ctx.artifact_dir / ctx.stage / "until.json",
            partial(prune, chunks.group),
        )
    ctx.metrics({f"distill/stop_reason/{reason}": 1.0, "distill/steps": float(chunks.trained)})
    ctx.log(stop_message(reason, plateau, chunks.trained))
    return plateau


def prune(group: TrainerGroup, plateau) -> None:
    """After each evaluation, only the checkpoints of the best one so far and the newest stay (one
    is ~16 bytes a parameter with Adam's state): a restarted trainer resumes from the newest,
    keep_best loads the best."""
    best = plateau.best()
    keep = {plateau.history[-1][0]} | ({best[0]} if best else set())
    with_restarts(group, lambda actors: prune_checkpoints(actors, keep), "pruning checkpoints")


def keep_best(group: TrainerGroup, plateau, trained: int, ctx: StageContext) -> None:
    """The student of the best evaluation, not the last (HF Trainer's load_best_model_at_end):
    its checkpoint, written at that chunk's end, is loaded back when later evaluations did not
    beat it. distill/best_step is the step the saved student is from."""
    best = plateau.best() if plateau is not None else None
    if best is None or best[0] == trained:
        return
    metric = plateau.until.metric
    loaded = with_restarts(group, lambda actors: resume(actors, best[0]), "the best student") if best[0] else None
    if loaded != best[0]:
        what = f"step {best[0]}, which has no checkpoint" if best[0] else "the untrained student: no step beat it"
        ctx.warn(f"distill: the best held-out {metric} was {what}; the saved student is the last (step {trained})")
        return
    ctx.metrics({"distill/best_step": float(best[0])})
    ctx.log(
        f"student: step {best[0]}'s, the best held-out {metric} ({best[1]:.4g}); the {trained - best[0]} "
        "steps after it did not beat it"
    )


def measure_of(until: Until | None, loop: TrainLoop, probe, rows: list[dict], cfg: DistillConfig):
    """The held-out measure until watches: the KL on the teacher's answers, or a reward's mean over
    the student's greedy answers; None when there is nothing to measure it on."""
    if until is None or not rows:
        return None
    if until.metric == KL:
        return None if probe is None else (lambda: held_out_kl(loop.trainers, probe))
    return lambda: held_out_reward(loop, rows, cfg, until.metric)


def prompt_source(spec: pb.JobSpec) -> pb.DatasetRef:
    """What the teacher labels: data.unlabeled, else data.train."""
    return spec.data.unlabeled if spec.data.unlabeled.path else spec.data.train


def journal_root(params: pb.DistillStage, ctx: StageContext) -> Path:
    """This stage's journal, or that of the earlier job `reuse_journal_of` names."""
    job_dir = ctx.artifact_dir.parent / params.reuse_journal_of if params.reuse_journal_of else ctx.artifact_dir
    return job_dir / ctx.stage / "journal"


def held_out_rows(ctx: StageContext, spec: pb.JobSpec, n: int) -> list[dict]:
    """The first n held-out rows as the stage's training prompts are made (prompt_rows): whatever
    the split's shape (a conversation keeps its turns), with retrieved passages under `retrieval`."""
    ref = held_out(spec)
    if not ref.path:
        return []
    rows = datasets.load_ref(ref).examples()[:n]
    if spec.HasField("retrieval") and rows:
        rows = retrieved(ctx, spec, rows)
    return [ex.prompt_row() for ex in rows]


def teacher_metrics(replayed: int, batches: int, journal: Journal) -> dict[str, float]:
    return {
        "teacher/generated_batches": batches - replayed,
        "teacher/replayed_batches": replayed,
        "journal/bytes": journal.bytes(),
        # measured from the files: ids, log-probs and the top-k of every generated token, compressed
        "journal/bytes_per_token": journal.bytes() / max(journal.completion_tokens(), 1),
    }


def batch_key(teacher: str, sampling: SamplingParams, prompts: list[str]) -> str:
    """A content address for one batch of teacher output: same teacher, sampling and prompts, same id."""
    key = [teacher, sampling.__dict__, prompts]
    if sampling.temperature not in (0.0, 1.0):
        # Journals written at such a T before the top-k were stored at temperature 1 hold tempered
        # top-k: a new address, so a later job never replays them.
        key.append("topk at temperature 1")
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode())
    return "distill-" + h.hexdigest()[:24]


def prompt_batches(rows: list[dict], teacher: str, cfg: DistillConfig, seed: int = 0) -> list[pa.RecordBatch]:
    """One batch per step of rows (Dataset.prompts). The teacher writes the first epoch's batches (with max_steps, only
    max_steps / epochs of them); later epochs replay what it wrote, in a new seeded order,
    generating nothing."""
    per_epoch = -(-len(rows) // cfg.prompts_per_step)
    steps = cfg.max_steps or cfg.epochs * per_epoch
    first = []
    for lo in range(0, min(per_epoch, -(-steps // cfg.epochs)) * cfg.prompts_per_step, cfg.prompts_per_step):
        chunk = rows[lo : lo + cfg.prompts_per_step]
        prompts = [r.get("messages") or r.get("prompt") for r in chunk]  # a conversation: its turns and roles
        first.append(rows_batch(batch_key(teacher, cfg.sampling, prompts), chunk))
    batches, rng = list(first), np.random.default_rng(seed)
    for epoch in range(1, cfg.epochs):
        for i in rng.permutation(len(first)):
            copy = make_batch(f"{batch_id(first[i])}#{epoch}", first[i].to_pydict())
            batches.append(replay(copy, batch_id(first[i])))
    return batches[:steps]


def kept_fraction(cfg: DistillConfig, report) -> FractionGuard:
    """Step metrics -> the job's events, counting what the filter kept: the stage fails, saying
    why, once less than min_kept_fraction of the teacher's samples has been kept so far."""
    return FractionGuard(
        report,
        "distill/kept",
        "distill/samples",
        at_least=cfg.min_kept_fraction or None,
        why=lambda g: (
            f"the {cfg.filter} filter kept {g.top:.0f} of {g.bottom:.0f} teacher samples "
            f"({g.top / g.bottom:.3f}), below min_kept_fraction {cfg.min_kept_fraction}: the "
            "teacher is unsure on these prompts (lower min_agreement / min_reward, raise num_samples, "
            "or tune the teacher further)"
        ),
    )


def foreign_tokenizer(teacher: str, student: str):
    """The student's tokenizer when its vocabulary differs from the teacher's, else None."""
    t, s = AutoTokenizer.from_pretrained(teacher), AutoTokenizer.from_pretrained(student)
    return None if t.get_vocab() == s.get_vocab() else s


def student_dir(
    spec: pb.JobSpec, params: pb.DistillStage, teacher: str, adapter: str, out: Path, rows: list[dict], log=print
) -> str:
    """The student: a path, or made from the teacher (a subset of its layers, from the base or the
    tuned teacher: by measured importance on the first of `rows`, or every n-th) or from the
    teacher's config made smaller."""
    if spec.student.path:
        return str(model_dir(spec.student))
    target = out / "student-init"
    if not (target / "config.json").exists():
        init = params.student_init
        if init.keep_every_nth_layer:
            tuned = adapter if init.from_tuned else ""
            prompts = importance_prompts(teacher, rows, init)
            keep = from_teacher_layers(teacher, target, every=init.keep_every_nth_layer, adapter=tuned, prompts=prompts)
            how = f"by Block Influence on {len(prompts)} of the stage's prompts" if prompts else "every n-th"
            log(f"student: the teacher's layers {keep} ({how})")
        else:
            from_config(teacher, target, **dict(init.config_overrides))
    return str(target)


def importance_prompts(teacher: str, rows: list[dict], init: pb.StudentInit) -> list[list[int]]:
    """The token ids of the prompts the layers' importance is measured on (none: every n-th)."""
    if (init.layer_choice or DEFAULT_LAYER_CHOICE) != "importance":
        return []
    tok = AutoTokenizer.from_pretrained(teacher)
    return [
        encode_prompt(tok, r.get("prompt", ""), messages=r.get("messages"))
        for r in rows[: init.importance_prompts or 16]
    ]


def teacher_answers(loop: TrainLoop, rows: list[dict], cfg: DistillConfig, bare_tokenizer=None) -> dict:
    """The teacher's greedy answers to held-out rows, with its top-k, as the student's arrays (the
    student reads the prompts as it trained on them: without their passages under
    student_without_passages). Made once: the teacher is frozen."""
    generator = loop.roles.actors["generator"][0]
    greedy = SamplingParams(
        n=1, max_new_tokens=cfg.sampling.max_new_tokens, temperature=0.0, topk_logprobs=cfg.sampling.topk_logprobs
    )
    samples = ray.get(generator.generate.remote(rows_batch("eval", rows), greedy))
    if bare_tokenizer is not None and "query" in samples.schema.names:
        samples = without_passages(samples, bare_tokenizer)
    return training_arrays(samples, pad_id=0)


def held_out_kl(group: TrainerGroup, arrays: dict) -> float:
    """The student's forward KL to the teacher (over the teacher's top-k + tail) on its held-out
    answers (teacher_answers); every rank computes (ZeRO-3 forwards are collective)."""
    total, count = with_restarts(group, lambda actors: eval_sums(actors, "eval_kd", arrays), "the held-out KL")
    return total / max(count, 1)


def held_out_reward(loop: TrainLoop, rows: list[dict], cfg: DistillConfig, name: str) -> float:
    """The mean of reward `name` over the student's greedy answers to held-out rows: its current
    weights go to the student generator first."""
    student, scorer = loop.roles.actors["student"][0], loop.roles.actors["scorer"][0]
    ray.get(student.load_weights.remote(with_restarts(loop.trainers, weights, "the student's weights"), 0))
    greedy = SamplingParams(n=1, max_new_tokens=cfg.sampling.max_new_tokens, temperature=0.0)
    scored = ray.get(scorer.score.remote(student.generate.remote(rows_batch("eval", rows), greedy)))
    values = [v for v in scored.column(f"rewards/{name}").to_pylist() if v is not None]
    return float(np.mean(values)) if values else float("nan")


def train_baseline(
    group: TrainerGroup, student: str, spec: pb.JobSpec, cfg: DistillConfig, steps: int, ctx: StageContext, every: int
) -> None:
    """The same student init trained on data.train's gold answers alone, for as many steps of as
    many rows as the distillation had: what distillation must beat. Checkpoints every `every`."""
    tok = AutoTokenizer.from_pretrained(student)
    gold = encode_examples(tok, datasets.load_ref(spec.data.train).examples(), 4096)
    n = len(gold["prompt_ids"])
    epochs = -(-steps * cfg.prompts_per_step // n)  # ceil: enough passes over the gold rows
    order = step_order(n, cfg.prompts_per_step, spec.seed, epochs=epochs, max_steps=steps)

    def step(i: int) -> None:
        ctx.check_cancelled()
        metrics = train_rows(group.actors, gold, order[i], tok.pad_token_id or 0)
        ctx.metrics({f"baseline/{k}": v for k, v in metrics.items()} | {"step": i + 1})
        ctx.progress(i + 1, steps, "baseline steps")

    run_steps(group, len(order), step, every)
