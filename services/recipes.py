"""Recipes: a YAML (or JSON) file that is the JSON mapping of stillroom.v1.JobSpec, plus
`--set path=value` overrides (`stages[0].audit.min_rows=10`, `teacher.path=/models/x`). A recipe
may extend another (`extends: base.yaml` and a `set:` list of the same overrides).

A recipe may also carry top-level `labels:`, which go to SubmitJobRequest.labels.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from google.protobuf.json_format import ParseDict, ParseError
from stillroom.v1 import job_pb2 as pb

_TOKEN = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:\[(\d+)\])?")


class RecipeError(ValueError):
    pass


def apply_set(doc: dict, assignment: str) -> None:
    """Apply one `a.b[2].c=value` override in place; value is parsed as YAML (so 3 is a number)."""
    path, sep, raw = assignment.partition("=")
    if not sep or not path:
        raise RecipeError(f"--set {assignment!r}: expected path=value")
    tokens = [_TOKEN.fullmatch(part) for part in path.split(".")]
    if not all(tokens):
        raise RecipeError(f"--set {assignment!r}: {path!r} is not a field path like stages[0].audit.min_rows")
    node: Any = doc
    for i, m in enumerate(tokens):
        name, index = m.group(1), m.group(2)
        last = i == len(tokens) - 1
        if index is None:
            if last:
                node[name] = yaml.safe_load(raw)
            else:
                node = node.setdefault(name, {})
            continue
        items = node.setdefault(name, [])
        idx = int(index)
        if idx > len(items):
            raise RecipeError(f"--set {assignment!r}: {name} has {len(items)} items, index {idx} is past the end")
        if idx == len(items):
            items.append({})
        if last:
            items[idx] = yaml.safe_load(raw)
        else:
            node = items[idx]


def load(path: str | Path, sets: list[str] = ()) -> tuple[pb.JobSpec, dict[str, str]]:
    """(spec, labels) from a recipe file and overrides. Raises RecipeError naming the file."""
    doc = _document(Path(path))
    for assignment in sets:
        apply_set(doc, assignment)
    labels = {str(k): str(v) for k, v in (doc.pop("labels", None) or {}).items()}
    return parse(doc, str(path)), labels


def _document(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The recipe as a mapping. A recipe may start from another (`extends: other.yaml`, relative
    to it) and change it with `set: [path=value, ...]`: a quick variant without a second copy."""
    if path.resolve() in seen:
        raise RecipeError(f"{path}: extends itself (through {' -> '.join(map(str, seen))})")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise RecipeError(f"{path}: {e}") from None
    if not isinstance(doc, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of JobSpec fields")
    base, sets = doc.pop("extends", None), doc.pop("set", None) or []
    if base is not None:
        parent = _document(path.parent / str(base), (*seen, path.resolve()))
        parent.update(doc)
        doc = parent
    for assignment in sets:
        apply_set(doc, str(assignment))
    return doc


def parse(doc: dict, source: str = "recipe") -> pb.JobSpec:
    try:
        return ParseDict(doc, pb.JobSpec())
    except ParseError as e:
        raise RecipeError(f"{source}: {e}") from None
