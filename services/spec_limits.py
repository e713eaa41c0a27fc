"""Upper bounds of a spec's numbers, checked at submit: the tenant's ceilings (services/limits.py:
steps, new tokens, rollouts per step, the job's deadline), and a fixed bound on every other count
that sizes a loop, a batch or an allocation, so that no spec asks for work without end.

Ceilings compare the values a stage will actually use: 0 means "the stage's default", and the
defaults below are the stages' own (actors/stages/*.py). A spec without timeout_s is given the
tenant's default_timeout_s, so every job has a deadline. Pure: reads only the spec.
"""

from __future__ import annotations

import math

from stillroom.actors.common.distill_sampling import teacher_sampling
from stillroom.services.limits import TenantLimits
from stillroom.services.violations import Violations
from stillroom.v1 import job_pb2 as pb

# The stages' defaults for a field left at 0 (actors/stages/grpo.py GrpoConfig.of,
# distill.py DistillConfig.of, evaluate.py): a ceiling applies to what will run.
GRPO_DEFAULTS = {"group_size": 4, "prompts_per_step": 4, "max_steps": 20}
DISTILL_PROMPTS_PER_STEP = 8  # num_samples: teacher_sampling (one greedy answer unless asked for more)
MAX_NEW_TOKENS_DEFAULT = 64  # grpo, distill and evaluate alike

# Bounds of counts no tenant limit covers. Each is far above what a real job sets (generous on
# purpose: a bound only stops a typo or a hostile spec from asking for unbounded work).
BOUNDS: dict[str, dict[str, int]] = {
    "optim": {
        "epochs": 1_000,  # passes over the data
        "batch_size": 4_096,  # rows per micro-step, held in memory at once
        "gradient_accumulation_steps": 1_024,  # micro-steps per optimizer step
    },
    "lora": {"r": 2_048},  # adapter rank: beyond this a full fine-tune is cheaper
    "sft": {"max_length": 131_072},  # tokens per example: the longest contexts models have
    "grpo": {
        "num_iterations": 100,  # optimizer passes over each batch of rollouts
        "max_staleness": 100,  # policy versions generation may run ahead (queue depth)
        "max_resample": 100,  # draws of prompts_per_step prompts to fill one step
    },
    "distill": {
        "top_k": 1_024,  # teacher log-probs kept per token (journal size grows with it)
        "eval_prompts": 100_000,  # held-out prompts for the KL before and after
        "max_resample": 100,  # as in grpo
        "max_ahead": 1_000,  # teacher batches generated ahead of training (queue depth)
    },
    "student_init": {"keep_every_nth_layer": 1_000},  # more layers than any model has
    "evaluate": {"limit": 1_000_000},  # held-out rows scored per rung
}
# Left unbounded on purpose: checkpoint_every, eval_every (a large value only means "rarely"),
# audit min_rows / max_tokens (thresholds compared with counts, no work grows with them).
MAX_REWARD_TIMEOUT_S = 3_600.0  # one call of a reward function: a hung one holds a scorer worker that long


def check_limits(spec: pb.JobSpec, limits: TenantLimits, v: Violations) -> None:
    """Every ceiling and bound of `spec`; a spec without timeout_s is given the default deadline."""
    _check_timeout(spec, limits, v)
    for i, stage in enumerate(spec.stages):
        kind = stage.WhichOneof("kind")
        if kind is None:
            continue
        s, p = getattr(stage, kind), f"stages[{i}].{kind}"
        _bounds(s, kind, p, v)
        for name in ("optim", "lora", "student_init"):
            if name in s.DESCRIPTOR.fields_by_name:
                _bounds(getattr(s, name), name, f"{p}.{name}", v)
        if "optim" in s.DESCRIPTOR.fields_by_name:
            _check_steps(s.optim, kind, f"{p}.optim", limits, v)
        if "max_new_tokens" in s.DESCRIPTOR.fields_by_name:
            tokens = limits.max_new_tokens
            _over(s.max_new_tokens, tokens, "max_new_tokens", f"{p}.max_new_tokens", v, MAX_NEW_TOKENS_DEFAULT)
        for field in ("rewards", "metrics"):
            for j, r in enumerate(getattr(s, field, ())):
                path = f"{p}.{field}[{j}].timeout_s"
                v.check(_within(r.timeout_s, MAX_REWARD_TIMEOUT_S), path, f"must be <= {MAX_REWARD_TIMEOUT_S:g}")
        if kind == "grpo":
            _check_rollouts(s, "group_size", GRPO_DEFAULTS, p, limits, v)
        elif kind == "distill":
            defaults = {"num_samples": teacher_sampling(s)[0], "prompts_per_step": DISTILL_PROMPTS_PER_STEP}
            _check_rollouts(s, "num_samples", defaults, p, limits, v)
            _over(s.samples_per_step, limits.max_rollouts_per_step, "max_rollouts_per_step", f"{p}.samples_per_step", v)
            _over(s.until.max_steps, limits.max_steps, "max_steps", f"{p}.until.max_steps", v)


def _within(value: float, most: float) -> bool:
    """A NaN or infinity counts as within: Violations.number refuses it ("must be a finite
    number"), once."""
    return not (math.isfinite(value) and value > most)


def _over(value: float, limit: float, name: str, path: str, v: Violations, default: float = 0) -> None:
    """`value` (`default` where 0: what the stage will use) within the tenant's limit `name`."""
    used = value or default
    shown = _num(used) if value else f"the default {_num(used)}"
    v.check(_within(used, limit), path, f"{shown} is over this server's limit of {_num(limit)} ({name})")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _bounds(msg, kind: str, p: str, v: Violations) -> None:
    for name, most in BOUNDS.get(kind, {}).items():
        v.check(_within(getattr(msg, name), most), f"{p}.{name}", f"must be <= {most} (this server's bound)")


def _check_timeout(spec: pb.JobSpec, limits: TenantLimits, v: Violations) -> None:
    """A deadline within max_timeout_s; none set: the default deadline (never past the ceiling)."""
    if spec.timeout_s == 0:
        spec.timeout_s = min(limits.default_timeout_s, limits.max_timeout_s)
    else:
        _over(spec.timeout_s, limits.max_timeout_s, "max_timeout_s", "timeout_s", v)


def _check_steps(optim: pb.OptimConfig, kind: str, p: str, limits: TenantLimits, v: Violations) -> None:
    """max_steps (grpo's default included) and warmup_steps within the tenant's max_steps."""
    default = GRPO_DEFAULTS["max_steps"] if kind == "grpo" else 0  # sft, distill: epochs over the data
    _over(optim.max_steps, limits.max_steps, "max_steps", f"{p}.max_steps", v, default)
    _over(optim.warmup_steps, limits.max_steps, "max_steps", f"{p}.warmup_steps", v)


def _check_rollouts(s, per_prompt: str, defaults: dict, p: str, limits: TenantLimits, v: Violations) -> None:
    """Completions generated per step: `per_prompt` (group_size, num_samples) x prompts_per_step,
    each at its stage default where 0. Named on the field the spec set (prompts_per_step if both)."""
    n, prompts = getattr(s, per_prompt) or defaults[per_prompt], s.prompts_per_step or defaults["prompts_per_step"]
    field = "prompts_per_step" if s.prompts_per_step or not getattr(s, per_prompt) else per_prompt
    v.check(
        n * prompts <= limits.max_rollouts_per_step,
        f"{p}.{field}",
        f"{per_prompt} {n} x prompts_per_step {prompts} = {n * prompts} completions per step is over this "
        f"server's limit of {limits.max_rollouts_per_step} (max_rollouts_per_step)",
    )
