"""Property-based fuzzing of SubmitJob/ValidateJob over a real channel: random and malformed specs
never get UNKNOWN or INTERNAL, and the server stays up."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.json_format import ParseDict, ParseError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stillroom.v1 import job_pb2 as pb
from stillroom.v1 import job_service_pb2 as api

pytestmark = pytest.mark.slow
BAD = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["../../etc/passwd", "train.jsonl", "pkg://x/y.gguf", "", "NaN"]),
)
KINDS = ["audit", "sft", "grpo", "distill", "evaluate", "export", "bogus"]
FIELDS = [
    "group_size",
    "loss_type",
    "beta",
    "epsilon",
    "min_rows",
    "max_empty_fraction",
    "lora",
    "optim",
    "rewards",
    "top_k",
    "alpha",
    "mode",
    "warn_only",
    "near_duplicate_threshold",
    "zero_stage",
    "x",
]
stage = st.builds(
    lambda kind, params: {kind: params},
    st.sampled_from(KINDS),
    st.dictionaries(st.sampled_from(FIELDS), scalars, max_size=4),
)
spec_docs = st.fixed_dictionaries(
    {},
    optional={
        "display_name": st.text(max_size=50),
        "teacher": st.fixed_dictionaries({"path": scalars}),
        "data": st.fixed_dictionaries({"train": st.fixed_dictionaries({"path": scalars, "format": scalars})}),
        "stages": st.lists(stage, max_size=4),
        "resources": st.fixed_dictionaries(
            {"trainer": st.dictionaries(st.sampled_from(["replicas", "num_cpus", "num_gpus"]), scalars, max_size=3)}
        ),
        "seed": scalars,
    },
)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, ray_cluster, tokens_file):
    from tests.conftest import ServerProcess, write_jsonl

    root = tmp_path_factory.mktemp("fuzzdata")
    write_jsonl(root / "train.jsonl", [{"prompt": "p", "completion": "c"}])
    server = ServerProcess(
        tmp_path_factory.mktemp("fuzzhome"),
        ray_cluster,
        tokens_file,
        root,
        "--max-running-jobs",
        "0",
        "--max-queued-per-tenant",
        "100000",
    ).start()
    yield server
    server.stop()


def _status(call) -> grpc.StatusCode:
    try:
        call()
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(doc=spec_docs)
def test_random_specs_never_unknown_or_internal(fuzz_server, doc):
    try:
        spec = ParseDict(doc, pb.JobSpec())
    except (ParseError, TypeError, ValueError, AttributeError, OverflowError):
        return  # not representable as a JobSpec: the CLI refuses it before any call
    c = fuzz_server.client()
    assert _status(lambda: c.validate(spec)) not in BAD
    assert _status(lambda: c.submit(spec)) not in BAD


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(payload=st.binary(max_size=300), method=st.sampled_from(["SubmitJob", "ValidateJob", "GetJob", "ListJobs"]))
def test_malformed_bytes_never_unknown_or_internal(fuzz_server, payload, method):
    c = fuzz_server.client()
    raw = c.channel.unary_unary(f"/stillroom.v1.JobService/{method}")
    assert _status(lambda: raw(payload, metadata=c.metadata, timeout=30)) not in BAD


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    job_id=st.text(max_size=40),
    after=st.integers(-(2**62), 2**62),
    size=st.integers(-(2**31), 2**31 - 1),
    token=st.text(max_size=20),
)
def test_random_reads_never_unknown_or_internal(fuzz_server, job_id, after, size, token):
    c = fuzz_server.client()
    calls = [
        lambda: c.get(job_id),
        lambda: c.stub.ListEvents(
            api.ListEventsRequest(job_id=job_id, after_seq=after, page_size=size, page_token=token), metadata=c.metadata
        ),
        lambda: c.stub.ListJobs(api.ListJobsRequest(page_size=size, page_token=token), metadata=c.metadata),
        lambda: c.cancel(job_id),
        lambda: c.artifacts(job_id),
    ]
    for call in calls:
        assert _status(call) not in BAD


def test_server_is_still_serving_after_fuzzing(fuzz_server):
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(fuzz_server.address))
    assert stub.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    assert fuzz_server.proc.poll() is None
