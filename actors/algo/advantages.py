"""Advantages for policy-gradient fine-tuning: group-relative (GRPO), over rewards laid out group
by group. Shapes: B samples = prompts * G completions, each prompt's G contiguous."""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4):
    """Group-relative advantages. rewards (B,), B = prompts * group_size, each group contiguous.
    A = r - mean(group); divided by the group's std ("group", GRPO), the batch's std ("batch") or
    nothing ("none", the Dr. GRPO fix). Returns (advantages (B,), zero_std (B/G,) bool)."""
    grouped = rewards.view(-1, group_size)
    std = grouped.std(dim=1, keepdim=True)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (std + eps)
    elif scale == "batch":
        centred = centred / (rewards.std() + eps)
    elif scale != "none":
        raise ValueError(f"scale must be group, batch or none, not {scale!r}")
    return centred.reshape(-1), std.squeeze(1) < 1e-8
