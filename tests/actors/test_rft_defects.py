"""GRPO settings that must do what their names say (issue 26): the reference policy of the KL term
sees the whole sequence, gradient accumulation makes exactly one optimizer step per train_step,
however few rows a rank has, and dynamic sampling with no signal still finishes its steps."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
import torch
from stillroom.actors.algo.losses import tempered, token_logprobs
from stillroom.actors.algo.objectives import GrpoObjective
from stillroom.actors.models.loading import load_causal_lm
from stillroom.actors.roles.generator import GeneratorSpec
from stillroom.actors.roles.scorer import RewardSpec, ScorerSpec
from stillroom.actors.roles.trainer import Trainer, TrainerSpec
from stillroom.actors.runtime.batches import make_batch, training_arrays
from stillroom.actors.runtime.cluster import Placement, RoleGroup
from stillroom.actors.runtime.journal import Journal
from stillroom.actors.runtime.loop import TrainLoop
from stillroom.actors.stages.grpo import GrpoConfig, prompt_batches
from stillroom.v1 import job_pb2 as pb

from tests.actors.test_pipeline import run_within


def grpo_arrays(n: int = 3, seed: int = 0, vocab: int = 50) -> dict[str, np.ndarray]:
    """n rows with prompts (5 to 8 tokens) and completions (2 to 7) of different lengths, small
    advantages (no clipping of the gradient norm) and no old log-probs (on-policy: ratio 1)."""
    rng = np.random.default_rng(seed)
    batch = make_batch(
        "b",
        {
            "prompt_ids": [rng.integers(1, vocab, int(rng.integers(5, 9))).tolist() for _ in range(n)],
            "completion_ids": [rng.integers(1, vocab, int(rng.integers(2, 8))).tolist() for _ in range(n)],
        },
    )
    arrays = training_arrays(batch, pad_id=0)
    arrays.pop("old_logprobs", None)
    arrays["advantages"] = rng.uniform(-0.02, 0.02, n).astype(np.float32)
    return arrays


@dataclass(frozen=True)
class Recording:
    """A GRPO objective that keeps what its reference callable returned."""

    inner: GrpoObjective
    seen: list = field(default_factory=list)
    needs_proximal = False

    def loss(self, logits, t, reference, num_items=None):
        def recorded(temperature: float) -> torch.Tensor:
            self.seen.append(reference(temperature))
            return self.seen[-1]

        return self.inner.loss(logits, t, recorded, num_items)


@pytest.mark.parametrize("adapter", ["lora", "none"])
def test_the_reference_sees_the_prompt_and_the_kl_of_a_fresh_policy_is_zero(tiny_model, adapter):
    """beta > 0: at the first step the policy is the reference (a fresh LoRA adapter adds 0; full
    fine-tuning starts from the same weights), so k3 KL is 0; and the reference's log-probs are
    the base model's over the whole sequence, prompt and positions included."""
    arrays = grpo_arrays()
    lora = {"lora_r": 4, "target_modules": ("q_proj", "v_proj")} if adapter == "lora" else {}
    trainer = Trainer(TrainerSpec(str(tiny_model), adapter=adapter, learning_rate=1e-2, master_port=29031, **lora))
    objective = Recording(GrpoObjective("dapo", beta=0.1, temperature=0.7))
    metrics = trainer.train_step(arrays, objective)
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)

    base = load_causal_lm(str(tiny_model))
    ids = torch.tensor(arrays["input_ids"])
    with torch.no_grad():
        logits = base(input_ids=ids, attention_mask=torch.tensor(arrays["attention_mask"])).logits
    whole = token_logprobs(tempered(logits, 0.7), ids)  # (B, T-1): every position of the full rows
    start = int(np.flatnonzero(arrays["loss_mask"].any(0))[0])  # the first column any row has a loss at
    assert start >= 4  # the prompt is there, so a reference that dropped it would differ
    (reference,) = objective.seen
    torch.testing.assert_close(reference, whole[:, start:], atol=1e-5, rtol=0)


def adam_first_moments(trainer: Trainer) -> list[np.ndarray]:
    """AdamW's exp_avg per parameter: 0.1 x the step's (unclipped) gradient after one step, so
    unlike the weights (Adam's first step is ~lr x sign) it shows the gradient's scale."""
    optimizer = trainer.engine.optimizer
    return [optimizer.state[p]["exp_avg"].detach().cpu().numpy().copy() for p in optimizer.param_groups[0]["params"]]


