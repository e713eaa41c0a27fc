"""Issue 26 through the service, on real Ray and gRPC: a GRPO temperature of 0 is refused at submit
with its field path, and distillation measures its held-out KL on chat `messages` data."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from stillroom.v1 import job_pb2 as pb

from tests.conftest import audit_spec, write_jsonl
from tests.service.conftest import task_rows
from tests.service.helpers import metric_series
from tests.service.test_stages import distill_spec

pytestmark = pytest.mark.slow


def test_grpo_temperature_zero_is_invalid_argument_with_its_field_path(start_server, data_root, tiny_model):
    server = start_server(data_root, "--model-root", str(tiny_model))
    c = server.client()
    spec = audit_spec(data_root)
    spec.teacher.path = str(tiny_model)
    grpo = spec.stages.add(name="rl").grpo
    grpo.rewards.add(name="json_valid")
    grpo.temperature = 0.0  # explicitly set: `optional`, so told apart from unset
    with pytest.raises(grpc.RpcError) as e:
        c.submit(spec)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad_request = error_details_pb2.BadRequest()
    assert rpc_status.from_call(e.value).details[0].Unpack(bad_request)
    assert {v.field: v.description for v in bad_request.field_violations} == {
        "stages[1].grpo.temperature": "must be > 0: GRPO samples (greedy completions of a group are alike)"
    }
    grpo.ClearField("temperature")  # unset: 1.0, accepted
    assert c.validate(spec).warnings is not None
    assert c.submit(audit_spec(data_root)).created  # the server still answers


def turns_of(row: dict) -> tuple[dict, dict]:
    """A prompt/completion row as a conversation's turns."""
    return {"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}


def test_distill_on_chat_messages_measures_the_held_out_kl(start_server, data_root, tiny_model):
    """A distill stage whose splits are all chat `messages` (no `prompt` column): the held-out KL
    used to read r["prompt"] and fail the stage with a KeyError; it is measured before and after."""
    write_jsonl(data_root / "sft_train.jsonl", [{"messages": list(turns_of(r))} for r in task_rows(32)])
    write_jsonl(data_root / "sft_eval.jsonl", [{"messages": list(turns_of(r))} for r in task_rows(8, offset=1000)])
    c = start_server(data_root, "--model-root", str(tiny_model)).client()
    spec = distill_spec(tiny_model, num_samples=2, eval_prompts=4, optim={"learning_rate": 0.005, "max_steps": 2})
    done = c.wait(c.submit(spec).job.id)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error.reason
    before, after = metric_series(c, done.id, "eval/kl_before"), metric_series(c, done.id, "eval/kl_after")
    assert len(before) == len(after) == 1 and before[0] > 0 and after[0] > 0, (before, after)
    assert c.get(done.id).id == done.id  # the server still answers
