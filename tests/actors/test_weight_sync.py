"""Weight sync trainer -> generators (issue 28): rank 0 alone ships the trainable weights (the
adapter under LoRA) in the generators' dtype, ZeRO-3 gathers those alone, the supervisor only
forwards an object reference, and a synced generator computes what the trainer computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stillroom.actors.roles.generator import Generator, GeneratorSpec, SamplingParams
from stillroom.actors.roles.trainer import Trainer, TrainerSpec
from stillroom.actors.runtime.batches import make_batch

from tests.conftest import save_tiny_llama

IDS = np.array([[5, 6, 7, 8, 9, 10, 11, 12]])
LORA = {"lora_r": 4, "target_modules": ("q_proj", "v_proj")}


def _arrays(n=4, t=10, vocab=50, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(n, t))
    mask = np.ones((n, t - 1), dtype=np.float32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": mask, "weights": np.ones(n, np.float32)}


def _greedy(logits_of, ids: np.ndarray, steps: int) -> list[int]:
    """Greedy continuation of one row, one forward per token, from a logits function."""
    out = ids[0].tolist()
    for _ in range(steps):
        out.append(int(np.argmax(logits_of(np.array([out]))[0, -1])))
    return out[ids.shape[1] :]


def _trained(model, port: int, **fields) -> Trainer:
    trainer = Trainer(TrainerSpec(str(model), learning_rate=1e-2, master_port=port, **fields))
    for _ in range(2):
        trainer.train_step(_arrays())
    return trainer


def test_lora_sync_ships_the_adapter_alone_and_the_generator_then_answers_as_the_trainer(tiny_model):
    trainer = _trained(tiny_model, 29041, **LORA)
    gen = Generator(GeneratorSpec(str(tiny_model), **LORA))
    assert gen.weights_dtype() == "float32"
    shipped, info = trainer.ship_weights(gen.weights_dtype())
    adapter = {n: p for n, p in trainer.engine.module.named_parameters() if p.requires_grad}
    assert adapter and all(".lora_" in n for n in adapter)
    assert set(shipped) == {n.replace(".default", "") for n in adapter}  # peft's names, the adapter alone
    assert info["bytes"] == sum(p.numel() * 4 for p in adapter.values())  # float32, as the generator runs
    model_bytes = sum(p.numel() * 4 for p in trainer.engine.module.parameters())
    assert info["bytes"] < 0.05 * model_bytes and info["gathered"] == 0
    assert not np.allclose(gen.logits(IDS), trainer.logits(IDS), atol=1e-4)
    gen.load_weights(shipped, version=2)
    np.testing.assert_allclose(gen.logits(IDS), trainer.logits(IDS), atol=1e-5)
    prompt = make_batch("b", {"prompt": ["ticket about billing"]})
    out = gen.generate(prompt, SamplingParams(max_new_tokens=6, temperature=0.0)).to_pylist()[0]
    prompt_ids = np.array([out["prompt_ids"]])
    assert out["completion_ids"] == _greedy(trainer.logits, prompt_ids, len(out["completion_ids"]))


def test_full_sync_ships_bfloat16_to_a_bfloat16_generator(tiny_model):
    """A bfloat16 generator gets every parameter in bfloat16 (half the bytes of float32), bit for
    bit what it would make of the trainer's float32 weights itself."""
    trainer = _trained(tiny_model, 29042, adapter="none")
    gen = Generator(GeneratorSpec(str(tiny_model), dtype="bfloat16"))
    assert gen.weights_dtype() == "bfloat16"
    shipped, info = trainer.ship_weights("bfloat16")
    params = dict(trainer.engine.module.named_parameters())
    assert set(shipped) == set(params) and info["bytes"] == sum(p.numel() * 2 for p in params.values())
    gen.load_weights(shipped, version=2)
    reference = Generator(GeneratorSpec(str(tiny_model), dtype="bfloat16"))
    reference.load_weights(trainer.weights(), version=2)  # float32, cast by the generator
    for (name, a), b in zip(gen.model.named_parameters(), reference.model.parameters(), strict=True):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b), name
    np.testing.assert_array_equal(gen.logits(IDS), reference.logits(IDS))


