"""Distillation: stillroom's distill stage (offline top-k KD from the teacher's answers, and
on-policy GKD) against TRL's GKDTrainer (lmbda=0: a dataset of answers with the teacher's full
distribution; lmbda=1: on-policy) on identical settings: the same teacher, student init, prompts,
steps, batch, learning rate and its linear decay, completion length, forward KL at temperature 1,
float32 and no gradient checkpointing (TRL's defaults, bfloat16 autocast and checkpointing, are
turned off: on a CPU without AVX512-BF16 torch emulates bfloat16 ~180x slower).

    .venv/bin/python -m bench.distill [--steps 12] [--lr 3e-4] [--top-k 16] [--teacher DIR]

Offline, both sides learn from the same precomputed teacher data: stillroom's teacher writes its
greedy answers once (epoch 1, journaled with their top-k log-probs), and the student trains two
epochs over them, the second replayed from the journal (no generation); TRL's GKDTrainer (lmbda=0)
trains as many steps on exactly those answers (read from the journal). The offline rows' seconds
per step and tokens/s are those of the replayed epoch for stillroom, of every step for TRL (which
runs the teacher's forward on every step by design). Teacher: a random 4-layer Llama, or the
trained model `--teacher` names (the demo's `sft/model`); student: every third of its layers.
Held-out forward KL(teacher || student) over the full vocabulary on the teacher's greedy answers to
16 unseen prompts, measured the same way for every row after the same steps.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import median, report, run_stage, step_seconds, tiny_llama
from bench.generation import prompts


@torch.no_grad()
def held_out_kl(teacher_path: str, student, texts: list[str], new_tokens: int) -> float:
    """Mean over answer tokens of KL(teacher || student), full vocabulary, on the teacher's greedy
    answers to `texts`, each framed by the chat template as both sides train (encode_prompt)."""
    from stillroom.actors.models.loading import encode_prompt
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher_path)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path).eval()
    student.eval()
    total, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([encode_prompt(tok, text)])
        seq = teacher.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        start = ids.shape[1] - 1
        p = torch.log_softmax(teacher(seq).logits[0, start:-1], -1)
        q = torch.log_softmax(student(seq).logits[0, start:-1], -1)
        total += float((p.exp() * (p - q)).sum())
        count += p.shape[0]
    return total / count


def stillroom(teacher: str, student: str, rows: list[dict], args, mode: str) -> tuple[dict, str]:
    from stillroom.services.recipes import parse

    work = Path(tempfile.mkdtemp(prefix=f"bench-distill-{mode}-"))
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stage = {
        "mode": mode,
        "num_samples": 1,  # GKDTrainer samples one answer per prompt
        "top_k": args.top_k,
        "filter": "valid_only" if mode == "offline" else "majority_vote",
        "max_new_tokens": args.new_tokens,
        "prompts_per_step": args.batch,
        "alpha": 0.0,
        "kd_loss": "forward_kl",
        "optim": {
            "learning_rate": args.lr,
            "max_steps": 2 * args.steps,
            "lr_scheduler_type": "linear",  # TRL's default
            "dtype": "float32",
        },
        "eval_prompts": 1,
    }
    if mode == "offline":  # the teacher's greedy answers, all kept, learned for two epochs
        stage["rewards"] = [{"name": "length_penalty"}]  # scores every sample 0 or below; all kept
        stage["filter"], stage["min_reward"], stage["sampling_temperature"] = "min_reward", -1.0, 0.0
        stage["optim"]["epochs"] = 2
    spec = parse(
        {
            "teacher": {"path": teacher},
            "student": {"path": student},
            "data": {"train": {"path": str(work / "train.jsonl")}},
            "stages": [{"distill": stage}],
            "resources": {
                "generator": {"num_cpus": 0.5},
                "scorer": {"num_cpus": 0.25},
                "trainer": {"num_cpus": 1},
                "student": {"num_cpus": 0.25},
            },
            "seed": 0,
        }
    )
    started = time.perf_counter()
    events = run_stage(spec, work)
    wall = time.perf_counter() - started
    seconds = step_seconds(events, "loss") if mode == "on_policy" else step_seconds(events)[args.steps :]
    tokens = [e.metrics["train/tokens_per_s"] for e in events if "train/tokens_per_s" in e.metrics]
    tokens = tokens[args.steps :] if mode == "offline" else tokens  # the replayed epoch: training alone
    return {
        "who": f"stillroom distill ({mode})",
        "seconds_per_step": median(seconds) if seconds else float("nan"),
        "student_tok_s": median(tokens) if tokens else float("nan"),
        "wall_s": wall,
    }, str(work / "distill" / "student")


def teacher_answers(work: str) -> dict[str, str]:
    """prompt -> the answer the teacher wrote, from a distill stage's journal."""
    from stillroom.actors.runtime.journal import Journal

    journal = Journal(Path(work, "distill", "journal"))
    batches = [journal.read(bid).to_pydict() for bid in journal.ids()]
    return {p: c for b in batches for p, c in zip(b["prompt"], b["completion"], strict=True)}


