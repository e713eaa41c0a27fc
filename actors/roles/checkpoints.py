"""A trainer's checkpoint directories on disk: step-N/ written by DeepSpeed, then step-N/COMPLETE
(the data cursor and step, as JSON) once every rank has written its part. Which one to resume from,
and which to delete (the distill stage keeps its best evaluation's and its newest)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

COMPLETE = "COMPLETE"


def latest_complete(checkpoint_dir: str, cursor: int | None = None) -> str | None:
    """The newest step-N directory with a COMPLETE marker (with `cursor`: the newest saved at that
    data cursor); half-written ones are ignored."""
    root = Path(checkpoint_dir)
    done = sorted(p for p in root.glob("step-*") if (p / COMPLETE).exists()) if root.exists() else []
    if cursor is not None:
        done = [p for p in done if json.loads((p / COMPLETE).read_text())["cursor"] == cursor]
    return done[-1].name if done else None


def checkpoints_pruned(checkpoint_dir: str, keep: set[int]) -> list[str]:
    """Delete the complete checkpoints saved at data cursors outside `keep` (a distill stage keeps
    its best evaluation's and its newest: one is ~16 bytes a parameter with Adam's state). Returns
    the deleted tags."""
    root = Path(checkpoint_dir)
    gone = []
    for path in sorted(root.glob("step-*")) if root.exists() else []:
        marker = path / COMPLETE
        if marker.exists() and json.loads(marker.read_text())["cursor"] not in keep:
            shutil.rmtree(path, ignore_errors=True)  # every rank prunes: on a shared disk, one wins
            gone.append(path.name)
    return gone
