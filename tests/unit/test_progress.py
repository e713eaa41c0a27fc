"""The live line watch shows per stage: rate and time left from the events' own times."""

from __future__ import annotations

from stillroom.services.progress import ProgressView
from stillroom.v1 import job_pb2 as pb


def _at(seconds: float, event: pb.Event) -> pb.Event:
    event.time.FromNanoseconds(int((1_800_000_000 + seconds) * 1e9))
    return event


def progress(stage: str, done: int, total: int, t: float) -> pb.Event:
    return _at(
        t,
        pb.Event(type=pb.EVENT_TYPE_PROGRESS, stage=stage, progress=pb.Progress(done=done, total=total, unit="steps")),
    )


def test_the_line_has_steps_rate_time_left_and_the_latest_loss():
    view = ProgressView()
    assert view.update(progress("sft", 1, 41, 0.0)) == "sft  1/41 steps"  # one point: no rate yet
    assert view.update(_at(0.5, pb.Event(type=pb.EVENT_TYPE_METRICS, stage="sft", metrics={"train/loss": 2.5}))) == (
        "sft  1/41 steps  train/loss 2.5"
    )
    # 4 more steps in 2 s: 2 steps/s, 36 left: 18 s
    assert view.update(progress("sft", 5, 41, 2.0)) == "sft  5/41 steps  2.00 steps/s  ETA 0:18  train/loss 2.5"
    assert view.update(_at(2.1, pb.Event(type=pb.EVENT_TYPE_METRICS, stage="sft", metrics={"eval/x": 1.0}))) is None
    assert view.update(progress("sft", 41, 41, 20.0)).startswith("sft  41/41 steps  2.00 steps/s  train/loss")
    assert view.update(pb.Event(type=pb.EVENT_TYPE_LOG, stage="sft", message="hi")) is None
