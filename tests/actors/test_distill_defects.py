"""Distillation's teacher output as the KD loss reads it (issue 26): the top-k it stores are the
teacher's temperature-1 log-probs, whatever temperature it sampled at."""

from __future__ import annotations

import numpy as np
import torch
from stillroom.actors.roles.generator import Generator, GeneratorSpec, SamplingParams
from stillroom.actors.runtime.batches import make_batch
from transformers import AutoModelForCausalLM

K = 4


def test_topk_is_stored_at_temperature_one_and_the_sampled_token_at_t(tiny_model):
    """At T = 0.7 the stored top-k are a teacher-forced forward's raw log_softmax top-k (topk_buckets
    tempers them once, itself), while each sampled token's log-prob is the T-tempered one (what a
    GRPO ratio compares against). Before the fix the top-k were stored at T, then tempered again."""
    gen = Generator(GeneratorSpec(str(tiny_model), seed=5))
    prompts = make_batch("b000", {"prompt": ["ticket about billing", "order shipping refund " * 4]})
    out = gen.generate(prompts, SamplingParams(n=2, max_new_tokens=6, temperature=0.7, topk_logprobs=K))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), torch_dtype=torch.float32).eval()
    for row in out.to_pylist():
        start, length = len(row["prompt_ids"]), len(row["completion_ids"])
        with torch.no_grad():
            logits = model(torch.tensor([row["prompt_ids"] + row["completion_ids"]])).logits[0].double()
        at = logits[start - 1 : start - 1 + length]  # the positions that predict the completion
        raw = torch.topk(torch.log_softmax(at, -1), K, dim=-1)
        assert np.array(row["topk_ids"]).reshape(length, K).tolist() == raw.indices.tolist()
        stored = np.array(row["topk_logprobs"], dtype=np.float64).reshape(length, K)
        # stored as float16: equal to the raw log-probs rounded to float16, to within 1e-5 of their ulp
        np.testing.assert_allclose(stored, raw.values.numpy(), rtol=2**-11, atol=1e-5)
        tempered = torch.log_softmax(at / 0.7, -1).gather(-1, torch.tensor(row["completion_ids"])[:, None])[:, 0]
        np.testing.assert_allclose(row["completion_logprobs"], tempered.numpy(), atol=1e-5)
