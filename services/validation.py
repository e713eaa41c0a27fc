"""Validate a JobSpec on the server, before anything is queued. Errors carry field paths, e.g.
`stages[1].grpo.group_size: must be >= 2`, and every violation is reported at once.

validate() returns the spec normalised (absolute data and model paths, stage names filled in);
ValidateJob and SubmitJob both call it, so they cannot disagree.
"""

from __future__ import annotations

import importlib.util
import re

from stillroom.actors.common.distill_sampling import teacher_sampling
from stillroom.actors.common.rewards import BUILTIN_NAMES, imported_problem, module_allowed
from stillroom.actors.common.stages import AVAILABLE
from stillroom.services.capacity import check_capacity
from stillroom.services.data_checks import (
    check_dataset,
    check_retrieval,
    check_reward_columns,
    check_target_modules,
    check_tokenizers,
    check_tracking,
    model_path,
)
from stillroom.services.distill_checks import check_distill
from stillroom.services.engine_checks import check_engines, require_installed_engines
from stillroom.services.errors import InvalidArgument, PermissionDenied
from stillroom.services.ladder_checks import check_evaluate_stages
from stillroom.services.prompt_checks import PROMPT_SPLITS, check_prompt_splits
from stillroom.services.spec_limits import check_limits
from stillroom.services.teacher_checks import check_distill_against_teacher
from stillroom.services.violations import Policy, Violations
from stillroom.v1 import job_pb2 as pb

MAX_STAGES = 32
LABEL_KEY = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?$")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
NEEDS_TEACHER = {"sft", "grpo", "distill", "evaluate", "export"}
NEEDS_TRAIN = {"audit", "sft", "grpo"}
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
SCALE_REWARDS = ("group", "batch", "none")
IS_LEVELS = ("token", "sequence")
LR_SCHEDULERS = ("constant", "linear", "cosine")
IS_MODES = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
DISTILL_MODES = ("offline", "on_policy")
DISTILL_FILTERS = ("best_of_n", "min_reward", "majority_vote", "valid_only")
KD_LOSSES = ("forward_kl", "reverse_kl", "jsd")
DTYPES = ("float32", "bfloat16", "float16")


def validate(spec: pb.JobSpec, policy: Policy) -> tuple[pb.JobSpec, list[str]]:
    """Check `spec`; return (normalised copy, warnings). Raises InvalidArgument, PermissionDenied, and
    FailedPrecondition for a valid spec that this server cannot run (an engine not installed)."""
    out = pb.JobSpec()
    out.CopyFrom(spec)
    v, warnings = Violations(policy), []
    v.check(len(spec.display_name) <= 200, "display_name", "must be at most 200 characters")
    v.check(len(spec.stages) > 0, "stages", "a job needs at least one stage")
    v.check(len(spec.stages) <= MAX_STAGES, "stages", f"at most {MAX_STAGES} stages")
    v.check(0 <= spec.max_retries <= 20, "max_retries", "must be between 0 and 20")
    v.number(spec.timeout_s, "timeout_s", lo=0, lo_open=True)
    _check_enums(spec, "", v)
    kinds = _check_stages(out, v)
    _check_resources(spec.resources, v)
    check_engines(out, v)
    check_capacity(out, policy.capacity, v)
    check_limits(out, policy.limits, v)
    _check_required(out, kinds, v)
    _check_adapter_chain(out, v)
    _check_files(out, kinds, policy, v)
    check_tokenizers(out, v)
    check_target_modules(out, v)
    check_distill_against_teacher(out, v)
    if v.items:
        raise InvalidArgument(v.items)
    require_installed_engines(out)
    return out, warnings


def _check_required(out: pb.JobSpec, kinds: set[str], v: Violations) -> None:
    """The fields the job's stages need: a teacher, held-out data, a student, train data; gates
    that name models the job makes."""
    if kinds & NEEDS_TEACHER:
        v.check(
            bool(out.teacher.path),
            "teacher.path",
            f"required by the {', '.join(sorted(kinds & NEEDS_TEACHER))} stage(s)",
        )
    if "evaluate" in kinds:
        v.check(
            bool(out.data.test.path or out.data.eval.path),
            "data.test.path",
            "required by the evaluate stage (or data.eval): held-out data",
        )
    for i, stage in enumerate(out.stages):
        if stage.WhichOneof("kind") == "distill":
            init = stage.distill.student_init
            v.check(
                bool(out.student.path or init.keep_every_nth_layer or init.config_overrides),
                "student.path",
                f"required by stages[{i}].distill, unless its student_init makes the student from the teacher",
            )
    _check_baselines(out, v)
    check_evaluate_stages(out, v)
    needs = check_prompt_splits(out, NEEDS_TRAIN, v)
    if needs:
        v.check(bool(out.data.train.path), "data.train.path", f"required by the {', '.join(sorted(needs))} stage(s)")


