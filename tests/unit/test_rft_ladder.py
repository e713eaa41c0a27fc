"""Issue 26, RFT in the main job: 95% Wilson intervals of exact-match-style metrics (the numbers
worked by hand and scipy's), the ladder table's `0.62 [0.52, 0.71]` cells, gates on the lower
bound, the GRPO plot's series picked from a real step's metrics, and grpo prompts from
data.unlabeled validated at submit."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from stillroom.actors.algo.losses import grpo_loss
from stillroom.actors.common.job_report import GRPO_PANELS, eval_table, panels_of, render, series
from stillroom.actors.common.ladder import proportion_interval, wilson, with_split
from stillroom.actors.stages.evaluate import gate_verdict
from stillroom.actors.stages.grpo import GrpoConfig, prepare
from stillroom.services.errors import InvalidArgument
from stillroom.services.recipes import parse
from stillroom.services.validation import validate
from stillroom.services.violations import Policy
from stillroom.v1 import job_pb2 as pb

from tests.conftest import write_jsonl


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        # p = .62, z² = 3.8415: centre (.62 + .019207) / 1.038415 = .615560,
        # half 1.96 sqrt(.002356 + .000096) / 1.038415 = .093465
        (62, 100, 0.522095, 0.709025),
        # 0 of 10: centre = half = (3.8415 / 20) / 1.38415 = .138767
        (0, 10, 0.0, 0.277533),
        (10, 10, 0.722467, 1.0),
        # p = .5, n = 4: centre .5, half 1.96 sqrt(.0625 + .060023) / 1.960365 = .349962
        (2, 4, 0.150038, 0.849962),
    ],
)
def test_wilson_interval_matches_hand_worked_numbers(k, n, low, high):
    lo, hi = wilson(k, n)
    assert lo == pytest.approx(low, abs=1e-5) and hi == pytest.approx(high, abs=1e-5)  # worked to 6 places


def test_wilson_interval_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for k, n in [(0, 1), (1, 1), (3, 40), (62, 100), (117, 200), (199, 200)]:
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9), (k, n)
    assert all(math.isnan(x) for x in wilson(0, 0))


def test_only_means_of_0_1_scores_get_an_interval():
    assert proportion_interval("json_exact", [1.0, 0.0, 1.0, 1.0]) == pytest.approx(
        {"json_exact/ci_low": wilson(3, 4)[0], "json_exact/ci_high": wilson(3, 4)[1]}
    )
    assert proportion_interval("json_fields", [1.0, 0.5, 0.0]) == {}  # a fraction of fields: graded
    assert proportion_interval("length_penalty", [-0.2, 0.0]) == {}
    assert proportion_interval("json_exact", []) == {}
    assert with_split("json_exact/ci_low", "@update") == "json_exact@update/ci_low"
    assert with_split("json_exact", "@update") == "json_exact@update"


def test_ladder_table_shows_each_interval_beside_its_mean():
    low, high = wilson(62, 100)
    report = {
        "teacher_sft+rag": {
            "json_exact": 0.62,
            "json_exact/ci_low": low,
            "json_exact/ci_high": high,
            "json_fields": 0.8,
        },
        "base_teacher": {"json_exact": 0.1, "json_fields": 0.3},  # no interval: the plain mean
    }
    md = eval_table(report).splitlines()
    assert md[0] == "| model | json_exact | json_fields |"  # no ci_low / ci_high columns
    assert md[2] == "| teacher_sft+rag | 0.62 [0.52, 0.71] | 0.800 |"
    assert md[3] == "| base_teacher | 0.100 | 0.300 |"


def test_gates_may_judge_a_rung_by_its_lower_bound():
    low, high = wilson(62, 100)
    results = {
        "teacher_grpo": {"json_exact": 0.62, "json_exact/ci_low": low, "json_exact/ci_high": high, "json_fields": 0.9},
        "teacher_sft": {"json_exact": 0.50},
    }
    mean = pb.EvalGate(model="teacher_grpo", baseline="teacher_sft", metric="json_exact", min_margin=0.05)
    assert gate_verdict(mean, results)[0]  # 0.62 - 0.50 > 0.05
    bound = pb.EvalGate(model="teacher_grpo", baseline="teacher_sft", metric="json_exact", min_margin=0.05)
    bound.use_ci_low = True
    assert gate_verdict(bound, results) == (
        False,
        "teacher_grpo json_exact/ci_low 0.522 vs teacher_sft json_exact 0.500: +0.022 "
        "(does not beat it by more than 0.05)",
    )
    alone = pb.EvalGate(model="teacher_grpo", metric="json_exact", min=0.5, use_ci_low=True)
    assert gate_verdict(alone, results) == (True, "teacher_grpo json_exact/ci_low 0.522 (at least 0.5)")
    graded = pb.EvalGate(model="teacher_grpo", metric="json_fields", min=0.5, use_ci_low=True)
    assert gate_verdict(graded, results) == (
        False,
        "teacher_grpo json_fields has no 95% interval (its per-row scores are not all 0 or 1)",
    )


def grpo_step_metrics(step: int, rewards: list[float]) -> dict[str, float]:
    """What a grpo step reports, made by the stage's own code: prepare() on a scored batch of 2
    groups of 4 (with the scorer's failure columns), the loss's metrics, the loop's counters."""
    n = len(rewards)
    batch = pa.RecordBatch.from_pydict(
        {
            "prompt_ids": [[1, 2]] * n,
            "completion_ids": [[3, 4, 5]] * n,
            "truncated": [False] * n,
            "reward": rewards,
            "rewards/examples.arith.reward:correct": rewards,
            "failures/examples.arith.reward:correct": [None] * n,
        }
    )
    cfg = GrpoConfig.of(pb.GrpoStage(group_size=4, prompts_per_step=2, beta=0.04))
    arrays, metrics = prepare(batch, cfg)
    t = torch.zeros(n, 3)
    _, loss_metrics = grpo_loss(
        t - 0.1, t, torch.tensor(arrays["advantages"]), torch.ones(n, 3), beta=0.04, ref_logprobs=t
    )
    return metrics | loss_metrics | {"loss": 0.1, "train/step": float(step), "train/tokens_per_s": 500.0}


def test_grpo_plot_draws_reward_spread_signal_kl_and_clipping_not_counters(tmp_path):
    steps = [grpo_step_metrics(s, r) for s, r in enumerate([[0, 1, 0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0, 1, 1]], 1)]
    assert steps[0]["rewards/samples"] == 8.0  # the counter that flattened the reward axis is there
    events = [pb.Event(type=pb.EVENT_TYPE_METRICS, stage="grpo", metrics=m) for m in steps]
    panels = panels_of(series(events)["grpo"], GRPO_PANELS)
    assert {t: sorted(c) for t, c in panels.items()} == {
        "reward": ["reward", "rewards/examples.arith.reward:correct/mean"],
        "reward_std": ["reward_std"],
        "frac_reward_zero_std": ["frac_reward_zero_std"],
        "KL": ["kl"],
        "clip ratio": ["clip_ratio/high_mean", "clip_ratio/low_mean", "clip_ratio/region_mean"],
    }
    assert panels["frac_reward_zero_std"]["frac_reward_zero_std"] == [(1.0, 0.5), (2.0, 0.0)]
    spec = pb.JobSpec(stages=[pb.Stage(name="grpo", grpo=pb.GrpoStage())])
    render("job-1", spec, events, tmp_path)
    assert (tmp_path / "plots" / "grpo.png").read_bytes()[:4] == b"\x89PNG"


def spec_of(root, grpo: dict, data: dict) -> pb.JobSpec:
    return parse({"teacher": {"path": str(root)}, "data": data, "stages": [{"grpo": grpo}]})


def problems(spec: pb.JobSpec, root) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as e:
        validate(spec, Policy((root,)))
    return dict(e.value.violations)


def test_grpo_prompts_from_unlabeled_are_validated(data_root):
    write_jsonl(data_root / "unlabeled.jsonl", [{"prompt": f"ticket {i}"} for i in range(8)])
    grpo = {"prompts": "unlabeled", "rewards": [{"name": "json_valid"}]}
    v = problems(spec_of(data_root, grpo, {"train": {"path": "train.jsonl"}}), data_root)
    assert v["stages[0].grpo.prompts"] == "'unlabeled' needs data.unlabeled.path"
    v = problems(spec_of(data_root, grpo | {"prompts": "test"}, {"train": {"path": "train.jsonl"}}), data_root)
    assert v["stages[0].grpo.prompts"] == "'test' is not one of train, unlabeled"
    # no data.train needed: the stage reads data.unlabeled only (validate raises on model files, not data)
    v = problems(spec_of(data_root, grpo, {"unlabeled": {"path": "unlabeled.jsonl"}}), data_root)
    assert "data.train.path" not in v and "stages[0].grpo.prompts" not in v
    labelled = grpo | {"rewards": [{"name": "json_exact"}, {"name": "json_valid"}]}
    v = problems(spec_of(data_root, labelled, {"unlabeled": {"path": "unlabeled.jsonl"}}), data_root)
    assert v["stages[0].grpo.rewards[0].args['column']"] == (
        "the unlabeled data has no column 'reference' for json_exact (it has prompt): "
        "a reward on unlabelled prompts must judge without a gold answer"
    )
    assert "stages[0].grpo.rewards[1].args['column']" not in v
    v = problems(spec_of(data_root, {"rewards": [{"name": "json_valid"}]}, {}), data_root)
    assert v["data.train.path"] == "required by the grpo stage(s)"  # prompts: train (the default)


def test_use_ci_low_needs_a_metric_with_an_interval(data_root):
    gates = [
        {"model": "base_teacher", "metric": "json_exact", "min": 0.1, "use_ci_low": True},
        {"model": "base_teacher", "metric": "json_fields", "min": 0.1, "use_ci_low": True},
        {"model": "base_teacher", "metric": "tokens_per_s", "min": 1, "use_ci_low": True},
    ]
    evaluate = {"metrics": [{"name": "json_exact"}, {"name": "json_fields"}], "gates": gates}
    spec = parse(
        {
            "teacher": {"path": str(data_root)},
            "data": {"test": {"path": "eval.jsonl"}},
            "stages": [{"evaluate": evaluate}],
        }
    )
    v = problems(spec, data_root)
    assert "stages[0].evaluate.gates[0].use_ci_low" not in v
    assert v["stages[0].evaluate.gates[1].use_ci_low"].startswith("json_fields has no 95% interval")
    assert v["stages[0].evaluate.gates[2].use_ci_low"].startswith("tokens_per_s has no 95% interval")


def test_advantages_are_what_the_plot_reads():
    """The reward plotted is the step's mean reward, not a count: 5 of 8 samples right -> 0.625."""
    m = grpo_step_metrics(1, [0, 1, 0, 0, 1, 1, 1, 1])
    assert m["reward"] == pytest.approx(0.625) and m["frac_reward_zero_std"] == 0.5
    assert m["reward_std"] == pytest.approx(np.mean([np.std([0, 1, 0, 0], ddof=1), 0.0]))


def test_gates_name_a_module_metric_as_the_report_does():
    """The scorer reports examples.arith.reward:correct as `correct`: a gate on that name is
    accepted (it was refused, and one on the full name accepted, then read nan and failed the job)."""
    from stillroom.services.ladder_checks import check_evaluate_stages
    from stillroom.services.violations import Violations

    def gate_problems(metric: str) -> dict[str, str]:
        evaluate = pb.EvaluateStage(metrics=[pb.RewardFunction(name="examples.arith.reward:correct")])
        evaluate.gates.add(model="teacher_grpo", baseline="base_teacher", metric=metric, min_margin=0.05)
        stages = [pb.Stage(name="grpo", grpo=pb.GrpoStage()), pb.Stage(name="evaluate", evaluate=evaluate)]
        v = Violations()
        check_evaluate_stages(pb.JobSpec(stages=stages), v)
        return dict(v.items)

    assert gate_problems("correct") == {}
    assert gate_problems("examples.arith.reward:correct")["stages[1].evaluate.gates[0].metric"].startswith(
        "must be one of build_s, correct, correct@update, parameters"
    )
