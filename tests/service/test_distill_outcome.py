"""Issue 27 through the real server: a distill stage with no step count trains until its
held-out KL stops improving (the teacher labels the prompts once; further passes replay its
journal) and says why it stopped; the evaluate stage says how much of its teacher a student kept,
as a warning event when below min_retained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from stillroom.v1 import job_pb2 as pb

from tests.service.helpers import metric_series
from tests.service.test_stages import distill_spec


def test_distill_trains_until_the_held_out_kl_plateaus_and_evaluate_says_what_it_kept(
    start_server, sft_data, tiny_model
):
    server = start_server(sft_data, "--model-root", str(tiny_model))
    c = server.client()
    spec = distill_spec(tiny_model, sft_first=True, alpha=0.0, max_ahead=0)
    spec.stages[-1].distill.until.CopyFrom(pb.DistillUntil(patience=1, eval_every=6, max_steps=48))
    evaluate = spec.stages.add(name="evaluate").evaluate
    evaluate.max_new_tokens, evaluate.min_retained = 4, 1.0
    evaluate.metrics.add(name="exact_match").args["column"] = "reference"
    done = c.wait(c.submit(spec).job.id)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error.reason
    events = list(c.events(done.id))
    kls = [(e.metrics["step"], e.metrics["eval/kl"]) for e in events if "eval/kl" in e.metrics]
    steps = [s for s, _ in kls]
    assert steps[0] == 0 and all(b - a == 6 for a, b in zip(steps, steps[1:], strict=False)), kls
    assert kls[1][1] < kls[0][1], kls  # the first pass taught it something
    stops = [e.message for e in events if "stop_reason=" in e.message]
    assert len(stops) == 1, stops
    trained = metric_series(c, done.id, "distill/steps")[0]
    assert trained == steps[-1] and trained > 12  # beyond the first pass (12 steps of 8 prompts)
    # the saved student is the best evaluation's (its checkpoint loaded back), not the last one
    best_step = (metric_series(c, done.id, "distill/best_step") or [trained])[0]
    assert metric_series(c, done.id, "eval/kl_after") == [pytest.approx(dict(kls)[best_step], rel=1e-4)]
    if trained < 48:  # stopped at the plateau: the last evaluation did not beat the best
        assert stops[0].startswith("stop_reason=plateau") and metric_series(c, done.id, "distill/stop_reason/plateau")
        assert min(v for _, v in kls[:-1]) * 0.99 <= kls[-1][1]
        assert 0 < best_step < trained and any(f"student: step {best_step:.0f}'s" in e.message for e in events)
    else:
        assert stops[0].startswith("stop_reason=budget")
    # after each evaluation only the best one's and the newest checkpoints stay
    checkpoints = Path(server.home, "artifacts", done.id, "distill", "checkpoints")
    saved = {json.loads(m.read_text())["cursor"] for m in checkpoints.glob("step-*/COMPLETE")}
    assert saved == {best_step, trained}, sorted(p.name for p in checkpoints.iterdir())
    # the teacher labelled the prompts once; every further pass replayed its journal
    assert metric_series(c, done.id, "teacher/generated_batches") == [12.0]
    assert metric_series(c, done.id, "teacher/replayed_batches") == [trained - 12]
    assert done.stages[1].progress.done == trained
    # retained quality: the student's exact match over its teacher's (teacher_sft), said out loud below 1.0
    student = metric_series(c, done.id, "eval/student/exact_match")[0]
    teacher = metric_series(c, done.id, "eval/teacher_sft/exact_match")[0]
    assert teacher > 0, teacher
    kept = metric_series(c, done.id, "eval/student/retained/exact_match")
    assert kept == [student / teacher]
    warned = [e.message for e in events if e.message.startswith("warning: student keeps")]
    assert bool(warned) == (kept[0] < 1.0), (warned, kept)
    report = Path(server.home, "artifacts", done.id, "evaluate", "report.md").read_text()
    assert ("WARNING: student keeps" in report) == bool(warned)
    assert c.get(done.id).id == done.id  # the server still answers
