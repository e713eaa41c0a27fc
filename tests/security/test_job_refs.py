"""job://<job id>/<path>: a tenant names a model of one of its own earlier jobs (its tuned teacher),
while the artifact root stays unreadable as data: another tenant's job is NOT_FOUND, and a path that
climbs out of the named job's directory is refused like any path outside the roots."""

from __future__ import annotations

import grpc
import pytest
from stillroom.v1 import job_pb2 as pb

from tests.conftest import audit_spec
from tests.security.test_paths import NOT_THERE, refused, still_answers
from tests.service.helpers import wait_state

pytestmark = pytest.mark.slow
C = grpc.StatusCode


def test_a_tenant_names_its_own_jobs_files_and_no_one_elses(start_server, data_root):
    server = start_server(data_root)
    alice, bob = server.client("alice"), server.client("bob")
    mine = alice.submit(audit_spec(data_root)).job
    theirs = bob.submit(audit_spec(data_root)).job
    for c, job in ((alice, mine), (bob, theirs)):
        assert wait_state(c, job.id, pb.JOB_STATE_SUCCEEDED, 180)
    report = next(a.name for a in alice.artifacts(mine.id) if a.uri.startswith("file://"))

    spec = audit_spec(data_root)
    spec.teacher.path = f"job://{mine.id}/{report}"  # granted: judged as a model (and it is not one)
    e = refused(alice.validate, spec)
    assert e.code() == C.INVALID_ARGUMENT and "neither a model directory nor a .gguf file" in e.details()

    spec.teacher.path = f"job://{theirs.id}/{report}"  # bob's job: as if it did not exist
    e = refused(alice.validate, spec)
    assert e.code() == C.NOT_FOUND and e.details() == f"teacher.path: job {theirs.id!r} not found"

    spec.teacher.path = f"job://{mine.id}/../{theirs.id}/{report}"  # out of the job's directory
    e = refused(alice.validate, spec)
    assert e.code() == C.PERMISSION_DENIED and e.details().endswith(NOT_THERE)

    spec.teacher.path = f"job://{mine.id}/no-such-model"
    e = refused(alice.validate, spec)
    assert e.code() == C.PERMISSION_DENIED and e.details().endswith(NOT_THERE)
    still_answers(server)
