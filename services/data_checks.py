"""Checks of what a spec points at on disk: model and data paths inside the server's roots, data
files row by row, reference columns for built-in rewards, tokenizers that logit KD can compare,
LoRA target modules the teacher has. Read from file headers; nothing is loaded into torch."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
from pathlib import Path

from stillroom.actors.common import datasets, retrieval
from stillroom.actors.common.rewards import reference_column
from stillroom.services.errors import PermissionDenied
from stillroom.services.violations import Policy, Violations
from stillroom.v1 import job_pb2 as pb

DENSE_KINDS = (pb.RETRIEVER_KIND_DENSE, pb.RETRIEVER_KIND_HYBRID)


def _resolve(path: str, field_path: str, roots: tuple[Path, ...]) -> Path:
    """Absolute path inside one of `roots` (relative paths are taken from the first root)."""
    p = Path(path)
    resolved = (p if p.is_absolute() else roots[0] / p).resolve()
    if not any(resolved.is_relative_to(root.resolve()) for root in roots):
        raise PermissionDenied(f"{field_path}: {path!r} is outside the server's allowed roots")
    return resolved


def model_path(path: str, field_path: str, policy: Policy, v: Violations) -> str:
    if path.startswith("pkg://"):
        package, _, rel = path[len("pkg://") :].partition("/")
        spec = importlib.util.find_spec(package) if package.isidentifier() else None
        if spec is None or not spec.submodule_search_locations:
            v.check(False, field_path, f"package {package!r} is not installed on the server")
        elif not (Path(next(iter(spec.submodule_search_locations))) / rel).is_file():
            v.check(False, field_path, f"package {package!r} has no file {rel!r}")
        return path
    resolved = _resolve(path, field_path, policy.data_roots + policy.model_roots)
    if resolved.is_dir():
        v.check(
            any((resolved / f).exists() for f in ("config.json", "tokenizer.json", "tokenizer_config.json")),
            field_path,
            f"{resolved} has no config.json or tokenizer files",
        )
    else:
        v.check(
            resolved.suffix == ".gguf" and resolved.is_file(),
            field_path,
            f"{resolved} is neither a model directory nor a .gguf file",
        )
    return str(resolved)


def check_dataset(ref: pb.DatasetRef, p: str, policy: Policy, v: Violations) -> datasets.Dataset | None:
    """Check the file row by row; return what it is (its shape and columns, no rows)."""
    ref.path = str(_resolve(ref.path, f"{p}.path", policy.data_roots))
    found = _read_once("dataset", ref.path, datasets.ref_format(ref), datasets.columns_of(ref), _version(ref.path))
    if isinstance(found, datasets.DataError):
        v.check(False, f"{p}.path", str(found))
        return None
    return found


def _version(path: str) -> tuple:
    """What changes whenever a file (or any file of a directory) is written: names, sizes, mtimes."""
    root = Path(path)
    files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]
    try:
        return tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    except OSError:
        return ()  # gone: the reader says so


@functools.lru_cache(maxsize=256)
def _read_once(kind: str, path: str, fmt: str, cols: datasets.Columns, version: tuple):
    """A data file read and checked once per version (`_version`), not on every submit: a client
    that submits the same data again is answered in microseconds. A dataset is kept without its
    rows; a DataError is kept too (the same file fails the same way)."""
    try:
        if kind == "corpus":
            return len(retrieval.load_corpus(path, fmt))
        return dataclasses.replace(datasets.load(path, fmt, cols), rows=[])
    except datasets.DataError as e:
        return e


def check_reward_columns(spec: pb.JobSpec, train: datasets.Dataset | None, v: Violations) -> None:
    """A built-in reward that compares with a reference column needs that column in the prompts
    (a `completion` column reaches reward functions as `reference`)."""
    if train is None:
        return
    columns = {"reference" if c == "completion" else c for c in train.columns}
    for i, stage in enumerate(spec.stages):
        if stage.WhichOneof("kind") != "grpo":
            continue
        for j, r in enumerate(stage.grpo.rewards):
            column = reference_column(r.name, dict(r.args))
            if column is None:
                continue
            v.check(
                column in columns,
                f"stages[{i}].grpo.rewards[{j}].args['column']",
                f"the train data has no column {column!r} for {r.name} (it has {', '.join(sorted(columns))})",
            )


def _tokenizer_digest(path: str) -> str | None:
    """sha256 of a model directory's tokenizer.json, or None when it cannot be read here."""
    f = Path(path) / "tokenizer.json"
    return hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else None


def check_tokenizers(spec: pb.JobSpec, v: Violations) -> None:
    """Logit KD compares distributions over one vocabulary: a student with another tokenizer can
    only learn from the teacher's text (alpha: 1, sequence-level KD)."""
    if not (spec.teacher.path and spec.student.path):
        return
    teacher = _tokenizer_digest(spec.teacher.tokenizer_path or spec.teacher.path)
    student = _tokenizer_digest(spec.student.tokenizer_path or spec.student.path)
    if teacher is None or student is None or teacher == student:
        return
    for i, stage in enumerate(spec.stages):
        if stage.WhichOneof("kind") != "distill":
            continue
        d = stage.distill
        v.check(
            d.HasField("alpha") and d.alpha == 1,
            f"stages[{i}].distill.alpha",
            "logit KD needs a student that shares the teacher's tokenizer, and these differ; "
            "set alpha: 1 (sequence-level KD on the teacher's answers only)",
        )
        v.check(
            d.mode != "on_policy" and not getattr(d, "lambda"),
            f"stages[{i}].distill.mode",
            "on-policy distillation grades the student's tokens with the teacher's: it needs a shared tokenizer",
        )


