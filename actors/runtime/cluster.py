"""The one place where role classes become Ray actors: names, resources, restart policies and the
job's placement group.

Names read well in the Ray dashboard: `<job-id>:<role>:<rank>`. Role classes are imported when a
role starts (they pull in torch), so the control plane can import this module for the supervisor.
"""

from __future__ import annotations

import importlib
import math
import os
import socket
import time
from dataclasses import dataclass, replace

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

NAMESPACE = "stillroom"

# Explicit restart policy per role. Generators and scorers hold no state that a restart loses, so
# Ray restarts them (the batch one was working on is not re-sent yet: the stage fails with the
# actor's error); a trainer rank is never restarted
# alone, because a collective group cannot take one new member: the supervisor restarts the whole
# group from its latest checkpoint instead. The supervisor reruns a job from the start, so Ray
# must not restart it either: its death fails the job with a reason.
RESTARTS = {
    "supervisor": {"max_restarts": 0, "max_task_retries": 0},
    "generator": {"max_restarts": 2, "max_task_retries": 0},
    "student": {"max_restarts": 2, "max_task_retries": 0},  # a generator sampling from the student
    "scorer": {"max_restarts": 2, "max_task_retries": 0},
    "trainer": {"max_restarts": 0, "max_task_retries": 0},
    "retriever": {"max_restarts": 2, "max_task_retries": 2},  # retrieval is read-only: a call may run again
}
# Generators and scorers take weight syncs and stats calls while their serve loop runs.
CONCURRENCY = {"generator": 4, "student": 4, "scorer": 4, "trainer": 1, "retriever": 1}
DEFAULT_CPUS = {"retriever": 0.25}  # per replica, where the job's resources leave it unset (else 1)
THREADS_ENV = "STILLROOM_THREADS"  # a role's torch threads; 0 or unset: every core


def actor_name(job_id: str, role: str, rank: int) -> str:
    return f"{job_id}:{role}:{rank}"


def supervisor_name(job_id: str) -> str:
    return actor_name(job_id, "supervisor", 0)


def placement_name(job_id: str) -> str:
    return f"{job_id}:placement"


def release_job(job_id: str) -> None:
    """Kill whatever of the job is still alive: its supervisor (and with it the role actors it
    owns), any named actor of the job, and its placement group. A placement group is fate-shared
    with the driver that created its creator, not with the supervisor, so it must go explicitly."""
    prefix = f"{job_id}:"
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry.get("namespace") == NAMESPACE and entry["name"].startswith(prefix):
            try:
                ray.kill(ray.get_actor(entry["name"], namespace=NAMESPACE), no_restart=True)
            except ValueError:
                pass  # already gone
    while True:
        try:
            pg = ray.util.get_placement_group(placement_name(job_id))
        except ValueError:
            return
        remove_placement_group(pg)


# The class each role runs, imported only when a role starts: they pull in torch, and the control
# plane imports this module (for the supervisor) without it.
ROLE_CLASSES = {
    "generator": "stillroom.actors.roles.generator:Generator",
    "student": "stillroom.actors.roles.generator:Generator",  # a generator sampling from the student
    "scorer": "stillroom.actors.roles.scorer:RewardScorer",
    "trainer": "stillroom.actors.roles.trainer:Trainer",
    "retriever": "stillroom.actors.roles.retriever:Retriever",
}


def _role_class(role: str):
    module, _, name = ROLE_CLASSES[role].partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Placement:
    """Resources of one role: replicas, and per replica CPUs, GPUs and torch threads (0: all cores)
    while other roles compute beside it (`threads`) and once it computes alone (`alone_threads`)."""

    replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    custom: tuple[tuple[str, float], ...] = ()
    threads: int = 0
    alone_threads: int = 0
    engine: str = ""  # what a generating role generates with ("": hf; roles/engine.py)

    @classmethod
    def of(cls, spec, default_cpus: float = 1.0, overlap: bool = False) -> Placement:
        """From a stillroom.v1.RoleResources (zero means the default). Roles that compute at the same
        time (`overlap`) get num_cpus threads each, rounded up; roles that take turns, every core."""
        cpus = spec.num_cpus or default_cpus
        threads = spec.threads or (max(1, math.ceil(cpus)) if overlap else 0)
        custom = tuple(sorted(spec.custom.items()))
        return cls(spec.replicas or 1, cpus, spec.num_gpus, custom, threads, spec.threads, spec.engine)

    def bundle(self) -> dict[str, float]:
        bundle = {"CPU": self.num_cpus} if self.num_cpus else {}
        if self.num_gpus:
            bundle["GPU"] = self.num_gpus
        bundle.update(self.custom)
        return bundle or {"CPU": 0.01}  # a bundle may not be empty


