"""The teacher's journal: what a generator wrote, one Parquet file per batch id, so a restarted
stage (or a later job with the same teacher, sampling and prompts) replays it instead of generating.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from stillroom.actors.runtime.batches import BATCH_ID, batch_id


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

    def bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.glob("*.parquet"))

    def completion_tokens(self) -> int:
        """Tokens the teacher generated, over every journaled batch (read from the files)."""
        total = 0
        for path in self.root.glob("*.parquet"):
            ids = pq.read_table(path, columns=["completion_ids"])["completion_ids"]
            total += pc.sum(pc.list_value_length(ids)).as_py() or 0
        return total
