"""Warm starts: what a job with `resume_from` reuses of the earlier job. The finished stages it
repeats unchanged are skipped (their outputs, which name the earlier job's models, are handed
on), and the first stage after them starts from the earlier job's checkpoints and journal, linked
(not copied) into the new job's artifact directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from stillroom.actors.runtime.supervisor import resume_state
from stillroom.v1 import job_pb2 as pb

SAME = ("teacher", "student", "data", "seed")  # what every stage depends on


def reusable_stages(old: pb.JobSpec, new: pb.JobSpec) -> int:
    """How many leading stages the new spec repeats unchanged (0 when the inputs differ)."""
    if any(getattr(old, f) != getattr(new, f) for f in SAME):
        return 0
    count = 0
    for a, b in zip(old.stages, new.stages, strict=False):
        if a.SerializeToString(deterministic=True) != b.SerializeToString(deterministic=True):
            break
        count += 1
    return count


def warm_start(old_spec: pb.JobSpec, events: list[pb.Event], new_spec: pb.JobSpec, old_dir: Path, new_dir: Path) -> str:
    """The Supervisor `resume` JSON for the new job: the earlier job's finished stages that the
    new spec repeats unchanged; the next stage's files (checkpoints, journal) linked across."""
    done = [
        e.stage for e in events if e.type == pb.EVENT_TYPE_STAGE_STATE and e.stage_state == pb.STAGE_STATE_SUCCEEDED
    ]
    same = reusable_stages(old_spec, new_spec)
    keep = min(len(done), same)
    if keep < same:  # the earlier job stopped inside stage `keep`, which the new spec repeats: go on from its files
        stage = new_spec.stages[keep].name
        if (old_dir / stage).is_dir() and not (new_dir / stage).exists():
            new_dir.mkdir(parents=True, exist_ok=True)
            shutil.copytree(old_dir / stage, new_dir / stage, copy_function=os.link)
    return resume_state(events, keep)
