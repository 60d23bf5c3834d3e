"""The run's events log: one JSON object per line in ``<run dir>/events.jsonl``.

Each event has ``time`` (unix seconds), ``event`` (start, failure, restart, resize,
snapshot_fallback, checkpoint, preemption, finish), ``world_size``, ``step``, ``epoch`` and
``cause``; failures add ``rank`` and ``node``, checkpoints ``path``. The driver prints a one-line
summary of each that changes the run (``ECHOED``) as it happens, the others only with ``RAYTRAINER_LOG=debug``.
Works on local paths and on any pyarrow filesystem URI (the file is rewritten whole on object stores, which cannot
append; a run has few events).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

from raytrainer.utilities import log

EVENT_KINDS = ("start", "failure", "restart", "resize", "snapshot_fallback", "checkpoint", "preemption", "finish")
# the events whose line the console shows; checkpoints and snapshot fallbacks are in the file (and at debug level)
ECHOED = ("start", "failure", "restart", "resize", "preemption", "finish")
FILENAME = "events.jsonl"


class NoEvents:
    """The events log of a run that is not the user's (a tuner's trial): it records nothing."""

    def emit(self, *args: Any, **kwargs: Any) -> None:
        """Drop the event."""


class EventLog:
    """Appends events to ``<run_dir>/events.jsonl`` and echoes each as one line (INFO for ``ECHOED``, else DEBUG).

    ``best_effort=True`` (the Ray driver, whose log only records what the ranks do): a failed write is logged, not
    raised, so it never hides the ranks' error; the events stay in memory and go to the file with the next write
    that succeeds, and after storage did not answer (``StorageTimeout``) no write is tried for one storage bound
    (``RAYTRAINER_STORAGE_TIMEOUT_S``), so the driver does not wait on a dead store at every event.
    """

    def __init__(self, run_dir: str, echo: bool = True, best_effort: bool = False) -> None:
        self.run_dir = run_dir
        self.echo = echo
        self.best_effort = best_effort
        self.events: list[dict[str, Any]] = []
        self._unwritten: list[str] = []      # local lines a best-effort write could not append yet
        self._failing: str | None = None     # the write error last logged (best effort), until a write succeeds
        self._quiet_until = 0.0              # monotonic time before which a best-effort log skips remote writes

    @property
    def path(self) -> str:
        from raytrainer.io import storage

        return storage.join(self.run_dir, FILENAME)

    def emit(self, event: str, *, world_size: int, step: int, epoch: int = 0, cause: str | None = None,
             **extra: Any) -> dict[str, Any]:
        """Record one event; unknown kinds are refused so readers can rely on the vocabulary."""
        if event not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {event!r}; expected one of {EVENT_KINDS}")
        record = {"time": round(time.time(), 3), "event": event, "world_size": int(world_size), "step": int(step),
                  "epoch": int(epoch), "cause": cause, **extra}
        self.events.append(record)
        if self.best_effort:
            self._write_best_effort(record)
        else:
            self._write(record)
        if self.echo:
            log.log(logging.INFO if event in ECHOED else logging.DEBUG, "%s", summarize(record))
        return record

    def _is_local(self) -> bool:
        return "://" not in self.run_dir or self.run_dir.startswith("file://")

    def _write(self, record: dict[str, Any]) -> None:
        from raytrainer.io import storage

        line = json.dumps(record, default=str) + "\n"
        if self._is_local():
            path = self.path[len("file://"):] if self.path.startswith("file://") else self.path
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "a") as f:
                f.write("".join(self._unwritten) + line)
            self._unwritten = []
            return
        with storage.operation("writing the events log", self.path):  # one watched call: read, then rewrite
            text = "".join(json.dumps(r, default=str) + "\n" for r in read_events(self.run_dir, missing_ok=True)
                           if r not in self.events[:-1])
            text += "".join(json.dumps(r, default=str) + "\n" for r in self.events)
            storage.makedirs(self.run_dir)
            storage.write_bytes_atomic(self.path, text.encode(), manifest=False)

    def _write_best_effort(self, record: dict[str, Any]) -> None:
        """``_write``, logging instead of raising; see the class docstring."""
        from raytrainer.io import storage

        if not self._is_local() and time.monotonic() < self._quiet_until:
            return  # written with the first event after the pause (a remote write rewrites every event)
        try:
            self._write(record)
        except Exception as exc:  # noqa: BLE001 - the events log must not end or mask the run
            if self._is_local():
                self._unwritten.append(json.dumps(record, default=str) + "\n")
            if isinstance(exc, storage.StorageTimeout):
                self._quiet_until = time.monotonic() + storage.storage_timeout_s()
            problem = f"{type(exc).__name__}: {exc}".splitlines()[0]
            if problem != self._failing:
                self._failing = problem
                log.warning("could not write the events log %s (the run goes on; its events are kept and written "
                            "with the next event once storage answers): %s", self.path, problem)
            return
        if self._failing is not None:
            self._failing = None
            log.info("the events log %s is written again", self.path)


def command_fields() -> dict[str, Any]:
    """How this run was started, so `raytrainer status` can print the command that resumes it."""
    fields: dict[str, Any] = {"argv": list(sys.argv)}
    if os.environ.get("RAYTRAINER_COMMAND"):
        fields["command"] = json.loads(os.environ["RAYTRAINER_COMMAND"])
    return fields


def summarize(record: dict[str, Any]) -> str:
    """One human line for an event, as the driver prints it."""
    parts = [f"[{record['event']}]", f"step {record['step']}", f"epoch {record['epoch']}",
             f"world size {record['world_size']}"]
    for key in ("rank", "node", "path"):
        if record.get(key) not in (None, ""):
            parts.append(f"{key} {record[key]}")
    if record.get("cause"):
        parts.append(f"cause: {record['cause']}")
    return " | ".join(parts)


def read_events(run_dir: str, missing_ok: bool = False) -> list[dict[str, Any]]:
    """All events of a run directory (local path or URI), oldest first."""
    from raytrainer.io import storage

    path = storage.join(run_dir, FILENAME)
    with storage.operation("reading the events log", path):
        if not storage.exists(path):
            if missing_ok:
                return []
            raise FileNotFoundError(f"{path} does not exist: {run_dir} is not a raytrainer run directory "
                                    "(expected lightning_logs/version_N with an events.jsonl).")
        fs, p = storage.resolve(path)
        with fs.open_input_stream(p) as f:
            text = f.read().decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]
