"""Shared fixtures: data files, a tiny tokenizer, a real local Ray cluster, real server processes."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from stillroom.services.ray_auth import enable_ray_token_auth, ray_token_available

BIN = Path(sys.executable).parent
# Tests run Ray with its token authentication on, as in production: make sure a token exists, and
# turn token mode on before anything imports ray (tests join the fixture cluster by address).
if not ray_token_available():
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], check=True, capture_output=True)
enable_ray_token_auth()

REPO = Path(__file__).resolve().parent.parent
TOKENS = {"alice": "tok-alice-" + secrets.token_hex(4), "bob": "tok-bob-" + secrets.token_hex(4)}
READ_ONLY_TOKEN = "tok-viewer-" + secrets.token_hex(4)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """A small BPE tokenizer trained here, saved in HF format (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = [f"ticket {i} about billing shipping refund priority order {i * 7}" for i in range(200)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"]))
    out = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(out)
    return out


def save_tiny_llama(out: Path, tokenizer_dir: Path | None = None, *, seed: int = 0, **config) -> Path:
    """A Llama built from a small config (hidden 32, 1 layer unless `config` says otherwise) and
    saved in HF format, with `tokenizer_dir`'s tokenizer (whose size sets the vocabulary) when given."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else None
    defaults = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    if tok is not None:
        defaults.update(vocab_size=len(tok), eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**{**defaults, **config})).save_pretrained(out)
    if tok is not None:
        tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_tokenizer) -> Path:
    """A 2-layer Llama (hidden 64) that shares the tiny tokenizer, saved with it."""
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(tiny_tokenizer).eos_token_id
    return save_tiny_llama(
        tmp_path_factory.mktemp("tiny-llama"),
        tiny_tokenizer,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        max_position_embeddings=256,
        pad_token_id=eos,
        bos_token_id=None,
    )


# What the ray_cluster fixture started, for tests that look at it as a user would (dashboard, metrics).
CLUSTER: dict = {}


@pytest.fixture(scope="session")
def ray_cluster():
    """A real two-node Ray cluster on this machine: a head with custom resource node_a and a worker
    node with node_b, as `ray start` makes them; token auth on. Stopped at the end of the session."""
    temp = Path(f"/tmp/srt{secrets.token_hex(3)}")
    port, dash = free_port(), free_port()
    CLUSTER["metrics_ports"] = [free_port(), free_port()]  # each node's Prometheus endpoint
    ray = str(BIN / "ray")
    head = [
        ray,
        "start",
        "--head",
        f"--port={port}",
        "--num-cpus=2",
        f"--temp-dir={temp}",
        "--node-ip-address=127.0.0.1",
        "--include-dashboard=true",
        f"--dashboard-port={dash}",
        f"--metrics-export-port={CLUSTER['metrics_ports'][0]}",
        "--disable-usage-stats",
        '--resources={"node_a": 4}',
    ]
    subprocess.run(head, check=True, capture_output=True, timeout=120)
    address = f"127.0.0.1:{port}"
    worker = [
        ray,
        "start",
        f"--address={address}",
        "--num-cpus=1",
        "--node-ip-address=127.0.0.1",
        f"--metrics-export-port={CLUSTER['metrics_ports'][1]}",
        "--disable-usage-stats",
        '--resources={"node_b": 4}',
    ]
    subprocess.run(worker, check=True, capture_output=True, timeout=120)
    yield address
    stop_cluster(temp)


def stop_cluster(temp: Path) -> None:
    """Stop the Ray cluster whose processes name `temp` (its --temp-dir) on their command lines, and
    no other: `ray stop` would take down every Ray on the machine, other test sessions' included."""
    import psutil

    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(temp) in arg for arg in p.info["cmdline"] or ()):
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_client(ray_cluster):
    """This test process connected to the cluster, for Ray's state API and killing actors."""
    import ray

    ray.init(address=ray_cluster, namespace="stillroom", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tokens_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "tokens.yaml"
    lines = ["tokens:"] + [f"  - {{tenant: {t}, token: {tok}}}" for t, tok in TOKENS.items()]
    lines.append(f"  - {{tenant: alice, token: {READ_ONLY_TOKEN}, read_only: true}}")
    path.write_text("\n".join(lines) + "\n")
    return path


class ServerProcess:
    """`stillroom serve` in a subprocess on a loopback port, with its own home (store, artifacts)."""

    def __init__(
        self, home: Path, ray_address: str, tokens_file: Path, data_root: Path, *extra: str, port: int | None = None
    ):
        self.home, self.port = home, port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.cmd = [
            str(BIN / "stillroom"),
            "serve",
            "--address",
            self.address,
            "--home",
            str(home),
            "--ray-address",
            ray_address,
            "--tokens-file",
            str(tokens_file),
            "--data-root",
            str(data_root),
            *extra,
        ]
        self.proc: subprocess.Popen | None = None
        self.log = home / "server.log"

    def start(self, timeout: float = 90) -> ServerProcess:
        self.home.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "STILLROOM_TOKENS")}
        logf = self.log.open("a")
        offset = logf.tell()  # a restart appends to the same log: look only at what this run writes
        self.proc = subprocess.Popen(self.cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        mark = f"listening on {self.address}"
        while mark not in self.log.read_text()[offset:]:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.2)
        return self

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def client(self, tenant: str = "alice", token: str | None = None):
        from stillroom.services.client import Client

        return Client(self.address, token=token if token is not None else TOKENS[tenant], timeout_s=60)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


@pytest.fixture
def data_root(tmp_path) -> Path:
    root = tmp_path / "data"
    write_jsonl(
        root / "train.jsonl",
        [{"prompt": f"question number {i} about topic {i % 5}", "completion": f"answer {i}"} for i in range(20)],
    )
    write_jsonl(root / "eval.jsonl", [{"prompt": f"held out question {i}", "completion": f"a{i}"} for i in range(5)])
    return root


@pytest.fixture
def start_server(tmp_path, ray_cluster, tokens_file):
    """Factory: start_server(data_root, *extra_args, port=None) -> running ServerProcess."""
    servers: list[ServerProcess] = []

    def start(data_root: Path, *extra: str, home: Path | None = None, port: int | None = None) -> ServerProcess:
        server = ServerProcess(home or tmp_path / "home", ray_cluster, tokens_file, data_root, *extra, port=port)
        servers.append(server)
        return server.start()

    yield start
    for s in servers:
        s.stop()


def audit_spec(data_root: Path, **audit):
    from stillroom.services.recipes import parse

    return parse(
        {
            "display_name": "audit-test",
            "data": {
                "train": {"path": str(data_root / "train.jsonl")},
                "eval": {"path": str(data_root / "eval.jsonl")},
            },
            "stages": [{"audit": {"warn_only": True, **audit}}],
        }
    )
