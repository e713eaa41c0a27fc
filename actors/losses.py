"""Losses as small pure functions over tensors. Shapes: B batch, T sequence length, V vocabulary."""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Log-probability of each next token. logits (B, T, V), input_ids (B, T) -> (B, T-1):
    out[b, t] = log p(input_ids[b, t+1] | input_ids[b, :t+1])."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values where mask is 1, over all of them. values, mask (B, T) -> scalar."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def weighted_nll(logprobs: torch.Tensor, loss_mask: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Token-level negative log-likelihood, each sequence scaled by its weight, averaged over the
    masked tokens. logprobs (B, T-1), loss_mask (B, T-1), weights (B,) or None -> scalar."""
    nll = -logprobs
    if weights is not None:
        nll = nll * weights.to(nll.dtype).unsqueeze(-1)
    return masked_mean(nll, loss_mask)
