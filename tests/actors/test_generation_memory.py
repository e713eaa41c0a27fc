"""Generation memory that does not grow with the vocabulary (issue 28): a generator keeps per step
only the sampled token's log-prob and the top-k, never every step's (B, V) logits, and stores the
same numbers as the old way (all logits kept, stacked, log-softmaxed at the end)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from stillroom.actors.algo.losses import tempered
from stillroom.actors.roles.generator import Generator, GeneratorSpec, SamplingParams
from stillroom.actors.runtime.batches import make_batch

from tests.conftest import save_tiny_llama

ROWS, NEW_TOKENS, VOCAB, K = 32, 256, 32_000, 4

MEASURE = """
import json, resource, sys
from stillroom.actors.roles.generator import Generator, GeneratorSpec, SamplingParams
from stillroom.actors.runtime.batches import make_batch

model, rows, new_tokens, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
gen = Generator(GeneratorSpec(model, seed=0))
params = SamplingParams(n=2, max_new_tokens=new_tokens, temperature=0.7, topk_logprobs=k)
# Warm up at a small size: the allocator's and torch's one-time growth is not the generation's.
gen.generate(make_batch("w", {"prompt": ["ticket about billing"]}), SamplingParams(n=2, max_new_tokens=4))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
prompts = [f"ticket {i} about billing refund" for i in range(rows // 2)]
out = gen.generate(make_batch("b", {"prompt": prompts}), params)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tokens = sum(len(c) for c in out.column("completion_ids").to_pylist())
print(json.dumps({"grew_bytes": (after - before) * 1024, "rows": out.num_rows, "tokens": tokens}))
"""


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama whose vocabulary (32k) dwarfs everything else it holds, so V dominates memory."""
    return save_tiny_llama(tmp_path_factory.mktemp("wide"), tiny_tokenizer, vocab_size=VOCAB, hidden_size=32)


def test_peak_memory_grows_by_a_small_fraction_of_one_btv_tensor(wide_model):
    """32 rows x 256 new tokens at a 32k vocabulary: the old code kept every step's logits and made
    3-4 (B, T, V) float32 copies (~1 GB each here); the peak may now grow by under a quarter of one."""
    env = {**os.environ, "STILLROOM_THREADS": "2"}
    args = [str(wide_model), str(ROWS), str(NEW_TOKENS), str(K)]
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, *args], capture_output=True, text=True, env=env, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    one_btv = ROWS * NEW_TOKENS * VOCAB * 4
    assert figures["rows"] == ROWS and figures["tokens"] > ROWS * NEW_TOKENS // 2  # long answers, not early EOS
    assert figures["grew_bytes"] < 0.25 * one_btv, (
        f"peak RSS grew {figures['grew_bytes'] / 2**20:.0f} MiB, {figures['grew_bytes'] / one_btv:.2f} x one "
        f"(B, T, V) float32 tensor ({one_btv / 2**20:.0f} MiB)"
    )


def reference(gen: Generator, batch, params: SamplingParams):
    """The old way: every step's raw logits from generate(output_logits=True), stacked, float32,
    log-softmaxed at T (the sampled tokens') and at 1 (the top-k). Returns (new ids, logp, raw)."""
    prompt_ids = gen.encode_prompts(batch)
    enc = gen.tokenizer.pad({"input_ids": prompt_ids}, return_tensors="pt")
    ids, mask, cache = enc["input_ids"], enc["attention_mask"], gen.engine._shared_prefix(enc, params.n)
    if cache is not None:
        ids, mask = ids.repeat_interleave(params.n, 0), mask.repeat_interleave(params.n, 0)
    with torch.no_grad():
        out = gen.model.generate(
            input_ids=ids,
            attention_mask=mask,
            past_key_values=cache,
            do_sample=params.temperature > 0,
            temperature=params.temperature or None,
            top_p=params.top_p,
            top_k=params.top_k or None,
            max_new_tokens=params.max_new_tokens,
            num_return_sequences=1 if cache is not None else params.n,
            return_dict_in_generate=True,
            output_logits=True,
            pad_token_id=gen.tokenizer.pad_token_id,
            eos_token_id=gen.stop_ids,
        )
    logits = torch.stack(out.logits, dim=1).float()
    logp = torch.log_softmax(tempered(logits, params.temperature), dim=-1)
    return out.sequences[:, enc["input_ids"].shape[1] :], logp, torch.log_softmax(logits, -1)


@pytest.mark.parametrize(("temperature", "n", "top_p"), [(0.7, 2, 1.0), (1.0, 1, 0.9), (0.0, 1, 1.0), (1.3, 3, 1.0)])
def test_logprobs_and_topk_equal_the_old_way(tiny_model, temperature, n, top_p):
    """Same seed, same samples: each sampled token's log-prob (at T) within 1e-5 of the old code's,
    the top-k ids the same and their (float16) log-probs the old ones, at every temperature."""
    gen = Generator(GeneratorSpec(str(tiny_model), seed=7))
    batch = make_batch("b000", {"prompt": ["ticket about billing", "order shipping refund " * 3, "priority"]})
    params = SamplingParams(n=n, max_new_tokens=12, temperature=temperature, top_p=top_p, topk_logprobs=K)
    torch.manual_seed(11)
    out = gen.generate(batch, params)
    torch.manual_seed(11)
    new, logp, raw = reference(gen, batch, params)
    assert out.num_rows == new.shape[0] == 3 * n
    for row, sample in enumerate(out.to_pylist()):
        length = len(sample["completion_ids"])
        assert sample["completion_ids"] == new[row, :length].tolist()
        old = logp[row, torch.arange(length), new[row, :length]]
        np.testing.assert_allclose(sample["completion_logprobs"], old.numpy(), atol=1e-5)
        top = torch.topk(raw[row, :length], K, dim=-1)
        assert np.array(sample["topk_ids"]).reshape(length, K).tolist() == top.indices.tolist()
        stored = np.array(sample["topk_logprobs"], dtype=np.float32).reshape(length, K)
        np.testing.assert_allclose(stored, top.values.half().float().numpy(), atol=1e-5)
