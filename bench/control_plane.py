"""Control plane: SubmitJob latency with 50 concurrent clients, alone and while another tenant holds
200 open WatchJob streams; WatchJob with 100 concurrent streams (events/s delivered); and the store's
size per 10,000 events, against a real `stillroom serve` (embedded Ray, SQLite store) started here on
a loopback port.

    .venv/bin/python -m bench.control_plane [--clients 50] [--submits 4] [--watchers 100] [--held-streams 200]

The jobs are small audits (a few events each), so what is measured is the service, not training.
"""

from __future__ import annotations

import argparse
import json
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.common import report

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path, token: str, noisy_token: str) -> tuple[subprocess.Popen, str]:
    address = f"127.0.0.1:{free_port()}"
    data = home.parent / f"{home.name}-data"  # beside the server's home: never inside it
    data.mkdir(parents=True)
    rows = [{"prompt": f"ticket {i} about billing", "completion": "refund"} for i in range(200)]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # "noisy" is paused (its jobs stay queued) and may hold 250 streams: its streams never end; the
    # bench tenant runs as many jobs at once as the server does (4)
    limits = {
        "default": {"max_queued_jobs": 100000, "max_running_jobs": 4},
        "tenants": {"noisy": {"max_running_jobs": 0, "max_watch_streams": 250}},
    }
    (home / "limits.yaml").write_text(json.dumps(limits))
    env = {"STILLROOM_TOKENS": f"bench={token},noisy={noisy_token}", "PATH": str(BIN)}
    cmd = [
        str(BIN / "stillroom"),
        "serve",
        "--address",
        address,
        "--home",
        str(home),
        "--limits",
        str(home / "limits.yaml"),
    ]
    cmd += ["--data-root", str(data), "--max-running-jobs", "4"]
    log = (home / "server.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    while "listening on" not in (home / "server.log").read_text():
        if proc.poll() is not None:
            raise RuntimeError((home / "server.log").read_text())
        time.sleep(0.2)
    return proc, address


def _client_process(address: str, token: str, clients: int, submits: int, start_at: float) -> list[tuple[float, str]]:
    """`clients` threads of one client process, each submitting `submits` jobs one after another,
    from wall time `start_at` (every process connects first, then all start together)."""
    import threading

    from stillroom.services.client import Client
    from stillroom.services.recipes import parse

    spec = parse({"data": {"train": {"path": "train.jsonl"}}, "stages": [{"audit": {"warn_only": True}}]})
    conns = [Client(address, token=token) for _ in range(clients)]
    for c in conns:
        next(iter(c.list(page_size=1)), None)  # connected and authenticated before the clock starts
    ready = threading.Barrier(clients)

    def one(c) -> list[tuple[float, str]]:
        ready.wait()
        time.sleep(max(0.0, start_at - time.time()))
        out = []
        for _ in range(submits):
            started = time.perf_counter()
            try:
                job = c.submit(spec).job
            except Exception as e:  # an RpcError does not pickle back to the parent: say what it was
                raise RuntimeError(f"SubmitJob failed: {e}") from None
            out.append((time.perf_counter() - started, job.id))
        return out

    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(one, conns) for r in rs]
    for c in conns:
        c.close()
    return results


def submit_latencies(
    address: str, token: str, clients: int, submits: int, processes: int
) -> tuple[list[float], list[str]]:
    """SubmitJob latencies of `clients` concurrent clients spread over `processes` client processes
    (one Python process's GIL would otherwise time its own threads as much as the server)."""
    import multiprocessing

    per = [clients // processes + (i < clients % processes) for i in range(processes)]
    start_at = time.time() + 5.0 + 0.5 * processes  # after every process has imported and connected
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        args = [(address, token, n, submits, start_at) for n in per if n]
        results = [r for rs in pool.starmap(_client_process, args) for r in rs]
    return [s for s, _ in results], [j for _, j in results]


def watch_throughput(address: str, token: str, jobs: list[str], watchers: int) -> tuple[int, float]:
    """Every watcher replays one finished job's whole event stream; (events delivered, seconds)."""
    from stillroom.services.client import Client

    def one(i: int) -> int:
        with Client(address, token=token) as c:
            return sum(1 for _ in c.watch(jobs[i % len(jobs)]))

    started = time.perf_counter()
    with ThreadPoolExecutor(watchers) as pool:
        delivered = sum(pool.map(one, range(watchers)))
    return delivered, time.perf_counter() - started


def hold_streams(address: str, token: str, n: int) -> list:
    """`n` WatchJob streams of one tenant on a job that stays queued, each open on the server."""
    from stillroom.services.client import Client
    from stillroom.services.recipes import parse
    from stillroom.v1 import job_service_pb2 as api

    clients = [Client(address, token=token) for _ in range(8)]  # 8 channels
    job = clients[0].submit(parse({"data": {"train": {"path": "train.jsonl"}}, "stages": [{"audit": {}}]})).job
    streams = []
    for i in range(n):
        c = clients[i % len(clients)]
        call = c.stub.WatchJob(api.WatchJobRequest(job_id=job.id), metadata=c.metadata)
        next(call)  # the QUEUED event: open
        streams.append(call)
    return streams


def _percentiles(latencies: list[float]) -> tuple[float, float]:
    ms = np.array(latencies) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--submits", type=int, default=4, help="jobs each client submits, one after another")
    ap.add_argument("--watchers", type=int, default=100)
    ap.add_argument("--client-processes", type=int, default=10, help="processes the clients are spread over")
    ap.add_argument("--held-streams", type=int, default=200, help="streams another tenant holds in the second round")
    args = ap.parse_args()
    from stillroom.services.client import Client

    token, noisy = secrets.token_hex(16), secrets.token_hex(16)
    home = Path(tempfile.mkdtemp(prefix="stillroom-bench-"))
    proc, address = start_server(home, token, noisy)
    try:
        latencies, jobs = submit_latencies(address, token, args.clients, args.submits, args.client_processes)
        streams = hold_streams(address, noisy, args.held_streams)
        held, more = submit_latencies(address, token, args.clients, args.submits, args.client_processes)
        with Client(address, token=token) as c:
            for job in jobs + more:
                c.wait(job)
            events = sum(len(list(c.events(j))) for j in jobs)
        for s in streams:
            s.cancel()
        delivered, seconds = watch_throughput(address, token, jobs, args.watchers)
    finally:
        proc.terminate()
        proc.wait(60)
    store = sum(p.stat().st_size for p in home.glob("jobs.db*"))
    (p50, p99), (held_p50, held_p99) = _percentiles(latencies), _percentiles(held)
    row = {
        "submit_clients": args.clients,
        "client_processes": args.client_processes,
        "submits": len(latencies),
        "submit_p50_ms": p50,
        "submit_p99_ms": p99,
        "held_streams": args.held_streams,
        "submit_p50_ms_beside_held_streams": held_p50,
        "submit_p99_ms_beside_held_streams": held_p99,
        "watch_streams": args.watchers,
        "events_delivered": delivered,
        "events_per_s": delivered / seconds,
        "store_events": events,
        "store_MB_per_10k_events": store / events * 10_000 / 1e6,
    }
    report("control_plane", [row], list(row))


if __name__ == "__main__":
    main()
