"""The `export` stage: the job's result in the formats serving stacks load offline, each one
reloaded and checked before the stage succeeds.

The student a distill stage trained (or, without one, the tuned teacher) is written under
export/model in HF format: safetensors weights, config, generation config, tokenizer and chat
template. A tuned LoRA policy is written as a PEFT adapter (export/adapter, the layout vLLM's LoRA
loader reads) and, on request, merged into its base (export/merged). Every artifact is loaded back
from disk (the adapter onto a fresh base) and decodes held-out prompts greedily; the fraction that
decode exactly like the in-memory model is `export/<artifact>/greedy_match`. A float32 artifact
must match on every prompt or the stage fails; a bfloat16 / float16 one is reported (rounding may
change a greedy choice).
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from stillroom.actors.common import datasets
from stillroom.actors.models.loading import DTYPES, encode_prompt, model_dir
from stillroom.actors.runtime.context import StageContext, StageFailed
from stillroom.actors.stages.wiring import held_out
from stillroom.v1 import job_pb2 as pb
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

PROBE = ["Hello", "Classify this ticket:"]  # when the job has no held-out split
PROMPTS, NEW_TOKENS = 8, 16


def greedy_tokens(model, prompts: list[list[int]], max_new_tokens: int = NEW_TOKENS) -> list[list[int]]:
    """Greedy continuations of tokenised prompts: the fingerprint compared before and after export."""
    out = []
    with torch.no_grad():
        for ids in prompts:
            # one unpadded row: the pad id is never used, but generate wants one
            gen = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
            out.append(gen[0, len(ids) :].tolist())
    return out


def match_fraction(got: list[list[int]], expected: list[list[int]]) -> float:
    """The fraction of prompts whose greedy decode is identical, token for token."""
    return sum(g == e for g, e in zip(got, expected, strict=True)) / max(len(expected), 1)


def probe_prompts(spec: pb.JobSpec, tokenizer) -> list[list[int]]:
    """Up to PROMPTS held-out prompts as the model sees them (its chat template, their roles)."""
    ref = held_out(spec)
    rows = datasets.load_ref(ref).prompts()[:PROMPTS] if ref.path else [{"prompt": p} for p in PROBE]
    ids = [encode_prompt(tokenizer, r["prompt"], messages=datasets.decode_turns(r.get("messages"))) for r in rows]
    return [i or [tokenizer.eos_token_id or 0] for i in ids]


def save_hf(model, tokenizer, target: Path, dtype: torch.dtype) -> None:
    model = model.to(dtype)
    if model.generation_config is None or not model.generation_config.eos_token_id:
        model.generation_config = GenerationConfig(
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id
        )
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)


def run(params: pb.ExportStage, spec: pb.JobSpec, ctx: StageContext) -> None:
    """Write each artifact, reload it, compare its greedy decodes with the in-memory model's."""
    dtype_name = params.dtype or "float32"
    out = ctx.artifact_dir / ctx.stage
    source = ctx.outputs.get("student_model") or ctx.outputs.get("policy_model") or str(model_dir(spec.teacher))
    adapter = "" if "student_model" in ctx.outputs else ctx.outputs.get("policy_adapter", "")
    tokenizer = AutoTokenizer.from_pretrained(source)
    prompts = probe_prompts(spec, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    checks: dict[str, float] = {}
    if adapter:
        model = PeftModel.from_pretrained(model, adapter).eval()
        expected = greedy_tokens(model, prompts)
        model.save_pretrained(out / "adapter")  # PEFT format: adapter_config.json + adapter_model.safetensors
        tokenizer.save_pretrained(out / "adapter")
        base = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        checks["adapter"] = match_fraction(
            greedy_tokens(PeftModel.from_pretrained(base, out / "adapter"), prompts), expected
        )
        ctx.artifact_tree(out / "adapter", "adapter")
        if params.merge_adapter:
            model = model.merge_and_unload()
            checks["merged"] = _export_model(model, tokenizer, out / "merged", dtype_name, prompts, expected, ctx)
    else:
        expected = greedy_tokens(model, prompts)
        checks["model"] = _export_model(model, tokenizer, out / "model", dtype_name, prompts, expected, ctx)
    report(ctx, checks, dtype_name)


def _export_model(model, tokenizer, target: Path, dtype_name: str, prompts, expected, ctx: StageContext) -> float:
    """Save a full model in HF format, reload it from disk, and return its greedy match fraction."""
    save_hf(model, tokenizer, target, DTYPES[dtype_name])
    reloaded = AutoModelForCausalLM.from_pretrained(target, dtype=DTYPES[dtype_name]).eval()
    ctx.metrics({"export/bytes": sum(p.stat().st_size for p in target.rglob("*") if p.is_file())})
    ctx.artifact_tree(target, "model")
    return match_fraction(greedy_tokens(reloaded, prompts), expected)


def report(ctx: StageContext, checks: dict[str, float], dtype_name: str) -> None:
    """Each artifact's match fraction as a metric (and the lowest as export/greedy_match); a float32
    model or any adapter (always float32) below 1.0 fails the stage."""
    ctx.metrics(
        {f"export/{name}/greedy_match": v for name, v in checks.items()} | {"export/greedy_match": min(checks.values())}
    )
    exact = {name: v for name, v in checks.items() if name == "adapter" or dtype_name == "float32"}
    failed = {name: v for name, v in exact.items() if v < 1.0}
    if failed:
        raise StageFailed(
            "the exported artifacts do not decode like the model exported: "
            + ", ".join(f"{name} matches {v:.0%} of held-out prompts greedily" for name, v in failed.items())
        )
