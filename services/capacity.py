"""Refuse at submit a job no cluster of this size can schedule: a role replica bigger than any one
node, or a stage whose roles together ask for more than the whole cluster has.

How roles ask (actors/runtime/cluster.py, actors/runtime/context.py): each stage that runs role
actors puts them in one placement group (PACK), one bundle per replica of {CPU: num_cpus, GPU:
num_gpus, custom...}; a bundle sits on one node, bundles may spread over nodes. num_cpus 0 means
the role's default (1, the retriever 0.25); the supervisor itself asks for no CPU. So one replica
must fit on the largest node, and a stage's replicas together within the cluster's totals.

`capacity` is Dispatcher.capacity(): {resource: total, "max_node_<resource>": the most one node
has}; empty means unknown, and nothing is checked (the job then fails at once at run time:
cluster.check_fits).
"""

from __future__ import annotations

import math

from stillroom.actors.runtime.cluster import DEFAULT_CPUS, Placement
from stillroom.services.violations import Violations
from stillroom.v1 import job_pb2 as pb

EPS = 1e-9
# The roles each stage kind starts (its ctx.roles call in actors/stages/<kind>.py).
STAGE_ROLES = {
    "sft": ("trainer",),
    "grpo": ("generator", "scorer", "trainer"),
    "distill": ("generator", "scorer", "trainer"),
    "evaluate": ("generator", "scorer"),
    "index": ("retriever",),
}


def stage_roles(stage: pb.Stage) -> tuple[str, ...]:
    """The roles a stage runs at once; on-policy distillation adds the student's generators."""
    kind = stage.WhichOneof("kind")
    roles = STAGE_ROLES.get(kind, ())
    if kind == "distill" and (getattr(stage.distill, "lambda") or stage.distill.mode == "on_policy"):
        roles += ("student",)
    return roles


def field_of(role: str, resource: str) -> str:
    """The spec field that asks for `resource` per replica of `role`."""
    named = {"CPU": "num_cpus", "GPU": "num_gpus"}
    return f"resources.{role}.{named[resource]}" if resource in named else f"resources.{role}.custom[{resource!r}]"


def _amount(resource: str, value: float) -> str:
    """e.g. "64 CPUs", "1 GPU", "2 of 'node_a'"."""
    if resource in ("CPU", "GPU"):
        return f"{value:g} {resource}{'' if value == 1 else 's'}"
    return f"{value:g} of {resource!r}"


def _placements(spec: pb.JobSpec) -> dict[str, Placement]:
    """Each role some stage runs, with what one replica asks; roles with invalid numbers (already
    reported by _check_resources) are left out."""
    roles = dict.fromkeys(r for stage in spec.stages for r in stage_roles(stage))
    out = {}
    for role in roles:
        p = Placement.of(getattr(spec.resources, role), DEFAULT_CPUS.get(role, 1.0))
        if p.replicas >= 1 and all(math.isfinite(a) and a >= 0 for a in p.bundle().values()):
            out[role] = p
    return out


def _per_replica(role: str, p: Placement, capacity: dict[str, float], v: Violations) -> bool:
    """One replica must fit on one node. False if it does not (reported)."""
    fits = True
    for resource, wanted in p.bundle().items():
        largest = capacity.get(f"max_node_{resource}", capacity.get(resource, 0.0))
        if wanted > largest + EPS:
            kind = {"CPU": "a CPU", "GPU": "a GPU"}.get(resource, repr(resource))
            where = f"the largest node has {largest:g}" if largest else f"no node of the cluster has {kind}"
            v.check(False, field_of(role, resource), f"{_amount(resource, wanted)} per replica, but {where}")
            fits = False
    return fits


def _per_stage(spec: pb.JobSpec, placements: dict[str, Placement], capacity: dict[str, float], v: Violations) -> None:
    """A stage's roles run at once: their replicas together must fit in the cluster's totals.
    Each resource short is reported once, at the field of the role asking for the most of it."""
    reported: set[str] = set()
    for i, stage in enumerate(spec.stages):
        roles = [r for r in stage_roles(stage) if r in placements]
        wanted: dict[str, dict[str, float]] = {}
        for role in roles:
            p = placements[role]
            for resource, amount in p.bundle().items():
                wanted.setdefault(resource, {})[role] = amount * p.replicas
        for resource, by_role in wanted.items():
            total, have = sum(by_role.values()), capacity.get(resource, 0.0)
            if total <= have + EPS or resource in reported:
                continue
            reported.add(resource)
            role = max(by_role, key=by_role.get)
            path = f"resources.{role}.replicas" if placements[role].replicas > 1 else field_of(role, resource)
            parts = ", ".join(f"{r} {placements[r].replicas} x {placements[r].bundle()[resource]:g}" for r in by_role)
            v.check(
                False,
                path,
                f"stages[{i}] ({stage.name or stage.WhichOneof('kind')}) runs {parts}: {_amount(resource, total)} "
                f"at once, but the cluster has {have:g}",
            )


def check_capacity(spec: pb.JobSpec, capacity: dict[str, float], v: Violations) -> None:
    """Report (into `v`) every role replica that fits on no node, and every stage whose roles
    together need more than the cluster has. Nothing is checked when `capacity` is empty."""
    if not capacity:
        return
    placements = _placements(spec)
    fit = {role: p for role, p in placements.items() if _per_replica(role, p, capacity, v)}
    if len(fit) == len(placements):  # a replica that fits nowhere already says what to change
        _per_stage(spec, placements, capacity, v)