def trl_gkd(teacher: str, student: str, rows: list[dict], args, lmbda: float):
    """rows: prompt and, for lmbda=0, the teacher's answer (lmbda=1 samples the student instead)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    tok = AutoTokenizer.from_pretrained(teacher)
    messages = [  # GKD reads chat turns, framed by the same chat template as stillroom's prompts
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["answer"]}]}
        for r in rows
    ]
    config = GKDConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-gkd-"),
        per_device_train_batch_size=args.batch,
        learning_rate=args.lr,
        lr_scheduler_type="linear",  # to 0 at the last step, as the stillroom rows
        max_steps=2 * args.steps,
        lmbda=lmbda,
        beta=0.0,  # forward KL, as the stillroom rows
        temperature=1.0,
        max_new_tokens=args.new_tokens,
        gradient_checkpointing=False,  # TRL's default is on; stillroom's rows do not recompute
        bf16=False,  # TRL's default is bfloat16 autocast, emulated (~180x slower) on CPUs without AVX512-BF16
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
    )

    class Clock(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_end(self, *_, **__):
            self.times.append(time.perf_counter())

    clock = Clock()

    model = AutoModelForCausalLM.from_pretrained(student)
    trainer = GKDTrainer(
        model=model,
        teacher_model=teacher,
        args=config,
        train_dataset=Dataset.from_list(messages),
        processing_class=tok,
        callbacks=[clock],
    )
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    seconds = median(np.diff(clock.times).tolist())
    tokens = args.batch * (len(tok(rows[0]["prompt"])["input_ids"]) + args.new_tokens)
    row = {"who": f"TRL GKDTrainer (lmbda={lmbda:g})", "seconds_per_step": seconds, "wall_s": wall}
    row["student_tok_s"] = tokens / seconds
    return row, trainer.model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--top-k", type=int, default=16, help="the teacher log-probs stillroom keeps per token")
    ap.add_argument(
        "--teacher", default="", help="a trained teacher (e.g. the demo's sft/model); default: a random tiny Llama"
    )
    args = ap.parse_args()
    from stillroom.actors.models.students import from_teacher_layers
    from transformers import AutoModelForCausalLM

    root = Path("/tmp/stillroom-bench")
    from bench.generation import model_path

    if args.teacher:  # a trained teacher: its student starts far from it, so KL has room to fall
        teacher = args.teacher
        student = root / f"student-of-{hashlib.sha256(teacher.encode()).hexdigest()[:12]}"
    else:
        teacher = str(tiny_llama(root / "tiny-llama-smol-tokenizer", tokenizer=model_path("smollm2")))
        student = root / "tiny-student-smol-tokenizer"
    if not (student / "config.json").exists():
        from_teacher_layers(teacher, student, every=3)
    texts = prompts(args.steps * args.batch + 16)
    rows = [{"prompt": t} for t in texts[: args.steps * args.batch]]
    held = texts[-16:]
    before = held_out_kl(teacher, AutoModelForCausalLM.from_pretrained(student), held, args.new_tokens)
    results = []
    for mode in ("offline", "on_policy"):
        row, saved = stillroom(teacher, str(student), rows, args, mode)
        row["held_out_kl"] = held_out_kl(teacher, AutoModelForCausalLM.from_pretrained(saved), held, args.new_tokens)
        results.append(row)
        if mode == "offline":  # the same precomputed teacher data for TRL
            answers = teacher_answers(str(Path(saved).parents[1]))
            labelled = [r | {"answer": answers[r["prompt"]]} for r in rows]
    for lmbda in (0.0, 1.0):
        row, model = trl_gkd(teacher, str(student), labelled, args, lmbda)
        row["held_out_kl"] = held_out_kl(teacher, model, held, args.new_tokens)
        results.append(row)
    for row in results:
        row["kl_before"] = before
    columns = ["who", "seconds_per_step", "student_tok_s", "wall_s", "kl_before", "held_out_kl"]
    for row in results[:2]:
        trl_row = results[2 if "offline" in row["who"] else 3]
        row["speed_vs_trl"] = trl_row["seconds_per_step"] / row["seconds_per_step"]
    columns += ["speed_vs_trl"]
    report("distill-trained" if args.teacher else "distill-tiny", results, columns, {"settings": vars(args)})


if __name__ == "__main__":
    main()