# -- on a Ray cluster: two ZeRO-3 ranks, the supervisor's side ------------------------------------


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory, tiny_tokenizer):
    """Projections past ZeRO-3's persistence threshold (1e5 elements): partitioned away between
    forwards, so a gather of the base model would show."""
    return save_tiny_llama(
        tmp_path_factory.mktemp("wide-llama"),
        tiny_tokenizer,
        hidden_size=320,
        intermediate_size=640,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )


def _holds_arrays(value) -> bool:
    if isinstance(value, np.ndarray | torch.Tensor):
        return True
    if isinstance(value, dict):
        return any(_holds_arrays(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_holds_arrays(v) for v in value)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["lora", "none"])
def test_two_zero3_ranks_sync_only_what_is_trained_through_one_reference(
    ray_client, wide_model, adapter, monkeypatch, tmp_path
):
    from stillroom.actors.runtime import trainers as group_calls
    from stillroom.actors.runtime.cluster import Placement, RoleGroup
    from stillroom.actors.runtime.journal import Journal
    from stillroom.actors.runtime.loop import TrainLoop
    from stillroom.actors.runtime.loop_config import LoopConfig

    lora = LORA if adapter == "lora" else {"lora_r": 0}
    job = f"job-sync-{adapter}"
    group = RoleGroup(job, {"generator": Placement(1, 0.25), "trainer": Placement(2, 0.25)})
    try:
        gens = group.start("generator", GeneratorSpec(str(wide_model), **lora))
        spec = TrainerSpec(str(wide_model), adapter=adapter, zero_stage=3, learning_rate=1e-2, **LORA)
        trainers = group.start("trainer", spec)
        ray_client.get([t.train_step.remote(_arrays(n=2)) for t in trainers])
        # every rank joins the gather; rank 1 ships nothing, rank 0 the trainable weights alone
        (w0, i0), (w1, i1) = ray_client.get([t.ship_weights.remote("float32") for t in trainers])
        assert w1 == {} and i1["bytes"] == 0
        base = _partitioned_numel(wide_model)
        if adapter == "lora":
            assert all(".lora_" in n for n in w0)
            assert i0["gathered"] < 0.01 * base and i1["gathered"] < 0.01 * base  # never the base model
        else:
            assert i0["gathered"] == i1["gathered"] >= base > 0  # the instrument sees a whole gather
        assert i0["bytes"] == sum(a.nbytes for a in w0.values())
        # the supervisor's side: one reference forwarded, never the arrays themselves
        got, real_get = [], ray_client.get
        monkeypatch.setattr(ray_client, "get", lambda refs, *a, **k: got.append(real_get(refs, *a, **k)) or got[-1])
        ref, info = group_calls.shipped(trainers, "float32")
        assert isinstance(ref, ray_client.ObjectRef) and info["bytes"] == i0["bytes"]
        metrics = group_calls.sync(trainers, gens, version=1)
        assert metrics["sync/bytes"] == i0["bytes"] and metrics["sync/seconds"] > 0
        assert got and not any(_holds_arrays(value) for value in got), "the supervisor fetched the weights"
        monkeypatch.undo()
        gen_logits = ray_client.get(gens[0].logits.remote(IDS))
        trained = ray_client.get([t.logits.remote(IDS) for t in trainers])[0]  # a ZeRO-3 forward: every rank
        np.testing.assert_allclose(gen_logits, trained, atol=1e-5)
        # the train loop emits each sync's bytes and seconds as job metrics
        seen: list[dict] = []
        loop = TrainLoop(group, spec, Journal(tmp_path / "journal"), LoopConfig(prepare=None), on_metrics=seen.append)
        loop.start_trainers()
        loop._sync_weights()
        assert seen[-1]["sync/bytes"] == i0["bytes"] and seen[-1]["sync/seconds"] == loop.result.syncs[-1] > 0
    finally:
        group.close()


def _partitioned_numel(model_dir) -> int:
    """Elements of the model's parameters above ZeRO-3's persistence threshold (kept partitioned)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return sum(p.numel() for p in model.parameters() if p.numel() > 100_000)
