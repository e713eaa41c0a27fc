"""The edges between roles: bounded queues that carry references to batches, never single
samples; the loop that moves batches through a role (pump); and the filter that drops batch ids a
consumer has already seen.

One put/get on a Ray queue costs ~2 ms, so a queue item is an ObjectRef to an Arrow record batch
in the object store. Bounds give backpressure: a fast producer blocks on a full queue.
"""

from __future__ import annotations

import queue
import time

END = "__end__"  # the end-of-stream marker, one per consumer


class Seen:
    """Drops batches whose id was already consumed (a replayed or re-sent batch)."""

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.dropped = 0

    def fresh(self, bid: str) -> bool:
        if bid in self.ids:
            self.dropped += 1
            return False
        self.ids.add(bid)
        return True


class Channel:
    """One end of a queue. With by_ref, items are ObjectRefs to batches in the Ray object store;
    without, plain batches (tests and single-process use pass a queue.Queue)."""

    def __init__(self, queue, by_ref: bool = True):
        self.queue, self.by_ref = queue, by_ref

    def put(self, item, timeout: float | None = None) -> bool:
        """Put an item; with a timeout, False when the queue stayed full that long."""
        if self.by_ref and item is not END:
            # In a list: Ray resolves an ObjectRef passed directly as an argument (to the queue
            # actor), which would copy the batch into the queue instead of its reference.
            import ray  # here: by value, a channel (and the roles using it) runs without Ray

            item = [ray.put(item)]
        try:
            self.queue.put(item, timeout=timeout)
        except queue.Full:  # ray.util.queue.Full is one
            return False
        return True

    def get(self, timeout: float | None = None):
        """The next item; timeout 0: only one already waiting (else Empty, as with a timeout)."""
        item = self.queue.get(block=timeout != 0, timeout=timeout or None)
        if self.by_ref and isinstance(item, list):
            import ray

            return ray.get(item[0])
        return item

    def size(self) -> int:
        return self.queue.qsize()


def pump(inbox: Channel, outbox: Channel, work, on_batch=None) -> int:
    """Move batches from inbox through work() to outbox until the END marker; return how many.
    on_batch(batch_in, batch_out, seconds) reports each one (metrics)."""
    count = 0
    while True:
        item = inbox.get()
        if isinstance(item, str) and item == END:
            return count
        started = time.perf_counter()
        out = work(item)
        outbox.put(out)
        count += 1
        if on_batch is not None:
            on_batch(item, out, time.perf_counter() - started)
