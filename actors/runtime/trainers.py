"""Calls on a trainer group (k Trainer actors that form one data-parallel group): every rank gets its
share of the rows and the same call, and the group answers as one. The stages and the train loop
use these, so sharding and merging the ranks' answers live in one place.
"""

from __future__ import annotations

import numpy as np
import ray
from stillroom.actors.algo.objectives import NLL, Objective
from stillroom.actors.runtime.batches import shard

Group = list  # Ray actor handles of Trainer, rank order


def train_step(trainers: Group, arrays: dict[str, np.ndarray], objective: Objective = NLL, iterations: int = 1) -> dict:
    """`iterations` optimizer steps of every rank on its share of `arrays`. Returns the group's
    metrics: step, tokens (summed), step_s (the slowest rank) and the mean of every other metric."""
    shards = [shard(arrays, rank, len(trainers)) for rank in range(len(trainers))]
    if objective.needs_proximal:  # the proximal policy: the weights before this step's updates
        proximal = ray.get([t.logprobs.remote(s, objective.temperature) for t, s in zip(trainers, shards, strict=True)])
        shards = [{**s, "proximal_logprobs": p} for s, p in zip(shards, proximal, strict=True)]
    tokens = int(arrays["loss_mask"].sum())  # the global batch's completion tokens (DAPO normalises by them)
    fewest = min(len(s["input_ids"]) for s in shards)  # every rank runs as many accumulation chunks
    for _ in range(iterations):
        calls = [t.train_step.remote(s, objective, tokens, fewest) for t, s in zip(trainers, shards, strict=True)]
        results = ray.get(calls)
    merged = {
        "step": results[0]["step"],
        "tokens": sum(m["tokens"] for m in results),
        "step_s": max(m["step_s"] for m in results),
    }
    for key in results[0]:
        merged.setdefault(key, float(np.mean([m[key] for m in results])))
    return merged


def skip_step(trainers: Group, iterations: int = 1) -> dict:
    """A step with no rows to train on: every rank counts `iterations` steps (its step number and
    learning-rate schedule move on) without an update. Returns step, tokens 0, step_s 0."""
    for _ in range(iterations):
        results = ray.get([t.skip_step.remote() for t in trainers])
    return results[0]


def eval_sums(trainers: Group, method: str, arrays: dict[str, np.ndarray]) -> tuple[float, int]:
    """(sum, count) of a held-out measure (`eval_loss`, `eval_kd`) over every rank's share."""
    parts = [getattr(t, method).remote(shard(arrays, r, len(trainers))) for r, t in enumerate(trainers)]
    sums = ray.get(parts)
    return sum(s for s, _ in sums), sum(c for _, c in sums)


def weights(trainers: Group) -> dict[str, np.ndarray]:
    """The trained weights (the adapter under LoRA) as numpy copies. Every rank is asked: under
    ZeRO-3 each holds a partition, and gathering them is a collective every rank must join."""
    return ray.get([t.weights.remote() for t in trainers])[0]


def resume(trainers: Group) -> int:
    """Every rank loads the newest complete checkpoint; the data cursor to continue from (0: none)."""
    return ray.get([t.resume.remote() for t in trainers])[0]


def save_checkpoint(trainers: Group, cursor: int) -> None:
    ray.get([t.save_checkpoint.remote(cursor) for t in trainers])


def save_pretrained(trainers: Group, path: str, merged: str = "") -> None:
    """The trained adapter (or model) at `path`, and the merged model at `merged` on request."""
    ray.get([t.save_pretrained.remote(path, merged) for t in trainers])
