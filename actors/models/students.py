"""Student initialisation for distillation: from the teacher by keeping a subset of its layers
(the usual start for a distilled student that already knows the vocabulary and embeddings), or
from a smaller config that shares the teacher's tokenizer.

Which layers: every n-th (kept_layers), or the most important ones measured on a sample of the
job's own prompts (importance_layers): ShortGPT's Block Influence, BI_i = 1 - E_t[cos(x_i, y_i)]
between a layer's input and output hidden states over the prompts' tokens. A layer that barely
turns its input (BI near 0) is the cheapest to drop; the last layer is always kept (it feeds the
final norm and the head).
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


def block_influence(inputs: torch.Tensor, outputs: torch.Tensor) -> float:
    """1 - the mean over tokens of cos(input, output): [tokens, hidden] each. 0 for a layer that
    leaves its input's direction alone, up to 2 for one that reverses it."""
    cos = torch.nn.functional.cosine_similarity(inputs.double(), outputs.double(), dim=-1)
    return float(1.0 - cos.mean())


def importance_layers(influence: list[float], count: int) -> list[int]:
    """The `count` layers to keep: the last, and the count - 1 others of highest influence
    (ties: the earlier layer), in their order in the stack."""
    last = len(influence) - 1
    ranked = sorted(range(last), key=lambda i: (-influence[i], i))
    return sorted(ranked[: count - 1] + [last])


@torch.no_grad()
def layer_influence(model, prompts: list[list[int]]) -> list[float]:
    """Block Influence of every decoder layer of `model` over the tokens of `prompts` (token id
    lists, one forward each): what enters and what leaves each layer, caught by hooks."""
    layers = model.model.layers
    seen: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {i: [] for i in range(len(layers))}

    def hook(index: int):
        def catch(module, args, kwargs, output):
            given = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            seen[index].append((given.reshape(-1, given.shape[-1]), out.reshape(-1, out.shape[-1])))

        return catch

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        model.eval()
        for ids in prompts:
            model(torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    return [block_influence(torch.cat([a for a, _ in seen[i]]), torch.cat([b for _, b in seen[i]])) for i in seen]


def from_teacher_layers(
    teacher_dir: str | Path,
    out_dir: str | Path,
    every: int = 3,
    adapter: str = "",
    prompts: list[list[int]] | None = None,
) -> list[int]:
    """Save a student made of as many of the teacher's layers as kept_layers(n, every) keeps, with
    the teacher's embeddings, final norm, head and tokenizer: those very layers, or, with
    `prompts` (token ids), the most important ones on them (importance_layers). With `adapter`
    (the tuned teacher's LoRA), the adapter is merged first, so the student starts from the tuned
    layers. Returns the kept indices."""
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    layers = model.model.layers
    keep = kept_layers(len(layers), every)
    if prompts:
        keep = importance_layers(layer_influence(model, prompts), len(keep))
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
