"""Reading the formats TRL users have: JSONL, Parquet, Arrow, `datasets` save_to_disk; the three row shapes."""

from __future__ import annotations

import datasets as hf
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from stillroom.actors.common.datasets import DataError, load, to_example

from tests.conftest import write_jsonl

ROWS = [{"prompt": "p1", "completion": "c1", "label": "x"}, {"prompt": "p2", "completion": "c2", "label": "y"}]


def test_all_formats_read_the_same_rows(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    with pa.OSFile(str(tmp_path / "d.arrow"), "wb") as f, pa.ipc.new_file(f, pa.Table.from_pylist(ROWS).schema) as w:
        w.write_table(pa.Table.from_pylist(ROWS))
    hf.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "hf"))
    for name, fmt in (("d.jsonl", "jsonl"), ("d.parquet", "parquet"), ("d.arrow", "arrow"), ("hf", "hf_disk")):
        ds = load(tmp_path / name)
        assert (ds.format, ds.shape, ds.rows) == (fmt, "prompt_completion", ROWS), name


def test_datasetdict_asks_for_a_split(tmp_path):
    hf.DatasetDict({"train": hf.Dataset.from_list(ROWS), "test": hf.Dataset.from_list(ROWS)}).save_to_disk(
        str(tmp_path / "dd")
    )
    with pytest.raises(DataError, match="is a DatasetDict with splits"):
        load(tmp_path / "dd")
    assert len(load(tmp_path / "dd" / "train").rows) == 2


def test_messages_and_prompt_only_shapes(tmp_path):
    chat = [
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
            ]
        }
    ]
    ds = load(write_jsonl(tmp_path / "chat.jsonl", chat))
    assert ds.shape == "messages"
    ex = ds.examples()[0]
    assert (ex.prompt, ex.completion) == ("be brief\nhi", "hello")
    po = load(write_jsonl(tmp_path / "po.jsonl", [{"prompt": "2+2?", "answer": "4"}]))
    assert po.shape == "prompt_only"
    assert to_example(po.rows[0], po.shape).references == {"answer": "4"}


@pytest.mark.parametrize(
    ("content", "row", "problem"),
    [
        ('{"prompt": "a"}\n[1, 2]\n', 2, "expected a JSON object, got list"),
        ('{"prompt": "a"}\n\n{"prompt": "b"\n', 3, "invalid JSON"),
        ('{"messages": [{"role": "robot", "content": "x"}]}\n', 1, "messages[0].role 'robot' is not one of"),
        ('{"messages": [{"content": "x"}]}\n', 1, "messages[0] must be an object with 'role' and 'content'"),
        ('{"messages": "hello"}\n', 1, "'messages' must be a list of {role, content} objects, not str"),
    ],
)
def test_malformed_rows_are_named(tmp_path, content, row, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as e:
        load(path)
    assert (e.value.file, e.value.row) == (str(path), row)
    assert problem in e.value.problem


def test_unreadable_binary_files(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load(tmp_path / "x.parquet")
    with pytest.raises(DataError, match="cannot tell the format"):
        load(tmp_path / "x.txt")
