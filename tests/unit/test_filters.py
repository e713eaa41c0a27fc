"""Distillation filters by hand: best-of-n, rejection sampling, validity, majority vote."""

from __future__ import annotations

from actors.filters import best_of_n, canonical, majority_vote, min_reward, valid_only


def test_canonical_answers():
    assert canonical(' {"b": 1, "a": true} ') == canonical('{"a":true,"b":1}') == '{"a":true,"b":1}'
    assert canonical("  Refund   NOW ") == "refund now"
    assert canonical("[1, 2]") == "[1, 2]"  # not an object: compared as text


def test_reward_filters():
    assert best_of_n([0.1, None, 0.7, 0.7]) == [2]
    assert best_of_n([None, None]) == []
    assert min_reward([0.1, None, 0.7, 0.5], threshold=0.5) == [2, 3]
    assert valid_only([1.0, 0.0, None, 1.0]) == [0, 3]


def test_majority_vote_by_hand():
    samples = ['{"category": "billing"}', "nonsense", '{ "category":"billing" }', '{"category": "shipping"}']
    assert majority_vote(samples) == ([0], 0.5)
    # only valid samples vote; agreement stays a fraction of all four
    assert majority_vote(samples, eligible=[1, 3]) == ([1], 0.25)
    assert majority_vote(["a", "b"]) == ([0], 0.5)  # a tie goes to the earliest answer
    assert majority_vote([], eligible=[]) == ([], 0.0)
