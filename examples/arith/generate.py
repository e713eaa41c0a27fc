"""Seeded generator of the arithmetic task: "What is 47 * 6?" -> "282", a two-digit number times
a one-digit one. Verifiable (the product is the answer), and SmolLM2-135M-Instruct already gets
about a third right greedily (30 rows: 0.30), so a group of 8 samples usually holds both a right
and a wrong answer: GRPO has signal from its first step. Train and test share no question.

Run: python -m examples.arith.generate [--out examples/arith/data] [--seed 0] [--test 200]
Writes train.jsonl and test.jsonl: rows of `prompt` and `answer` (the product, as text).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TEMPLATE = "What is {a} * {b}? Answer with just the number."


def rows(pairs: list[tuple[int, int]]) -> list[dict[str, str]]:
    return [{"prompt": TEMPLATE.format(a=a, b=b), "answer": str(a * b)} for a, b in pairs]


def generate(seed: int = 0, test: int = 200) -> dict[str, list[dict[str, str]]]:
    """All 720 questions (10..99 times 2..9), shuffled: `test` held out, the rest to train on."""
    pairs = [(a, b) for a in range(10, 100) for b in range(2, 10)]
    random.Random(seed).shuffle(pairs)
    return {"test": rows(pairs[:test]), "train": rows(pairs[test:])}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test", type=int, default=200, help="held-out questions (of 720)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for split, split_rows in generate(args.seed, args.test).items():
        path = args.out / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in split_rows))
        print(f"{path}: {len(split_rows)} rows")


if __name__ == "__main__":
    main()
