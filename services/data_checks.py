"""Checks of what a spec points at on disk: model and data paths inside the server's roots, data
files row by row, reference columns for built-in rewards, tokenizers that logit KD can compare,
LoRA target modules the teacher has, where MLflow may be. Read from file headers; nothing is
loaded into torch.

Every path goes through actors/common/paths.confine (symlinks resolved, inside the roots, outside
the server's own files; one answer, PERMISSION_DENIED, for outside, excluded and missing alike),
and every file through paths.open_regular (a FIFO or device never holds a server thread)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

from stillroom.actors.common import datasets, paths, retrieval
from stillroom.actors.common.rewards import reference_column
from stillroom.services.errors import PermissionDenied
from stillroom.services.violations import Policy, Violations
from stillroom.v1 import job_pb2 as pb

DENSE_KINDS = (pb.RETRIEVER_KIND_DENSE, pb.RETRIEVER_KIND_HYBRID)


MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
MAX_TREE = 10_000  # files a model directory may hold: its tree is walked at every submit


def confine(path: str, field_path: str, policy: Policy, roots: tuple[Path, ...] = (), must_exist: bool = True) -> Path:
    """paths.confine with the server's roots (data roots unless `roots`) and excluded directories;
    PermissionDenied naming the field."""
    try:
        return paths.confine(path, roots or policy.data_roots, policy.excluded, field_path, must_exist, policy.granted)
    except paths.PathError as e:
        raise PermissionDenied(str(e)) from None


def model_path(path: str, field_path: str, policy: Policy, v: Violations) -> str:
    """A model (a directory or a .gguf file, or a pkg:// file); returned resolved (pkg:// as is)."""
    if path.startswith("pkg://"):
        try:
            found = paths.package_file(path, field_path)
        except paths.PathError as e:
            raise PermissionDenied(str(e)) from None
        except FileNotFoundError as e:
            v.check(False, field_path, str(e))
            return path
        v.check(paths.is_regular(found), field_path, f"{path[: paths.SHOWN]!r}: the package has no such file")
        return path
    roots = policy.data_roots + policy.model_roots
    resolved = confine(path, field_path, policy, roots)
    if resolved.is_dir():
        check_tree(resolved, field_path, policy, roots, v)
        v.check(
            any(paths.is_regular(resolved / f) for f in MODEL_FILES),
            field_path,
            f"{resolved} has no config.json or tokenizer files",
        )
    else:
        v.check(
            resolved.suffix == ".gguf" and paths.is_regular(resolved),
            field_path,
            f"{resolved} is neither a model directory nor a .gguf file",
        )
    return str(resolved)


def check_tree(root: Path, field_path: str, policy: Policy, roots: tuple[Path, ...], v: Violations) -> None:
    """Everything a model directory holds, as its loaders will follow it: each entry confined like
    the directory (a link out of the roots, or to the server's files: PermissionDenied), each file
    regular (a FIFO would hold the actor that opens it)."""
    seen = 0
    for top, dirs, files in os.walk(root, followlinks=True):
        for name in dirs + files:
            seen += 1
            if seen > MAX_TREE:
                v.check(False, field_path, f"{root} holds more than {MAX_TREE} files: not a model directory")
                return
            entry = Path(top) / name
            try:
                paths.confine(entry, roots, policy.excluded, field_path, must_exist=False, granted=policy.granted)
            except paths.PathError:
                shown = str(entry.relative_to(root))[: paths.SHOWN]
                raise PermissionDenied(f"{field_path}: {shown!r} in it leads outside the data roots") from None
            if name in files and entry.exists() and not paths.is_regular(entry):
                v.check(False, field_path, f"{entry}: not a regular file (a FIFO, device or socket is never read)")


def check_dataset(ref: pb.DatasetRef, p: str, policy: Policy, v: Violations) -> datasets.Dataset | None:
    """Check the file row by row; return what it is (its shape and columns, no rows)."""
    ref.path = str(confine(ref.path, f"{p}.path", policy))
    fmt, cols = datasets.ref_format(ref), datasets.columns_of(ref)
    found = _read_once("dataset", ref.path, fmt, cols, _version(ref.path), policy.excluded)
    if isinstance(found, datasets.DataError):
        v.check(False, f"{p}.path", str(found))
        return None
    return found


def _version(path: str) -> tuple:
    """What changes whenever a file (or any file of a directory: a `datasets` directory keeps its
    files beside its state.json) is written: names, sizes, mtimes. stat only: nothing is opened."""
    root = Path(path)
    try:
        files = sorted(root.iterdir()) if root.is_dir() else [root]
        return tuple((str(f), st.st_size, st.st_mtime_ns, st.st_mode) for f in files for st in (f.stat(),))
    except OSError:
        return ()  # gone: the reader says so


@functools.lru_cache(maxsize=256)
def _read_once(kind: str, path: str, fmt: str, cols: datasets.Columns, version: tuple, excluded: tuple = ()):
    """A data file read and checked once per version (`_version`), not on every submit: a client
    that submits the same data again is answered in microseconds. A dataset is kept without its
    rows; a DataError is kept too (the same file fails the same way)."""
    try:
        if kind == "corpus":
            return len(retrieval.load_corpus(path, fmt, excluded))
        return dataclasses.replace(datasets.load(path, fmt, cols, excluded), rows=[])
    except datasets.DataError as e:
        return e


def check_reward_columns(spec: pb.JobSpec, loaded: dict[str, datasets.Dataset | None], v: Violations) -> None:
    """A built-in reward that compares with a reference column needs that column in the split the
    stage's prompts come from (`loaded`: split -> dataset; a `completion` column reaches reward
    functions as `reference`): unlabelled prompts have no answer to compare with."""
    for i, stage in enumerate(spec.stages):
        split = stage.grpo.prompts or "train"
        if stage.WhichOneof("kind") != "grpo" or loaded.get(split) is None:
            continue
        columns = {"reference" if c == "completion" else c for c in loaded[split].columns}
        for j, r in enumerate(stage.grpo.rewards):
            column = reference_column(r.name, dict(r.args))
            if column is None:
                continue
            v.check(
                column in columns,
                f"stages[{i}].grpo.rewards[{j}].args['column']",
                f"the {split} data has no column {column!r} for {r.name} (it has {', '.join(sorted(columns))})"
                + (": a reward on unlabelled prompts must judge without a gold answer" if split != "train" else ""),
            )


def _tokenizer_digest(path: str) -> str | None:
    """sha256 of a model directory's tokenizer.json, or None when it cannot be read here."""
    try:
        return hashlib.sha256(paths.read_bytes(Path(path) / "tokenizer.json")).hexdigest()
    except OSError:
        return None


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


MAX_HEADER = 100 * 2**20  # safetensors caps its JSON header at 100 MB


def model_modules(path: str) -> set[str] | None:
    """Names of the modules holding weights in a safetensors checkpoint (e.g. q_proj, lm_head),
    read from the files' JSON headers without loading a tensor. None when they cannot be read."""
    root = Path(path)
    files = sorted(root.glob("*.safetensors")) if root.is_dir() else []
    names: set[str] = set()
    for f in files:
        try:
            with paths.open_regular(f) as fh:
                size = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(min(size, MAX_HEADER)))
        except (OSError, ValueError, RecursionError):
            return None
        if not isinstance(header, dict):
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
            ref.path = str(confine(ref.path, f"data.{name}.path", policy))
            fmt, version = datasets.ref_format(ref), _version(ref.path)
            found = _read_once("corpus", ref.path, fmt, datasets.Columns(), version, policy.excluded)
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
        roots = policy.data_roots + policy.model_roots
        model = confine(r.embedding_model, "retrieval.embedding_model", policy, roots)
        if model.is_dir():
            check_tree(model, "retrieval.embedding_model", policy, roots, v)
        v.check(
            paths.is_regular(model / "modules.json"),
            "retrieval.embedding_model",
            f"{model} is not a sentence-transformers model directory (no modules.json)",
        )
        r.embedding_model = str(model)


