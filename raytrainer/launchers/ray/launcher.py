"""RayLauncher: the driver side of a multi-rank run. It never trains; it starts the rank actors,
draws rank 0's progress bar, and copies the trained state and metrics back when the run ends."""
from __future__ import annotations

import atexit
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch

from raytrainer.core import control
from raytrainer.core.events import EventLog, command_fields
from raytrainer.launchers.base import RankPayload, RunResult, merge_predictions
from raytrainer.launchers.ray.group import PlacementError, RankError, WorkerGroup, check_picklable, ensure_ray
from raytrainer.launchers.ray.rank import latest_snapshot, queued_messages, rank_entry, request_stop
from raytrainer.launchers.ray.policies import Failure, FailurePolicy, FailuresExhausted, ScalingPolicy, free_slots
from raytrainer.plan import Plan
from raytrainer.utilities import log, rng_states


class RayLauncher:
    """Runs a plan with more than one rank (or strategy="ray") on a group of Ray actors.

    ``fit`` runs under a small supervisor: it restarts after failures (up to ``max_failures``) from
    the newest snapshot, grows or shrinks an elastic world, and turns SIGTERM into a clean stop.
    """

    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    # ------------------------------------------------------------------ groups
    def _new_group(self, trainer: Any, world: int, spares: bool = False) -> Any:
        session, config = trainer.session, trainer.config
        nodes, per_node = self._scaling(trainer).layout(world) if self.plan.elastic else \
            (self.plan.num_nodes, self.plan.ranks_per_node)
        group = WorkerGroup(
            run_name=session.run_name, num_nodes=nodes,
            ranks_per_node=per_node, cpus_per_rank=1, gpus_per_rank=1 if self.plan.accelerator == "cuda" else 0,
            placement_timeout_s=config.placement_timeout_s, collective_timeout_s=config.collective_timeout_s,
            ray_address=config.ray_address, env=_forwarded_env(),
            spares_per_node=config.spare_ranks_per_node if spares else 0,
        )
        atexit.register(group.shutdown)
        return group


    def _scaling(self, trainer: Any) -> ScalingPolicy:
        p = self.plan
        return ScalingPolicy(p.min_ranks, p.max_ranks, p.ranks_per_node, p.nodes_elastic)

    # ------------------------------------------------------------------ entry
    def launch(self, trainer: Any, fn: str, model: Any, kwargs: dict[str, Any]) -> Any:
        _check_sendable(trainer, model, kwargs)  # before Ray or any actor starts
        if fn == "fit":
            return _FitSupervisor(self, trainer, model, kwargs).run()
        # Each entry point gets its own group, released when it returns (as Lightning's processes end).
        group = self._new_group(trainer, trainer.session.world or self.plan.world_size)
        trainer.session.worker_group = group
        bar = trainer.progress_bar_callback

        def on_message(rank: int, msg: Any) -> None:
            if isinstance(msg, dict) and msg.get("type") == "progress" and bar is not None:
                bar.handle(msg["event"])

        try:
            results = group.run(rank_entry, RankPayload.of(trainer), fn, model, kwargs, {"rng": rng_states()},
                                on_message=on_message, arg_names=["trainer", "fn", "model", "kwargs", "ctl"])
        finally:
            if bar is not None:
                bar.close()
            group.shutdown()
        if fn == "predict":
            return merge_predictions(results)
        result: RunResult = results[0]
        result.apply(trainer, model)
        return result.output


