"""A trainer's trainable weights as a weight sync ships them: which parameters (the adapter, by
peft's names, under LoRA), gathered under ZeRO-3 (those alone, never the frozen base), and their
wire format (numpy copies in the generators' dtype; bfloat16 as raw int16 bits: numpy has none)."""

from __future__ import annotations

import contextlib

import deepspeed
import numpy as np
import torch
from peft import get_peft_model_state_dict


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def named_trainable(module: torch.nn.Module, uses_adapter: bool) -> dict[str, torch.Tensor]:
    """The trainable parameters by the names a generator loads them under (peft's under LoRA)."""
    named = {n: p for n, p in module.named_parameters() if p.requires_grad}
    return get_peft_model_state_dict(module, state_dict=named) if uses_adapter else named


@contextlib.contextmanager
def gathered(module: torch.nn.Module, params: list[torch.nn.Parameter], zero_stage: int):
    """Under ZeRO-3, `params` (only these) gathered whole on every rank for the block. Yields a
    count of what the gather cost this rank: the elements of every parameter of `module` that was
    partitioned away before and is whole now (the frozen base too, were it gathered)."""
    if zero_stage != 3:
        yield lambda: 0
        return
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    away = [p for p in module.parameters() if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield lambda: sum(p.ds_numel for p in away if p.ds_status == ZeroParamStatus.AVAILABLE)


def to_wire(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """A numpy copy of `t` in `dtype` (never a view of ZeRO's flat buffer); bfloat16 as its raw
    bits (int16)."""
    t = t.detach().cpu()
    cast = t.dtype != dtype  # a cast makes a new tensor; else numpy's copy (5x faster than .to(copy=True))
    t = t.to(dtype)
    out = (t.view(torch.int16) if dtype == torch.bfloat16 else t).numpy()
    return out if cast else out.copy()
