"""Naming the rank that hung, not the ones waiting for it.

Each rank keeps, in its own memory, which thread runs its fit and where the fit is (its session's step counters and
the time of its last step): no message per step. Only when the driver suspects a hang (rank 0's heartbeats stopped,
or a collective timed out on some rank) does it ask every rank, beside the running call, for a ``RankProgress``:
its step, the seconds since its last step and the Python stack of its training thread. ``find_hung`` then tells the
rank(s) that stopped in their own code from the ranks that wait for them inside a collective.
"""
from __future__ import annotations

import os
import sys
import sysconfig
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any

_WATCHED: dict[str, Any] = {}  # "thread": ident of the thread running the fit, "session": its RankSession

# Where a frame counts as "waiting for the other ranks": torch.distributed's collectives, DDP's reducer (its
# all-reduce finishes inside loss.backward()), and autograd's backward, which waits for that all-reduce.
_COLLECTIVE_PARTS = (f"{os.sep}torch{os.sep}distributed{os.sep}", f"{os.sep}torch{os.sep}nn{os.sep}parallel{os.sep}")
_BACKWARD_FUNCS = frozenset({"backward", "run_backward", "_engine_run_backward", "manual_backward"})
STACK_FRAMES = 12  # frames of a stuck rank's stack shown in the error (innermost last)


def watch(session: Any) -> None:
    """Called by the thread that runs a rank's fit: the one whose stack a hang report shows."""
    _WATCHED.update(thread=threading.get_ident(), session=session)


def unwatch() -> None:
    _WATCHED.clear()


@dataclass
class RankProgress:
    """Where one rank is: counters of its fit, seconds since its last step, and its training thread's stack."""

    rank: int
    node_ip: str
    pid: int
    step: int | None = None
    epoch: int | None = None
    batch: int | None = None
    idle_s: float | None = None  # since the last training step boundary (None before the first)
    stack: list[tuple[str, int, str, str]] = field(default_factory=list)  # (file, line, function, code)

    @property
    def waiting(self) -> bool:
        """True when the training thread's innermost Python frame is a collective (or autograd's backward, which
        waits for DDP's all-reduce); a user's own code there (a custom backward) is not waiting."""
        return bool(self.stack) and _in_collective(self.stack[-1][0], self.stack[-1][2])

    @property
    def where(self) -> str:
        """The innermost frame of the user's own code (else the innermost frame): ``training_step (model.py:42)``."""
        if not self.stack:
            return "no running fit"
        path, line, func, _ = next((f for f in reversed(self.stack) if _users(f[0])), self.stack[-1])
        return f"{func} ({os.path.basename(path)}:{line})"

    def stack_text(self, frames: int = STACK_FRAMES) -> str:
        return "".join(traceback.format_list(list(self.stack[-frames:])))


def report(info: Any) -> RankProgress:
    """(rank side, a side call) This rank's progress and the stack of the thread running its fit."""
    progress = RankProgress(rank=info.global_rank, node_ip=getattr(info, "node_ip", "") or "", pid=os.getpid())
    session, thread = _WATCHED.get("session"), _WATCHED.get("thread")
    if session is None or thread is None:
        return progress
    state = session.state
    progress.step, progress.epoch, progress.batch = state.global_step, state.current_epoch, state.batch_idx
    snapshotter = getattr(session, "snapshotter", None)
    progress.idle_s = snapshotter.since_last_step_s() if snapshotter is not None else None
    frame = sys._current_frames().get(thread)
    if frame is not None:
        progress.stack = [(f.filename, f.lineno or 0, f.name, f.line or "") for f in traceback.extract_stack(frame)]
    return progress


@dataclass
class HangReport:
    """Which ranks stopped (``hung``), which wait in a collective, which did not answer; and the words for it."""

    hung: list[int]
    waiting: list[int]
    silent: list[int]
    progress: dict[int, RankProgress]
    summary: str
    details: str

    @property
    def first(self) -> RankProgress | None:
        return self.progress.get(self.hung[0]) if self.hung else None


def find_hung(answers: list[RankProgress | None], trigger: str) -> HangReport:
    """Name the rank(s) that stopped, from every rank's answer (None: it did not answer the side call).

    A rank that did not answer is stuck outside Python (native code holding the GIL) or its process is stopped. Of the
    ranks that answered, those whose training thread is not inside a collective stopped in their own code; when every
    rank waits in a collective, the ones behind the others (lowest step, then batch) are named.
    """
    progress = {p.rank: p for p in answers if p is not None}
    silent = [r for r, p in enumerate(answers) if p is None]
    waiting = sorted(r for r, p in progress.items() if p.waiting)
    running = sorted(r for r, p in progress.items() if not p.waiting and p.stack)
    if silent or running:
        hung = silent + running
    elif waiting:
        behind = min((progress[r].step or 0, progress[r].batch or 0) for r in waiting)
        hung = [r for r in waiting if ((progress[r].step or 0), (progress[r].batch or 0)) == behind]
        if len(hung) == len(waiting):
            hung = []  # all at the same place, all in a collective: nobody is behind
    else:
        hung = []
    lines = [_describe(r, progress.get(r), r in hung) for r in range(len(answers))]
    if hung:
        first = progress.get(hung[0])
        what = "did not answer" if first is None else (
            f"hung at step {first.step} (epoch {first.epoch}, batch {first.batch}) in {first.where}"
            + (f", no step for {first.idle_s:.0f} s" if first.idle_s is not None else ""))
        others = [r for r in waiting if r not in hung]
        summary = f"rank {hung[0]} {what}" + (f"; also stopped: rank(s) {hung[1:]}" if len(hung) > 1 else "") + (
            f"; rank(s) {others} wait for it in a collective" if others else "")
    elif waiting:
        summary = (f"every rank waits in a collective at step {progress[waiting[0]].step}: they called different "
                   "collectives, or the network between them is down")
    else:
        summary = "no rank reported a running fit"
    details = f"{trigger}.\n" + "\n".join(lines)
    return HangReport(hung, waiting, silent, progress, summary, details)


def _describe(rank: int, p: RankProgress | None, hung: bool) -> str:
    if p is None:
        return (f"  rank {rank}: did not answer (stuck in native code that holds the GIL, or its process is stopped "
                "or gone)")
    head = f"  rank {rank} (node {p.node_ip or '?'}, pid {p.pid})"
    if p.step is None:
        return f"{head}: no fit running"
    state = "waits in a collective" if p.waiting else "stopped" if hung else "running"
    idle = f", last step {p.idle_s:.0f} s ago" if p.idle_s is not None else ""
    line = f"{head}: {state} at step {p.step} (epoch {p.epoch}, batch {p.batch}){idle}, in {p.where}"
    if hung and p.stack:
        line += ". Its stack (innermost last):\n" + p.stack_text().rstrip("\n")
    return line


def _in_collective(path: str, func: str) -> bool:
    return func in _BACKWARD_FUNCS and f"{os.sep}torch{os.sep}" in path or any(part in path for part in
                                                                             _COLLECTIVE_PARTS)


_LIBRARY_DIRS = tuple({os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))) + os.sep,
                       sysconfig.get_paths()["stdlib"] + os.sep, sysconfig.get_paths()["purelib"] + os.sep,
                       sysconfig.get_paths()["platlib"] + os.sep})


def _users(path: str) -> bool:
    """A frame of the user's code: not raytrainer, not the standard library, not an installed package."""
    return not path.startswith(_LIBRARY_DIRS) and not path.startswith("<")
