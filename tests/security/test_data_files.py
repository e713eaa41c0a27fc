"""Hostile data files, through a real `stillroom serve` and real channels: a FIFO named as data (or
as a model's weights) is refused at once and holds no server thread, even 20 at a time; a JSONL
row nested 200,000 arrays deep and a row of invalid UTF-8 are refused naming the file and the row;
a Parquet file of invalid UTF-8 is refused naming the file. Each answer carries the field path,
and health and another tenant's calls still answer afterwards.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from stillroom.services.client import Client

from tests.conftest import TOKENS, audit_spec, write_jsonl
from tests.security.test_paths import field_violations, refused, still_answers

pytestmark = pytest.mark.slow
C = grpc.StatusCode
NOT_REGULAR = "not a regular file (a FIFO, device or socket is never read)"


@pytest.fixture
def server(start_server, data_root):
    return start_server(data_root, "--max-running-jobs", "0")


def test_a_fifo_is_refused_at_once_and_holds_no_thread(server, data_root):
    fifo = data_root / "fifo.jsonl"
    os.mkfifo(fifo)
    # a short deadline: a server that opened the FIFO would wait for a writer forever
    alice = Client(server.address, token=TOKENS["alice"], timeout_s=5)
    spec = audit_spec(data_root)
    spec.data.train.path = str(fifo)
    t = time.monotonic()
    e = refused(alice.submit, spec)
    assert time.monotonic() - t < 1
    assert e.code() == C.INVALID_ARGUMENT
    assert field_violations(e) == {"data.train.path": f"{fifo}: {NOT_REGULAR}"}
    with ThreadPoolExecutor(20) as pool:
        errors = list(pool.map(lambda _: refused(alice.submit, spec), range(20)))
    assert [x.code() for x in errors] == [C.INVALID_ARGUMENT] * 20
    still_answers(server)
    # a FIFO as a model's weights or tokenizer: the control plane hashes and reads their headers
    model = data_root / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    os.mkfifo(model / "model.safetensors")
    os.mkfifo(model / "tokenizer.json")
    spec = audit_spec(data_root)
    spec.teacher.path = str(model)
    spec.student.path = str(model)
    e = refused(alice.submit, spec)
    assert e.code() == C.INVALID_ARGUMENT
    assert f"teacher.path: {model / 'model.safetensors'}: {NOT_REGULAR}" in e.details()
    assert f"student.path: {model / 'tokenizer.json'}: {NOT_REGULAR}" in e.details()
    still_answers(server)


def test_a_row_nested_200000_deep_is_refused_with_its_row(server, data_root):
    path = data_root / "deep.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": ' + "[" * 200_000 + "]" * 200_000 + "}\n")
    spec = audit_spec(data_root)
    spec.data.train.path = str(path)
    e = refused(server.client("alice").submit, spec)
    assert e.code() == C.INVALID_ARGUMENT
    assert field_violations(e) == {"data.train.path": f"{path}, row 3: JSON nested too deeply to read"}
    still_answers(server)


def test_invalid_utf8_is_refused_with_its_row(server, data_root):
    path = write_jsonl(data_root / "latin1.jsonl", [{"prompt": f"question {i}"} for i in range(4)])
    with path.open("ab") as f:
        f.write('{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    spec = audit_spec(data_root)
    spec.data.train.path = str(path)
    e = refused(server.client("alice").submit, spec)
    assert e.code() == C.INVALID_ARGUMENT
    assert field_violations(e)["data.train.path"] == (
        f"{path}, row 5: not UTF-8 text: invalid continuation byte at byte 16"
    )
    # a Parquet string column of invalid UTF-8 names its file (it answered INTERNAL)
    raw = pa.Array.from_buffers(pa.string(), 1, [None, pa.py_buffer(b"\0\0\0\0\2\0\0\0"), pa.py_buffer(b"\xff\xfe")])
    pq.write_table(pa.table({"prompt": raw}), data_root / "bad.parquet")
    spec.data.train.path = str(data_root / "bad.parquet")
    e = refused(server.client("alice").submit, spec)
    assert e.code() == C.INVALID_ARGUMENT
    assert field_violations(e)["data.train.path"].startswith(f"{data_root / 'bad.parquet'}: not a readable Parquet")
    still_answers(server)
