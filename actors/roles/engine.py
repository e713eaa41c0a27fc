"""The seam between the Generator role and what generates: one small interface, two engines.

`hf` (hf_engine.py, the default) is transformers `generate`; `vllm` (vllm_engine.py) is an
in-process vLLM engine. A recipe picks one per role (`resources.generator.engine`,
`resources.student.engine`); the role (generator.py) keeps what both share: the tokenizer and
chat template, the lock, the policy version, and the rows it returns, so both engines' batches
have the same columns and dtypes. An engine module is imported only when chosen: vLLM is an
optional extra (`pip install 'stillroom[vllm]'`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

ENGINES = {
    "hf": "stillroom.actors.roles.hf_engine:HfEngine",
    "vllm": "stillroom.actors.roles.vllm_engine:VllmEngine",
}


@dataclass
class Sampled:
    """What an engine returns for a batch of prompts: per sample (params.n per prompt, prompt-major)
    its new token ids (they may run on past the stop token: the role cuts each answer after its
    first stop id), the sampled tokens' log-probs at the sampling temperature, float32 (T_i,), and,
    when asked for, the top-k (ids, log-probs) per token at temperature 1, (T_i, k) each."""

    ids: list[list[int]]
    logprobs: list[torch.Tensor]
    topk: list[tuple[torch.Tensor, torch.Tensor]] | None = None


class Engine(Protocol):
    """What the Generator role asks of an engine. Calls come one at a time (the role's lock)."""

    model: object  # the engine's own model object (a transformers model, a vllm.LLM)
    stop_ids: list[int]  # every token that ends an answer

    def sample(self, prompt_ids: list[list[int]], params) -> Sampled: ...

    def score(
        self, prompts: list[list[int]], completions: list[list[int]], k: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Teacher-forced top-k (ids, log-probs) at temperature 1, (T_i, k) per completion."""
        ...

    def install(self, tensors: dict[str, torch.Tensor]) -> None:
        """A PEFT adapter state dict (an adapter policy) or full parameters, by transformers' names."""
        ...

    def weights_dtype(self) -> str: ...

    def num_parameters(self) -> int: ...

    def logits(self, input_ids: np.ndarray) -> np.ndarray: ...

    def close(self) -> None:
        """Release what the engine holds in the process beyond its model (vllm: its process group)."""
        ...


def open_engine(spec, device: str, tokenizer) -> Engine:
    """The engine `spec.engine` names ("" is hf), built for `spec` on `device`."""
    name = spec.engine or "hf"
    if name not in ENGINES:
        raise ValueError(f"unknown generation engine {name!r}: one of {', '.join(ENGINES)}")
    module, _, cls = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), cls)(spec, device, tokenizer)
