"""Advantages for policy-gradient fine-tuning: group-relative (GRPO), over rewards laid out group
by group. Shapes: B samples = prompts * G completions, each prompt's G contiguous."""

from __future__ import annotations

import torch


def _nan_std(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Unbiased std over the finite entries (NaN where fewer than two are finite)."""
    finite = ~torch.isnan(x)
    n = finite.sum(dim=dim, keepdim=keepdim) if dim is not None else finite.sum()
    mean = torch.nanmean(x, dim=dim, keepdim=True) if dim is not None else torch.nanmean(x)
    sq = torch.where(finite, (x - mean) ** 2, torch.zeros_like(x))
    total = sq.sum(dim=dim, keepdim=keepdim) if dim is not None else sq.sum()
    return torch.where(n > 1, total / (n - 1).clamp(min=1), torch.full_like(total, float("nan"))).sqrt()


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4):
    """Group-relative advantages. rewards (B,), B = prompts * group_size, each group contiguous;
    NaN marks a sample no reward function could score: it is left out of its group's mean and std
    and gets advantage 0 (it carries no signal, and must not lend its neighbours any).
    A = r - mean(group); divided by the group's std ("group", GRPO), the batch's std ("batch") or
    nothing ("none", the Dr. GRPO fix). Returns (advantages (B,), zero_std (B/G,) bool: groups
    with fewer than two scored samples or equal rewards)."""
    grouped = rewards.view(-1, group_size)
    std = _nan_std(grouped, dim=1, keepdim=True)
    centred = grouped - torch.nanmean(grouped, dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (std + eps)
    elif scale == "batch":
        centred = centred / (_nan_std(rewards) + eps)
    elif scale != "none":
        raise ValueError(f"scale must be group, batch or none, not {scale!r}")
    zero_std = ~(std.squeeze(1) >= 1e-8)  # NaN std (under two scored samples) counts as no signal
    centred = torch.where(zero_std.unsqueeze(1), torch.zeros_like(centred), centred)
    return torch.nan_to_num(centred.reshape(-1), nan=0.0), zero_std
