"""The Ray dashboard during a running job, reached as a user would: the REST API its Actors page
reads (with the Ray token) lists every role actor of the job by name, ALIVE, with its repr; each
node's metrics endpoint exports the stillroom gauges tagged with the job id, role and rank; the
job's MLflow run (report_to mlflow, a local file store) has the loss so far."""

from __future__ import annotations

import json
import subprocess
import urllib.request

import pytest
from stillroom.v1 import job_pb2 as pb

from tests.conftest import BIN, CLUSTER
from tests.service.helpers import wait_for, wait_state
from tests.service.test_stages import sft_spec

pytestmark = pytest.mark.slow


def _get(url: str, token: str = "") -> str:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read().decode()


def _gauge_lines(name: str, job_id: str) -> list[str]:
    lines = []
    for port in CLUSTER["metrics_ports"]:
        try:
            text = _get(f"http://127.0.0.1:{port}/metrics")
        except OSError:
            continue
        lines += [ln for ln in text.splitlines() if ln.startswith(f"ray_stillroom_{name}{{") and job_id in ln]
    return lines


def _mlflow_run(uri: str, job_id: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("stillroom")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`stillroom.job` = '{job_id}'")
    assert len(runs) == 1  # one stage, one run
    return runs[0], client.get_metric_history(runs[0].info.run_id, "train/loss")


def test_the_dashboard_lists_the_jobs_actors_and_the_metrics_endpoint_its_gauges(
    start_server, sft_data, tiny_model, monkeypatch
):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store behind an opt-in
    c = start_server(sft_data, "--model-root", str(tiny_model)).client()
    optim = {"learning_rate": 0.003, "batch_size": 4, "max_steps": 2000, "epochs": 100, "checkpoint_every": 1000}
    spec = sft_spec(tiny_model, optim=optim)
    uri = f"file:{sft_data / 'mlruns'}"
    spec.tracking.report_to[:] = ["tensorboard", "mlflow"]
    spec.tracking.mlflow_tracking_uri = uri
    job = c.submit(spec).job
    wait_for(lambda: c.get(job.id).stages[0].progress.done >= 2, 180)
    running = c.get(job.id)
    token = subprocess.run([str(BIN / "ray"), "get-auth-token"], capture_output=True, text=True, check=True).stdout
    actors = json.loads(_get(f"{running.dashboard_url}/logical/actors", token.strip()))["data"]["actors"]
    ours = {a["name"]: a for a in actors.values() if a and a.get("name", "").startswith(f"{job.id}:")}
    expected = {f"{job.id}:supervisor:0", f"{job.id}:trainer:0"}
    assert set(ours) == set(running.actors) == expected
    assert all(a["state"] == "ALIVE" for a in ours.values())
    assert ours[f"{job.id}:trainer:0"]["reprName"].startswith(f"Trainer({job.id}:trainer:0, rank 0/1")
    assert ours[f"{job.id}:supervisor:0"]["reprName"].startswith(f"Supervisor({job.id}")
    lines = wait_for(lambda: _gauge_lines("train_tokens_per_s", job.id), 90, 1.0)
    assert any('role="trainer"' in ln and 'rank="0"' in ln and f'job_id="{job.id}"' in ln for ln in lines), lines
    run, losses = wait_for(lambda: (lambda r: r if r[1] else None)(_mlflow_run(uri, job.id)), 30, 1.0)
    assert run.info.run_name == f"{job.id}/sft" and run.info.status == "RUNNING"
    assert [m.step for m in losses] == sorted(m.step for m in losses) and losses[0].value > 0
    c.cancel(job.id)
    assert wait_state(c, job.id, pb.JOB_STATE_CANCELLED, 120).state == pb.JOB_STATE_CANCELLED
    assert wait_for(lambda: _mlflow_run(uri, job.id)[0].info.status == "KILLED", 30, 1.0)
