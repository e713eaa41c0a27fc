"""Audit maths on hand-checkable inputs: shingles, Jaccard, near duplicates, leakage, thresholds."""

from __future__ import annotations

import json

import numpy as np
from stillroom.actors.common.datasets import Example
from stillroom.actors.stages.audit import (
    audit_split,
    jaccard,
    leakage,
    length_stats,
    near_duplicate_pairs,
    shingles,
    violations,
)
from stillroom.v1 import job_pb2 as pb


def words(texts):
    return [len(t.split()) for t in texts]


def test_shingles_and_jaccard_by_hand():
    a, b = shingles("the cat sat on the mat"), shingles("the cat sat on a mat")
    # 3-grams: {the cat sat, cat sat on, sat on the, on the mat} vs {the cat sat, cat sat on, sat on a, on a mat}
    assert a.size == 4 and b.size == 4
    assert jaccard(a, b) == 2 / 6
    assert jaccard(a, a) == 1.0


def test_near_duplicates_found_and_distinct_texts_not():
    base = "please refund my order of the blue kettle that arrived broken yesterday morning"
    texts = [base, base + " thanks", "how do I change the email address on my account settings page", base.upper()]
    pairs = near_duplicate_pairs(texts, threshold=0.8)
    assert [(i, j) for i, j, _ in pairs] == [(0, 1), (0, 3), (1, 3)]
    # 13 words -> 11 shingles; one more word adds one: Jaccard 11/12. Case is normalised away: 1.0.
    assert {round(s, 3) for _, _, s in pairs} == {round(11 / 12, 3), 1.0}


def test_near_duplicates_agree_with_brute_force():
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(30)]
    texts = [" ".join(rng.choice(vocab, 12)) for _ in range(60)]
    texts += [t + " extra" for t in texts[:10]]
    brute = {
        (i, j)
        for i in range(len(texts))
        for j in range(i + 1, len(texts))
        if jaccard(shingles(texts[i]), shingles(texts[j])) >= 0.7
    }
    found = {(i, j) for i, j, _ in near_duplicate_pairs(texts, 0.7, num_perm=128, bands=32)}
    assert found <= brute and len(found) >= 0.9 * len(brute) and len(brute) >= 10


def test_audit_split_counts():
    ex = [
        Example("what is 2+2", "4"),
        Example("what is 2+2", "5"),
        Example("what is 2+2", "4"),
        Example("", "x"),
        Example("capital of france", json.dumps({"city": "Paris"})),
    ]
    r = audit_split(ex, words, pb.AuditStage(label_fields=["city"]))
    assert (r["rows"], r["empty_prompt"], r["duplicate_rows"], r["conflicting_prompts"]) == (5, 1, 1, 1)
    assert r["duplicate_fraction"] == 0.2
    assert r["labels"]["city"] == {"None": 4, "Paris": 1}
    # prompt + answer: "capital of france" + {"city": "Paris"} is 5 words; the empty prompt row is 1
    assert r["tokens"]["max"] == 5 and r["tokens"]["min"] == 1


def test_leakage_exact_and_near():
    train = ["refund my broken kettle order number one two three", "reset my password please"]
    test = [
        "Refund my  broken kettle order number one two three",
        "refund my broken kettle order number one two four",
        "entirely different question about shipping times",
    ]
    r = leakage(train, test, threshold=0.6)
    assert (r["exact"], r["near"], r["rows"]) == (1, 1, [1, 2])
    assert r["fraction"] == round(2 / 3, 6)


def test_thresholds_become_violations():
    report = {
        "splits": {
            "train": {"rows": 3, "empty_fraction": 0.0, "duplicate_fraction": 0.5, "near_duplicate_fraction": 0.0}
        },
        "leakage": {"train/test": {"fraction": 0.1, "exact": 1, "near": 0}},
    }
    v = violations(report, pb.AuditStage(min_rows=10))
    assert v == [
        "train has 3 rows, fewer than min_rows 10",
        "train duplicate_fraction 0.500 > max 0.05",
        "train/test leakage 0.100 > max 0 (1 exact, 0 near)",
    ]
    assert violations(report, pb.AuditStage(max_duplicate_fraction=0.6, max_leakage_fraction=0.2)) == []


def test_length_stats():
    s = length_stats([1, 2, 3, 4, 100], max_tokens=50)
    assert (s["min"], s["p50"], s["max"], s["over_max_tokens"], s["mean"]) == (1, 3, 100, 1, 22.0)
