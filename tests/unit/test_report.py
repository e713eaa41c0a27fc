"""The job report from events alone: steps, the evaluation table, plots, gates."""

from __future__ import annotations

from stillroom.actors.common.job_report import eval_table, evaluation, render, series
from stillroom.actors.stages.evaluate import gate_verdict
from stillroom.v1 import job_pb2 as pb


def _metrics(stage: str, **values) -> pb.Event:
    metrics = {k.replace("__", "/"): v for k, v in values.items()}  # train__loss -> train/loss
    return pb.Event(type=pb.EVENT_TYPE_METRICS, stage=stage, metrics=metrics)


def _progress(stage: str, done: int) -> pb.Event:
    return pb.Event(type=pb.EVENT_TYPE_PROGRESS, stage=stage, progress=pb.Progress(done=done, total=3, unit="steps"))


def _state(stage: str, state: int, seconds: int) -> pb.Event:
    e = pb.Event(type=pb.EVENT_TYPE_STAGE_STATE, stage=stage, stage_state=state)
    e.time.seconds = seconds
    return e


EVENTS = [
    _state("audit", pb.STAGE_STATE_RUNNING, 100),
    _metrics("audit", train__rows=300, violations=0),
    _state("audit", pb.STAGE_STATE_SUCCEEDED, 102),
    _state("sft", pb.STAGE_STATE_RUNNING, 102),
    _metrics("sft", eval__loss=5.0),  # before any step: step 0
    _progress("sft", 1),
    _metrics("sft", train__loss=4.0),
    _progress("sft", 2),
    _metrics("sft", train__loss=3.0),
    _metrics("sft", eval__loss=2.5),
    _state("sft", pb.STAGE_STATE_SUCCEEDED, 130),
    _state("grpo", pb.STAGE_STATE_RUNNING, 130),
    _metrics("grpo", reward=0.2, kl=0.01, train__step=1),
    _metrics("grpo", reward=0.6, kl=0.03, train__step=2),
    _metrics("distill", baseline__loss=2.0, step=1),
    _metrics("distill", baseline__loss=1.0, step=2),
    _metrics("evaluate", eval__base_teacher__json_exact=0.0, eval__base_teacher__tokens_per_s=80.0),
    _metrics("evaluate", eval__student__json_exact=0.5, eval__student__size_bytes=2**21, eval__student__parameters=3e6),
]


def test_series_use_the_events_own_step_else_the_stage_progress():
    s = series(EVENTS)
    assert s["sft"]["eval/loss"] == [(0.0, 5.0), (2.0, 2.5)]
    assert s["sft"]["train/loss"] == [(1.0, 4.0), (2.0, 3.0)]
    assert s["grpo"]["reward"] == [(1.0, 0.2), (2.0, 0.6)]
    assert s["distill"]["baseline/loss"] == [(1.0, 2.0), (2.0, 1.0)]


def test_evaluation_table_has_a_row_per_model_and_readable_units():
    table = evaluation(series(EVENTS))
    assert table == {
        "base_teacher": {"json_exact": 0.0, "tokens_per_s": 80.0},
        "student": {"json_exact": 0.5, "size_bytes": 2.0**21, "parameters": 3e6},
    }
    md = eval_table(table).splitlines()
    assert md[0] == "| model | json_exact | tokens_per_s | parameters | size_bytes |"
    assert md[2] == "| base_teacher | 0.000 | 80 |  |  |"
    assert md[3] == "| student | 0.500 |  | 3.0 M | 2.0 MiB |"


def test_render_writes_markdown_and_a_png_per_stage_with_curves(tmp_path):
    spec = pb.JobSpec(display_name="tickets", stages=[pb.Stage(name="audit", audit=pb.AuditStage())])
    path = render("job-1", spec, EVENTS, tmp_path)
    text = path.read_text()
    assert "| sft | SUCCEEDED | 28 |  |" in text  # seconds from RUNNING to SUCCEEDED
    assert "| violations | 0 |" in text  # the audit summary
    assert "| student | 0.500 |" in text
    plots = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert plots == ["distill.png", "grpo.png", "sft.png"]  # audit and evaluate have no curves
    assert all((tmp_path / "plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    assert "![grpo](plots/grpo.png)" in text


def test_gates_say_by_how_much():
    report = {"student": {"json_exact": 0.62}, "student_baseline": {"json_exact": 0.55}}
    ok, text = gate_verdict(pb.EvalGate(model="student", baseline="student_baseline", metric="json_exact"), report)
    assert ok and "+0.070" in text
    ok, text = gate_verdict(
        pb.EvalGate(model="student", baseline="student_baseline", metric="json_exact", min_margin=0.1), report
    )
    assert not ok and "does not beat" in text
    ok, text = gate_verdict(pb.EvalGate(model="teacher_sft", baseline="student", metric="json_exact"), report)
    assert not ok and "teacher_sft was not evaluated" in text


def test_metric_tags_name_the_rank_and_the_sampler_samples_on_a_timer():
    import time

    from stillroom.actors.runtime.metrics import Sampler, tags_of

    assert tags_of("job-x:trainer:1") == {"job_id": "job-x", "role": "trainer", "rank": "1"}
    assert tags_of("job-x:trainer:0") != tags_of("job-x:trainer:1")  # replicas are separate series
    depths = []
    sampler = Sampler(0.02, lambda: depths.append(len(depths))).start()
    time.sleep(0.3)  # nobody waits on a queue here, and the gauge is sampled anyway
    sampler.stop()
    assert sampler.samples == len(depths) >= 5
    count = len(depths)
    time.sleep(0.1)
    assert len(depths) == count  # stopped
