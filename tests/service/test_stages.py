"""Fine-tune stages as jobs through the service, on real Ray with a tiny model: they learn."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from stillroom.services.recipes import parse
from stillroom.v1 import job_pb2 as pb

from tests.conftest import write_jsonl
from tests.service.helpers import journal_bytes_per_token, metric_series, wait_for

pytestmark = pytest.mark.slow


def sft_spec(tiny_model, **sft) -> pb.JobSpec:
    return parse(
        {
            "teacher": {"path": str(tiny_model)},
            "data": {"train": {"path": "sft_train.jsonl"}, "eval": {"path": "sft_eval.jsonl"}},
            "stages": [{"sft": sft}],
            "resources": {"trainer": {"replicas": 1, "num_cpus": 1}},
            "seed": 3,
        }
    )


def test_sft_job_lowers_eval_loss(start_server, sft_data, tiny_model):
    c = start_server(sft_data, "--model-root", str(tiny_model)).client()
    spec = sft_spec(
        tiny_model,
        adapter="ADAPTER_TYPE_NONE",
        eval_every=6,
        optim={"learning_rate": 0.003, "batch_size": 16, "epochs": 4},
    )
    job = c.submit(spec).job
    done = c.wait(job.id)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error.reason
    losses = metric_series(c, job.id, "eval/loss")
    assert len(losses) == 5 and losses[-1] < 0.5 * losses[0], losses  # before training, then every 6 steps
    stage = done.stages[0]
    assert stage.progress.done == stage.progress.total == 24 and stage.progress.unit == "steps"
    assert "sft/model/model.safetensors" in {a.name for a in c.artifacts(job.id)}


def test_sft_lora_job_exports_adapter_and_merged_model(start_server, sft_data, tiny_model):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    c = start_server(sft_data, "--model-root", str(tiny_model)).client()
    spec = sft_spec(tiny_model, lora={"r": 4}, merge=True, optim={"learning_rate": 0.01, "max_steps": 4})
    job = c.submit(spec).job
    done = c.wait(job.id)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error.reason
    losses = metric_series(c, job.id, "train/loss")
    assert losses[-1] < losses[0]
    arts = {a.name: Path(urlparse(a.uri).path) for a in c.artifacts(job.id)}
    assert {
        "sft/adapter/adapter_config.json",
        "sft/adapter/adapter_model.safetensors",
        "sft/merged/model.safetensors",
    } <= set(arts)
    adapter = AutoPeftModelForCausalLM.from_pretrained(arts["sft/adapter/adapter_config.json"].parent).eval()
    merged = AutoModelForCausalLM.from_pretrained(arts["sft/merged/model.safetensors"].parent).eval()
    import torch

    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(adapter(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4)


def test_sft_qlora_job_trains_a_4bit_base(start_server, sft_data, tiny_model):
    pytest.importorskip("bitsandbytes")
    c = start_server(sft_data, "--model-root", str(tiny_model)).client()
    job = c.submit(
        sft_spec(tiny_model, adapter="ADAPTER_TYPE_QLORA", optim={"learning_rate": 0.01, "max_steps": 5})
    ).job
    done = c.wait(job.id)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error.reason
    losses = metric_series(c, job.id, "train/loss")
    assert losses[-1] < losses[0]
    assert "sft/adapter/adapter_model.safetensors" in {a.name for a in c.artifacts(job.id)}


def test_sft_refuses_bad_input_at_submit(start_server, sft_data, tiny_model):
    import grpc

    server = start_server(sft_data, "--model-root", str(tiny_model))
    c = server.client()
    write_jsonl(sft_data / "prompts_only.jsonl", [{"prompt": "x"}])
    spec = parse(
        {
            "teacher": {"path": str(tiny_model)},
            "data": {"train": {"path": "prompts_only.jsonl"}},
            "stages": [
                {"sft": {"lora": {"target_modules": ["q_proj", "qkv_proj"]}}},
                {"sft": {"adapter": "ADAPTER_TYPE_QLORA", "optim": {"zero_stage": 2}}},
            ],
        }
    )
    with pytest.raises(grpc.RpcError) as e:
        c.validate(spec)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = e.value.details()
    assert "stages[0].sft.lora.target_modules[1]: the teacher has no module 'qkv_proj'" in details
    assert "data.train.path: sft needs answers" in details
    assert "stages[1].sft.optim.zero_stage: qlora trains with ZeRO stage 0" in details


def test_grpo_job_raises_the_reward(start_server, sft_data, tiny_model):
    """sft (briefly) then grpo with an exact-match reward: the mean reward climbs well above where
    grpo started. The dataset's completion column reaches reward functions as `reference`."""
    c = start_server(sft_data, "--model-root", str(tiny_model)).client()
    spec = parse(
        {
            "teacher": {"path": str(tiny_model)},
            "data": {"train": {"path": "sft_train.jsonl"}},
            "stages": [
                {
                    "sft": {
                        "adapter": "ADAPTER_TYPE_NONE",
                        "optim": {"learning_rate": 0.003, "batch_size": 16, "epochs": 3, "max_steps": 16},
                    }
                },
                {
                    "grpo": {
                        "adapter": "ADAPTER_TYPE_NONE",
                        "group_size": 8,
                        "prompts_per_step": 4,
                        "max_new_tokens": 3,
                        "loss_type": "dapo",
                        "optim": {"learning_rate": 0.004, "max_steps": 16},
                        "rewards": [{"name": "exact_match", "args": {"column": "reference"}}],
                    }
                },
            ],
            "resources": {"generator": {"num_cpus": 0.5}, "scorer": {"num_cpus": 0.25}, "trainer": {"num_cpus": 0.5}},
            "seed": 1,
        }
    )
    job = c.submit(spec).job
    done = c.wait(job.id)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error.reason
    rewards = metric_series(c, job.id, "reward")
    assert len(rewards) == 16
    start, end = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert end > start + 0.25, rewards
    grpo = done.stages[1]
    for name in (
        "reward",
        "reward_std",
        "rewards/exact_match/mean",
        "frac_reward_zero_std",
        "completions/mean_length",
        "completions/clipped_ratio",
        "entropy",
        "clip_ratio/region_mean",
        "policy/staleness",
        "sync/seconds",
    ):
        assert name in grpo.metrics, name
    assert grpo.progress.done == grpo.progress.total == 16


