"""Read training data in the formats TRL users already have, and tell exactly what is wrong with it.

Formats: JSONL, Parquet, Arrow (IPC file or stream) and `datasets` save_to_disk directories.
Row shapes: prompt/completion, chat `messages`, and prompt-only with reference columns.
Imports only pyarrow and the API messages, so the control plane validates data with the same code the
stages read it with. Every file is opened through paths.open_regular (a FIFO or device is refused,
never opened), and a `datasets` directory's state.json may name only files in that directory.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
from stillroom.actors.common import paths
from stillroom.v1 import job_pb2 as pb

FORMATS = ("jsonl", "parquet", "arrow", "hf_disk")
ROLES = {"system", "user", "assistant", "tool"}


class DataError(ValueError):
    """A problem with a data file; `row` is 1-based (a line number for JSONL), or None."""

    def __init__(self, file: str | Path, problem: str, row: int | None = None):
        self.file, self.problem, self.row = str(file), problem, row
        where = f"{self.file}, row {row}" if row is not None else self.file
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class Columns:
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"


@dataclass(frozen=True)
class Example:
    """One row: what the model is asked and, where labelled, the answer. A conversational row
    keeps its prompt's messages with their roles (system prompt, earlier turns): the chat template
    renders those; `prompt` is their text, for rewards and the audit."""

    prompt: str
    completion: str | None
    references: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, str]] | None = None  # the prompt's turns, when the row is conversational

    def prompt_row(self) -> dict[str, Any]:
        """The row to generate from: prompt (text), messages (JSON, when conversational), the answer
        as `reference` (the generated text takes the name `completion`), and the other columns."""
        row: dict[str, Any] = {"prompt": self.prompt, **self.references}
        if self.messages is not None:
            row["messages"] = json.dumps(self.messages)
        if self.completion is not None:
            row["reference"] = self.completion
        return row


@dataclass(frozen=True)
class Dataset:
    path: str
    format: str
    shape: str  # prompt_completion | messages | prompt_only
    columns: list[str]
    rows: list[dict[str, Any]]
    cols: Columns = Columns()  # the columns the DatasetRef named

    def examples(self) -> list[Example]:
        return [to_example(r, self.shape, self.cols) for r in self.rows]

    def prompts(self) -> list[dict[str, Any]]:
        """Rows to generate from (Example.prompt_row), whatever the dataset's shape."""
        return [ex.prompt_row() for ex in self.examples()]


def detect_format(path: Path) -> str:
    if path.is_dir():
        return "hf_disk"
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".arrow", ".feather", ".ipc"):
        return "arrow"
    raise DataError(path, f"cannot tell the format from the name; set format to one of {', '.join(FORMATS)}")


def load(path: str | Path, fmt: str = "", cols: Columns = Columns(), excluded: Iterable[Path] = ()) -> Dataset:
    """Read a dataset and check its shape row by row. Raises DataError naming file and row.
    `excluded`: directories (the server's own) that a `datasets` directory's files may not be in."""
    path = Path(path)
    fmt, rows = read_rows(path, fmt, excluded)
    columns = sorted({k for r in rows for k in r})
    shape = detect_shape(path, columns, cols)
    for i, row in enumerate(rows, start=1):
        problem = row_problem(row, shape, cols)
        if problem:
            raise DataError(path, problem, row=i)
    return Dataset(str(path), fmt, shape, columns, rows, cols)


