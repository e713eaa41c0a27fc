"""`job://<job id>/<path>`: a model path that names a file of one of the tenant's own earlier jobs,
e.g. its tuned teacher `job://job-1a2b3c/sft/model` or an exported student. The artifact root is
otherwise never readable as a tenant's data (it holds every tenant's models): a job:// reference is
checked against the store (another tenant's job is NOT_FOUND, as everywhere), rewritten to the
absolute path, and only that job's directory is granted to validation (services/violations.Policy).
"""

from __future__ import annotations

from pathlib import Path

from stillroom.services.errors import NotFound
from stillroom.services.store import Store
from stillroom.v1 import job_pb2 as pb

SCHEME = "job://"
MODEL_FIELDS = (("teacher", "path"), ("teacher", "tokenizer_path"), ("student", "path"), ("student", "tokenizer_path"))


def resolve_job_refs(
    spec: pb.JobSpec, tenant: str, store: Store, artifact_root: Path
) -> tuple[pb.JobSpec, tuple[Path, ...]]:
    """(a copy of `spec` with every job:// model path made absolute, the job directories they name)."""
    out, granted = pb.JobSpec(), []
    out.CopyFrom(spec)
    for model, attr in MODEL_FIELDS:
        ref = getattr(out, model)
        value = getattr(ref, attr)
        if not value.startswith(SCHEME):
            continue
        job_id, _, rel = value[len(SCHEME) :].partition("/")
        try:
            store.get_job(job_id, tenant)
        except NotFound:
            raise NotFound(f"{model}.{attr}: job {job_id!r} not found") from None
        job_dir = Path(artifact_root) / job_id
        setattr(ref, attr, str(job_dir / rel))
        granted.append(job_dir)
    return out, tuple(granted)