def node_resources() -> list[dict[str, float]]:
    """The total resources of each alive node (its CPU, GPU, custom resources)."""
    skip = ("memory", "object_store_memory")
    return [
        {k: v for k, v in node.get("Resources", {}).items() if k not in skip and not k.startswith("node:")}
        for node in ray.nodes()
        if node.get("Alive")
    ]


def cluster_capacity() -> dict[str, float]:
    """{resource: total over the alive nodes, "max_node_<resource>": the most one node has}, what
    submit-time checks compare a job's roles with (services/capacity.py)."""
    out: dict[str, float] = {}
    for node in node_resources():
        for name, amount in node.items():
            out[name] = out.get(name, 0.0) + amount
            out[f"max_node_{name}"] = max(out.get(f"max_node_{name}", 0.0), amount)
    return out


def describe(placements: dict[str, Placement]) -> str:
    """e.g. "trainer: 2 x {'CPU': 1.0}; scorer: 1 x {'CPU': 1.0}", for messages."""
    return "; ".join(f"{role}: {p.replicas} x {p.bundle()}" for role, p in placements.items())


def check_fits(placements: dict[str, Placement]) -> None:
    """Fail at once, naming the role and what it asked, when a replica fits on no node or the
    roles together ask for more than the whole cluster has (Ray would wait forever for a
    placement group that can never be placed)."""
    nodes = node_resources()
    for role, p in placements.items():
        bundle = p.bundle()
        if not any(all(node.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items()) for node in nodes):
            raise RuntimeError(
                f"resources.{role}: one replica asks for {bundle}, but no node of the cluster has that much "
                f"(nodes: {nodes})"
            )
    wanted: dict[str, float] = {}
    for p in placements.values():
        for name, amount in p.bundle().items():
            wanted[name] = wanted.get(name, 0.0) + amount * p.replicas
    total = {k: sum(n.get(k, 0.0) for n in nodes) for k in wanted}
    short = {k: (v, total[k]) for k, v in wanted.items() if v > total[k] + 1e-9}
    if short:
        detail = ", ".join(f"{v:g} {k} wanted, {have:g} in the cluster" for k, (v, have) in short.items())
        raise RuntimeError(
            f"the job's roles need more than the cluster has: {detail} ({describe(placements)}; "
            "see the recipe's resources)"
        )


@ray.remote(num_cpus=0)
def _endpoint() -> tuple[str, int]:
    """An address and a free port on this node, for the trainer group's rendezvous."""
    with socket.socket() as s:
        s.bind(("", 0))
        return ray.util.get_node_ip_address(), s.getsockname()[1]


@ray.remote(num_cpus=0, max_calls=1)  # its own process, gone after: torch and CUDA are not left behind
def _gpu_probe() -> tuple[str, str]:
    """What a role placed where this runs sees: (CUDA_VISIBLE_DEVICES as Ray set it, why torch
    cannot use those GPUs or "")."""
    from stillroom.actors.models.loading import gpu_problem  # torch: imported in the probe only

    return os.environ.get("CUDA_VISIBLE_DEVICES", ""), gpu_problem()


