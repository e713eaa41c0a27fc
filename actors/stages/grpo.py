"""The `grpo` stage: reinforcement fine-tuning of the teacher against reward functions.

Each step: the Generators sample G completions per prompt from the current policy, the
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
from stillroom.actors.algo.advantages import group_advantages
from stillroom.actors.algo.objectives import GrpoObjective
from stillroom.actors.roles.generator import GeneratorSpec, SamplingParams
from stillroom.actors.roles.scorer import failure_metrics, scorer_spec
from stillroom.actors.roles.trainer import TrainerSpec
from stillroom.actors.runtime.batches import refill_batch, rows_batch, training_arrays
from stillroom.actors.runtime.context import StageContext
from stillroom.actors.runtime.journal import Journal
from stillroom.actors.runtime.loop import TrainLoop
from stillroom.actors.runtime.loop_config import LoopConfig, Refill
from stillroom.actors.runtime.restarts import with_restarts
from stillroom.actors.stages.index import prompt_rows
from stillroom.actors.stages.wiring import (
    adapter_name,
    reward_failures,
    save_policy,
    step_reporter,
    trainer_spec,
    tuned_policy,
)
from stillroom.v1 import job_pb2 as pb


@dataclass(frozen=True)
class GrpoConfig:
    """The stage's parameters with TRL's defaults filled in (proto3 zero means "default")."""

    group_size: int
    prompts_per_step: int
    steps: int
    objective: GrpoObjective
    scale_rewards: str
    num_iterations: int
    max_staleness: int
    dynamic_sampling: bool
    max_resample: int
    mask_truncated: bool
    sampling: SamplingParams
    adapter: str
    checkpoint_every: int
    max_reward_failures: float  # the fraction of samples reward functions may fail on

    @classmethod
    def of(cls, p: pb.GrpoStage) -> GrpoConfig:
        loss_type = p.loss_type or "dapo"
        eps = p.epsilon or 0.2
        max_new = p.max_new_tokens or 64
        objective = GrpoObjective(
            loss_type,
            eps,
            p.epsilon_high or (0.28 if loss_type == "dapo" else eps),
            p.beta,
            max_new,
            p.temperature or 1.0,  # the sampling temperature: log-probs are computed at it
            p.importance_sampling_level or "token",
            correction_mode(p),
            p.importance_sampling_cap or 3.0,
        )
        return cls(
            p.group_size or 4,
            p.prompts_per_step or 4,
            p.optim.max_steps or 20,
            objective,
            p.scale_rewards or ("none" if loss_type == "dr_grpo" else "group"),
            p.num_iterations or 1,
            p.max_staleness,
            p.dynamic_sampling,
            p.max_resample or 3,
            p.mask_truncated_completions,
            SamplingParams(
                n=p.group_size or 4, max_new_tokens=max_new, temperature=p.temperature or 1.0, top_p=p.top_p or 1.0
            ),
            adapter_name(p.adapter),
            p.optim.checkpoint_every or 10,
            p.max_reward_failure_fraction or 0.5,
        )

    def loop(self, rows: list[dict], seed: int) -> LoopConfig:
        """The train loop's settings; a dynamic-sampling refill draws further prompts from `rows`
        (Dataset.prompts)."""
        return LoopConfig(
            prepare=partial(prepare, cfg=self),
            sampling=self.sampling,
            objective=self.objective,
            num_iterations=self.num_iterations,
            max_staleness=self.max_staleness,
            refill=Refill(
                self.group_size,
                self.max_resample,
                partial(refill_batch, rows=rows, n=self.prompts_per_step, seed=seed),
            )
            if self.dynamic_sampling
            else None,
            checkpoint_every=self.checkpoint_every,
            queue_size=max(2, self.max_staleness + 1),
        )


def correction_mode(p: pb.GrpoStage) -> str:
    """The importance sampling mode: TIS by default where samples can be stale, none where the
    generator always has the trainer's weights (it then samples from the proximal policy)."""
    mode = p.importance_sampling_mode or ("token_truncate" if p.max_staleness else "none")
    return "" if mode == "none" else mode


def run(params: pb.GrpoStage, spec: pb.JobSpec, ctx: StageContext) -> None:
    """Sample G completions per prompt from the policy, score them, take clipped-surrogate steps on
    their group-relative advantages, sync the new weights to the samplers; save the policy."""
    cfg = GrpoConfig.of(params)
    out = ctx.artifact_dir / ctx.stage
    policy = policy_trainer(params, cfg, spec, ctx)
    # data.train, or data.unlabeled under `prompts: unlabeled`; with passages, under `retrieval`
    rows = prompt_rows(ctx, spec, getattr(spec.data, params.prompts or "train"))
    roles = ctx.roles(spec.resources, overlap=cfg.max_staleness > 0)  # overlapping roles: own threads
    roles.start("generator", sampler_of(policy, spec.seed))
    roles.start("scorer", scorer_spec(params.rewards, ctx.reward_modules))
    loop = TrainLoop(
        roles,
        policy,
        Journal(out / "journal"),
        cfg.loop(rows, spec.seed),
        on_metrics=reward_failures(step_reporter(ctx, cfg.steps * cfg.num_iterations), cfg.max_reward_failures),
        cancelled=ctx.is_cancelled,
        on_warning=ctx.warn,
    )
    loop.run(prompt_batches(rows, cfg, spec.seed))
    save = partial(save_policy, ctx, base=policy.model_path, uses_adapter=cfg.adapter != "none", out=out)
    with_restarts(loop.trainers, save, "saving the policy")


