"""The role classes without Ray: generation, rewards, the trainer, weight sync, the journal."""

from __future__ import annotations

import queue

import numpy as np
import pyarrow as pa
import pytest
import torch
from stillroom.actors.algo.rewards import (
    exact_match,
    json_fields,
    json_valid,
    length_penalty,
    numeric_match,
    regex_format,
)
from stillroom.actors.roles.checkpoints import latest_complete
from stillroom.actors.roles.generator import Generator, GeneratorSpec, SamplingParams
from stillroom.actors.roles.scorer import RewardScorer, RewardSpec, ScorerSpec, failure_metrics, resolve
from stillroom.actors.roles.trainer import Trainer, TrainerSpec
from stillroom.actors.runtime.batches import batch_id, make_batch, training_arrays
from stillroom.actors.runtime.channels import END, Channel, Seen, pump
from stillroom.actors.runtime.journal import Journal

from tests.unsafe_rewards import boom

PROMPTS = make_batch("b000", {"prompt": ["ticket about billing", "order shipping refund"], "answer": ["1", "2"]})


def test_generation_logprobs_match_a_teacher_forced_forward(tiny_model):
    gen = Generator(GeneratorSpec(str(tiny_model), seed=1))
    # Prompts of very different lengths: left padding under the shared-prefix cache of n samples.
    long_prompt = "order shipping refund " * 6
    prompts = make_batch("b000", {"prompt": ["ticket about billing", long_prompt], "answer": ["1", "2"]})
    out = gen.generate(prompts, SamplingParams(n=3, max_new_tokens=8, temperature=1.0, topk_logprobs=4))
    assert out.num_rows == 6 and batch_id(out) == "b000"
    assert out.column("answer").to_pylist() == ["1", "1", "1", "2", "2", "2"]
    assert out.schema.field("topk_ids").type == pa.list_(pa.int32())
    assert out.schema.field("topk_logprobs").type == pa.list_(pa.float16())
    for row in out.to_pylist():
        ids = row["prompt_ids"] + row["completion_ids"]
        logits = gen.logits(np.array([ids]))[0]
        logp = (
            logits
            - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - logits.max(-1, keepdims=True)
        )
        start = len(row["prompt_ids"])
        expected = [logp[start - 1 + t, tok] for t, tok in enumerate(row["completion_ids"])]
        np.testing.assert_allclose(row["completion_logprobs"], expected, atol=1e-4)
        k = np.array(row["topk_logprobs"], dtype=np.float32).reshape(-1, 4)
        assert np.all(k[:, 0] >= np.array(row["completion_logprobs"]) - 1e-2)  # the top-1 is the max
        assert 1 <= len(row["completion_ids"]) <= 8


def test_score_topk_grades_each_row_as_its_own_forward(tiny_model):
    """On-policy distillation's teacher grades rows of different prompt and completion lengths in
    one left-padded forward; each row's log-probs must be what a forward of that row alone gives."""
    teacher = Generator(GeneratorSpec(str(tiny_model), seed=4))
    rows = {"prompt_ids": [[5, 6, 7], [8] * 11, [9, 10]], "completion_ids": [[11, 12, 13, 14], [15], [16, 17]]}
    batched = teacher.engine._completion_logps(*rows.values())
    out = teacher.score_topk(make_batch("b000", {"prompt": ["a", "b", "c"], **rows}), 3)
    for p, c, logp, ids in zip(*rows.values(), batched, out.column("topk_ids").to_pylist(), strict=True):
        alone = torch.log_softmax(torch.tensor(teacher.logits(np.array([p + c]))[0]), -1)[len(p) - 1 : -1]
        torch.testing.assert_close(logp, alone, atol=1e-5, rtol=0)
        assert ids == torch.topk(alone, 3, dim=-1).indices.flatten().tolist()


