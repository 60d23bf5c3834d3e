"""Warm worker groups: the rank processes of a finished call serve the next call whose plan matches.

Starting a group (placing it, starting one process per rank that imports torch, forming the process group) takes
seconds; a notebook, a sweep, or ``fit`` followed by ``test`` would pay it on every call. A group whose call ended
cleanly is kept here, idle, with its processes and process group; the next ``fit``/``validate``/``test``/
``predict`` with the same group arguments (world, layout, resources, backend, forwarded environment, driver
``sys.path``) in the same Ray session takes it instead of starting one. Each call rebuilds its Trainer, module, RNG
and stop state on the ranks (``rank_entry``), so a reused rank runs as a fresh one.

At most one group is kept: taking, or starting a group of another shape, releases the idle one first, so an idle
group never holds resources another call needs. It is released after ``RAYTRAINER_WARM_IDLE_S`` seconds idle
(default 120; 0 keeps no group), by ``raytrainer.shutdown()``, and at interpreter exit. A call that failed never
returns its group here.
"""
from __future__ import annotations

import sys
import threading
from typing import Any

from raytrainer.utilities import env_number, log

DEFAULT_IDLE_S = 120.0

_lock = threading.Lock()
_idle: tuple[tuple[Any, ...], Any, threading.Timer | None] | None = None  # (key, group, idle timer)


def idle_seconds() -> float:
    """How long an idle group is kept: ``RAYTRAINER_WARM_IDLE_S`` (seconds; 0 turns warm groups off)."""
    return env_number("RAYTRAINER_WARM_IDLE_S", DEFAULT_IDLE_S,
                      "a number of seconds >= 0 (0 keeps no warm group)")


def group_key(args: dict[str, Any]) -> tuple[Any, ...]:
    """What a group must match to serve a call: its arguments (but the run name, the waits, the spares and the
    environment), the Ray session, and the driver's ``sys.path`` (which the rank processes copied when they
    started)."""
    import ray

    # the environment travels with each call (RankPayload.env), so a new seed reuses the group too
    skip = {"run_name", "placement_timeout_s", "start_timeout_s", "poll_interval_s", "spares_per_node", "env"}
    fields = tuple(sorted((k, _hashable(v)) for k, v in args.items() if k not in skip))
    session = ray.get_runtime_context().get_job_id() if ray.is_initialized() else None
    return fields, session, tuple(sys.path)


def _hashable(value: Any) -> Any:
    return tuple(sorted(value.items())) if isinstance(value, dict) else value


def take(key: tuple[Any, ...], spares_per_node: int = 0) -> Any:
    """The idle group for ``key`` (with at least ``spares_per_node`` spares), alive, or None; an idle group of
    another shape is released."""
    global _idle
    with _lock:
        held, _idle = _idle, None
    if held is None:
        return None
    held_key, group, timer = held
    if timer is not None:
        timer.cancel()
    if held_key == key and group.spares_per_node >= spares_per_node and group.responsive():
        log.debug("worker group %s: reused (warm)", group.run_name)
        return group
    _release(group)
    return None


def put(group: Any, key: tuple[Any, ...]) -> None:
    """Keep ``group`` (whose call ended cleanly) for the next call, releasing the one kept before."""
    global _idle
    seconds = idle_seconds()
    if seconds == 0:
        _release(group)
        return
    timer = threading.Timer(seconds, _expire, args=(group,))
    timer.daemon = True
    with _lock:
        previous, _idle = _idle, (key, group, timer)
    if previous is not None and previous[1] is not group:
        if previous[2] is not None:
            previous[2].cancel()
        _release(previous[1])
    timer.start()


def release(group: Any, ok: bool) -> None:
    """After a call: a group whose call ended cleanly (``ok``) and whose shape may be kept (``pool_args`` set by the
    launcher) stays warm for the next call; any other is shut down."""
    args = getattr(group, "pool_args", None)
    if ok and args is not None and group.started:
        put(group, group_key(args))
    else:
        group.shutdown()


def shutdown() -> None:
    """Release the idle group now (its processes end and its resources are free when this returns)."""
    global _idle
    with _lock:
        held, _idle = _idle, None
    if held is not None:
        if held[2] is not None:
            held[2].cancel()
        _release(held[1])


def held() -> Any:
    """The idle group kept, or None (for tests and ``raytrainer status`` style reporting)."""
    with _lock:
        return None if _idle is None else _idle[1]


def _expire(group: Any) -> None:
    """The idle timer: release ``group`` if it is still the one kept."""
    global _idle
    with _lock:
        if _idle is None or _idle[1] is not group:
            return
        _idle = None
    log.debug("worker group %s: released after %.0f s idle", group.run_name, idle_seconds())
    _release(group)


def _release(group: Any) -> None:
    try:
        group.shutdown(graceful=False)
    except Exception as err:  # noqa: BLE001 - a group of an ended Ray session has nothing left to free
        log.debug("worker group %s: shutdown failed: %s", group.run_name, err)
