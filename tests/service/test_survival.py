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
    spec = sft_spec(tiny_model, optim={"learning_rate": 0.003, "batch_size": 4, "max_steps": 16, "checkpoint_every": 4})
    job = c.submit(spec).job
    _kill_trainer_at(ray_client, c, job.id, 0, 6)
    done = c.wait(job.id)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error.reason
    assert done.stages[0].progress.done == 16
    assert len(metric_series(c, job.id, "train/loss")) > 16  # the steps since the checkpoint ran again
    (warning,) = _warnings(c, job.id)
    assert "a trainer rank died at step" in warning and "restarted from the checkpoint at step" in warning


def test_on_policy_distillation_survives_a_trainer_killed_mid_stage(start_server, sft_data, tiny_model, ray_client):
    c = start_server(sft_data, "--model-root", str(tiny_model)).client()
    spec = distill_spec(
        tiny_model, mode="on_policy", optim={"learning_rate": 0.005, "checkpoint_every": 3}, **{"lambda": 0.5}
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
