"""The quick variant of the main job (examples/tickets_quick.yaml, what `make demo QUICK=1` runs), end
to end through the gRPC API on real Ray with SmolLM2-135M: every stage succeeds, every artifact
is intact and loads, and the report has its plots and an evaluation row for every model."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
from stillroom.services.recipes import load
from stillroom.v1 import job_pb2 as pb

from examples.tickets.generate import main as generate_tickets
from tests.conftest import BIN, TOKENS

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
# the rungs the recipe asks for (evaluate.rungs), in the order the evaluate stage scores them
MODELS = [
    "base_teacher+rag",
    "teacher_sft_plain",
    "teacher_sft+rag",
    "teacher_grpo+rag",
    "student+rag",
    "student_baseline+rag",
]


def _loads(path: Path, kind: str) -> None:
    """Open the file the way its user would."""
    if path.suffix == ".json":
        json.loads(path.read_text())
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        assert pq.read_table(path).num_rows > 0
    elif path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            assert len(list(f.keys())) > 0
    elif path.suffix == ".png":
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    elif path.name.startswith("events.out.tfevents"):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(path))
        acc.Reload()
        assert acc.Tags()["scalars"], path


# ~5 min where the CPU multiplies bfloat16 natively, ~9 min in float32 on one that does not
@pytest.mark.timeout(1500)
def test_quick_demo_job_end_to_end(start_server, tmp_path, monkeypatch):
    data = tmp_path / "repo"
    generate_tickets(["--out", str(data / "examples/tickets/data")])
    # as examples/demo.sh serves it: the grpo stage's verifier (examples/tickets/reward.py) is
    # allowed and imports from this checkout, in the server and in the job's actors
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    runtime_env = tmp_path / "runtime_env.yaml"
    runtime_env.write_text(json.dumps({"env_vars": {"PYTHONPATH": str(REPO)}}))
    server = start_server(data, "--reward-module", "examples", "--runtime-env", str(runtime_env))
    c = server.client()
    spec, labels = load(REPO / "examples/tickets_quick.yaml")
    job = c.submit(spec, labels=labels).job
    done = c.wait(job.id)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error.reason
    assert [s.state for s in done.stages] == [pb.STAGE_STATE_SUCCEEDED] * len(spec.stages)

    artifacts = c.artifacts(job.id)
    for a in artifacts:
        path = Path(urlparse(a.uri).path)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == a.sha256, a.name
        _loads(path, a.kind)
    names = {a.name for a in artifacts}
    assert {"report/report.md", "report/plots/sft.png", "report/plots/distill.png", "index/info.json"} <= names
    # the grpo stage's adapter (its one quick step may have no group with signal: then no plot)
    assert "grpo/adapter/adapter_config.json" in names
    assert any(n.startswith("tensorboard/distill/events.out.tfevents") for n in names)

    from transformers import AutoModelForCausalLM

    for model in ("distill/student", "distill/student-baseline", "export/model"):
        assert AutoModelForCausalLM.from_pretrained(Path(server.home, "artifacts", job.id, model)).num_parameters() > 0

    evaluation = json.loads(Path(server.home, "artifacts", job.id, "evaluate/report.json").read_text())
    assert list(evaluation) == MODELS
    for model, row in evaluation.items():
        assert {"json_exact", "json_fields", "json_valid", "tokens_per_s", "parameters", "size_bytes"} <= set(row)
        assert {"json_exact@update", "json_fields@update", "json_valid@update"} <= set(row)  # the policy update
        assert row["tokens_per_s"] > 0 and row["parameters"] > 0, model
    assert evaluation["student+rag"]["parameters"] < 0.6 * evaluation["base_teacher+rag"]["parameters"]
    # the fine-tuned-only baseline is priced by its own stage alone: the teacher did not start from it;
    # a +rag rung adds the index stage
    took = {st.name: st.end_time.ToNanoseconds() / 1e9 - st.start_time.ToNanoseconds() / 1e9 for st in done.stages}
    assert evaluation["teacher_sft_plain"]["build_s"] == pytest.approx(took["sft_plain"], abs=0.5)
    assert evaluation["teacher_sft+rag"]["build_s"] == pytest.approx(took["sft"] + took["index"], abs=0.5)

    env = {**os.environ, "STILLROOM_ADDRESS": server.address, "STILLROOM_TOKEN": TOKENS["alice"]}
    shown = subprocess.run(
        [str(BIN / "stillroom"), "report", job.id], env=env, capture_output=True, text=True, check=True
    ).stdout
    for model in MODELS:
        assert f"| {model} |" in shown
