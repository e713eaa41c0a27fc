"""RewardScorer: runs a job's reward functions over batches of completions.

A function is a built-in (algo/rewards.py), an import path `pkg.module:fn` with TRL's signature,
or a reward model `model:/path` (a sequence-classification checkpoint). Each has a weight and a
per-call timeout. A function that raises or times out scores None for that call's samples and
counts an error: it never kills the job. Import paths load only from operator-allowed modules.
A plain class; runtime/cluster.py makes it a Ray actor.
"""

from __future__ import annotations

import importlib
import math
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import pyarrow as pa
from stillroom.actors.algo.rewards import BUILTINS
from stillroom.actors.common.rewards import module_allowed
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
        self.fns = [(r, resolve(r.name, spec.allowed_modules)) for r in spec.rewards]
        self.errors: Counter[str] = Counter()
        self.timeouts: Counter[str] = Counter()
        self.scored = 0
        # Timed-out calls cannot be killed; they finish in the background on spare threads.
        self._pool = ThreadPoolExecutor(max_workers=4 * max(1, len(self.fns)), thread_name_prefix="reward")

    def __repr__(self) -> str:
        return f"RewardScorer({self.spec.name}, {[r.name for r, _ in self.fns]}, scored {self.scored})"

    def serve(self, inbox: Channel, outbox: Channel) -> int:
        """Score every batch in the inbox until END. Returns the number of batches."""
        tags = tags_of(self.spec.name)

        def report(_, out: pa.RecordBatch, seconds: float) -> None:
            record("samples_scored_per_s", out.num_rows / max(seconds, 1e-9), tags)

        return pump(inbox, outbox, self.score, report)

    def score(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """Add `reward` (weighted sum, None when no function scored) and `rewards/<fn>` columns."""
        prompts = batch.column("prompt").to_pylist()
        completions = batch.column("completion").to_pylist()
        columns = {n: batch.column(n).to_pylist() for n in batch.schema.names if n not in GENERATED}
        n = len(completions)
        futures = [(r, self._pool.submit(fn, prompts, completions, **dict(r.args), **columns)) for r, fn in self.fns]
        per_fn: dict[str, list[float | None]] = {}
        for r, future in futures:
            try:
                per_fn[r.label] = _clean(future.result(timeout=r.timeout_s), n)
            except FutureTimeout:
                self.timeouts[r.label] += 1
                per_fn[r.label] = [None] * n
            except Exception:  # noqa: BLE001 - a broken reward costs its scores, not the job
                self.errors[r.label] += 1
                per_fn[r.label] = [None] * n
        total = []
        for i in range(n):
            parts = [r.weight * per_fn[r.label][i] for r, _ in self.fns if per_fn[r.label][i] is not None]
            total.append(sum(parts) if parts else None)
        self.scored += n
        return with_columns(batch, {"reward": total, **{f"rewards/{k}": v for k, v in per_fn.items()}})

    def stats(self) -> dict[str, float]:
        out = {"scored": float(self.scored)}
        out.update({f"rewards/{k}/errors": float(v) for k, v in self.errors.items()})
        out.update({f"rewards/{k}/timeouts": float(v) for k, v in self.timeouts.items()})
        return out
