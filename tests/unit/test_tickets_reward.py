"""The main job's RFT verifier (examples/tickets/reward.py:policy_followed) needs no gold label,
yet agrees with the gold labels: on every held-out ticket, before and after the policy update, the
labelled answer scores 1.0 with its policy retrieved beside another, and each wrong field costs a
third. Prompts are rendered by the job's own retrieval template (`retrieval.place`)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from stillroom.actors.common.retrieval import Document, Settings, place
from stillroom.services.recipes import load
from stillroom.services.validation import validate
from stillroom.services.violations import Policy

from examples.tickets import generate
from examples.tickets.reward import policy_followed, triage_followed

SETTINGS = Settings(top_k=2, template="Product policies:\n{passages}\n\n{prompt}", passage_template="{title}: {text}")


def prompts_with_policies(rows: list[dict], handbook: list[dict], seed: int = 0) -> list[str]:
    """Each row's prompt with its own policy and a random other one, in a random order."""
    rng, docs = random.Random(seed), {d["id"]: Document(d["id"], d["text"], d["title"]) for d in handbook}
    out = []
    for r in rows:
        other = rng.choice([d for k, d in docs.items() if k != r["policy_id"]])
        shown = [docs[r["policy_id"]], other]
        rng.shuffle(shown)
        out.append(place(SETTINGS, r["prompt"], shown))
    return out


def test_gold_answers_score_one_on_both_handbooks():
    splits = generate.generate(seed=0)
    for rows, handbook in ((splits["test"], splits["handbook"]), (splits["test_updated"], splits["handbook_updated"])):
        prompts = prompts_with_policies(rows, handbook)
        assert policy_followed(prompts, [r["completion"] for r in rows]) == [1.0] * len(rows)
    # the old answers under the updated handbook: every changed product's team (and refund) is wrong
    rows = splits["test_updated"]
    old = {r["prompt"]: r for r in splits["test"]}
    scores = policy_followed(prompts_with_policies(rows, splits["handbook"]), [r["completion"] for r in rows])
    assert max(scores) < 1.0 and not old.keys() & {r["prompt"] for r in rows}


def test_each_wrong_field_costs_a_third():
    splits = generate.generate(seed=0)
    row = next(r for r in splits["test"] if r["refund"])  # a refunded ticket
    prompt = prompts_with_policies([row], splits["handbook"])[0]
    gold = json.loads(row["completion"])
    other_team = next(t for t in generate.TEAMS if t != gold["team"])
    answers = [
        gold | {"team": other_team},
        gold | {"refund": False},
        gold | {"refund": "yes"},  # not a boolean: not well formed and not the refund
        gold | {"priority": "urgent"},  # priority is not the verifier's to judge, but its form is
        {"team": gold["team"], "refund": True},  # missing fields
    ]
    completions = [json.dumps(a) for a in answers] + ["refund: yes, team " + gold["team"]]
    thirds = [2 / 3, 2 / 3, 1 / 3, 2 / 3, 2 / 3, 0.0]
    assert policy_followed([prompt] * len(completions), completions) == thirds


def test_a_ticket_whose_policy_was_not_retrieved_is_not_judged():
    splits = generate.generate(seed=0)
    row = splits["test"][0]
    others = [d for d in splits["handbook"] if d["id"] != row["policy_id"]][:2]
    prompt = place(SETTINGS, row["prompt"], [Document(d["id"], d["text"], d["title"]) for d in others])
    assert policy_followed([prompt], [row["completion"]]) == [None]


def test_the_triage_guide_agrees_with_every_gold_label_and_halves_per_wrong_field():
    """examples/tickets/reward.py:triage_followed judges category and priority from the ticket's words
    alone: every gold answer of the labelled splits scores 1.0, each wrong field costs a half."""
    splits = generate.generate(seed=0)
    rows = splits["train"] + splits["test"] + splits["test_updated"]
    prompts = prompts_with_policies(rows, splits["handbook"])
    assert triage_followed(prompts, [r["completion"] for r in rows]) == [1.0] * len(rows)
    gold = json.loads(rows[0]["completion"])
    category = next(c for c in generate.ISSUES if c != gold["category"])
    priority = next(p for p in ("low", "medium", "high") if p != gold["priority"])
    answers = [
        gold | {"category": category},
        gold | {"priority": priority},
        gold | {"category": category, "priority": priority},
    ]
    completions = [json.dumps(a) for a in answers] + ["high priority billing"]
    assert triage_followed([prompts[0]] * 4, completions) == [0.5, 0.5, 0.0, 0.0]
    assert triage_followed(["Ticket: hello, my dog ate my homework"], [rows[0]["completion"]]) == [None]


def test_the_main_job_rewards_its_grpo_stage_with_both_verifiers(tmp_path):
    """examples/tickets_pipeline.yaml (and the quick job that extends it) validate where demo.sh
    serves them, their grpo stage on the unlabelled tickets with both verifiers."""
    root = Path(__file__).resolve().parents[2]
    for name in ("tickets_pipeline.yaml", "tickets_quick.yaml"):
        shutil.copy(root / "examples" / name, tmp_path / name)
    generate.main(["--out", str(tmp_path / "examples" / "tickets" / "data")])
    for name in ("tickets_pipeline.yaml", "tickets_quick.yaml"):
        spec, _ = load(tmp_path / name)
        checked, _ = validate(spec, Policy((tmp_path,), reward_modules=("examples",)))
        grpo = next(s.grpo for s in checked.stages if s.WhichOneof("kind") == "grpo")
        assert grpo.prompts == "unlabeled"
        assert [r.name.rsplit(":", 1)[1] for r in grpo.rewards] == ["policy_followed", "triage_followed"]
