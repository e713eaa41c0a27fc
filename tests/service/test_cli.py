"""The `stillroom` CLI against a real server: exit codes, machine output, errors with field paths, TLS."""

from __future__ import annotations

import datetime
import json
import os
import subprocess

import pytest
import yaml
from stillroom.v1 import job_pb2 as pb

from tests.conftest import BIN, TOKENS, audit_spec
from tests.service.helpers import code, slow_spec, wait_for

pytestmark = pytest.mark.slow


def cli(server, *args: str, token: str = TOKENS["alice"]) -> subprocess.CompletedProcess:
    env = {**os.environ, "STILLROOM_ADDRESS": server.address, "STILLROOM_TOKEN": token}
    return subprocess.run([str(BIN / "stillroom"), *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture
def recipe(data_root):
    path = data_root / "recipe.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "display_name": "cli",
                "data": {"train": {"path": "train.jsonl"}, "eval": {"path": "eval.jsonl"}},
                "stages": [{"audit": {"warn_only": True}}],
                "labels": {"team": "search"},
            }
        )
    )
    return path


def test_submit_wait_get_list_events_artifacts(start_server, data_root, recipe):
    server = start_server(data_root)
    r = cli(server, "submit", str(recipe), "--wait", "--request-id", "cli-1")
    assert r.returncode == 0, r.stderr
    assert "job SUCCEEDED" in r.stdout and "audit" in r.stdout
    assert " audit  2/2 splits  " in r.stdout  # the stage's live line: done/total, rate
    job_id = r.stdout.split()[1]
    assert json.loads(cli(server, "get", job_id, "-o", "json").stdout)["state"] == "JOB_STATE_SUCCEEDED"
    listed = yaml.safe_load(cli(server, "list", "-l", "team=search", "-o", "yaml").stdout)
    assert [j["id"] for j in listed] == [job_id]
    events = json.loads(cli(server, "events", job_id, "--after", "1", "-o", "json").stdout)
    assert events[0]["seq"] == "2"  # int64 is a string in the JSON mapping
    arts = json.loads(cli(server, "artifacts", job_id, "-o", "json").stdout)
    names = {a["name"] for a in arts}
    assert {"audit/report.json", "audit/report.md", "report/report.md"} <= names  # the stage's, the job's
    assert all(n.startswith(("audit/", "report/", "tensorboard/audit/")) for n in names), names
    shown = cli(server, "report", job_id).stdout
    assert shown.startswith("# ") and "| audit | SUCCEEDED |" in shown and "| violations | 0 |" in shown
    again = cli(server, "submit", str(recipe), "--request-id", "cli-1")
    assert again.returncode == 0 and again.stdout.strip() == f"already submitted {job_id}"


def test_failure_and_cancel_exit_codes(start_server, data_root, recipe):
    server = start_server(data_root)
    failed = cli(
        server,
        "submit",
        str(recipe),
        "--set",
        "stages[0].audit.warn_only=false",
        "--set",
        "stages[0].audit.min_rows=1000",
        "--wait",
    )
    assert failed.returncode == 1
    assert "error    [audit] data audit failed: train has 20 rows, fewer than min_rows 1000" in failed.stdout
    c = server.client()
    job = c.submit(slow_spec(data_root, stages=2)).job
    c.cancel(job.id)
    assert cli(server, "watch", job.id).returncode == 3


def test_errors_are_clear_and_non_zero(start_server, data_root, recipe):
    server = start_server(data_root)
    bad = cli(server, "validate", str(recipe), "--set", "stages[1].grpo.group_size=1")
    assert bad.returncode == 1
    assert "INVALID_ARGUMENT" in bad.stderr and "stages[1].grpo.group_size: must be >= 2" in bad.stderr
    assert cli(server, "validate", str(recipe)).stdout.strip() == "valid"
    unauth = cli(server, "list", token="nope")
    assert unauth.returncode == 1 and "UNAUTHENTICATED" in unauth.stderr and "nope" not in unauth.stderr
    missing = cli(server, "get", "job-nothere")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
    typo = cli(server, "submit", str(recipe), "--set", "stages[0].audit.min_rowz=3")
    assert typo.returncode == 1 and "min_rowz" in typo.stderr
    assert "tok-" not in (data_root.parent / "home" / "server.log").read_text()  # tokens are never logged


