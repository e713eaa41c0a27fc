"""The SQLite job store: idempotent creation, events as the source of truth, paging, durability."""

from __future__ import annotations

import pytest
from stillroom.services.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from stillroom.services.store import Store
from stillroom.v1 import job_pb2 as pb


def make(store: Store, job_id: str, tenant: str = "a", request_id: str | None = None, h: str = "h", **kw):
    return store.create_job(
        job_id=job_id,
        tenant=tenant,
        request_id=request_id or job_id,
        request_hash=h,
        spec=pb.JobSpec(display_name=job_id),
        labels=kw.pop("labels", {}),
        stages=[("audit", "audit"), ("sft", "sft")],
        **kw,
    )


def state(e: int) -> pb.Event:
    return pb.Event(type=pb.EVENT_TYPE_JOB_STATE, job_state=e)


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "jobs.db")
    yield s
    s.close()


def test_idempotent_on_request_id(store):
    job, created = make(store, "j1", request_id="r")
    again, created2 = make(store, "j2", request_id="r")
    assert (created, created2) == (True, False) and again.id == "j1"
    with pytest.raises(AlreadyExists, match="request_id 'r' was already used for job j1"):
        make(store, "j3", request_id="r", h="other")
    _, created3 = make(store, "j4", tenant="b", request_id="r")  # request ids are per tenant
    assert created3


def test_events_drive_state_and_seq_has_no_gaps(store):
    make(store, "j1")
    store.append_events(
        "j1",
        [
            state(pb.JOB_STATE_RUNNING),
            pb.Event(type=pb.EVENT_TYPE_STAGE_STATE, stage="audit", stage_state=pb.STAGE_STATE_RUNNING),
            pb.Event(type=pb.EVENT_TYPE_PROGRESS, stage="audit", progress=pb.Progress(done=3, total=4, unit="rows")),
            pb.Event(type=pb.EVENT_TYPE_METRICS, stage="audit", metrics={"x": 1.0}),
            pb.Event(type=pb.EVENT_TYPE_METRICS, stage="audit", metrics={"y": 2.0}),
            pb.Event(
                type=pb.EVENT_TYPE_ARTIFACT, stage="audit", artifact=pb.Artifact(name="audit/r.json", size_bytes=5)
            ),
            pb.Event(type=pb.EVENT_TYPE_STAGE_STATE, stage="audit", stage_state=pb.STAGE_STATE_FAILED, message="bad"),
            pb.Event(type=pb.EVENT_TYPE_JOB_STATE, job_state=pb.JOB_STATE_FAILED, stage="audit", message="bad data"),
        ],
        cursor=8,
    )
    job = store.get_job("j1")
    assert job.state == pb.JOB_STATE_FAILED
    assert (job.error.stage, job.error.reason) == ("audit", "bad data")
    audit, sft = job.stages
    assert (audit.state, audit.error, audit.progress.done, audit.progress.total) == (pb.STAGE_STATE_FAILED, "bad", 3, 4)
    assert dict(audit.metrics) == {"x": 1.0, "y": 2.0}
    assert sft.state == pb.STAGE_STATE_CANCELLED  # never ran
    assert [e.seq for e in store.events("j1")] == list(range(1, 10))
    assert job.last_event_seq == 9
    assert [a.name for a in store.artifacts("j1")] == ["audit/r.json"]
    assert store.jobs_in([pb.JOB_STATE_FAILED]) == [("j1", 8)]


def test_impossible_transitions_are_dropped(store):
    make(store, "j1")
    store.append_events("j1", [state(pb.JOB_STATE_CANCELLED)])
    dropped = store.append_events("j1", [state(pb.JOB_STATE_FAILED), state(pb.JOB_STATE_RUNNING)])
    assert dropped == [] and store.get_job("j1").state == pb.JOB_STATE_CANCELLED
    assert [e.job_state for e in store.events("j1")] == [pb.JOB_STATE_QUEUED, pb.JOB_STATE_CANCELLED]


def test_tenants_are_isolated(store):
    make(store, "j1", tenant="a")
    with pytest.raises(NotFound):
        store.get_job("j1", tenant="b")
    with pytest.raises(NotFound):
        store.events("j1", tenant="b")
    assert store.list_jobs("b")[0] == []


def test_list_pages_filters_and_labels(store):
    for i in range(5):
        make(store, f"j{i}", labels={"team": "x" if i % 2 else "y", "n": str(i)})
    store.append_events("j3", [state(pb.JOB_STATE_RUNNING)])
    page1, token = store.list_jobs("a", page_size=2)
    page2, token2 = store.list_jobs("a", page_size=2, page_token=token)
    page3, token3 = store.list_jobs("a", page_size=2, page_token=token2)
    assert [j.id for j in page1 + page2 + page3] == ["j4", "j3", "j2", "j1", "j0"] and token3 == ""
    assert [j.id for j in store.list_jobs("a", labels={"team": "x"})[0]] == ["j3", "j1"]
    assert [j.id for j in store.list_jobs("a", states=[pb.JOB_STATE_RUNNING])[0]] == ["j3"]
    assert [j.id for j in store.list_jobs("a", labels={"team": "x", "n": "1"})[0]] == ["j1"]
    with pytest.raises(InvalidArgument, match="page_token"):
        store.list_jobs("a", page_token="not-a-token")


def test_queue_quota_per_tenant(store):
    make(store, "j1", max_queued=2)
    make(store, "j2", max_queued=2)
    with pytest.raises(ResourceExhausted, match="already has 2 queued jobs"):
        make(store, "j3", max_queued=2)
    make(store, "j4", tenant="b", max_queued=2)


def test_reopen_keeps_everything(tmp_path):
    s = Store(tmp_path / "jobs.db")
    make(s, "j1")
    s.append_events("j1", [state(pb.JOB_STATE_RUNNING)], cursor=3)
    before = (s.get_job("j1"), s.events("j1"))
    s.close()
    s2 = Store(tmp_path / "jobs.db")
    assert (s2.get_job("j1"), s2.events("j1")) == before
    assert s2.jobs_in([pb.JOB_STATE_RUNNING]) == [("j1", 3)]
    assert s2._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
