"""The maths matches its references: DAPO's global-batch normalisation, log-probs at the sampling
temperature, KD that is zero (with zero gradient) at student = teacher at any temperature, and
unscored samples that neither bias their group nor enter the loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from stillroom.actors.algo.advantages import group_advantages
from stillroom.actors.algo.losses import (
    dapo_num_items,
    distill_loss,
    grpo_loss,
    kd_divergence,
    topk_buckets,
)


def _rollouts(seed: int, rows: int, width: int, lengths: list[int]):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(rows, width, generator=g, dtype=torch.float64)
    old = lp + 0.2 * torch.randn(rows, width, generator=g, dtype=torch.float64)
    adv = torch.randn(rows, generator=g, dtype=torch.float64)
    mask = torch.zeros(rows, width, dtype=torch.int64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return lp, old, adv, mask


def test_dapo_normalises_by_the_global_batch_so_two_uneven_ranks_equal_one():
    # Rank A holds 2 short completions (3 tokens), rank B 2 long ones (11 tokens): 14 tokens in all.
    lp, old, adv, mask = _rollouts(0, 4, 6, [1, 2, 5, 6])
    full, _ = grpo_loss(lp, old, adv, mask, "dapo", num_items=dapo_num_items(14, world_size=1, chunks=1))
    items = dapo_num_items(14, world_size=2, chunks=1)
    a, _ = grpo_loss(lp[:2], old[:2], adv[:2], mask[:2], "dapo", num_items=items)
    b, _ = grpo_loss(lp[2:], old[2:], adv[2:], mask[2:], "dapo", num_items=items)
    assert ((a + b) / 2).item() == pytest.approx(full.item(), rel=1e-12)  # data parallelism averages ranks
    # what each rank alone computed before (its own tokens) is bnpo per rank, and differs
    own = (
        grpo_loss(*(x[:2] for x in (lp, old, adv, mask)), "dapo")[0]
        + grpo_loss(*(x[2:] for x in (lp, old, adv, mask)), "dapo")[0]
    ) / 2
    assert own.item() != pytest.approx(full.item(), rel=1e-3)
    # accumulation chunks count like ranks: 2 chunks on 1 rank average their gradients too
    assert dapo_num_items(14, world_size=1, chunks=2) == dapo_num_items(14, world_size=2, chunks=1) == 7.0


def _kd(student_logits, teacher_logits, k, kind, temperature):
    top = torch.topk(torch.log_softmax(teacher_logits, -1), k, dim=-1)
    log_p, log_q = topk_buckets(student_logits, top.indices, top.values, temperature)
    return kd_divergence(log_p, log_q, kind, beta=0.5).sum()


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_kd_is_zero_with_zero_gradient_at_student_equal_teacher(kind, temperature):
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(2, 5, 11, generator=g, dtype=torch.float64)
    student = teacher.clone().requires_grad_(True)
    loss = _kd(student, teacher, k=4, kind=kind, temperature=temperature)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    assert student.grad.abs().max().item() == pytest.approx(0.0, abs=1e-10)
    other = _kd(teacher + torch.randn(2, 5, 11, generator=g, dtype=torch.float64), teacher, 4, kind, temperature)
    assert other.item() > 1e-4  # and it measures a difference where there is one


def test_kd_at_temperature_tempers_both_sides_alike_by_hand():
    # vocab 3, k = 1. Teacher p = [0.5, 0.3, 0.2]: buckets [0.5, 0.5]; at T = 2 each bucket is p^(1/2),
    # renormalised: [1/2, 1/2]. Student q = [0.25, 0.25, 0.5]: buckets [0.25, 0.75] -> [sqrt(.25), sqrt(.75)] / Z.
    student = torch.log(torch.tensor([[[0.25, 0.25, 0.5]]], dtype=torch.float64))
    teacher_top = torch.log(torch.tensor([[[0.5]]], dtype=torch.float64))
    log_p, log_q = topk_buckets(student, torch.tensor([[[0]]]), teacher_top, temperature=2.0)
    z = math.sqrt(0.25) + math.sqrt(0.75)
    assert log_p.exp().flatten().tolist() == pytest.approx([0.5, 0.5])
    assert log_q.exp().flatten().tolist() == pytest.approx([math.sqrt(0.25) / z, math.sqrt(0.75) / z])


def test_a_float16_topk_that_sums_to_one_keeps_reverse_kl_bounded():
    # The teacher's stored top-2 sum to 1 (float16 rounding): its tail is clamped, not log(1e-12).
    student = torch.log(torch.tensor([[[0.45, 0.45, 0.1]]], dtype=torch.float64))
    top_ids = torch.tensor([[[0, 1]]])
    top_lp = torch.log(torch.tensor([[[0.5, 0.5]]], dtype=torch.float16).double())
    log_p, log_q = topk_buckets(student, top_ids, top_lp)
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    assert log_p[..., -1].item() > math.log(1e-7)  # a floor, as DistillKit-style tails have
    assert kd_divergence(log_p, log_q, "reverse_kl").item() < 2.0


def test_kd_can_be_scaled_by_t_squared():
    g = torch.Generator().manual_seed(2)
    student = torch.randn(1, 4, 7, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 7, (1, 4), generator=g)
    top = torch.topk(torch.log_softmax(torch.randn(1, 3, 7, generator=g, dtype=torch.float64), -1), 3, dim=-1)
    mask = torch.ones(1, 3)
    plain, m = distill_loss(student, ids, mask, top.indices, top.values, alpha=0.0, temperature=2.0)
    scaled, ms = distill_loss(student, ids, mask, top.indices, top.values, alpha=0.0, temperature=2.0, scale_by_t2=True)
    assert scaled.item() == pytest.approx(4.0 * plain.item()) and ms["loss/kd"] == pytest.approx(4 * m["loss/kd"])


def test_unscored_samples_are_left_out_of_their_group():
    nan = float("nan")
    rewards = torch.tensor([1.0, nan, 0.0, 1.0, 2.0, 2.0, nan, nan], dtype=torch.float64)
    adv, zero_std = group_advantages(rewards, group_size=4, scale="none")
    # group 1: mean over the 3 scored samples (2/3); the unscored one gets no advantage
    assert adv[:4].tolist() == pytest.approx([1 / 3, 0.0, -2 / 3, 1 / 3])
    # group 2: two scored samples with equal rewards: no signal
    assert adv[4:].tolist() == pytest.approx([0.0] * 4) and zero_std.tolist() == [False, True]
    scaled, _ = group_advantages(rewards, group_size=4, scale="group")
    std = float(np.std([1.0, 0.0, 1.0], ddof=1))
    assert scaled[0].item() == pytest.approx((1 / 3) / (std + 1e-4))


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature, rel", [(1.0, 1e-6), (2.0, 1e-3)])
def test_jsd_matches_trl_gkd_when_the_topk_is_the_whole_vocabulary(beta, temperature, rel):
    from trl.experimental.gkd import GKDTrainer

    g = torch.Generator().manual_seed(3)
    student = torch.randn(2, 5, 9, generator=g, dtype=torch.float64)
    teacher = torch.randn(2, 5, 9, generator=g, dtype=torch.float64)
    top = torch.topk(torch.log_softmax(teacher, -1), 9, dim=-1)  # k = V: only the tail's floor remains
    ours = kd_divergence(*topk_buckets(student, top.indices, top.values, temperature), "jsd", beta).sum()
    theirs = GKDTrainer.generalized_jsd_loss(student, teacher, beta=beta, temperature=temperature)
    assert ours.item() / 2 == pytest.approx(theirs.item(), rel=rel)  # TRL's batchmean divides by the batch (2)


def test_grpo_leaves_unscored_samples_out_of_the_loss_and_reports_them():
    from stillroom.actors.runtime.batches import make_batch
    from stillroom.actors.stages.grpo import GrpoConfig, prepare
    from stillroom.v1 import job_pb2 as pb

    cfg = GrpoConfig.of(pb.GrpoStage(group_size=2, scale_rewards="none"))
    batch = make_batch(
        "b",
        {
            "prompt_ids": [[1, 2]] * 4,
            "completion_ids": [[3, 4]] * 4,
            "completion_logprobs": [[-1.0, -1.0]] * 4,
            "truncated": [False] * 4,
            "reward": [1.0, None, 0.0, 2.0],
        },
    )
    arrays, metrics = prepare(batch, cfg)
    assert arrays["advantages"].tolist() == pytest.approx([0.0, 0.0, -1.0, 1.0])  # group 1 has one scored sample
    assert arrays["loss_mask"].sum(1).tolist() == [2, 0, 2, 2]  # the unscored sample trains nothing
    assert metrics["rewards/unscored_fraction"] == pytest.approx(0.25)
    assert metrics["reward"] == pytest.approx(1.0)  # the mean of the three scored rewards, not of four with a 0
    assert metrics["frac_reward_zero_std"] == pytest.approx(0.5)
