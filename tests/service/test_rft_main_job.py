"""Issue 26, RFT in the main job, through the service on real Ray and gRPC: a grpo stage takes its
prompts from data.unlabeled (refused at submit, with its field path, when that split is missing),
and the evaluate stage reports each exact-match rung with its 95% interval, which a gate may use."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlparse

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from stillroom.services.recipes import parse
from stillroom.v1 import job_pb2 as pb

from tests.conftest import audit_spec, write_jsonl

pytestmark = pytest.mark.slow


def unlabeled_spec(tiny_model, data: dict) -> pb.JobSpec:
    grpo = {
        "prompts": "unlabeled",
        "adapter": "ADAPTER_TYPE_NONE",
        "group_size": 2,
        "prompts_per_step": 2,
        "max_new_tokens": 3,
        "optim": {"max_steps": 2},
        "rewards": [{"name": "json_valid"}],  # needs no gold answer
    }
    evaluate = {
        "metrics": [{"name": "exact_match", "args": {"column": "reference"}}],
        "limit": 5,
        "max_new_tokens": 3,
        "gates": [{"model": "teacher_grpo", "metric": "exact_match", "min": 0.0, "use_ci_low": True}],
    }
    return parse(
        {
            "teacher": {"path": str(tiny_model)},
            "data": data,
            "stages": [{"grpo": grpo}, {"evaluate": evaluate}],
            "resources": {"generator": {"num_cpus": 0.5}, "scorer": {"num_cpus": 0.25}, "trainer": {"num_cpus": 0.5}},
            "seed": 3,
        }
    )


def test_unlabeled_prompts_without_the_split_are_invalid_argument(start_server, data_root, tiny_model):
    c = start_server(data_root, "--model-root", str(tiny_model)).client()
    spec = unlabeled_spec(tiny_model, {"train": {"path": "train.jsonl"}, "test": {"path": "eval.jsonl"}})
    with pytest.raises(grpc.RpcError) as e:
        c.submit(spec)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad_request = error_details_pb2.BadRequest()
    assert rpc_status.from_call(e.value).details[0].Unpack(bad_request)
    assert {v.field: v.description for v in bad_request.field_violations} == {
        "stages[0].grpo.prompts": "'unlabeled' needs data.unlabeled.path"
    }
    assert c.submit(audit_spec(data_root)).created  # the server still answers


def test_grpo_on_unlabeled_prompts_and_intervals_in_the_ladder(start_server, data_root, tiny_model):
    """No data.train at all: the stage can only have sampled data.unlabeled (the old stage read
    data.train). The report's table shows exact match with its interval; the gate on the lower
    bound is logged."""
    write_jsonl(data_root / "unlabeled.jsonl", [{"prompt": f"ticket {i} about an order"} for i in range(6)])
    c = start_server(data_root, "--model-root", str(tiny_model)).client()
    spec = unlabeled_spec(tiny_model, {"unlabeled": {"path": "unlabeled.jsonl"}, "test": {"path": "eval.jsonl"}})
    done = c.wait(c.submit(spec).job.id)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error.reason
    assert done.stages[0].progress.done == 2 and "frac_reward_zero_std" in done.stages[0].metrics
    files = {a.name: Path(urlparse(a.uri).path) for a in c.artifacts(done.id)}
    report = json.loads(files["evaluate/report.json"].read_text())
    for rung in ("base_teacher", "teacher_grpo"):
        r = report[rung]
        assert 0.0 <= r["exact_match/ci_low"] <= r["exact_match"] <= r["exact_match/ci_high"] <= 1.0, r
        assert r["exact_match/ci_high"] > r["exact_match/ci_low"]  # 5 rows: a wide interval, never zero-width
    table = files["evaluate/report.md"].read_text()
    r = report["teacher_grpo"]
    row = next(line for line in table.splitlines() if line.startswith("| teacher_grpo |"))
    assert f"| {r['exact_match']:.2f} [{r['exact_match/ci_low']:.2f}, {r['exact_match/ci_high']:.2f}] |" in row, table
    assert "PASS: teacher_grpo exact_match/ci_low " in table
    assert c.get(done.id).id == done.id  # the server still answers