def _check_files(out: pb.JobSpec, kinds: set[str], policy: Policy, v: Violations) -> None:
    """Model and data paths (normalised in `out`), data files row by row, answers where sft needs them."""
    for name in ("teacher", "student"):
        ref = getattr(out, name)
        if ref.path:
            ref.path = model_path(ref.path, f"{name}.path", policy, v)
        if ref.tokenizer_path:
            ref.tokenizer_path = model_path(ref.tokenizer_path, f"{name}.tokenizer_path", policy, v)
    loaded = {}
    for split in ("train", "eval", "unlabeled", "test", "test_updated"):
        ref = getattr(out.data, split)
        if ref.path and ref.format in pb.DatasetFormat.values():
            loaded[split] = check_dataset(ref, f"data.{split}", policy, v)
    if "sft" in kinds:
        for split in ("train", "eval"):
            v.check(
                getattr(loaded.get(split), "shape", None) != "prompt_only",
                f"data.{split}.path",
                "sft needs answers: a completion column or chat messages ending with the assistant's turn",
            )
    check_reward_columns(out, loaded, v)
    check_retrieval(out, kinds, policy, v)
    check_tracking(out.tracking, policy, v)


def validate_request(request_id: str, labels: dict[str, str]) -> None:
    v = Violations()
    v.check(not request_id or bool(REQUEST_ID.match(request_id)), "request_id", "must match [A-Za-z0-9._-]{1,128}")
    v.check(len(labels) <= 64, "labels", "at most 64 labels")
    for k, val in labels.items():
        v.check(
            bool(LABEL_KEY.match(k)), f"labels[{k!r}]", "key must be 1-63 of [A-Za-z0-9._/-], alphanumeric at both ends"
        )
        v.check(len(val) <= 63, f"labels[{k!r}]", "value must be at most 63 characters")
    if v.items:
        raise InvalidArgument(v.items)


def _check_enums(msg, path: str, v: Violations) -> None:
    """Proto3 enums are open: a client can send a number no enum value has. Refuse those, anywhere."""
    for fd, value in msg.ListFields():
        name = f"{path}.{fd.name}" if path else fd.name
        if fd.message_type is not None and not fd.message_type.GetOptions().map_entry:
            items = value if fd.is_repeated else [value]
            for i, item in enumerate(items):
                _check_enums(item, f"{name}[{i}]" if fd.is_repeated else name, v)
        elif fd.enum_type is not None:
            for item in value if fd.is_repeated else [value]:
                known = ", ".join(e.name for e in fd.enum_type.values)
                v.check(item in fd.enum_type.values_by_number, name, f"{item} is not a {fd.enum_type.name} ({known})")


def _check_stages(spec: pb.JobSpec, v: Violations) -> set[str]:
    kinds, names = set(), set()
    for i, stage in enumerate(spec.stages):
        kind = stage.WhichOneof("kind")
        path = f"stages[{i}]"
        if kind is None:
            v.check(
                False,
                path,
                "set exactly one stage kind: " + ", ".join(f.name for f in stage.DESCRIPTOR.oneofs[0].fields),
            )
            continue
        kinds.add(kind)
        if not stage.name:
            stage.name = kind if kind not in names else f"{kind}-{i}"
        v.check(
            bool(re.match(r"^[a-z0-9][a-z0-9_-]{0,62}$", stage.name)),
            f"{path}.name",
            "must match [a-z0-9][a-z0-9_-]{0,62}",
        )
        v.check(stage.name not in names, f"{path}.name", f"{stage.name!r} is used by an earlier stage")
        names.add(stage.name)
        CHECKS[kind](getattr(stage, kind), f"{path}.{kind}", v)
        v.check(
            kind in AVAILABLE,
            f"{path}.{kind}",
            f"stage kind {kind!r} is not available in this server yet (available: {', '.join(AVAILABLE)})",
        )
    return kinds


