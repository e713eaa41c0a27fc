"""Roles on the hardware they are given (issue 28): num_gpus reaches the placement group and each
role's process, a role given a GPU torch cannot use fails at once naming itself, a GPU cluster that
a recipe leaves unused says so, and each generator picks its dtype in its own process.

The cluster tests run on a Ray cluster of their own that declares two logical GPUs on this CPU
machine (`ray start --num-gpus 2`); a driver subprocess joins it (this process may already be
joined to the session's cluster). Tests that need real CUDA are marked `gpu` and skip elsewhere.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from stillroom.actors.models.loading import gpu_share, inference_dtype
from stillroom.actors.roles.generator import Generator, GeneratorSpec
from stillroom.actors.runtime.cluster import Placement
from stillroom.actors.runtime.context import with_auto_gpus

from tests.conftest import BIN, REPO, free_port, stop_cluster

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a usable GPU")


@pytest.fixture(scope="module")
def gpu_cluster():
    """A one-node Ray cluster with 2 CPUs and 2 logical GPUs, on ports of its own; only it is stopped."""
    temp = Path(f"/tmp/sg{secrets.token_hex(3)}")
    port = free_port()
    start = [
        str(BIN / "ray"),
        "start",
        "--head",
        f"--port={port}",
        "--num-cpus=2",
        "--num-gpus=2",
        f"--temp-dir={temp}",
        "--node-ip-address=127.0.0.1",
        "--include-dashboard=false",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        "--disable-usage-stats",
    ]
    try:
        subprocess.run(start, check=True, capture_output=True, timeout=120)
        yield f"127.0.0.1:{port}"
    finally:
        stop_cluster(temp)


DRIVER = """
import json, sys, threading, time
import ray
from stillroom.actors.roles.generator import GeneratorSpec
from stillroom.actors.runtime.context import EventLog, StageContext
from stillroom.v1 import job_pb2 as pb

ray.init(address=sys.argv[1], namespace="stillroom", log_to_driver=False)
out = {}
log = EventLog()
ctx = StageContext("job-gpu", "grpo", None, log, threading.Event())

def warnings():
    events = [pb.Event.FromString(e) for e in log.since(0)[0]]
    return [e.message for e in events if e.message.startswith("warning:")]

# A recipe that asks for no GPU on a cluster that has two: the stage says so.
group = ctx.roles(pb.Resources(), ("generator", "trainer"))
out["unset_warnings"] = warnings()
ctx.close()

# Each model role asks for a GPU: its bundle holds it, its process sees it, and starting it fails at once.
res = pb.Resources()
for role in ("generator", "trainer"):
    getattr(res, role).num_gpus = 1
    getattr(res, role).num_cpus = 0.5
before = len(warnings())
group = ctx.roles(res, ("generator", "trainer"))
out["warnings_after"] = warnings()[before:]
out["bundles"] = list(ray.util.placement_group_table(group.pg)["bundles"].values())
out["options_gpus"] = {r: group._options(r, 0)["num_gpus"] for r in ("generator", "trainer")}
out["visible"] = {r: group.visible_gpus(r) for r in ("generator", "trainer")}
started = time.monotonic()
try:
    group.start("generator", GeneratorSpec(sys.argv[2], seed=0))
    out["error"] = None
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
out["seconds_to_fail"] = time.monotonic() - started
out["named_actors"] = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
ctx.close()

# resources.auto_gpus: the model roles get the cluster's GPUs, the scorer none, and no warning.
before = len(warnings())
res = pb.Resources(auto_gpus=True)
for role in ("generator", "scorer", "trainer"):
    getattr(res, role).num_cpus = 0.5
