"""A trainer rank killed in the loops that are not the generate -> score -> train loop (sft,
on-policy distillation): the group restarts from its newest checkpoint and the job still
succeeds, every step trained, the death reported as a warning event."""

from __future__ import annotations

import pytest
from stillroom.v1 import job_pb2 as pb

from tests.service.helpers import metric_series, wait_for
from tests.service.test_stages import distill_spec, sft_spec

ENDED = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)

pytestmark = pytest.mark.slow


def _kill_trainer_at(ray_client, c, job_id: str, stage: int, step: int) -> None:
    """SIGKILL trainer rank 0 of the job once stage `stage` has done `step` steps."""
    from stillroom.actors.runtime.cluster import NAMESPACE, actor_name

    wait_for(lambda: (j := c.get(job_id)).stages[stage].progress.done >= step or j.state in ENDED, 300)
    assert c.get(job_id).state == pb.JOB_STATE_RUNNING, "the job ended before the kill"
    ray_client.kill(ray_client.get_actor(actor_name(job_id, "trainer", 0), namespace=NAMESPACE))


def _warnings(c, job_id: str) -> list[str]:
    return [e.message for e in c.events(job_id) if e.type == pb.EVENT_TYPE_LOG and e.message.startswith("warning:")]


def test_sft_survives_a_trainer_killed_mid_stage(start_server, sft_data, tiny_model, ray_client):
    c = start_server(sft_data, "--model-root", str(tiny_model)).client()
    # 48 steps (2 epochs): the kill lands mid-training; one landing in the final save is survived too
    optim = {"learning_rate": 0.003, "batch_size": 4, "max_steps": 48, "epochs": 2, "checkpoint_every": 4}
    spec = sft_spec(tiny_model, optim=optim)
    job = c.submit(spec).job
    _kill_trainer_at(ray_client, c, job.id, 0, 6)
    done = c.wait(job.id)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error.reason
    assert done.stages[0].progress.done == 48
    # every step trained, the ones since the newest checkpoint (none, if it died just after one) twice
    assert len(metric_series(c, job.id, "train/loss")) >= 48
    (warning,) = _warnings(c, job.id)
    assert "a trainer rank died at step" in warning and "restarted from the checkpoint at step" in warning


@pytest.mark.long
def test_on_policy_distillation_survives_a_trainer_killed_mid_stage(start_server, sft_data, tiny_model, ray_client):
    c = start_server(sft_data, "--model-root", str(tiny_model)).client()
    spec = distill_spec(
        tiny_model,
        mode="on_policy",
        optim={"learning_rate": 0.005, "checkpoint_every": 3, "epochs": 1},
        **{"lambda": 0.5},
    )
    spec.resources.student.num_cpus = 0.25
    job = c.submit(spec).job
    _kill_trainer_at(ray_client, c, job.id, 0, 5)
    done = c.wait(job.id)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error.reason
    assert done.stages[0].progress.done == 12
    assert any("a trainer rank died" in w for w in _warnings(c, job.id))
    before, after = metric_series(c, job.id, "eval/kl_before"), metric_series(c, job.id, "eval/kl_after")
    assert after[0] < before[0]


def _audit_then_sft(tiny_model, steps: int = 16, **job) -> pb.JobSpec:
    optim = {
        "learning_rate": 0.003,
        "batch_size": 4,
        "max_steps": steps,
        "epochs": -(-steps // 24),
        "checkpoint_every": 4,
    }
    spec = sft_spec(tiny_model, optim=optim)
    audit = pb.Stage(name="audit")
    audit.audit.warn_only = True
    spec.stages.insert(0, audit)
    for key, value in job.items():
        setattr(spec, key, value)
    return spec


def test_a_job_outlives_its_supervisor(start_server, sft_data, tiny_model, ray_client):
    """The supervisor is killed during sft, after the audit finished: the service starts a new
    one, which skips the audit (its outputs come from the stored events) and resumes sft from its
    checkpoint; the job succeeds, and its events still run 1..N without a gap or a repeat."""
    from stillroom.actors.runtime.cluster import NAMESPACE, supervisor_name

    c = start_server(sft_data, "--model-root", str(tiny_model), "--retry-backoff-s", "1").client()
    job = c.submit(_audit_then_sft(tiny_model, steps=48)).job  # long enough for the kill to land mid-sft
    wait_for(lambda: c.get(job.id).stages[1].progress.done >= 6, 300)
    ray_client.kill(ray_client.get_actor(supervisor_name(job.id), namespace=NAMESPACE))
    done = c.wait(job.id)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error.reason
    events = list(c.events(job.id))
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    logs = [e.message for e in events if e.type == pb.EVENT_TYPE_LOG]
    assert any(m.startswith("the job's supervisor died (") and "attempt 1 of 2" in m for m in logs), logs
    assert any(m.startswith("finished in an earlier run") and "skipped" in m for m in logs)
    audits = [e for e in events if e.stage == "audit" and e.type == pb.EVENT_TYPE_STAGE_STATE]
    assert [e.stage_state for e in audits] == [pb.STAGE_STATE_RUNNING, pb.STAGE_STATE_SUCCEEDED]  # ran once
    restart = next(e.seq for e in events if e.message.startswith("the job's supervisor died ("))
    sft = [e for e in events if e.stage == "sft" and e.type == pb.EVENT_TYPE_PROGRESS]
    before, after = [e.progress.done for e in sft if e.seq < restart], [e.progress.done for e in sft if e.seq > restart]
    # the new supervisor went on from a checkpoint (every 4 steps), not from step 0; the events of
    # the steps after the last one the service pulled died with the old supervisor (README: Durability)
    assert after[0] > 1 and (after[0] - 1) % 4 == 0, (before, after)
    assert after[-1] == 48


def test_resume_from_a_cancelled_job_reuses_its_finished_stages_and_checkpoints(start_server, sft_data, tiny_model):
    import grpc

    c = start_server(sft_data, "--model-root", str(tiny_model)).client()
    first = c.submit(_audit_then_sft(tiny_model, steps=40)).job
    wait_for(lambda: c.get(first.id).stages[1].progress.done >= 9, 300)  # a checkpoint at 8
    with pytest.raises(grpc.RpcError) as e:
        c.validate(_audit_then_sft(tiny_model, steps=40, resume_from=first.id))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # still running
    c.cancel(first.id)
    assert c.wait(first.id).state == pb.JOB_STATE_CANCELLED
    with pytest.raises(grpc.RpcError) as e:
        c.validate(_audit_then_sft(tiny_model, resume_from="job-nothere"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND

    second = c.submit(_audit_then_sft(tiny_model, steps=40, resume_from=first.id)).job
    done = c.wait(second.id)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error.reason
    events = list(c.events(second.id))
    assert not [e for e in events if e.stage == "audit" and e.type == pb.EVENT_TYPE_STAGE_STATE]  # not run again
    progress = [e.progress.done for e in events if e.stage == "sft" and e.type == pb.EVENT_TYPE_PROGRESS]
    assert progress[0] >= 9 and progress[-1] == done.stages[1].progress.total == 40  # from the checkpoint on