def _audit(s: pb.AuditStage, p: str, v: Violations) -> None:
    v.number(s.min_rows, f"{p}.min_rows", lo=0)
    for name in ("max_empty_fraction", "max_duplicate_fraction", "max_near_duplicate_fraction", "max_leakage_fraction"):
        v.number(getattr(s, name), f"{p}.{name}", lo=0, hi=1)
    v.number(s.near_duplicate_threshold, f"{p}.near_duplicate_threshold", lo=0, hi=1, lo_open=True)
    v.number(s.max_tokens, f"{p}.max_tokens", lo=1)


def _lora(s: pb.LoraConfig, p: str, v: Violations) -> None:
    v.number(s.r, f"{p}.r", lo=1)
    v.number(s.alpha, f"{p}.alpha", lo=0, lo_open=True)
    v.check(0 <= s.dropout < 1, f"{p}.dropout", "must be in [0, 1)")


def _optim(s: pb.OptimConfig, p: str, v: Violations, unused: dict[str, str] | None = None) -> None:
    """`unused`: the settings this stage does not read, and what it reads instead (refused when set)."""
    for name, instead in (unused or {}).items():
        v.check(not getattr(s, name), f"{p}.{name}", f"this stage does not use it: {instead}")
    v.number(s.learning_rate, f"{p}.learning_rate", lo=0, hi=1, lo_open=True)
    for name in ("batch_size", "gradient_accumulation_steps", "max_steps", "epochs", "checkpoint_every"):
        v.number(getattr(s, name), f"{p}.{name}", lo=1)
    v.number(s.weight_decay, f"{p}.weight_decay", lo=0)
    v.number(s.warmup_steps, f"{p}.warmup_steps", lo=0)
    v.choice(s.lr_scheduler_type, f"{p}.lr_scheduler_type", LR_SCHEDULERS)
    v.choice(s.dtype, f"{p}.dtype", ("float32", "bfloat16", "auto"))
    v.check(0 <= s.zero_stage <= 3, f"{p}.zero_stage", "must be 0, 1, 2 or 3")


def _rewards(rewards, p: str, v: Violations) -> None:
    for j, r in enumerate(rewards):
        _reward_name(r.name, f"{p}[{j}].name", v)
        if r.name.startswith("model:"):  # the scorer opens the path as confined here, not as written
            r.name = "model:" + model_path(r.name.removeprefix("model:"), f"{p}[{j}].name", v.policy, v)
        v.number(r.weight, f"{p}[{j}].weight")
        v.number(r.timeout_s, f"{p}[{j}].timeout_s", lo=0, lo_open=True)


def _reward_name(name: str, path: str, v: Violations) -> None:
    """A built-in, `model:/path`, or `pkg.module:fn` from an allowed module that has such a callable."""
    if name in BUILTIN_NAMES:
        return
    if name.startswith("model:"):
        return  # checked and resolved by _rewards (model_path)
    module, sep, fn = name.partition(":")
    if not sep or not module or not fn.isidentifier():
        v.check(
            False, path, f"{name!r} is not a built-in ({', '.join(BUILTIN_NAMES)}), pkg.module:function or model:/path"
        )
        return
    if not module_allowed(module, v.policy.reward_modules):
        raise PermissionDenied(
            f"{path}: reward module {module!r} is not in the server's allow-list (stillroom serve --reward-module)"
        )
    problem = imported_problem(module, fn)  # from its source: the module is not run here
    v.check(problem is None, path, problem or "")


def _qlora(adapter: int, optim: pb.OptimConfig, p: str, v: Violations) -> None:
    """QLoRA needs bitsandbytes on the cluster, and DeepSpeed cannot partition 4-bit weights."""
    if adapter != pb.ADAPTER_TYPE_QLORA:
        return
    v.check(
        importlib.util.find_spec("bitsandbytes") is not None,
        f"{p}.adapter",
        "qlora needs bitsandbytes, which is not installed on the server",
    )
    v.check(
        optim.zero_stage == 0,
        f"{p}.optim.zero_stage",
        "qlora trains with ZeRO stage 0 (4-bit weights cannot be partitioned)",
    )


