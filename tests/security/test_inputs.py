"""Hostile or careless spec fields are refused at submit, through a real server and channel: a
distill top_k past the teacher's vocabulary, a student of absurd size, a reward name that is not
a function of its module, counts past the tenant's ceilings. Each answer is INVALID_ARGUMENT
naming the field path (in the message and in the BadRequest details), queues nothing, and leaves
the server answering health and another tenant's calls.

Nothing ever runs a job here (--max-running-jobs 0).
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from stillroom.services.recipes import parse

from tests.conftest import REPO

pytestmark = pytest.mark.slow
C = grpc.StatusCode


def teacher_dir(root: Path) -> str:
    """A Llama teacher's config.json in the data root (all the server reads of it: no weights)."""
    d = root / "teacher"
    d.mkdir(exist_ok=True)
    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 300,
        "tie_word_embeddings": False,
    }
    (d / "config.json").write_text(json.dumps(config))
    return str(d)


def distill(root: Path, **fields) -> dict:
    return {
        "teacher": {"path": teacher_dir(root)},
        "data": {"train": {"path": "train.jsonl"}},
        "stages": [{"distill": {"student_init": {"keep_every_nth_layer": 2}, **fields}}],
    }


def refused(server, doc: dict, field: str) -> str:
    """Submit as alice: INVALID_ARGUMENT naming `field` in the message and in BadRequest; the
    server still answers health and bob's ListJobs, and alice has queued nothing. Returns the
    field's description."""
    alice = server.client("alice")
    before = len(list(alice.list()))
    with pytest.raises(grpc.RpcError) as e:
        alice.submit(parse(doc))
    assert e.value.code() == C.INVALID_ARGUMENT, e.value.details()
    assert f"{field}: " in e.value.details()
    bad_request = error_details_pb2.BadRequest()
    assert rpc_status.from_call(e.value).details[0].Unpack(bad_request)
    fields = {v.field: v.description for v in bad_request.field_violations}
    assert field in fields, fields
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.address))
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    assert list(server.client("bob").list()) is not None
    assert len(list(alice.list())) == before
    return fields[field]


def test_top_k_past_the_teachers_vocabulary(start_server, data_root):
    server = start_server(data_root, "--max-running-jobs", "0")
    message = refused(server, distill(data_root, top_k=5000), "stages[0].distill.top_k")
    assert message == "5000 is more than the teacher's vocabulary of 300 tokens"


def test_a_student_of_absurd_size(start_server, data_root):
    server = start_server(data_root, "--max-running-jobs", "0")
    doc = distill(data_root, student_init={"config_overrides": {"hidden_size": 10**12}})
    message = refused(server, doc, "stages[0].distill.student_init.config_overrides['hidden_size']")
    assert "parameters, more than the teacher's 112,448" in message
    doc = distill(data_root, student_init={"config_overrides": {"num_layers": 2}})
    message = refused(server, doc, "stages[0].distill.student_init.config_overrides['num_layers']")
    assert message.startswith("the teacher's config has no 'num_layers' (its integer fields: hidden_size, ")


def test_a_reward_name_that_is_not_a_function_of_its_module(start_server, data_root, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # where tests.unsafe_rewards is (it imports os)
    server = start_server(data_root, "--max-running-jobs", "0", "--reward-module", "tests.unsafe_rewards")
    doc = {
        "teacher": {"path": teacher_dir(data_root)},
        "data": {"train": {"path": "train.jsonl"}},
        "stages": [
            {"audit": {}},
            {"grpo": {"rewards": [{"name": "tests.unsafe_rewards:boom"}, {"name": "tests.unsafe_rewards:os"}]}},
        ],
    }
    message = refused(server, doc, "stages[1].grpo.rewards[1].name")
    assert message == "module 'tests.unsafe_rewards': 'os' is a module imported there, not a function"
    doc["stages"][1]["grpo"]["rewards"][1]["name"] = "tests.unsafe_rewards:does_not_exist"
    message = refused(server, doc, "stages[1].grpo.rewards[1].name")
    assert message == "module 'tests.unsafe_rewards': the module has no top-level function 'does_not_exist'"
    doc["stages"][1]["grpo"]["rewards"].pop()
    assert server.client("alice").submit(parse(doc)).created  # a function of the module: accepted


def test_counts_past_the_tenants_ceilings(start_server, data_root, tmp_path):
    limits = tmp_path / "limits.yaml"
    limits.write_text("tenants:\n  alice: {max_steps: 1000, max_timeout_s: 3600, default_timeout_s: 600}\n")
    server = start_server(data_root, "--max-running-jobs", "0", "--limits", str(limits))
    sft = {"data": {"train": {"path": "train.jsonl"}}, "stages": [{"sft": {"optim": {"max_steps": 5000}}}]}
    sft["teacher"] = {"path": teacher_dir(data_root)}
    message = refused(server, sft, "stages[0].sft.optim.max_steps")
    assert message == "5000 is over this server's limit of 1000 (max_steps)"
    grpo = {"group_size": 64, "prompts_per_step": 128, "rewards": [{"name": "json_valid"}]}
    message = refused(server, {**sft, "stages": [{"grpo": grpo}]}, "stages[0].grpo.prompts_per_step")
    assert message.endswith("= 8192 completions per step is over this server's limit of 4096 (max_rollouts_per_step)")
    message = refused(server, {**sft, "timeout_s": 7200}, "timeout_s")
    assert message == "7200 is over this server's limit of 3600 (max_timeout_s)"
    # another tenant's ceilings are the defaults: bob's 5000 steps are fine; alice's jobs get a deadline
    assert server.client("bob").submit(parse(sft)).created
    sft["stages"][0]["sft"]["optim"]["max_steps"] = 100
    job = server.client("alice").submit(parse(sft)).job
    assert server.client("alice").get(job.id).spec.timeout_s == 600