def read_rows(path: str | Path, fmt: str = "", excluded: Iterable[Path] = ()) -> tuple[str, list[dict[str, Any]]]:
    """(format, rows) of a file or `datasets` directory, whatever its columns."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "no such file or directory")
    fmt = fmt or detect_format(path)
    readers = {"jsonl": _read_jsonl, "parquet": _read_parquet, "arrow": _read_arrow}
    if fmt == "hf_disk":
        return fmt, _read_hf_disk(path, tuple(excluded))
    if fmt not in readers:
        raise DataError(path, f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    return fmt, readers[fmt](path)


def _open(path: Path):
    """The file opened for reading through paths.open_regular; DataError if it cannot be."""
    try:
        return paths.open_regular(path)
    except paths.NotRegularFile:
        raise DataError(path, "not a regular file (a FIFO, device or socket is never read)") from None
    except OSError as e:
        raise DataError(path, f"cannot be read: {e.strerror or e}") from None


def ref_format(ref) -> str:
    """The format a stillroom.v1.DatasetRef names ("" when it leaves it to the file name)."""
    fmt = pb.DatasetFormat.Name(ref.format).removeprefix("DATASET_FORMAT_").lower()
    return "" if fmt == "unspecified" else fmt


def detect_shape(path: Path, columns: list[str], cols: Columns) -> str:
    if cols.messages in columns:
        return "messages"
    if cols.prompt in columns and cols.completion in columns:
        return "prompt_completion"
    if cols.prompt in columns:
        return "prompt_only"
    raise DataError(path, f"no {cols.prompt!r} or {cols.messages!r} column; the columns are {columns or 'none'}")


def row_problem(row: dict[str, Any], shape: str, cols: Columns) -> str | None:
    """What is wrong with one row's types, or None. Empty values are the audit's business."""
    if shape == "messages":
        return _messages_problem(row.get(cols.messages), cols.messages)
    for name in (cols.prompt, cols.completion) if shape == "prompt_completion" else (cols.prompt,):
        value = row.get(name)
        if value is None or isinstance(value, str):
            continue
        if isinstance(value, list):  # conversational prompt/completion, as TRL allows
            problem = _messages_problem(value, name)
            if problem:
                return problem
            continue
        return f"{name!r} must be a string or a list of messages, not {type(value).__name__}"
    return None


def _messages_problem(messages: Any, name: str) -> str | None:
    if messages is None:
        return None
    if not isinstance(messages, list):
        return f"{name!r} must be a list of {{role, content}} objects, not {type(messages).__name__}"
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"{name}[{j}] must be an object with 'role' and 'content'"
        if m["role"] not in ROLES:
            return f"{name}[{j}].role {m['role']!r} is not one of {sorted(ROLES)}"
        if m["content"] is not None and not isinstance(m["content"], str):
            return f"{name}[{j}].content must be a string"
    return None


def to_example(row: dict[str, Any], shape: str, cols: Columns = Columns()) -> Example:
    """A row as prompt, completion and the other columns (references). Chat `messages` (TRL's
    conversational format): the last assistant turn is the completion, every turn before it (with
    its role) the prompt; a prompt column that is a list of messages is conversational too."""
    if shape == "messages":
        msgs = row.get(cols.messages) or []
        last_is_answer = bool(msgs) and msgs[-1].get("role") == "assistant"
        turns = _turns(msgs[:-1] if last_is_answer else msgs)
        completion = (msgs[-1].get("content") or "") if last_is_answer else None
        refs = {k: v for k, v in row.items() if k != cols.messages}
        return Example(_text(turns), completion, refs, turns)
    completion = _text(row.get(cols.completion)) if shape == "prompt_completion" else None
    refs = {k: v for k, v in row.items() if k not in (cols.prompt, cols.completion)}
    prompt = row.get(cols.prompt)
    return Example(_text(prompt), completion, refs, _turns(prompt) if isinstance(prompt, list) else None)


def decode_turns(messages: str | None) -> list[dict[str, str]] | None:
    """The turns a prompt row's `messages` column holds (JSON, as Example.prompt_row writes it)."""
    return json.loads(messages) if messages else None


def _turns(messages: list) -> list[dict[str, str]]:
    """{role, content} of each message (other keys dropped: the chat template needs only these)."""
    return [{"role": m.get("role") or "user", "content": m.get("content") or ""} for m in messages]


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return "\n".join((m.get("content") or "") for m in value if isinstance(m, dict))
    return str(value)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with _open(path) as f:
        # Lines are split as bytes and decoded one by one, so a bad byte is reported with its row.
        for n, raw in enumerate(f, start=1):
            row = _json_row(path, raw, n)
            if row is not None:
                rows.append(row)
    return rows


