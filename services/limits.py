"""Per-tenant ceilings the operator sets (`stillroom serve --limits limits.yaml`), enforced at submit
(a spec over a ceiling is INVALID_ARGUMENT naming the field and the limit) and while serving
(running jobs, queued jobs and open watch streams per tenant: RESOURCE_EXHAUSTED naming the limit).

    default:                 # every tenant; any field left out keeps the built-in default below
      max_running_jobs: 2
      max_watch_streams: 16
    tenants:
      team-a: {max_steps: 100000, max_timeout_s: 604800}

Pure: no grpc, no torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass(frozen=True)
class TenantLimits:
    """What one tenant may ask for. 0 in a job spec means "the default", so the ceilings apply to
    the values a stage will actually use."""

    max_running_jobs: int = 2  # a tenant's jobs on the cluster at once (0: paused, its jobs stay queued)
    max_queued_jobs: int = 100  # jobs waiting to start
    max_watch_streams: int = 16  # open WatchJob streams
    max_steps: int = 100_000  # optim.max_steps of any stage
    max_new_tokens: int = 4096  # any stage's max_new_tokens
    max_rollouts_per_step: int = 4096  # grpo group_size x prompts_per_step, distill num_samples x prompts_per_step
    max_timeout_s: float = 7 * 24 * 3600.0  # a job's deadline may not be later than this
    default_timeout_s: float = 24 * 3600.0  # the deadline of a job that sets no timeout_s


@dataclass(frozen=True)
class Limits:
    default: TenantLimits = field(default_factory=TenantLimits)
    tenants: dict[str, TenantLimits] = field(default_factory=dict)

    def of(self, tenant: str) -> TenantLimits:
        return self.tenants.get(tenant, self.default)

    @classmethod
    def load(cls, path: str | Path | None) -> Limits:
        """Read a limits file (None: the built-in defaults). Raises ValueError naming the bad key."""
        if path is None:
            return cls()
        doc = yaml.safe_load(Path(path).read_text()) or {}
        unknown = set(doc) - {"default", "tenants"}
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)} (expected default, tenants)")
        default = _tenant(TenantLimits(), doc.get("default") or {}, f"{path}: default")
        tenants = {
            str(name): _tenant(default, body or {}, f"{path}: tenants.{name}")
            for name, body in (doc.get("tenants") or {}).items()
        }
        return cls(default, tenants)


def _tenant(base: TenantLimits, body: dict, where: str) -> TenantLimits:
    names = {f.name: f.type for f in dataclasses.fields(TenantLimits)}
    changes = {}
    for key, value in body.items():
        if key not in names:
            raise ValueError(f"{where}.{key}: not a limit (one of {', '.join(names)})")
        least = 0 if key == "max_running_jobs" else 1e-9  # 0 running jobs pauses a tenant
        if not isinstance(value, int | float) or isinstance(value, bool) or value < least:
            raise ValueError(f"{where}.{key}: must be a number {'>= 0' if least == 0 else '> 0'}, got {value!r}")
        changes[key] = float(value) if names[key] == "float" else int(value)
    return dataclasses.replace(base, **changes)
