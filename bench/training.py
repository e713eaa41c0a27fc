"""Training: the Trainer role (DeepSpeed engine, loss on completion tokens only) against a plain torch
AdamW loop on the same model and batches, in train tokens/s and model FLOPs utilisation (MFU)
against the machine's matrix-multiply peak, measured in the same run.

    .venv/bin/python -m bench.training [--model smollm2|tiny] [--batch 8] [--prompt 100] [--completion 24]

Model FLOPs per step = 6 x (non-embedding parameters) x tokens + 6 x (vocab x hidden) x tokens
whose logits are computed (every token for the plain loop, the completion for the Trainer, which
skips the vocabulary projection over the prompt: the MFU column counts the work each really did,
the "useful" column counts only what a loss over the completion needs).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from bench.common import matmul_peak, median, report, timed
from bench.generation import model_path


def batch(vocab: int, rows: int, prompt: int, completion: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    length = prompt + completion
    ids = rng.integers(3, vocab, size=(rows, length))
    mask = np.zeros((rows, length - 1), dtype=np.int64)
    mask[:, prompt - 1 :] = 1
    return {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "loss_mask": mask,
        "weights": np.ones(rows, dtype=np.float32),
    }


def flops(model, tokens: int, logit_tokens: int) -> float:
    head = model.get_output_embeddings().weight.numel()
    body = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    if not model.config.tie_word_embeddings:
        body -= head
    return 6.0 * body * tokens + 6.0 * head * logit_tokens


def plain_step(model, optim, t: dict[str, torch.Tensor]) -> None:
    logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, t["input_ids"][:, 1:, None]).squeeze(-1)
    loss = -(logp * t["loss_mask"]).sum() / t["loss_mask"].sum()
    loss.backward()
    optim.step()
    optim.zero_grad(set_to_none=True)


def run(name: str, rows: int, prompt: int, completion: int, steps: int) -> tuple[list[dict], float]:
    from stillroom.actors.roles.trainer import Trainer, TrainerSpec
    from transformers import AutoModelForCausalLM

    path = model_path(name)
    peak = matmul_peak("float32")
    trainer = Trainer(TrainerSpec(path, adapter="none", learning_rate=1e-5, master_port=29611))
    vocab = trainer.engine.module.config.vocab_size
    arrays = batch(vocab, rows, prompt, completion)
    tokens, logit_tokens = rows * (prompt + completion), rows * (completion + 1)
    trainer.train_step(arrays)  # warm-up
    ours = median([timed(lambda: trainer.train_step(arrays)) for _ in range(steps)])

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-5)
    t = {k: torch.tensor(v) for k, v in arrays.items()}
    plain_step(model, optim, t)
    plain = median([timed(lambda: plain_step(model, optim, t)) for _ in range(steps)])

    useful = flops(model, tokens, logit_tokens)
    out = []
    for who, seconds, work in (
        ("stillroom Trainer", ours, useful),
        ("plain torch loop", plain, flops(model, tokens, tokens)),
    ):
        out.append(
            {
                "model": name,
                "who": who,
                "tokens_per_step": tokens,
                "seconds_per_step": seconds,
                "train_tok_s": tokens / seconds,
                "mfu": work / seconds / peak,
                "useful_mfu": useful / seconds / peak,
            }
        )
    out[0]["speedup_vs_plain"] = plain / ours
    return out, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=100)
    ap.add_argument("--completion", type=int, default=24)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    rows, peak = run(args.model, args.batch, args.prompt, args.completion, args.steps)
    columns = ["model", "who", "tokens_per_step", "seconds_per_step", "train_tok_s", "mfu", "useful_mfu"]
    columns.append("speedup_vs_plain")
    report(f"training-{args.model}", rows, columns, {"matmul_peak_flops": peak, "dtype": "float32"})
    print(f"matrix-multiply peak (float32): {peak / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