def _sft(s: pb.SftStage, p: str, v: Violations) -> None:
    _qlora(s.adapter, s.optim, p, v)
    v.check(
        not (s.merge and s.adapter == pb.ADAPTER_TYPE_QLORA),
        f"{p}.merge",
        "a qlora adapter is not merged into its 4-bit base; export it as an adapter",
    )
    _lora(s.lora, f"{p}.lora", v)
    _optim(s.optim, f"{p}.optim", v)
    v.number(s.max_length, f"{p}.max_length", lo=1)
    v.number(s.eval_every, f"{p}.eval_every", lo=1)


def _grpo(s: pb.GrpoStage, p: str, v: Violations) -> None:
    _qlora(s.adapter, s.optim, p, v)
    v.check(s.group_size == 0 or s.group_size >= 2, f"{p}.group_size", "must be >= 2")
    v.choice(s.loss_type, f"{p}.loss_type", LOSS_TYPES)
    v.choice(s.scale_rewards, f"{p}.scale_rewards", SCALE_REWARDS)
    v.number(s.beta, f"{p}.beta", lo=0)
    v.number(s.epsilon, f"{p}.epsilon", lo=0, hi=1, lo_open=True)
    v.number(s.epsilon_high, f"{p}.epsilon_high", lo=0, hi=1, lo_open=True)
    v.number(s.num_iterations, f"{p}.num_iterations", lo=1)
    v.number(s.max_staleness, f"{p}.max_staleness", lo=0)
    v.number(s.max_new_tokens, f"{p}.max_new_tokens", lo=1)
    v.number(s.temperature, f"{p}.temperature", lo=0)
    greedy = s.HasField("temperature") and s.temperature == 0  # unset means 1
    v.check(not greedy, f"{p}.temperature", "must be > 0: GRPO samples (greedy completions of a group are alike)")
    v.number(s.top_p, f"{p}.top_p", lo=0, hi=1, lo_open=True)
    v.number(s.prompts_per_step, f"{p}.prompts_per_step", lo=1)
    v.number(s.max_resample, f"{p}.max_resample", lo=1)
    v.choice(s.importance_sampling_level, f"{p}.importance_sampling_level", IS_LEVELS)
    v.choice(s.importance_sampling_mode, f"{p}.importance_sampling_mode", IS_MODES)
    v.number(s.importance_sampling_cap, f"{p}.importance_sampling_cap", lo=1)
    v.number(s.max_reward_failure_fraction, f"{p}.max_reward_failure_fraction", lo=0, hi=1)
    v.check(len(s.rewards) > 0, f"{p}.rewards", "GRPO needs at least one reward function")
    v.choice(s.prompts, f"{p}.prompts", PROMPT_SPLITS)
    _rewards(s.rewards, f"{p}.rewards", v)
    _lora(s.lora, f"{p}.lora", v)
    per_step = "each step is prompts_per_step prompts x group_size completions"
    _optim(s.optim, f"{p}.optim", v, {"batch_size": per_step, "epochs": "optim.max_steps counts the steps"})


def _distill(s: pb.DistillStage, p: str, v: Violations) -> None:
    v.choice(s.mode, f"{p}.mode", DISTILL_MODES)
    v.number(s.student_init.keep_every_nth_layer, f"{p}.student_init.keep_every_nth_layer", lo=1)
    v.number(s.min_agreement, f"{p}.min_agreement", lo=0, hi=1)
    v.number(s.max_ahead, f"{p}.max_ahead", lo=0)
    v.number(s.eval_prompts, f"{p}.eval_prompts", lo=1)
    v.number(s.prompts_per_step, f"{p}.prompts_per_step", lo=1)
    v.number(s.samples_per_step, f"{p}.samples_per_step", lo=1)
    v.number(s.max_resample, f"{p}.max_resample", lo=1)
    v.number(s.min_kept_fraction, f"{p}.min_kept_fraction", lo=0, hi=1)
    v.number(s.max_reward_failure_fraction, f"{p}.max_reward_failure_fraction", lo=0, hi=1)
    v.choice(s.filter, f"{p}.filter", DISTILL_FILTERS)
    v.choice(s.kd_loss, f"{p}.kd_loss", KD_LOSSES)
    on_policy = s.mode == "on_policy" or getattr(s, "lambda") > 0
    v.check(not (s.student_without_passages and on_policy), f"{p}.student_without_passages", "offline only")
    v.number(s.num_samples, f"{p}.num_samples", lo=1)
    v.number(s.top_k, f"{p}.top_k", lo=1)
    for name in ("alpha", "jsd_beta", "lambda"):
        v.number(getattr(s, name), f"{p}.{name}", lo=0, hi=1)
    v.number(s.temperature, f"{p}.temperature", lo=0, lo_open=True)
    v.number(s.sampling_temperature, f"{p}.sampling_temperature", lo=0)
    n, temperature = teacher_sampling(s)
    v.check(temperature != 0 or n <= 1, f"{p}.num_samples", f"{n} greedy answers are all alike: set 1")
    v.number(s.max_new_tokens, f"{p}.max_new_tokens", lo=1)
    _rewards(s.rewards, f"{p}.rewards", v)
    _optim(s.optim, f"{p}.optim", v, {"batch_size": "each step is prompts_per_step prompts x num_samples"})
    check_distill(s, p, v)  # until, student_init.layer_choice (services/distill_checks.py)


