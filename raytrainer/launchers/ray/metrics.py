"""A Ray fit's live figures as Ray metrics (``ray.util.metrics``), recorded by the driver from rank 0's heartbeats
(about one a second) and the run's events, so they reach Ray's Prometheus endpoint and the Grafana dashboards of a
cluster. Ray exports each under ``ray_<name>``; every series carries ``run`` (the run name of the Ray actors,
``raytrainer-<run>-rank-N``) and ``log_dir`` (where the run writes), and the loss its logged name (``metric``).
Ray's metrics agent drops a gauge that was not recorded for two export intervals, so every gauge is recorded again
each second while the fit runs: a finished run's series go away after that."""
from __future__ import annotations

import time
from typing import Any

from raytrainer.utilities import log

GAUGES = {
    "raytrainer_step": "Optimizer steps done (global_step, as rank 0 last reported it).",
    "raytrainer_epoch": "The training epoch rank 0 is in (current_epoch).",
    "raytrainer_loss": "The training loss the progress bar shows (train_loss_step, train_loss or loss, else the "
                       "first prog_bar value named *loss*); the 'metric' tag names it.",
    "raytrainer_steps_per_second": "Optimizer steps per second between rank 0's last two heartbeats (samples per "
                                   "second: times the global batch size).",
    "raytrainer_world_size": "Ranks in the running world (changes on elastic resizes and shrinks after failures).",
    "raytrainer_seconds_since_checkpoint": "Seconds since the newest checkpoint file was complete on storage "
                                           "(since the fit started, before the first one).",
}
COUNTERS = {
    "raytrainer_failures": "Rank failures of the fit (deaths, lost nodes, hangs, errors); Prometheus: "
                           "ray_raytrainer_failures_total.",
}
TAGS = ("run", "log_dir")
_METRICS: dict[str, Any] = {}  # one Ray metric object per name, for the life of the process (Ray keeps them)
TICK_S = 1.0  # every gauge is recorded again (seconds_since_checkpoint updated) at most this often


def _metric(name: str) -> Any:
    """The process's Ray metric called ``name``, created on first use."""
    if name not in _METRICS:
        from ray.util.metrics import Counter, Gauge

        if name in COUNTERS:
            _METRICS[name] = Counter(name, description=COUNTERS[name], tag_keys=TAGS)
        else:
            _METRICS[name] = Gauge(name, description=GAUGES[name],
                                   tag_keys=TAGS + (("metric",) if name == "raytrainer_loss" else ()))
    return _METRICS[name]


class RunMetrics:
    """Records one fit's figures; a metric that cannot be recorded is skipped (logged at debug), never raised.
    ``enabled=False`` (a tuner's trial, not a run of the user's) records nothing."""

    def __init__(self, run: str, log_dir: str | None, enabled: bool = True) -> None:
        self.enabled = enabled
        self.tags = {"run": run, "log_dir": str(log_dir or "")}
        self.checkpoint_at = time.monotonic()  # before the first checkpoint: since the fit started
        self._last_beat: tuple[int, float] | None = None
        self._ticked = -float("inf")
        self._values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}  # what tick() records again

    def _set(self, name: str, value: float, **tags: str) -> None:
        if not self.enabled:
            return
        self._values[(name, tuple(sorted(tags.items())))] = float(value)
        self._record(name, float(value), tags)

    def _record(self, name: str, value: float, tags: dict[str, str], method: str = "set") -> None:
        """``metric.set`` (a gauge) or ``metric.inc`` (a counter) with the run's tags; skipped if Ray refuses."""
        try:
            getattr(_metric(name), method)(value, tags={**self.tags, **tags})
        except Exception as err:  # noqa: BLE001 - metrics never stop a run
            log.debug("could not record the Ray metric %s: %s", name, err)

    def heartbeat(self, step: int, epoch: int, loss: tuple[str, float] | None = None) -> None:
        """Rank 0's step, epoch and loss; the step rate since the previous heartbeat."""
        now = time.monotonic()
        self._set("raytrainer_step", step)
        self._set("raytrainer_epoch", epoch)
        if loss is not None:
            self._set("raytrainer_loss", loss[1], metric=str(loss[0]))
        if self._last_beat is not None and now > self._last_beat[1] and step >= self._last_beat[0]:
            self._set("raytrainer_steps_per_second", (step - self._last_beat[0]) / (now - self._last_beat[1]))
        self._last_beat = (step, now)
        self.tick(now)

    def world(self, size: int) -> None:
        """The world a (re)start of the ranks runs at."""
        self._set("raytrainer_world_size", size)
        self._last_beat = None  # the step rate starts again with the new ranks

    def failure(self) -> None:
        if self.enabled:
            self._record("raytrainer_failures", 1, {}, method="inc")

    def checkpoint(self) -> None:
        """A checkpoint file is complete on storage."""
        self.checkpoint_at = time.monotonic()
        self.tick(force=True)

    def tick(self, now: float | None = None, force: bool = False) -> None:
        """Record the seconds since the last checkpoint and every gauge's value again (at most once per ``TICK_S``
        unless ``force``), so that Ray keeps exporting them."""
        now = time.monotonic() if now is None else now
        if not (force or now - self._ticked >= TICK_S):
            return
        self._ticked = now
        self._set("raytrainer_seconds_since_checkpoint", now - self.checkpoint_at)
        for (name, tags), value in self._values.items():
            if name != "raytrainer_seconds_since_checkpoint":
                self._record(name, value, dict(tags))
