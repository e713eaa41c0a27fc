"""The dispatcher: starts queued jobs on Ray, fairly between tenants, under a global concurrency
limit and each tenant's own (next_to_start), and pulls each running job's events from its
supervisor actor into the store.

One background thread; every tick: pull events -> release jobs that ended -> pass on cancels ->
enforce deadlines -> restart dead supervisors -> start queued jobs.
A job is started by first claiming it in the store (QUEUED -> RUNNING, one transaction) and
launching its supervisor only if the claim won, so a cancel is either before the start (the job is
CANCELLED, nothing runs) or after it (CANCELLING, passed on to the supervisor): never lost between.
A supervisor appends every event to its attempt's event file before anyone can pull it, so when
it dies the events it wrote since the last pull are read from that file (salvaged), not lost.
At start-up, reconcile() re-attaches to supervisors that outlived a server restart (or fails their
jobs with a reason) before anything new is dispatched.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from stillroom.actors.runtime.cluster import NAMESPACE, cluster_capacity, release_job, supervisor_name
from stillroom.actors.runtime.eventlog import attempt_files, next_attempt_file, read_events
from stillroom.actors.runtime.supervisor import launch_supervisor, resume_state
from stillroom.services.limits import Limits
from stillroom.services.resumption import warm_start
from stillroom.services.store import ACTIVE, TERMINAL, Store
from stillroom.v1 import job_pb2 as pb

log = logging.getLogger("stillroom.dispatcher")


@dataclass
class _Running:
    handle: ray.actor.ActorHandle
    cursor: int  # how many of this supervisor's events are in the store
    cancel_sent_at: float | None = None
    pending: ray.ObjectRef | None = field(default=None, repr=False)


DEFAULT_RETRIES = 2  # JobSpec.max_retries when unset
RESTART_NOTE = "the job's supervisor died"  # the LOG event of each restart: attempts are counted from them
CAPACITY_TTL_S = 5.0  # how long the cluster's resources are remembered (each submit reads them)


def salvage(store: Store, job_dir: Path, job_id: str, cursor: int) -> int:
    """Into the store: what the job's newest supervisor wrote to its event file after `cursor` (the
    events the store already holds of it). Returns how many were added."""
    files = attempt_files(job_dir)
    records = read_events(files[-1])[cursor:] if files else []
    if records:
        store.append_events(job_id, [pb.Event.FromString(b) for b in records], cursor + len(records))
        log.info("salvaged %d events of %s from %s", len(records), job_id, files[-1])
    return len(records)


def _event(state: int, message: str) -> pb.Event:
    return pb.Event(type=pb.EVENT_TYPE_JOB_STATE, job_state=state, message=message)


def next_to_start(
    queued: list[tuple[str, str]], running_by_tenant: Mapping[str, int], limits: Limits, free_slots: int
) -> list[str]:
    """Which queued jobs ((job id, tenant) in submission order) to start now, in order, with
    `free_slots` free under the global limit: a tenant at its max_running_jobs waits; among the
    others, the tenant with the fewest jobs running goes first, then the earliest submission."""
    running = Counter(running_by_tenant)
    waiting: dict[str, list[str]] = {}
    for job_id, tenant in queued:
        waiting.setdefault(tenant, []).append(job_id)
    order = {job_id: i for i, (job_id, _) in enumerate(queued)}
    chosen: list[str] = []
    while len(chosen) < free_slots:
        ready = [t for t, jobs in waiting.items() if jobs and running[t] < limits.of(t).max_running_jobs]
        if not ready:
            break
        tenant = min(ready, key=lambda t: (running[t], order[waiting[t][0]]))
        chosen.append(waiting[tenant].pop(0))
        running[tenant] += 1
    return chosen


class Dispatcher:
    def __init__(
        self,
        store: Store,
        artifact_root: Path,
        max_running: int = 2,
        reward_modules: tuple[str, ...] = (),
        poll_interval_s: float = 0.2,
        cancel_grace_s: float = 30.0,
        retry_backoff_s: float = 10.0,
        dashboard_url: str = "",
        limits: Limits | None = None,
    ):
        self.reward_modules = reward_modules
        self.limits = limits or Limits()
        self.store, self.artifact_root = store, Path(artifact_root)
        self.max_running, self.poll_interval_s, self.cancel_grace_s = max_running, poll_interval_s, cancel_grace_s
        self._running: dict[str, _Running] = {}
        self._retries: dict[str, float] = {}  # job id -> when its supervisor is started again
        self.retry_backoff_s = retry_backoff_s
        self.dashboard_url = dashboard_url
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._capacity: tuple[float, dict[str, float]] = (-CAPACITY_TTL_S, {})  # (read at, resources)

    # -- lifecycle ------------------------------------------------------------------------------

    def reconcile(self) -> None:
        """Re-attach to supervisors of RUNNING/CANCELLING jobs, or fail those jobs with a reason."""
        for job_id, cursor in self.store.jobs_in(ACTIVE):
            handle = self._find(job_id)
            if handle is not None:
                log.info("re-attached to the supervisor of %s at event %d", job_id, cursor)
                self._running[job_id] = _Running(handle, cursor)
                continue
            self._lost(job_id, "the job's supervisor was lost while the control service was down (it died)", cursor)
        self._kill_orphans()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dispatcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def notify(self) -> None:
        """Wake the loop now (a job was submitted or cancelled)."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - keep dispatching; the next tick retries
                log.exception("dispatcher tick failed")
            self._wake.wait(self.poll_interval_s)
            self._wake.clear()

    def tick(self) -> None:
        self._pull()
        self._release_ended()
        self._pass_on_cancels()
        self._enforce_deadlines()
        self._start_retries()
        self._start_queued()

    # -- the three steps ----------------------------------------------------------------------

    def _pull(self) -> None:
        for run in self._running.values():
            if run.pending is None:
                run.pending = run.handle.events_since.remote(run.cursor)
        refs = {run.pending: job_id for job_id, run in self._running.items()}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=1.0)
        for ref in ready:
            job_id = refs[ref]
            run = self._running[job_id]
            run.pending = None
            try:
                events, cursor = ray.get(ref)
            except RayActorError as e:
                reason = f"the job's supervisor actor died: {e.error_msg if hasattr(e, 'error_msg') else e}"
                self._lost(job_id, reason, run.cursor)
                continue
            if not events:
                continue
            appended = self.store.append_events(job_id, [pb.Event.FromString(b) for b in events], cursor)
            run.cursor = cursor
            # A job only ends through an event, so the store need not be read on quiet ticks.
            if any(e.type == pb.EVENT_TYPE_JOB_STATE and e.job_state in TERMINAL for e in appended):
                self._finish(job_id)

    def _pass_on_cancels(self) -> None:
        for job_id, _ in self.store.jobs_in([pb.JOB_STATE_CANCELLING]):
            run = self._running.get(job_id)
            if run is None:
                self.store.append_events(job_id, [_event(pb.JOB_STATE_CANCELLED, "cancelled")])
            elif run.cancel_sent_at is None:
                run.handle.cancel.remote()
                run.cancel_sent_at = time.monotonic()
            elif time.monotonic() - run.cancel_sent_at > self.cancel_grace_s:
                self.store.append_events(
                    job_id,
                    [
                        _event(
                            pb.JOB_STATE_CANCELLED,
                            f"cancelled; the supervisor was killed after {self.cancel_grace_s:g}s without stopping",
                        )
                    ],
                )
                self._finish(job_id)

    def _release_ended(self) -> None:
        """A job tracked here that the store says has ended (ended by a call, or its supervisor's
        final event came after another end) is released: its supervisor killed, its slot freed."""
        tracked = [*self._running, *self._retries]
        if not tracked:
            return
        for job_id, (_, state) in self.store.tenant_states(tracked).items():
            if state in TERMINAL:
                log.warning("%s ended (%s) while tracked: released", job_id, pb.JobState.Name(state))
                self._retries.pop(job_id, None)
                self._finish(job_id)

    def _start_queued(self) -> None:
        busy = [*self._running, *self._retries]
        free = self.max_running - len(busy)
        if free <= 0:
            return
        queued = self.store.queued()
        if not queued:
            return
        running = Counter(tenant for tenant, _ in self.store.tenant_states(busy).values())
        for job_id in next_to_start(queued, running, self.limits, free):
            self._start(job_id)

    def _start(self, job_id: str) -> None:
        """Claim the job, then launch it; a launch that fails ends the job FAILED with the reason."""
        if not self.store.claim(job_id, f"started {supervisor_name(job_id)}"):
            return  # cancelled meanwhile: nothing was launched
        try:
            self._launch(job_id, self._warm_start(job_id))
        except Exception as e:  # noqa: BLE001 - the job fails; the dispatcher goes on
            log.exception("could not start %s", job_id)
            reason = f"the job could not start: {type(e).__name__}: {e}"
            self.store.append_events(job_id, [_event(pb.JOB_STATE_FAILED, reason)])
            self._release(job_id)
            return
        log.info("started %s", job_id)

    def _launch(self, job_id: str, resume: str = "") -> None:
        artifact_dir = self.artifact_root / job_id
        artifact_dir.mkdir(parents=True, exist_ok=True)
        spec = self.store.spec(job_id).SerializeToString()
        events = next_attempt_file(artifact_dir)
        self.store.append_events(job_id, [], cursor=0)  # a new supervisor's log starts empty
        handle = launch_supervisor(job_id, spec, str(artifact_dir), self.reward_modules, resume, str(events))
        ray.get(handle.start.remote(), timeout=60)
        self._running[job_id] = _Running(handle, cursor=0)

    def _warm_start(self, job_id: str) -> str:
        """With resume_from, what the job reuses of the earlier job (services/resumption.py)."""
        spec = self.store.spec(job_id)
        old = spec.resume_from
        if not old:
            return ""
        return warm_start(
            self.store.spec(old), self._all_events(old), spec, self.artifact_root / old, self.artifact_root / job_id
        )

    def _start_retries(self) -> None:
        """Supervisors that died, started again once their backoff is over: the new one skips
        the stages that finished (from the stored events) and resumes the interrupted one."""
        now = time.monotonic()
        for job_id, due in list(self._retries.items()):
            if now < due:
                continue
            del self._retries[job_id]
            if self.store.get_job(job_id).state != pb.JOB_STATE_RUNNING:
                continue  # cancelled meanwhile
            try:
                self._launch(job_id, resume_state(self._all_events(job_id)))
            except Exception as e:  # noqa: BLE001 - the cluster may still be down: another attempt, or the end
                self._lost(job_id, f"a new supervisor could not start: {type(e).__name__}: {e}")
                continue
            log.info("restarted the supervisor of %s", job_id)

    def _enforce_deadlines(self) -> None:
        """A job past its spec's timeout_s is cancelled on the cluster and FAILED, saying so."""
        for job_id in [*self._running, *self._retries]:
            job = self.store.get_job(job_id)
            ran = time.time() - job.start_time.ToSeconds() if job.start_time.seconds else 0.0
            if job.spec.timeout_s and ran > job.spec.timeout_s and job.state == pb.JOB_STATE_RUNNING:
                reason = f"deadline exceeded: the job ran {ran:.0f} s, past its timeout_s of {job.spec.timeout_s:g} s"
                self.store.append_events(job_id, [_event(pb.JOB_STATE_FAILED, reason)])
                self._retries.pop(job_id, None)
                self._finish(job_id)

    # -- helpers ------------------------------------------------------------------------------

    def _lost(self, job_id: str, reason: str, cursor: int = 0) -> None:
        """The supervisor died: its unpulled events (after `cursor`) are salvaged from its event
        file; then a job that had ended stays ended, a cancelling one is CANCELLED, and a running
        one is started again after a backoff while its retry budget lasts (as a Kubernetes Job's
        backoffLimit), else FAILED."""
        salvage(self.store, self.artifact_root / job_id, job_id, cursor)
        job = self.store.get_job(job_id)
        self._finish(job_id)  # its role actors and placement group go; checkpoints and journals stay
        if job.state in TERMINAL:
            return
        if job.state == pb.JOB_STATE_CANCELLING:
            self.store.append_events(job_id, [_event(pb.JOB_STATE_CANCELLED, reason)])
            return
        budget = job.spec.max_retries if job.spec.HasField("max_retries") else DEFAULT_RETRIES
        attempt = sum(e.message.startswith(RESTART_NOTE) for e in self._all_events(job_id)) + 1
        if attempt > budget:
            self.store.append_events(job_id, [_event(pb.JOB_STATE_FAILED, f"retries exhausted ({budget}): {reason}")])
            return
        delay = self.retry_backoff_s * 2 ** (attempt - 1)
        note = f"{RESTART_NOTE} ({reason}); starting it again in {delay:g} s, attempt {attempt} of {budget}"
        self.store.append_events(job_id, [pb.Event(type=pb.EVENT_TYPE_LOG, message=note)])
        self._retries[job_id] = time.monotonic() + delay

    def _all_events(self, job_id: str) -> list[pb.Event]:
        events, after = [], 0
        while page := self.store.events(job_id, after_seq=after):
            events += page
            after = page[-1].seq
        return events

    def _finish(self, job_id: str) -> None:
        """The job ended: nothing of it may stay on the cluster."""
        self._running.pop(job_id, None)
        release_job(job_id)

    def _release(self, job_id: str) -> None:
        """_finish, where the cluster may be the reason the job ended: a failure is logged, not raised."""
        try:
            self._finish(job_id)
        except Exception:  # noqa: BLE001 - _kill_orphans and _release_ended retry later
            log.exception("could not release %s", job_id)

    def capacity(self) -> dict[str, float]:
        """The cluster's resources ({resource: total, "max_node_<resource>": the most one node has}),
        read at most every CAPACITY_TTL_S; {} (unknown) when the cluster cannot be asked."""
        read_at, resources = self._capacity
        if time.monotonic() - read_at < CAPACITY_TTL_S:
            return resources
        try:
            resources = cluster_capacity()
        except Exception:  # noqa: BLE001 - unknown capacity: submit checks skip it
            log.exception("could not read the cluster's resources")
            return {}
        self._capacity = (time.monotonic(), resources)
        return resources

    def actors(self, job_id: str) -> list[str]:
        """The job's named actors alive on the cluster now (as the Ray dashboard lists them)."""
        names = ray.util.list_named_actors(all_namespaces=True)
        return sorted(
            e["name"] for e in names if e.get("namespace") == NAMESPACE and e["name"].startswith(f"{job_id}:")
        )

    def _find(self, job_id: str):
        try:
            handle = ray.get_actor(supervisor_name(job_id), namespace=NAMESPACE)
            ray.get(handle.ping.remote(), timeout=10)
            return handle
        except (ValueError, RayActorError, GetTimeoutError):
            return None

    def _kill_orphans(self) -> None:
        """Supervisors whose jobs already ended (the server died before it released them)."""
        for entry in ray.util.list_named_actors(all_namespaces=True):
            name = entry["name"]
            if entry.get("namespace") == NAMESPACE and name.endswith(":supervisor:0"):
                job_id = name.split(":")[0]
                if job_id not in self._running:
                    release_job(job_id)
                    log.info("released the orphaned supervisor of %s", job_id)