def test_generation_logprobs_are_those_of_the_sampling_temperature(tiny_model):
    """At T = 0.7 the generator's log-probs are log_softmax(logits / 0.7) of a teacher-forced
    forward, the distribution it sampled from (what the trainer's ratio compares against)."""
    gen = Generator(GeneratorSpec(str(tiny_model), seed=3))
    out = gen.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=6, temperature=0.7))
    for row in out.to_pylist():
        ids = row["prompt_ids"] + row["completion_ids"]
        logits = torch.tensor(gen.logits(np.array([ids]))[0], dtype=torch.float64)
        logp = torch.log_softmax(logits / 0.7, dim=-1).numpy()
        start = len(row["prompt_ids"])
        expected = [logp[start - 1 + t, tok] for t, tok in enumerate(row["completion_ids"])]
        np.testing.assert_allclose(row["completion_logprobs"], expected, atol=1e-4)


def test_dapo_over_accumulation_chunks_equals_one_chunk(tiny_model, tmp_path):
    """DAPO normalises by the whole step's tokens: two accumulation chunks of very different
    lengths make the same update as one chunk holding both (per-chunk normalisation would not)."""
    from stillroom.actors.algo.objectives import GrpoObjective

    rows = make_batch(
        "b",
        {
            "prompt_ids": [[5, 6], [7, 8]],
            "completion_ids": [[9], [10, 11, 12, 13, 14, 15]],
            "completion_logprobs": [[-2.0], [-2.0] * 6],
        },
    )
    arrays = training_arrays(rows, pad_id=0)
    arrays["advantages"] = np.array([1.0, -0.5], dtype=np.float32)
    digests = []
    for accumulation, port in ((1, 29011), (2, 29012)):
        spec = TrainerSpec(
            str(tiny_model),
            adapter="none",
            learning_rate=1e-2,
            gradient_accumulation_steps=accumulation,
            master_port=port,
        )
        trainer = Trainer(spec)
        trainer.train_step(arrays, GrpoObjective("dapo"))
        digests.append(trainer.weights())
    for name, value in digests[0].items():
        np.testing.assert_allclose(value, digests[1][name], atol=1e-6, err_msg=name)


@pytest.mark.parametrize("adapter", ["none", "lora"])
def test_gradient_checkpointing_makes_the_same_step_and_bfloat16_is_mixed_precision(tiny_model, adapter):
    """Recomputing activations (optim.gradient_checkpointing) changes memory, not the step: the
    same loss and weights after it. optim.dtype bfloat16 computes in bfloat16 (a loss a little off
    the float32 one) on float32 weights, so its step is the float32 step up to bfloat16 rounding;
    unset, a trainer without a GPU computes in float32."""
    arrays, out = _arrays(), {}
    for name, fields in (("plain", {}), ("ckpt", {"gradient_checkpointing": True}), ("bf16", {"dtype": "bfloat16"})):
        trainer = Trainer(TrainerSpec(str(tiny_model), adapter=adapter, learning_rate=1e-2, **fields))
        out[name] = (trainer.train_step(arrays)["loss"], trainer.weights())
        assert trainer.spec.dtype == ("bfloat16" if name == "bf16" else "float32")
    assert out["ckpt"][0] == pytest.approx(out["plain"][0], rel=1e-6)
    assert 0 < abs(out["bf16"][0] - out["plain"][0]) < 2e-2 * out["plain"][0]
    for key, value in out["plain"][1].items():
        assert out["bf16"][1][key].dtype == np.float32
        np.testing.assert_allclose(out["ckpt"][1][key], value, atol=1e-6, err_msg=key)
        # Adam's first step moves every weight by ~lr (1e-2); bfloat16 flips only a few tiny gradients
        assert np.abs(out["bf16"][1][key] - value).mean() < 1e-3, key


def test_trainer_logprobs_are_the_generators_at_the_same_weights_and_temperature(tiny_model, tmp_path):
    """The proximal log-probs of an importance-corrected step: the trainer's own, before any update,
    equal what a generator with the same weights reports at T = 0.7, at every completion token."""
    gen = Generator(GeneratorSpec(str(tiny_model), seed=5))
    arrays = training_arrays(gen.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=6, temperature=0.7)), pad_id=0)
    trainer = Trainer(TrainerSpec(str(tiny_model), adapter="none", master_port=29013))
    proximal = trainer.logprobs({k: arrays[k] for k in ("input_ids", "attention_mask", "loss_mask")}, 0.7)
    mask = arrays["loss_mask"].astype(bool)
    np.testing.assert_allclose(proximal[mask], arrays["old_logprobs"][mask], atol=1e-4)
    assert np.all(proximal[~mask] == 0)