def _unsafe_grpo(tiny_model, **grpo) -> pb.JobSpec:
    rewards = [{"name": "exact_match", "args": {"column": "reference"}}] + [
        {"name": f"tests.unsafe_rewards:{fn}", "timeout_s": 2} for fn in ("hangs", "segfaults", "exits")
    ]
    return parse(
        {
            "teacher": {"path": str(tiny_model)},
            "data": {"train": {"path": "sft_train.jsonl"}},
            "stages": [
                {
                    "grpo": {
                        "adapter": "ADAPTER_TYPE_NONE",
                        "group_size": 4,
                        "prompts_per_step": 2,
                        "max_new_tokens": 3,
                        "optim": {"max_steps": 2},
                        "rewards": rewards,
                        **grpo,
                    }
                }
            ],
            "resources": {"generator": {"num_cpus": 0.5}, "scorer": {"num_cpus": 0.25}, "trainer": {"num_cpus": 0.5}},
        }
    )


def test_grpo_survives_rewards_that_hang_segfault_and_exit(start_server, sft_data, tiny_model, monkeypatch):
    """User rewards run in killable worker processes: a hung call is killed at its timeout, a
    segfault or os._exit costs only that call's scores; the stage finishes on the reward that
    works, and the events count every failure. Past max_reward_failure_fraction it fails, saying so."""
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[2]))  # where tests.unsafe_rewards is
    c = start_server(sft_data, "--model-root", str(tiny_model), "--reward-module", "tests").client()
    done = c.wait(c.submit(_unsafe_grpo(tiny_model, max_reward_failure_fraction=1.0)).job.id)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error.reason
    for metric in ("rewards/hangs/timeouts", "rewards/segfaults/crashed", "rewards/exits/crashed"):
        assert metric_series(c, done.id, metric) == [8.0, 8.0], metric  # every sample of both steps
    assert metric_series(c, done.id, "rewards/failed_fraction") == [1.0, 1.0]
    assert len(metric_series(c, done.id, "rewards/exact_match/mean")) == 2  # scored all along
    failed = c.wait(c.submit(_unsafe_grpo(tiny_model)).job.id)  # the default bound: 0.5
    assert failed.state == pb.JOB_STATE_FAILED
    assert "reward functions failed (error, timeout or crash) on 8 of 8 samples" in failed.error.reason


