"""The `grpo` stage: reinforcement fine-tuning of the teacher against reward functions.

Each step: the TeacherGenerators sample G completions per prompt from the current policy, the
RewardScorers score them, advantages are group-relative, and the Trainer group takes
`num_iterations` clipped-surrogate steps (old log-probs are the generator's, so a batch generated
by an older policy is importance-corrected), then syncs weights to the generators. With
`max_staleness` k, generation runs up to k policy versions ahead of training (one-step-off
asynchronous GRPO when k = 1), so generation and training overlap.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import pyarrow as pa
import torch
from stillroom.v1 import job_pb2 as pb

from actors import datasets
from actors.batches import make_batch, training_arrays
from actors.losses import group_advantages
from actors.models import model_dir
from actors.pipeline import LoopConfig, TrainLoop
from actors.queues import Journal
from actors.reward import scorer_spec
from actors.supervisor import StageContext
from actors.teacher import GeneratorSpec, SamplingParams
from actors.trainer import Objective, TrainerSpec


@dataclass(frozen=True)
class GrpoConfig:
    """The stage's parameters with TRL's defaults filled in (proto3 zero means "default")."""

    group_size: int
    prompts_per_step: int
    steps: int
    objective: Objective
    scale_rewards: str
    num_iterations: int
    max_staleness: int
    dynamic_sampling: bool
    sampling: SamplingParams
    adapter: str
    lora_r: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    learning_rate: float
    zero_stage: int
    checkpoint_every: int

    @classmethod
    def of(cls, p: pb.GrpoStage) -> GrpoConfig:
        loss_type = p.loss_type or "dapo"
        eps = p.epsilon or 0.2
        max_new = p.max_new_tokens or 64
        objective = Objective(
            "grpo", loss_type, eps, p.epsilon_high or (0.28 if loss_type == "dapo" else eps), p.beta, max_new
        )
        r = p.lora.r or 8
        return cls(
            p.group_size or 4,
            p.prompts_per_step or 4,
            p.optim.max_steps or 20,
            objective,
            p.scale_rewards or ("none" if loss_type == "dr_grpo" else "group"),
            p.num_iterations or 1,
            p.max_staleness,
            p.dynamic_sampling,
            SamplingParams(
                n=p.group_size or 4, max_new_tokens=max_new, temperature=p.temperature or 1.0, top_p=p.top_p or 1.0
            ),
            {pb.ADAPTER_TYPE_NONE: "none", pb.ADAPTER_TYPE_QLORA: "qlora"}.get(p.adapter, "lora"),
            r,
            p.lora.alpha or 2.0 * r,
            tuple(p.lora.target_modules),
            p.optim.learning_rate or 1e-5 * (10 if p.adapter != pb.ADAPTER_TYPE_NONE else 1),
            p.optim.zero_stage,
            p.optim.checkpoint_every or 10,
        )


def prompt_batches(rows: list[dict], cfg: GrpoConfig, seed: int) -> list[pa.RecordBatch]:
    """cfg.steps batches of prompts_per_step rows, cycling through seeded shuffles of the data.
    A `completion` column is the reference answer: it travels as `reference`."""
    rng = np.random.default_rng(seed)
    order: list[int] = []
    while len(order) < cfg.steps * cfg.prompts_per_step:
        order += rng.permutation(len(rows)).tolist()
    batches = []
    for step in range(cfg.steps):
        chunk = [rows[i] for i in order[step * cfg.prompts_per_step : (step + 1) * cfg.prompts_per_step]]
        chunk = datasets.as_prompts(chunk)
        columns = {k: [r.get(k) for r in chunk] for k in chunk[0]}
        batches.append(make_batch(f"grpo/{step:06d}", columns))
    return batches


def prepare(batch: pa.RecordBatch, cfg: GrpoConfig) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Scored rollouts -> trainer arrays with group-relative advantages, and TRL-named metrics."""
    rewards = np.array([np.nan if r is None else r for r in batch.column("reward").to_pylist()], dtype=np.float64)
    rewards = np.nan_to_num(rewards, nan=0.0)  # no function could score it: no signal
    adv, zero_std = group_advantages(torch.tensor(rewards), cfg.group_size, cfg.scale_rewards)
    arrays = training_arrays(batch, pad_id=0)
    arrays["advantages"] = adv.numpy().astype(np.float32)
    lengths = [len(ids) for ids in batch.column("completion_ids").to_pylist()]
    metrics = {
        "reward": float(rewards.mean()),
        "reward_std": float(rewards.reshape(-1, cfg.group_size).std(1, ddof=1).mean()),
        "frac_reward_zero_std": float(zero_std.float().mean()),
        "completions/mean_length": float(np.mean(lengths)),
        "completions/clipped_ratio": float(np.mean(batch.column("truncated").to_pylist())),
    }
    for name in (n for n in batch.schema.names if n.startswith("rewards/")):
        values = [v for v in batch.column(name).to_pylist() if v is not None]
        metrics[f"{name}/mean"] = float(np.mean(values)) if values else float("nan")
    if cfg.dynamic_sampling and bool(zero_std.any()) and not bool(zero_std.all()):
        keep = np.repeat(~zero_std.numpy(), cfg.group_size)  # groups without signal are dropped
        arrays = {k: v[keep] for k, v in arrays.items()}
    return arrays, metrics