@pytest.mark.parametrize(("kind", "after_two_of_four"), [("constant", 1.0), ("linear", 0.5), ("cosine", 0.5)])
def test_learning_rate_schedules_follow_hf(tiny_model, kind, after_two_of_four):
    arrays = _arrays(n=2)
    spec = TrainerSpec(
        str(tiny_model), adapter="none", learning_rate=1e-2, lr_scheduler_type=kind, total_steps=4, master_port=29014
    )
    trainer = Trainer(spec)
    for _ in range(2):
        trainer.train_step(arrays)
    assert trainer.learning_rate() == pytest.approx(1e-2 * after_two_of_four)
    warm = Trainer(TrainerSpec(str(tiny_model), adapter="none", learning_rate=1e-2, warmup_steps=4, total_steps=8))
    warm.train_step(arrays)
    assert warm.learning_rate() == pytest.approx(1e-2 / 4)  # one of four warm-up steps, as HF counts them


def test_builtin_rewards_by_hand():
    p = ["q"] * 3
    assert exact_match(p, [" 4", "5", "4"], answer=["4", "4", None]) == [1.0, 0.0, None]
    assert numeric_match(p, ["so 1,234.0", "x", "12"], answer=["#### 1234", "3", "12.5"]) == [1.0, 0.0, 0.0]
    assert regex_format(p, ["<a>1</a>", "a", " <a>x</a> "], pattern=r"<a>.*</a>") == [1.0, 0.0, 1.0]
    assert length_penalty(p, ["x" * 10, "x" * 15, "x" * 40], max_chars="10") == [0.0, -0.5, -1.0]
    assert json_valid(p, ['{"a": 1}', "[1]", "nope"]) == [1.0, 0.0, 0.0]
    ref = '{"category": "billing", "refund": true}'
    assert json_fields(p, ['{"category": "billing", "refund": false}', "x", ref], reference=[ref, ref, None]) == [
        0.5,
        0.0,
        None,
    ]


def test_scorer_survives_raising_hanging_and_crashing_functions():
    """User functions run in worker processes: a hung call is killed at its timeout, a segfault
    or os._exit costs that call's scores, and the scorer goes on scoring, the next batch too."""
    spec = ScorerSpec(
        (
            RewardSpec("exact_match", weight=2.0, args=(("column", "answer"),)),
            RewardSpec("tests.unsafe_rewards:boom"),
            RewardSpec("tests.unsafe_rewards:sleepy", timeout_s=0.5),
            RewardSpec("tests.unsafe_rewards:hangs", timeout_s=0.5),
            RewardSpec("tests.unsafe_rewards:segfaults"),
            RewardSpec("tests.unsafe_rewards:exits"),
            RewardSpec("tests.unsafe_rewards:length", weight=0.5),
        ),
        allowed_modules=("tests",),
    )
    scorer = RewardScorer(spec)
    batch = make_batch("b1", {"prompt": ["a", "b"], "completion": ["1", "xy"], "answer": ["1", "2"]})
    for _ in range(2):  # the pool replaced the killed and crashed workers: a second batch scores alike
        out = scorer.score(batch)
        assert out.column("reward").to_pylist() == [2.0 + 0.5, 0.0 + 1.0]
        for name, why in (("boom", "error"), ("sleepy", "timeout"), ("hangs", "timeout")):
            assert out.column(f"rewards/{name}").to_pylist() == [None, None]
            assert out.column(f"failures/{name}").to_pylist() == [why, why]
        assert out.column("failures/segfaults").to_pylist() == ["crashed"] * 2
        assert out.column("failures/exits").to_pylist() == ["crashed"] * 2
        assert out.column("failures/length").to_pylist() == [None, None]
        assert batch_id(out) == "b1"
    m = failure_metrics(out)
    assert m["rewards/hangs/timeouts"] == 2 and m["rewards/exits/crashed"] == 2 and m["rewards/boom/errors"] == 2
    assert m["rewards/failed_fraction"] == 1.0 and m["rewards/length/errors"] == 0
    assert scorer.stats()["rewards/hangs/timeouts"] == 2.0 and scorer.stats()["rewards/segfaults/crashes"] == 2.0


