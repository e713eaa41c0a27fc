"""Student initialisation for distillation: from the teacher by keeping a subset of its layers
(the usual start for a distilled student that already knows the vocabulary and embeddings), or
from a smaller config that shares the teacher's tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


def kept_layers(num_layers: int, every: int) -> list[int]:
    """Every `every`-th layer from the first, always ending with the last (its output feeds the
    head). kept_layers(30, 3) -> [0, 3, ..., 27, 29]."""
    keep = list(range(0, num_layers, every))
    if keep[-1] != num_layers - 1:
        keep.append(num_layers - 1)
    return keep


def from_teacher_layers(teacher_dir: str | Path, out_dir: str | Path, every: int = 3, adapter: str = "") -> list[int]:
    """Save a student made of the teacher's layers kept_layers(n, every), with the teacher's
    embeddings, final norm, head and tokenizer. With `adapter` (the tuned teacher's LoRA), the
    adapter is merged first, so the student starts from the tuned layers. Returns the kept indices."""
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    layers = model.model.layers
    keep = kept_layers(len(layers), every)
    model.model.layers = torch.nn.ModuleList(layers[i] for i in keep)
    for new_index, layer in enumerate(model.model.layers):
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new_index  # the KV cache is indexed by position in the stack
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(out_dir)
    return keep


def from_config(teacher_dir: str | Path, out_dir: str | Path, seed: int = 0, **overrides) -> None:
    """Save a randomly initialised student of the teacher's architecture with `overrides` (e.g.
    num_hidden_layers=4, hidden_size=256), sharing the teacher's tokenizer and vocabulary."""
    config = AutoConfig.from_pretrained(teacher_dir)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"the teacher's config has no field {key!r}")
        setattr(config, key, value)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(out_dir)
