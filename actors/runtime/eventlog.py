"""A job's event log as its supervisor keeps it: in memory for the control service to pull, and,
given a file, appended there first, so the events a dead supervisor wrote but nobody pulled yet
are still read back (by the control service, into its store) and every attempt's events make the
report.

File format: each serialized Event preceded by its length (4 bytes, big-endian); one write per
event, so a process killed mid-write leaves at most one truncated record at the end, ignored.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from stillroom.v1 import job_pb2 as pb

_LENGTH = 4
log = logging.getLogger("stillroom.eventlog")


class EventLog:
    """Append-only, thread-safe list of serialized Events, mirrored to `path` when one is given."""

    def __init__(self, path: str | Path | None = None, on_append: Callable[[pb.Event], None] | None = None) -> None:
        """on_append(event) runs after each append (live TensorBoard); its errors are not the log's."""
        self._events: list[bytes] = []
        self._lock = threading.Lock()
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if path else None
        self.on_append = on_append

    def append(self, event: pb.Event) -> None:
        event.time.GetCurrentTime()
        body = event.SerializeToString()
        with self._lock:
            if self._fd is not None:  # the kernel has it once write returns: a killed process loses none
                os.write(self._fd, len(body).to_bytes(_LENGTH, "big") + body)
            self._events.append(body)
        if self.on_append is not None:
            try:
                self.on_append(event)
            except Exception:  # noqa: BLE001 - a sink that fails costs its own output, never the job
                log.exception("an event sink failed")

    def since(self, cursor: int) -> tuple[list[bytes], int]:
        with self._lock:
            return self._events[cursor:], len(self._events)


def read_events(path: str | Path) -> list[bytes]:
    """Every complete record of an event file (none if it does not exist)."""
    data = Path(path).read_bytes() if Path(path).exists() else b""
    records, at = [], 0
    while at + _LENGTH <= len(data):
        size = int.from_bytes(data[at : at + _LENGTH], "big")
        if at + _LENGTH + size > len(data):
            break  # the last write was cut short
        records.append(data[at + _LENGTH : at + _LENGTH + size])
        at += _LENGTH + size
    return records


def attempt_files(artifact_dir: str | Path) -> list[Path]:
    """The job's event files, one per supervisor it had, oldest first."""
    return sorted((Path(artifact_dir) / "events").glob("supervisor-*.log"))


def next_attempt_file(artifact_dir: str | Path) -> Path:
    """An empty event file for the job's next supervisor (created, so it is the newest at once)."""
    root = Path(artifact_dir) / "events"
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"supervisor-{len(attempt_files(artifact_dir)) + 1:03d}.log"
    path.touch()
    return path
