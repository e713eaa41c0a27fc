"""The main job's RFT verifier (examples/tickets/reward.py:policy_followed) needs no gold label,
yet agrees with the gold labels: on every held-out ticket, before and after the policy update, the
labelled answer scores 1.0 with its policy retrieved beside another, and each wrong field costs a
third. Prompts are rendered by the job's own retrieval template (`retrieval.place`)."""

from __future__ import annotations

import json
import random

from stillroom.actors.common.retrieval import Document, Settings, place

from examples.tickets import generate
from examples.tickets.reward import policy_followed

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
