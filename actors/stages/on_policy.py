"""The distill stage's on-policy loop (GKD, `mode: on_policy` / `lambda`): each step the student
samples, the teacher grades every token, the student trains and its new weights go back to the
generator it samples from; with probability 1 - lambda a step learns filtered teacher samples
instead. Run by actors/stages/distill.py; what both use is in actors/stages/distill_samples.py."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import ray
from stillroom.actors.roles.generator import SamplingParams
from stillroom.actors.runtime.batches import training_arrays
from stillroom.actors.runtime.context import StageContext
from stillroom.actors.runtime.loop import TrainLoop
from stillroom.actors.runtime.restarts import run_steps
from stillroom.actors.runtime.trainers import train_step, weights
from stillroom.actors.stages.distill_samples import DistillConfig


def phase_seconds(started: float, sampled: float, trained: float, synced: float) -> dict[str, float]:
    """Where an on-policy step's wall time went: sampling and grading, training, the weight sync."""
    return {"time/sample_s": sampled - started, "time/train_s": trained - sampled, "time/sync_s": synced - trained}


def on_policy_loop(
    loop: TrainLoop,
    batches: list[pa.RecordBatch],
    cfg: DistillConfig,
    ctx: StageContext,
    seed: int,
    every: int,
    prepare: Callable[[pa.RecordBatch], tuple[dict[str, np.ndarray], dict[str, float]]],
    upto: int | None = None,
) -> None:
    """GKD: each step trains either on the student's own samples, graded token by token by the
    teacher (probability lambda: the coins are drawn up front, so a restart draws the same), or on
    filtered teacher samples; the student's new weights then go to the generator that samples
    from it. Synchronous by nature: the next samples need them. Checkpoints every `every` steps;
    `prepare` filters a teacher step's samples into the student's arrays, as offline. Trains
    from the trainer group's cursor up to step `upto` (default: every batch), a checkpoint there."""
    roles = loop.roles.actors
    own = SamplingParams(n=cfg.num_samples, max_new_tokens=cfg.sampling.max_new_tokens, temperature=1.0)
    coins = np.random.default_rng(seed).random(len(batches)) < cfg.on_policy_fraction

    def sync(cursor: int) -> None:
        ray.get(roles["student"][0].load_weights.remote(weights(loop.trainers.actors), cursor))

    def step(i: int) -> None:
        ctx.check_cancelled()
        student, teacher, scorer = roles["student"][0], roles["generator"][0], roles["scorer"][0]
        started = time.perf_counter()
        if coins[i]:
            samples = ray.get(
                teacher.score_topk.remote(student.generate.remote(batches[i], own), cfg.sampling.topk_logprobs)
            )
            arrays, metrics, objective = (
                training_arrays(samples, pad_id=0),
                {"distill/on_policy": 1.0},
                cfg.on_policy_objective,
            )
        else:
            arrays, metrics = prepare(ray.get(scorer.score.remote(teacher.generate.remote(batches[i], cfg.sampling))))
            metrics["distill/on_policy"], objective = 0.0, cfg.objective
        sampled = time.perf_counter()
        if arrays:
            done = train_step(loop.trainers.actors, arrays, objective)
            metrics.update({k: done[k] for k in ("loss", "loss/kd", "loss/ce")})
            metrics["train/tokens_per_s"] = done["tokens"] / max(done["step_s"], 1e-9)
        trained = time.perf_counter()
        sync(i + 1)
        metrics.update(phase_seconds(started, sampled, trained, time.perf_counter()))
        ctx.metrics(metrics)
        ctx.progress(i + 1, len(batches), "steps")

    sync(loop.trainers.start())
    run_steps(loop.trainers, len(batches) if upto is None else upto, step, every, on_resume=sync)
