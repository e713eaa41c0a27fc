"""Fixtures of the service tests: the labelled task a tiny model can learn."""

from __future__ import annotations

import pytest

from tests.conftest import write_jsonl

KINDS = {"billing": "refund", "shipping": "priority", "account": "order"}  # one token each


def task_rows(n: int, offset: int = 0) -> list[dict]:
    """A mapping a tiny model can learn: the kind of request decides the one-word answer."""
    rows = []
    for i in range(offset, offset + n):
        kind = list(KINDS)[i % 3]
        rows.append({"prompt": f"ticket {i} about {kind} order", "completion": KINDS[kind]})
    return rows


@pytest.fixture
def sft_data(data_root):
    write_jsonl(data_root / "sft_train.jsonl", task_rows(96))
    write_jsonl(data_root / "sft_eval.jsonl", task_rows(24, offset=1000))
    return data_root