def _json_row(path: Path, raw: bytes, n: int) -> dict[str, Any] | None:
    """One JSONL line as an object (None for a blank line); DataError naming the row."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, f"not UTF-8 text: {e.reason} at byte {e.start + 1}", row=n) from None
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(path, f"invalid JSON: {e.msg} at column {e.colno}", row=n) from None
    except RecursionError:  # the parser recurses once per nesting level
        raise DataError(path, "JSON nested too deeply to read", row=n) from None
    if not isinstance(row, dict):
        raise DataError(path, f"expected a JSON object, got {type(row).__name__}", row=n)
    return row


# What reading a table and turning it into rows can raise on a malformed or hostile file.
TABLE_ERRORS = (pa.ArrowException, OSError, ValueError, RecursionError)


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    with _open(path) as f:
        try:
            return pq.read_table(f).to_pylist()
        except TABLE_ERRORS as e:
            raise DataError(path, f"not a readable Parquet file: {e}") from None


def _read_arrow(path: Path) -> list[dict[str, Any]]:
    with _open(path) as f:
        data = f.read()
    for opener in (ipc.open_file, ipc.open_stream):
        try:
            return opener(pa.BufferReader(data)).read_all().to_pylist()
        except TABLE_ERRORS:
            continue
    raise DataError(path, "not a readable Arrow IPC file or stream")


def _read_json_file(path: Path) -> Any:
    with _open(path) as f:
        try:
            return json.load(io.TextIOWrapper(f, encoding="utf-8"))
        except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, or nested too deeply
            raise DataError(path, f"unreadable JSON: {e}") from None


def _read_hf_disk(path: Path, excluded: tuple[Path, ...] = ()) -> list[dict[str, Any]]:
    """A `datasets` save_to_disk directory: state.json lists the Arrow stream files, which must
    all be files of this directory (checked before any is opened)."""
    if (path / "dataset_dict.json").exists():
        splits = _read_json_file(path / "dataset_dict.json")
        splits = [str(s) for s in splits.get("splits", [])] if isinstance(splits, dict) else []
        raise DataError(
            path, f"is a DatasetDict with splits {splits}; name one, e.g. {path / (splits or ['train'])[0]}"
        )
    state_file = path / "state.json"
    if not state_file.exists():
        raise DataError(path, "a directory without state.json is not a `datasets` save_to_disk directory")
    try:
        names = [f["filename"] for f in _read_json_file(state_file)["_data_files"]]
    except (KeyError, TypeError) as e:
        raise DataError(state_file, f"unreadable state.json: {e!r}") from None
    files = [_data_file(path, state_file, name, excluded) for name in names]
    rows: list[dict[str, Any]] = []
    for f in files:
        rows.extend(_read_arrow(f))
    return rows


def _data_file(path: Path, state_file: Path, name: Any, excluded: tuple[Path, ...]) -> Path:
    """A state.json `_data_files` entry as a file of the directory; DataError naming the entry."""
    try:
        if not isinstance(name, str):
            raise paths.PathError("", str(name))
        return paths.entry(path, name, excluded)
    except paths.PathError:
        shown = name if not isinstance(name, str) or len(name) <= paths.SHOWN else name[: paths.SHOWN] + "..."
        raise DataError(
            state_file, f"_data_files entry {shown!r} is not a file of this directory (a plain name, no '..' or link)"
        ) from None


def columns_of(ref) -> Columns:
    """Columns named by a stillroom.v1.DatasetRef, with TRL's defaults."""
    return Columns(
        ref.prompt_column or "prompt", ref.completion_column or "completion", ref.messages_column or "messages"
    )


def load_ref(ref) -> Dataset:
    """Load what a stillroom.v1.DatasetRef names."""
    return load(ref.path, ref_format(ref), columns_of(ref))
