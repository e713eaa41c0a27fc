"""The `sft` stage: supervised fine-tuning of the teacher on prompt/completion or chat data, with a
LoRA adapter or full fine-tuning, on the Trainer group (DeepSpeed). The tokenizer's chat template
renders each row's turns when it has one; the loss covers the answer (the assistant's turn) only.
Eval loss on the eval split every `eval_every` steps; checkpoints every `checkpoint_every`, from
which the group restarts if a rank dies; the adapter saved in PEFT format at the end (and a merged
model on request). With `without_passages`, the fine-tuned-only baseline: the base teacher on the
questions alone, offered for evaluation but not made the policy.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
from stillroom.actors.models.loading import encode_examples, model_dir
from stillroom.actors.runtime.batches import make_batch, training_arrays
from stillroom.actors.runtime.context import StageContext
from stillroom.actors.runtime.restarts import TrainerGroup, run_steps, with_restarts
from stillroom.actors.runtime.trainers import eval_sums, train_step
from stillroom.actors.stages.index import examples
from stillroom.actors.stages.wiring import adapter_name, save_policy, trainer_spec, tuned_policy
from stillroom.v1 import job_pb2 as pb
from transformers import AutoTokenizer


def run(params: pb.SftStage, spec: pb.JobSpec, ctx: StageContext) -> None:
    """Steps over seeded shuffles of the labelled rows, eval loss every eval_every, checkpoints
    every checkpoint_every (a restarted group continues at its cursor); then save the policy."""
    adapter, o = adapter_name(params.adapter), params.optim
    # the fine-tuned-only baseline starts from the base teacher, whatever earlier stages made
    model = str(model_dir(spec.teacher)) if params.without_passages else tuned_policy(ctx, spec)[0]
    tok = AutoTokenizer.from_pretrained(model)
    rag, length = not params.without_passages, params.max_length or 512
    train, held = (encoded(ctx, spec, tok, ref, length, rag) for ref in (spec.data.train, spec.data.eval))
    out = ctx.artifact_dir / ctx.stage
    default_lr = 2e-4 if adapter != "none" else 2e-5
    order = step_order(len(train["prompt_ids"]), o.batch_size or 8, spec.seed, o.epochs or 1, o.max_steps)
    trainer = trainer_spec(model, o, out, spec.seed, default_lr, adapter, params.lora, total_steps=len(order))
    group = TrainerGroup(ctx.roles(spec.resources, roles=("trainer",)), trainer, on_restart=ctx.warn)
    if held and group.start() == 0:
        ctx.metrics({"eval/loss": eval_loss(group.actors, held)})

    def step(i: int) -> None:
        ctx.check_cancelled()
        metrics = train_rows(group.actors, train, order[i], tok.pad_token_id or 0)
        ctx.progress(i + 1, len(order), "steps")
        ctx.metrics({f"train/{k}": v for k, v in metrics.items()})
        if held and ((i + 1) % (params.eval_every or 10) == 0 or i + 1 == len(order)):
            ctx.metrics({"eval/loss": eval_loss(group.actors, held)})

    run_steps(group, len(order), step, o.checkpoint_every or 50)
    save = partial(
        save_policy, ctx, base=model, uses_adapter=adapter != "none", out=out, merge=params.merge, baseline=not rag
    )
    with_restarts(group, save, "saving the policy")


def encoded(
    ctx: StageContext, spec: pb.JobSpec, tokenizer, ref: pb.DatasetRef, max_length: int, rag: bool = True
) -> dict | None:
    """prompt_ids / completion_ids of a labelled split (with its passages, under `retrieval`,
    unless not rag), or None when the split is not set."""
    if not ref.path:
        return None
    return encode_examples(tokenizer, examples(ctx, spec, ref, rag), max_length)


def step_order(n: int, batch_size: int, seed: int, epochs: int = 1, max_steps: int = 0) -> list[list[int]]:
    """Row indices per step: each epoch a seeded shuffle cut into batches; max_steps caps the total."""
    rng = np.random.default_rng(seed)
    steps: list[list[int]] = []
    for _ in range(epochs):
        perm = rng.permutation(n).tolist()
        steps += [perm[i : i + batch_size] for i in range(0, n, batch_size)]
    return steps[:max_steps] if max_steps else steps


def train_rows(trainers: list, data: dict[str, list], rows: list[int], pad_id: int) -> dict[str, float]:
    """One optimizer step of every rank on its share of data's `rows` (cross-entropy on the
    completions): {"loss", "tokens_per_s"}."""
    arrays = training_arrays(make_batch("sft", {k: [v[i] for i in rows] for k, v in data.items()}), pad_id=pad_id)
    step = train_step(trainers, arrays)
    return {"loss": step["loss"], "tokens_per_s": step["tokens"] / step["step_s"]}


def eval_loss(trainers: list, data: dict[str, list], batch_size: int = 32) -> float:
    """Mean token NLL of the completions in `data`, over every rank's share."""
    total, count = 0.0, 0
    n = len(data["prompt_ids"])
    for lo in range(0, n, batch_size):
        rows = make_batch("eval", {k: v[lo : lo + batch_size] for k, v in data.items()})
        nll, tokens = eval_sums(trainers, "eval_loss", training_arrays(rows, pad_id=0))
        total, count = total + nll, count + tokens
    return total / max(count, 1) if count else math.nan
