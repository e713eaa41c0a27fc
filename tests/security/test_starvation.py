"""One tenant cannot starve the others of the server: open WatchJob streams are coroutines on the
aio server (not threads), each tenant's streams are capped on their own, and answers that carry
thousands of violations or absurd page tokens still come back with their status and fields.

Real `stillroom serve` processes and real channels; nothing ever runs a job here (--max-running-jobs 0).
"""

from __future__ import annotations

import base64
import statistics
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from stillroom.v1 import job_service_pb2 as api
from stillroom.v1 import job_service_pb2_grpc as api_grpc

from tests.conftest import TOKENS, audit_spec
from tests.service.helpers import code

pytestmark = pytest.mark.slow
C = grpc.StatusCode


def _server(start_server, data_root, tmp_path, **limits):
    path = tmp_path / "limits.yaml"
    path.write_text("default:\n" + "".join(f"  {k}: {v}\n" for k, v in limits.items()))
    return start_server(data_root, "--max-running-jobs", "0", "--limits", str(path))


def _open_streams(address: str, token: str, job_id: str, n: int, channels: int = 4) -> list:
    """n WatchJob streams, each past its first event (so open on the server), over a few channels."""
    chans = [grpc.insecure_channel(address) for _ in range(channels)]
    streams = []
    for i in range(n):
        stub = api_grpc.JobServiceStub(chans[i % channels])
        call = stub.WatchJob(api.WatchJobRequest(job_id=job_id), metadata=(("authorization", f"Bearer {token}"),))
        next(call)  # the QUEUED event: the stream is open
        streams.append(call)
    return streams


def _healthy(address: str) -> bool:
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
    return stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING


def test_one_tenant_holding_200_streams_leaves_another_answering(start_server, data_root, tmp_path):
    server = _server(start_server, data_root, tmp_path, max_watch_streams=250)
    job = server.client("bob").submit(audit_spec(data_root)).job  # stays QUEUED: its streams stay open
    streams = _open_streams(server.address, TOKENS["bob"], job.id, 200)
    alice = server.client("alice")
    mine = alice.submit(audit_spec(data_root)).job
    times = []
    for _ in range(20):
        t = time.perf_counter()
        assert [j.id for j in alice.list()] == [mine.id]
        times.append(time.perf_counter() - t)
    assert max(times) < 1.0, f"ListJobs took up to {max(times):.2f} s (median {statistics.median(times):.3f} s)"
    assert _healthy(server.address)
    # the streams still deliver: a new event reaches every one of them
    server.client("bob").cancel(job.id)
    assert all(next(s).event.job_state for s in streams[:5])
    for s in streams:
        s.cancel()


def test_watch_streams_are_capped_per_tenant(start_server, data_root, tmp_path):
    server = _server(start_server, data_root, tmp_path, max_watch_streams=3)
    bob_job = server.client("bob").submit(audit_spec(data_root)).job
    streams = _open_streams(server.address, TOKENS["bob"], bob_job.id, 3, channels=1)
    with pytest.raises(grpc.RpcError) as e:
        list(server.client("bob").watch(bob_job.id))
    assert e.value.code() == C.RESOURCE_EXHAUSTED
    assert "max_watch_streams: 3" in e.value.details() and "'bob'" in e.value.details()
    # another tenant is under its own limit
    alice_job = server.client("alice").submit(audit_spec(data_root)).job
    (alice_stream,) = _open_streams(server.address, TOKENS["alice"], alice_job.id, 1)
    # a closed stream gives its slot back
    streams[0].cancel()
    deadline = time.monotonic() + 10
    while True:
        try:
            (again,) = _open_streams(server.address, TOKENS["bob"], bob_job.id, 1)
            break
        except grpc.RpcError as err:
            assert err.code() == C.RESOURCE_EXHAUSTED and time.monotonic() < deadline
            time.sleep(0.2)
    for s in [*streams[1:], alice_stream, again]:
        s.cancel()
    assert _healthy(server.address)


def test_page_tokens_past_sqlite_integers_are_invalid_argument(start_server, data_root, tmp_path):
    server = _server(start_server, data_root, tmp_path, max_queued_jobs=5)
    alice = server.client("alice")
    job = alice.submit(audit_spec(data_root)).job
    huge = base64.urlsafe_b64encode(str(10**30).encode()).decode()
    for call in (
        lambda: alice.stub.ListJobs(api.ListJobsRequest(page_token=huge), metadata=alice.metadata),
        lambda: alice.stub.ListEvents(api.ListEventsRequest(job_id=job.id, page_token=huge), metadata=alice.metadata),
    ):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == C.INVALID_ARGUMENT
        assert "page_token" in e.value.details()
    assert _healthy(server.address)


def test_thousands_of_violations_answer_with_their_first_fields(start_server, data_root, tmp_path):
    server = _server(start_server, data_root, tmp_path, max_queued_jobs=5)
    alice = server.client("alice")
    labels = {f"-bad-{i}-": "x" for i in range(2000)}  # every key breaks the label rule
    with pytest.raises(grpc.RpcError) as e:
        alice.submit(audit_spec(data_root), labels=labels)
    assert e.value.code() == C.INVALID_ARGUMENT  # not RESOURCE_EXHAUSTED "metadata size exceeds hard limit"
    assert "labels" in e.value.details() and "more violations" in e.value.details()
    status = rpc_status.from_call(e.value)
    bad = error_details_pb2.BadRequest()
    status.details[0].Unpack(bad)
    fields = [v.field for v in bad.field_violations]
    assert fields[0] == "labels" and all(f.startswith("labels['-bad-") for f in fields[1:])
    assert 10 < len(fields) < 2000
    assert code(alice.validate, audit_spec(data_root)) == C.OK
    assert _healthy(server.address)
