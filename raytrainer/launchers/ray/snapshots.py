"""In-memory snapshots: the full training state at a step boundary, for recovery in seconds.

Every rank keeps its newest snapshot in its own memory (an actor method hands it out even while the
rank is stuck in a collective). Rank 0 also publishes one to the Ray object store every ten
seconds; the driver fetches it, so a copy lives on the driver's node as well, and the loss of any
single node never destroys the only copy. Recovery prefers the newest snapshot a survivor holds,
then the driver's copy, then the newest valid durable checkpoint.
"""
from __future__ import annotations

import math
import threading
import time
from typing import Any, Callable

from raytrainer.utilities import log

# The newest snapshot of this process (a rank actor): (global_step, state). Read by RankWorker methods.
_LATEST: tuple[int, dict[str, Any]] | None = None
_LOCK = threading.Lock()

AUTO_MAX_OVERHEAD = 0.01  # auto interval: snapshots may cost at most 1% of training time


def latest() -> tuple[int, dict[str, Any]] | None:
    """This process's newest snapshot, or None."""
    with _LOCK:
        return _LATEST


def clear() -> None:
    global _LATEST
    with _LOCK:
        _LATEST = None


class Snapshotter:
    """Takes snapshots every ``every_n_steps`` optimizer steps (None: as often as costs <= 1% of a step)."""

    def __init__(self, every_n_steps: int | None, publish: Callable[[int, dict[str, Any]], None] | None = None,
                 publish_every_s: float = 10.0, heartbeat: Callable[[int, int], None] | None = None,
                 heartbeat_every_s: float = 1.0) -> None:
        if every_n_steps is not None and every_n_steps < 0:
            raise ValueError(f"snapshot_every_n_steps={every_n_steps}: use an int >= 1, 0 for none, or None for "
                             "automatic.")
        self.enabled = every_n_steps != 0
        self.fixed = every_n_steps
        self.every = every_n_steps or 1
        self.publish = publish
        self.publish_every_s = publish_every_s
        self._last_step = -1
        self._last_publish = 0.0
        self._step_clock = 0.0
        self._clock_started = False
        self._step_time = 0.0
        self.cost_s = 0.0
        self.taken = 0
        self._publisher: threading.Thread | None = None
        self.heartbeat = heartbeat
        self.heartbeat_every_s = heartbeat_every_s
        self._last_beat = 0.0

    def maybe_take(self, trainer: Any) -> None:
        """Called at each step boundary; snapshots when the interval has passed."""
        step = trainer.global_step
        now = time.perf_counter()
        if self.heartbeat is not None and now - self._last_beat >= self.heartbeat_every_s:
            self._last_beat = now
            self.heartbeat(step, trainer.current_epoch)
        if step != self._last_step:
            # time per optimizer step, smoothed (only used to size the automatic interval); the clock starts at
            # the first step boundary, so setup and the first step's warm-up do not count
            if self._clock_started:
                dt = now - self._step_clock
                self._step_time = dt if self._step_time == 0 else 0.8 * self._step_time + 0.2 * dt
            self._clock_started = True
            self._step_clock = now
        if not self.enabled or step == self._last_step or step % self.every != 0:
            return
        self.take(trainer)
        cost = time.perf_counter() - now
        self.cost_s = cost if self.cost_s == 0 else 0.8 * self.cost_s + 0.2 * cost
        self._step_clock += cost  # do not count the snapshot as step time
        if self.fixed is None and self._step_time > 0:
            self.every = max(1, math.ceil(self.cost_s / (AUTO_MAX_OVERHEAD * self._step_time)))

    def take(self, trainer: Any) -> dict[str, Any]:
        """Stage the whole training state on the host now (the copy no later step can change)."""
        global _LATEST
        from raytrainer.checkpoint.format import dump_checkpoint
        from raytrainer.checkpoint.storage import to_cpu

        state = to_cpu(dump_checkpoint(trainer, weights_only=False))
        step = trainer.global_step
        with _LOCK:
            _LATEST = (step, state)
        self._last_step = step
        self.taken += 1
        if self.publish is not None and time.monotonic() - self._last_publish >= self.publish_every_s \
                and (self._publisher is None or not self._publisher.is_alive()):
            self._last_publish = time.monotonic()
            self._publisher = threading.Thread(target=self._publish, args=(step, state), daemon=True,
                                               name="raytrainer-snapshot-publisher")
            self._publisher.start()
        return state

    def _publish(self, step: int, state: dict[str, Any]) -> None:
        try:
            assert self.publish is not None
            self.publish(step, state)
        except Exception as exc:  # a lost publication only makes the driver's copy older
            log.warning("snapshot at step %d was not published to the driver: %s", step, exc)
