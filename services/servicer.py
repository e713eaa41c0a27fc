"""JobService: translates requests, delegates to validation, the store and the dispatcher.

Raises domain errors only (services/errors.py); services/interceptors.py turns them into status
codes. The caller's tenant comes from the auth interceptor (context.principal).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import secrets
import threading
from collections import Counter

from stillroom.services.dispatcher import Dispatcher
from stillroom.services.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from stillroom.services.job_refs import resolve_job_refs
from stillroom.services.limits import Limits
from stillroom.services.store import ACTIVE, TERMINAL, Store, decode_token, encode_token
from stillroom.services.validation import Policy, validate, validate_request
from stillroom.v1 import job_pb2 as pb
from stillroom.v1 import job_service_pb2 as api
from stillroom.v1 import job_service_pb2_grpc as api_grpc

WATCH_POLL_S = 1.0


def new_job_id() -> str:
    return "job-" + secrets.token_hex(6)


def request_hash(spec: pb.JobSpec, labels: dict[str, str]) -> str:
    h = hashlib.sha256(spec.SerializeToString(deterministic=True))
    for k in sorted(labels):
        h.update(f"\0{k}\0{labels[k]}".encode())
    return h.hexdigest()


def _page_size(value: int, default: int, most: int, field: str) -> int:
    if value < 0:
        raise InvalidArgument([(field, "must be >= 0")])
    return min(value or default, most)


class StoreChanges:
    """Wakes the watchers (coroutines on the server's event loop) whenever the store commits: one
    thread waits on the store and sets an asyncio.Event on the loop. A commit the thread misses
    between two waits costs a watcher at most WATCH_POLL_S."""

    def __init__(self, store: Store, loop: asyncio.AbstractEventLoop, stopped: threading.Event):
        self._loop, self._event = loop, asyncio.Event()
        threading.Thread(target=self._relay, args=(store, stopped), name="store-changes", daemon=True).start()

    def _relay(self, store: Store, stopped: threading.Event) -> None:
        while not stopped.is_set():
            store.wait(WATCH_POLL_S)
            with contextlib.suppress(RuntimeError):  # the loop closed: the server is stopping
                self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)


class StreamSlots:
    """Open WatchJob streams per tenant, each tenant under its own limit."""

    def __init__(self, limits: Limits):
        self.limits, self._open, self._lock = limits, Counter(), threading.Lock()

    @contextlib.contextmanager
    def hold(self, tenant: str):
        most = self.limits.of(tenant).max_watch_streams
        with self._lock:
            if self._open[tenant] >= most:
                raise ResourceExhausted(
                    f"tenant {tenant!r} already has {self._open[tenant]} open WatchJob streams "
                    f"(limit max_watch_streams: {most}); close one, or watch with ListEvents pages"
                )
            self._open[tenant] += 1
        try:
            yield
        finally:
            with self._lock:
                self._open[tenant] -= 1


class JobService(api_grpc.JobServiceServicer):
    def __init__(self, store: Store, dispatcher: Dispatcher, policy: Policy, limits: Limits | None = None):
        self.store, self.dispatcher, self.policy = store, dispatcher, policy
        self.limits = limits or Limits()
        self.streams = StreamSlots(self.limits)
        self.changes: StoreChanges | None = None  # set by the server once its event loop runs
        self.shutting_down = threading.Event()

    def _validate(self, spec: pb.JobSpec, tenant: str) -> tuple[pb.JobSpec, list[str]]:
        """validate() under the server's policy with this tenant's ceilings, the cluster's capacity
        now, and the artifact directories of the tenant's own jobs its spec names (job://)."""
        spec, granted = resolve_job_refs(spec, tenant, self.store, self.dispatcher.artifact_root)
        policy = dataclasses.replace(
            self.policy, limits=self.limits.of(tenant), capacity=self.dispatcher.capacity(), granted=granted
        )
        return validate(spec, policy)

    def SubmitJob(self, request: api.SubmitJobRequest, context) -> api.SubmitJobResponse:
        principal = context.principal
        if principal.read_only:
            raise PermissionDenied(f"tenant {principal.tenant!r}: this token is read-only")
        labels = dict(request.labels)
        validate_request(request.request_id, labels)
        spec, _ = self._validate(request.spec, principal.tenant)
        self._check_reused_journals(spec, principal.tenant)
        self._check_resume_from(spec, principal.tenant)
        job, created = self.store.create_job(
            job_id=new_job_id(),
            tenant=principal.tenant,
            request_id=request.request_id or secrets.token_hex(16),
            request_hash=request_hash(request.spec, labels),
            spec=spec,
            labels=labels,
            stages=[(s.name, s.WhichOneof("kind")) for s in spec.stages],
            max_queued=self.limits.of(principal.tenant).max_queued_jobs,
        )
        if created:
            self.dispatcher.notify()
        return api.SubmitJobResponse(job=job, created=created)

    def _check_reused_journals(self, spec: pb.JobSpec, tenant: str) -> None:
        """A distill stage may replay the teacher output of an earlier job of the same tenant, once
        that job has succeeded."""
        for i, stage in enumerate(spec.stages):
            source = stage.distill.reuse_journal_of if stage.WhichOneof("kind") == "distill" else ""
            if not source:
                continue
            try:
                job = self.store.get_job(source, tenant)
            except NotFound:
                raise NotFound(f"stages[{i}].distill.reuse_journal_of: job {source!r} not found") from None
            if job.state != pb.JOB_STATE_SUCCEEDED:
                raise FailedPrecondition(
                    f"stages[{i}].distill.reuse_journal_of: job {source} is "
                    f"{pb.JobState.Name(job.state)}; only a succeeded job's journal can be reused"
                )

    def _check_resume_from(self, spec: pb.JobSpec, tenant: str) -> None:
        """resume_from names an earlier job of the same tenant that has ended."""
        if not spec.resume_from:
            return
        try:
            job = self.store.get_job(spec.resume_from, tenant)
        except NotFound:
            raise NotFound(f"resume_from: job {spec.resume_from!r} not found") from None
        if job.state not in TERMINAL:
            raise FailedPrecondition(
                f"resume_from: job {job.id} is {pb.JobState.Name(job.state)}; only a job that has ended can be resumed"
            )

    def ValidateJob(self, request: api.ValidateJobRequest, context) -> api.ValidateJobResponse:
        _, warnings = self._validate(request.spec, context.principal.tenant)
        self._check_reused_journals(request.spec, context.principal.tenant)
        self._check_resume_from(request.spec, context.principal.tenant)
        return api.ValidateJobResponse(warnings=warnings)

    def GetJob(self, request: api.GetJobRequest, context) -> api.GetJobResponse:
        job = self.store.get_job(request.job_id, context.principal.tenant)
        job.dashboard_url = self.dispatcher.dashboard_url
        if job.state in ACTIVE:  # where to look at it in the Ray dashboard
            job.actors.extend(self.dispatcher.actors(job.id))
        return api.GetJobResponse(job=job)

    def ListJobs(self, request: api.ListJobsRequest, context) -> api.ListJobsResponse:
        for i, state in enumerate(request.states):
            if state not in pb.JobState.values() or state == pb.JOB_STATE_UNSPECIFIED:
                raise InvalidArgument([(f"states[{i}]", f"{state} is not a job state")])
        jobs, token = self.store.list_jobs(
            context.principal.tenant,
            states=request.states,
            labels=dict(request.labels),
            page_size=_page_size(request.page_size, 50, 500, "page_size"),
            page_token=request.page_token,
        )
        return api.ListJobsResponse(jobs=jobs, next_page_token=token)

    def CancelJob(self, request: api.CancelJobRequest, context) -> api.CancelJobResponse:
        """QUEUED -> CANCELLED; RUNNING -> CANCELLING (-> CANCELLED once the supervisor stops);
        CANCELLING/CANCELLED: no change (idempotent); SUCCEEDED/FAILED: FAILED_PRECONDITION."""
        principal = context.principal
        job = self.store.get_job(request.job_id, principal.tenant)
        if principal.read_only:
            raise PermissionDenied(f"tenant {principal.tenant!r}: this token is read-only")
        if job.state in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED):
            raise FailedPrecondition(f"job {job.id} already ended {pb.JobState.Name(job.state)}; nothing to cancel")
        if job.state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING):
            target = pb.JOB_STATE_CANCELLED if job.state == pb.JOB_STATE_QUEUED else pb.JOB_STATE_CANCELLING
            # The store drops this event if the job moved on meanwhile (e.g. it just started or ended).
            event = pb.Event(type=pb.EVENT_TYPE_JOB_STATE, job_state=target, message="cancel requested")
            if not self.store.append_events(job.id, [event]) and target == pb.JOB_STATE_CANCELLED:
                return self.CancelJob(request, context)  # it started meanwhile: cancel the running job
            self.dispatcher.notify()
        return api.CancelJobResponse(job=self.store.get_job(job.id))

    async def WatchJob(self, request: api.WatchJobRequest, context):
        """Every event after `after_seq`, then new ones as they come, until the job ends. A coroutine
        on the server's event loop, not a thread: open streams cost memory, and each tenant has its
        own limit (max_watch_streams), so no tenant's streams can crowd out another's calls."""
        tenant = context.principal.tenant
        cursor = request.after_seq
        if cursor < 0:
            raise InvalidArgument([("after_seq", "must be >= 0")])
        self.store.get_job(request.job_id, tenant)  # NOT_FOUND before a slot is taken
        with self.streams.hold(tenant):
            while True:
                done = self.store.get_job(request.job_id, tenant).state in TERMINAL
                events = self.store.events(request.job_id, cursor, limit=500)
                for event in events:
                    yield api.WatchJobResponse(event=event)
                    cursor = event.seq
                if events:
                    continue
                if done or context.done():
                    return
                if self.shutting_down.is_set():
                    raise Unavailable(f"the server is shutting down; resume the watch with after_seq={cursor}")
                await self.changes.wait(WATCH_POLL_S)

    def ListEvents(self, request: api.ListEventsRequest, context) -> api.ListEventsResponse:
        size = _page_size(request.page_size, 100, 1000, "page_size")
        after = decode_token(request.page_token) if request.page_token else request.after_seq
        if after < 0:
            raise InvalidArgument([("after_seq", "must be >= 0")])
        events = self.store.events(request.job_id, after, limit=size + 1, tenant=context.principal.tenant)
        token = encode_token(events[size - 1].seq) if len(events) > size else ""
        return api.ListEventsResponse(events=events[:size], next_page_token=token)

    def ListArtifacts(self, request: api.ListArtifactsRequest, context) -> api.ListArtifactsResponse:
        return api.ListArtifactsResponse(artifacts=self.store.artifacts(request.job_id, context.principal.tenant))
