"""GRPO's variants against hand-worked numbers: GSPO's sequence-level ratio, truncated importance
sampling against a stale generator, masked truncated completions, dynamic sampling's groups with
signal and the refills that top a step up."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from stillroom.actors.algo.losses import grpo_loss, importance_weights
from stillroom.actors.algo.objectives import GrpoObjective
from stillroom.actors.runtime.batches import batch_id, concat, make_batch, refill_batch, replay, replay_of

ONE = torch.ones(1, 2)


def test_sequence_level_ratio_clips_the_whole_sequence():
    # log ratios 0.1 and 0.5: per token, e^0.1 = 1.105 is inside [0.8, 1.2] and e^0.5 is clipped;
    # GSPO's one ratio is e^0.3 = 1.350 > 1.2, so with A > 0 the whole sequence is clipped.
    old = torch.zeros(1, 2, dtype=torch.float64)
    lp = torch.tensor([[0.1, 0.5]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0], dtype=torch.float64)
    token, m_token = grpo_loss(lp, old, adv, ONE, "grpo", 0.2)
    assert token.item() == pytest.approx(-(math.exp(0.1) + 1.2) / 2)
    seq, m_seq = grpo_loss(lp, old, adv, ONE, "grpo", 0.2, level="sequence")
    assert seq.item() == pytest.approx(-1.2)
    (grad,) = torch.autograd.grad(seq, lp)
    assert torch.all(grad == 0)  # clipped: no gradient for any token of the sequence
    assert m_seq["clip_ratio/high_mean"] == 1.0 and m_token["clip_ratio/high_mean"] == 0.5


def test_sequence_level_on_policy_gradient_equals_token_level_grpo():
    # At ratio 1 GSPO's gradient is A * mean_t grad log p: the grpo loss type's, token by token.
    g = torch.Generator().manual_seed(0)
    lp = (-torch.rand(3, 5, generator=g, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(3, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    grads = []
    for level in ("token", "sequence"):
        loss, _ = grpo_loss(lp, lp.detach(), adv, mask, "grpo", level=level)
        grads.append(torch.autograd.grad(loss, lp)[0])
    torch.testing.assert_close(grads[0], grads[1])


def test_importance_weights_truncate_or_mask_at_the_cap():
    proximal = torch.tensor([[0.5, 2.0]])
    behaviour = torch.zeros(1, 2)
    w, m = importance_weights(proximal, behaviour, ONE, "token_truncate", 3.0)
    torch.testing.assert_close(w, torch.tensor([[math.exp(0.5), 3.0]]))
    assert m["is/capped_fraction"] == 0.5
    w, _ = importance_weights(proximal, behaviour, ONE, "token_mask", 3.0)
    torch.testing.assert_close(w, torch.tensor([[math.exp(0.5), 0.0]]))
    w, _ = importance_weights(proximal, behaviour, ONE, "sequence_truncate", 3.0)  # e^2.5 = 12.2 -> 3
    torch.testing.assert_close(w, torch.tensor([[3.0]]))
    w, _ = importance_weights(proximal, behaviour, ONE, "sequence_mask", 3.0)
    torch.testing.assert_close(w, torch.tensor([[0.0]]))
    with pytest.raises(ValueError, match="importance sampling mode"):
        importance_weights(proximal, behaviour, ONE, "token_sometimes", 3.0)


def _policy(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 7, (2, 4), generator=g)
    return logits, ids


def test_tis_clips_against_the_proximal_policy_and_weights_by_the_stale_generator():
    """A generator two syncs behind wrote old log-probs far from the policy. Without correction
    the ratio to them is clipped and most tokens carry no gradient; with TIS the ratio is taken to
    the trainer's own log-probs before the step (1 here: nothing clipped) and each token is
    weighted by min(proximal / generator, cap), by hand."""
    logits, ids = _policy()
    logp = torch.log_softmax(logits.detach(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    stale = logp - torch.tensor([[0.3, -0.4, 1.5], [0.0, 2.0, -0.2]], dtype=torch.float64)
    t = {
        "input_ids": ids,
        "loss_mask": torch.ones(2, 3),
        "advantages": torch.tensor([1.0, -1.0], dtype=torch.float64),
        "old_logprobs": stale,
    }
    plain, m_plain = GrpoObjective("bnpo").loss(logits, t)
    assert m_plain["clip_ratio/region_mean"] > 0
    corrected, m = GrpoObjective("bnpo", is_mode="token_truncate", is_cap=3.0).loss(
        logits, {**t, "proximal_logprobs": logp}
    )
    w = torch.exp(logp - stale).clamp(max=3.0)
    assert corrected.item() == pytest.approx(-(t["advantages"][:, None] * w).mean().item(), rel=1e-5)
    assert m["clip_ratio/region_mean"] == 0 and m["is/capped_fraction"] == pytest.approx(2 / 6)  # e^1.5, e^2 > 3
    # a generator with the trainer's weights (no staleness): the weights are 1, the loss unchanged
    same, _ = GrpoObjective("bnpo", is_mode="token_truncate").loss(
        logits, {**t, "old_logprobs": logp, "proximal_logprobs": logp}
    )
    unweighted, _ = GrpoObjective("bnpo").loss(logits, {**t, "old_logprobs": logp})
    assert same.item() == pytest.approx(unweighted.item())


def _scored(bid: str, rewards: list, truncated: list[bool], group: int = 2) -> pa.RecordBatch:
    n = len(rewards)
    return make_batch(
        bid,
        {
            "prompt": [f"p{i // group}" for i in range(n)],
            "completion": ["c"] * n,
            "prompt_ids": [[1, 2]] * n,
            "completion_ids": [[3, 4, 5]] * n,
            "completion_logprobs": [[-1.0, -1.0, -1.0]] * n,
            "truncated": truncated,
            "reward": rewards,
        },
    )


def _grpo_cfg(**kw):
    from stillroom.actors.stages.grpo import GrpoConfig
    from stillroom.v1 import job_pb2 as pb

    return GrpoConfig.of(pb.GrpoStage(group_size=2, prompts_per_step=2, **kw))


def test_dynamic_sampling_keeps_groups_with_signal_up_to_prompts_per_step():
    from stillroom.actors.stages.grpo import prepare

    cfg = _grpo_cfg(dynamic_sampling=True)
    batch = _scored("b", [1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 1.0, 0.0], [False] * 8)
    arrays, metrics = prepare(batch, cfg)
    assert metrics["frac_reward_zero_std"] == 0.5  # measured before any group is dropped
    assert metrics["sampling/groups_with_signal"] == 2
    assert len(arrays["input_ids"]) == 4  # groups 1 and 3, two rows each
    # (1 - 0.5) / std([1, 0], ddof=1) = 0.5 / 0.707
    np.testing.assert_allclose(np.abs(arrays["advantages"]), np.full(4, 1 / math.sqrt(2)), rtol=1e-3)
    arrays, metrics = prepare(_scored("b", [1.0, 1.0, 0.0, 0.0], [False] * 4), cfg)
    assert arrays == {} and metrics["frac_reward_zero_std"] == 1.0  # nothing to learn: refill it


def test_mask_truncated_completions_leaves_them_out_of_the_loss():
    from stillroom.actors.stages.grpo import prepare

    batch = _scored("b", [1.0, 0.0, 1.0, 0.0], [False, True, False, False])
    masked, _ = prepare(batch, _grpo_cfg(mask_truncated_completions=True))
    kept, _ = prepare(batch, _grpo_cfg())
    assert masked["loss_mask"].sum(1).tolist() == [3, 0, 3, 3]
    assert kept["loss_mask"].sum(1).tolist() == [3, 3, 3, 3]


def test_correction_defaults_to_tis_only_where_samples_can_be_stale():
    assert _grpo_cfg().objective.is_mode == ""
    assert _grpo_cfg(max_staleness=1).objective.is_mode == "token_truncate"
    assert _grpo_cfg(max_staleness=1, importance_sampling_mode="none").objective.is_mode == ""
    assert _grpo_cfg(importance_sampling_level="sequence").objective.level == "sequence"


def test_refill_prompts_are_deterministic_and_a_replay_replays_its_sources_refill():
    rows = [{"prompt": f"q{i}"} for i in range(20)]
    step = make_batch("grpo/000003", {"prompt": ["q1", "q2"]})
    a, b = refill_batch(step, 1, rows, 4, seed=7), refill_batch(step, 1, rows, 4, seed=7)
    assert batch_id(a) == "grpo/000003+1" and a.to_pylist() == b.to_pylist() and a.num_rows == 4
    assert refill_batch(step, 2, rows, 4, seed=7).to_pylist() != a.to_pylist()
    again = replay(make_batch("grpo/000003#1", {"prompt": ["q1", "q2"]}), "grpo/000003")
    r = refill_batch(again, 1, rows, 4, seed=7)
    assert batch_id(r) == "grpo/000003#1+1" and replay_of(r) == "grpo/000003+1"
    assert r.to_pylist() == a.to_pylist()


def test_concat_keeps_the_step_id_and_promotes_null_columns():
    a = make_batch("s", {"reward": [None, None], "x": [1, 2]})
    b = make_batch("s+1", {"reward": [0.5, 1.0], "x": [3, 4]})
    both = concat([a, b], "s")
    assert batch_id(both) == "s" and both.column("reward").to_pylist() == [None, None, 0.5, 1.0]