def policy_trainer(params: pb.GrpoStage, cfg: GrpoConfig, spec: pb.JobSpec, ctx: StageContext) -> TrainerSpec:
    """The trainer of the policy: the teacher as earlier stages tuned it, continuing their adapter
    under LoRA (or a new one on it)."""
    model, adapter = tuned_policy(ctx, spec)
    return trainer_spec(
        model,
        params.optim,
        ctx.artifact_dir / ctx.stage,
        spec.seed,
        default_lr=1e-5 * (10 if cfg.adapter != "none" else 1),
        adapter=cfg.adapter,
        lora=params.lora,
        adapter_path=adapter if cfg.adapter != "none" else "",
        micro_batch_size=cfg.group_size * cfg.prompts_per_step,
        total_steps=cfg.steps * cfg.num_iterations,
    )


def sampler_of(policy: TrainerSpec, seed: int) -> GeneratorSpec:
    """A generator of the same policy, into which the trainer's weights (or adapter) load."""
    lora = policy.adapter != "none" and not policy.adapter_path
    return GeneratorSpec(
        policy.model_path,
        adapter_path=policy.adapter_path,
        seed=seed,
        quantize_4bit=policy.adapter == "qlora",
        lora_r=policy.lora_r if lora else 0,
        lora_alpha=policy.lora_alpha if lora else 16.0,
        target_modules=policy.target_modules if lora else (),
    )


def prompt_batches(rows: list[dict], cfg: GrpoConfig, seed: int) -> list[pa.RecordBatch]:
    """cfg.steps batches of prompts_per_step rows (Dataset.prompts: the answer, if any, travels as
    `reference`), cycling through seeded shuffles of the data."""
    rng = np.random.default_rng(seed)
    order: list[int] = []
    while len(order) < cfg.steps * cfg.prompts_per_step:
        order += rng.permutation(len(rows)).tolist()
    per = cfg.prompts_per_step
    return [
        rows_batch(f"grpo/{step:06d}", [rows[i] for i in order[step * per : (step + 1) * per]])
        for step in range(cfg.steps)
    ]


def prepare(batch: pa.RecordBatch, cfg: GrpoConfig) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Scored rollouts -> trainer arrays with group-relative advantages, and TRL-named metrics.
    A sample no reward function could score is left out of its group's statistics and of the loss."""
    rewards = np.array([np.nan if r is None else r for r in batch.column("reward").to_pylist()], dtype=np.float64)
    scored = ~np.isnan(rewards)
    adv, zero_std = group_advantages(torch.tensor(rewards), cfg.group_size, cfg.scale_rewards)
    arrays = training_arrays(batch, pad_id=0)
    arrays["advantages"] = adv.numpy().astype(np.float32)
    arrays["loss_mask"] = arrays["loss_mask"] * scored[:, None]
    if cfg.mask_truncated:  # DAPO: a completion cut off at max_new_tokens says nothing about its end
        arrays["loss_mask"] = arrays["loss_mask"] * ~np.asarray(batch.column("truncated").to_pylist())[:, None]
    metrics = rollout_metrics(batch, rewards, cfg.group_size) | failure_metrics(batch)
    metrics["frac_reward_zero_std"] = float(zero_std.float().mean())  # before any group is dropped
    if cfg.dynamic_sampling:
        arrays, metrics["sampling/groups_with_signal"] = with_signal(arrays, ~zero_std.numpy(), cfg)
    return arrays, metrics


def with_signal(arrays: dict[str, np.ndarray], signal: np.ndarray, cfg: GrpoConfig) -> tuple[dict, int]:
    """Dynamic sampling: only the groups whose rewards differ (signal (groups,)), at most
    prompts_per_step of them, first come first kept; and how many had signal."""
    groups = np.flatnonzero(signal)[: cfg.prompts_per_step]
    if not len(groups):
        return {}, 0
    rows = (groups[:, None] * cfg.group_size + np.arange(cfg.group_size)).ravel()
    return {k: v[rows] for k, v in arrays.items()}, int(signal.sum())


def rollout_metrics(batch: pa.RecordBatch, rewards: np.ndarray, group_size: int) -> dict[str, float]:
    """TRL's names: reward and reward_std over the scored samples (NaN: unscored), lengths, and
    rewards/<fn>/mean; plus rewards/unscored_fraction."""
    scored = ~np.isnan(rewards)
    grouped = rewards.reshape(-1, group_size)
    counts = (~np.isnan(grouped)).sum(1)
    stds = [np.nanstd(g, ddof=1) for g, c in zip(grouped, counts, strict=True) if c > 1]
    lengths = [len(ids) for ids in batch.column("completion_ids").to_pylist()]
    metrics = {
        "reward": float(rewards[scored].mean()) if scored.any() else float("nan"),
        "reward_std": float(np.mean(stds)) if stds else float("nan"),
        "rewards/unscored_fraction": float(1.0 - scored.mean()),
        "completions/mean_length": float(np.mean(lengths)),
        "completions/clipped_ratio": float(np.mean(batch.column("truncated").to_pylist())),
    }
    for name in (n for n in batch.schema.names if n.startswith("rewards/")):
        values = [v for v in batch.column(name).to_pylist() if v is not None]
        metrics[f"{name}/mean"] = float(np.mean(values)) if values else float("nan")
    return metrics
