"""The supervisor's event file: what a dead supervisor wrote but nobody pulled reaches the store,
once, in order; a record cut short by the kill is ignored."""

from __future__ import annotations

from stillroom.actors.runtime.eventlog import EventLog, attempt_files, next_attempt_file, read_events
from stillroom.services.dispatcher import salvage
from stillroom.services.store import Store
from stillroom.v1 import job_pb2 as pb

from tests.unit.test_store import make


def _log(i: int) -> pb.Event:
    return pb.Event(type=pb.EVENT_TYPE_LOG, stage="sft", message=f"event {i}")


def test_the_file_holds_every_event_in_order_and_ignores_a_cut_record(tmp_path):
    path = next_attempt_file(tmp_path)
    log = EventLog(path)
    for i in range(3):
        log.append(_log(i))
    assert read_events(path) == log.since(0)[0]
    with path.open("ab") as f:  # a process killed in the middle of its next write
        f.write((500).to_bytes(4, "big") + b"partial")
    assert [pb.Event.FromString(b).message for b in read_events(path)] == ["event 0", "event 1", "event 2"]
    assert read_events(tmp_path / "missing.log") == []


def test_each_supervisor_gets_the_next_file(tmp_path):
    first, second = next_attempt_file(tmp_path), next_attempt_file(tmp_path)
    assert [p.name for p in attempt_files(tmp_path)] == ["supervisor-001.log", "supervisor-002.log"]
    assert (first.stat().st_size, second.stat().st_size) == (0, 0)


def test_salvage_adds_only_the_unpulled_events_once(tmp_path):
    store = Store(tmp_path / "jobs.db")
    make(store, "j1")
    log = EventLog(next_attempt_file(tmp_path / "j1"))
    for i in range(5):
        log.append(_log(i))
    pulled, cursor = log.since(0)
    store.append_events("j1", [pb.Event.FromString(b) for b in pulled[:2]], 2)  # the last pull saw two
    assert salvage(store, tmp_path / "j1", "j1", 2) == 3
    assert salvage(store, tmp_path / "j1", "j1", cursor) == 0  # a second look finds nothing new
    events = [e for e in store.events("j1") if e.type == pb.EVENT_TYPE_LOG]
    assert [e.message for e in events] == [f"event {i}" for i in range(5)]
    seqs = [e.seq for e in store.events("j1")]
    assert seqs == list(range(1, len(seqs) + 1))
    store.close()
