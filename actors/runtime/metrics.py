"""Custom Ray metrics, tagged with job id, role and rank (replicas of a role are separate series):
they appear in the Ray dashboard's metrics (Prometheus) next to Ray's own. Outside a Ray worker
they are not recorded (and Ray is not imported: the role classes also run without it, as
bench/gpu_check.py runs them). Queue depths are sampled on a timer (Sampler), not only when someone waits.
The metrics events themselves go to TensorBoard and MLflow as they happen (runtime/tracking.py)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

_GAUGES: dict[str, object] = {}


def record(name: str, value: float, tags: dict[str, str]) -> None:
    """Set gauge `stillroom_<name>` for these tags (tags_of an actor, or job_id and queue)."""
    ray = sys.modules.get("ray")  # a process that never imported Ray is not a Ray worker
    if ray is None or not ray.is_initialized():
        return
    gauge = _GAUGES.get(name)
    if gauge is None:
        from ray.util.metrics import Gauge

        gauge = _GAUGES[name] = Gauge(f"stillroom_{name}", description=name.replace("_", " "), tag_keys=tuple(tags))
    gauge.set(float(value), tags=tags)


def tags_of(name: str) -> dict[str, str]:
    """{"job_id": "job-x", "role": "trainer", "rank": "1"} from an actor name "job-x:trainer:1"."""
    job_id, _, rest = name.partition(":")
    role, _, rank = rest.partition(":")
    return {"job_id": job_id, "role": role, "rank": rank or "0"}


class Sampler:
    """Calls sample() every `interval` seconds on a daemon thread until stop(): a gauge that is
    read between events (a queue's depth) stays current while nobody waits on it."""

    def __init__(self, interval: float, sample: Callable[[], None]):
        self.interval, self.sample = interval, sample
        self._stop = threading.Event()
        self.samples = 0
        self._thread = threading.Thread(target=self._run, daemon=True, name="metrics-sampler")

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
                self.samples += 1
            except Exception:  # noqa: BLE001 - a queue actor gone at the end of a stage is not an error
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 1)
