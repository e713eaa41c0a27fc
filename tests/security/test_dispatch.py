"""The dispatcher cannot be wedged and shares the cluster fairly, and a job no cluster can hold is
refused at submit.

- Cancel right after submit, 20 times (a real server and a real Ray cluster): every slot is freed,
  a fresh job starts within seconds, and no supervisor of a cancelled job is alive. Before the fix
  the dispatcher launched the supervisor and only then appended RUNNING, so a cancel in between made
  the job CANCELLED while its supervisor ran, never released, holding its running slot for good.
- Start and cancel are one consistent transition in the store (claim / CANCELLING).
- Fairness between tenants (next_to_start): pure, on a real SQLite store.
- Capacity (services/capacity.py): pure checks, and a real server answering INVALID_ARGUMENT.
"""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from stillroom.actors.runtime.cluster import Placement, check_fits, cluster_capacity, supervisor_name
from stillroom.services.capacity import check_capacity
from stillroom.services.dispatcher import Dispatcher, next_to_start
from stillroom.services.limits import Limits, TenantLimits
from stillroom.services.recipes import parse
from stillroom.services.store import TERMINAL, Store
from stillroom.services.violations import Violations
from stillroom.v1 import job_pb2 as pb

from tests.conftest import audit_spec
from tests.service.helpers import slow_spec, wait_for, wait_state

C = grpc.StatusCode
STARTED = (pb.JOB_STATE_RUNNING, pb.JOB_STATE_CANCELLING, *TERMINAL)
# The test cluster (tests/conftest.py ray_cluster): a head with 2 CPUs and node_a, a worker with 1 CPU and node_b.
CAPACITY = {"CPU": 3.0, "max_node_CPU": 2.0, "node_a": 4.0, "max_node_node_a": 4.0}
CAPACITY |= {"node_b": 4.0, "max_node_node_b": 4.0}


def _healthy(address: str) -> bool:
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
    return stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING


def _supervisors(ray_client) -> set[str]:
    return {e["name"] for e in ray_client.util.list_named_actors(all_namespaces=True)}


@pytest.mark.slow
def test_cancel_right_after_submit_20_times_frees_every_slot(start_server, data_root, ray_client):
    server = start_server(data_root)  # --max-running-jobs 2, the default
    alice = server.client("alice")
    spec = audit_spec(data_root)
    cancelled = []
    for i in range(20):
        job = alice.submit(spec, request_id=f"race-{i}").job
        time.sleep(i * 0.05)  # at once, then later and later: across the dispatcher's start of the job
        alice.cancel(job.id)
        cancelled.append(job.id)
    for job_id in cancelled:
        # a job the dispatcher had claimed is CANCELLING, and ends CANCELLED (or done, if it finished first)
        ended = wait_state(alice, job_id, TERMINAL, timeout=60)
        assert ended.state in (pb.JOB_STATE_CANCELLED, pb.JOB_STATE_SUCCEEDED), ended
    fresh = alice.submit(spec, request_id="fresh").job
    assert wait_state(alice, fresh.id, STARTED, timeout=10).state in STARTED
    names = {supervisor_name(j) for j in cancelled}
    assert wait_for(lambda: not (names & _supervisors(ray_client)), timeout=10)
    assert wait_state(alice, fresh.id, pb.JOB_STATE_SUCCEEDED, timeout=60).state == pb.JOB_STATE_SUCCEEDED
    # the server still answers, for every tenant
    assert _healthy(server.address)
    assert list(server.client("bob").list()) == []


@pytest.mark.slow
def test_a_tenant_at_its_running_limit_waits_while_another_starts(start_server, data_root, tmp_path):
    limits = tmp_path / "limits.yaml"
    limits.write_text("tenants:\n  alice: {max_running_jobs: 1}\n")
    server = start_server(data_root, "--max-running-jobs", "2", "--limits", str(limits))
    alice, bob = server.client("alice"), server.client("bob")
    spec = slow_spec(data_root, stages=30, rows=10_000)  # many short stages: long to run, quick to cancel
    first, second = (alice.submit(spec, request_id=f"a{i}").job for i in range(2))
    assert wait_state(alice, first.id, pb.JOB_STATE_RUNNING, timeout=60)
    theirs = bob.submit(spec).job  # submitted last, started before alice's second: a slot is free for bob
    assert wait_state(bob, theirs.id, STARTED, timeout=15)
    assert alice.get(second.id).state == pb.JOB_STATE_QUEUED
    for client, job in ((alice, first), (alice, second), (bob, theirs)):
        client.cancel(job.id)
        assert wait_state(client, job.id, TERMINAL, timeout=60)


