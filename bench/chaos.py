"""Chaos: a real job (an offline distillation: teacher generator -> reward scorer -> student
trainer, 48 steps) on a real Ray cluster behind a real `stillroom serve`, with one process of the
named role SIGKILLed at a random step of each trial; then, for every trial, what an operator must be
able to rely on is checked.

    .venv/bin/python -m bench.chaos --role generator --trials 5
    .venv/bin/python -m bench.chaos --role all --trials 5     # generator, scorer, trainer, supervisor, service

Roles: generator, scorer, trainer (rank 0), supervisor (found by name through Ray's state API,
killed by PID), service (the `stillroom serve` process, started again 1 s later). Checks per trial:
the job SUCCEEDED; journal rows == distinct sample ids, and every planned batch journaled; the
newest checkpoint's optimizer steps == the batches its data cursor passed == the planned steps; no
actor or placement group of the job left on the cluster; the store's events are seqs 1..N, none
twice, and every event any of the job's supervisors wrote (their event files) is in the store.
Prints the table and writes bench/results/chaos.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import report, tiny_llama
from bench.control_plane import free_port

BIN = Path(sys.executable).parent
ROLES = ("generator", "scorer", "trainer", "supervisor", "service")
STEPS = 48  # 96 prompts, 2 per step


class Cluster:
    """A Ray head started with `ray start` (token auth on) and `stillroom serve` on it."""

    def __init__(self, root: Path):
        self.root, self.token = root, "chaos-" + secrets.token_hex(4)
        self.ray_address = f"127.0.0.1:{free_port()}"
        self.address = f"127.0.0.1:{free_port()}"
        self.server: subprocess.Popen | None = None

    def start_ray(self) -> None:
        temp = self.root / "ray"
        cmd = [str(BIN / "ray"), "start", "--head", f"--port={self.ray_address.split(':')[1]}", "--num-cpus=2"]
        cmd += [f"--temp-dir={temp}", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
        cmd += ["--include-dashboard=true", f"--dashboard-port={free_port()}"]
        subprocess.run(cmd, check=True, capture_output=True, timeout=180)

    def start_server(self, model: Path) -> None:
        cmd = [str(BIN / "stillroom"), "serve", "--address", self.address, "--home", str(self.root / "home")]
        cmd += ["--ray-address", self.ray_address, "--data-root", str(self.root / "data")]
        cmd += ["--model-root", str(model), "--retry-backoff-s", "1"]
        env = {**os.environ, "STILLROOM_TOKENS": f"chaos={self.token}"}
        env.pop("RAY_ADDRESS", None)
        log = self.root / "server.log"
        offset = log.stat().st_size if log.exists() else 0
        self.server = subprocess.Popen(cmd, stdout=log.open("a"), stderr=subprocess.STDOUT, env=env)
        while f"listening on {self.address}" not in log.read_text()[offset:]:
            if self.server.poll() is not None:
                raise RuntimeError(log.read_text()[-3000:])
            time.sleep(0.2)

    def stop(self) -> None:
        if self.server and self.server.poll() is None:
            self.server.send_signal(signal.SIGTERM)
            self.server.wait(60)
        subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True, timeout=120)

    def client(self):
        from stillroom.services.client import Client

        return Client(self.address, token=self.token, timeout_s=30)


def task(root: Path) -> tuple[Path, dict]:
    """A tiny teacher and the labelled task it labels; the recipe of the job each trial runs."""
    model = tiny_llama(root / "teacher", layers=1, hidden=64, vocab=300)
    kinds = {"billing": "refund", "shipping": "priority", "account": "order"}
    rows = [{"prompt": f"ticket {i} about {k} order", "completion": kinds[k]} for i, k in enumerate(list(kinds) * 32)]
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "data/train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "teacher": {"path": str(model)},
        "data": {"train": {"path": "train.jsonl"}, "unlabeled": {"path": "train.jsonl"}},
        "stages": [
            {
                "name": "distill",
                "distill": {
                    "num_samples": 4,
                    "top_k": 8,
                    "max_new_tokens": 6,
                    "prompts_per_step": 2,
                    "student_init": {"config_overrides": {"num_hidden_layers": 1, "hidden_size": 32}},
                    "optim": {"learning_rate": 0.005, "checkpoint_every": 4},
                },
            }
        ],
        "resources": {"generator": {"num_cpus": 0.5}, "scorer": {"num_cpus": 0.25}, "trainer": {"num_cpus": 0.5}},
        "seed": 2,
    }
    return model, recipe


def wait_end(cluster: Cluster, job_id: str, timeout: float = 900):
    """The job once it ended; a control service that is down meanwhile is waited for."""
    import grpc
    from stillroom.v1 import job_pb2 as pb

    ended = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with cluster.client() as c:
                job = c.get(job_id)
            if job.state in ended:
                return job
        except grpc.RpcError:
            pass  # the service is being started again
        time.sleep(0.5)
    raise TimeoutError(f"{job_id} did not end in {timeout:.0f} s")


def kill(cluster: Cluster, role: str, job_id: str, model: Path) -> str:
    """SIGKILL the role's process; returns what was killed."""
    if role == "service":
        pid = cluster.server.pid
        cluster.server.send_signal(signal.SIGKILL)
        cluster.server.wait(30)
        time.sleep(1.0)
        cluster.start_server(model)
        return f"stillroom serve (pid {pid})"
    from ray.util.state import list_actors
    from stillroom.actors.runtime.cluster import actor_name, supervisor_name

    name = supervisor_name(job_id) if role == "supervisor" else actor_name(job_id, role, 0)
    for _ in range(50):  # the state API can lag an actor's start by a moment
        alive = {a.name: a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)}
        if name in alive:
            os.kill(alive[name].pid, signal.SIGKILL)
            return f"{name} (pid {alive[name].pid})"
        time.sleep(0.2)
    raise RuntimeError(f"no live actor {name}; alive: {sorted(alive)}")


