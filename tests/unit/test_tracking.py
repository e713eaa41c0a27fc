"""Experiment tracking while a job runs: each metrics event is in the stage's TensorBoard run and
its MLflow run (a local file store) as soon as it is logged, at its step; a restarted supervisor
writes to the same runs; a tracker that fails is dropped with a warning and the others go on."""

from __future__ import annotations

import pytest
from stillroom.actors.runtime.eventlog import EventLog, next_attempt_file
from stillroom.actors.runtime.tracking import LiveTensorBoard, Trackers, mlflow_key, trackers
from stillroom.v1 import job_pb2 as pb


def _progress(stage: str, done: int) -> pb.Event:
    return pb.Event(type=pb.EVENT_TYPE_PROGRESS, stage=stage, progress=pb.Progress(done=done, total=9))


def _metrics(stage: str, **values: float) -> pb.Event:
    return pb.Event(type=pb.EVENT_TYPE_METRICS, stage=stage, metrics=values)


def test_metrics_reach_tensorboard_while_the_job_runs(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = LiveTensorBoard(tmp_path / "tensorboard")
    log = EventLog(next_attempt_file(tmp_path), on_append=board)
    for step in (1, 2, 3):
        log.append(_progress("sft", step))
        log.append(_metrics("sft", **{"train/loss": 1.0 / step}))
    runs = EventAccumulator(str(tmp_path / "tensorboard" / "sft"))  # read before anything is closed
    runs.Reload()
    points = [(s.step, round(s.value, 4)) for s in runs.Scalars("train/loss")]
    assert points == [(1, 1.0), (2, 0.5), (3, 0.3333)]
    board.close()


def _mlflow_runs(uri: str, job: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tickets")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`stillroom.job` = '{job}'")
    return client, {r.info.run_name: r for r in runs}


def test_metrics_reach_an_mlflow_file_store_while_the_job_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = f"file:{tmp_path / 'mlruns'}"
    spec = pb.TrackingSpec(report_to=["tensorboard", "mlflow"], mlflow_tracking_uri=uri, mlflow_experiment="tickets")
    warnings: list[str] = []
    sink = trackers(spec, "job-1", tmp_path / "job-1", warnings.append)
    log = EventLog(None, on_append=sink)
    for step in (1, 2):
        log.append(_progress("sft", step))
        log.append(_metrics("sft", **{"train/loss": 1.0 / step, "retrieval/recall@2": 0.5}))
    client, runs = _mlflow_runs(uri, "job-1")
    run = runs["job-1/sft"]
    assert run.info.status == "RUNNING" and run.data.tags["stillroom.stage"] == "sft"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5)]
    assert mlflow_key("retrieval/recall@2") == "retrieval/recall_2" and "retrieval/recall_2" in run.data.metrics
    # a supervisor started again (the first one died) writes to the same run
    again = EventLog(None, on_append=trackers(spec, "job-1", tmp_path / "job-1", warnings.append))
    again.append(_progress("sft", 3))
    again.append(_metrics("sft", **{"train/loss": 0.25}))
    again.append(pb.Event(type=pb.EVENT_TYPE_STAGE_STATE, stage="sft", stage_state=pb.STAGE_STATE_SUCCEEDED))
    client, runs = _mlflow_runs(uri, "job-1")
    assert list(runs) == ["job-1/sft"] and runs["job-1/sft"].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3]
    assert (tmp_path / "job-1" / "tensorboard" / "sft").is_dir() and warnings == []
    sink.close()


class Broken:
    name = "broken"

    def __call__(self, event: pb.Event) -> None:
        raise ConnectionError("tracking server went away")

    def close(self) -> None:
        pass


def test_a_failing_tracker_is_dropped_with_a_warning_and_the_others_go_on(tmp_path):
    events: list[pb.Event] = []
    board = LiveTensorBoard(tmp_path / "tensorboard")
    log = EventLog(None)
    sink = Trackers([Broken(), board], lambda m: log.append(pb.Event(type=pb.EVENT_TYPE_LOG, message=m)))
    log.on_append = lambda e: (events.append(e), sink(e))
    log.append(_progress("sft", 1))
    log.append(_metrics("sft", **{"train/loss": 1.0}))
    assert sink.trackers == [board]
    warned = [e.message for e in events if e.type == pb.EVENT_TYPE_LOG]
    assert warned == ["broken stopped recording metrics: ConnectionError: tracking server went away"]
    assert list((tmp_path / "tensorboard" / "sft").iterdir())  # TensorBoard kept its metrics


@pytest.mark.parametrize(
    ("tracking", "field", "message"),
    [
        ({"report_to": ["wandb"]}, "tracking.report_to[0]", "'wandb' is not one of tensorboard, mlflow, none"),
        ({"report_to": ["none", "mlflow"]}, "tracking.report_to", "'none' goes alone: no tracker"),
        ({"mlflow_experiment": "x"}, "tracking.mlflow_experiment", "report_to does not include mlflow"),
        (
            {"report_to": ["mlflow"], "mlflow_tracking_uri": "ftp://x"},
            "tracking.mlflow_tracking_uri",
            "'ftp://x': an http(s):// tracking server or a file: store",
        ),
    ],
)
def test_tracking_settings_are_checked_at_submit(tmp_path, tracking, field, message):
    from stillroom.services.data_checks import check_tracking
    from stillroom.services.errors import PermissionDenied
    from stillroom.services.recipes import parse
    from stillroom.services.violations import Policy, Violations

    v = Violations()
    check_tracking(parse({"tracking": tracking}).tracking, Policy((tmp_path,)), v)
    assert dict(v.items)[field] == message
    with pytest.raises(PermissionDenied):  # a file store outside the data roots
        check_tracking(
            pb.TrackingSpec(report_to=["mlflow"], mlflow_tracking_uri="file:/etc/mlruns"), Policy((tmp_path,)), v
        )
