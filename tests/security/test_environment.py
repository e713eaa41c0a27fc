"""No tenant's token is in the environment of any Ray process the server starts.

`stillroom serve` with STILLROOM_TOKENS and an embedded Ray (its raylet, GCS and workers are the
server's descendants, and inherit its environment): while a job runs in its supervisor, every
descendant's /proc/<pid>/environ is read, and no token may be there. Before the fix every one of
them held every tenant's token, readable by any reward function a tenant names. The tokens still
authenticate: the server read them before it scrubbed its environment (services/environment.py).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from stillroom.services.client import Client
from stillroom.services.environment import scrub_environment
from stillroom.v1 import job_pb2 as pb

from tests.conftest import BIN, free_port
from tests.service.helpers import slow_spec, wait_for, wait_state

TOKENS = {"alice": "env-alice-" + secrets.token_hex(8), "bob": "env-bob-" + secrets.token_hex(8)}


def test_scrub_environment_removes_the_tokens_only():
    env = {"STILLROOM_TOKENS": "a=1", "STILLROOM_TOKEN": "1", "STILLROOM_HOME": "/x", "PATH": "/bin"}
    assert scrub_environment(env) == ["STILLROOM_TOKENS", "STILLROOM_TOKEN"]
    assert env == {"STILLROOM_HOME": "/x", "PATH": "/bin"}
    assert scrub_environment(env) == []


def _environ(proc: psutil.Process) -> bytes:
    try:
        return Path(f"/proc/{proc.pid}/environ").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return b""  # it ended meanwhile


def _descendants(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _stop(server: subprocess.Popen, temp: Path) -> None:
    """SIGTERM: the server shuts its embedded Ray down; anything of it left is ended by its pid."""
    family = _descendants(psutil.Process(server.pid))
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(90)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(30)
    _, alive = psutil.wait_procs(family, timeout=20)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def embedded_server(tmp_path, data_root):
    """`stillroom serve` without --ray-address (an embedded Ray in its own temp dir), tokens from
    STILLROOM_TOKENS only."""
    temp = Path(f"/tmp/sre{secrets.token_hex(3)}")  # short: Ray's socket paths live under it
    address = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "STILLROOM_TOKEN")}
    env |= {"STILLROOM_TOKENS": ",".join(f"{t}={tok}" for t, tok in TOKENS.items()), "RAY_TMPDIR": str(temp)}
    cmd = [str(BIN / "stillroom"), "serve", "--address", address, "--home", str(tmp_path / "home")]
    log = tmp_path / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen([*cmd, "--data-root", str(data_root)], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        started = lambda: f"listening on {address}" in log.read_text() or server.poll() is not None  # noqa: E731
        wait_for(started, timeout=180)
        assert server.poll() is None, log.read_text()[-4000:]
        yield server, address
    finally:
        _stop(server, temp)


@pytest.mark.slow
def test_no_token_in_the_environment_of_any_ray_process(embedded_server, data_root):
    server, address = embedded_server
    alice = Client(address, token=TOKENS["alice"], timeout_s=60)
    job = alice.submit(slow_spec(data_root, stages=2)).job
    wait_state(alice, job.id, pb.JOB_STATE_RUNNING, timeout=120)
    titles: set[str] = set()  # what each process read was running (a worker's title changes with its task)
    leaked: list[str] = []
    while alice.get(job.id).state == pb.JOB_STATE_RUNNING:
        for proc in _descendants(psutil.Process(server.pid)):
            environ = _environ(proc)
            if not environ:
                continue  # it ended meanwhile
            with contextlib.suppress(psutil.Error):
                title = " ".join(proc.cmdline())[:100].strip()
                titles.add(title)
                leaked += [title for tok in TOKENS.values() if tok.encode() in environ]
        time.sleep(0.5)
    assert leaked == []
    assert any("raylet" in t for t in titles), titles  # the embedded cluster's own processes...
    assert any("Supervisor" in t for t in titles), titles  # ...and the worker running the job
    assert wait_state(alice, job.id, pb.JOB_STATE_SUCCEEDED, timeout=120).state == pb.JOB_STATE_SUCCEEDED
    # the tokens still authenticate, each as its own tenant
    assert [j.id for j in alice.list()] == [job.id]
    assert list(Client(address, token=TOKENS["bob"], timeout_s=60).list()) == []
