"""The export stage reloads every artifact it writes and measures how many held-out prompts decode
greedily as with the in-memory model; a float32 artifact below 1.0 fails the stage."""

from __future__ import annotations

import threading

import pytest
from stillroom.actors.runtime.context import EventLog, StageContext, StageFailed
from stillroom.actors.stages import export
from stillroom.v1 import job_pb2 as pb

from tests.conftest import write_jsonl


def _run(tmp_path, tiny_model, dtype: str) -> dict[str, float]:
    log = EventLog()
    ctx = StageContext("job-x", "export", tmp_path / "job-x", log, threading.Event(), kind="export")
    ctx.outputs["student_model"] = str(tiny_model)
    held = write_jsonl(tmp_path / "test.jsonl", [{"prompt": f"ticket {i} about billing"} for i in range(12)])
    spec = pb.JobSpec(data=pb.DataSpec(test=pb.DatasetRef(path=str(held))))
    export.run(pb.ExportStage(dtype=dtype), spec, ctx)
    metrics: dict[str, float] = {}
    for raw in log.since(0)[0]:
        metrics.update(pb.Event.FromString(raw).metrics)
    return metrics


def test_a_float32_export_reloads_and_decodes_like_the_model(tmp_path, tiny_model):
    metrics = _run(tmp_path, tiny_model, "float32")
    assert metrics["export/model/greedy_match"] == 1.0 == metrics["export/greedy_match"]
    assert (tmp_path / "job-x/export/model/model.safetensors").exists()
    assert metrics["export/bytes"] > 0


def test_a_bfloat16_export_is_measured_not_required_to_match(tmp_path, tiny_model):
    metrics = _run(tmp_path, tiny_model, "bfloat16")
    assert 0.0 <= metrics["export/model/greedy_match"] <= 1.0  # measured on 8 held-out prompts


def test_an_exact_artifact_below_one_fails_the_stage_and_says_which():
    ctx = StageContext("job-x", "export", None, EventLog(), threading.Event())
    with pytest.raises(StageFailed, match="merged matches 75% of held-out prompts greedily"):
        export.report(ctx, {"adapter": 1.0, "merged": 0.75}, "float32")
    export.report(ctx, {"merged": 0.75}, "bfloat16")  # rounding may flip a greedy choice: reported only
    with pytest.raises(StageFailed, match="adapter matches 50%"):
        export.report(ctx, {"adapter": 0.5, "merged": 1.0}, "bfloat16")  # an adapter is always float32
    assert export.match_fraction([[1, 2], [3]], [[1, 2], [4]]) == 0.5
