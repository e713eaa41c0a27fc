"""Calls on a trainer group (k Trainer actors that form one data-parallel group): every rank gets its
share of the rows and the same call, and the group answers as one. The stages and the train loop
use these, so sharding and merging the ranks' answers live in one place.
"""

from __future__ import annotations

import time

import numpy as np
import ray
from ray.exceptions import RayActorError
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


def shipped(trainers: Group, dtype: str = "float32") -> tuple[ray.ObjectRef, dict[str, int]]:
    """The weights a sync sends (Trainer.ship_weights, in `dtype`), as the ObjectRef of rank 0's
    answer: forwarded as is, they go from rank 0's node to whoever loads them, and this process
    never holds them. Every rank is asked (under ZeRO-3 the gather is a collective every rank
    joins); only their small infos are fetched here, so an error on any rank raises here, not in
    a generator. Returns (reference, rank 0's info: bytes, gathered)."""
    calls = [t.ship_weights.options(num_returns=2).remote(dtype) for t in trainers]
    infos = ray.get([info for _, info in calls])
    return calls[0][0], infos[0]


def weights(trainers: Group, dtype: str = "float32") -> ray.ObjectRef:
    """The trained weights (the adapter under LoRA) in `dtype`, as one object reference to hand to
    Generator.load_weights (Ray resolves it there)."""
    return shipped(trainers, dtype)[0]


def sync(trainers: Group, generators: list, version: int) -> dict[str, float]:
    """Trainer -> generators: the weights in the dtype the generators compute in, shipped once by
    rank 0 and handed to every generator as the same object reference. A generator that died is
    passed over (its serve loop's end says so, and recovery syncs it). Returns the sync's metrics:
    sync/bytes (what rank 0 shipped) and sync/seconds."""
    started = time.perf_counter()
    dtypes = set(_answers([g.weights_dtype.remote() for g in generators]))
    ref, info = shipped(trainers, dtypes.pop() if len(dtypes) == 1 else "float32")  # float32 loads into any
    _answers([g.load_weights.remote(ref, version) for g in generators])
    return {"sync/bytes": float(info["bytes"]), "sync/seconds": time.perf_counter() - started}


def _answers(refs: list) -> list:
    """The answers of the actors that are alive; the dead ones' are left out."""
    out = []
    for ref in refs:
        try:
            out.append(ray.get(ref))
        except RayActorError:
            pass
    return out


def resume(trainers: Group, cursor: int | None = None) -> int:
    """Every rank loads the newest complete checkpoint (or the one saved at data cursor `cursor`);
    the data cursor to continue from (0: none)."""
    return ray.get([t.resume.remote(cursor) for t in trainers])[0]


def prune_checkpoints(trainers: Group, keep: set[int]) -> None:
    """Every rank deletes its checkpoints saved at data cursors outside `keep`."""
    ray.get([t.prune_checkpoints.remote(sorted(keep)) for t in trainers])


def save_checkpoint(trainers: Group, cursor: int) -> None:
    ray.get([t.save_checkpoint.remote(cursor) for t in trainers])


def save_pretrained(trainers: Group, path: str, merged: str = "") -> None:
    """The trained adapter (or model) at `path`, and the merged model at `merged` on request."""
    ray.get([t.save_pretrained.remote(path, merged) for t in trainers])