# -- start and cancel, one transition in the store ----------------------------------------------


def _job(store: Store, job_id: str, tenant: str = "alice") -> None:
    store.create_job(
        job_id=job_id,
        tenant=tenant,
        request_id=job_id,
        request_hash="h",
        spec=pb.JobSpec(display_name=job_id),
        labels={},
        stages=[("audit", "audit")],
    )


def _state(value: int) -> pb.Event:
    return pb.Event(type=pb.EVENT_TYPE_JOB_STATE, job_state=value, message="cancel requested")


def test_a_cancelled_job_cannot_be_claimed(tmp_path):
    store = Store(tmp_path / "jobs.db")
    _job(store, "j1")
    assert store.append_events("j1", [_state(pb.JOB_STATE_CANCELLED)])
    assert store.claim("j1", "started") is False  # the dispatcher launches nothing
    assert store.get_job("j1").state == pb.JOB_STATE_CANCELLED


def test_a_cancel_that_saw_the_job_queued_cannot_end_a_claimed_one(tmp_path):
    """The cancel read QUEUED, the dispatcher claimed it, then the cancel's CANCELLED arrives: it is
    dropped (the job has a supervisor to stop), and the caller asks for CANCELLING instead."""
    store = Store(tmp_path / "jobs.db")
    _job(store, "j1")
    assert store.claim("j1", "started") is True
    assert store.claim("j1", "started") is False  # a job is started once
    assert store.append_events("j1", [_state(pb.JOB_STATE_CANCELLED)]) == []
    assert store.get_job("j1").state == pb.JOB_STATE_RUNNING
    assert store.append_events("j1", [_state(pb.JOB_STATE_CANCELLING)])
    assert store.get_job("j1").state == pb.JOB_STATE_CANCELLING


@pytest.mark.slow
def test_a_job_that_cannot_launch_fails_with_the_reason_and_frees_its_slot(tmp_path, ray_client):
    store = Store(tmp_path / "jobs.db")
    artifacts = tmp_path / "artifacts"
    artifacts.write_text("a file where the artifact root should be: no job directory can be made")
    dispatcher = Dispatcher(store, artifacts, max_running=1)
    _job(store, "j1")
    _job(store, "j2")
    for job_id in ("j1", "j2"):  # one slot: j2 starts only if j1's failed launch gave it back
        dispatcher.tick()
        job = store.get_job(job_id)
        assert job.state == pb.JOB_STATE_FAILED
        assert job.error.reason.startswith("the job could not start: ")
    assert dispatcher._running == {}


# -- fairness between tenants ---------------------------------------------------------------------


def test_a_tenant_at_its_limit_waits_and_the_others_start(tmp_path):
    store = Store(tmp_path / "jobs.db")
    for job_id, tenant in [("a1", "alice"), ("a2", "alice"), ("a3", "alice"), ("b1", "bob"), ("c1", "carol")]:
        _job(store, job_id, tenant)
    limits = Limits(tenants={"alice": TenantLimits(max_running_jobs=1)})
    queued = store.queued()
    assert queued == [("a1", "alice"), ("a2", "alice"), ("a3", "alice"), ("b1", "bob"), ("c1", "carol")]
    # alice holds her one slot: her jobs wait, whatever the free slots
    assert next_to_start(queued, {"alice": 1}, limits, 10) == ["b1", "c1"]
    # nobody runs: submission order among tenants with as many running, one of alice's only
    assert next_to_start(queued, {}, limits, 10) == ["a1", "b1", "c1"]
    # the global limit still caps the total
    assert next_to_start(queued, {}, limits, 2) == ["a1", "b1"]
    assert next_to_start(queued, {}, limits, 0) == []


def test_the_tenant_with_fewest_running_jobs_goes_first(tmp_path):
    store = Store(tmp_path / "jobs.db")
    for job_id, tenant in [("a1", "alice"), ("a2", "alice"), ("b1", "bob"), ("b2", "bob"), ("c1", "carol")]:
        _job(store, job_id, tenant)
    limits = Limits(default=TenantLimits(max_running_jobs=3))
    assert next_to_start(store.queued(), {"alice": 2, "bob": 1}, limits, 1) == ["c1"]
    assert next_to_start(store.queued(), {"alice": 2, "bob": 1}, limits, 3) == ["c1", "b1", "a1"]
    assert store.claim("c1", "started")
    assert [j for j, _ in store.queued()] == ["a1", "a2", "b1", "b2"]
    assert store.tenant_states(["c1", "a1"]) == {
        "c1": ("carol", pb.JOB_STATE_RUNNING),
        "a1": ("alice", pb.JOB_STATE_QUEUED),
    }


