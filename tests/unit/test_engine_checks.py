"""resources.<role>.engine at submit: names, roles, QLoRA, and vLLM not installed on the server."""

from __future__ import annotations

import pytest
from stillroom.services import engine_checks
from stillroom.services.errors import FailedPrecondition, InvalidArgument
from stillroom.services.recipes import parse
from stillroom.services.validation import Policy, validate

from tests.unit.test_validation import llama_teacher


def grpo_doc(root, resources: dict, adapter: str = "ADAPTER_TYPE_LORA") -> dict:
    return {
        "teacher": {"path": llama_teacher(root)},
        "data": {"train": {"path": "train.jsonl"}},
        "stages": [{"grpo": {"rewards": [{"name": "json_valid"}], "adapter": adapter}}],
        "resources": resources,
    }


def test_vllm_not_installed_is_a_failed_precondition_that_says_how_to_install(data_root, monkeypatch):
    monkeypatch.setattr(engine_checks, "vllm_available", lambda: False)
    with pytest.raises(FailedPrecondition) as e:
        validate(parse(grpo_doc(data_root, {"generator": {"engine": "vllm"}})), Policy((data_root,)))
    assert e.value.code == "FAILED_PRECONDITION"
    assert str(e.value).startswith("resources.generator.engine: vllm is not installed on the server")
    assert "pip install 'stillroom[vllm]'" in str(e.value)
    validate(parse(grpo_doc(data_root, {})), Policy((data_root,)))  # hf, the default, needs nothing


def test_vllm_installed_is_accepted_for_generator_and_student(data_root, monkeypatch):
    monkeypatch.setattr(engine_checks, "vllm_available", lambda: True)
    resources = {"generator": {"engine": "vllm"}, "student": {"engine": "hf"}}
    spec, _ = validate(parse(grpo_doc(data_root, resources)), Policy((data_root,)))
    assert spec.resources.generator.engine == "vllm"


def test_engine_field_violations(data_root, monkeypatch):
    monkeypatch.setattr(engine_checks, "vllm_available", lambda: True)
    engines = {"generator": {"engine": "vllm"}, "trainer": {"engine": "vllm"}}
    doc = grpo_doc(data_root, engines, adapter="ADAPTER_TYPE_QLORA")
    doc["resources"]["student"] = {"engine": "tgi"}
    with pytest.raises(InvalidArgument) as e:
        validate(parse(doc), Policy((data_root,)))
    v = dict(e.value.violations)
    assert v["resources.student.engine"] == "'tgi' is not one of hf, vllm"
    assert v["resources.trainer.engine"] == "only generator and student generate"
    assert "qlora policy (stages[0].grpo.adapter)" in v["resources.generator.engine"]