group = ctx.roles(res, ("generator", "scorer", "trainer"))
out["auto_gpus"] = {r: group._options(r, 0)["num_gpus"] for r in ("generator", "scorer", "trainer")}
out["auto_bundles"] = sorted(b.get("GPU", 0) for b in ray.util.placement_group_table(group.pg)["bundles"].values())
out["auto_warnings"] = warnings()[before:]
ctx.close()
print(json.dumps(out))
"""


@no_cuda
def test_logical_gpus_reach_each_role_and_an_unusable_gpu_fails_at_once(gpu_cluster, tiny_model):
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, gpu_cluster, str(tiny_model)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    # no num_gpus on a cluster with GPUs: a warning naming the fields and the roles
    assert len(out["unset_warnings"]) == 1, out["unset_warnings"]
    warning = out["unset_warnings"][0]
    assert "2 GPU(s)" in warning and "resources.generator.num_gpus" in warning
    assert "resources.trainer.num_gpus" in warning and "run on CPU" in warning
    assert out["warnings_after"] == []
    # num_gpus reaches the placement group's bundles and the actors' options
    assert sorted(b.get("GPU", 0) for b in out["bundles"]) == [1.0, 1.0]
    assert out["options_gpus"] == {"generator": 1.0, "trainer": 1.0}
    # each role's process sees its own GPU
    (gen_visible, gen_problem), (trainer_visible, _) = out["visible"]["generator"][0], out["visible"]["trainer"][0]
    assert {gen_visible, trainer_visible} == {"0", "1"}
    assert "CPU-only build" in gen_problem
    # a role given a GPU torch cannot use: a clear error naming it, at once, and no actor left behind
    error = out["error"]
    assert error is not None and error.startswith("RuntimeError: resources.generator.num_gpus is 1")
    assert "job-gpu:generator:0" in error and f"CUDA_VISIBLE_DEVICES={gen_visible}" in error
    assert "CPU-only build" in error
    assert out["seconds_to_fail"] < 60
    assert not any(name.startswith("job-gpu:") for name in out["named_actors"])
    # resources.auto_gpus: a GPU each for generator and trainer, none for the scorer, no warning
    assert out["auto_gpus"] == {"generator": 1.0, "scorer": 0.0, "trainer": 1.0}
    assert out["auto_bundles"] == [0, 1.0, 1.0] and out["auto_warnings"] == []


def test_auto_gpus_share_the_cluster_between_the_model_roles():
    """One GPU per model replica where there are enough, else equal shares that fit at once;
    a role's own num_gpus is kept; without GPUs nothing changes."""
    roles = {"generator": Placement(2, 0.5), "scorer": Placement(1, 0.25), "trainer": Placement(1, 1.0)}
    gpus = lambda placements: {r: p.num_gpus for r, p in placements.items()}  # noqa: E731
    assert gpus(with_auto_gpus(roles, 4)) == {"generator": 1.0, "scorer": 0.0, "trainer": 1.0}
    assert gpus(with_auto_gpus(roles, 3)) == {"generator": 1.0, "scorer": 0.0, "trainer": 1.0}
    assert gpus(with_auto_gpus(roles, 2)) == {"generator": 0.5, "scorer": 0.0, "trainer": 0.5}  # 3 replicas
    assert gpus(with_auto_gpus(roles, 1)) == {"generator": 1 / 3, "scorer": 0.0, "trainer": 1 / 3}
    assert with_auto_gpus(roles, 0) == roles
    pinned = {**roles, "trainer": Placement(1, 1.0, num_gpus=2)}  # asked for: kept, and not counted
    assert gpus(with_auto_gpus(pinned, 2)) == {"generator": 1.0, "scorer": 0.0, "trainer": 2.0}
    # what a vllm generator may fill of its GPU: its share, the trainer beside it keeps the rest
    assert [gpu_share({"GPU": g}) for g in (1 / 3, 0.5, 1.0, 2.0)] == [1 / 3, 0.5, 1.0, 1.0]
    assert gpu_share({"CPU": 1.0}) == gpu_share({}) == 1.0  # no GPU, or outside Ray: the whole device


@no_cuda
def test_a_generator_given_a_gpu_it_cannot_use_names_itself(tiny_model, monkeypatch):
    """The role's own check, where it starts outside a RoleGroup: CUDA_VISIBLE_DEVICES as Ray sets it."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    with pytest.raises(RuntimeError, match=r"job-x:generator:0 was given GPU 1 .*CPU-only build"):
        Generator(GeneratorSpec(str(tiny_model), name="job-x:generator:0"))


def test_each_generator_picks_its_dtype_in_its_own_process(tiny_model):
    """Unset: a frozen model takes this hardware's inference dtype, a policy float32; asked: as asked."""
    assert Generator(GeneratorSpec(str(tiny_model), frozen=True)).spec.dtype == inference_dtype()
    policy = Generator(GeneratorSpec(str(tiny_model)))
    assert policy.spec.dtype == "float32" and next(policy.model.parameters()).dtype == torch.float32
    asked = Generator(GeneratorSpec(str(tiny_model), frozen=True, dtype="float32"))
    assert next(asked.model.parameters()).dtype == torch.float32


@pytest.mark.gpu
@cuda
def test_on_a_gpu_a_frozen_generator_runs_bfloat16_there(tiny_model):
    gen = Generator(GeneratorSpec(str(tiny_model), frozen=True))
    param = next(gen.model.parameters())
    assert gen.device == "cuda" and param.device.type == "cuda"
    assert param.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)
    policy = Generator(GeneratorSpec(str(tiny_model)))
    assert next(policy.model.parameters()).dtype == torch.float32  # its log-probs enter GRPO ratios
