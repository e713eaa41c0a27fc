"""The wiring the stages share: a stage's proto parameters to its roles' specs (proto3's zero means
"the default", and this is where the defaults are), the policy earlier stages tuned, saving a
trained model, and metrics with progress."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from stillroom.actors.models.loading import model_dir
from stillroom.actors.roles.trainer import TrainerSpec
from stillroom.actors.runtime.context import StageContext, StageFailed
from stillroom.actors.runtime.trainers import save_pretrained
from stillroom.v1 import job_pb2 as pb
from transformers import AutoTokenizer

ADAPTERS = {pb.ADAPTER_TYPE_NONE: "none", pb.ADAPTER_TYPE_QLORA: "qlora"}  # anything else: lora


def adapter_name(adapter: int) -> str:
    """A stillroom.v1.AdapterType as the trainer names it: lora (the default), qlora or none."""
    return ADAPTERS.get(adapter, "lora")


def trainer_spec(
    model: str,
    optim: pb.OptimConfig,
    out: Path,
    seed: int,
    default_lr: float,
    adapter: str = "none",
    lora: pb.LoraConfig | None = None,
    **fields,
) -> TrainerSpec:
    """A TrainerSpec from a stage's optim and lora settings; checkpoints under out/checkpoints."""
    lora = lora or pb.LoraConfig()
    r = lora.r or 8
    return TrainerSpec(
        model,
        adapter=adapter,
        lora_r=r,
        lora_alpha=lora.alpha or 2.0 * r,
        lora_dropout=lora.dropout,
        target_modules=tuple(lora.target_modules),
        learning_rate=optim.learning_rate or default_lr,
        weight_decay=optim.weight_decay,
        warmup_steps=optim.warmup_steps,
        lr_scheduler_type=optim.lr_scheduler_type or "constant",
        zero_stage=optim.zero_stage,
        dtype=optim.dtype,
        gradient_checkpointing=optim.gradient_checkpointing,
        gradient_accumulation_steps=optim.gradient_accumulation_steps or 1,
        seed=seed,
        checkpoint_dir=str(out / "checkpoints"),
        **fields,
    )


def tuned_policy(ctx: StageContext, spec: pb.JobSpec) -> tuple[str, str]:
    """(model directory, PEFT adapter or "") of the teacher as earlier stages left it."""
    return ctx.outputs.get("policy_model") or str(model_dir(spec.teacher)), ctx.outputs.get("policy_adapter", "")


def save_model(ctx: StageContext, trainers: list, tokenizer_of: str, path: Path, kind: str, merged: str = "") -> str:
    """The trainer group's weights at `path` (an adapter or a model) with the tokenizer of
    `tokenizer_of`, registered as artifacts (and the merged model at `merged`, on request)."""
    save_pretrained(trainers, str(path), merged)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_of)
    tokenizer.save_pretrained(path)
    ctx.artifact_tree(path, kind)
    if merged:
        tokenizer.save_pretrained(merged)
        ctx.artifact_tree(Path(merged), "model")
    return str(path)


def save_policy(
    ctx: StageContext,
    trainers: list,
    base: str,
    uses_adapter: bool,
    out: Path,
    merge: bool = False,
    baseline: bool = False,
):
    """Save the tuned teacher and make it the policy later stages start from (a `baseline` is
    only offered for evaluation): the adapter on its base (or, with `merge`, the merged model), or
    the fully fine-tuned model."""
    register = partial(ctx.offer_model, ctx.model_name, lineage=[ctx.stage]) if baseline else ctx.set_policy
    if not uses_adapter:
        register(save_model(ctx, trainers, base, out / "model", "model"))
        return
    merged = str(out / "merged") if merge else ""
    adapter = save_model(ctx, trainers, base, out / "adapter", "adapter", merged)
    if merged:
        register(merged)
    else:
        register(base, adapter)


def step_reporter(ctx: StageContext, total: int, unit: str = "steps"):
    """metrics -> the job's events, with progress whenever the metrics carry train/step."""

    def report(metrics: dict[str, float]) -> None:
        ctx.metrics(metrics)
        if "train/step" in metrics:
            ctx.progress(int(metrics["train/step"]), total, unit)

    return report


def held_out(spec: pb.JobSpec) -> pb.DatasetRef:
    """The held-out split: data.test, else data.eval (an empty ref when neither is set)."""
    return spec.data.test if spec.data.test.path else spec.data.eval


class FractionGuard:
    """Step metrics -> `report`, keeping a running fraction numerator / denominator (metric names)
    over the stage; the stage fails, with `why(so_far)` as its reason, once it leaves its bound
    (`at_least` or `at_most`; None: never)."""

    def __init__(self, report, numerator: str, denominator: str, at_least=None, at_most=None, why=str):
        self.report, self.keys = report, (numerator, denominator)
        self.at_least, self.at_most, self.why = at_least, at_most, why
        self.top = self.bottom = 0.0

    def __call__(self, metrics: dict[str, float]) -> None:
        self.report(metrics)
        if self.keys[0] not in metrics:
            return
        self.top += metrics[self.keys[0]]
        self.bottom += metrics[self.keys[1]]
        fraction = self.top / self.bottom if self.bottom else 0.0
        low = self.at_least is not None and self.bottom and fraction < self.at_least
        high = self.at_most is not None and fraction > self.at_most
        if low or high:
            raise StageFailed(self.why(self))


def reward_failures(report, max_fraction: float):
    """A FractionGuard on the samples reward functions failed on (rewards/failed of rewards/samples)."""
    return FractionGuard(
        report,
        "rewards/failed",
        "rewards/samples",
        at_most=max_fraction,
        why=lambda g: (
            f"reward functions failed (error, timeout or crash) on {g.top:.0f} of {g.bottom:.0f} samples so far "
            f"({g.top / g.bottom:.2f}), above max_reward_failure_fraction {max_fraction}: see rewards/<fn>/errors, "
            "/timeouts and /crashed in the events"
        ),
    )