def test_concurrency_limit_runs_one_at_a_time_in_order(start_server, data_root):
    c = start_server(data_root, "--max-running-jobs", "1").client()
    jobs = [c.submit(audit_spec(data_root)).job.id for _ in range(3)]
    done = [c.wait(j) for j in jobs]
    assert all(j.state == pb.JOB_STATE_SUCCEEDED for j in done)
    for earlier, later in zip(done, done[1:], strict=False):
        assert later.start_time.ToNanoseconds() >= earlier.end_time.ToNanoseconds()


def _self_signed(tmp_path):
    crypto = pytest.importorskip("cryptography")
    del crypto
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return tmp_path / "cert.pem", tmp_path / "key.pem"


def test_tls(start_server, data_root, tmp_path):
    from stillroom.services.client import Client

    cert, key = _self_signed(tmp_path)
    server = start_server(data_root, "--tls-cert", str(cert), "--tls-key", str(key))
    secure = Client(server.address, token=TOKENS["alice"], tls_ca=cert)
    assert list(secure.list()) == []
    plain = Client(server.address, token=TOKENS["alice"], timeout_s=5)
    assert code(lambda: list(plain.list())).name == "UNAVAILABLE"


def test_resume_makes_a_job_that_reuses_the_finished_stages(start_server, data_root, recipe):
    """`stillroom resume JOB` submits JOB's own spec with resume_from: the audit that finished is
    not run again, and the new job succeeds."""
    server = start_server(data_root)
    first = cli(server, "submit", str(recipe), "--wait").stdout.split()[1]
    r = cli(server, "resume", first, "--wait")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("submitted job-") and f"(resuming {first})" in r.stdout
    second = r.stdout.split()[1]
    job = json.loads(cli(server, "get", second, "-o", "json").stdout)
    assert job["spec"]["resume_from"] == first and job["state"] == "JOB_STATE_SUCCEEDED"
    events = json.loads(cli(server, "events", second, "-o", "json").stdout)
    assert any("skipped" in e.get("message", "") for e in events)
    assert not [e for e in events if e.get("type") == "EVENT_TYPE_STAGE_STATE" and e.get("stage") == "audit"]
    gone = cli(server, "resume", "job-nothere")
    assert gone.returncode != 0 and "NOT_FOUND" in gone.stderr


def test_dry_run_prints_the_exact_submit_request(recipe, tmp_path):
    """What `submit --dry-run -o json` prints is a SubmitJobRequest any gRPC client can send as is."""
    from google.protobuf.json_format import Parse
    from stillroom.services.recipes import load
    from stillroom.v1 import job_service_pb2 as api

    env = {**os.environ, "STILLROOM_ADDRESS": "127.0.0.1:9"}  # nothing listens: nothing is sent
    args = [
        "submit",
        str(recipe),
        "--dry-run",
        "-o",
        "json",
        "--request-id",
        "r-1",
        "--set",
        "stages[0].audit.min_rows=3",
    ]
    r = subprocess.run([str(BIN / "stillroom"), *args], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    request = Parse(r.stdout, api.SubmitJobRequest())
    spec, labels = load(recipe, ["stages[0].audit.min_rows=3"])
    assert request.spec == spec and dict(request.labels) == labels == {"team": "search"}
    assert request.request_id == "r-1"


def test_watch_says_it_reconnects_and_gives_up_with_where_to_resume(start_server, data_root):
    server = start_server(data_root)
    c = server.client()
    job = c.submit(slow_spec(data_root, stages=6)).job
    env = {**os.environ, "STILLROOM_ADDRESS": server.address, "STILLROOM_TOKEN": TOKENS["alice"]}
    watch = subprocess.Popen(
        [str(BIN / "stillroom"), "watch", job.id, "--reconnect-timeout", "4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    wait_for(lambda: c.get(job.id).last_event_seq >= 3, 60)
    running = c.get(job.id)  # where to see it: the cluster's dashboard, and the job's actors there
    assert running.dashboard_url.startswith("http://") and list(running.actors) == [f"{job.id}:supervisor:0"]
    shown = cli(server, "get", job.id).stdout
    assert f"ray      {running.dashboard_url}" in shown and f"actor    {job.id}:supervisor:0" in shown
    server.kill9()
    out, err = watch.communicate(timeout=60)
    assert watch.returncode == 4, err
    assert f"stillroom: lost the connection to {server.address}" in err
    assert "reconnecting to" in err and "(attempt 1," in err
    assert f"gave up watching {job.id}" in err and f"stillroom watch {job.id} --after " in err
    last = int(err.split("--after ")[1].split("`")[0])
    assert out.strip().splitlines()[-1].startswith(f"[{last:>4}]")  # the last event it printed
