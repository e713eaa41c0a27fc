"""RewardScorer: runs a job's reward functions over batches of completions.

A function is a built-in (algo/rewards.py), an import path `pkg.module:fn` with TRL's signature,
or a reward model `model:/path` (a sequence-classification checkpoint). Each has a weight and a
per-call timeout. Built-ins and reward models run in the scorer's process; user functions (import
paths, from operator-allowed modules only) run in a pebble process pool, so a call past its
timeout is killed with its worker (and the worker replaced), and one that crashes the process
(segfault, os._exit, out of memory) costs that call's scores, not the scorer. Each failed call
scores None for its samples and is written per sample in `failures/<fn>` (error, timeout,
crashed): the stages count them into job events (failure_metrics). A plain class;
runtime/cluster.py makes it a Ray actor.
"""

from __future__ import annotations

import importlib
import math
import multiprocessing
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import pyarrow as pa
from pebble import ProcessExpired, ProcessPool
from stillroom.actors.algo.rewards import BUILTINS
from stillroom.actors.common.rewards import call_imported, load_imported, module_allowed
from stillroom.actors.runtime.batches import GENERATED_COLUMNS, TOPK_COLUMNS, with_columns
from stillroom.actors.runtime.channels import Channel, pump
from stillroom.actors.runtime.metrics import record, tags_of

# Columns a generator adds; everything else in a batch is a dataset column passed to reward functions.
GENERATED = set(GENERATED_COLUMNS + TOPK_COLUMNS)


@dataclass(frozen=True)
class RewardSpec:
    name: str
    weight: float = 1.0
    timeout_s: float = 10.0
    args: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        """The metric name: rewards/<label>/mean."""
        return self.name.split(":")[-1].rsplit("/", 1)[-1]

    @property
    def imported(self) -> bool:
        """A user's function (pkg.module:fn): it runs in a worker process."""
        return ":" in self.name and not self.name.startswith("model:")


def scorer_spec(functions, allowed_modules: tuple[str, ...] = (), name: str = "scorer") -> ScorerSpec:
    """A ScorerSpec from a job's stillroom.v1.RewardFunction list (weight 1 and a 10 s timeout by default)."""
    rewards = tuple(
        RewardSpec(f.name, f.weight or 1.0, f.timeout_s or 10.0, tuple(sorted(f.args.items()))) for f in functions
    )
    return ScorerSpec(rewards, allowed_modules, name)


@dataclass(frozen=True)
class ScorerSpec:
    rewards: tuple[RewardSpec, ...]
    allowed_modules: tuple[str, ...] = ()
    name: str = "scorer"  # <job-id>:scorer:<rank> when it runs as an actor


def resolve(name: str, allowed: tuple[str, ...]) -> Callable:
    """The callable a reward name means. Raises PermissionError outside the allow-list."""
    if name in BUILTINS:
        return BUILTINS[name]
    if name.startswith("model:"):
        return RewardModel(name.removeprefix("model:"))
    module, sep, attr = name.partition(":")
    if not sep:
        raise ValueError(f"unknown reward {name!r}: a built-in ({', '.join(BUILTINS)}), pkg.module:fn or model:/path")
    if not module_allowed(module, allowed):
        raise PermissionError(f"reward module {module!r} is not in the operator's allow-list")
    return getattr(importlib.import_module(module), attr)


class RewardModel:
    """Score = the first logit of a sequence-classification model over prompt + completion."""

    def __init__(self, path: str):
        # imported only for a reward model: a scorer of plain functions never loads torch
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def __call__(self, prompts: list[str], completions: list[str], **_) -> list[float | None]:
        texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True)
        with self.torch.no_grad():
            return self.model(**enc).logits[:, 0].float().tolist()


def _clean(values, n: int) -> list[float | None]:
    if not isinstance(values, list | tuple) or len(values) != n:
        raise ValueError(
            f"returned {type(values).__name__} of length {len(values) if hasattr(values, '__len__') else '?'}"
            f" for {n} completions"
        )
    out = []
    for v in values:
        out.append(None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v))
    return out


