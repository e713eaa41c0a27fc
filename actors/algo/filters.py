"""Which teacher samples a student learns from. Pure functions over one prompt group at a time
(the n samples the teacher wrote for one input); each returns the indices to keep.

Gold labels are the rare case (a team labels a few hundred tickets and has thousands more), so two
filters need none: `valid_only` (a validity reward such as json_valid must be positive) and
`majority_vote` (keep one sample carrying the answer most of the n samples agree on, and record how
many agreed). `best_of_n` and `min_reward` use whatever reward the scorers computed.
"""

from __future__ import annotations

import json
from collections import Counter


def canonical(text: str) -> str:
    """An answer in a form where equal answers compare equal: a JSON object with sorted keys and
    no whitespace, else the text lower-cased with whitespace collapsed."""
    stripped = text.strip()
    try:
        value = json.loads(stripped)
        if isinstance(value, dict):
            return json.dumps(value, sort_keys=True, separators=(",", ":"))
    except (json.JSONDecodeError, ValueError):
        pass
    return " ".join(stripped.lower().split())


def best_of_n(rewards: list[float | None]) -> list[int]:
    """The sample with the highest reward (the first, on ties); none when nothing was scored."""
    scored = [(r, -i) for i, r in enumerate(rewards) if r is not None]
    return [-max(scored)[1]] if scored else []


def min_reward(rewards: list[float | None], threshold: float) -> list[int]:
    """Every sample whose reward reaches the threshold (rejection sampling)."""
    return [i for i, r in enumerate(rewards) if r is not None and r >= threshold]


def valid_only(validity: list[float | None]) -> list[int]:
    """Every sample a validity reward passed (> 0)."""
    return [i for i, v in enumerate(validity) if v is not None and v > 0]


def majority_vote(completions: list[str], eligible: list[int] | None = None) -> tuple[list[int], float]:
    """([the first sample with the most common answer], the fraction of the n samples that gave it).
    `eligible` limits the vote (e.g. to valid samples); the agreement is still over all n."""
    pool = list(range(len(completions))) if eligible is None else eligible
    if not pool:
        return [], 0.0
    counts = Counter(canonical(completions[i]) for i in pool)
    answer, votes = max(
        counts.items(), key=lambda kv: (kv[1], -min(i for i in pool if canonical(completions[i]) == kv[0]))
    )
    first = next(i for i in pool if canonical(completions[i]) == answer)
    return [first], votes / len(completions)


def select(
    kind: str, rewards: list[float | None], completions: list[str], threshold: float = 0.0, min_agreement: float = 0.0
) -> tuple[list[int], float | None]:
    """The samples of one prompt group that filter `kind` keeps, and (majority_vote only) the
    agreement: best_of_n, min_reward (at `threshold`), valid_only, or majority_vote among the samples
    the rewards call valid (all of them when nothing was scored), kept only at `min_agreement`."""
    if kind == "best_of_n":
        return best_of_n(rewards), None
    if kind == "min_reward":
        return min_reward(rewards, threshold), None
    if kind == "valid_only":
        return valid_only(rewards), None
    valid = valid_only(rewards) if any(r is not None for r in rewards) else None
    chosen, agreement = majority_vote(completions, valid)
    return (chosen if agreement >= min_agreement else []), agreement
