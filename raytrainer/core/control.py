"""Stop requests that reach a rank from outside its training loop: SIGTERM, or the driver.

A rank's loop polls ``stop_reason()`` at every step boundary (a module global read, no I/O). The
ranks then agree on the step to stop at (see ``strategies.base.LaggedAgreement``).
"""
from __future__ import annotations

import signal
import threading
from typing import Any

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later" - rerun the same command to resume

_reason: str | None = None
_addressed_to: str | None = None  # the run a driver's request names: it outlives the reset at that run's start
_lock = threading.Lock()


class Preempted(SystemExit):
    """Raised by fit after a preemption checkpoint was written; exits with PREEMPTED_EXIT_CODE."""

    def __init__(self, message: str, checkpoint: str | None = None) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)
        self.message = message
        self.checkpoint = checkpoint

    def __str__(self) -> str:
        return self.message


def request_stop(reason: str, run: str | None = None) -> None:
    """Ask this process's training loop to stop at the next agreed step ("preempt" or "resize"). A request
    naming its ``run`` may come before that run's rank has started (and reset) and still counts."""
    global _reason, _addressed_to
    with _lock:
        if _reason != "preempt":  # a preemption is never downgraded to a resize
            _reason = reason
        if run is not None:
            _addressed_to = run


def stop_reason() -> str | None:
    return _reason


def reset(run: str | None = None) -> None:
    """Forget stop requests of earlier runs in this process; one addressed to ``run`` (the run starting now) stays."""
    global _reason, _addressed_to
    with _lock:
        if run is None or _addressed_to != run:
            _reason = None
        _addressed_to = None


def install_sigterm_handler() -> Any:
    """Turn SIGTERM into a preemption request (main thread only); returns the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        request_stop("preempt")

    return signal.signal(signal.SIGTERM, handler)


def restore_sigterm_handler(previous: Any) -> None:
    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, previous)
