"""Queues: MB/s and batches/s through a stage queue (Channel over a bounded Ray queue, carrying
references to Arrow record batches) against raw ray.put / ray.get of the same batches between the
same two processes (the limit), on a local Ray started here.

    .venv/bin/python -m bench.queues [--sizes-kb 64 1024 16384] [--count 64]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pyarrow as pa
import ray

from bench.common import report


def record_batch(nbytes: int, seed: int = 0) -> pa.RecordBatch:
    """A rollout-like batch: 64 rows of int32 token ids, nbytes in all."""
    rows = 64
    per_row = max(1, nbytes // (4 * rows))
    ids = np.random.default_rng(seed).integers(0, 50_000, size=(rows, per_row), dtype=np.int32)
    return pa.RecordBatch.from_pydict({"completion_ids": [r for r in ids]})


@ray.remote(num_cpus=0)
class Producer:
    def __init__(self, nbytes: int):
        self.batch = record_batch(nbytes)

    def fill(self, channel, count: int) -> int:
        for _ in range(count):
            channel.put(self.batch)
        return count

    def refs(self, count: int) -> list:
        return [[ray.put(self.batch)] for _ in range(count)]  # wrapped: handed back as references


def through_channel(nbytes: int, count: int) -> float:
    from ray.util.queue import Queue
    from stillroom.actors.runtime.channels import Channel

    channel = Channel(Queue(maxsize=4))
    producer = Producer.remote(nbytes)
    ray.get(producer.refs.remote(1))  # the actor is up
    started = time.perf_counter()
    done = producer.fill.remote(channel, count)
    for _ in range(count):
        channel.get()
    ray.get(done)
    return time.perf_counter() - started


def raw(nbytes: int, count: int) -> float:
    producer = Producer.remote(nbytes)
    ray.get(producer.refs.remote(1))
    started = time.perf_counter()
    for wrapped in ray.get(producer.refs.remote(count)):
        ray.get(wrapped[0])
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-kb", type=int, nargs="+", default=[64, 1024, 16384])
    ap.add_argument("--count", type=int, default=64)
    args = ap.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for kb in args.sizes_kb:
            nbytes = kb * 1024
            real = record_batch(nbytes).nbytes
            ours, limit = through_channel(nbytes, args.count), raw(nbytes, args.count)
            rows.append(
                {
                    "batch_kb": real // 1024,
                    "channel_MB_s": real * args.count / ours / 1e6,
                    "raw_MB_s": real * args.count / limit / 1e6,
                    "channel_batches_s": args.count / ours,
                    "raw_batches_s": args.count / limit,
                    "ratio": limit / ours,
                }
            )
    finally:
        ray.shutdown()
    columns = ["batch_kb", "channel_MB_s", "raw_MB_s", "channel_batches_s", "raw_batches_s", "ratio"]
    report("queues", rows, columns, {"count": args.count})


if __name__ == "__main__":
    main()
