"""Where a grpo stage's prompts come from (`grpo.prompts`): data.train (the default; the answers
travel to reward functions as `reference`) or data.unlabeled (prompts no one labelled). Pure:
reads only the spec. The reward functions' columns are checked against that split in data_checks."""

from __future__ import annotations

from stillroom.services.violations import Violations
from stillroom.v1 import job_pb2 as pb

PROMPT_SPLITS = ("train", "unlabeled")


def reads_train(stage: pb.Stage, needs_train: set[str]) -> bool:
    """Whether a stage reads data.train: the kinds in `needs_train`, but a grpo stage not when
    its prompts are unlabeled."""
    kind = stage.WhichOneof("kind")
    return kind in needs_train and not (kind == "grpo" and stage.grpo.prompts == "unlabeled")


def check_prompt_splits(spec: pb.JobSpec, needs_train: set[str], v: Violations) -> set[str]:
    """A grpo stage whose prompts are unlabeled needs data.unlabeled. Returns the kinds of the
    stages that read data.train."""
    for i, stage in enumerate(spec.stages):
        if stage.WhichOneof("kind") == "grpo" and stage.grpo.prompts == "unlabeled":
            v.check(
                bool(spec.data.unlabeled.path), f"stages[{i}].grpo.prompts", "'unlabeled' needs data.unlabeled.path"
            )
    return {s.WhichOneof("kind") for s in spec.stages if reads_train(s, needs_train)}
