"""The job store: jobs, stages, events and artifacts in SQLite (WAL mode, synchronous=FULL).

Events are the source of truth: every change of a job (queued, running, a stage's progress, an
artifact, the final state) is an Event appended here with the next sequence number, and the job's
columns are updated from it in the same transaction. A call returns only after its transaction
has committed, so a `kill -9` loses nothing that was acknowledged.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import threading
import time
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp
from stillroom.services.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from stillroom.v1 import job_pb2 as pb

S = pb.JobState
TERMINAL = frozenset({S.JOB_STATE_CANCELLED, S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED})
ACTIVE = (S.JOB_STATE_RUNNING, S.JOB_STATE_CANCELLING)
# Allowed job state transitions; an event asking for any other is dropped (e.g. a late FAILED
# from a supervisor after the job was already CANCELLED). A RUNNING job has a supervisor to stop,
# so it is never CANCELLED directly, only through CANCELLING (which the dispatcher passes on).
TRANSITIONS = {
    S.JOB_STATE_QUEUED: {S.JOB_STATE_RUNNING, S.JOB_STATE_CANCELLED, S.JOB_STATE_FAILED},
    S.JOB_STATE_RUNNING: {S.JOB_STATE_CANCELLING, S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED},
    S.JOB_STATE_CANCELLING: {S.JOB_STATE_CANCELLED, S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED},
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  tenant TEXT NOT NULL,
  request_id TEXT NOT NULL,
  request_hash TEXT NOT NULL,
  spec BLOB NOT NULL,
  state INTEGER NOT NULL,
  error_stage TEXT NOT NULL DEFAULT '',
  error_reason TEXT NOT NULL DEFAULT '',
  create_time REAL NOT NULL,
  start_time REAL,
  end_time REAL,
  last_event_seq INTEGER NOT NULL DEFAULT 0,
  supervisor_cursor INTEGER NOT NULL DEFAULT 0,
  UNIQUE (tenant, request_id)
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, seq);
CREATE TABLE IF NOT EXISTS job_labels (
  job_id TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (job_id, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS labels_by_kv ON job_labels (key, value);
CREATE TABLE IF NOT EXISTS stages (
  job_id TEXT NOT NULL, idx INTEGER NOT NULL, name TEXT NOT NULL, kind TEXT NOT NULL,
  state INTEGER NOT NULL, done INTEGER NOT NULL DEFAULT 0, total INTEGER NOT NULL DEFAULT 0,
  unit TEXT NOT NULL DEFAULT '', metrics TEXT NOT NULL DEFAULT '{}', error TEXT NOT NULL DEFAULT '',
  start_time REAL, end_time REAL, PRIMARY KEY (job_id, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
  job_id TEXT NOT NULL, seq INTEGER NOT NULL, body BLOB NOT NULL, PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS artifacts (
  job_id TEXT NOT NULL, name TEXT NOT NULL, body BLOB NOT NULL, PRIMARY KEY (job_id, name)
) WITHOUT ROWID;
"""


def timestamp(t: float | None) -> Timestamp | None:
    if t is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


def encode_token(value: int) -> str:
    return base64.urlsafe_b64encode(str(value).encode()).decode()


def decode_token(token: str, field: str = "page_token") -> int:
    try:
        value = int(base64.urlsafe_b64decode(token.encode()).decode())
    except ValueError:
        value = -1
    if not 0 <= value < 2**63:  # what SQLite's INTEGER holds; anything else was never issued here
        raise InvalidArgument([(field, "not a token this server issued")])
    return value