def _evaluate(s: pb.EvaluateStage, p: str, v: Violations) -> None:
    v.check(len(s.metrics) > 0, f"{p}.metrics", "name at least one metric (any reward function)")
    _rewards(s.metrics, f"{p}.metrics", v)
    v.number(s.max_new_tokens, f"{p}.max_new_tokens", lo=1)
    v.number(s.limit, f"{p}.limit", lo=1)
    v.check(0 <= s.few_shot <= 16, f"{p}.few_shot", "must be between 0 and 16 examples")
    v.number(s.min_retained, f"{p}.min_retained", lo=0, hi=1)


def _check_baselines(spec: pb.JobSpec, v: Violations) -> None:
    """A distillation baseline learns from the gold labels: it needs data.train."""
    for i, stage in enumerate(spec.stages):
        if stage.WhichOneof("kind") == "distill" and stage.distill.baseline:
            v.check(bool(spec.data.train.path), f"stages[{i}].distill.baseline", "needs data.train (gold labels)")


def _check_adapter_chain(spec: pb.JobSpec, v: Violations) -> None:
    """A stage that fine-tunes after an earlier one left a LoRA adapter (unmerged) must continue
    that adapter: a full fine-tune, or an sft (which starts from the base model), would silently
    drop what the earlier stage learned."""
    left = ""  # the stage whose adapter the policy carries now
    for i, stage in enumerate(spec.stages):
        kind = stage.WhichOneof("kind")
        if kind not in ("sft", "grpo"):
            continue
        s = getattr(stage, kind)
        continues = kind == "grpo" and s.adapter != pb.ADAPTER_TYPE_NONE
        v.check(
            not left or continues,
            f"stages[{i}].{kind}.adapter",
            f"{left} leaves a LoRA adapter that this stage would drop: use a LoRA grpo (it continues "
            f"the adapter), or set merge: true on {left}",
        )
        has_adapter = s.adapter != pb.ADAPTER_TYPE_NONE and not (kind == "sft" and s.merge)
        left = f"stages[{i}].{kind}" if has_adapter else ("" if not continues else left)


def _export(s: pb.ExportStage, p: str, v: Violations) -> None:
    v.choice(s.dtype, f"{p}.dtype", DTYPES)


CHECKS = {
    "audit": _audit,
    "sft": _sft,
    "grpo": _grpo,
    "distill": _distill,
    "evaluate": _evaluate,
    "export": _export,
    "index": lambda s, p, v: None,  # nothing to set: data.corpus and retrieval say what to index
}


def _check_resources(r: pb.Resources, v: Violations) -> None:
    for role in ("generator", "scorer", "trainer", "student", "retriever"):
        rr = getattr(r, role)
        v.number(rr.replicas, f"resources.{role}.replicas", lo=1)
        v.number(rr.num_cpus, f"resources.{role}.num_cpus", lo=0)
        v.number(rr.num_gpus, f"resources.{role}.num_gpus", lo=0)
        v.number(rr.threads, f"resources.{role}.threads", lo=1)
        for name, amount in rr.custom.items():
            v.number(amount, f"resources.{role}.custom[{name!r}]", lo=0)
