"""What a train step minimises: one small frozen type per kind of loss, each computing its loss from
the policy's logits over a batch. Adding a loss is a new type with a `loss` method, nothing else.

Every `loss(logits, t, reference, num_items)` takes logits (B, T, V) over t["input_ids"] (B, T),
the batch's per-position arrays t (loss_mask (B, T-1), ...), `reference`, a callable that returns
the reference policy's token log-probs (B, T-1) at a temperature when the objective needs them (it
costs a forward), and num_items, the token normaliser of a loss that normalises by the global batch
(algo.losses.dapo_num_items). Returns (scalar loss, metrics).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from stillroom.actors.algo.losses import (
    distill_loss,
    entropy,
    grpo_loss,
    importance_weights,
    tempered,
    token_logprobs,
    weighted_nll,
)

Arrays = dict[str, torch.Tensor]
Reference = Callable[[float], torch.Tensor]


def _no_reference(temperature: float = 1.0) -> torch.Tensor:
    raise RuntimeError("this objective has no reference policy")


@dataclass(frozen=True)
class NllObjective:
    """SFT (and sequence-level KD): token NLL of the completions, each sequence scaled by
    t["weights"], over the step's tokens (num_items) when the trainer gives them."""

    needs_proximal = False  # the trainer's own log-probs before the step: only off-policy GRPO uses them

    def loss(self, logits: torch.Tensor, t: Arrays, reference: Reference = _no_reference, num_items=None):
        return weighted_nll(token_logprobs(logits, t["input_ids"]), t["loss_mask"], t.get("weights"), num_items), {}


@dataclass(frozen=True)
class GrpoObjective:
    """The clipped surrogate with the loss type's normalisation, plus beta * k3 KL to the reference
    policy. t carries advantages (B,) and, from the generator, old_logprobs (B, T-1). Every
    log-prob (the policy's, the reference's, the entropy's) is at the sampling temperature, as the
    generator's old log-probs are (logits / T), so the ratio compares like with like.

    With an importance sampling mode (off-policy correction for stale samples), t also carries
    proximal_logprobs, the trainer's own before the step's first update: the ratio is clipped
    against them and each token is weighted by the truncated proximal / generator ratio (TIS).
    With trainer_old_logprobs (generator and trainer compute in different precisions, e.g. a
    float32 sampler beside a bfloat16 trainer) the trainer's own log-probs are the old ones, as
    TRL computes them when it generates without vLLM: the first pass's ratio is then exactly 1,
    and clipping acts on the policy's moves, not on precision noise."""

    loss_type: str = "dapo"
    epsilon: float = 0.2
    epsilon_high: float = 0.0  # 0: same as epsilon
    beta: float = 0.0
    max_completion_length: int = 0
    temperature: float = 1.0
    level: str = "token"  # importance_sampling_level: token, or sequence (GSPO)
    is_mode: str = ""  # "": no correction; token_truncate | token_mask | sequence_truncate | sequence_mask
    is_cap: float = 3.0
    trainer_old_logprobs: bool = False

    @property
    def needs_proximal(self) -> bool:
        """The trainer's log-probs before the step: an importance sampling mode corrects against
        them, and they are the old log-probs under trainer_old_logprobs."""
        return bool(self.is_mode) or self.trainer_old_logprobs

    def loss(self, logits: torch.Tensor, t: Arrays, reference: Reference = _no_reference, num_items=None):
        logits = tempered(logits, self.temperature)
        logprobs = token_logprobs(logits, t["input_ids"])
        old = t["old_logprobs"] if "old_logprobs" in t else logprobs.detach()
        weights, is_metrics = None, {}
        if self.is_mode and "proximal_logprobs" in t:
            weights, is_metrics = importance_weights(
                t["proximal_logprobs"], old, t["loss_mask"], self.is_mode, self.is_cap
            )
        if "proximal_logprobs" in t:
            old = t["proximal_logprobs"]
        loss, metrics = grpo_loss(
            logprobs,
            old,
            t["advantages"],
            t["loss_mask"],
            self.loss_type,
            self.epsilon,
            self.epsilon_high or None,
            self.beta,
            reference(self.temperature) if self.beta else None,
            self.max_completion_length or None,
            num_items if self.loss_type == "dapo" else None,
            level=self.level,
            is_weights=weights,
        )
        metrics.update(is_metrics)
        metrics["entropy"] = entropy(logits[:, :-1].detach(), t["loss_mask"])
        return loss, metrics


@dataclass(frozen=True)
class KdObjective:
    """alpha * CE + (1 - alpha) * KD against the teacher's top-k (t["topk_ids"], t["topk_logprobs"],
    (B, T-1, k)) at a temperature. Without top-k (a student with another tokenizer), CE on the
    teacher's text alone: sequence-level KD."""

    needs_proximal = False
    alpha: float = 0.5
    kd_loss: str = "forward_kl"
    jsd_beta: float = 0.5
    temperature: float = 1.0
    scale_by_t2: bool = False  # multiply KD by T^2 (Hinton; DistillKit); TRL's GKD does not

    def loss(self, logits: torch.Tensor, t: Arrays, reference: Reference = _no_reference, num_items=None):
        if "topk_ids" not in t:
            ce = weighted_nll(token_logprobs(logits, t["input_ids"]), t["loss_mask"])
            return ce, {"loss/ce": float(ce)}
        return distill_loss(
            logits,
            t["input_ids"],
            t["loss_mask"],
            t["topk_ids"],
            t["topk_logprobs"],
            self.alpha,
            self.kd_loss,
            self.jsd_beta,
            self.temperature,
            self.scale_by_t2,
        )


Objective = NllObjective | GrpoObjective | KdObjective
NLL = NllObjective()  # the default: SFT
