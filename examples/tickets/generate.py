"""Seeded generator of the support-ticket task: free-text tickets -> a JSON decision made by
business rules. The shape real teams have: a few hundred hand-labelled tickets, a few thousand
unlabelled ones, and a labelled held-out test split, all disjoint.

Run: python -m examples.tickets.generate [--out examples/tickets/data] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

INSTRUCTION = (
    "Read the support ticket and answer with JSON: "
    '{"category": billing|shipping|technical|account, "priority": low|medium|high, "refund": true|false}.'
)
PRODUCTS = [
    "Aero kettle",
    "Nimbus router",
    "Pixel lamp",
    "Orbit headphones",
    "Kite backpack",
    "Vega blender",
    "Lumen monitor",
    "Drift scooter",
    "Nova keyboard",
    "Echo speaker",
]
NAMES = [
    "Ana",
    "Ben",
    "Chloe",
    "Dev",
    "Emma",
    "Farid",
    "Grace",
    "Hiro",
    "Ines",
    "Jonas",
    "Kara",
    "Liam",
    "Mei",
    "Noah",
    "Olga",
    "Priya",
    "Quinn",
    "Rosa",
    "Sam",
    "Tariq",
]
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
        ("I cannot log in to my account", "login"),
        ("please delete my account", "delete"),
        ("I want to change the email on my account", "email"),
    ],
}
URGENT = ["This is urgent.", "I need this fixed today.", "Our whole team is blocked.", "Please help ASAP."]
CALM = ["No rush.", "Whenever you have time.", "Just a quick question."]


def decide(category: str, issue: str, days: int, urgent: bool, calm: bool, enterprise: bool) -> dict:
    """The business rules that a reviewer applies; the labels follow from them exactly."""
    refund = category == "billing" and issue in ("double_charge", "wrong_amount") and days <= 30
    if category == "shipping" and issue == "damaged":
        refund = days <= 14
    if urgent or enterprise or issue in ("login", "double_charge"):
        priority = "high"
    elif calm or issue in ("howto", "receipt", "email"):
        priority = "low"
    else:
        priority = "medium"
    return {"category": category, "priority": priority, "refund": refund}


def ticket(rng: random.Random) -> tuple[str, dict]:
    category = rng.choice(list(ISSUES))
    text, issue = rng.choice(ISSUES[category])
    product, name, days = rng.choice(PRODUCTS), rng.choice(NAMES), rng.randint(1, 60)
    urgent, calm, enterprise = rng.random() < 0.25, rng.random() < 0.2, rng.random() < 0.15
    parts = [
        f"Hi, {name} here.",
        text.format(p=product) + f" (order #{rng.randint(10000, 99999)}, bought {days} days ago).",
    ]
    parts += [rng.choice(URGENT)] if urgent else []
    parts += [rng.choice(CALM)] if calm and not urgent else []
    parts += ["We are on the enterprise plan."] if enterprise else []
    return " ".join(parts), decide(category, issue, days, urgent, calm and not urgent, enterprise)


def prompt(text: str) -> str:
    return f"{INSTRUCTION}\nTicket: {text}"


def generate(seed: int = 0, labelled: int = 300, unlabeled: int = 3000, test: int = 200) -> dict[str, list[dict]]:
    rng, seen = random.Random(seed), set()
    splits: dict[str, list[dict]] = {"train": [], "unlabeled": [], "test": []}
    sizes = {"train": labelled, "unlabeled": unlabeled, "test": test}
    for split, size in sizes.items():
        while len(splits[split]) < size:
            text, label = ticket(rng)
            if text in seen:  # splits are disjoint, and no split repeats a ticket
                continue
            seen.add(text)
            row = {"prompt": prompt(text)}
            if split != "unlabeled":
                row |= {"completion": json.dumps(label), **label}
            splits[split].append(row)
    return splits


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for split, rows in generate(args.seed).items():
        path = args.out / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{path}: {len(rows)} rows")


if __name__ == "__main__":
    main()
