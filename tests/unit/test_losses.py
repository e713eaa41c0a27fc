"""Losses and advantages against numbers worked out by hand, and against a plain loop reference."""

from __future__ import annotations

import math

import pytest
import torch
from stillroom.actors.algo.advantages import group_advantages
from stillroom.actors.algo.losses import grpo_loss, k3_kl, masked_mean, token_logprobs, weighted_nll


def test_token_logprobs_and_weighted_nll_by_hand():
    # vocab 2, logits [0, 0] -> log p = -log 2 for either token
    logits = torch.zeros(1, 3, 2)
    ids = torch.tensor([[0, 1, 0]])
    lp = token_logprobs(logits, ids)
    assert torch.allclose(lp, torch.full((1, 2), -math.log(2)))
    mask = torch.tensor([[0, 1]])
    assert weighted_nll(lp, mask).item() == pytest.approx(math.log(2))
    assert weighted_nll(lp, mask, torch.tensor([3.0])).item() == pytest.approx(3 * math.log(2))
    assert masked_mean(torch.tensor([[1.0, 5.0]]), torch.tensor([[1, 0]])).item() == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_equal_log_softmax_gather_and_trl_selective_log_softmax(dtype):
    from trl.trainer.utils import selective_log_softmax

    torch.manual_seed(0)
    logits = torch.randn(3, 7, 50).to(dtype).requires_grad_()
    ids = torch.randint(0, 50, (3, 7))
    weights = torch.randn(3, 6)
    ours = token_logprobs(logits, ids)
    naive = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    trl = selective_log_softmax(logits[:, :-1].float(), ids[:, 1:])
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, naive, atol=1e-5) and torch.allclose(ours, trl, atol=1e-5)
    (grad,) = torch.autograd.grad((ours * weights).sum(), logits)
    (ref,) = torch.autograd.grad((naive * weights).sum(), logits)
    assert grad.dtype == dtype and torch.allclose(
        grad.float(), ref.float(), atol=1e-2 if dtype == torch.bfloat16 else 1e-6
    )
    assert grad[:, -1].abs().sum() == 0  # the last position predicts nothing


def test_token_logprobs_gradient_is_exact_in_float64():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 11, (2, 5))
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, ids), (logits,))


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 3.0, 5.0])  # two groups of 3
    a, zero = group_advantages(r, 3, "none")
    assert a.tolist() == pytest.approx([1 / 3, -2 / 3, 1 / 3, -2.0, 0.0, 2.0])
    a, _ = group_advantages(r, 3, "group", eps=0.0)
    # group 1 std (unbiased) = sqrt(1/3); group 2 std = 2
    assert a.tolist() == pytest.approx(
        [(1 / 3) / math.sqrt(1 / 3), (-2 / 3) / math.sqrt(1 / 3), (1 / 3) / math.sqrt(1 / 3), -1.0, 0.0, 1.0]
    )
    same, zero = group_advantages(torch.tensor([2.0, 2.0, 0.0, 1.0]), 2, "group")
    assert zero.tolist() == [True, False] and same[:2].tolist() == [0.0, 0.0]
    b, _ = group_advantages(r, 3, "batch", eps=0.0)
    assert b.tolist() == pytest.approx((torch.tensor([1 / 3, -2 / 3, 1 / 3, -2.0, 0.0, 2.0]) / r.std()).tolist())


def test_k3_by_hand():
    assert k3_kl(torch.tensor([0.0]), torch.tensor([0.0])).item() == 0.0
    d = math.log(0.5) - math.log(0.25)  # ref - logp
    assert k3_kl(torch.tensor([math.log(0.25)]), torch.tensor([math.log(0.5)])).item() == pytest.approx(
        math.exp(d) - d - 1
    )


def test_grpo_loss_types_by_hand():
    # Two sequences; on-policy (ratio 1): per-token loss = -A.  A = [1, -2]
    lp = torch.zeros(2, 3)
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # per_token*mask: row0 [-1, -1, 0] (sum -2, 2 tokens), row1 [2, 0, 0] (sum 2, 1 token)
    assert grpo_loss(lp, lp, adv, mask, "grpo")[0].item() == pytest.approx((-1 + 2) / 2)
    assert grpo_loss(lp, lp, adv, mask, "bnpo")[0].item() == pytest.approx(0 / 3)
    assert grpo_loss(lp, lp, adv, mask, "dr_grpo", max_completion_length=4)[0].item() == pytest.approx(0 / 8)
    assert grpo_loss(lp, lp, adv, torch.tensor([[1, 1, 1], [1, 0, 0]]), "dapo", num_items=8)[0].item() == pytest.approx(
        (-3 + 2) / 8
    )


