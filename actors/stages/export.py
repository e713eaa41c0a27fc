"""The `export` stage: the job's result in the formats serving stacks load offline.

The student a distill stage trained (or, without one, the tuned teacher) is written under
export/model in HF format: safetensors weights, config, generation config, tokenizer and chat
template. A tuned LoRA policy is also written as a PEFT adapter (export/adapter, the layout vLLM's
LoRA loader reads), merged into its base on request. Before the stage succeeds it reloads what it
wrote and checks that greedy decoding gives the same tokens as the model it exported.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from stillroom.actors.models.loading import DTYPES, model_dir
from stillroom.actors.runtime.context import StageContext, StageFailed
from stillroom.v1 import job_pb2 as pb
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

PROBE = ["Hello", "Classify this ticket:"]


def greedy_tokens(model, tokenizer, prompts: list[str] = PROBE, max_new_tokens: int = 8) -> list[list[int]]:
    """Greedy continuations of a few prompts: the fingerprint compared before and after export."""
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
            if ids.shape[1] == 0:
                ids = torch.tensor([[tokenizer.eos_token_id or 0]])
            gen = model.generate(
                ids,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
            out.append(gen[0, ids.shape[1] :].tolist())
    return out


def save_hf(model, tokenizer, target: Path, dtype: torch.dtype) -> None:
    model = model.to(dtype)
    if model.generation_config is None or not model.generation_config.eos_token_id:
        model.generation_config = GenerationConfig(
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id
        )
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)


def run(params: pb.ExportStage, spec: pb.JobSpec, ctx: StageContext) -> None:
    """Stage entry point."""
    dtype = DTYPES[params.dtype or "float32"]
    out = ctx.artifact_dir / ctx.stage
    source = ctx.outputs.get("student_model") or ctx.outputs.get("policy_model") or str(model_dir(spec.teacher))
    adapter = "" if "student_model" in ctx.outputs else ctx.outputs.get("policy_adapter", "")
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    if adapter:
        model = PeftModel.from_pretrained(model, adapter).eval()
        model.save_pretrained(out / "adapter")  # PEFT format: adapter_config.json + adapter_model.safetensors
        tokenizer.save_pretrained(out / "adapter")
        ctx.artifact_tree(out / "adapter", "adapter")
        if not params.merge_adapter:
            return
        model = model.merge_and_unload()
    expected = greedy_tokens(model.to(dtype), tokenizer)
    target = out / ("merged" if adapter else "model")
    save_hf(model, tokenizer, target, dtype)
    reloaded = AutoModelForCausalLM.from_pretrained(target, dtype=dtype).eval()
    got = greedy_tokens(reloaded, AutoTokenizer.from_pretrained(target))
    if got != expected:
        raise StageFailed(f"the exported model does not decode like the one exported: {got} != {expected}")
    ctx.metrics(
        {"export/greedy_match": 1.0, "export/bytes": sum(p.stat().st_size for p in target.rglob("*") if p.is_file())}
    )
    ctx.artifact_tree(target, "model")
