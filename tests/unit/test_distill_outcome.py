"""Issue 27, the pure parts: train until a held-out measure plateaus (Until, Plateau,
train_until), each student rung's retained quality and its warning, the gates that name it, the
distill plot's second panel, and the validation of the new fields (with their field paths)."""

from __future__ import annotations

import pytest
from stillroom.actors.common.job_report import DISTILL_PANELS, evaluation, panels_of, series
from stillroom.actors.common.ladder import retained, retained_warnings, teacher_rung
from stillroom.actors.stages.distill_until import BUDGET, PLATEAU, Plateau, Until, stop_message, train_until
from stillroom.actors.stages.evaluate import gate_verdict
from stillroom.services.errors import InvalidArgument
from stillroom.services.recipes import parse
from stillroom.services.validation import Policy, validate
from stillroom.v1 import job_pb2 as pb

from tests.unit.test_validation import llama_teacher


def test_until_is_the_default_and_fixed_steps_opt_out():
    """No optim.max_steps / epochs: train to an outcome (KL, patience 2, 10 passes, an evaluation
    a pass, at most 50 steps apart); with either, a fixed number of steps (None)."""
    assert Until.of(pb.DistillStage(), per_pass=12) == Until("kl", 2, 120, 12, 0.01)
    assert Until.of(pb.DistillStage(), per_pass=188).eval_every == 50
    assert Until.of(pb.DistillStage(optim=pb.OptimConfig(max_steps=90)), 30) is None
    assert Until.of(pb.DistillStage(optim=pb.OptimConfig(epochs=3)), 30) is None
    asked = pb.DistillStage(until=pb.DistillUntil(metric="json_valid", patience=3, max_steps=40, eval_every=5))
    assert Until.of(asked, 30) == Until("json_valid", 3, 40, 5, 0.01)


def test_the_teacher_labels_with_its_greedy_answer_unless_asked_for_samples():
    """Unset: one greedy answer per prompt (what the teacher serves; issue 27's arithmetic teacher's
    4 samples at T 1 agreed 27% of the time). Several samples at T 1 when num_samples > 1 or a
    filter that chooses among samples is named; an explicit temperature always wins."""
    from stillroom.actors.common.distill_sampling import teacher_sampling
    from stillroom.actors.stages.distill_samples import DistillConfig

    assert teacher_sampling(pb.DistillStage()) == (1, 0.0)
    assert teacher_sampling(pb.DistillStage(filter="valid_only")) == (1, 0.0)
    assert teacher_sampling(pb.DistillStage(filter="min_reward", min_reward=0.5)) == (1, 0.0)
    assert teacher_sampling(pb.DistillStage(filter="best_of_n")) == (4, 1.0)
    assert teacher_sampling(pb.DistillStage(filter="majority_vote")) == (4, 1.0)
    assert teacher_sampling(pb.DistillStage(num_samples=2)) == (2, 1.0)
    assert teacher_sampling(pb.DistillStage(sampling_temperature=0.7)) == (1, 0.7)
    assert teacher_sampling(pb.DistillStage(num_samples=3, sampling_temperature=0.5)) == (3, 0.5)
    sampling = DistillConfig.of(pb.DistillStage()).sampling
    assert (sampling.n, sampling.temperature) == (1, 0.0)


def test_plateau_counts_evaluations_since_the_last_real_improvement():
    """KL (lower is better), min_delta 1%: 1.0 -> 0.5 improves; 0.498 is within 1% of 0.5 (no
    improvement); 0.51 worse: two evaluations without one, patience 2 -> stop."""
    p = Plateau(Until("kl", 2, 100, 10, 0.01))
    assert [p.add(s, v) for s, v in [(0, 1.0), (10, 0.5), (20, 0.498), (30, 0.51)]] == [False, False, False, True]
    assert p.best() == (10, 0.5) and p.since_best() == 2
    rewards = Plateau(Until("json_exact", 1, 100, 10, 0.01))  # higher is better; any rise from 0 counts
    assert [rewards.add(s, v) for s, v in [(0, 0.0), (10, 0.1), (20, 0.1)]] == [False, False, True]


