"""Distillation's teacher output as the KD loss reads it (issue 26): the top-k it stores are the
teacher's temperature-1 log-probs, whatever temperature it sampled at."""

from __future__ import annotations

import numpy as np
import torch
from stillroom.actors.roles.generator import Generator, GeneratorSpec, SamplingParams
from stillroom.actors.runtime.batches import make_batch
from stillroom.v1 import job_pb2 as pb
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


def test_held_out_rows_are_made_as_the_training_prompts_chat_turns_and_passages(ray_client, tmp_path):
    """The held-out KL's rows come from the split as the training prompts do (prompt_rows): a chat
    split with no `prompt` column (a KeyError before), each last user turn with its retrieved
    passages, as the student trained with them (before: the raw rows, no passages)."""
    import json
    import threading

    from stillroom.actors.runtime.context import EventLog, StageContext
    from stillroom.actors.stages.distill import held_out_rows
    from stillroom.actors.stages.index import prompt_rows

    from tests.conftest import write_jsonl

    kinds = {"billing": "refund", "shipping": "priority", "account": "order"}
    write_jsonl(tmp_path / "handbook.jsonl", [{"id": k, "text": f"{k} tickets are {a}"} for k, a in kinds.items()])
    chats = [
        {"messages": [{"role": "user", "content": f"ticket {i} about {k}"}, {"role": "assistant", "content": a}]}
        for i, (k, a) in enumerate(list(kinds.items()) * 3)
    ]
    write_jsonl(tmp_path / "test.jsonl", chats)
    spec = pb.JobSpec(data=pb.DataSpec(test=pb.DatasetRef(path=str(tmp_path / "test.jsonl"))))
    spec.data.corpus.path = str(tmp_path / "handbook.jsonl")
    spec.retrieval.top_k = 1
    ctx = StageContext("job-heldout", "distill", tmp_path / "job-heldout", EventLog(), threading.Event())
    try:
        rows = held_out_rows(ctx, spec, 4)
        assert rows == prompt_rows(ctx, spec, spec.data.test)[:4]
    finally:
        ctx.close()
    assert [r["passage_ids"] for r in rows] == [["billing"], ["shipping"], ["account"], ["billing"]]
    for row, chat in zip(rows, chats, strict=False):
        turns = json.loads(row["messages"])
        assert [t["role"] for t in turns] == ["user"] and turns[0]["content"] == row["prompt"]
        question, answer = (t["content"] for t in chat["messages"])
        assert f"{row['passage_ids'][0]} tickets are" in row["prompt"] and question in row["prompt"]
        assert row["query"] == question and row["reference"] == answer


def test_offline_and_on_policy_distillation_do_not_import_each_other():
    """What both use lives in stages/distill_samples.py; on_policy.py no longer imports distill.py."""
    import ast
    from pathlib import Path

    stages = Path(__file__).resolve().parents[2] / "actors" / "stages"

    def imported(name: str) -> set[str]:
        tree = ast.parse((stages / f"{name}.py").read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}

    assert "stillroom.actors.stages.distill" not in imported("on_policy")
    assert "stillroom.actors.stages.on_policy" not in imported("distill_samples")
    assert "stillroom.actors.stages.distill_samples" in imported("on_policy") & imported("distill")
