"""The `sft` stage: supervised fine-tuning of the teacher on prompt/completion or chat data, with a
LoRA adapter or full fine-tuning, on the Trainer group (DeepSpeed). The tokenizer's chat template is
applied when it has one; the loss covers completion tokens only. Eval loss on the eval split every
`eval_every` steps; checkpoints every `checkpoint_every`; the adapter saved in PEFT format at the
end (and a merged model on request).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import ray
from stillroom.v1 import job_pb2 as pb

from actors import datasets
from actors.batches import make_batch, shard, training_arrays
from actors.models import encode_prompt, model_dir
from actors.supervisor import StageContext
from actors.trainer import TrainerSpec


@dataclass(frozen=True)
class SftConfig:
    """The stage's parameters with defaults filled in (proto3 zero means "default")."""

    adapter: str
    lora_r: int
    lora_alpha: float
    lora_dropout: float
    target_modules: tuple[str, ...]
    learning_rate: float
    batch_size: int
    grad_accum: int
    epochs: int
    max_steps: int
    zero_stage: int
    warmup_steps: int
    eval_every: int
    checkpoint_every: int
    max_length: int
    merge: bool

    @classmethod
    def of(cls, p: pb.SftStage) -> SftConfig:
        o, r = p.optim, p.lora.r or 8
        adapter = {pb.ADAPTER_TYPE_NONE: "none", pb.ADAPTER_TYPE_QLORA: "qlora"}.get(p.adapter, "lora")
        return cls(
            adapter,
            r,
            p.lora.alpha or 2.0 * r,
            p.lora.dropout,
            tuple(p.lora.target_modules),
            o.learning_rate or (2e-4 if adapter != "none" else 2e-5),
            o.batch_size or 8,
            o.gradient_accumulation_steps or 1,
            o.epochs or 1,
            o.max_steps,
            o.zero_stage,
            o.warmup_steps,
            p.eval_every or 10,
            o.checkpoint_every or 50,
            p.max_length or 512,
            p.merge,
        )


def encode(tokenizer, examples: list[datasets.Example], max_length: int) -> dict[str, list]:
    """prompt_ids / completion_ids per example. The chat template (when the tokenizer has one)
    frames the prompt as a user turn; the completion ends with EOS; long rows are cut at max_length."""
    prompt_ids, completion_ids = [], []
    for ex in examples:
        p = encode_prompt(tokenizer, ex.prompt)
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        c = tokenizer(ex.completion or "", add_special_tokens=False)["input_ids"] + eos
        p = p[-max(1, max_length - len(c)) :] if len(p) + len(c) > max_length else p
        prompt_ids.append(p)
        completion_ids.append(c[: max(1, max_length - len(p))])
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids}


def run(params: pb.SftStage, spec: pb.JobSpec, ctx: StageContext) -> None:
    """Stage entry point: the loop below is the whole stage."""
    from transformers import AutoTokenizer

    cfg = SftConfig.of(params)
    model = ctx.outputs.get("policy_model") or str(model_dir(spec.teacher))
    tok = AutoTokenizer.from_pretrained(model)
    train = encode(tok, datasets.load_ref(spec.data.train).examples(), cfg.max_length)
    held_out = (
        encode(tok, datasets.load_ref(spec.data.eval).examples(), cfg.max_length) if spec.data.eval.path else None
    )
    out = ctx.artifact_dir / ctx.stage
    trainers = ctx.roles(spec.resources, roles=("trainer",)).start(
        "trainer",
        TrainerSpec(
            str(model),
            adapter=cfg.adapter,
            lora_r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=cfg.target_modules,
            learning_rate=cfg.learning_rate,
            zero_stage=cfg.zero_stage,
            gradient_accumulation_steps=cfg.grad_accum,
            warmup_steps=cfg.warmup_steps,
            seed=spec.seed,
            checkpoint_dir=str(out / "checkpoints"),
            dtype="float32",
        ),
    )
    order = step_order(len(train["prompt_ids"]), cfg.batch_size, spec.seed, cfg.epochs, cfg.max_steps)
    cursor = ray.get([t.resume.remote() for t in trainers])[0]
    if held_out and cursor == 0:
        ctx.metrics({"eval/loss": eval_loss(trainers, held_out)})
    for step in range(cursor, len(order)):
        ctx.check_cancelled()
        metrics = train_rows(trainers, train, order[step], tok.pad_token_id or 0)
        ctx.progress(step + 1, len(order), "steps")
        ctx.metrics({f"train/{k}": v for k, v in metrics.items()})
        last = step + 1 == len(order)
        if held_out and ((step + 1) % cfg.eval_every == 0 or last):
            ctx.metrics({"eval/loss": eval_loss(trainers, held_out)})
        if (step + 1) % cfg.checkpoint_every == 0 or last:
            ray.get([t.save_checkpoint.remote(step + 1) for t in trainers])
    adapter = out / ("adapter" if cfg.adapter != "none" else "model")
    merged = str(out / "merged") if cfg.merge and cfg.adapter != "none" else ""
    ray.get([t.save_adapter.remote(str(adapter), merged) for t in trainers])
    tok.save_pretrained(adapter)
    if cfg.adapter == "none" or merged:
        ctx.set_policy(merged or str(adapter))
    else:
        ctx.set_policy(str(model), str(adapter))
    ctx.artifact_tree(adapter, "adapter" if cfg.adapter != "none" else "model")
    if merged:
        tok.save_pretrained(merged)
        ctx.artifact_tree(out / "merged", "model")


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
    results = ray.get([t.train_step.remote(shard(arrays, r, len(trainers))) for r, t in enumerate(trainers)])
    return {
        "loss": float(np.mean([m["loss"] for m in results])),
        "tokens_per_s": sum(m["tokens"] for m in results) / max(m["step_s"] for m in results),
    }


def eval_loss(trainers: list, data: dict[str, list], batch_size: int = 32) -> float:
    """Mean token NLL of the completions in `data`, over every rank's share."""
    total, count = 0.0, 0
    n = len(data["prompt_ids"])
    for lo in range(0, n, batch_size):
        rows = make_batch("eval", {k: v[lo : lo + batch_size] for k, v in data.items()})
        arrays = training_arrays(rows, pad_id=0)
        sums = ray.get([t.eval_loss.remote(shard(arrays, r, len(trainers))) for r, t in enumerate(trainers)])
        total += sum(s for s, _ in sums)
        count += sum(c for _, c in sums)
    return total / max(count, 1) if count else math.nan