class Store:
    """Thread-safe: one connection, one lock; writers notify watchers through a condition."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _read(self):
        """The connection, under the lock; SQLite failures become Unavailable (the client may retry)."""
        with self._lock:
            try:
                yield self._db
            except sqlite3.OperationalError as e:
                raise Unavailable(f"the job store is unavailable: {e}") from None

    @contextmanager
    def _tx(self):
        """One write transaction, committed (durably: synchronous=FULL) before the caller returns."""
        with self._read() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            self._changed.notify_all()

    def check(self) -> None:
        """Raise if the store cannot take a write (the health check)."""
        with self._tx() as db:
            db.execute("SELECT count(*) FROM jobs WHERE seq < 0").fetchone()

    # -- jobs ---------------------------------------------------------------------------------

    def create_job(
        self,
        *,
        job_id: str,
        tenant: str,
        request_id: str,
        request_hash: str,
        spec: pb.JobSpec,
        labels: dict[str, str],
        stages: list[tuple[str, str]],
        max_queued: int = 0,
    ) -> tuple[pb.Job, bool]:
        """Insert a QUEUED job, or return the job this request_id already made (created=False)."""
        with self._tx() as db:
            row = db.execute(
                "SELECT id, request_hash FROM jobs WHERE tenant=? AND request_id=?", (tenant, request_id)
            ).fetchone()
            if row is not None:
                if row["request_hash"] != request_hash:
                    raise AlreadyExists(
                        f"request_id {request_id!r} was already used for job {row['id']} with a different "
                        "spec or labels; use a new request_id"
                    )
                return self._job(db, row["id"]), False
            if max_queued:
                (queued,) = db.execute(
                    "SELECT count(*) FROM jobs WHERE tenant=? AND state=?", (tenant, S.JOB_STATE_QUEUED)
                ).fetchone()
                if queued >= max_queued:
                    raise ResourceExhausted(f"tenant {tenant!r} already has {queued} queued jobs (limit {max_queued})")
            now = time.time()
            db.execute(
                "INSERT INTO jobs (id, tenant, request_id, request_hash, spec, state, create_time)"
                " VALUES (?,?,?,?,?,?,?)",
                (job_id, tenant, request_id, request_hash, spec.SerializeToString(), S.JOB_STATE_QUEUED, now),
            )
            db.executemany("INSERT INTO job_labels VALUES (?,?,?)", [(job_id, k, v) for k, v in labels.items()])
            db.executemany(
                "INSERT INTO stages (job_id, idx, name, kind, state) VALUES (?,?,?,?,?)",
                [(job_id, i, n, k, pb.STAGE_STATE_PENDING) for i, (n, k) in enumerate(stages)],
            )
            self._append(
                db, job_id, [pb.Event(type=pb.EVENT_TYPE_JOB_STATE, job_state=S.JOB_STATE_QUEUED, message="queued")]
            )
            return self._job(db, job_id), True

    def get_job(self, job_id: str, tenant: str | None = None) -> pb.Job:
        with self._read() as db:
            self._require(job_id, tenant)
            return self._job(db, job_id)

    def list_jobs(
        self,
        tenant: str,
        *,
        states: Iterable[int] = (),
        labels: dict[str, str] | None = None,
        page_size: int = 50,
        page_token: str = "",
    ) -> tuple[list[pb.Job], str]:
        """Newest first. The page token is the submission sequence of the last job returned."""
        sql, args = "SELECT id, seq FROM jobs WHERE tenant=?", [tenant]
        if page_token:
            sql += " AND seq < ?"
            args.append(decode_token(page_token))
        states = list(states)
        if states:
            sql += f" AND state IN ({','.join('?' * len(states))})"
            args.extend(states)
        for k, v in (labels or {}).items():
            sql += " AND EXISTS (SELECT 1 FROM job_labels l WHERE l.job_id=jobs.id AND l.key=? AND l.value=?)"
            args.extend([k, v])
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(page_size + 1)
        with self._read() as db:
            rows = db.execute(sql, args).fetchall()
            jobs = [self._job(db, r["id"]) for r in rows[:page_size]]
        token = encode_token(rows[page_size - 1]["seq"]) if len(rows) > page_size else ""
        return jobs, token

    def jobs_in(self, states: Iterable[int]) -> list[tuple[str, int]]:
        """(job id, supervisor cursor) of jobs in these states, in submission order."""
        states = list(states)
        with self._read() as db:
            rows = db.execute(
                f"SELECT id, supervisor_cursor FROM jobs WHERE state IN ({','.join('?' * len(states))}) ORDER BY seq",
                states,
            ).fetchall()
        return [(r["id"], r["supervisor_cursor"]) for r in rows]

    def queued(self) -> list[tuple[str, str]]:
        """(job id, tenant) of every QUEUED job, in submission order."""
        with self._read() as db:
            rows = db.execute("SELECT id, tenant FROM jobs WHERE state=? ORDER BY seq", (S.JOB_STATE_QUEUED,))
            return [(r["id"], r["tenant"]) for r in rows.fetchall()]

    def tenant_states(self, job_ids: Iterable[str]) -> dict[str, tuple[str, int]]:
        """{job id: (tenant, state)} of these jobs."""
        ids = list(job_ids)
        with self._read() as db:
            rows = db.execute(f"SELECT id, tenant, state FROM jobs WHERE id IN ({','.join('?' * len(ids))})", ids)
            return {r["id"]: (r["tenant"], r["state"]) for r in rows.fetchall()}

    def claim(self, job_id: str, message: str) -> bool:
        """QUEUED -> RUNNING in one transaction: True if this call moved it (the caller may start
        the job), False if it had left QUEUED (e.g. cancelled) and must not be started."""
        event = pb.Event(type=pb.EVENT_TYPE_JOB_STATE, job_state=S.JOB_STATE_RUNNING, message=message)
        return bool(self.append_events(job_id, [event]))  # TRANSITIONS: only QUEUED -> RUNNING

    def spec(self, job_id: str) -> pb.JobSpec:
        with self._read() as db:
            row = db.execute("SELECT spec FROM jobs WHERE id=?", (job_id,)).fetchone()
        return pb.JobSpec.FromString(row["spec"])

    # -- events -------------------------------------------------------------------------------

    def append_events(self, job_id: str, events: list[pb.Event], cursor: int | None = None) -> list[pb.Event]:
        """Append events (seq and time assigned here) and apply them to the job, atomically.
        `cursor` records how far the supervisor's log has been pulled, in the same transaction."""
        with self._tx() as db:
            appended = self._append(db, job_id, events)
            if cursor is not None:
                db.execute("UPDATE jobs SET supervisor_cursor=? WHERE id=?", (cursor, job_id))
            return appended

    def events(self, job_id: str, after_seq: int = 0, limit: int = 1000, tenant: str | None = None) -> list[pb.Event]:
        with self._read() as db:
            self._require(job_id, tenant)
            rows = db.execute(
                "SELECT body FROM events WHERE job_id=? AND seq>? ORDER BY seq LIMIT ?", (job_id, after_seq, limit)
            ).fetchall()
        return [pb.Event.FromString(r["body"]) for r in rows]

    def notify(self) -> None:
        """Wake every wait() now."""
        with self._changed:
            self._changed.notify_all()

    def wait(self, timeout: float) -> None:
        """Block until any write commits, or `timeout` seconds pass."""
        with self._changed:
            self._changed.wait(timeout)

    def artifacts(self, job_id: str, tenant: str | None = None) -> list[pb.Artifact]:
        with self._read() as db:
            self._require(job_id, tenant)
            rows = db.execute("SELECT body FROM artifacts WHERE job_id=? ORDER BY name", (job_id,)).fetchall()
        return [pb.Artifact.FromString(r["body"]) for r in rows]

    # -- internals ----------------------------------------------------------------------------

    def _require(self, job_id: str, tenant: str | None) -> None:
        row = self._db.execute("SELECT tenant FROM jobs WHERE id=?", (job_id,)).fetchone()
        # Another tenant's job is reported as missing: its existence is not theirs to know.
        if row is None or (tenant is not None and row["tenant"] != tenant):
            raise NotFound(f"job {job_id!r} not found")

    def _append(self, db: sqlite3.Connection, job_id: str, events: list[pb.Event]) -> list[pb.Event]:
        (seq,) = db.execute("SELECT last_event_seq FROM jobs WHERE id=?", (job_id,)).fetchone()
        appended = []
        for event in events:
            if not self._apply(db, job_id, event):
                continue
            seq += 1
            e = pb.Event()
            e.CopyFrom(event)
            e.job_id, e.seq = job_id, seq
            if not e.HasField("time"):
                e.time.GetCurrentTime()
            db.execute("INSERT INTO events VALUES (?,?,?)", (job_id, seq, e.SerializeToString()))
            appended.append(e)
        db.execute("UPDATE jobs SET last_event_seq=? WHERE id=?", (seq, job_id))
        return appended

    def _apply(self, db: sqlite3.Connection, job_id: str, e: pb.Event) -> bool:
        """Apply one event to the job's columns; False drops it (an impossible job transition)."""
        now = e.time.ToNanoseconds() / 1e9 if e.HasField("time") else time.time()
        if e.type == pb.EVENT_TYPE_JOB_STATE:
            (state,) = db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
            if e.job_state != S.JOB_STATE_QUEUED and e.job_state not in TRANSITIONS.get(state, ()):
                return False
            db.execute("UPDATE jobs SET state=? WHERE id=?", (e.job_state, job_id))
            if e.job_state == S.JOB_STATE_RUNNING:
                db.execute("UPDATE jobs SET start_time=? WHERE id=?", (now, job_id))
            if e.job_state in TERMINAL:
                db.execute("UPDATE jobs SET end_time=? WHERE id=?", (now, job_id))
                # Stages that never ran are cancelled (or skipped) with the job.
                db.execute(
                    "UPDATE stages SET state=? WHERE job_id=? AND state IN (?,?)",
                    (
                        pb.STAGE_STATE_CANCELLED if e.job_state != S.JOB_STATE_SUCCEEDED else pb.STAGE_STATE_SKIPPED,
                        job_id,
                        pb.STAGE_STATE_PENDING,
                        pb.STAGE_STATE_RUNNING,
                    ),
                )
            if e.job_state == S.JOB_STATE_FAILED:
                db.execute("UPDATE jobs SET error_stage=?, error_reason=? WHERE id=?", (e.stage, e.message, job_id))
        elif e.type == pb.EVENT_TYPE_STAGE_STATE:
            col = "start_time" if e.stage_state == pb.STAGE_STATE_RUNNING else "end_time"
            db.execute(
                f"UPDATE stages SET state=?, {col}=?, error=? WHERE job_id=? AND name=?",
                (e.stage_state, now, e.message if e.stage_state == pb.STAGE_STATE_FAILED else "", job_id, e.stage),
            )
        elif e.type == pb.EVENT_TYPE_PROGRESS:
            p = e.progress
            db.execute(
                "UPDATE stages SET done=?, total=?, unit=? WHERE job_id=? AND name=?",
                (p.done, p.total, p.unit, job_id, e.stage),
            )
        elif e.type == pb.EVENT_TYPE_METRICS:
            row = db.execute("SELECT metrics FROM stages WHERE job_id=? AND name=?", (job_id, e.stage)).fetchone()
            if row is not None:
                metrics = {**json.loads(row["metrics"]), **dict(e.metrics)}
                db.execute(
                    "UPDATE stages SET metrics=? WHERE job_id=? AND name=?", (json.dumps(metrics), job_id, e.stage)
                )
        elif e.type == pb.EVENT_TYPE_ARTIFACT:
            db.execute(
                "INSERT OR REPLACE INTO artifacts VALUES (?,?,?)",
                (job_id, e.artifact.name, e.artifact.SerializeToString()),
            )
        return True

    def _job(self, db: sqlite3.Connection, job_id: str) -> pb.Job:
        r = db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        job = pb.Job(
            id=r["id"],
            request_id=r["request_id"],
            spec=pb.JobSpec.FromString(r["spec"]),
            state=r["state"],
            error=pb.JobError(stage=r["error_stage"], reason=r["error_reason"]),
            create_time=timestamp(r["create_time"]),
            start_time=timestamp(r["start_time"]),
            end_time=timestamp(r["end_time"]),
            last_event_seq=r["last_event_seq"],
        )
        for lr in db.execute("SELECT key, value FROM job_labels WHERE job_id=?", (job_id,)):
            job.labels[lr["key"]] = lr["value"]
        for s in db.execute("SELECT * FROM stages WHERE job_id=? ORDER BY idx", (job_id,)):
            job.stages.append(
                pb.StageStatus(
                    name=s["name"],
                    kind=s["kind"],
                    state=s["state"],
                    progress=pb.Progress(done=s["done"], total=s["total"], unit=s["unit"]),
                    metrics=json.loads(s["metrics"]),
                    error=s["error"],
                    start_time=timestamp(s["start_time"]),
                    end_time=timestamp(s["end_time"]),
                )
            )
        return job