def test_train_until_stops_at_the_plateau_or_the_budget_and_says_why(tmp_path):
    """Chunks of eval_every steps from the cursor; each evaluation reported as eval/kl at its step;
    the history file lets a resumed stage go on counting."""
    chunks, reported = [], []
    values = iter([2.0, 1.0, 0.6, 0.61, 0.6, 0.7])
    until = Until("kl", 2, 100, 10, 0.01)
    reason, plateau = train_until(
        lambda a, b: chunks.append((a, b)), lambda: next(values), until, 0, reported.append, tmp_path / "u.json"
    )
    assert reason == PLATEAU and chunks == [(0, 10), (10, 20), (20, 30), (30, 40)]
    assert [(m["step"], m["eval/kl"]) for m in reported] == [(0, 2.0), (10, 1.0), (20, 0.6), (30, 0.61), (40, 0.6)]
    assert "stop_reason=plateau" in stop_message(reason, plateau, 40) and "best held-out kl 0.6 at step 20" in (
        stop_message(reason, plateau, 40)
    )
    # a budget it never plateaus within; resumed at step 5 (a checkpoint): the next chunk ends at 10
    chunks.clear()
    falling = iter([0.5 / 2**i for i in range(10)])
    reason, falling_plateau = train_until(
        lambda a, b: chunks.append((a, b)),
        lambda: next(falling),
        Until("kl", 2, 25, 10, 0.01),
        5,
        lambda m: None,
        tmp_path / "fresh.json",
    )
    assert reason == BUDGET and chunks == [(5, 10), (10, 20), (20, 25)]
    assert "until.max_steps 25, still improving" in stop_message(reason, falling_plateau, 25)
    flat = Plateau(Until("kl", 2, 20, 10, 0.01), [(0, 1.0), (10, 0.5), (20, 0.499)])
    assert "no better than the best; best held-out kl 0.5 at step 10" in stop_message(BUDGET, flat, 20)
    # the history a previous attempt wrote, up to the cursor it resumes from
    reason, plateau = train_until(lambda a, b: None, lambda: 9.0, until, 20, lambda m: None, tmp_path / "u.json")
    assert plateau.history[:3] == [(0, 2.0), (10, 1.0), (20, 0.6)] and reason == PLATEAU


LINEAGE = {"teacher_sft": ["sft"], "student": ["sft", "distill"], "student_baseline": ["sft", "distill"]}


def test_retained_is_each_student_rung_over_its_own_teacher_rung():
    assert teacher_rung("student+rag", LINEAGE) == "teacher_sft+rag"
    assert teacher_rung("student_baseline", LINEAGE) == "teacher_sft"
    assert teacher_rung("teacher_sft", LINEAGE) is None
    assert teacher_rung("student", {"student": ["distill"]}) == "base_teacher"
    results = {
        "teacher_sft+rag": {"json_exact": 0.85, "json_valid": 1.0, "tokens_per_s": 50.0},
        "student+rag": {"json_exact": 0.0, "json_valid": 0.9, "tokens_per_s": 150.0},
        "student_baseline+rag": {"json_exact": 0.5, "json_valid": 1.0},
    }
    kept = retained(results, LINEAGE, ["json_exact", "json_valid"])
    assert kept == {
        "student+rag": {"retained/json_exact": 0.0, "retained/json_valid": pytest.approx(0.9)},
        "student_baseline+rag": {"retained/json_exact": pytest.approx(0.5 / 0.85), "retained/json_valid": 1.0},
    }
    for rung, values in kept.items():
        results[rung].update(values)
    # a student that keeps 0% of its teacher is said out loud (the distilled student; not its twin)
    assert retained_warnings(results, LINEAGE, 0.8) == [
        "student+rag keeps 0% of teacher_sft+rag's json_exact (0.000 vs 0.850), 80% short of min_retained 0.8"
    ]


def test_a_gate_without_a_baseline_holds_a_rung_to_a_minimum():
    results = {"student": {"retained/json_exact": 0.5}}
    gate = pb.EvalGate(model="student", metric="retained/json_exact", min=0.8)
    assert gate_verdict(gate, results) == (False, "student retained/json_exact 0.500 (below 0.8)")
    gate.min = 0.5
    assert gate_verdict(gate, results)[0]


