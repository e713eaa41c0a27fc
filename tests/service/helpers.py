"""Helpers for service tests: raw calls that return status codes, long-running jobs, waiting."""

from __future__ import annotations

import random
import time
from pathlib import Path

import grpc
from stillroom.services.recipes import parse
from stillroom.v1 import job_pb2 as pb

from tests.conftest import write_jsonl


def code(fn, *args, **kwargs) -> grpc.StatusCode:
    """The status code a call ends with (OK if it returns)."""
    try:
        result = fn(*args, **kwargs)
        if hasattr(result, "__next__"):
            list(result)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def slow_spec(root: Path, stages: int = 4, rows: int = 50_000) -> pb.JobSpec:
    """A job that takes a few seconds per stage on this machine: audits of a big random dataset."""
    path = root / "big.jsonl"
    if not path.exists():
        rng = random.Random(0)
        vocab = [f"w{i}" for i in range(5000)]
        write_jsonl(path, [{"prompt": " ".join(rng.choices(vocab, k=20)), "completion": "a"} for _ in range(rows)])
    return parse(
        {
            "display_name": "slow",
            "data": {"train": {"path": str(path)}},
            "stages": [{"name": f"audit-{i}", "audit": {"warn_only": True}} for i in range(stages)],
        }
    )


def wait_for(predicate, timeout: float = 120, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError("condition not met in time")


def wait_state(client, job_id: str, states, timeout: float = 120) -> pb.Job:
    states = {states} if isinstance(states, int) else set(states)
    return wait_for(lambda: (j := client.get(job_id)).state in states and j, timeout)


def alive_actors(ray_client, job_id: str) -> list:
    from ray.util.state import list_actors

    return [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000) if a.name.startswith(job_id)]


def metric_series(client, job_id: str, name: str, stage: str | None = None) -> list[float]:
    """Every value of one metric the job reported (of one stage, when named), in order."""
    return [
        e.metrics[name]
        for e in client.events(job_id)
        if e.type == pb.EVENT_TYPE_METRICS and name in e.metrics and stage in (None, e.stage)
    ]


def journal_bytes_per_token(journal: Path) -> float:
    """Bytes of a teacher journal's Parquet files per completion token they hold, measured here."""
    import pyarrow.parquet as pq

    files = list(journal.glob("*.parquet"))
    tokens = sum(len(ids) for f in files for ids in pq.read_table(f)["completion_ids"].to_pylist())
    return sum(f.stat().st_size for f in files) / tokens
