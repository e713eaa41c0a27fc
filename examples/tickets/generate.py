"""Seeded generator of the support-ticket task: a free-text ticket plus the product's policy in the
handbook -> a JSON decision. The ticket alone gives the category and priority; only the handbook
says whether the product's charges and damages are refunded and which team handles it, so a model
must retrieve the policy or memorise it. The shape real teams have: a few hundred hand-labelled
tickets, a few thousand unlabelled ones, a labelled held-out split, all disjoint; and a policy
update (teams reassigned, refund rules changed) with held-out tickets labelled by the new rules.

Run: python -m examples.tickets.generate [--out examples/tickets/data] [--seed 0]
Writes train, unlabeled, test, handbook, handbook_updated and test_updated (.jsonl).
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

INSTRUCTION = (
    "Read the support ticket and answer with JSON: "
    '{"category": billing|shipping|technical|account, "priority": low|medium|high, '
    '"refund": true|false, "team": the escalation team the product policy names}.'
)
BRANDS = "Aero Nimbus Pixel Orbit Kite Vega Lumen Drift Nova Echo Zephyr Quartz Tundra Maple Cobalt Falcon".split()
ITEMS = "kettle router lamp headphones backpack blender monitor scooter".split()
TEAMS = "aster birch cedar delta ember fjord".split()
NAMES = "Ana Ben Chloe Dev Emma Farid Grace Hiro Ines Jonas Kara Liam Mei Noah Olga Priya Quinn Rosa Sam Tariq".split()
ISSUES = {
    "billing": [
        ("I was charged twice for my {p}", "double_charge"),
        ("the invoice for my {p} shows the wrong amount", "wrong_amount"),
        ("I need a copy of the receipt for my {p}", "receipt"),
        ("my card was declined when paying for the {p}", "declined"),
    ],
    "shipping": [
        ("my {p} has not arrived yet", "late"),
        ("the {p} box arrived damaged", "damaged"),
        ("I want to change the delivery address for my {p}", "address"),
    ],
    "technical": [
        ("my {p} stopped working", "broken"),
        ("the {p} keeps disconnecting", "flaky"),
        ("how do I update the firmware on my {p}", "howto"),
    ],
    "account": [
        ("I cannot log in to the app of my {p}", "login"),
        ("please delete the account of my {p}", "delete"),
        ("I want to change the email for my {p}", "email"),
    ],
}
REFUNDABLE = {"double_charge", "wrong_amount", "damaged"}  # issues a policy may refund
URGENT = ["This is urgent.", "I need this fixed today.", "Our whole team is blocked.", "Please help ASAP."]
CALM = ["No rush.", "Whenever you have time.", "Just a quick question."]


@dataclass(frozen=True)
class Policy:
    product: str
    refunds: bool  # are double charges, wrong amounts and damaged deliveries refunded
    team: str

    @property
    def id(self) -> str:
        return "policy-" + self.product.lower().replace(" ", "-")

    def document(self) -> dict:
        refunds = "refunded" if self.refunds else "not refunded (replacement or credit only)"
        text = f"Double charges, wrong amounts and damaged deliveries: {refunds}. Escalation team: {self.team}."
        return {"id": self.id, "title": f"{self.product} policy", "text": text}


def handbook(rng: random.Random, products: int = 48) -> list[Policy]:
    names = rng.sample([f"{b} {i}" for b in BRANDS for i in ITEMS], products)
    return [Policy(p, rng.random() < 0.5, rng.choice(TEAMS)) for p in names]


def updated(rng: random.Random, policies: list[Policy], fraction: float = 0.5) -> list[Policy]:
    """The handbook after an update: a fraction of the products get another team and the
    opposite refund rule."""
    changed = set(rng.sample(range(len(policies)), int(len(policies) * fraction)))
    return [
        replace(p, refunds=not p.refunds, team=rng.choice([t for t in TEAMS if t != p.team])) if i in changed else p
        for i, p in enumerate(policies)
    ]


def decide(category: str, issue: str, urgent: bool, calm: bool, enterprise: bool, policy: Policy) -> dict:
    """The rules a reviewer applies; the labels follow from the ticket and its product's policy."""
    if urgent or enterprise or issue in ("login", "double_charge"):
        priority = "high"
    elif calm or issue in ("howto", "receipt", "email"):
        priority = "low"
    else:
        priority = "medium"
    refund = issue in REFUNDABLE and policy.refunds
    return {"category": category, "priority": priority, "refund": refund, "team": policy.team}


def ticket(rng: random.Random, policy: Policy) -> tuple[str, dict]:
    category = rng.choice(list(ISSUES))
    text, issue = rng.choice(ISSUES[category])
    name, days = rng.choice(NAMES), rng.randint(1, 60)
    urgent, calm, enterprise = rng.random() < 0.25, rng.random() < 0.2, rng.random() < 0.15
    parts = [
        f"Hi, {name} here.",
        text.format(p=policy.product) + f" (order #{rng.randint(10000, 99999)}, bought {days} days ago).",
    ]
    parts += [rng.choice(URGENT)] if urgent else []
    parts += [rng.choice(CALM)] if calm and not urgent else []
    parts += ["We are on the enterprise plan."] if enterprise else []
    return " ".join(parts), decide(category, issue, urgent, calm and not urgent, enterprise, policy)


def rows(rng: random.Random, policies: list[Policy], size: int, seen: set[str], labelled: bool) -> list[dict]:
    out: list[dict] = []
    while len(out) < size:
        policy = rng.choice(policies)
        text, label = ticket(rng, policy)
        if text in seen:  # splits are disjoint, and no split repeats a ticket
            continue
        seen.add(text)
        row = {"prompt": f"{INSTRUCTION}\nTicket: {text}", "policy_id": policy.id}
        out.append(row | ({"completion": json.dumps(label), **label} if labelled else {}))
    return out


def generate(seed: int = 0, labelled: int = 300, unlabeled: int = 3000, test: int = 200) -> dict[str, list[dict]]:
    rng, seen = random.Random(seed), set()
    policies = handbook(rng)
    new = updated(rng, policies)
    changed = [p for p, q in zip(policies, new, strict=True) if p != q]
    return {
        "train": rows(rng, policies, labelled, seen, True),
        "unlabeled": rows(rng, policies, unlabeled, seen, False),
        "test": rows(rng, policies, test, seen, True),
        # held-out tickets about the products whose policy changed, labelled by the new policy
        "test_updated": rows(rng, [q for q in new if q.product in {p.product for p in changed}], test, seen, True),
        "handbook": [p.document() for p in policies],
        "handbook_updated": [p.document() for p in new],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for split, split_rows in generate(args.seed).items():
        path = args.out / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in split_rows))
        print(f"{path}: {len(split_rows)} rows")


if __name__ == "__main__":
    main()
