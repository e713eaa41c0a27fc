"""Student initialisation: a layer subset of the teacher, or a smaller config with its tokenizer."""

from __future__ import annotations

import pytest
import torch
from stillroom.actors.models.students import from_config, from_teacher_layers, kept_layers
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import save_tiny_llama


def test_kept_layers():
    assert kept_layers(30, 3) == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 29]
    assert kept_layers(6, 2) == [0, 2, 4, 5]
    assert kept_layers(4, 1) == [0, 1, 2, 3]


@pytest.fixture
def six_layer_teacher(tmp_path, tiny_tokenizer):
    return save_tiny_llama(tmp_path / "teacher", tiny_tokenizer, num_hidden_layers=6)


def test_student_from_teacher_layers_reloads_and_generates(six_layer_teacher, tmp_path):
    keep = from_teacher_layers(six_layer_teacher, tmp_path / "student", every=2)
    assert keep == [0, 2, 4, 5]
    teacher = AutoModelForCausalLM.from_pretrained(six_layer_teacher)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert student.config.num_hidden_layers == 4
    for new, old in enumerate(keep):
        for (name, a), (_, b) in zip(
            student.model.layers[new].named_parameters(), teacher.model.layers[old].named_parameters(), strict=True
        ):
            assert torch.equal(a, b), name
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    out = student.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)  # the KV cache works with the renumbered layers


def test_student_from_config_shares_the_tokenizer(six_layer_teacher, tmp_path):
    from_config(six_layer_teacher, tmp_path / "small", num_hidden_layers=2, hidden_size=16, intermediate_size=32)
    small = AutoModelForCausalLM.from_pretrained(tmp_path / "small")
    assert small.config.num_hidden_layers == 2 and small.config.vocab_size == len(
        AutoTokenizer.from_pretrained(tmp_path / "small")
    )
    with pytest.raises(ValueError, match="no field 'nonsense'"):
        from_config(six_layer_teacher, tmp_path / "bad", nonsense=1)