def run(params: pb.GrpoStage, spec: pb.JobSpec, ctx: StageContext) -> None:
    """Stage entry point."""
    cfg = GrpoConfig.of(params)
    model = ctx.outputs.get("policy_model") or str(model_dir(spec.teacher))
    uses_adapter = cfg.adapter != "none"
    adapter = ctx.outputs.get("policy_adapter", "") if uses_adapter else ""
    rows = datasets.load_ref(spec.data.train).rows
    out = ctx.artifact_dir / ctx.stage
    roles = ctx.roles(spec.resources)
    lora = {"lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "target_modules": cfg.target_modules}
    roles.start(
        "generator",
        GeneratorSpec(
            model,
            adapter_path=adapter,
            seed=spec.seed,
            quantize_4bit=cfg.adapter == "qlora",
            **(lora if uses_adapter and not adapter else {}),
        ),
    )
    roles.start("scorer", scorer_spec(params.rewards, ctx.reward_modules))
    trainer = TrainerSpec(
        model,
        adapter=cfg.adapter,
        adapter_path=adapter,
        learning_rate=cfg.learning_rate,
        zero_stage=cfg.zero_stage,
        seed=spec.seed,
        checkpoint_dir=str(out / "checkpoints"),
        micro_batch_size=cfg.group_size * cfg.prompts_per_step,
        **lora,
    )

    def report(metrics: dict[str, float]) -> None:
        ctx.metrics(metrics)
        if "train/step" in metrics:
            ctx.progress(int(metrics["train/step"]), cfg.steps * cfg.num_iterations, "steps")

    loop = TrainLoop(
        roles,
        trainer,
        Journal(out / "journal"),
        LoopConfig(
            sampling=cfg.sampling,
            prepare=partial(prepare, cfg=cfg),
            objective=cfg.objective,
            num_iterations=cfg.num_iterations,
            max_staleness=cfg.max_staleness,
            checkpoint_every=cfg.checkpoint_every,
            queue_size=max(2, cfg.max_staleness + 1),
        ),
        report=report,
        cancelled=ctx.is_cancelled,
    )
    loop.run(prompt_batches(rows, cfg, spec.seed))
    saved = out / ("adapter" if uses_adapter else "model")
    import ray

    ray.get([t.save_adapter.remote(str(saved)) for t in roles.actors["trainer"]])
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(model).save_pretrained(saved)
    ctx.artifact_tree(saved, "adapter" if uses_adapter else "model")
    if uses_adapter:
        ctx.set_policy(model, str(saved))
    else:
        ctx.set_policy(str(saved))