class _FitSupervisor:
    """The driver's state machine for one fit: start -> running -> (failure -> restart | resize) -> finish."""

    def __init__(self, launcher: RayLauncher, trainer: Any, model: Any, kwargs: dict[str, Any]) -> None:
        self.launcher, self.trainer, self.model, self.kwargs = launcher, trainer, model, dict(kwargs)
        self.plan = launcher.plan
        self.events = EventLog(trainer.log_dir)
        self.failures = FailurePolicy(trainer.config.max_failures)
        self.scaling = launcher._scaling(trainer)
        self.step = 0
        self.epoch = 0
        self.driver_snapshot: tuple[int, dict[str, Any]] | None = None
        self.last_beat = time.monotonic()
        self.last_scale_check = time.monotonic()
        self.group: Any = None
        self.world = 0
        self.resize_to: int | None = None
        self.sigterm = False
        self.stop_sent = False
        self.rng = rng_states()
        self.bar = trainer.progress_bar_callback
        self.start_logged = False

    # ------------------------------------------------------------------ messages from rank 0, ticks
    def on_message(self, rank: int, msg: Any) -> None:
        if not isinstance(msg, dict):
            return
        kind = msg.get("type")
        if kind == "progress" and self.bar is not None:
            self.bar.handle(msg["event"])
        elif kind == "heartbeat":
            self.step, self.epoch, self.last_beat = msg["step"], msg["epoch"], time.monotonic()
        elif kind == "snapshot":
            import ray

            try:  # fetch now: the copy then lives on the driver's node, independent of rank 0's
                self.driver_snapshot = (msg["step"], ray.get(msg["ref"], timeout=60))
            except Exception as exc:  # noqa: BLE001 - an older copy is still there
                log.warning("could not fetch the snapshot of step %s: %s", msg.get("step"), exc)
        elif kind == "event":
            fields = dict(msg["fields"])
            if msg["event"] == "start":
                if self.start_logged:
                    return  # already recorded by the driver when this message came too late
                self.start_logged = True
                fields.update(command_fields())  # the driver's command line, not the rank actor's
            self.events.emit(msg["event"], **fields)

    def on_tick(self) -> None:
        """Called by the group's wait loop every poll interval: preemption, heartbeat, growth."""
        now = time.monotonic()
        if self.sigterm and not self.stop_sent:
            self._request_stop("preempt")
        hb_timeout = self.trainer.config.heartbeat_timeout_s
        if now - self.last_beat > hb_timeout:
            raise _Hung(f"no progress from rank 0 for {hb_timeout:.0f} s (stuck in a collective or a step)")
        if self.plan.elastic and not self.stop_sent and now - self.last_scale_check >= \
                self.trainer.config.scale_check_interval_s:
            self.last_scale_check = now
            target = self.scaling.should_grow(self.world, _free_slots(self.plan))
            if target is not None:
                self.resize_to = target
                self._request_stop("resize")

    def _request_stop(self, reason: str) -> None:
        self.stop_sent = True
        _call_ranks(self.group, request_stop, reason)

    def _collect_survivor_snapshots(self, err: BaseException) -> None:
        """Before the group is torn down: deliver what ranks still had queued for the driver (events,
        snapshots), then take the newest snapshot any surviving rank holds."""
        for rank, queued in enumerate(_call_ranks(self.group, queued_messages)):
            for msg in queued or []:
                self.on_message(rank, msg)
        for outcome in _call_ranks(self.group, latest_snapshot):
            if outcome is not None and (self.driver_snapshot is None or outcome[0] > self.driver_snapshot[0]):
                self.driver_snapshot = outcome

    # ------------------------------------------------------------------ the loop
    def run(self) -> Any:
        import ray

        trainer = self.trainer
        ensure_ray(self.plan.max_ranks, 0, trainer.config.ray_address)
        self.world = self._initial_world()
        resume: Any = self.kwargs.get("ckpt_path")
        resume_step: int | None = None
        kind, cause = "start", None
        previous = control.install_sigterm_handler()
        if previous is not None:
            import signal

            signal.signal(signal.SIGTERM, self._on_sigterm)
        reuse = False  # True after a failure was repaired in place: the same group runs again
        try:
            while True:
                if not reuse:
                    self.group = self.launcher._new_group(trainer, self.world, spares=True)
                    trainer.session.worker_group = self.group
                    try:
                        self.group.start()
                    except PlacementError:
                        if self.plan.elastic and self.world > self.plan.min_ranks:
                            self.world = max(self.plan.min_ranks, self.world - self._unit())
                            continue
                        raise
                reuse = False
                if kind != "start":  # rank 0 reports the first start itself, once it knows the step it resumed at
                    self.events.emit(kind, world_size=self.world, step=self.step, epoch=self.epoch, cause=cause)
                ctl = {"rng": self.rng, "snapshot_every": trainer.config.snapshot_every_n_steps,
                       "resume_step": resume_step,
                       "elastic": self.plan.elastic, "emit_start": kind == "start"}
                self.stop_sent, self.resize_to, self.last_beat = False, None, time.monotonic()
                try:
                    results = self.group.run(
                        rank_entry, RankPayload.of(trainer), "fit", self.model, dict(self.kwargs, ckpt_path=resume),
                        ctl,
                        on_message=self.on_message, on_tick=self.on_tick,
                        before_shutdown=self._collect_survivor_snapshots,
                        arg_names=["trainer", "fn", "model", "kwargs", "ctl"],
                        keep_on_failure=trainer.config.max_failures > 0)
                except (RankError, _Hung) as err:
                    kept = self._settle(err)
                    world = self.world
                    resume, resume_step = self._after_failure(err)
                    kind, cause = "restart", f"{type(err).__name__}"
                    if kept:
                        dead = sorted(r for r, died in err.failed.items() if died)
                        reuse = self.world == world and self.group.reform(dead)
                        if reuse:
                            cause += f": rank(s) {dead} replaced, survivors kept" if dead else ": ranks kept"
                        else:
                            self.group.shutdown(graceful=False)
                    continue
                finally:
                    if self.bar is not None:
                        self.bar.close()
                result: RunResult = results[0]
                self.step, self.epoch = result.global_step, result.current_epoch
                if result.status == "resize":
                    self.group.shutdown()
                    old = self.world
                    self.world = self.resize_to or self.world
                    resume, resume_step = result.snapshot, result.global_step
                    self.driver_snapshot = (result.global_step, result.snapshot)
                    kind, cause = "resize", f"world {old} -> {self.world}: more resources available"
                    continue
                self.group.shutdown()
                result.apply(trainer, self.model)
                trainer.session.world = self.world
                if result.status == "preempted":
                    self.events.emit("preemption", world_size=self.world, step=self.step, epoch=self.epoch,
                                     cause="SIGTERM", path=result.output)
                    raise control.Preempted(
                        f"preempted (SIGTERM) at step {self.step}, epoch {self.epoch}; checkpoint written to "
                        f"{result.output}. Rerun the same command with ckpt_path='last' to resume (exit code "
                        f"{control.PREEMPTED_EXIT_CODE}).", checkpoint=result.output)
                self.events.emit("finish", world_size=self.world, step=self.step, epoch=self.epoch)
                return None
        finally:
            control.restore_sigterm_handler(previous)
            if self.group is not None:
                self.group.shutdown(graceful=False)  # idempotent; frees the placement group on any exit

    def _settle(self, err: BaseException) -> bool:
        """After a failure with the group kept up: let the survivors stop, gather their snapshots.

        True when the survivors can re-form the group in place; otherwise the group is shut down (a
        survivor stuck past SETTLE_TIMEOUT_S, an error that will not be retried, a hang).
        """
        if not getattr(self.group, "started", False):
            return False  # run() already shut it down (max_failures=0, a hang, Ctrl-C)
        ok = isinstance(err, RankError) and _retryable(err, err.died) and \
            self.group.settle(err.failed, timeout_s=SETTLE_TIMEOUT_S)
        self._collect_survivor_snapshots(err)
        if not ok:
            self.group.shutdown(graceful=False)
        return ok

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.sigterm = True

    def _unit(self) -> int:
        return self.plan.ranks_per_node if self.plan.nodes_elastic else 1

    def _initial_world(self) -> int:
        if not self.plan.elastic:
            return self.plan.world_size
        world = self.scaling.target(_free_slots(self.plan, capacity=True))
        if world < self.plan.min_ranks:
            world = self.plan.min_ranks  # wait for MIN in placement (bounded by placement_timeout_s)
        return world - world % self._unit() if self.plan.nodes_elastic else world

    def _after_failure(self, err: BaseException) -> tuple[Any, int | None]:
        """Record the failure, decide to retry or give up, and pick the state to resume from."""
        if not _retryable(err, getattr(err, "died", False)):
            self.events.emit("finish", world_size=self.world, step=self.step, epoch=self.epoch,
                             cause=f"failed: {_short_cause(err)}")
            raise err  # a plain error in user code: retrying would fail the same way
        if self.driver_snapshot is not None and self.driver_snapshot[0] > self.step:
            self.step = self.driver_snapshot[0]
        rank = getattr(err, "rank", None)
        node = getattr(err, "node_ip", None) or None
        died = getattr(err, "died", False)
        # A process lost with its node to a spot/preemptible reclaim (Ray: AUTOSCALER_DRAIN_PREEMPTED) is a
        # preemption, which does not count against max_failures. Only a death's own message is looked at.
        preempted = died and "preempted" in getattr(err, "traceback", "").lower()
        short = _short_cause(err)
        if not self.start_logged:  # rank 0's own start event was lost with the group: record it here
            self.start_logged = True
            self.events.emit("start", world_size=self.world, step=0, epoch=0, **command_fields())
        failure = Failure(time.time(), rank, node, short, self.step, preempted=preempted)
        self.events.emit("failure", world_size=self.world, step=self.step, epoch=self.epoch, cause=short,
                         rank=rank, node=node)
        if self.failures.record(failure) == "raise":
            self.events.emit("finish", world_size=self.world, step=self.step, epoch=self.epoch, cause="failed")
            raise FailuresExhausted(self.failures.failures, self.trainer.config.max_failures) from err
        if self.plan.elastic:
            self.world = self.scaling.after_failure(self.world, _free_slots(self.plan, capacity=True))
        if self.driver_snapshot is not None:
            step, state = self.driver_snapshot
            self.step, self.epoch = step, int(state.get("epoch", self.epoch))
            return state, step
        self.events.emit("snapshot_fallback", world_size=self.world, step=self.step, epoch=self.epoch,
                         cause="no snapshot survived; resuming from the newest valid checkpoint")
        return "last", None


