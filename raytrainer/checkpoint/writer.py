"""AsyncCheckpointWriter: write checkpoints on a background thread while training goes on.

``submit`` copies the checkpoint's tensors to host memory on the calling thread
(``host_copy.to_host``), so training may change them right after; serialising, hashing and the
crash-safe write (``raytrainer.io.storage.save``: temporary file or upload, manifest) run on the
writer thread. ``submit(..., on_written=f)`` calls ``f(uri)`` on the writer thread once the file is
complete on storage (never for a write that failed), so a caller records a checkpoint only when it exists.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import traceback
from collections.abc import Callable
from typing import Any

import pyarrow.fs as pafs

from raytrainer.checkpoint.host_copy import to_host
from raytrainer.io import storage

__all__ = ["AsyncCheckpointWriter"]

logger = logging.getLogger(__name__)


class AsyncCheckpointWriter:
    """Save checkpoints on one background thread so training continues while bytes go to storage.

    ``submit`` copies the tensors to CPU in the calling thread (so training may change them right
    after), then serialization, hashing and the atomic write run on the background thread.
    Background errors are logged when they happen and re-raised by the next ``submit``, ``wait``
    or ``close``. At most ``max_pending`` checkpoints are queued or being written; a further
    ``submit`` waits (up to its timeout) for room, which bounds host memory. Writes still queued
    when the program's main thread ends are finished before the interpreter exits.
    """

    def __init__(self, *, max_pending: int = 1, filesystem: pafs.FileSystem | None = None) -> None:
        """Create an idle writer; the thread starts on the first ``submit``."""
        if not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be an int >= 1, got {max_pending!r}")
        self._max_pending = max_pending
        self._filesystem = filesystem
        self._queue: queue.Queue = queue.Queue()
        self._cond = threading.Condition()
        self._pending = 0
        self._in_flight: str | None = None
        self._errors: list[tuple[BaseException, str]] = []
        self._closed = False
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        """Number of submitted checkpoints not yet written."""
        with self._cond:
            return self._pending

    def submit(self, obj: dict, uri: str, *, staged: bool = False, timeout: float | None = 600,
               on_written: Callable[[str], None] | None = None) -> None:
        """Queue ``obj`` to be saved at ``uri``; pass ``staged=True`` if it already is a host copy (``to_host``).
        ``on_written(uri)`` runs on the writer thread once the file is complete on storage, never after a failure."""
        if not isinstance(obj, dict):
            raise TypeError(f"submit() writes checkpoint dicts, got {type(obj).__name__} for {uri}")
        if not isinstance(uri, (str, os.PathLike)) or not os.fspath(uri):
            raise ValueError(f"submit() needs a checkpoint path or URI, got {uri!r}")
        if on_written is not None and not callable(on_written):
            raise TypeError(f"submit(on_written=...) takes a function of the written URI, got {on_written!r}")
        uri = os.fspath(uri)
        with self._cond:
            if self._closed:
                raise RuntimeError("AsyncCheckpointWriter is closed; create a new one to write more checkpoints")
            has_room = self._cond.wait_for(lambda: self._pending < self._max_pending or self._errors, timeout)
            if not has_room:
                raise TimeoutError(
                    f"checkpoint {uri} not submitted: {self._pending} earlier write(s) still running after "
                    f"{timeout}s (in flight: {self._in_flight}); storage is slower than the checkpoint interval"
                )
            errors, self._errors = self._errors, []
            if not errors:
                self._pending += 1  # reserve the slot before the (slow) staging copy
        self._raise(errors)
        try:
            payload = obj if staged else to_host(obj)
        except BaseException:
            with self._cond:
                self._pending -= 1
                self._cond.notify_all()
            raise
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="raytrainer-checkpoint-writer")
            self._thread.start()
        self._queue.put((payload, uri, on_written))

    def wait(self, timeout: float | None = 600) -> None:
        """Block until every submitted checkpoint is written, then re-raise the first background error."""
        with self._cond:
            done = self._cond.wait_for(lambda: self._pending == 0, timeout)
            if not done:
                raise TimeoutError(f"{self._pending} checkpoint write(s) still running after {timeout}s "
                                   f"(in flight: {self._in_flight})")
        self._raise_errors()

    def close(self, timeout: float | None = 600) -> None:
        """Finish outstanding writes, stop the thread and re-raise any unreported background error."""
        with self._cond:
            already = self._closed
            self._closed = True
        if not already and self._thread is not None:
            try:
                self.wait(timeout)
            finally:
                self._queue.put(None)
                self._thread.join(timeout)
        self._raise_errors()

    def __enter__(self) -> AsyncCheckpointWriter:
        """Use as a context manager that closes (and reports errors) on exit."""
        return self

    def __exit__(self, *exc_info: Any) -> None:
        """Close the writer; a background error is raised unless another error is already propagating."""
        if exc_info[0] is None:
            self.close()
            return
        try:
            self.close()
        except Exception:
            logger.exception("AsyncCheckpointWriter failed while the block was already raising")

    def _raise_errors(self) -> None:
        """Raise the first unreported background error, if any."""
        with self._cond:
            errors, self._errors = self._errors, []
        self._raise(errors)

    @staticmethod
    def _raise(errors: list[tuple[BaseException, str]]) -> None:
        """Raise the first of ``errors`` (noting the others); do nothing when there are none."""
        if not errors:
            return
        exc, uri = errors[0]
        note = f"raised on the AsyncCheckpointWriter thread while writing checkpoint {uri}"
        if len(errors) > 1:
            note += f"; {len(errors) - 1} later write(s) failed too: {[u for _, u in errors[1:]]}"
        exc.add_note(note)
        raise exc

    def _run(self) -> None:
        """Background loop: write queued checkpoints; exit on close or once the main thread has ended."""
        while True:
            try:
                item = self._queue.get(timeout=0.2)
            except queue.Empty:
                if not threading.main_thread().is_alive():
                    return  # interpreter shutdown and the queue is drained
                continue
            if item is None:
                return
            payload, uri, on_written = item
            del item
            with self._cond:
                self._in_flight = uri
            try:
                storage.save(payload, uri, filesystem=self._filesystem)
            except BaseException as exc:  # reported to the caller; never swallowed
                logger.error("background checkpoint write to %s failed", uri, exc_info=exc)
                traceback.clear_frames(exc.__traceback__)  # keep the lines, drop the staged tensors
                with self._cond:
                    self._errors.append((exc, uri))
            else:
                if on_written is not None:  # before the slot is released, so wait() returning means it ran
                    try:
                        on_written(uri)
                    except Exception:  # the file is written; a failing notification must not fail the write
                        logger.exception("the completion callback of checkpoint %s failed", uri)
            finally:
                del payload
                with self._cond:
                    self._pending -= 1
                    self._in_flight = None
                    self._cond.notify_all()