def test_lora_sft_then_async_grpo_with_kl(start_server, sft_data, tiny_model):
    """The LoRA path: grpo continues the sft adapter, the reference is the base with the adapter
    disabled (beta > 0 gives a KL metric), and generation runs one policy version ahead."""
    c = start_server(sft_data, "--model-root", str(tiny_model)).client()
    spec = parse(
        {
            "teacher": {"path": str(tiny_model)},
            "data": {"train": {"path": "sft_train.jsonl"}},
            "stages": [
                {"sft": {"lora": {"r": 4}, "optim": {"learning_rate": 0.01, "max_steps": 3}}},
                {
                    "grpo": {
                        "lora": {"r": 4},
                        "group_size": 4,
                        "prompts_per_step": 2,
                        "max_new_tokens": 3,
                        "beta": 0.04,
                        "max_staleness": 1,
                        "loss_type": "grpo",
                        "num_iterations": 2,
                        "optim": {"max_steps": 4},
                        "rewards": [{"name": "exact_match", "args": {"column": "reference"}}],
                    }
                },
            ],
            "resources": {"generator": {"num_cpus": 0.5}, "scorer": {"num_cpus": 0.25}, "trainer": {"num_cpus": 0.5}},
        }
    )
    job = c.submit(spec).job
    done = c.wait(job.id)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error.reason
    kls = metric_series(c, job.id, "kl")
    assert len(kls) == 4 and all(k >= 0 for k in kls) and kls[-1] > 0  # the policy moved from the reference
    assert max(metric_series(c, job.id, "policy/staleness")) <= 1
    assert done.stages[1].progress.done == 8  # 4 batches x num_iterations 2
    assert "grpo/adapter/adapter_model.safetensors" in {a.name for a in c.artifacts(job.id)}


def distill_spec(tiny_model, sft_first: bool = False, **distill) -> pb.JobSpec:
    sft = {"sft": {"adapter": "ADAPTER_TYPE_NONE", "optim": {"learning_rate": 0.003, "batch_size": 16, "epochs": 3}}}
    init = {"config_overrides": {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64}}
    distill = {
        "num_samples": 4,
        "top_k": 8,
        "max_new_tokens": 6,
        "prompts_per_step": 8,
        "student_init": init,
        "optim": {"learning_rate": 0.005},
        **distill,
    }
    return parse(
        {
            "teacher": {"path": str(tiny_model)},
            "data": {
                "train": {"path": "sft_train.jsonl"},
                "unlabeled": {"path": "sft_train.jsonl"},
                "eval": {"path": "sft_eval.jsonl"},
            },
            "stages": [sft] * sft_first + [{"distill": distill}],
            "resources": {"generator": {"num_cpus": 0.5}, "scorer": {"num_cpus": 0.25}, "trainer": {"num_cpus": 0.5}},
            "seed": 2,
        }
    )