# -- capacity ------------------------------------------------------------------------------------


def _spec(stages: list[dict], resources: dict) -> pb.JobSpec:
    return parse({"stages": stages, "resources": resources})


def _check(spec: pb.JobSpec, capacity: dict = CAPACITY) -> list[tuple[str, str]]:
    v = Violations()
    check_capacity(spec, capacity, v)
    return v.items


def test_a_replica_bigger_than_any_node_is_named_with_its_field():
    spec = _spec([{"sft": {}}], {"trainer": {"num_cpus": 64}})
    assert _check(spec) == [("resources.trainer.num_cpus", "64 CPUs per replica, but the largest node has 2")]
    gpu = _spec([{"grpo": {}}], {"generator": {"num_gpus": 1}})
    assert _check(gpu) == [("resources.generator.num_gpus", "1 GPU per replica, but no node of the cluster has a GPU")]
    custom = _spec([{"evaluate": {}}], {"scorer": {"custom": {"tpu": 1}, "num_cpus": 0.5}})
    assert _check(custom) == [
        ("resources.scorer.custom['tpu']", "1 of 'tpu' per replica, but no node of the cluster has 'tpu'")
    ]


def test_replicas_that_fit_alone_but_not_together_name_the_biggest_role():
    spec = _spec([{"grpo": {}}], {"trainer": {"replicas": 3}})  # 3 trainers + 1 generator + 1 scorer: 5 CPUs
    [(path, message)] = _check(spec)
    assert path == "resources.trainer.replicas"
    assert message == (
        "stages[0] (grpo) runs generator 1 x 1, scorer 1 x 1, trainer 3 x 1: 5 CPUs at once, but the cluster has 3"
    )


def test_what_fits_or_is_not_used_or_unknown_passes():
    assert _check(_spec([{"sft": {}}], {"trainer": {"num_cpus": 2}})) == []
    assert _check(_spec([{"index": {}}], {})) == []  # the retriever's default 0.25 CPU
    assert _check(_spec([{"sft": {}}], {"trainer": {"custom": {"node_b": 4}}})) == []
    # no stage of the job starts a trainer: what it would ask for does not matter
    assert _check(_spec([{"audit": {}}], {"trainer": {"num_cpus": 1000}})) == []
    # the cluster's resources are unknown: checked at run time instead (cluster.check_fits)
    assert _check(_spec([{"sft": {}}], {"trainer": {"num_cpus": 1000}}), {}) == []


@pytest.mark.slow
def test_a_job_no_cluster_can_hold_is_refused_at_submit(start_server, data_root, tiny_model):
    server = start_server(data_root, "--model-root", str(tiny_model))
    recipe = {
        "teacher": {"path": str(tiny_model)},
        "data": {"train": {"path": str(data_root / "train.jsonl")}},
        "stages": [{"sft": {"optim": {"max_steps": 1}}}],
        "resources": {"trainer": {"num_cpus": 1000}},
    }
    alice = server.client("alice")
    with pytest.raises(grpc.RpcError) as e:
        alice.submit(parse(recipe))
    assert e.value.code() == C.INVALID_ARGUMENT
    assert "resources.trainer.num_cpus: 1000 CPUs per replica, but the largest node has 2" in e.value.details()
    assert list(alice.list()) == []  # nothing was queued
    recipe["resources"] = {"trainer": {"num_cpus": 1}}
    assert server.client("alice").validate(parse(recipe)) is not None  # the same job, sized to fit: accepted
    assert _healthy(server.address)


@pytest.mark.slow
def test_the_cluster_as_checks_see_it_and_a_replica_no_node_holds_fails_at_once(ray_client):
    assert {k: v for k, v in cluster_capacity().items() if k in CAPACITY} == CAPACITY
    with pytest.raises(RuntimeError, match=r"resources\.trainer: one replica asks for \{'CPU': 64"):
        check_fits({"trainer": Placement(num_cpus=64)})
    with pytest.raises(RuntimeError, match=r"4 CPU wanted, 3 in the cluster \(generator: 2 x \{'CPU': 2"):
        check_fits({"generator": Placement(replicas=2, num_cpus=2)})
    check_fits({"trainer": Placement(num_cpus=2), "scorer": Placement(custom=(("node_b", 1.0),))})
