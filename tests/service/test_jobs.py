"""Jobs running end to end on real Ray: the audit stage, watching, cancelling in every state."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from urllib.parse import urlparse

import grpc
import pytest
from stillroom.v1 import job_pb2 as pb

from tests.conftest import audit_spec, write_jsonl
from tests.service.helpers import alive_actors, code, slow_spec, wait_for, wait_state

pytestmark = pytest.mark.slow


@pytest.fixture
def server(start_server, data_root, tiny_tokenizer):
    return start_server(data_root, "--model-root", str(tiny_tokenizer))


def test_audit_job_end_to_end(server, data_root, tiny_tokenizer, ray_client):
    c = server.client()
    spec = audit_spec(data_root, label_fields=["completion"])
    spec.teacher.path = str(tiny_tokenizer)
    job = c.submit(spec, labels={"suite": "e2e"}).job
    events = list(c.watch(job.id))
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[-1].job_state == pb.JOB_STATE_SUCCEEDED
    done = c.get(job.id)
    (stage,) = done.stages
    assert stage.state == pb.STAGE_STATE_SUCCEEDED and stage.progress.done == stage.progress.total == 2
    assert stage.metrics["train/rows"] == 20 and stage.metrics["eval/rows"] == 5
    artifacts = {a.name: a for a in c.artifacts(job.id)}
    assert {"audit/report.json", "audit/report.md", "report/report.md"} <= set(artifacts)
    for a in artifacts.values():
        data = Path(urlparse(a.uri).path).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (a.size_bytes, a.sha256)
    report = json.loads(Path(urlparse(artifacts["audit/report.json"].uri).path).read_text())
    assert report["token_unit"] == "tokens"  # counted with the teacher's tokenizer
    assert report["splits"]["train"]["labels"]["completion"]["answer 0"] == 1
    assert wait_for(lambda: not alive_actors(ray_client, job.id))


def test_failed_audit_names_stage_and_reason(server, data_root):
    write_jsonl(data_root / "dups.jsonl", [{"prompt": "same", "completion": "x"}] * 4)
    spec = audit_spec(data_root)
    spec.stages[0].audit.warn_only = False
    spec.data.train.path = str(data_root / "dups.jsonl")
    job = server.client().submit(spec).job
    done = server.client().wait(job.id)
    assert done.state == pb.JOB_STATE_FAILED
    assert done.error.stage == "audit"
    assert done.error.reason.startswith("data audit failed: train duplicate_fraction 0.750 > max 0.05")
    assert done.stages[0].state == pb.STAGE_STATE_FAILED


def test_watch_resumes_from_any_sequence_number(server, data_root):
    c = server.client()
    job = c.submit(audit_spec(data_root)).job
    full = list(c.watch(job.id))
    for k in (0, 3, len(full) - 1, len(full)):
        assert [e.seq for e in c.watch(job.id, after_seq=k)] == [e.seq for e in full[k:]]
    assert [e.SerializeToString() for e in c.watch(job.id, after_seq=2)] == [e.SerializeToString() for e in full[2:]]
    paged = list(c.events(job.id, page_size=2))
    assert [e.seq for e in paged] == [e.seq for e in full]
    assert code(c.watch, job.id, after_seq=-1) == grpc.StatusCode.INVALID_ARGUMENT


def test_cancel_in_every_state(server, data_root, ray_client):
    c = server.client()
    # RUNNING -> CANCELLING -> CANCELLED, and no actor of the job is left
    job = c.submit(slow_spec(data_root)).job
    wait_for(lambda: c.get(job.id).stages[0].state == pb.STAGE_STATE_RUNNING)
    assert alive_actors(ray_client, job.id)
    first = c.cancel(job.id)
    assert first.state in (pb.JOB_STATE_CANCELLING, pb.JOB_STATE_CANCELLED)
    assert c.cancel(job.id).state in (pb.JOB_STATE_CANCELLING, pb.JOB_STATE_CANCELLED)  # idempotent
    done = wait_state(c, job.id, pb.JOB_STATE_CANCELLED, timeout=60)
    assert [s.state for s in done.stages] == [pb.STAGE_STATE_CANCELLED] * 4
    states = [e.job_state for e in c.events(job.id) if e.type == pb.EVENT_TYPE_JOB_STATE]
    assert states == [pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING, pb.JOB_STATE_CANCELLING, pb.JOB_STATE_CANCELLED]
    assert wait_for(lambda: not alive_actors(ray_client, job.id), timeout=30)
    # CANCELLED: no change
    assert c.cancel(job.id).last_event_seq == done.last_event_seq
    # SUCCEEDED and FAILED: nothing to cancel
    ok = c.wait(c.submit(audit_spec(data_root)).job.id)
    assert ok.state == pb.JOB_STATE_SUCCEEDED
    assert code(c.cancel, ok.id) == grpc.StatusCode.FAILED_PRECONDITION