def test_distill_lowers_held_out_kl_and_a_second_job_reuses_the_teacher(start_server, sft_data, tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    artifacts = tmp_path / "home" / "artifacts"
    c = start_server(sft_data, "--model-root", str(tiny_model)).client()
    # the teacher is tuned first (sft), so it has sharp opinions for the student to learn
    first = c.wait(c.submit(distill_spec(tiny_model, sft_first=True, alpha=0.0)).job.id)
    assert first.state == pb.JOB_STATE_SUCCEEDED, first.error.reason
    before, after = metric_series(c, first.id, "eval/kl_before"), metric_series(c, first.id, "eval/kl_after")
    assert before[0] > 0.1 and after[0] < 0.7 * before[0], (before, after)
    assert metric_series(c, first.id, "teacher/generated_batches") == [12.0]
    measured = journal_bytes_per_token(artifacts / first.id / "distill" / "journal")
    assert metric_series(c, first.id, "journal/bytes_per_token") == [pytest.approx(measured)]
    assert 0 < metric_series(c, first.id, "distill/kept_fraction")[0] <= 0.25  # majority vote: one of 4 per prompt
    arts = {a.name: Path(urlparse(a.uri).path) for a in c.artifacts(first.id)}
    student = AutoModelForCausalLM.from_pretrained(arts["distill/student/model.safetensors"].parent)
    assert student.config.num_hidden_layers == 1

    # another student from the same tuned teacher (named as job://, the tenant's own earlier job)
    # and prompts: the teacher's output is reused
    second = c.submit(distill_spec(f"job://{first.id}/sft/model", alpha=0.0, reuse_journal_of=first.id)).job
    done = c.wait(second.id)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error.reason
    assert metric_series(c, second.id, "teacher/generated_batches") == [0.0]  # it paid for no teacher generation
    # (it trains until its held-out KL plateaus: every pass replays the journal, the first included)
    assert metric_series(c, second.id, "teacher/replayed_batches") == metric_series(c, second.id, "distill/steps")


def test_distill_refusals(start_server, sft_data, tiny_model, tmp_path):
    import grpc
    from transformers import PreTrainedTokenizerFast

    c = start_server(sft_data, "--model-root", str(tiny_model), "--model-root", str(tmp_path)).client()
    with pytest.raises(grpc.RpcError) as e:
        c.validate(distill_spec(tiny_model, reuse_journal_of="job-nothere"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    queued = c.submit(distill_spec(tiny_model)).job
    c.cancel(queued.id)
    with pytest.raises(grpc.RpcError) as e:
        c.validate(distill_spec(tiny_model, reuse_journal_of=queued.id))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # a student with another tokenizer: logit KD is refused, sequence-level KD (alpha 1) is not
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    other = Tokenizer(models.WordLevel(unk_token="<unk>"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    other.train_from_iterator(["a different vocabulary entirely"], trainers.WordLevelTrainer(special_tokens=["<unk>"]))
    PreTrainedTokenizerFast(tokenizer_object=other, unk_token="<unk>").save_pretrained(tmp_path / "other")
    spec = distill_spec(tiny_model)
    spec.student.path = str(tmp_path / "other")
    with pytest.raises(grpc.RpcError) as e:
        c.validate(spec)
    assert "stages[0].distill.alpha: logit KD needs a student that shares the teacher's tokenizer" in e.value.details()
    spec.stages[0].distill.alpha = 1.0
    c.validate(spec)
    # and it runs: the kept teacher answers are tokenized again for the student, which learns them
    from tests.conftest import save_tiny_llama

    save_tiny_llama(
        tmp_path / "other",
        vocab_size=16,
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    spec.stages[0].distill.optim.max_steps = 3
    done = c.wait(c.submit(spec).job.id)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error.reason
    assert len(metric_series(c, done.id, "loss/ce")) == 3


def test_distill_with_two_zero3_trainer_ranks(start_server, sft_data, tiny_model):
    """ZeRO-3 partitions the student over two ranks: the held-out KL, the weights and the saved
    student are collectives every rank joins (asking rank 0 alone would hang), and the exported
    student reloads with every parameter whole."""
    import torch
    from transformers import AutoModelForCausalLM

    server = start_server(sft_data, "--model-root", str(tiny_model))
    c = server.client()
    optim = {"learning_rate": 0.005, "zero_stage": 3, "max_steps": 3}
    spec = distill_spec(tiny_model, alpha=0.0, optim=optim, num_samples=1, sampling_temperature=0.0)  # greedy
    spec.resources.trainer.replicas = 2
    spec.resources.trainer.num_cpus = 0.25
    spec.stages.add(name="export").export.dtype = "float32"
    done = c.wait(c.submit(spec).job.id)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error.reason
    before, after = metric_series(c, done.id, "eval/kl_before"), metric_series(c, done.id, "eval/kl_after")
    assert before[0] > 0 and after[0] < before[0], (before, after)
    assert len(metric_series(c, done.id, "loss")) == 3
    assert metric_series(c, done.id, "export/model/greedy_match") == [1.0]
    # the teacher answered greedily, once per prompt: every token it wrote was its top-1
    files = sorted(Path(server.home, "artifacts", done.id, "distill", "journal").glob("*.parquet"))
    journal = pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()
    assert len(journal) == 3 * 8 and metric_series(c, done.id, "distill/kept_fraction") == [1.0] * 3
    for row in journal:
        assert row["completion_logprobs"] == pytest.approx(row["topk_logprobs"][::8], rel=2e-3, abs=1e-3)
    arts = {a.name: Path(urlparse(a.uri).path) for a in c.artifacts(done.id)}
    saved = arts["distill/student/model.safetensors"].parent
    student = AutoModelForCausalLM.from_pretrained(saved)
    assert all(p.numel() > 0 for p in student.parameters())  # gathered, not a rank's empty partition
    init = AutoModelForCausalLM.from_pretrained(saved.parent / "student-init")
    assert any(not torch.equal(a, b) for a, b in zip(student.parameters(), init.parameters(), strict=True))  # trained


def test_on_policy_distillation_lowers_held_out_kl(start_server, sft_data, tiny_model):
    """GKD with lambda 0.5: half the steps on the student's own samples graded by the teacher
    (reverse KL), half on filtered teacher samples."""
    c = start_server(sft_data, "--model-root", str(tiny_model)).client()
    optim = {"learning_rate": 0.005, "epochs": 1}  # a fixed number of steps: one pass
    spec = distill_spec(
        tiny_model, sft_first=True, mode="on_policy", optim=optim, **{"lambda": 0.5, "kd_loss": "reverse_kl"}
    )
    spec.resources.student.num_cpus = 0.25
    spec.stages.add(name="export").export.dtype = "float32"
    done = c.wait(c.submit(spec).job.id)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error.reason
    before, after = metric_series(c, done.id, "eval/kl_before"), metric_series(c, done.id, "eval/kl_after")
    assert after[0] < 0.8 * before[0], (before, after)
    kinds = metric_series(c, done.id, "distill/on_policy")
    assert len(kinds) == 12 and 0 < sum(kinds) < 12  # both kinds of step happened
    assert done.stages[1].progress.done == 12
    # where each step's time went: sampling and grading, training, the weight sync
    phases = [metric_series(c, done.id, f"time/{p}_s") for p in ("sample", "train", "sync")]
    assert all(len(s) == 12 and min(s) > 0 for s in phases), phases
    # the exported student decodes greedily exactly like the student the stage trained
    assert metric_series(c, done.id, "export/greedy_match") == [1.0]
    names = {a.name for a in c.artifacts(done.id)}
    assert {
        "export/model/model.safetensors",
        "export/model/generation_config.json",
        "export/model/tokenizer.json",
        "export/model/config.json",
    } <= names


def test_export_of_a_lora_policy_as_adapter_and_merged(start_server, sft_data, tiny_model):
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    c = start_server(sft_data, "--model-root", str(tiny_model)).client()
    spec = sft_spec(tiny_model, lora={"r": 4}, optim={"learning_rate": 0.01, "max_steps": 3})
    spec.stages.add(name="export").export.merge_adapter = True
    done = c.wait(c.submit(spec).job.id)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error.reason
    # both artifacts were reloaded from disk (the adapter onto a fresh base) and decode like the policy
    assert metric_series(c, done.id, "export/adapter/greedy_match") == [1.0]
    assert metric_series(c, done.id, "export/merged/greedy_match") == [1.0]
    arts = {a.name: a for a in c.artifacts(done.id)}
    adapter_dir = Path(urlparse(arts["export/adapter/adapter_config.json"].uri).path).parent
    merged_dir = Path(urlparse(arts["export/merged/model.safetensors"].uri).path).parent
    import hashlib
    import json

    data = (adapter_dir / "adapter_model.safetensors").read_bytes()
    assert hashlib.sha256(data).hexdigest() == arts["export/adapter/adapter_model.safetensors"].sha256
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["base_model_name_or_path"]
    ids = torch.tensor([[5, 6, 7, 8]])
    adapter = AutoPeftModelForCausalLM.from_pretrained(adapter_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        assert torch.equal(
            adapter.generate(ids, max_new_tokens=5, do_sample=False),
            merged.generate(ids, max_new_tokens=5, do_sample=False),
        )


def test_evaluate_scores_every_rung_of_the_ladder_and_gates_fail_the_job(start_server, sft_data, tiny_model):
    """index -> sft -> distill (with a baseline) -> evaluate, with retrieval: every rung (alone,
    +rag, the base +fewshot), each priced with the seconds its stages took; the teacher's journal
    records the passages behind every sample; a gate that does not hold fails the job."""
    import json

    from tests.service.conftest import KINDS, task_rows

    corpus = [{"id": kind, "text": f"{kind} tickets are {answer}"} for kind, answer in KINDS.items()]
    write_jsonl(sft_data / "handbook.jsonl", corpus)
    write_jsonl(sft_data / "test.jsonl", [r | {"doc": r["prompt"].split()[3]} for r in task_rows(12, offset=2000)])
    server = start_server(sft_data, "--model-root", str(tiny_model))
    c = server.client()
    spec = distill_spec(tiny_model, sft_first=True, alpha=0.5, **{"optim": {"learning_rate": 0.005, "max_steps": 4}})
    spec.stages[-1].distill.baseline = True
    spec.stages[-1].distill.student_without_passages = True  # it serves without a retriever
    spec.data.test.path, spec.data.corpus.path = "test.jsonl", "handbook.jsonl"
    # freshness: the handbook after an update swaps two answers; test_updated is labelled by it
    swapped = {"billing": "priority", "shipping": "refund", "account": "order"}
    new_corpus = [{"id": k, "text": f"{k} tickets are {a}"} for k, a in swapped.items()]
    write_jsonl(sft_data / "handbook_new.jsonl", new_corpus)
    updated = [r | {"completion": swapped[r["prompt"].split()[3]]} for r in task_rows(9, offset=3000)]
    write_jsonl(sft_data / "test_new.jsonl", updated)
    spec.data.test_corpus.path, spec.data.test_updated.path = "handbook_new.jsonl", "test_new.jsonl"
    spec.retrieval.top_k, spec.retrieval.gold_column = 2, "doc"
    spec.stages.insert(0, pb.Stage(name="index", index=pb.IndexStage()))
    evaluate = spec.stages.add(name="evaluate").evaluate
    evaluate.max_new_tokens, evaluate.few_shot = 4, 2
    evaluate.metrics.add(name="exact_match").args["column"] = "reference"
    evaluate.target.metric, evaluate.target.min = "exact_match", 0.5
    # the teacher learned with passages in its prompts: it is judged with them
    evaluate.gates.add(model="teacher_sft+rag", baseline="base_teacher+rag", metric="exact_match", min_margin=0.2)
    evaluate.gates.add(model="student", baseline="teacher_sft", metric="size_bytes")  # smaller is not "beats"
    job = c.submit(spec).job
    # the report is refreshed after each stage: while distill runs, it shows index and sft
    wait_for(lambda: c.get(job.id).stages[2].state != pb.STAGE_STATE_PENDING, 300)
    so_far = Path(server.home, "artifacts", job.id, "report", "report.md").read_text()
    assert "| sft | SUCCEEDED |" in so_far and "| distill |" not in so_far
    done = c.wait(job.id)
    assert done.state == pb.JOB_STATE_FAILED and done.error.stage == "evaluate"
    assert done.error.reason.startswith("student size_bytes ") and "does not beat it" in done.error.reason
    arts = {a.name: Path(urlparse(a.uri).path) for a in c.artifacts(done.id)}
    report = json.loads(arts["evaluate/report.json"].read_text())
    models = ["base_teacher", "teacher_sft", "student", "student_baseline"]
    assert set(report) == {*models, *(f"{m}+rag" for m in models), "base_teacher+fewshot"}
    assert report["teacher_sft+rag"]["exact_match"] > report["base_teacher+rag"]["exact_match"] + 0.2
    assert report["student"]["size_bytes"] < report["teacher_sft"]["size_bytes"]
    assert report["student"]["parameters"] == report["student_baseline"]["parameters"]
    assert all(r["tokens_per_s"] > 0 for r in report.values())
    # every rung scored again on the update split (the +rag ones retrieving from the new handbook)
    assert all("exact_match@update" in r and "tokens_per_s@update" not in r for r in report.values())
    # the price of a rung: the wall seconds of the stages that made it, as the job measured them
    took = {st.name: st.end_time.ToNanoseconds() / 1e9 - st.start_time.ToNanoseconds() / 1e9 for st in done.stages}
    assert report["base_teacher"]["build_s"] == 0.0
    assert report["base_teacher+rag"]["build_s"] == pytest.approx(took["index"], abs=0.5)
    assert report["teacher_sft"]["build_s"] == pytest.approx(took["sft"], abs=0.5)
    assert report["student+rag"]["build_s"] == pytest.approx(took["index"] + took["sft"] + took["distill"], abs=1.5)
    # provenance: every sample the teacher wrote names its passages and the index they came from
    index = json.loads(arts["index/info.json"].read_text())
    files = sorted(Path(server.home, "artifacts", done.id, "distill", "journal").glob("*.parquet"))
    journal = pa.concat_tables([pq.read_table(f) for f in files])
    assert set(journal.column("index").to_pylist()) == {index["key"]} and index["documents"] == 3
    assert all(1 <= len(ids) <= 2 for ids in journal.column("passage_ids").to_pylist())  # top_k, of those that match
    # the test split names its gold passage (the distill stage measures it too, on its held-out rows)
    assert metric_series(c, done.id, "retrieval/recall@2", stage="evaluate") == [1.0]
    text = arts["evaluate/report.md"].read_text()
    assert (
        "| teacher_sft+rag |" in text
        and "PASS: teacher_sft+rag exact_match" in text
        and "FAIL: student size_bytes" in text
        and "(and 9 labelled by the updated corpus: the @update columns)" in text
    )
    assert "recommended: " in text or "no rung reaches exact_match >= 0.5" in text
    assert "report/report.md" in arts and "report/plots/sft.png" in arts  # a failed job has its report too