class RoleGroup:
    """A job's role actors in one placement group. Owned by the supervisor: killing the supervisor
    takes the actors and the placement group with it."""

    def __init__(self, job_id: str, placements: dict[str, Placement], timeout_s: float = 300):
        self.job_id, self.placements = job_id, placements
        self.offsets, bundles = {}, []
        for role, p in placements.items():
            self.offsets[role] = len(bundles)
            bundles += [p.bundle() for _ in range(p.replicas)]
        check_fits(placements)
        self.pg = placement_group(bundles, strategy="PACK", name=placement_name(job_id))
        try:
            ray.get(self.pg.ready(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.pg)
            raise RuntimeError(
                f"the cluster could not place the roles ({describe(placements)}) within {timeout_s:g}s: "
                "other work holds the resources they need"
            ) from None
        self.actors: dict[str, list] = {}

    def _strategy(self, role: str, rank: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=self.offsets[role] + rank)

    def _options(self, role: str, rank: int) -> dict:
        p = self.placements[role]
        return {
            "name": actor_name(self.job_id, role, rank),
            "namespace": NAMESPACE,
            "num_cpus": p.num_cpus,
            "num_gpus": p.num_gpus,
            "scheduling_strategy": self._strategy(role, rank),
            "max_concurrency": CONCURRENCY[role],
            # Read by models.loading.use_cores in the actor (Ray's own OMP_NUM_THREADS follows num_cpus).
            "runtime_env": {"env_vars": {THREADS_ENV: str(p.threads)}},
            **RESTARTS[role],
        }

    def visible_gpus(self, role: str, timeout_s: float = 120) -> list[tuple[str, str]]:
        """Per replica of `role`, what it would see in its bundle: (CUDA_VISIBLE_DEVICES, why torch
        cannot use those GPUs or "")."""
        p = self.placements[role]
        probes = [
            _gpu_probe.options(num_gpus=p.num_gpus, scheduling_strategy=self._strategy(role, rank)).remote()
            for rank in range(p.replicas)
        ]
        try:
            return ray.get(probes, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"resources.{role}: its GPUs could not be checked within {timeout_s:g}s") from None

    def check_gpus(self, role: str) -> None:
        """Before a role that asks for GPUs starts: fail at once, naming it, where torch in its bundle
        cannot use the GPUs Ray gives it (a CPU-only torch, no driver), rather than let its actors
        die in their constructors and surface later as an actor error mid-stage."""
        p = self.placements[role]
        if not p.num_gpus:
            return
        for rank, (visible, problem) in enumerate(self.visible_gpus(role)):
            if problem:
                name = actor_name(self.job_id, role, rank)
                raise RuntimeError(
                    f"resources.{role}.num_gpus is {p.num_gpus:g}, but {name} cannot use the GPU it was given "
                    f"(CUDA_VISIBLE_DEVICES={visible}): {problem}"
                )

    def start(self, role: str, spec) -> list:
        """One actor per replica; each gets its own copy of `spec` with its name (and rank). A role
        given GPUs it cannot use fails here (check_gpus)."""
        self.check_gpus(role)
        cls = ray.remote(_role_class(role))
        handles = []
        n = self.placements[role].replicas
        if self.placements[role].engine:  # a generating role (validation allows no other)
            spec = replace(spec, engine=self.placements[role].engine)
        if role == "trainer":
            addr, port = ray.get(_endpoint.options(scheduling_strategy=self._strategy(role, 0)).remote())
            spec = replace(spec, world_size=n, master_addr=addr, master_port=port)
        for rank in range(n):
            extra = {"rank": rank} if role == "trainer" else {}
            handles.append(
                cls.options(**self._options(role, rank)).remote(
                    replace(spec, name=actor_name(self.job_id, role, rank), **extra)
                )
            )
        self.actors[role] = handles
        return handles

    def stop(self, role: str, timeout_s: float = 10.0) -> None:
        """Kill the role's actors and wait until Ray has released their names (a role started
        again right away reuses them)."""
        handles = self.actors.pop(role, [])
        for handle in handles:
            ray.kill(handle, no_restart=True)
        deadline = time.monotonic() + timeout_s
        for rank in range(len(handles)):
            while time.monotonic() < deadline:
                try:
                    ray.get_actor(actor_name(self.job_id, role, rank), namespace=NAMESPACE)
                except ValueError:
                    break
                time.sleep(0.1)

    def close(self) -> None:
        for role in list(self.actors):
            self.stop(role)
        remove_placement_group(self.pg)