SETTLE_TIMEOUT_S = 5.0  # survivors of a failure must leave their collectives within this to be kept


class _Hung(RuntimeError):
    """Rank 0 stopped sending heartbeats: a collective or a step is stuck."""


def _short_cause(err: BaseException) -> str:
    if getattr(err, "died", False):
        return "process died (killed, out of memory, or its node was lost)"
    original = getattr(err, "exception", None)
    if original is not None:
        return f"{type(original).__name__}: {original}"[:300]
    return str(err).splitlines()[0][:300]


def _retryable(err: BaseException, died: bool) -> bool:
    """Deaths, lost nodes, hangs and errors marked retryable are retried; other user errors are not."""
    if died or isinstance(err, _Hung):
        return True
    original = getattr(err, "exception", None)
    if original is None:
        return True
    return bool(getattr(original, "retryable", False)) or isinstance(original, RetryableError) \
        or "Connection reset" in str(original) or "Connection closed" in str(original) \
        or type(original).__name__ in ("DistBackendError", "DistNetworkError")


class RetryableError(RuntimeError):
    """Raise this (or any exception with ``retryable = True``) in a step to have the run retried."""

    retryable = True


def _call_ranks(group: Any, fn: Any, *args: Any, timeout_s: float = 5.0) -> list[Any]:
    """Call ``fn(rank_info, *args)`` on every live rank beside its running call; None for ranks that fail."""
    return group.call(fn, *args, timeout_s=timeout_s) if getattr(group, "started", False) else []