def model_modules(path: str) -> set[str] | None:
    """Names of the modules holding weights in a safetensors checkpoint (e.g. q_proj, lm_head),
    read from the files' JSON headers without loading a tensor. None when they cannot be read."""
    root = Path(path)
    files = sorted(root.glob("*.safetensors")) if root.is_dir() else []
    names: set[str] = set()
    for f in files:
        try:
            with f.open("rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(size))
        except (OSError, ValueError):
            return None
        names |= {k.rsplit(".", 2)[-2] for k in header if k != "__metadata__" and k.count(".") >= 1}
    return names or None


def check_target_modules(spec: pb.JobSpec, v: Violations) -> None:
    """A LoRA target module the teacher does not have is an error now, not at the first step."""
    modules = model_modules(spec.teacher.path) if spec.teacher.path else None
    if modules is None:
        return
    for i, stage in enumerate(spec.stages):
        kind = stage.WhichOneof("kind")
        if kind in ("sft", "grpo"):
            for j, name in enumerate(getattr(stage, kind).lora.target_modules):
                v.check(
                    name in modules,
                    f"stages[{i}].{kind}.lora.target_modules[{j}]",
                    f"the teacher has no module {name!r} (it has e.g. {', '.join(sorted(modules)[:8])})",
                )


def check_retrieval(spec: pb.JobSpec, kinds: set[str], policy: Policy, v: Violations) -> None:
    """data.corpus row by row (ids, texts, duplicates: the file and row), and what `retrieval` and
    the index stage need: a corpus, templates with their placeholders, a sane top_k."""
    corpus = spec.data.corpus
    for name in ("corpus", "test_corpus"):
        ref = getattr(spec.data, name)
        if ref.path:
            ref.path = str(_resolve(ref.path, f"data.{name}.path", policy.data_roots))
            found = _read_once("corpus", ref.path, datasets.ref_format(ref), datasets.Columns(), _version(ref.path))
            if isinstance(found, datasets.DataError):
                v.check(False, f"data.{name}.path", str(found))
    if spec.data.test_corpus.path:
        v.check(spec.HasField("retrieval"), "data.test_corpus.path", "only the +rag rungs use it: set retrieval")
    if spec.data.test_updated.path:
        v.check(
            bool(spec.data.test_corpus.path), "data.test_updated.path", "its labels follow data.test_corpus: set it"
        )
    for i, stage in enumerate(spec.stages):
        if stage.WhichOneof("kind") == "sft" and stage.sft.without_passages:
            v.check(spec.HasField("retrieval"), f"stages[{i}].sft.without_passages", "needs retrieval")
    wanted = [
        what for what, yes in (("retrieval", spec.HasField("retrieval")), ("the index stage", "index" in kinds)) if yes
    ]
    if wanted:
        v.check(bool(corpus.path), "data.corpus.path", f"required by {' and '.join(wanted)}: the documents to retrieve")
    if not spec.HasField("retrieval"):
        return
    r = spec.retrieval
    v.check(0 <= r.top_k <= 50, "retrieval.top_k", "must be between 1 and 50 (0: the default, 3)")
    if r.template:
        v.check("{passages}" in r.template, "retrieval.template", "must contain {passages} (where the passages go)")
        v.check("{prompt}" in r.template, "retrieval.template", "must contain {prompt} (where the question goes)")
    if r.passage_template:
        v.check("{text}" in r.passage_template, "retrieval.passage_template", "must contain {text}")
    if r.embedding_model and r.retriever not in DENSE_KINDS:
        v.check(False, "retrieval.embedding_model", "only the dense and hybrid retrievers embed")
    elif r.embedding_model:
        model = _resolve(r.embedding_model, "retrieval.embedding_model", policy.data_roots + policy.model_roots)
        v.check(
            (model / "modules.json").is_file(),
            "retrieval.embedding_model",
            f"{model} is not a sentence-transformers model directory (no modules.json)",
        )
        r.embedding_model = str(model)


TRACKERS = ("tensorboard", "mlflow", "none")


def check_tracking(t: pb.TrackingSpec, policy: Policy, v: Violations) -> None:
    """report_to names known trackers ("none" alone); MLflow settings only with mlflow; a file:
    tracking URI inside the server's data roots, or an http(s) server."""
    for i, name in enumerate(t.report_to):
        v.check(name in TRACKERS, f"tracking.report_to[{i}]", f"{name!r} is not one of {', '.join(TRACKERS)}")
    v.check("none" not in t.report_to or len(t.report_to) == 1, "tracking.report_to", "'none' goes alone: no tracker")
    uri = t.mlflow_tracking_uri
    for field in ("mlflow_tracking_uri", "mlflow_experiment"):
        if getattr(t, field):
            v.check("mlflow" in t.report_to, f"tracking.{field}", "report_to does not include mlflow")
    if uri.startswith("file:"):
        path = _resolve(uri.removeprefix("file:").removeprefix("//"), "tracking.mlflow_tracking_uri", policy.data_roots)
        t.mlflow_tracking_uri = f"file:{path}"
    elif uri:
        v.check(
            uri.startswith(("http://", "https://")),
            "tracking.mlflow_tracking_uri",
            f"{uri!r}: an http(s):// tracking server or a file: store",
        )
