"""GRPO's old log-probs when generator and trainer compute in different precisions (issue 28): a
float32 sampler beside a bfloat16 (mixed precision) trainer gives old log-probs that differ from
the trainer's by precision noise, so with max_staleness 0 the first pass's ratio is not 1 and
clipping acts on that noise. The trainer's own log-probs before the step are then the old ones, as
TRL computes them when it generates without vLLM."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest
from stillroom.actors.algo.objectives import GrpoObjective
from stillroom.actors.roles.generator import GeneratorSpec
from stillroom.actors.roles.scorer import RewardSpec, ScorerSpec
from stillroom.actors.roles.trainer import Trainer, TrainerSpec
from stillroom.actors.runtime.cluster import Placement, RoleGroup
from stillroom.actors.runtime.journal import Journal
from stillroom.actors.runtime.loop import TrainLoop
from stillroom.actors.stages.grpo import GrpoConfig, prompt_batches
from stillroom.v1 import job_pb2 as pb

from tests.actors.test_pipeline import run_within
from tests.actors.test_rft_defects import grpo_arrays

# a clip range far inside bfloat16's noise (the tiny model's logits are ~0.02): only a ratio of
# exactly 1 stays unclipped
TIGHT = 1e-6


def test_trainer_old_logprobs_make_the_first_ratio_exactly_one(tiny_model):
    """The same rows, the old log-probs from a float32 forward (what a float32 generator gives):
    a bfloat16 trainer clips most tokens at a tight range; with trainer_old_logprobs (the proximal
    log-probs as the old ones, as runtime/trainers.train_step passes them) it clips none."""
    arrays = grpo_arrays(4, seed=1)
    lora = {"lora_r": 4, "target_modules": ("q_proj", "v_proj"), "master_port": 29034}
    fp32 = Trainer(TrainerSpec(str(tiny_model), dtype="float32", **lora))
    arrays["old_logprobs"] = fp32.logprobs(arrays)
    clipped = {}
    for own in (False, True):
        bf16 = Trainer(TrainerSpec(str(tiny_model), dtype="bfloat16", **lora))
        assert bf16.precision() == "bfloat16" and fp32.precision() == "float32"
        objective = GrpoObjective("grpo", epsilon=TIGHT, trainer_old_logprobs=own)
        assert objective.needs_proximal is own
        rows = {**arrays, "proximal_logprobs": bf16.logprobs(arrays)} if own else arrays
        clipped[own] = bf16.train_step(rows, objective)["clip_ratio/region_mean"]
    assert clipped[False] > 0.3 and clipped[True] == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_the_loop_takes_old_logprobs_from_the_trainer_only_when_precisions_differ(
    ray_client, tiny_model, tmp_path, dtype
):
    """A GRPO loop with a float32 policy generator (its default): beside a bfloat16 trainer the
    job says policy/trainer_old_logprobs 1 and no token of any first pass is clipped even at a
    tight range; beside a float32 trainer the generator's log-probs stay the old ones (0)."""
    params = pb.GrpoStage(group_size=2, prompts_per_step=2, max_new_tokens=4, max_staleness=0, epsilon=TIGHT)
    params.optim.max_steps = 2
    cfg = GrpoConfig.of(params)
    rows = [{"prompt": f"ticket {i} billing"} for i in range(4)]
    group = RoleGroup(
        f"job-precision-{dtype}",
        {"generator": Placement(1, 0.5), "scorer": Placement(1, 0.25), "trainer": Placement(1, 0.5)},
    )
    lora = {"lora_r": 4, "target_modules": ("q_proj", "v_proj")}
    group.start("generator", GeneratorSpec(str(tiny_model), **lora))
    group.start("scorer", ScorerSpec((RewardSpec("length_penalty", args=(("max_chars", "4"),)),)))
    spec = TrainerSpec(str(tiny_model), dtype=dtype, checkpoint_dir=str(tmp_path / "ckpt"), **lora)
    metrics, stop = [], threading.Event()
    loop = TrainLoop(
        group,
        spec,
        Journal(tmp_path / "journal"),
        replace(cfg.loop(rows, seed=0), poll_s=0.05),
        metrics.append,
        stop.is_set,
    )
    try:
        run_within(loop, prompt_batches(rows, cfg, seed=0), timeout=240, stop=stop)
    finally:
        group.close()
    own = [m["policy/trainer_old_logprobs"] for m in metrics if "policy/trainer_old_logprobs" in m]
    assert own == [1.0 if dtype == "bfloat16" else 0.0]
    steps = [m for m in metrics if "clip_ratio/region_mean" in m]
    assert len(steps) == 2
    if dtype == "bfloat16":
        assert [m["clip_ratio/region_mean"] for m in steps] == [0.0, 0.0]
    else:
        assert np.isfinite([m["clip_ratio/region_mean"] for m in steps]).all()