def progress(cluster: Cluster, job_id: str) -> int:
    import grpc

    try:
        with cluster.client() as c:
            stages = c.get(job_id).stages
        return stages[0].progress.done if stages else 0
    except grpc.RpcError:
        return 0


def trial(cluster: Cluster, recipe: dict, model: Path, role: str, rng: random.Random) -> dict:
    """One job; with a role, a SIGKILL once it has trained a random number of steps."""
    from stillroom.services.recipes import parse

    started = time.monotonic()
    with cluster.client() as c:
        job_id = c.submit(parse(recipe)).job.id
    row = {"role": role or "none", "job": job_id}
    if role:
        at = rng.randint(1, STEPS - 8)
        while progress(cluster, job_id) < at:
            time.sleep(0.1)
        time.sleep(rng.uniform(0, 0.3))  # anywhere inside the step, not only at its start
        row["killed"], row["at_step"] = kill(cluster, role, job_id, model), at
    job = wait_end(cluster, job_id)
    row["wall_s"] = time.monotonic() - started
    row["state"] = job.state
    return row | checks(cluster, job_id, job)


def checks(cluster: Cluster, job_id: str, job) -> dict:
    """What must hold after every trial (see the module docstring), counted."""
    from stillroom.actors.runtime.journal import Journal

    job_dir = cluster.root / "home" / "artifacts" / job_id
    planned = job.stages[0].progress.total
    journal = Journal(job_dir / "distill" / "journal")
    samples = [s for b in journal.ids() for s in journal.read(b).column("sample_id").to_pylist()]
    newest = sorted((job_dir / "distill" / "checkpoints").glob("step-*/COMPLETE"))
    state = json.loads(newest[-1].read_text()) if newest else {"step": 0, "cursor": 0}
    return {
        "planned_steps": planned,
        "journal_rows": len(samples),
        "journal_duplicates": len(samples) - len(set(samples)),
        "batches_not_journaled": planned - len([b for b in journal.ids() if "+" not in b]),
        "optimizer_steps": state["step"],
        "cursor": state["cursor"],
        "left_on_cluster": leftovers(job_id),
        **event_checks(cluster, job_id, job_dir),
    }


def leftovers(job_id: str, wait_s: float = 30) -> int:
    """Actors and placement groups of the job still alive (released asynchronously: waited for)."""
    from ray.util.state import list_actors, list_placement_groups

    deadline = time.monotonic() + wait_s
    while True:
        actors = [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000) if a.name.startswith(job_id)]
        groups = [g for g in list_placement_groups(limit=1000) if job_id in g.name and g.state != "REMOVED"]
        if not actors + groups or time.monotonic() > deadline:
            return len(actors) + len(groups)
        time.sleep(1.0)


