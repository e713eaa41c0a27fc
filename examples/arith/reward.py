"""The reward a user writes for the arithmetic task (TRL's signature): 1.0 when the number the
completion settles on is the product, else 0.0. "Settles on": the number after the last "=" when
the completion writes an equation ("47 * 6 = 282"), else its first number, so a right answer
buried in rambling after a wrong one earns nothing. No reward for format: only the answer counts.

Allowed on a server started with `stillroom serve --reward-module examples.arith` (examples/demo.sh
passes --reward-module examples).
"""

from __future__ import annotations

import re

_INT = re.compile(r"-?\d[\d,]*")


def answer_of(completion: str) -> int | None:
    """The integer a completion gives as its answer, or None."""
    tail = completion.rsplit("=", 1)[1] if "=" in completion else completion
    found = _INT.search(tail)
    return int(found.group().replace(",", "")) if found else None


def correct(prompts: list[str], completions: list[str], answer: list[str], **columns) -> list[float]:
    """1.0 per completion whose answer (answer_of) equals the row's `answer`, else 0.0."""
    return [float(answer_of(c) == int(a)) for c, a in zip(completions, answer, strict=True)]
