"""The JobService over a real server and channel: auth, tenants, and every error code."""

from __future__ import annotations

import threading

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from stillroom.services.client import Client
from stillroom.v1 import job_pb2 as pb
from stillroom.v1 import job_service_pb2 as api

from tests.conftest import READ_ONLY_TOKEN, audit_spec
from tests.service.helpers import code, wait_state

pytestmark = pytest.mark.slow
C = grpc.StatusCode


@pytest.fixture
def server(start_server, data_root):
    # max-running-jobs 0: nothing starts, so queue states are stable for these tests.
    return start_server(data_root, "--max-running-jobs", "0", "--max-queued-per-tenant", "30")


def test_health_needs_no_token_and_is_serving(server):
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.address))
    for service in ("", "stillroom.v1.JobService"):
        assert (
            stub.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
        )


def test_every_rpc_needs_a_valid_token(server, data_root):
    spec = audit_spec(data_root)
    for token in ("", "wrong"):
        c = Client(server.address, token=token)
        assert code(c.submit, spec) == C.UNAUTHENTICATED
        assert code(c.get, "job-x") == C.UNAUTHENTICATED
        assert code(c.watch, "job-x") == C.UNAUTHENTICATED
    bad_scheme = server.client()
    bad_scheme.metadata = (("authorization", "Basic abc"),)
    assert code(bad_scheme.get, "job-x") == C.UNAUTHENTICATED
    # reflection is an RPC like any other
    refl = reflection_pb2_grpc.ServerReflectionStub(grpc.insecure_channel(server.address))
    req = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    assert code(refl.ServerReflectionInfo, req) == C.UNAUTHENTICATED
    authed = refl.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=server.client().metadata
    )
    names = {s.name for s in next(authed).list_services_response.service}
    assert "stillroom.v1.JobService" in names


def test_tenants_see_only_their_own_jobs(server, data_root):
    alice, bob = server.client("alice"), server.client("bob")
    job = alice.submit(audit_spec(data_root), request_id="r1").job
    assert code(bob.get, job.id) == C.NOT_FOUND
    assert code(bob.cancel, job.id) == C.NOT_FOUND
    assert code(lambda: list(bob.events(job.id))) == C.NOT_FOUND
    assert code(bob.artifacts, job.id) == C.NOT_FOUND
    assert job.id not in [j.id for j in bob.list()]
    assert job.id in [j.id for j in alice.list()]
    # the same request_id in another tenant is another job
    assert bob.submit(audit_spec(data_root), request_id="r1").job.id != job.id


def test_read_only_token_cannot_submit_or_cancel(server, data_root):
    job = server.client("alice").submit(audit_spec(data_root)).job
    viewer = server.client(token=READ_ONLY_TOKEN)
    assert viewer.get(job.id).id == job.id
    assert code(viewer.submit, audit_spec(data_root)) == C.PERMISSION_DENIED
    assert code(viewer.cancel, job.id) == C.PERMISSION_DENIED


def test_invalid_argument_carries_field_paths(server, data_root):
    spec = audit_spec(data_root)
    spec.stages.add(name="rl").grpo.group_size = 1
    with pytest.raises(grpc.RpcError) as e:
        server.client().submit(spec)
    assert e.value.code() == C.INVALID_ARGUMENT
    assert "stages[1].grpo.group_size: must be >= 2" in e.value.details()
    bad_request = error_details_pb2.BadRequest()
    status = rpc_status.from_call(e.value)
    assert status.details[0].Unpack(bad_request)
    fields = {v.field: v.description for v in bad_request.field_violations}
    assert fields["stages[1].grpo.group_size"] == "must be >= 2"
    # ValidateJob gives the same answer and queues nothing
    assert code(server.client().validate, spec) == C.INVALID_ARGUMENT
    assert server.client().validate(audit_spec(data_root)).warnings == []


