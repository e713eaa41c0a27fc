"""Losses as small pure functions over tensors. Shapes: B batch, T sequence length, V vocabulary."""

from __future__ import annotations

import math

import torch


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T, the logits of the distribution sampled at temperature T. At T = 1 (and 0, greedy)
    the same tensor: no copy of a (B, T, V) tensor on every step."""
    return logits if temperature in (0.0, 1.0) else logits / temperature


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Log-probability of each next token. logits (B, T, V), input_ids (B, T) -> (B, T-1) in float32
    (float64 for float64 logits): out[b, t] = log p(input_ids[b, t+1] | input_ids[b, :t+1]).

    log_softmax -> gather without the (B, T, V) float32 log-softmax (TRL's selective_log_softmax
    idea): logit[target] - logsumexp(logits), one sequence at a time, and a backward that writes the
    gradient straight into a tensor of the logits' dtype."""
    return _SelectedLogprobs.apply(logits[:, :-1], input_ids[:, 1:])


class _SelectedLogprobs(torch.autograd.Function):
    """logits (B, T, V), targets (B, T) -> logits[b, t, targets[b, t]] - logsumexp(logits[b, t])."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(logits.dtype, torch.float32)
        lse = torch.stack([torch.logsumexp(seq.to(dtype), dim=-1) for seq in logits])  # (B, T)
        ctx.save_for_backward(logits, targets, lse)
        return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).to(dtype) - lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # d/dlogits = grad * (onehot(target) - softmax), built per sequence: no (B, T, V) float32.
        logits, targets, lse = ctx.saved_tensors
        out = torch.empty_like(logits)
        for b in range(logits.shape[0]):
            g = grad[b].unsqueeze(-1).to(lse.dtype)
            seq = (logits[b].to(lse.dtype) - lse[b].unsqueeze(-1)).exp_().mul_(-g)
            out[b] = seq.scatter_add_(-1, targets[b].unsqueeze(-1), g)
        return out, None


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values where mask is 1, over all of them. values, mask (B, T) -> scalar."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def weighted_nll(
    logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    weights: torch.Tensor | None = None,
    num_items: float | None = None,
) -> torch.Tensor:
    """Token-level negative log-likelihood, each sequence scaled by its weight, averaged over the
    masked tokens: this batch's, or with num_items (dapo_num_items) the whole step's, as HF's
    Trainer divides by num_items_in_batch, so accumulation chunks and ranks of different sizes
    make the same step as one batch. logprobs (B, T-1), loss_mask (B, T-1), weights (B,) or None."""
    nll = -logprobs
    if weights is not None:
        nll = nll * weights.to(nll.dtype).unsqueeze(-1)
    if num_items:
        return (nll * loss_mask.to(nll.dtype)).sum() / num_items
    return masked_mean(nll, loss_mask)


# -- GRPO ----------------------------------------------------------------------------------------


def dapo_num_items(global_tokens: float, world_size: int, chunks: int) -> float:
    """The normaliser of one rank's one accumulation chunk under DAPO (and NLL), so that what data parallelism
    and gradient accumulation average (world_size ranks x chunks) is sum(per-token loss) / the
    completion tokens of the whole global batch, however unevenly they fall on ranks and chunks."""
    return global_tokens / (world_size * chunks)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || reference): exp(d) - d - 1 with d = ref - logp.
    Both (B, T) -> (B, T), >= 0."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


def log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """log(pi / pi_old): per token (B, T) at level "token"; at level "sequence" (GSPO) the mean over
    each sequence's masked tokens, (B, 1), so a sequence is clipped as a whole."""
    diff = logprobs - old_logprobs
    if level == "token":
        return diff
    if level == "sequence":
        return ((diff * mask).sum(1) / mask.sum(1).clamp(min=1)).unsqueeze(1)
    raise ValueError(f"unknown importance_sampling_level {level!r}")


