"""Custom Ray metrics, tagged with job id and role: they appear in the Ray dashboard's metrics
(Prometheus) next to Ray's own. Outside a Ray worker they are not recorded."""

from __future__ import annotations

import ray
from ray.util.metrics import Gauge

_GAUGES: dict[str, object] = {}


def record(name: str, value: float, job_id: str, role: str) -> None:
    """Set gauge `stillroom_<name>` for (job_id, role), e.g. tokens_generated_per_s."""
    if not ray.is_initialized():
        return
    gauge = _GAUGES.get(name)
    if gauge is None:
        gauge = _GAUGES[name] = Gauge(
            f"stillroom_{name}", description=name.replace("_", " "), tag_keys=("job_id", "role")
        )
    gauge.set(float(value), tags={"job_id": job_id, "role": role})


def role_of(name: str) -> tuple[str, str]:
    """("job-x", "generator") from an actor name "job-x:generator:0"."""
    job_id, _, rest = name.partition(":")
    return job_id, rest.partition(":")[0]


def write_tensorboard(series: dict[str, dict[str, list[tuple[float, float]]]], root) -> None:
    """TensorBoard event files, one run per stage (root/<stage>/), from report.series(events):
    `tensorboard --logdir <artifacts>/<job>/tensorboard` needs no network and no account."""
    # imported here: the supervisor imports this module, and the control plane imports the supervisor
    from torch.utils.tensorboard import SummaryWriter

    for stage, metrics in series.items():
        writer = SummaryWriter(log_dir=str(root / stage))
        for name, points in metrics.items():
            for step, value in points:
                writer.add_scalar(name, value, int(step))
        writer.close()
