"""The second example (examples/arith_grpo.yaml): its recipe validates on a server laid out as
`make demo TASK=arith` lays it out (data root: the checkout, --reward-module examples), its data is
disjoint, and its reward function scores hand-made completions as a user means it to."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from stillroom.services.errors import PermissionDenied
from stillroom.services.recipes import load
from stillroom.services.validation import validate
from stillroom.services.violations import Policy

from examples.arith import generate
from examples.arith.reward import answer_of, correct

ROOT = Path(__file__).resolve().parents[2]


def test_reward_scores_hand_made_completions():
    completions = [
        "282",  # just the number
        "47 * 6 = 282",  # the equation
        "47 * 6 = 282\n\nThis is a simple multiplication.",  # rambling after the answer
        "47 * 6 = 40 * 6 + 7 * 6 = 240 + 42 = 282",  # worked: the number after the last '='
        "47 * 6 = 272",  # wrong
        "The answer is 1,282.",  # wrong, with a thousands separator
        "To multiply 47 by 6, we",  # no answer yet: its first number is 47
        "",
    ]
    assert correct(["q"] * len(completions), completions, answer=["282"] * len(completions)) == [
        1.0,
        1.0,
        1.0,
        1.0,
        0.0,
        0.0,
        0.0,
        0.0,
    ]
    assert answer_of("The answer is 1,282.") == 1282 and answer_of("no number") is None


def test_generated_splits_are_disjoint_and_right():
    splits = generate.generate(seed=0, test=200)
    assert len(splits["test"]) == 200 and len(splits["train"]) == 720 - 200
    assert not {r["prompt"] for r in splits["test"]} & {r["prompt"] for r in splits["train"]}
    row = splits["test"][0]
    a, b = (int(x) for x in row["prompt"].removeprefix("What is ").split("?")[0].split(" * "))
    assert row["answer"] == str(a * b)


def test_recipe_validates_with_the_examples_reward_module(tmp_path):
    shutil.copy(ROOT / "examples" / "arith_grpo.yaml", tmp_path / "arith_grpo.yaml")
    generate.main(["--out", str(tmp_path / "examples" / "arith" / "data")])
    spec, _ = load(tmp_path / "arith_grpo.yaml")
    checked, _ = validate(spec, Policy((tmp_path,), reward_modules=("examples",)))
    assert [s.WhichOneof("kind") for s in checked.stages] == ["grpo", "evaluate"]
    assert checked.stages[0].grpo.rewards[0].name == "examples.arith.reward:correct"
    with pytest.raises(PermissionDenied, match=r"stages\[0\].grpo.rewards\[0\].name: reward module 'examples.arith"):
        validate(spec, Policy((tmp_path,)))  # a server without --reward-module examples refuses it


def test_the_distill_variant_validates_and_keeps_the_stage_defaults(tmp_path):
    """examples/arith_distill.yaml: the GRPO teacher, a distill stage that sets only the student's
    size and the answer length (everything else at its defaults), and the three rungs."""
    for name in ("arith_grpo.yaml", "arith_distill.yaml"):
        shutil.copy(ROOT / "examples" / name, tmp_path / name)
    generate.main(["--out", str(tmp_path / "examples" / "arith" / "data")])
    spec, _ = load(tmp_path / "arith_distill.yaml")
    checked, _ = validate(spec, Policy((tmp_path,), reward_modules=("examples",)))
    assert [s.WhichOneof("kind") for s in checked.stages] == ["grpo", "distill", "evaluate"]
    distill = checked.stages[1].distill
    assert not distill.HasField("optim") and not distill.HasField("until") and distill.top_k == 0
    assert list(checked.stages[2].evaluate.rungs) == ["base_teacher", "teacher_grpo", "student"]