def test_reward_import_paths_obey_the_allow_list():
    with pytest.raises(PermissionError, match="'os' is not in the operator's allow-list"):
        resolve("os:system", ("tests",))
    assert resolve("tests.unsafe_rewards:boom", ("tests",)) is boom
    with pytest.raises(ValueError, match="unknown reward"):
        resolve("nonsense", ())


def test_journal_and_seen(tmp_path):
    j = Journal(tmp_path / "journal")
    j.write(make_batch("s1/b002", {"x": [1, 2]}))
    j.write(make_batch("s1/b001", {"x": [3]}))
    assert j.ids() == ["s1/b001", "s1/b002"] and j.has("s1/b001")
    assert [batch_id(j.read(i)) for i in j.ids()] == ["s1/b001", "s1/b002"]
    assert j.read("s1/b002").column("x").to_pylist() == [1, 2]
    seen = Seen()
    assert [seen.fresh(i) for i in ("a", "b", "a")] == [True, True, False] and seen.dropped == 1


def test_pump_moves_every_batch_once():
    inbox, outbox = Channel(queue.Queue(), by_ref=False), Channel(queue.Queue(maxsize=100), by_ref=False)
    for i in range(5):
        inbox.put(make_batch(f"b{i}", {"x": [i]}))
    inbox.put(END)
    assert pump(inbox, outbox, lambda b: b) == 5
    assert [batch_id(outbox.get()) for _ in range(5)] == [f"b{i}" for i in range(5)]


def _arrays(n=4, t=10, vocab=50):
    rng = np.random.default_rng(0)
    batch = make_batch(
        "t",
        {
            "prompt_ids": [list(rng.integers(1, vocab, 4)) for _ in range(n)],
            "completion_ids": [list(rng.integers(1, vocab, t - 4)) for _ in range(n)],
        },
    )
    return training_arrays(batch, pad_id=0)


