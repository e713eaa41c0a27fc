"""Distillation filters by hand: best-of-n, rejection sampling, validity, majority vote."""

from __future__ import annotations

import pytest
from stillroom.actors.algo.filters import best_of_n, canonical, majority_vote, min_reward, valid_only


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


def test_distill_retokenizes_for_a_student_with_another_tokenizer(tiny_tokenizer, tmp_path):
    """Sequence-level KD across tokenizers: the kept teacher texts are encoded with the student's."""
    from stillroom.actors.runtime.batches import make_batch
    from stillroom.actors.stages.distill import DistillConfig, foreign_tokenizer, prepare
    from stillroom.v1 import job_pb2 as pb
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    other = Tokenizer(models.WordLevel(unk_token="<unk>"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    other.train_from_iterator(
        ["ticket billing refund order"], trainers.WordLevelTrainer(special_tokens=["<unk>", "<eos>"])
    )
    PreTrainedTokenizerFast(tokenizer_object=other, unk_token="<unk>", eos_token="<eos>").save_pretrained(
        tmp_path / "s"
    )
    student = foreign_tokenizer(str(tiny_tokenizer), str(tmp_path / "s"))
    assert student is not None and foreign_tokenizer(str(tiny_tokenizer), str(tiny_tokenizer)) is None
    cfg = DistillConfig.of(pb.DistillStage(num_samples=2, filter="best_of_n"))
    batch = make_batch(
        "b",
        {
            "prompt": ["ticket billing", "ticket billing"],
            "completion": ["refund", "order"],
            "reward": [0.2, 0.9],
            "prompt_ids": [[1], [1]],
            "completion_ids": [[2], [3]],
        },
    )
    arrays, _ = prepare(batch, cfg, student_tokenizer=student)
    vocab = AutoTokenizer.from_pretrained(tmp_path / "s").get_vocab()
    # best of the two is "order"; prompt + answer + eos in the student's vocabulary
    assert arrays["input_ids"][0].tolist() == [vocab["ticket"], vocab["billing"], vocab["order"], vocab["<eos>"]]
    assert "topk_ids" not in arrays


def test_distill_epochs_replay_the_teachers_batches_and_agreement_filters():
    import dataclasses

    import pyarrow as pa
    from stillroom.actors.runtime.batches import batch_id, make_batch, replay_of
    from stillroom.actors.stages.distill import prompt_batches
    from stillroom.actors.stages.distill_samples import DistillConfig, keep
    from stillroom.v1 import job_pb2 as pb

    rows = [{"prompt": f"ticket {i}"} for i in range(10)]
    cfg = dataclasses.replace(DistillConfig.of(pb.DistillStage(prompts_per_step=4)), epochs=2)
    batches = prompt_batches(rows, "teacher", cfg, seed=1)
    first = [batch_id(b) for b in batches[:3]]  # 10 rows in batches of 4: 3 the teacher writes
    assert [b.num_rows for b in batches[:3]] == [4, 4, 2] and not any(replay_of(b) for b in batches[:3])
    assert sorted(replay_of(b) for b in batches[3:]) == sorted(first)  # epoch 2: the same 3, reordered
    assert len({batch_id(b) for b in batches}) == 6  # every step has its own id
    capped = prompt_batches(rows, "teacher", dataclasses.replace(cfg, max_steps=4), seed=1)
    assert len(capped) == 4 and sum(not replay_of(b) for b in capped) == 2  # 4 steps over 2 epochs: 2 written

    group = ['{"a": 1}', '{"a": 1}', '{"a": 2}', '{"a": 1}', '{"a": 1}', '{"a": 2}', '{"a": 3}', "x"]
    scored = make_batch("b", {"completion": group, "reward": [1.0] * 7 + [0.0]})
    agreeing = dataclasses.replace(cfg, num_samples=4, min_agreement=0.75)
    kept, metrics = keep(scored, agreeing)
    assert kept == [0] and metrics["distill/agreement"] == (0.75 + 0.25) / 2  # 3 of 4 agree, then 1 of 4
    assert keep(scored, dataclasses.replace(agreeing, min_agreement=0.0))[0] == [0, 4]
    assert isinstance(scored, pa.RecordBatch)


def test_distill_refills_short_steps_and_fails_below_min_kept_fraction():
    from stillroom.actors.runtime.context import StageFailed
    from stillroom.actors.stages.distill import DistillConfig, kept_fraction
    from stillroom.v1 import job_pb2 as pb

    cfg = DistillConfig.of(pb.DistillStage(prompts_per_step=8, samples_per_step=12, min_kept_fraction=0.1))
    refill = cfg.loop(lambda b: ({}, {}), 10, [{"prompt": "q"}], seed=0).refill
    assert refill.per_prompt == 1.5 and refill.rounds == 3  # 12 kept samples per 8 prompts; 3x at most
    assert DistillConfig.of(pb.DistillStage()).loop(None, 1, [{"prompt": "q"}], 0).refill.per_prompt == 1.0
    reported = []
    guard = kept_fraction(cfg, reported.append)
    guard({"distill/kept": 8, "distill/samples": 64})  # 0.125 so far
    with pytest.raises(StageFailed, match=r"majority_vote filter kept 9 of 128 teacher samples \(0.070\), below "):
        guard({"distill/kept": 1, "distill/samples": 64})
    assert len(reported) == 2  # the step's metrics reach the events before the stage fails
    kept_fraction(DistillConfig.of(pb.DistillStage()), reported.append)({"distill/kept": 0, "distill/samples": 64})


def test_the_stage_fails_once_rewards_fail_on_more_than_the_allowed_fraction():
    from stillroom.actors.runtime.context import StageFailed
    from stillroom.actors.stages.wiring import reward_failures

    reported = []
    guard = reward_failures(reported.append, 0.5)
    guard({"loss": 1.0})  # a step without scoring: nothing to count
    guard({"rewards/failed": 4, "rewards/samples": 16})
    guard({"rewards/failed": 9, "rewards/samples": 16})  # 13 of 32 so far: within the bound
    with pytest.raises(StageFailed, match=r"failed \(error, timeout or crash\) on 21 of 40 samples so far \(0.53\)"):
        guard({"rewards/failed": 8, "rewards/samples": 8})
    assert len(reported) == 4  # every step's metrics reach the events, the failing one too
