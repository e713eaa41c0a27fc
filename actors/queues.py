"""Bounded queues between roles that carry references to batches, never single samples; the
teacher journal; and the filter that drops batch ids a consumer has already seen.

One put/get on a Ray queue costs ~2 ms, so a queue item is an ObjectRef to an Arrow record batch
in the object store (STACK.md). Bounds give backpressure: a fast producer blocks on a full queue.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from actors.batches import BATCH_ID, batch_id

END = "__end__"  # the end-of-stream marker, one per consumer


class Journal:
    """What the teacher generated, one Parquet file per batch id, written atomically (a temporary
    file, then a rename), so a restarted stage replays it instead of generating again."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, bid: str) -> Path:
        return self.root / (bid.replace("/", "_") + ".parquet")

    def has(self, bid: str) -> bool:
        return self._path(bid).exists()

    def write(self, batch: pa.RecordBatch) -> Path:
        path = self._path(batch_id(batch))
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        pq.write_table(pa.Table.from_batches([batch]), tmp)
        os.replace(tmp, path)
        return path

    def read(self, bid: str) -> pa.RecordBatch:
        table = pq.read_table(self._path(bid))
        batch = table.combine_chunks().to_batches()[0] if table.num_rows else pa.RecordBatch.from_pylist([])
        return batch.replace_schema_metadata({BATCH_ID: bid.encode()})

    def ids(self) -> list[str]:
        return sorted(pq.read_schema(p).metadata[BATCH_ID].decode() for p in self.root.glob("*.parquet"))

    def replay(self) -> Iterator[pa.RecordBatch]:
        for bid in self.ids():
            yield self.read(bid)

    def bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.glob("*.parquet"))


class Seen:
    """Drops batches whose id was already consumed (a replayed or re-sent batch)."""

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.dropped = 0

    def fresh(self, bid: str) -> bool:
        if bid in self.ids:
            self.dropped += 1
            return False
        self.ids.add(bid)
        return True


class Channel:
    """One end of a queue. With by_ref, items are ObjectRefs to batches in the Ray object store;
    without, plain batches (tests and single-process use pass a queue.Queue)."""

    def __init__(self, queue, by_ref: bool = True):
        self.queue, self.by_ref = queue, by_ref

    def put(self, item) -> None:
        if self.by_ref and item is not END:
            import ray

            # In a list: Ray resolves an ObjectRef passed directly as an argument (to the queue
            # actor), which would copy the batch into the queue instead of its reference.
            item = [ray.put(item)]
        self.queue.put(item)

    def get(self, timeout: float | None = None):
        item = self.queue.get(timeout=timeout)
        if self.by_ref and isinstance(item, list):
            import ray

            return ray.get(item[0])
        return item

    def size(self) -> int:
        return self.queue.qsize()


def pump(inbox: Channel, outbox: Channel, work, on_batch=None) -> int:
    """Move batches from inbox through work() to outbox until the END marker; return how many.
    on_batch(batch_in, batch_out, seconds) reports each one (metrics)."""
    import time

    count = 0
    while True:
        item = inbox.get()
        if isinstance(item, str) and item == END:
            return count
        started = time.perf_counter()
        out = work(item)
        outbox.put(out)
        count += 1
        if on_batch is not None:
            on_batch(item, out, time.perf_counter() - started)