def test_error_codes(server, data_root, tmp_path):
    c = server.client()
    assert code(c.get, "job-doesnotexist") == C.NOT_FOUND
    c.submit(audit_spec(data_root), request_id="dup")
    assert code(c.submit, audit_spec(data_root, min_rows=3), request_id="dup") == C.ALREADY_EXISTS
    outside = audit_spec(data_root)
    outside.data.train.path = "/etc/passwd.jsonl"
    assert code(c.submit, outside) == C.PERMISSION_DENIED
    assert code(c.submit, audit_spec(data_root), request_id="bad id") == C.INVALID_ARGUMENT
    remote_code = audit_spec(data_root)
    remote_code.stages.add(name="rl").grpo.rewards.add(name="os:system")  # reward code runs on the cluster
    assert code(c.submit, remote_code) == C.PERMISSION_DENIED
    assert code(lambda: list(c.list(page_size=-1))) == C.INVALID_ARGUMENT
    assert code(c.stub.ListJobs, api.ListJobsRequest(page_token="garbage"), metadata=c.metadata) == C.INVALID_ARGUMENT
    assert code(lambda: list(c.events("job-x"))) == C.NOT_FOUND


def test_queue_quota_is_resource_exhausted(start_server, data_root, tmp_path):
    server = start_server(data_root, "--max-running-jobs", "0", "--max-queued-per-tenant", "2", home=tmp_path / "q")
    c = server.client()
    c.submit(audit_spec(data_root))
    c.submit(audit_spec(data_root))
    assert code(c.submit, audit_spec(data_root)) == C.RESOURCE_EXHAUSTED
    assert server.client("bob").submit(audit_spec(data_root)).created


def test_oversized_and_malformed_requests(server, data_root):
    c = server.client()
    big = audit_spec(data_root)
    big.display_name = "x" * (17 * 1024 * 1024)
    assert code(c.submit, big) == C.RESOURCE_EXHAUSTED
    raw = c.channel.unary_unary(
        "/stillroom.v1.JobService/SubmitJob", request_serializer=None, response_deserializer=None
    )
    assert code(raw, b"\xff\xff\xff\xff garbage", metadata=c.metadata) == C.INVALID_ARGUMENT


def test_twenty_concurrent_identical_submits_make_one_job(server, data_root):
    spec, results, errors = audit_spec(data_root), [], []

    def submit():
        try:
            results.append(server.client().submit(spec, request_id="same-key", labels={"k": "v"}))
        except grpc.RpcError as e:
            errors.append(e)

    threads = [threading.Thread(target=submit) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len({r.job.id for r in results}) == 1
    assert sum(r.created for r in results) == 1
    assert len([j for j in server.client().list() if j.request_id == "same-key"]) == 1


def test_list_pagination_and_filters(server, data_root):
    c = server.client("bob")
    ids = [c.submit(audit_spec(data_root), labels={"batch": "p", "i": str(i)}).job.id for i in range(5)]
    c.cancel(ids[1])
    assert [j.id for j in c.list(labels={"batch": "p"}, page_size=2)] == ids[::-1]
    assert [j.id for j in c.list(states=[pb.JOB_STATE_CANCELLED])] == [ids[1]]
    assert [j.id for j in c.list(labels={"batch": "p", "i": "3"})] == [ids[3]]


def test_cancel_a_queued_job_is_immediate_and_idempotent(server, data_root):
    c = server.client()
    job = c.submit(audit_spec(data_root)).job
    assert c.cancel(job.id).state == pb.JOB_STATE_CANCELLED
    again = c.cancel(job.id)
    assert again.state == pb.JOB_STATE_CANCELLED and again.last_event_seq == 2
    assert [s.state for s in again.stages] == [pb.STAGE_STATE_CANCELLED]
    assert [e.job_state for e in c.events(job.id)] == [pb.JOB_STATE_QUEUED, pb.JOB_STATE_CANCELLED]
    assert wait_state(c, job.id, pb.JOB_STATE_CANCELLED).end_time.seconds > 0
