"""How a training step meets its rows: the gradient-accumulation chunks it runs in, and the
forward pass that projects to the vocabulary only from the first position with a loss."""

from __future__ import annotations

import torch


def forward_from_first_loss(model, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits only from the first position any row has a loss at: the prompt before it costs the
    layers but not the vocabulary projection and log-softmax (the largest tensors in a step).
    t holds input_ids (B, T) and per-position arrays (B, T-1[, k]). Returns logits (B, T-s, V) and t
    with every 2-D+ array cropped by s columns, so token_logprobs and the masks still line up."""
    length = t["input_ids"].shape[1]
    positions = t["loss_mask"].any(dim=0).nonzero()
    start = int(positions[0]) if len(positions) else 0
    logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], logits_to_keep=length - start).logits
    return logits, {k: v[:, start:] if v.dim() >= 2 else v for k, v in t.items()}


def accumulation_chunks(rows: int, gradient_accumulation_steps: int) -> int:
    """How many gradient-accumulation chunks a step of `rows` rows (per rank) runs in: at most
    gradient_accumulation_steps, never more than the rows, at least 1."""
    return max(1, min(rows, gradient_accumulation_steps))
