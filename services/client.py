"""The Python SDK: a thin, typed client of stillroom.v1.JobService. The CLI is built on it.

from stillroom.services.client import Client
c = Client("127.0.0.1:50051", token="...")
job = c.submit(spec, request_id="nightly-42").job
for event in c.watch(job.id):
    print(event.seq, event.type)
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
from stillroom.services.store import TERMINAL
from stillroom.v1 import job_pb2 as pb
from stillroom.v1 import job_service_pb2 as api
from stillroom.v1 import job_service_pb2_grpc as api_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"


def _quiet(message: str) -> None:
    pass


class WatchLost(Exception):
    """The server stayed unreachable past the reconnect timeout while a job was watched."""

    def __init__(self, job_id: str, cursor: int, address: str, waited_s: float):
        super().__init__(
            f"gave up watching {job_id}: {address} unreachable for {waited_s:.0f} s; the last event seen "
            f"was {cursor}: resume with `stillroom watch {job_id} --after {cursor}`"
        )
        self.job_id, self.cursor = job_id, cursor


def submit_request(spec: pb.JobSpec, request_id: str = "", labels: dict[str, str] | None = None):
    """The SubmitJobRequest a submit sends (what `stillroom submit --dry-run` prints)."""
    return api.SubmitJobRequest(request_id=request_id, spec=spec, labels=labels)


class Client:
    def __init__(
        self,
        address: str | None = None,
        token: str | None = None,
        tls_ca: str | Path | None = None,
        timeout_s: float = 60.0,
    ):
        self.address = address or os.environ.get("STILLROOM_ADDRESS", DEFAULT_ADDRESS)
        token = token if token is not None else os.environ.get("STILLROOM_TOKEN", "")
        tls_ca = tls_ca or os.environ.get("STILLROOM_TLS_CA")
        if tls_ca:
            creds = grpc.ssl_channel_credentials(Path(tls_ca).read_bytes())
            self.channel = grpc.secure_channel(self.address, creds)
        else:
            self.channel = grpc.insecure_channel(self.address)
        self.stub = api_grpc.JobServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout_s = timeout_s

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, rpc, request):
        return rpc(request, metadata=self.metadata, timeout=self.timeout_s)

    def submit(self, spec: pb.JobSpec, request_id: str = "", labels: dict[str, str] | None = None):
        return self._call(self.stub.SubmitJob, submit_request(spec, request_id, labels))

    def validate(self, spec: pb.JobSpec) -> api.ValidateJobResponse:
        return self._call(self.stub.ValidateJob, api.ValidateJobRequest(spec=spec))

    def get(self, job_id: str) -> pb.Job:
        return self._call(self.stub.GetJob, api.GetJobRequest(job_id=job_id)).job

    def _pages(self, rpc, request, field: str) -> Iterator:
        """Every item of a paginated List call, following next_page_token."""
        while True:
            resp = self._call(rpc, request)
            yield from getattr(resp, field)
            if not resp.next_page_token:
                return
            request.page_token = resp.next_page_token

    def list(self, states=(), labels: dict[str, str] | None = None, page_size: int = 0) -> Iterator[pb.Job]:
        """Every matching job, newest first, across pages."""
        req = api.ListJobsRequest(page_size=page_size, states=states, labels=labels)
        return self._pages(self.stub.ListJobs, req, "jobs")

    def cancel(self, job_id: str) -> pb.Job:
        return self._call(self.stub.CancelJob, api.CancelJobRequest(job_id=job_id)).job

    def events(self, job_id: str, after_seq: int = 0, page_size: int = 0) -> Iterator[pb.Event]:
        req = api.ListEventsRequest(job_id=job_id, after_seq=after_seq, page_size=page_size)
        return self._pages(self.stub.ListEvents, req, "events")

    def artifacts(self, job_id: str) -> list[pb.Artifact]:
        return list(self._call(self.stub.ListArtifacts, api.ListArtifactsRequest(job_id=job_id)).artifacts)

    def watch(
        self, job_id: str, after_seq: int = 0, reconnect_s: float = 120.0, on_retry: Callable[[str], None] = _quiet
    ) -> Iterator[pb.Event]:
        """Events with seq > after_seq until the job ends. When the server goes away (a restart),
        reconnects for up to `reconnect_s`, saying so through on_retry at every attempt, and resumes
        after the last event seen: none missed, none twice. Past that, raises WatchLost."""
        cursor, lost_since, attempt = after_seq, None, 0
        while True:
            try:
                for resp in self.stub.WatchJob(
                    api.WatchJobRequest(job_id=job_id, after_seq=cursor), metadata=self.metadata
                ):
                    if lost_since is not None:
                        on_retry(f"reconnected to {self.address}; {job_id} goes on after event {cursor}")
                        lost_since, attempt = None, 0
                    cursor = resp.event.seq
                    yield resp.event
                return
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                if lost_since is None:
                    lost_since = time.monotonic()
                    lost = f"lost the connection to {self.address} ({e.details()})"
                    on_retry(f"{lost}; reconnecting for up to {reconnect_s:g} s")
                waited = time.monotonic() - lost_since
                if waited > reconnect_s:
                    raise WatchLost(job_id, cursor, self.address, waited) from e
                attempt += 1
                on_retry(f"reconnecting to {self.address} (attempt {attempt}, {waited:.0f} s of {reconnect_s:g} s)")
                time.sleep(min(2.0 ** (attempt - 1), 10.0))

    def wait(self, job_id: str) -> pb.Job:
        """Block until the job ends; return it."""
        for _ in self.watch(job_id):
            pass
        job = self.get(job_id)
        assert job.state in TERMINAL
        return job