def test_the_distill_plot_shows_the_held_out_kl_kept_fraction_and_retained_not_counters():
    events = [
        pb.Event(type=pb.EVENT_TYPE_METRICS, stage="distill", metrics=m)
        for m in [
            {"eval/kl": 2.0, "step": 0},
            {"loss": 1.0, "distill/kept_fraction": 0.5, "distill/kept": 4, "rewards/samples": 8, "train/step": 1},
            {"loss": 0.8, "distill/kept_fraction": 0.75, "distill/kept": 6, "rewards/samples": 8, "train/step": 2},
            {"eval/kl": 1.0, "step": 2},
        ]
    ] + [pb.Event(type=pb.EVENT_TYPE_METRICS, stage="evaluate", metrics={"eval/student/retained/json_exact": 0.9})]
    values = series(events)
    panels = panels_of(values["distill"], DISTILL_PANELS)
    assert set(panels["student vs teacher"]) == {"eval/kl", "distill/kept_fraction"}
    assert set(panels["loss"]) == {"loss"}
    assert evaluation(values) == {"student": {"retained/json_exact": 0.9}}


def _doc(data_root, distill: dict, evaluate: dict | None = None) -> dict:
    stages = [{"sft": {}}, {"distill": {"student_init": {"keep_every_nth_layer": 3}, **distill}}]
    return {
        "teacher": {"path": llama_teacher(data_root)},
        "data": {"train": {"path": "train.jsonl"}, "test": {"path": "train.jsonl"}},
        "stages": stages + ([{"evaluate": evaluate}] if evaluate else []),
    }


def test_until_retained_and_layer_choice_are_validated_with_field_paths(data_root):
    until = {"metric": "bleu", "patience": -1, "max_steps": -5, "eval_every": -1, "min_delta": 2}
    distill = {"until": until, "optim": {"max_steps": 30}, "rewards": [{"name": "json_valid"}]}
    distill["student_init"] = {"keep_every_nth_layer": 3, "layer_choice": "random", "importance_prompts": -2}
    evaluate = {
        "metrics": [{"name": "json_exact"}],
        "min_retained": 1.5,
        "gates": [
            {"model": "teacher_sft", "metric": "retained/json_exact", "min": 0.8},
            {"model": "student", "metric": "retained/bleu"},
        ],
    }
    with pytest.raises(InvalidArgument) as e:
        validate(parse(_doc(data_root, distill, evaluate)), Policy((data_root,)))
    v = dict(e.value.violations)
    p = "stages[1].distill"
    assert v[f"{p}.until.metric"] == "'bleu' is neither kl nor one of stages[1].distill.rewards (json_valid)"
    assert v[f"{p}.until.patience"] == "must be >= 1" and v[f"{p}.until.max_steps"] == "must be >= 1"
    assert v[f"{p}.until.eval_every"] == "must be >= 1" and v[f"{p}.until.min_delta"] == "must be <= 1"
    assert v[f"{p}.optim.max_steps"].startswith("trains a fixed number of steps: set it or stages[1].distill.until")
    assert v[f"{p}.student_init.layer_choice"] == "'random' is not one of importance, every_nth"
    assert v[f"{p}.student_init.importance_prompts"] == "must be >= 1"
    assert v["stages[2].evaluate.min_retained"] == "must be <= 1"
    assert v["stages[2].evaluate.gates[0].metric"] == "retained/json_exact is measured on student rungs"
    assert v["stages[2].evaluate.gates[1].metric"].startswith("must be one of")
    # sound: a reward to train to, a gate on the student's retained exact match with no baseline
    good = {"until": {"metric": "json_valid", "patience": 2}, "rewards": [{"name": "json_valid"}]}
    gate = {"model": "student", "metric": "retained/json_exact", "min": 0.8}
    validate(parse(_doc(data_root, good, {"metrics": [{"name": "json_exact"}], "gates": [gate]})), Policy((data_root,)))


def test_the_job_report_lists_the_warnings_a_student_that_keeps_too_little_among_them(tmp_path):
    from stillroom.actors.common.job_report import render

    line = "student keeps 0% of teacher_sft's json_exact (0.000 vs 0.850), 80% short of min_retained 0.8"
    events = [
        pb.Event(type=pb.EVENT_TYPE_METRICS, stage="evaluate", metrics={"eval/student/retained/json_exact": 0.0}),
        pb.Event(type=pb.EVENT_TYPE_LOG, stage="evaluate", message="warning: " + line),
    ]
    text = render("job-1", pb.JobSpec(), events, tmp_path).read_text()
    assert f"## Warnings\n\n- evaluate: {line}" in text
    assert "| student | 0.000 |" in text  # retained/json_exact, in the evaluation table
