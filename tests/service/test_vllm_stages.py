"""A job whose generator runs on the vllm engine (resources.generator.engine: vllm), through the
service on real Ray: GRPO on a LoRA policy (every sync an adapter merged into vLLM's weights), then
offline distillation from that tuned teacher (its adapter merged when the engine starts; top-k from
vLLM). Skipped where vLLM is not installed."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from stillroom.services.recipes import parse  # noqa: E402
from stillroom.v1 import job_pb2 as pb  # noqa: E402

from tests.actors.test_vllm_engine import tiny_llama  # noqa: E402
from tests.service.helpers import metric_series  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_grpo_then_distill_with_the_teacher_on_vllm(start_server, sft_data, tiny_tokenizer, tmp_path, ray_client):
    from ray.util.state import list_actors

    model = tiny_llama(tmp_path / "teacher", tiny_tokenizer)
    c = start_server(sft_data, "--model-root", str(model)).client()
    init = {"config_overrides": {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64}}
    reward = [{"name": "exact_match", "args": {"column": "reference"}}]
    spec = parse(
        {
            "teacher": {"path": str(model)},
            "data": {
                "train": {"path": "sft_train.jsonl"},
                "unlabeled": {"path": "sft_train.jsonl"},
                "eval": {"path": "sft_eval.jsonl"},
            },
            "stages": [
                {
                    "grpo": {
                        "lora": {"r": 4},
                        "group_size": 4,
                        "prompts_per_step": 2,
                        "max_new_tokens": 3,
                        "loss_type": "grpo",
                        "optim": {"learning_rate": 0.01, "max_steps": 4},
                        "rewards": reward,
                    }
                },
                {
                    "distill": {
                        "num_samples": 2,
                        "top_k": 8,
                        "max_new_tokens": 4,
                        "prompts_per_step": 8,
                        "student_init": init,
                        "optim": {"learning_rate": 0.005, "max_steps": 4},
                    }
                },
            ],
            "resources": {
                "generator": {"num_cpus": 0.5, "engine": "vllm"},
                "scorer": {"num_cpus": 0.25},
                "trainer": {"num_cpus": 0.5},
            },
            "seed": 1,
        }
    )
    job = c.submit(spec).job
    done = c.wait(job.id)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error.reason
    assert len(metric_series(c, job.id, "reward")) == 4
    assert metric_series(c, job.id, "sync/seconds")  # adapter syncs into the vllm engine
    assert metric_series(c, job.id, "teacher/generated_batches")[0] > 0
    generators = list_actors(filters=[("name", "=", f"{job.id}:generator:0")], detail=True, limit=100)
    assert generators and all(", vllm, " in a.repr_name for a in generators), [a.repr_name for a in generators]
