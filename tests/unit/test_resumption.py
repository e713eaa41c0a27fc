"""Warm starts reuse only what the new spec repeats unchanged."""

from __future__ import annotations

from stillroom.services.recipes import parse
from stillroom.services.resumption import reusable_stages


def _spec(lr: float = 0.003, seed: int = 1, steps: int = 16):
    return parse(
        {
            "teacher": {"path": "/m"},
            "data": {"train": {"path": "/d.jsonl"}},
            "stages": [
                {"audit": {"warn_only": True}},
                {"sft": {"optim": {"learning_rate": lr, "max_steps": steps}}},
                {"export": {}},
            ],
            "seed": seed,
        }
    )


def test_the_stages_a_new_spec_repeats_unchanged():
    assert reusable_stages(_spec(), _spec()) == 3
    assert reusable_stages(_spec(), _spec(lr=0.01)) == 1  # the sft changed: it and what follows run again
    assert reusable_stages(_spec(), _spec(seed=2)) == 0  # every stage depends on the seed
    changed = _spec()
    changed.resources.trainer.num_cpus = 2  # where it runs is not what it computes
    changed.max_retries = 5
    assert reusable_stages(_spec(), changed) == 3