def event_checks(cluster: Cluster, job_id: str, job_dir: Path) -> dict:
    """seqs 1..N; no event stored twice; every event a supervisor of the job wrote is stored."""
    from stillroom.actors.runtime.eventlog import attempt_files, read_events
    from stillroom.v1 import job_pb2 as pb

    def body(event: pb.Event) -> bytes:
        event.ClearField("seq")
        event.ClearField("job_id")
        return event.SerializeToString(deterministic=True)

    with cluster.client() as c:
        stored = list(c.events(job_id))
    seqs = [e.seq for e in stored]
    bodies = [body(e) for e in stored]
    written = [body(pb.Event.FromString(r)) for f in attempt_files(job_dir) for r in read_events(f)]
    return {
        "events": len(stored),
        "seqs_in_order": seqs == list(range(1, len(seqs) + 1)),
        "events_duplicated": len(bodies) - len(set(bodies)),
        "events_lost": len(set(written) - set(bodies)),
        "supervisors": len(attempt_files(job_dir)),
    }


def ok(row: dict) -> bool:
    from stillroom.v1 import job_pb2 as pb

    return (
        row["state"] == pb.JOB_STATE_SUCCEEDED
        and row["journal_duplicates"] == row["batches_not_journaled"] == 0
        and row["optimizer_steps"] == row["cursor"] == row["planned_steps"]
        and row["left_on_cluster"] == 0
        and row["seqs_in_order"]
        and row["events_duplicated"] == row["events_lost"] == 0
    )


def summary(role: str, rows: list[dict], baseline_s: float) -> dict:
    return {
        "role": role,
        "trials": len(rows),
        "succeeded": sum(r["state_name"] == "JOB_STATE_SUCCEEDED" for r in rows),
        "all_checks_pass": sum(r["ok"] for r in rows),
        "extra_wall_s": sorted(r["wall_s"] - baseline_s for r in rows)[len(rows) // 2],
        "duplicates": sum(r["journal_duplicates"] + r["events_duplicated"] for r in rows),
        "losses": sum(r["batches_not_journaled"] + r["events_lost"] for r in rows),
        "extra_optimizer_steps": sum(r["optimizer_steps"] - r["planned_steps"] for r in rows),
        "left_on_cluster": sum(r["left_on_cluster"] for r in rows),
        "supervisors": sum(r["supervisors"] for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=(*ROLES, "all"), default="all")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (models, store, logs)")
    args = parser.parse_args()
    from stillroom.services.ray_auth import enable_ray_token_auth, ray_token_available
    from stillroom.v1 import job_pb2 as pb

    if not ray_token_available():
        subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], check=True, capture_output=True)
    enable_ray_token_auth()  # before ray is imported: it reads the mode once
    import ray

    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="chaos-"))
    model, recipe = task(root)
    cluster = Cluster(root)
    cluster.start_ray()
    rows: list[dict] = []
    try:
        cluster.start_server(model)
        ray.init(address=cluster.ray_address, log_to_driver=False)
        for role in ["", *(ROLES if args.role == "all" else [args.role])]:
            for _ in range(args.trials if role else 1):
                row = trial(cluster, recipe, model, role, rng)
                row |= {"state_name": pb.JobState.Name(row.pop("state")), "ok": False}
                row["ok"] = ok(row | {"state": pb.JobState.Value(row["state_name"])})
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        ray.shutdown()
        cluster.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    baseline = rows[0]["wall_s"]
    table = [
        summary(role, [r for r in rows[1:] if r["role"] == role], baseline)
        for role in dict.fromkeys(r["role"] for r in rows[1:])
    ]
    columns = ["role", "trials", "succeeded", "all_checks_pass", "extra_wall_s", "duplicates", "losses"]
    columns += ["extra_optimizer_steps", "left_on_cluster", "supervisors"]
    report("chaos", table, columns, {"baseline_wall_s": baseline, "trials": rows, "steps": STEPS})


if __name__ == "__main__":
    main()
