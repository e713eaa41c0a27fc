"""The live line watch shows per stage: rate and time left from the events' own times."""

from __future__ import annotations

from stillroom.services.progress import ProgressView
from stillroom.v1 import job_pb2 as pb


def _at(seconds: float, event: pb.Event) -> pb.Event:
    event.time.FromNanoseconds(int((1_800_000_000 + seconds) * 1e9))
    return event


def progress(stage: str, done: int, total: int, t: float, unit: str = "steps") -> pb.Event:
    return _at(
        t,
        pb.Event(type=pb.EVENT_TYPE_PROGRESS, stage=stage, progress=pb.Progress(done=done, total=total, unit=unit)),
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


def metrics(stage: str, t: float, **values: float) -> pb.Event:
    return _at(t, pb.Event(type=pb.EVENT_TYPE_METRICS, stage=stage, metrics=values))


def grpo_step(step: int, t: float, reward: float, zero_std: float, loss: float) -> list[pb.Event]:
    """One GRPO step's events as the stage sends them: TrainLoop._step's metrics (the scored batch's
    reward figures, the trainer's loss / kl / clip ratios, train/step...), then step_reporter's progress."""
    figures = {
        "reward": reward,
        "reward_std": 0.31,
        "frac_reward_zero_std": zero_std,
        "rewards/json_valid/mean": reward,
        "rewards/unscored_fraction": 0.0,
        "completions/mean_length": 41.0,
        "loss": loss,
        "kl": 0.0,
        "clip_ratio/region_mean": 0.0,
        "train/step": float(step),
        "policy/staleness": 0.0,
        "train/tokens_per_s": 812.0,
    }
    return [metrics("grpo", t, **figures), progress("grpo", step, 30, t)]


def test_a_grpo_line_shows_the_reward_and_the_groups_without_signal_not_the_loss():
    view = ProgressView()
    lines = [view.update(e) for e in grpo_step(1, 0.0, 0.4375, 0.25, 0.0012)]
    assert lines == [None, "grpo  1/30 steps  reward 0.4375  frac_reward_zero_std 0.25"]  # no progress yet: no line
    # the weight sync after the step headlines nothing
    assert view.update(metrics("grpo", 0.5, **{"sync/seconds": 0.2, "policy/version": 1.0})) is None
    lines = [view.update(e) for e in grpo_step(2, 4.0, 0.5625, 0.0, -0.0031)]
    assert lines[0] == "grpo  1/30 steps  reward 0.5625  frac_reward_zero_std 0"
    assert lines[1] == "grpo  2/30 steps  0.25 steps/s  ETA 1:52  reward 0.5625  frac_reward_zero_std 0"


def test_distills_baseline_phase_shows_its_own_rate_and_loss():
    """The distill stage's events as it sends them: the student's steps (loss 0.02036 last), the
    held-out KL, then train_baseline's metrics (baseline/loss, step) before each "baseline steps"
    progress: 23 baseline steps in 152 s. The line used to read "24/90 baseline steps  0.01 baseline
    steps/s  ETA 102:24  loss 0.02036": the student's rate and loss."""
    view = ProgressView()
    for i in range(1, 91):  # the student: 90 steps, 2 s each
        view.update(metrics("distill", 2.0 * i - 0.1, loss=0.5 / i if i < 90 else 0.02036, **{"train/step": i}))
        view.update(progress("distill", i, 90, 2.0 * i))
    assert view.line("distill") == "distill  90/90 steps  0.50 steps/s  loss 0.02036"
    assert view.update(metrics("distill", 181.0, **{"eval/kl_after": 1.02})) is None
    for i in range(1, 25):  # the baseline: 6.6 s a step from t = 6000
        t = 6000.0 + 152.0 * (i - 1) / 23
        view.update(metrics("distill", t - 0.1, **{"baseline/loss": 0.22, "baseline/tokens_per_s": 90.0, "step": i}))
        line = view.update(progress("distill", i, 90, t, "baseline steps"))
    # 23 steps in 152 s: 0.151 steps/s; 66 left: 436 s
    assert line == "distill  24/90 baseline steps  0.15 baseline steps/s  ETA 7:16  baseline/loss 0.22"
