"""Runs that survive failures: kill -9 of the server, restarts, lost supervisors, graceful stop."""

from __future__ import annotations

import sqlite3
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from stillroom.actors.runtime.cluster import supervisor_name
from stillroom.v1 import job_pb2 as pb
from stillroom.v1 import job_service_pb2 as api

from tests.conftest import audit_spec
from tests.service.helpers import alive_actors, slow_spec, wait_for, wait_state

pytestmark = pytest.mark.slow


def test_kill9_loses_nothing_and_reattaches_to_running_jobs(start_server, data_root, tmp_path, ray_client):
    port, home = None, tmp_path / "home"
    server = start_server(data_root, "--max-running-jobs", "1", home=home)
    port = server.port
    c = server.client()
    running = c.submit(slow_spec(data_root, stages=3)).job
    wait_for(lambda: c.get(running.id).stages[0].state == pb.STAGE_STATE_RUNNING)
    queued = [c.submit(audit_spec(data_root), request_id=f"q{i}").job for i in range(3)]
    seen = {j.id: [e.SerializeToString() for e in c.events(j.id)] for j in [running, *queued]}
    server.kill9()

    restarted = start_server(data_root, "--max-running-jobs", "1", home=home, port=port)
    c = restarted.client()
    for job_id, events in seen.items():  # every acknowledged job and event survived, unchanged
        assert [e.SerializeToString() for e in c.events(job_id)][: len(events)] == events
    assert c.submit(audit_spec(data_root), request_id="q0").job.id == queued[0].id  # still idempotent
    done = c.wait(running.id)  # re-attached to the supervisor that outlived the server
    assert done.state == pb.JOB_STATE_SUCCEEDED
    seqs = [e.seq for e in c.events(running.id)]
    assert seqs == list(range(1, len(seqs) + 1))
    stage_events = [(e.stage, e.stage_state) for e in c.events(running.id) if e.type == pb.EVENT_TYPE_STAGE_STATE]
    assert len(stage_events) == len(set(stage_events)) == 6  # each stage RUNNING then SUCCEEDED, once
    for j in queued:  # queued jobs then ran in submission order
        assert c.wait(j.id).state == pb.JOB_STATE_SUCCEEDED
    starts = [c.get(j.id).start_time.ToNanoseconds() for j in queued]
    assert starts == sorted(starts)


def test_watch_survives_a_server_restart(start_server, data_root, tmp_path):
    home = tmp_path / "home"
    server = start_server(data_root, home=home)
    c = server.client()
    job = c.submit(slow_spec(data_root, stages=3)).job
    seen: list[int] = []
    watcher = threading.Thread(target=lambda: seen.extend(e.seq for e in c.watch(job.id, reconnect_s=120)))
    watcher.start()
    wait_for(lambda: len(seen) >= 3)
    server.kill9()
    start_server(data_root, home=home, port=server.port)
    watcher.join(180)
    assert not watcher.is_alive()
    assert seen == list(range(1, len(seen) + 1))  # nothing missed, nothing twice
    assert c.get(job.id).state == pb.JOB_STATE_SUCCEEDED


def test_a_supervisor_lost_while_the_server_was_down_is_started_again(start_server, data_root, tmp_path, ray_client):
    home = tmp_path / "home"
    server = start_server(data_root, "--retry-backoff-s", "1", home=home)
    c = server.client()
    job = c.submit(slow_spec(data_root, stages=3)).job
    wait_for(lambda: c.get(job.id).stages[0].state == pb.STAGE_STATE_RUNNING)
    server.kill9()
    ray_client.kill(ray_client.get_actor(supervisor_name(job.id), namespace="stillroom"))
    c = start_server(data_root, "--retry-backoff-s", "1", home=home, port=server.port).client()
    done = wait_state(c, job.id, pb.JOB_STATE_SUCCEEDED, timeout=180)
    notes = [e.message for e in c.events(job.id) if e.type == pb.EVENT_TYPE_LOG]
    assert any("supervisor was lost while the control service was down" in m and "attempt 1 of 2" in m for m in notes)
    assert [s.state for s in done.stages] == [pb.STAGE_STATE_SUCCEEDED] * 3


def test_supervisor_death_past_the_retry_budget_fails_the_job(start_server, data_root, ray_client):
    c = start_server(data_root).client()
    spec = slow_spec(data_root, stages=3)
    spec.max_retries = 0
    job = c.submit(spec).job
    wait_for(lambda: c.get(job.id).stages[0].state == pb.STAGE_STATE_RUNNING)
    ray_client.kill(ray_client.get_actor(supervisor_name(job.id), namespace="stillroom"))
    done = wait_state(c, job.id, pb.JOB_STATE_FAILED, timeout=60)
    assert done.error.reason.startswith("retries exhausted (0): the job's supervisor actor died")
    assert not alive_actors(ray_client, job.id)


def test_sigterm_finishes_calls_tells_watchers_and_exits_cleanly(start_server, data_root):
    server = start_server(data_root)
    c = server.client()
    job = c.submit(slow_spec(data_root, stages=3)).job
    wait_for(lambda: c.get(job.id).stages[0].state == pb.STAGE_STATE_RUNNING)
    stream = c.stub.WatchJob(api.WatchJobRequest(job_id=job.id), metadata=c.metadata)
    got = [next(stream).event.seq for _ in range(3)]
    assert server.terminate() == 0
    with pytest.raises(grpc.RpcError) as e:
        for r in stream:
            got.append(r.event.seq)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "resume the watch with after_seq=" in e.value.details()
    assert got == list(range(1, len(got) + 1))


def test_health_is_not_serving_while_the_store_is_unusable(start_server, data_root, tmp_path):
    home = tmp_path / "home"
    server = start_server(data_root, home=home)
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.address))

    def status():
        return health.Check(health_pb2.HealthCheckRequest(service="stillroom.v1.JobService")).status

    blocker = sqlite3.connect(home / "jobs.db", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another process holds the database: no write can happen
    try:
        assert wait_for(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=30)
        with pytest.raises(grpc.RpcError) as e:
            server.client().submit(audit_spec(data_root))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert wait_for(lambda: status() == health_pb2.HealthCheckResponse.SERVING, timeout=30)