class RewardScorer:
    def __init__(self, spec: ScorerSpec):
        self.spec = spec
        self.fns = [(r, None if r.imported else resolve(r.name, spec.allowed_modules)) for r in spec.rewards]
        self.errors: Counter[str] = Counter()
        self.timeouts: Counter[str] = Counter()
        self.crashes: Counter[str] = Counter()
        self.scored = 0
        self._threads = ThreadPoolExecutor(max_workers=max(1, len(self.fns)), thread_name_prefix="reward")
        imported = tuple(r.name for r in spec.rewards if r.imported)
        if imported:
            load_imported(imported, spec.allowed_modules)  # refused here, at once, outside the allow-list
        # spawn, not fork: the scorer is a threaded Ray worker, and a forked child inherits its locks
        self._pool = (
            ProcessPool(
                max_workers=len(imported),
                initializer=load_imported,
                initargs=(imported, spec.allowed_modules),
                context=multiprocessing.get_context("spawn"),
            )
            if imported
            else None
        )

    def __repr__(self) -> str:
        # from the spec: Ray calls repr to report a constructor that raised, before fns exists
        names = [r.name for r in self.spec.rewards]
        return f"RewardScorer({self.spec.name}, {names}, scored {getattr(self, 'scored', 0)})"

    def serve(self, inbox: Channel, outbox: Channel) -> int:
        """Score every batch in the inbox until END. Returns the number of batches."""
        tags = tags_of(self.spec.name)

        def report(_, out: pa.RecordBatch, seconds: float) -> None:
            record("samples_scored_per_s", out.num_rows / max(seconds, 1e-9), tags)

        return pump(inbox, outbox, self.score, report)

    def score(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """Add `reward` (weighted sum, None when no function scored), `rewards/<fn>` and
        `failures/<fn>` (None, or why that call scored nothing) columns."""
        prompts = batch.column("prompt").to_pylist()
        completions = batch.column("completion").to_pylist()
        columns = {n: batch.column(n).to_pylist() for n in batch.schema.names if n not in GENERATED}
        n = len(completions)
        calls = [(r, self._call(r, fn, prompts, completions, {**dict(r.args), **columns})) for r, fn in self.fns]
        per_fn: dict[str, list[float | None]] = {}
        failures: dict[str, list[str | None]] = {}
        for r, future in calls:
            per_fn[r.label], failure = self._result(r, future, n)
            failures[r.label] = [failure] * n
        total = []
        for i in range(n):
            parts = [r.weight * per_fn[r.label][i] for r, _ in self.fns if per_fn[r.label][i] is not None]
            total.append(sum(parts) if parts else None)
        self.scored += n
        return with_columns(
            batch,
            {
                "reward": total,
                **{f"rewards/{k}": v for k, v in per_fn.items()},
                **{f"failures/{k}": pa.array(v, pa.string()) for k, v in failures.items()},
            },
        )

    def _call(self, r: RewardSpec, fn, prompts: list, completions: list, kwargs: dict):
        if r.imported:
            return self._pool.schedule(call_imported, args=(r.name, prompts, completions, kwargs), timeout=r.timeout_s)
        return self._threads.submit(fn, prompts, completions, **kwargs)

    def _result(self, r: RewardSpec, future, n: int) -> tuple[list[float | None], str | None]:
        """(scores, None) or ([None] * n, why): a broken reward costs its scores, not the job."""
        try:
            # a worker's own timeout kills the call; the extra second is for the pool to say so
            return _clean(future.result(timeout=r.timeout_s + (5.0 if r.imported else 0.0)), n), None
        except FutureTimeout:
            self.timeouts[r.label] += 1
            return [None] * n, "timeout"
        except ProcessExpired:
            self.crashes[r.label] += 1
            return [None] * n, "crashed"
        except Exception:  # noqa: BLE001 - a reward that raises (or returns the wrong shape)
            self.errors[r.label] += 1
            return [None] * n, "error"

    def stats(self) -> dict[str, float]:
        out = {"scored": float(self.scored)}
        out.update({f"rewards/{k}/errors": float(v) for k, v in self.errors.items()})
        out.update({f"rewards/{k}/timeouts": float(v) for k, v in self.timeouts.items()})
        out.update({f"rewards/{k}/crashes": float(v) for k, v in self.crashes.items()})
        return out


def failure_metrics(batch: pa.RecordBatch) -> dict[str, float]:
    """From a scored batch's failures/<fn> columns: rewards/<fn>/errors, /timeouts, /crashed (the
    samples each cost) and rewards/failed_fraction (samples at least one function failed on)."""
    names = [n for n in batch.schema.names if n.startswith("failures/")]
    metrics: dict[str, float] = {}
    failed = [False] * batch.num_rows
    for name in names:
        values = batch.column(name).to_pylist()
        label = name.removeprefix("failures/")
        for kind, key in (("error", "errors"), ("timeout", "timeouts"), ("crashed", "crashed")):
            metrics[f"rewards/{label}/{key}"] = float(sum(v == kind for v in values))
        failed = [f or v is not None for f, v in zip(failed, values, strict=True)]
    if names:
        metrics["rewards/failed_fraction"] = sum(failed) / max(batch.num_rows, 1)
        metrics["rewards/failed"], metrics["rewards/samples"] = float(sum(failed)), float(batch.num_rows)
    return metrics
