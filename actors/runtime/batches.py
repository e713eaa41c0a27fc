"""The batch schema on the queues: Arrow record batches with a stable `batch_id`, and the helpers
that turn them into padded tensors for a trainer.

Rollout batch columns: batch_id (metadata), sample_id, prompt, completion, prompt_ids, completion_ids,
completion_logprobs, optionally topk_ids (int32) / topk_logprobs (float16), reference columns, and,
once scored, reward and rewards/<fn>.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np
import pyarrow as pa

BATCH_ID = b"stillroom.batch_id"
REPLAY_OF = b"stillroom.replay_of"  # a prompt batch to be trained on what the teacher wrote for another
# The columns a Generator writes per sample; every other column is a dataset column.
GENERATED_COLUMNS = (
    "sample_id",
    "prompt",
    "completion",
    "prompt_ids",
    "completion_ids",
    "completion_logprobs",
    "policy_version",
    "truncated",
)
TOPK_COLUMNS = ("topk_ids", "topk_logprobs")


def make_batch(batch_id: str, columns: dict[str, list]) -> pa.RecordBatch:
    """A record batch that carries its id in the schema metadata."""
    batch = pa.RecordBatch.from_pydict(columns)
    return batch.replace_schema_metadata({BATCH_ID: batch_id.encode()})


def rows_batch(batch_id: str, rows: list[dict]) -> pa.RecordBatch:
    """A record batch of dataset rows (dicts), one column per key of the first row."""
    return make_batch(batch_id, {k: [r.get(k) for r in rows] for k in rows[0]})


def batch_id(batch: pa.RecordBatch) -> str:
    return (batch.schema.metadata or {})[BATCH_ID].decode()


def replay(batch: pa.RecordBatch, source: str) -> pa.RecordBatch:
    """The prompt batch marked as another pass over what the teacher wrote for batch `source`."""
    return batch.replace_schema_metadata({BATCH_ID: batch_id(batch).encode(), REPLAY_OF: source.encode()})


def replay_of(batch: pa.RecordBatch) -> str:
    return (batch.schema.metadata or {}).get(REPLAY_OF, b"").decode()


def with_columns(batch: pa.RecordBatch, columns: dict[str, list]) -> pa.RecordBatch:
    """A copy of `batch` with columns added or replaced; keeps the id."""
    data = {name: batch.column(name) for name in batch.schema.names}
    data.update({k: v if isinstance(v, pa.Array) else pa.array(v) for k, v in columns.items()})
    return make_batch(batch_id(batch), data)


def pad(seqs: Iterable[list[int]], pad_id: int, length: int | None = None) -> np.ndarray:
    """Right-pad int sequences to one length. -> (B, T) int64."""
    seqs = [list(s) for s in seqs]
    length = length or max((len(s) for s in seqs), default=0)
    out = np.full((len(seqs), length), pad_id, dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s[:length]
    return out


def training_arrays(batch: pa.RecordBatch, pad_id: int, weight_column: str | None = None) -> dict[str, np.ndarray]:
    """Prompt+completion token ids, right-padded, with masks. The loss mask marks completion tokens,
    shifted by one to line up with token_logprobs: input_ids, attention_mask (B, T), loss_mask
    (B, T-1), weights (B,)."""
    prompts = batch.column("prompt_ids").to_pylist()
    completions = batch.column("completion_ids").to_pylist()
    full = [p + c for p, c in zip(prompts, completions, strict=True)]
    length = max(len(s) for s in full)
    input_ids = pad(full, pad_id, length)
    attention = np.zeros_like(input_ids)
    loss_mask = np.zeros((len(full), length - 1), dtype=np.int64)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        attention[i, : len(p) + len(c)] = 1
        loss_mask[i, len(p) - 1 : len(p) + len(c) - 1] = 1
    weights = np.ones(len(full), dtype=np.float32)
    if weight_column:
        weights = np.nan_to_num(np.asarray(batch.column(weight_column).to_pylist(), dtype=np.float32))
    out = {"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss_mask, "weights": weights}
    if "completion_logprobs" in batch.schema.names:
        # The behaviour policy's log-probs, at the positions of the loss mask (for importance ratios).
        old = np.zeros(loss_mask.shape, dtype=np.float32)
        for i, (p, lp) in enumerate(zip(prompts, batch.column("completion_logprobs").to_pylist(), strict=True)):
            old[i, len(p) - 1 : len(p) - 1 + len(lp)] = lp
        out["old_logprobs"] = old
    if "topk_ids" in batch.schema.names:
        out.update(_topk_arrays(batch, prompts, completions, loss_mask.shape))
    return out


def _topk_arrays(batch: pa.RecordBatch, prompts, completions, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """The teacher's top-k per completion token, stored flat (T*k), as (B, T-1, k) arrays at the
    positions of the loss mask (for logit distillation)."""
    ids_rows, lp_rows = batch.column("topk_ids").to_pylist(), batch.column("topk_logprobs").to_pylist()
    k = next((len(r) // len(c) for r, c in zip(ids_rows, completions, strict=True) if c), 1)
    ids = np.zeros((*shape, k), dtype=np.int64)
    logprobs = np.zeros((*shape, k), dtype=np.float32)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        start = len(p) - 1
        ids[i, start : start + len(c)] = np.asarray(ids_rows[i], dtype=np.int64).reshape(len(c), k)
        logprobs[i, start : start + len(c)] = np.asarray(lp_rows[i], dtype=np.float32).reshape(len(c), k)
    return {"topk_ids": ids, "topk_logprobs": logprobs}


def shard(arrays: dict[str, np.ndarray], rank: int, world: int) -> dict[str, np.ndarray]:
    """Rank `rank`'s contiguous share of the rows (data parallelism)."""
    n = len(next(iter(arrays.values())))
    bounds = np.linspace(0, n, world + 1).astype(int)
    return {k: v[bounds[rank] : bounds[rank + 1]] for k, v in arrays.items()}


def concat(batches: list[pa.RecordBatch], batch_id: str) -> pa.RecordBatch:
    """Several scored batches as one (a step and its refills), under one id. A column that is null
    throughout one part (e.g. a reward nobody could compute) takes the type the others give it."""
    tables = [pa.Table.from_batches([b.replace_schema_metadata(None)]) for b in batches]
    table = pa.concat_tables(tables, promote_options="default").combine_chunks()
    merged = table.to_batches()[0] if table.num_rows else pa.RecordBatch.from_pylist([], schema=table.schema)
    return merged.replace_schema_metadata({BATCH_ID: batch_id.encode()})


def refill_batch(step: pa.RecordBatch, round_: int, rows: list[dict], n: int, seed: int) -> pa.RecordBatch:
    """Prompts for refill round `round_` of a step (a Refill's prompts): n rows drawn with a seed
    of (seed, step, round), under the id <step>+<round>, so a restart (or a later job reusing the
    journal) asks for the same prompts and replays them. A step that replays another (a later
    epoch) replays that step's refill of the same round."""
    source = replay_of(step)
    digest = hashlib.sha256(f"{seed}/{source or batch_id(step)}/{round_}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    batch = rows_batch(f"{batch_id(step)}+{round_}", [rows[i] for i in rng.choice(len(rows), n, len(rows) < n)])
    return replay(batch, f"{source}+{round_}") if source else batch
