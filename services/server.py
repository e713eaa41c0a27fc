"""`stillroom serve`: the gRPC control service.

Start-up order: open the store -> connect to Ray -> reconcile jobs left RUNNING -> start the
dispatcher -> accept calls. SIGTERM/SIGINT: stop accepting, let in-flight calls finish (watchers are
told to resume later), then stop dispatching.

gRPC runs as a grpc.aio server on its own event loop thread: unary calls run on a thread pool
(`workers`), WatchJob streams are coroutines on the loop, so open streams never hold a thread and
each tenant's streams are capped on their own (services/limits.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import ray
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from stillroom.actors.runtime.cluster import NAMESPACE
from stillroom.services.auth import Principal, TokenTable
from stillroom.services.dispatcher import Dispatcher
from stillroom.services.environment import scrub_environment
from stillroom.services.interceptors import AuthInterceptor, ErrorInterceptor
from stillroom.services.limits import Limits
from stillroom.services.servicer import JobService, StoreChanges
from stillroom.services.store import ACTIVE, Store
from stillroom.services.validation import Policy
from stillroom.v1 import job_pb2 as pb
from stillroom.v1 import job_service_pb2, job_service_pb2_grpc

log = logging.getLogger("stillroom.server")
SERVICE_NAME = job_service_pb2.DESCRIPTOR.services_by_name["JobService"].full_name
MiB = 1024 * 1024


def default_home() -> Path:
    return Path(os.environ.get("STILLROOM_HOME", Path.home() / ".local" / "share" / "stillroom"))


@dataclass
class ServerConfig:
    address: str = "127.0.0.1:50051"
    home: Path = field(default_factory=default_home)
    store_path: Path | None = None  # default <home>/jobs.db
    artifact_root: Path | None = None  # default <home>/artifacts
    data_roots: list[Path] = field(default_factory=lambda: [Path.cwd()])
    model_roots: list[Path] = field(default_factory=list)
    reward_modules: list[str] = field(default_factory=list)  # import paths reward functions may come from
    tokens_file: Path | None = None
    allow_anonymous: bool = False  # every caller is tenant "default": for a laptop, never a cluster
    tls_cert: Path | None = None
    tls_key: Path | None = None
    ray_address: str | None = None  # None: RAY_ADDRESS, else an embedded local Ray
    runtime_env: Path | None = None  # a Ray runtime_env YAML for every job's actors
    max_running_jobs: int = 2
    retry_backoff_s: float = 10.0  # the first wait before a dead supervisor is started again (doubling)
    limits: Limits = field(default_factory=Limits)  # per-tenant ceilings (serve --limits limits.yaml)
    mlflow_hosts: list[str] = field(default_factory=list)  # hosts jobs may send MLflow tracking to
    workers: int = 64  # threads for unary calls (streams are coroutines and take none)
    max_concurrent_rpcs: int = 4096  # calls in flight, streams included (each tenant's streams are capped)
    max_message_mb: int = 16
    grace_s: float = 20.0


def connect_ray(address: str | None, runtime_env: Path | None = None) -> str:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start an embedded local one. A
    runtime_env file (YAML) applies to every actor of every job. Returns the dashboard's URL ("" if none)."""
    env = yaml.safe_load(Path(runtime_env).read_text()) if runtime_env else None
    context = ray.init(
        address=address or None, namespace=NAMESPACE, log_to_driver=False, configure_logging=False, runtime_env=env
    )
    url = getattr(context, "dashboard_url", "") or ""
    return url if not url or url.startswith("http") else f"http://{url}"


class _AnonymousTokens(TokenTable):
    def __init__(self) -> None:
        super().__init__({})

    def authenticate(self, metadata) -> Principal:
        return Principal("default")