def importance_weights(
    proximal: torch.Tensor, behaviour: torch.Tensor, mask: torch.Tensor, mode: str, cap: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Off-policy correction for samples drawn by an older policy (the generator's, under
    max_staleness): w = pi_proximal / pi_behaviour, as TRL corrects vLLM's samples.

    proximal (the trainer's log-probs before this step's update), behaviour (the generator's),
    mask: (B, T). mode: token_truncate (w per token, capped at `cap`: TIS), token_mask (w per token,
    0 above the cap), sequence_truncate / sequence_mask (one w per sequence from the summed log
    ratio, (B, 1)). Returns (w, metrics), w detached."""
    mask = mask.to(proximal.dtype)
    diff = ((proximal - behaviour) * mask).detach()
    level, _, how = mode.partition("_")
    logw = diff.sum(1, keepdim=True) if level == "sequence" else diff
    w = torch.exp(logw)
    if how == "truncate":
        out = w.clamp(max=cap)
    elif how == "mask":
        out = w.masked_fill(w > cap, 0.0)
    else:
        raise ValueError(f"unknown importance sampling mode {mode!r}")
    over = (w > cap).to(mask.dtype).expand_as(mask)
    tokens = mask.sum().clamp(min=1)
    return out, {
        "is/ratio_mean": float((w.expand_as(mask) * mask).sum() / tokens),
        "is/capped_fraction": float((over * mask).sum() / tokens),
    }


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str = "dapo",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    max_completion_length: int | None = None,
    num_items: float | None = None,
    *,
    level: str = "token",
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate policy loss, as TRL defines the loss types.

    logprobs, old_logprobs, ref_logprobs, mask: (B, T) over completion tokens; advantages (B,).
    per-token: -min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A) * w + beta * k3
    ratio: exp(logp - old) per token, or with level "sequence" (GSPO) exp of its mean over each
    sequence's tokens, (B, 1), one ratio for the whole sequence. w: importance weights (B, T) or (B, 1)
    (truncated IS: see importance_weights), default 1.
    grpo: mean over each sequence's tokens, then over sequences;  bnpo: mean over the batch's tokens;
    dr_grpo: sum / (B * max_completion_length);  dapo: sum / num_items (tokens in the global batch,
    default this batch's). Returns (loss, metrics)."""
    mask = mask.to(logprobs.dtype)
    eps_high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(log_ratio(logprobs, old_logprobs, mask, level))
    a = advantages.unsqueeze(1)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + eps_high)
    per_token = -torch.min(ratio * a, clipped * a)
    if is_weights is not None:
        per_token = per_token * is_weights
    metrics = {}
    if beta:
        kl = k3_kl(logprobs, ref_logprobs)
        per_token = per_token + beta * kl
        metrics["kl"] = float((kl.detach() * mask).sum() / mask.sum().clamp(min=1))
    tokens = mask.sum().clamp(min=1)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / tokens
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (logprobs.shape[0] * (max_completion_length or logprobs.shape[1]))
    elif loss_type == "dapo":
        loss = (per_token * mask).sum() / (num_items or tokens)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    low = ((ratio < 1 - epsilon) & (a < 0)).to(mask.dtype).expand_as(mask)
    high = ((ratio > 1 + eps_high) & (a > 0)).to(mask.dtype).expand_as(mask)
    metrics["clip_ratio/low_mean"] = float((low * mask).sum() / tokens)
    metrics["clip_ratio/high_mean"] = float((high * mask).sum() / tokens)
    metrics["clip_ratio/region_mean"] = float(((low + high) * mask).sum() / tokens)
    return loss, metrics


def entropy(logits: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean token entropy of the policy over masked positions. logits (B, T, V), mask (B, T)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    ent = -(logp.exp() * logp).sum(-1)
    return float(masked_mean(ent, mask))


# -- knowledge distillation over the teacher's top-k ----------------------------------------------


TAIL_FLOOR = 1e-6  # the least mass a tail bucket keeps: a float16 top-k can round to a sum of 1


def _buckets(log_top: torch.Tensor) -> torch.Tensor:
    """k log-probs -> k + 1: the tail bucket holds the rest of the mass, at least TAIL_FLOOR (so
    reverse KL never meets log 0), renormalised to sum to 1. (..., k) -> (..., k + 1)."""
    mass = torch.logsumexp(log_top, dim=-1, keepdim=True)
    tail = torch.log(-torch.expm1(torch.clamp(mass, max=math.log1p(-TAIL_FLOOR))))
    return torch.log_softmax(torch.cat([log_top, tail], dim=-1), dim=-1)


def _at_least_f32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def topk_buckets(
    student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student distributions over k + 1 buckets: the teacher's top-k tokens, and a tail
    bucket holding the rest of the mass. student_logits (B, T, V); topk_ids (B, T, k) int;
    topk_logprobs (B, T, k), the teacher's log-probs at temperature 1. Both returns (B, T, k + 1) are
    log-probabilities. Both sides are built alike: the student's buckets from its temperature-1
    distribution, exactly as the teacher's were; then the temperature tempers each bucket (the tail
    as one token) on both sides, p^(1/T) renormalised. So the divergence is 0, with zero gradient,
    when the student equals the teacher, at any temperature."""
    log_q_top = torch.log_softmax(_at_least_f32(student_logits), dim=-1).gather(-1, topk_ids.long())
    log_p, log_q = _buckets(_at_least_f32(topk_logprobs)), _buckets(log_q_top)
    if temperature != 1.0:
        log_p, log_q = torch.log_softmax(log_p / temperature, dim=-1), torch.log_softmax(log_q / temperature, dim=-1)
    return log_p, log_q


def kd_divergence(
    log_p: torch.Tensor, log_q: torch.Tensor, kind: str = "forward_kl", beta: float = 0.5
) -> torch.Tensor:
    """Per-position divergence between teacher p and student q (log-probs over the same buckets,
    (B, T, K) -> (B, T)). forward_kl: KL(p || q); reverse_kl: KL(q || p); jsd: generalized JSD as
    TRL's GKD defines it, m = beta * p + (1 - beta) * q, beta * KL(p || m) + (1 - beta) * KL(q || m),
    with beta = 0 meaning KL(p || q) and beta = 1 meaning KL(q || p)."""

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a.exp() * (a - b)).sum(-1)

    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        return kl(log_p, log_q)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        return kl(log_q, log_p)
    if kind != "jsd":
        raise ValueError(f"unknown kd loss {kind!r}")
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), dim=0)
    return beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m)


def distill_loss(
    student_logits: torch.Tensor,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    alpha: float = 0.5,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    scale_by_t2: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """alpha * CE(teacher's tokens) + (1 - alpha) * KD(teacher top-k + tail || student); with
    `scale_by_t2` the KD term is multiplied by T^2 (Hinton et al.; DistillKit does, TRL's GKD does
    not: the default), which keeps its gradients' scale as the temperature softens both sides.
    student_logits (B, T, V); input_ids (B, T); loss_mask (B, T-1) marks positions predicting a
    completion token; topk_ids / topk_logprobs (B, T-1, k) aligned with those positions."""
    ce = weighted_nll(token_logprobs(student_logits, input_ids), loss_mask)
    log_p, log_q = topk_buckets(student_logits[:, :-1], topk_ids, topk_logprobs, temperature)
    kd = masked_mean(kd_divergence(log_p, log_q, kind, beta), loss_mask) * (temperature**2 if scale_by_t2 else 1.0)
    return alpha * ce + (1 - alpha) * kd, {"loss/ce": float(ce), "loss/kd": float(kd)}
