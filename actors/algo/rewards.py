"""Built-in reward functions, with the signature TRL users already write:

    fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]

`columns` are the dataset's other columns, one value per sample (e.g. answer=[...]); a job's
RewardFunction.args bind keyword options (which column holds the reference, a regex, ...).
None means "no score for this sample" (e.g. no reference to compare with).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

Reward = Callable[..., list[float | None]]


def _column(columns: dict[str, list], name: str, n: int) -> list:
    values = columns.get(name)
    if values is None:
        raise KeyError(f"this reward needs the dataset column {name!r}")
    if len(values) != n:
        raise ValueError(f"column {name!r} has {len(values)} values for {n} completions")
    return list(values)


def exact_match(prompts: list[str], completions: list[str], column: str = "answer", **columns) -> list[float | None]:
    """1.0 when the completion, stripped, equals the reference, else 0.0."""
    refs = _column(columns, column, len(completions))
    return [None if r is None else float(c.strip() == str(r).strip()) for c, r in zip(completions, refs, strict=True)]


_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?")


def last_number(text: str) -> float | None:
    """The last number written in the text ("#### 1,234" -> 1234.0), or None."""
    found = _NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def numeric_match(
    prompts: list[str], completions: list[str], column: str = "answer", tolerance: str | float = 1e-6, **columns
) -> list[float | None]:
    """1.0 when the last number in the completion equals the reference within `tolerance`."""
    refs, tol = _column(columns, column, len(completions)), float(tolerance)
    out: list[float | None] = []
    for c, r in zip(completions, refs, strict=True):
        ref = last_number(str(r)) if r is not None else None
        got = last_number(c)
        out.append(None if ref is None else float(got is not None and math.isclose(got, ref, abs_tol=tol)))
    return out


def regex_format(prompts: list[str], completions: list[str], pattern: str = "", **columns) -> list[float | None]:
    """1.0 when the whole completion matches `pattern` (re.DOTALL), else 0.0."""
    compiled = re.compile(pattern, re.DOTALL)
    return [float(compiled.fullmatch(c.strip()) is not None) for c in completions]


def length_penalty(
    prompts: list[str], completions: list[str], max_chars: str | int = 512, **columns
) -> list[float | None]:
    """0 up to max_chars, then -(excess / max_chars), down to -1."""
    limit = int(max_chars)
    return [-min(1.0, max(0, len(c) - limit) / limit) for c in completions]


def parse_json_object(text: str) -> dict[str, Any] | None:
    """The completion as a JSON object (surrounding whitespace and a ```json fence allowed), or None."""
    text = text.strip()
    if text.startswith("```"):
        text = text.strip("`").removeprefix("json").strip()
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def json_valid(prompts: list[str], completions: list[str], **columns) -> list[float | None]:
    """1.0 when the completion is a JSON object."""
    return [float(parse_json_object(c) is not None) for c in completions]


def json_fields(
    prompts: list[str], completions: list[str], column: str = "reference", fields: str = "", **columns
) -> list[float | None]:
    """Fraction of the reference object's fields (or the comma-separated `fields`) that the
    completion's JSON object has with equal values; 0.0 when the completion is not a JSON object."""
    refs = _column(columns, column, len(completions))
    wanted = [f.strip() for f in fields.split(",") if f.strip()]
    out: list[float | None] = []
    for c, r in zip(completions, refs, strict=True):
        ref = r if isinstance(r, dict) else parse_json_object(str(r)) if r is not None else None
        if ref is None:
            out.append(None)
            continue
        keys = wanted or list(ref)
        got = parse_json_object(c)
        out.append(0.0 if got is None else sum(got.get(k) == ref.get(k) for k in keys) / max(1, len(keys)))
    return out


def json_exact(
    prompts: list[str], completions: list[str], column: str = "reference", fields: str = "", **columns
) -> list[float | None]:
    """1.0 when every field of json_fields matches (the whole answer is right), else 0.0."""
    fractions = json_fields(prompts, completions, column, fields, **columns)
    return [None if f is None else float(f == 1.0) for f in fractions]


BUILTINS: dict[str, Reward] = {
    "exact_match": exact_match,
    "numeric_match": numeric_match,
    "regex_format": regex_format,
    "length_penalty": length_penalty,
    "json_valid": json_valid,
    "json_fields": json_fields,
    "json_exact": json_exact,
}
