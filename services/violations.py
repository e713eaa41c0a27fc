"""What validation collects and enforces: the operator's Policy, and Violations, every problem of
a spec with its field path (all reported at once)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from stillroom.services.limits import TenantLimits


@dataclass(frozen=True)
class Policy:
    """Operator settings that validation enforces."""

    data_roots: tuple[Path, ...] = field(default_factory=lambda: (Path.cwd(),))
    # Model paths may also come from these (e.g. a shared model store); data roots always count.
    model_roots: tuple[Path, ...] = ()
    # Reward functions named by import path run on the cluster: only these modules (and their
    # submodules) may be named.
    reward_modules: tuple[str, ...] = ()
    # The server's own files (home, job store, artifact root): never a tenant's data or model,
    # whatever the roots contain.
    excluded: tuple[Path, ...] = ()
    # The artifact directories of the calling tenant's own jobs that its spec names as job://
    # (services/job_refs.py): readable although the artifact root is excluded.
    granted: tuple[Path, ...] = ()
    # Hosts (host or host:port) a job's MLflow client may be pointed at over http(s).
    mlflow_hosts: tuple[str, ...] = ()
    # The calling tenant's ceilings (the servicer fills them in per call).
    limits: TenantLimits = field(default_factory=TenantLimits)
    # What the cluster can schedule, {resource: total} (e.g. CPU, GPU, custom); empty: unknown.
    capacity: dict[str, float] = field(default_factory=dict)


class Violations:
    def __init__(self, policy: Policy = Policy()) -> None:
        self.items: list[tuple[str, str]] = []
        self.policy = policy

    def check(self, ok: bool, path: str, message: str) -> None:
        if not ok:
            self.items.append((path, message))

    def number(
        self, value: float, path: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False
    ) -> None:
        """value == 0 means 'use the default' in proto3, so only set values are range-checked."""
        if value == 0:
            return
        if not math.isfinite(value):
            self.items.append((path, "must be a finite number"))
        elif lo is not None and (value <= lo if lo_open else value < lo):
            self.items.append((path, f"must be {'>' if lo_open else '>='} {lo:g}"))
        elif hi is not None and value > hi:
            self.items.append((path, f"must be <= {hi:g}"))

    def choice(self, value: str, path: str, choices: tuple[str, ...]) -> None:
        self.check(not value or value in choices, path, f"{value!r} is not one of {', '.join(choices)}")