def test_training_arrays_mask_only_completion_tokens():
    batch = make_batch(
        "t", {"prompt_ids": [[5, 6, 7], [5]], "completion_ids": [[8, 9], [8, 9, 10]], "reward": [1.0, None]}
    )
    a = training_arrays(batch, pad_id=0, weight_column="reward")
    assert a["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 8, 9, 10, 0]]
    assert a["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # logprob t predicts token t+1: completion tokens of row 0 sit at 3, 4 -> positions 2, 3
    assert a["loss_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]
    assert a["weights"].tolist() == [1.0, 0.0]


@pytest.mark.parametrize("adapter", ["lora", "none"])
def test_trainer_learns_checkpoints_resumes_and_syncs(tiny_model, tmp_path, adapter):
    spec = TrainerSpec(
        str(tiny_model),
        adapter=adapter,
        learning_rate=1e-2,
        checkpoint_dir=str(tmp_path / "ckpt"),
        master_port=29000 + (adapter == "lora"),
    )
    trainer = Trainer(spec)
    arrays = _arrays()
    losses = [trainer.train_step(arrays)["loss"] for _ in range(5)]
    assert losses[-1] < losses[0] - 0.1
    lr = trainer.learning_rate()
    trainer.save_checkpoint(cursor=5)
    (tmp_path / "ckpt" / "step-00000009").mkdir()  # a half-written checkpoint: no COMPLETE marker
    assert latest_complete(spec.checkpoint_dir) == "step-00000005"
    digest, after = trainer.digest(), trainer.train_step(arrays)["loss"]
    again = Trainer(spec)
    assert again.resume() == 5 and again.step == 5 and again.digest() == digest
    assert again.learning_rate() == lr  # the scheduler came back too
    assert again.train_step(arrays)["loss"] == pytest.approx(after, abs=1e-5)

    gen = Generator(GeneratorSpec(str(tiny_model), lora_r=8 if adapter == "lora" else 0))
    ids = arrays["input_ids"][:2]
    assert not np.allclose(gen.logits(ids), again.logits(ids), atol=1e-4)
    gen.load_weights(again.weights(), version=6)
    np.testing.assert_allclose(gen.logits(ids), again.logits(ids), atol=1e-5)
    assert gen.version == 6


def test_zero3_trainer_gathers_full_weights_for_sync(tiny_model, tmp_path):
    trainer = Trainer(
        TrainerSpec(
            str(tiny_model), adapter="none", zero_stage=3, learning_rate=1e-2, checkpoint_dir=str(tmp_path / "ckpt")
        )
    )
    arrays = _arrays()
    losses = [trainer.train_step(arrays)["loss"] for _ in range(3)]
    assert losses[-1] < losses[0]
    weights = trainer.weights()
    assert weights["model.embed_tokens.weight"].ndim == 2  # gathered, not a ZeRO-3 partition
    gen = Generator(GeneratorSpec(str(tiny_model)))
    gen.load_weights(weights, version=3)
    ids = arrays["input_ids"][:2]
    np.testing.assert_allclose(gen.logits(ids), trainer.logits(ids), atol=1e-5)


def test_reward_model_scores(tiny_model, tmp_path):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tiny_model)
    cfg = LlamaConfig.from_pretrained(tiny_model, num_labels=1)
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    scorer = RewardScorer(ScorerSpec((RewardSpec(f"model:{tmp_path / 'rm'}"),)))
    out = scorer.score(make_batch("b", {"prompt": ["ticket", "order"], "completion": [" refund", " billing x"]}))
    rewards = out.column("reward").to_pylist()
    assert all(isinstance(r, float) for r in rewards) and rewards[0] != rewards[1]
    assert scorer.stats() == {"scored": 2.0}


def test_qlora_trainer_learns_after_inference(tiny_model, tmp_path):
    """4-bit nf4 base + LoRA on CPU. An inference forward first (as GRPO alternates them), then
    training must still learn (the AVX512-BF16 repack pitfall)."""
    pytest.importorskip("bitsandbytes")
    trainer = Trainer(
        TrainerSpec(
            str(tiny_model),
            adapter="qlora",
            learning_rate=1e-2,
            master_port=29003,
            checkpoint_dir=str(tmp_path / "ckpt"),
        )
    )
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in trainer.engine.module.modules())
    arrays = _arrays()
    trainer.logits(arrays["input_ids"][:1])  # inference before training
    losses = [trainer.train_step(arrays)["loss"] for _ in range(5)]
    assert losses[-1] < losses[0] - 0.1
    assert all(".lora_" in name for name in trainer.weights())  # the adapter alone is synced


def test_student_distills_from_teacher_topk(tiny_model, tiny_tokenizer, tmp_path):
    """Teacher samples with top-k log-probs; a different student trained on them with pure KD
    (alpha 0) moves toward the teacher: its KD loss falls."""
    from stillroom.actors.algo.objectives import KdObjective

    from tests.conftest import save_tiny_llama

    save_tiny_llama(tmp_path / "student", tiny_tokenizer, seed=5)
    teacher = Generator(GeneratorSpec(str(tiny_model), seed=2))
    samples = teacher.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=6, topk_logprobs=8))
    arrays = training_arrays(samples, pad_id=0)
    assert arrays["topk_ids"].shape == (*arrays["loss_mask"].shape, 8)
    first = samples.to_pylist()[0]
    start = len(first["prompt_ids"]) - 1
    assert arrays["topk_ids"][0, start, 0] == first["topk_ids"][0]  # the top-k lines up with its token
    student = Trainer(TrainerSpec(str(tmp_path / "student"), adapter="none", learning_rate=5e-3, master_port=29004))
    objective = KdObjective(alpha=0.0, kd_loss="forward_kl")
    losses = [student.train_step(arrays, objective)["loss/kd"] for _ in range(8)]
    assert losses[-1] < 0.7 * losses[0], losses