def _free_slots(plan: Plan, capacity: bool = False) -> list[int]:
    """Ranks each alive Ray node could host now (available CPUs/GPUs), or in all (capacity=True)."""
    import ray

    state = ray._private.state
    per_node = state.total_resources_per_node() if capacity else state.available_resources_per_node()
    return free_slots(list(per_node.values()), 1, 1 if plan.accelerator == "cuda" else 0)


class _Discard:
    """A write-only sink: pickling into it checks picklability without keeping a copy."""

    def write(self, data: Any) -> int:
        return len(data)


def _check_sendable(trainer: Any, model: Any, kwargs: dict[str, Any]) -> None:
    """Raise TypeError naming the attribute (e.g. ``model.log_file``) that cannot be sent to the ranks.

    Runs before Ray or any actor starts. Tensors always pickle, so they are skipped: the check costs
    the same for a large model as for a small one.
    """
    import cloudpickle

    class SkipTensors(cloudpickle.CloudPickler):
        def persistent_id(self, obj: Any) -> Any:
            return 0 if isinstance(obj, torch.Tensor) else None

    try:
        SkipTensors(_Discard(), protocol=cloudpickle.DEFAULT_PROTOCOL).dump((RankPayload.of(trainer), model, kwargs))
    except Exception as err:  # noqa: BLE001 - find and name the culprit
        names = {"train": "train_dataloaders", "val": "val_dataloaders"}
        check_picklable(model, "model")
        for key, value in kwargs.items():
            check_picklable(value, names.get(key, key))
        check_picklable(RankPayload.of(trainer), "trainer")
        raise TypeError(f"the trainer, module and data cannot be pickled together for the Ray ranks: "
                        f"{type(err).__name__}: {err}") from err


def _forwarded_env() -> dict[str, str]:
    """Environment the ranks need from the driver (object store endpoints, seeds)."""
    import os

    keys = ("RAYTRAINER_S3_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "PL_GLOBAL_SEED", "PL_SEED_WORKERS")
    return {k: os.environ[k] for k in keys if k in os.environ}