@pytest.mark.parametrize("objective", [GrpoObjective("dapo"), None], ids=["dapo", "nll"])
@pytest.mark.parametrize("rows", [2, 4, 6], ids=["fewer_rows_than_gas", "rows_eq_gas", "more_rows_than_gas"])
def test_one_train_step_is_one_optimizer_step_equal_to_one_chunk(tiny_model, rows, objective):
    """gradient_accumulation_steps 4: n rows (fewer, as many, more) make exactly one optimizer step,
    and it is the step of the same rows in one chunk: same gradient (Adam's first moment), same
    weights, same loss. Before the fix, 2 rows took no step and left their gradients behind."""
    arrays = grpo_arrays(rows, seed=rows)
    out = {}
    for gas in (1, 4):
        trainer = Trainer(
            TrainerSpec(
                str(tiny_model), adapter="none", learning_rate=1e-4, gradient_accumulation_steps=gas, master_port=29032
            )
        )
        metrics = trainer.train_step(arrays, *([objective] if objective else []))
        assert trainer.engine.global_steps == 1 and metrics["step"] == 1
        out[gas] = (metrics["loss"], trainer.weights(), adam_first_moments(trainer))
    assert out[4][0] == pytest.approx(out[1][0], rel=1e-5, abs=1e-7)
    for name, value in out[1][1].items():
        np.testing.assert_allclose(out[4][1][name], value, atol=1e-6, err_msg=name)
    assert any(np.abs(m).max() > 0 for m in out[1][2])
    for chunked, whole in zip(out[4][2], out[1][2], strict=True):
        np.testing.assert_allclose(chunked, whole, rtol=1e-4, atol=1e-9)


def test_a_skipped_step_moves_the_schedule_and_the_step_but_not_the_weights(tiny_model):
    """skip_step (a step with no rows): linear schedule over 4 steps, after 2 skipped ones the
    learning rate is half, the step number 2, and the weights those of the start."""
    spec = TrainerSpec(str(tiny_model), adapter="none", learning_rate=1e-2, lr_scheduler_type="linear", total_steps=4)
    spec = replace(spec, master_port=29033)
    trainer = Trainer(spec)
    before = trainer.weights()
    assert [trainer.skip_step()["step"] for _ in range(2)] == [1, 2]
    assert trainer.learning_rate() == pytest.approx(0.5e-2) and trainer.step == 2
    for name, value in trainer.weights().items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)


@pytest.mark.slow
def test_grpo_with_no_signal_at_max_staleness_0_finishes_its_steps(ray_client, tiny_model, tmp_path):
    """Dynamic sampling under a constant reward: no group ever has signal, so every step is
    resampled max_resample times and makes no update. Each still counts as a step, so with
    max_staleness 0 (the feeder waits for each step's weights) the stage ends after its 3 steps,
    the trainer at step 3, with a warning that says how many steps had nothing to train on."""
    params = pb.GrpoStage(
        group_size=2, prompts_per_step=2, max_new_tokens=4, dynamic_sampling=True, max_resample=2, max_staleness=0
    )
    params.optim.max_steps = 3
    cfg = GrpoConfig.of(params)
    rows = [{"prompt": f"ticket {i} billing", "answer": "a"} for i in range(6)]
    group = RoleGroup(
        "job-nosignal",
        {"generator": Placement(1, 0.5), "scorer": Placement(1, 0.25), "trainer": Placement(1, 0.5)},
    )
    group.start("generator", GeneratorSpec(str(tiny_model), lora_r=4, target_modules=("q_proj", "v_proj")))
    group.start("scorer", ScorerSpec((RewardSpec("length_penalty", args=(("max_chars", "1000"),)),)))  # always 0
    spec = TrainerSpec(
        str(tiny_model), lora_r=4, target_modules=("q_proj", "v_proj"), checkpoint_dir=str(tmp_path / "ckpt")
    )
    metrics, warnings, stop = [], [], threading.Event()
    loop = TrainLoop(
        group,
        spec,
        Journal(tmp_path / "journal"),
        replace(cfg.loop(rows, seed=0), poll_s=0.05),
        on_metrics=metrics.append,
        cancelled=stop.is_set,
        on_warning=warnings.append,
    )
    try:
        result = run_within(loop, prompt_batches(rows, cfg, seed=0), timeout=240, stop=stop)
    finally:
        group.close()
    assert result.trained == ["grpo/000000", "grpo/000001", "grpo/000002"]
    assert result.skipped == result.trained and [s["step"] for s in result.steps] == [1, 2, 3]
    assert [m["frac_reward_zero_std"] for m in metrics if "frac_reward_zero_std" in m] == [1.0] * 3
    assert [m["train/step"] for m in metrics if "train/skipped" in m] == [1, 2, 3]
    assert warnings[-1].startswith("3 of 3 steps had nothing to train on")
