"""The one place where role classes become Ray actors, with their names and restart policies.

Names read well in the Ray dashboard: `<job-id>:<role>:<rank>`.
"""

from __future__ import annotations

import ray

from actors.supervisor import Supervisor

NAMESPACE = "stillroom"


def supervisor_name(job_id: str) -> str:
    return f"{job_id}:supervisor:0"


# The supervisor is not restarted by Ray: a restarted one would rerun the job from its first stage.
# Its death fails the job with a reason instead (the control service notices it).
SupervisorActor = ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)(Supervisor)


def launch_supervisor(job_id: str, spec: bytes, artifact_dir: str):
    """Create (or find, after a crash between create and record) the job's detached supervisor."""
    return SupervisorActor.options(
        name=supervisor_name(job_id), namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote(job_id, spec, artifact_dir)
