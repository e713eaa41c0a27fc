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


def test_block_influence_against_hand_worked_numbers():
    """1 - the mean over tokens of cos(input, output): tokens (1,0)->(1,0) and (0,1)->(1,0) have
    cosines 1 and 0 (BI 0.5); (1,0)->(-1,0) and (0,1)->(1,1) have -1 and 1/sqrt(2)."""
    from stillroom.actors.models.students import block_influence

    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert block_influence(x, torch.tensor([[1.0, 0.0], [1.0, 0.0]])) == pytest.approx(0.5)
    assert block_influence(x, torch.tensor([[-1.0, 0.0], [1.0, 1.0]])) == pytest.approx(1 - (-1 + 2**-0.5) / 2)
    assert block_influence(x, 3 * x) == pytest.approx(0.0)  # a layer that only rescales: nothing to lose


def test_importance_layers_keep_the_most_influential_and_the_last():
    from stillroom.actors.models.students import importance_layers

    assert importance_layers([0.1, 0.5, 0.05, 0.3, 0.2, 0.01], 4) == [1, 3, 4, 5]
    assert importance_layers([0.2, 0.2, 0.1, 0.0], 3) == [0, 1, 3]  # a tie: the earlier layer
    assert importance_layers([0.3, 0.1, 0.2], 3) == [0, 1, 2]


def near_identity(teacher_dir, tmp_path, quiet: tuple[int, ...]):
    """The teacher with the layers `quiet` made near-identity (their attention and MLP outputs
    scaled by 1e-3: the residual passes almost untouched), the others loud (weights x 8, so each
    turns the hidden state); saved beside it."""
    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            scale = 1e-3 if i in quiet else 8.0
            layer.self_attn.o_proj.weight.mul_(scale)
            layer.mlp.down_proj.weight.mul_(scale)
    out = tmp_path / "shaped-teacher"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(out)
    return out


def held_out_kl(teacher_dir, student_dir, prompts: list[list[int]]) -> float:
    """KL(teacher || student) over the full vocabulary, per token of the held-out prompts."""
    t = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    s = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in prompts:
            lt = torch.log_softmax(t(torch.tensor([ids])).logits[0].double(), -1)
            ls = torch.log_softmax(s(torch.tensor([ids])).logits[0].double(), -1)
            total, count = total + float((lt.exp() * (lt - ls)).sum()), count + len(ids)
    return total / count


def test_layer_influence_measures_what_enters_and_leaves_each_layer(six_layer_teacher, tmp_path):
    """Measured by hooks, equal to the model's own hidden states (input of layer i = hidden state i,
    its output = hidden state i + 1, for every layer but the last, whose output HF normalises), and
    a near-identity layer scores near 0."""
    from stillroom.actors.models.students import block_influence, layer_influence

    shaped = near_identity(six_layer_teacher, tmp_path, quiet=(2,))
    model = AutoModelForCausalLM.from_pretrained(shaped).eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    bi = layer_influence(model, prompts)
    with torch.no_grad():
        hidden = [model(torch.tensor([p]), output_hidden_states=True).hidden_states for p in prompts]
    for i in range(5):
        a, b = (torch.cat([h[j][0] for h in hidden]) for j in (i, i + 1))
        assert bi[i] == pytest.approx(block_influence(a, b), abs=1e-6)
    assert bi[2] < 1e-3 < min(bi[:2] + bi[3:])


def test_importance_chosen_layers_start_closer_to_the_teacher_than_every_nth(six_layer_teacher, tmp_path):
    """A teacher whose layers 0, 2 and 4 barely change the hidden state: every 2nd layer keeps
    exactly those ([0, 2, 4, 5]) and drops the two that work; Block Influence measured on some
    prompts keeps 1, 3 and 5 (and one quiet layer), and starts at a far lower held-out KL."""
    shaped = near_identity(six_layer_teacher, tmp_path, quiet=(0, 2, 4))
    sample = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14], [20, 21, 22, 23, 24]]
    held = [[30, 31, 32, 33, 34, 35], [40, 41, 42], [7, 17, 27, 37, 47]]
    nth = from_teacher_layers(shaped, tmp_path / "nth", every=2)
    chosen = from_teacher_layers(shaped, tmp_path / "chosen", every=2, prompts=sample)
    assert nth == [0, 2, 4, 5] and chosen[1:] == [1, 3, 5] and len(chosen) == 4
    kl_nth, kl_chosen = held_out_kl(shaped, tmp_path / "nth", held), held_out_kl(shaped, tmp_path / "chosen", held)
    assert kl_chosen < 0.01 * kl_nth and kl_nth > 5e-3, (kl_chosen, kl_nth)  # measured: 3e-10 vs 0.014


def test_the_distill_stage_measures_importance_on_its_own_prompts_by_default(six_layer_teacher, tmp_path):
    """student_init with keep_every_nth_layer and no layer_choice: the layers by importance on the
    first 16 of the stage's prompts (a conversation read with its turns); every_nth: the old way."""
    from stillroom.actors.stages.distill import importance_prompts, student_dir
    from stillroom.v1 import job_pb2 as pb

    rows = [{"prompt": f"ticket {i} about billing"} for i in range(20)]
    rows[0] = {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}
    init = pb.StudentInit(keep_every_nth_layer=2)
    assert len(importance_prompts(str(six_layer_teacher), rows, init)) == 16
    init.importance_prompts = 4
    assert len(importance_prompts(str(six_layer_teacher), rows, init)) == 4
    assert importance_prompts(str(six_layer_teacher), rows, pb.StudentInit(layer_choice="every_nth")) == []
    logged = []
    shaped = near_identity(six_layer_teacher, tmp_path, quiet=(0, 2, 4))
    params = pb.DistillStage(student_init=pb.StudentInit(keep_every_nth_layer=2))
    student_dir(pb.JobSpec(), params, str(shaped), "", tmp_path / "out", rows, logged.append)
    assert logged[0].startswith("student: the teacher's layers [") and "by Block Influence on 16" in logged[0]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "student-init").config.num_hidden_layers == 4
