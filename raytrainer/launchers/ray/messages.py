"""Messages from code running on a rank to the driver: a bounded, thread-safe buffer per rank process.

Code running inside ``WorkerGroup.run`` calls ``send_to_driver(msg)``; the driver polls the buffer.
"""
from __future__ import annotations

import collections
import threading
from typing import Any

MESSAGE_BUFFER_SIZE = 10_000  # oldest messages are dropped beyond this; progress updates are lossy


class _MessageBuffer:
    """Thread-safe bounded queue of messages waiting for the driver."""

    def __init__(self, maxlen: int = MESSAGE_BUFFER_SIZE) -> None:
        self._items: collections.deque[Any] = collections.deque(maxlen=maxlen)
        self._lock = threading.Lock()
        self.dropped = 0

    def put(self, msg: Any) -> None:
        with self._lock:
            if len(self._items) == self._items.maxlen:
                self.dropped += 1
            self._items.append(msg)

    def drain(self) -> list[Any]:
        with self._lock:
            items = list(self._items)
            self._items.clear()
        return items


# Per-process state: one rank actor per process.
_BUFFER: _MessageBuffer | None = None


def send_to_driver(msg: Any) -> None:
    """Queue a small picklable message for the driver (e.g. a progress update from rank 0).

    The driver polls rank 0 while the run is going; other ranks' messages arrive when their run
    finishes. Only valid inside a function run by ``WorkerGroup.run``.
    """
    if _BUFFER is None:
        raise RuntimeError("send_to_driver() only works inside a function run on a Ray rank by "
                           "WorkerGroup.run(); check in_rank_worker() first")
    _BUFFER.put(msg)


def in_rank_worker() -> bool:
    """True inside a Ray rank actor process, where send_to_driver() works."""
    return _BUFFER is not None


def open_buffer() -> None:
    """(the rank actor, once) Start accepting messages in this process."""
    global _BUFFER
    _BUFFER = _MessageBuffer()


def drain_messages() -> list[Any]:
    """Messages sent since the last drain (empty outside a rank process)."""
    return _BUFFER.drain() if _BUFFER is not None else []