def test_grpo_clipping_by_hand():
    old = torch.zeros(1, 2)
    lp = torch.tensor([[math.log(1.5), math.log(0.5)]])  # ratios 1.5 and 0.5
    mask = torch.ones(1, 2)
    # A = +1: token 0 clipped at 1.2 -> -1.2; token 1 min(0.5, 0.8) = 0.5 -> -0.5
    loss, m = grpo_loss(lp, old, torch.tensor([1.0]), mask, "bnpo", epsilon=0.2)
    assert loss.item() == pytest.approx((-1.2 - 0.5) / 2)
    assert m["clip_ratio/high_mean"] == 0.5 and m["clip_ratio/low_mean"] == 0.0
    # A = -1: token 0 min(-1.5, -1.2) = -1.5 -> 1.5; token 1 min(-0.5, -0.8) = -0.8 -> 0.8
    loss, m = grpo_loss(lp, old, torch.tensor([-1.0]), mask, "bnpo", epsilon=0.2)
    assert loss.item() == pytest.approx((1.5 + 0.8) / 2)
    assert m["clip_ratio/low_mean"] == 0.5
    # epsilon_high widens the upper bound only: 1.5 is inside [0.8, 1.6]
    loss, _ = grpo_loss(lp, old, torch.tensor([1.0]), mask, "bnpo", epsilon=0.2, epsilon_high=0.6)
    assert loss.item() == pytest.approx((-1.5 - 0.5) / 2)


def _reference(lp, old, adv, mask, ref, loss_type, eps, eps_high, beta, max_len):
    """The same loss written as plain loops, token by token."""
    rows, total, tokens = [], 0.0, 0
    for b in range(len(lp)):
        row_sum, row_n = 0.0, 0
        for t in range(len(lp[b])):
            if not mask[b][t]:
                continue
            ratio = math.exp(lp[b][t] - old[b][t])
            c = min(max(ratio, 1 - eps), 1 + eps_high)
            v = -min(ratio * adv[b], c * adv[b])
            d = ref[b][t] - lp[b][t]
            v += beta * (math.exp(d) - d - 1)
            row_sum, row_n = row_sum + v, row_n + 1
        rows.append(row_sum / max(row_n, 1))
        total, tokens = total + row_sum, tokens + row_n
    return {
        "grpo": sum(rows) / len(rows),
        "bnpo": total / tokens,
        "dapo": total / tokens,
        "dr_grpo": total / (len(lp) * max_len),
    }[loss_type]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_grpo_loss_matches_a_loop_reference_on_random_inputs(loss_type):
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(4, 6, generator=g, dtype=torch.float64)
    old = lp + 0.3 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    ref = lp + 0.2 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    adv = torch.randn(4, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    got, _ = grpo_loss(lp, old, adv, mask, loss_type, 0.2, 0.28, 0.04, ref, max_completion_length=8)
    want = _reference(
        lp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), ref.tolist(), loss_type, 0.2, 0.28, 0.04, 8
    )
    assert got.item() == pytest.approx(want, rel=1e-9)


def test_topk_buckets_with_tail_by_hand():
    # vocab 3; teacher top-1 is token 0 with p = 0.5 -> buckets [0.5, 0.5 (tail)]
    # student logits log([0.25, 0.25, 0.5]) -> buckets [0.25, 0.75]
    from stillroom.actors.algo.losses import topk_buckets

    student = torch.log(torch.tensor([[[0.25, 0.25, 0.5]]]))
    log_p, log_q = topk_buckets(student, torch.tensor([[[0]]]), torch.log(torch.tensor([[[0.5]]])))
    assert log_p.exp().flatten().tolist() == pytest.approx([0.5, 0.5])
    assert log_q.exp().flatten().tolist() == pytest.approx([0.25, 0.75])


def test_kd_divergences_by_hand():
    from stillroom.actors.algo.losses import kd_divergence

    p = torch.log(torch.tensor([[[0.5, 0.5]]]))
    q = torch.log(torch.tensor([[[0.25, 0.75]]]))
    fkl = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    rkl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert kd_divergence(p, q, "forward_kl").item() == pytest.approx(fkl)
    assert kd_divergence(p, q, "reverse_kl").item() == pytest.approx(rkl)
    m = [0.5 * 0.5 + 0.5 * 0.25, 0.5 * 0.5 + 0.5 * 0.75]  # beta = 0.5
    jsd = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) + 0.5 * (
        0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1])
    )
    assert kd_divergence(p, q, "jsd", beta=0.5).item() == pytest.approx(jsd)
    assert kd_divergence(p, q, "jsd", beta=0.0).item() == pytest.approx(fkl)
    assert kd_divergence(p, q, "jsd", beta=1.0).item() == pytest.approx(rkl)
    assert kd_divergence(p, p, "jsd", beta=0.3).item() == pytest.approx(0.0, abs=1e-7)


def test_distill_loss_mixes_ce_and_kd_and_matches_full_kl_when_k_is_the_vocab():
    from stillroom.actors.algo.losses import distill_loss

    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 4, 5, generator=g)
    teacher = torch.log_softmax(torch.randn(2, 3, 5, generator=g), dim=-1)
    ids = torch.randint(0, 5, (2, 4), generator=g)
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    top = torch.topk(teacher, 5, dim=-1)  # k = V: the tail is empty, KD is the exact forward KL
    loss, m = distill_loss(student, ids, mask, top.indices, top.values, alpha=0.0)
    exact = (teacher.exp() * (teacher - torch.log_softmax(student[:, :-1], -1))).sum(-1)
    assert loss.item() == pytest.approx(masked_mean(exact, mask).item(), abs=1e-5)
    ce_only, _ = distill_loss(student, ids, mask, top.indices, top.values, alpha=1.0)
    assert ce_only.item() == pytest.approx(weighted_nll(token_logprobs(student, ids), mask).item())
    half, m = distill_loss(student, ids, mask, top.indices, top.values, alpha=0.5)
    assert half.item() == pytest.approx(0.5 * m["loss/ce"] + 0.5 * m["loss/kd"])