class Server:
    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        tokens = _AnonymousTokens() if cfg.allow_anonymous else TokenTable.load(cfg.tokens_file)
        if not cfg.allow_anonymous and not len(tokens):
            raise SystemExit("no API tokens: pass --tokens-file or set STILLROOM_TOKENS (or --allow-anonymous)")
        scrub_environment()  # loaded: no Ray process may inherit the tokens (services/environment.py)
        self.store = Store(cfg.store_path or cfg.home / "jobs.db")
        self.embedded_ray = not (cfg.ray_address or os.environ.get("RAY_ADDRESS"))
        self.dashboard_url = connect_ray(cfg.ray_address, cfg.runtime_env)
        self.artifact_root = Path(cfg.artifact_root or cfg.home / "artifacts").resolve()
        self.dispatcher = Dispatcher(
            self.store,
            self.artifact_root,
            cfg.max_running_jobs,
            tuple(cfg.reward_modules),
            retry_backoff_s=cfg.retry_backoff_s,
            dashboard_url=self.dashboard_url,
            limits=cfg.limits,
        )
        self.service = JobService(self.store, self.dispatcher, self._policy(), cfg.limits)
        self._stopped = threading.Event()
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="grpc", daemon=True).start()
        self.health = health.aio.HealthServicer()
        self.grpc, self.port = self._on_loop(self._build(tokens))

    def _policy(self) -> Policy:
        """What validation enforces; the server's own files are excluded from every root."""
        cfg = self.cfg
        store = Path(cfg.store_path or cfg.home / "jobs.db")
        own = {Path(cfg.home), self.artifact_root, *(store.with_name(store.name + s) for s in ("", "-wal", "-shm"))}
        excluded = tuple(sorted(p.resolve() for p in own))
        roots = tuple(Path(p).resolve() for p in [*cfg.data_roots, *cfg.model_roots])
        for root in roots:  # a root inside the server's own files would be unreadable: say so now
            if any(root.is_relative_to(ex) for ex in excluded):
                raise SystemExit(f"{root} is inside the server's own files ({cfg.home}): no tenant may read there")
        return Policy(
            tuple(Path(p).resolve() for p in cfg.data_roots),
            tuple(Path(p).resolve() for p in cfg.model_roots),
            tuple(cfg.reward_modules),
            excluded=excluded,
            mlflow_hosts=tuple(cfg.mlflow_hosts),
        )

    def _on_loop(self, coro):
        """Run a coroutine on the server's event loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _build(self, tokens: TokenTable) -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(
            migration_thread_pool=futures.ThreadPoolExecutor(max_workers=self.cfg.workers, thread_name_prefix="rpc"),
            interceptors=[ErrorInterceptor(), AuthInterceptor(tokens)],
            maximum_concurrent_rpcs=self.cfg.max_concurrent_rpcs,
            options=[
                ("grpc.max_receive_message_length", self.cfg.max_message_mb * MiB),
                ("grpc.max_send_message_length", self.cfg.max_message_mb * MiB),
                # A second server on a busy port must fail, not share it: with SO_REUSEPORT the kernel
                # would split calls between two servers with different tokens and stores.
                ("grpc.so_reuseport", 0),
            ],
        )
        self.service.changes = StoreChanges(self.store, asyncio.get_running_loop(), self._stopped)
        job_service_pb2_grpc.add_JobServiceServicer_to_server(self.service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        return server, self._bind(server)

    def _bind(self, server: grpc.aio.Server) -> int:
        if self.cfg.tls_cert or self.cfg.tls_key:
            creds = grpc.ssl_server_credentials(
                [(Path(self.cfg.tls_key).read_bytes(), Path(self.cfg.tls_cert).read_bytes())]
            )
            return server.add_secure_port(self.cfg.address, creds)
        return server.add_insecure_port(self.cfg.address)

    def start(self) -> None:
        self.dispatcher.reconcile()
        self.dispatcher.start()
        self._on_loop(self.grpc.start())
        self._set_health(True)
        threading.Thread(target=self._watch_store, name="health", daemon=True).start()
        host = self.cfg.address.rsplit(":", 1)[0]
        print(f"stillroom: listening on {host}:{self.port}", flush=True)
        if self.dashboard_url:
            print(
                f"stillroom: Ray dashboard at {self.dashboard_url} (sign in with the token `ray get-auth-token` "
                "prints; each job's actors are named <job-id>:<role>:<rank>)",
                flush=True,
            )

    def _set_health(self, ok: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            self._on_loop(self.health.set(name, status))

    def _watch_store(self) -> None:
        while not self._stopped.wait(2.0):
            try:
                self.store.check()
                self._set_health(True)
            except Exception as e:  # noqa: BLE001 - any store failure means NOT_SERVING
                log.error("job store unusable: %s", e)
                self._set_health(False)

    def stop(self) -> None:
        """Graceful: refuse new calls, finish in-flight ones, tell watchers, stop dispatching."""
        self._stopped.set()
        self.service.shutting_down.set()
        self._on_loop(self.health.enter_graceful_shutdown())
        self.store.notify()  # wake watchers so they see the shutdown
        self._on_loop(self.grpc.stop(self.cfg.grace_s))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self.dispatcher.stop()
        if self.embedded_ray:
            # The embedded cluster ends with this process, and the supervisors with it.
            for job_id, _ in self.store.jobs_in(ACTIVE):
                self.store.append_events(
                    job_id,
                    [
                        pb.Event(
                            type=pb.EVENT_TYPE_JOB_STATE,
                            job_state=pb.JOB_STATE_FAILED,
                            message="the control service stopped, and its embedded Ray cluster with it; resubmit, "
                            "or run the service against a Ray cluster (--ray-address) so jobs outlive it",
                        )
                    ],
                )
        ray.shutdown()
        self.store.close()

    def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT."""
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        self.start()
        stop.wait()
        log.info("shutting down")
        self.stop()