TRACKERS = ("tensorboard", "mlflow", "none")


def check_tracking(t: pb.TrackingSpec, policy: Policy, v: Violations) -> None:
    """report_to names known trackers ("none" alone); MLflow settings only with mlflow; a file:
    tracking URI inside the server's data roots, or an http(s) server the operator allows."""
    for i, name in enumerate(t.report_to):
        v.check(name in TRACKERS, f"tracking.report_to[{i}]", f"{name!r} is not one of {', '.join(TRACKERS)}")
    v.check("none" not in t.report_to or len(t.report_to) == 1, "tracking.report_to", "'none' goes alone: no tracker")
    uri = t.mlflow_tracking_uri
    for field in ("mlflow_tracking_uri", "mlflow_experiment"):
        if getattr(t, field):
            v.check("mlflow" in t.report_to, f"tracking.{field}", "report_to does not include mlflow")
    if uri.startswith("file:"):
        where = uri.removeprefix("file:").removeprefix("//")
        t.mlflow_tracking_uri = f"file:{confine(where, 'tracking.mlflow_tracking_uri', policy, must_exist=False)}"
    elif uri.startswith(("http://", "https://")):
        _check_mlflow_host(uri, policy.mlflow_hosts)
    elif uri:
        v.check(False, "tracking.mlflow_tracking_uri", f"{uri!r}: an http(s):// tracking server or a file: store")


# A host (name, IPv4, or [IPv6]) and an optional port, nothing else: no user info, no backslash,
# nothing two URL parsers could read as different hosts.
NETLOC = re.compile(r"^([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?$")


def _host_port(uri: str) -> tuple[str, int | None] | None:
    """(host, port) an http(s) URL reaches, lower case, the scheme's port when none is given;
    None for anything but a plain host and port."""
    try:
        parsed = urlsplit(uri)
        if not uri.isprintable() or " " in uri or not NETLOC.match(parsed.netloc):
            return None
        return (parsed.hostname or "", parsed.port or {"http": 80, "https": 443}.get(parsed.scheme))
    except ValueError:  # a port out of range, a broken [IPv6]
        return None


def _check_mlflow_host(uri: str, allowed: tuple[str, ...]) -> None:
    """An http(s) tracking URI reaches only the hosts the operator allows (`serve --mlflow-uri-allow`,
    host or host:port): a job would otherwise send requests wherever a tenant points it."""
    found = _host_port(uri)
    for entry in allowed:
        m = NETLOC.match(entry)
        host, port = (m.group(1).strip("[]").lower(), m.group(2)) if m else (None, None)
        if found and found[0] == host and (not port or int(port[1:]) == found[1]):
            return
    shown = ", ".join(allowed) if allowed else "none (the operator allows one with stillroom serve --mlflow-uri-allow)"
    raise PermissionDenied(
        f"tracking.mlflow_tracking_uri: {uri[: paths.SHOWN]!r} is not an MLflow server this server allows; "
        f"allowed hosts: {shown}"
    )
