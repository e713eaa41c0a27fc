"""GRPO: stillroom's grpo stage (real role actors on a local Ray) against TRL's GRPOTrainer on
identical work: the same model, prompts, group size, max completion length, loss type, beta,
clip range (epsilon = epsilon_high = 0.2), gradient checkpointing (off unless --checkpointing, on
both sides), training precision (float32 unless --bf16, on both sides: TRL's default is bfloat16
autocast), learning rate, steps and seed, run one after the other on this machine.

    .venv/bin/python -m bench.grpo [--model tiny|smollm2] [--steps 8] [--group-size 4 --prompts 4
        --max-new-tokens 32] [--checkpointing] [--bf16] [--staleness 0 1] [--init MODEL_DIR]

tiny: a random 4-layer Llama, full fine-tuning, rewarded for digits (a reward a random model has
variance on). smollm2: SmolLM2-135M-Instruct with LoRA r=8 on the ticket task, rewarded by
json_valid + json_fields; `--init` starts both sides from another model directory of that
architecture instead (the demo's fine-tuned-only teacher, .stillroom/demo/artifacts/<job>/sft_plain/
model after `make demo`, writes JSON that is sometimes right: rewards with variance). Rows:
stillroom synchronous, stillroom max_staleness=1, TRL. Seconds per step are the median over
steps after the first (TRL's from a step-end callback, ours from the stage's step events), so model
loading and actor start-up are left out of both.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import median, report, run_stage, step_seconds
from bench.generation import model_path, prompts


def digits(prompts: list[str], completions: list[str], **_) -> list[float]:
    """Fraction of the characters that are digits (the tiny model's reward)."""
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


def rows_for(model: str, n: int) -> list[dict]:
    path = Path(__file__).parents[1] / "examples/tickets/data/train.jsonl"
    if model == "smollm2" and path.exists():
        return [json.loads(line) for line in path.read_text().splitlines()[:n]]
    return [{"prompt": p, "completion": "{}"} for p in prompts(n)]


def stillroom(model: str, path: str, args, max_staleness: int) -> dict:
    from stillroom.services.recipes import parse

    work = Path(tempfile.mkdtemp(prefix="bench-grpo-"))
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows_for(model, 64)))
    rewards = (
        [{"name": "bench.grpo:digits"}]
        if model == "tiny"
        else [{"name": "json_valid", "weight": 0.2}, {"name": "json_fields", "args": {"column": "reference"}}]
    )
    stage = {
        "group_size": args.group_size,
        "prompts_per_step": args.prompts,
        "max_new_tokens": args.max_new_tokens,
        "loss_type": "dapo",
        "beta": 0.0,
        "epsilon": 0.2,
        "epsilon_high": 0.2,  # TRL's clip range is symmetric unless told otherwise
        "max_staleness": max_staleness,
        "rewards": rewards,
        "optim": {
            "learning_rate": args.lr,
            "max_steps": args.steps,
            "gradient_checkpointing": args.checkpointing,
            "lr_scheduler_type": "linear",  # TRL's default
            "dtype": "bfloat16" if args.bf16 else "float32",
        },
    }
    if model == "tiny":
        stage["adapter"] = "ADAPTER_TYPE_NONE"
    else:
        stage["lora"] = {"r": 8, "alpha": 16}
    spec = parse(
        {
            "teacher": {"path": path},
            "data": {"train": {"path": str(data)}},
            "stages": [{"grpo": stage}],
            "resources": {"generator": {"num_cpus": 0.75}, "scorer": {"num_cpus": 0.25}, "trainer": {"num_cpus": 1}},
            "seed": 0,
        }
    )
    events = run_stage(spec, work)
    steps = [e for e in events if "train/step" in e.metrics]
    rewards_seen = [e.metrics["reward"] for e in steps]
    return _row(f"stillroom (max_staleness={max_staleness})", step_seconds(events), rewards_seen, args)


def _trl_prompts(model: str, tok):
    """The same prompts as stillroom's side, framed as its generator frames them (a user turn)."""
    from datasets import Dataset

    rows = rows_for(model, 64)
    if tok.chat_template:
        for r in rows:
            r["prompt"] = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False)
            r["prompt"] += "<|im_start|>assistant\n"
    return Dataset.from_list([{"prompt": r["prompt"], "reference": r.get("completion", "")} for r in rows])


def trl(model: str, path: str, args) -> dict:
    from stillroom.actors.algo.rewards import json_fields, json_valid
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    data = _trl_prompts(model, tok)
    if model == "tiny":
        funcs, weights = [digits], [1.0]
    else:
        funcs, weights = [json_valid, json_fields], [0.2, 1.0]
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"),
        per_device_train_batch_size=args.prompts * args.group_size,
        num_generations=args.group_size,
        max_completion_length=args.max_new_tokens,
        loss_type="dapo",
        beta=0.0,
        epsilon=0.2,
        gradient_checkpointing=args.checkpointing,  # TRL's default is on; set equal on both sides
        bf16=args.bf16,  # TRL's default is bfloat16 autocast (emulated, ~180x slower, on CPUs without AVX512-BF16)
        learning_rate=args.lr,
        lr_scheduler_type="linear",  # to 0 at the last step, as the stillroom rows
        max_steps=args.steps,
        temperature=1.0,
        reward_weights=weights,
        use_cpu=True,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
        data_seed=0,
    )
    peft_config = None
    if model != "tiny":
        from peft import LoraConfig

        peft_config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")

    class Clock(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_end(self, *_, **__):
            self.times.append(time.perf_counter())

    clock = Clock()
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(path),
        reward_funcs=funcs,
        args=config,
        train_dataset=data,
        processing_class=tok,
        peft_config=peft_config,
        callbacks=[clock],
    )
    trainer.train()
    rewards_seen = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return _row("TRL GRPOTrainer", np.diff(clock.times).tolist(), rewards_seen, args)


def _row(who: str, step_seconds: list[float], rewards: list[float], args) -> dict:
    seconds = median(step_seconds) if step_seconds else float("nan")
    return {
        "who": who,
        "seconds_per_step": seconds,
        "completions_per_s": args.prompts * args.group_size / seconds,
        "reward_first": rewards[0] if rewards else float("nan"),
        "reward_last3": float(np.mean(rewards[-3:])) if rewards else float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step")
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on both sides")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 training on both sides (default float32)")
    ap.add_argument("--staleness", type=int, nargs="+", default=[0, 1], help="stillroom rows' max_staleness")
    ap.add_argument("--init", default="", help="start both sides from this model directory (e.g. an SFT'd one)")
    args = ap.parse_args()
    path = args.init or model_path(args.model)
    rows = [stillroom(args.model, path, args, k) for k in args.staleness] + [trl(args.model, path, args)]
    for row in rows[:-1]:
        row["throughput_vs_trl"] = rows[-1]["seconds_per_step"] / row["seconds_per_step"]
    columns = ["who", "seconds_per_step", "completions_per_s", "reward_first", "reward_last3", "throughput_vs_trl"]
    shape = f"{args.group_size}x{args.prompts}x{args.max_new_tokens}" + ("-ckpt" if args.checkpointing else "")
    shape += ("-sft" if args.init else "") + ("-bf16" if args.bf16 else "")
    report(f"grpo-{args.model}-{shape}", rows, columns, {"settings": vars(args)})


if __name__ == "__main__":
    main()
