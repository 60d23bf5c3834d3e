"""The Ray driver's controller for one fit: an explicit state machine.

    STARTING -> RUNNING -> STOPPING -> FINISHED
                  |  ^
        failure   v  |  repaired in place
               RECOVERING --(new group)--> STARTING
                  RUNNING --(more resources)--> RESIZING --> STARTING

Each phase is one method that returns the next phase. The decisions (retry or give up, the world
size, repair in place or restart) come from the pure policies in ``policies.py``; this module only
carries them out against the worker group, the events log and the driver's Trainer.
"""
from __future__ import annotations

import enum
import signal
import time
import uuid
from collections.abc import Callable
from typing import Any

from raytrainer.checkpoint.resolve import resume_source
from raytrainer.checkpoint.shard_snapshot import Piece, ShardedSnapshot
from raytrainer.core import control
from raytrainer.core.events import EventLog, NoEvents, command_fields
from raytrainer.data.ray_data import (
    DATA_HEADROOM_CPUS,
    check_room_for_data,
    close_splits,
    holds_ray_data,
    split_ray_data,
)
from raytrainer.launchers.base import RankPayload, RunResult
from raytrainer.launchers.ray import hangs, pool
from raytrainer.launchers.ray.console import driver_tty, relay, without_worker_death_notes
from raytrainer.launchers.ray.group import PlacementError, RankError, ensure_ray
from raytrainer.launchers.ray.metrics import RunMetrics
from raytrainer.launchers.ray.policies import (
    Failure,
    FailurePolicy,
    FailuresExhausted,
    RecoveryDecision,
    ScalingPolicy,
    decide_recovery,
    free_slots,
)
from raytrainer.launchers.ray.rank import (
    hand_over_pieces,
    held_pieces,
    latest_snapshot,
    queued_messages,
    rank_entry,
    request_stop,
    snapshot_step,
    training_loss,
)
from raytrainer.launchers.ray.snapshots import choose_pieces
from raytrainer.plan import FSDP_STRATEGIES, Plan
from raytrainer.utilities import log, rng_states


class Phase(enum.Enum):
    """Where the driver is in one fit."""

    STARTING = "starting"       # placing and starting a worker group
    RUNNING = "running"         # the ranks train; the driver relays progress and watches heartbeats
    RECOVERING = "recovering"   # a rank failed: settle the survivors, decide, repair or restart
    RESIZING = "resizing"       # the ranks stopped to grow the world
    STOPPING = "stopping"       # the ranks finished (or were preempted): apply the result
    FINISHED = "finished"


class FitController:
    """Runs one fit on Ray: starts groups, relays rank 0's messages, and recovers, resizes or stops."""

    def __init__(self, plan: Plan, trainer: Any, model: Any, kwargs: dict[str, Any],
                 new_group: Callable[[int], Any], scaling: ScalingPolicy) -> None:
        self.plan, self.trainer, self.model, self.kwargs = plan, trainer, model, dict(kwargs)
        self.new_group, self.scaling = new_group, scaling
        # a tuner's trial is not a run of the user's: its events go nowhere. best_effort: a failed write of the
        # driver's log is logged, never raised over (and so never hides) the ranks' error
        self.events: Any = NoEvents() if trainer.config.tuning_trial else EventLog(trainer.log_dir, best_effort=True)
        # the live figures as Ray metrics (Prometheus, Grafana), tagged with the run name the actors carry
        self.metrics = RunMetrics(trainer.session.run_name, trainer.log_dir, enabled=not trainer.config.tuning_trial)
        self.failures = FailurePolicy(trainer.config.max_failures)
        self.phase = Phase.STARTING
        self.history: list[Phase] = []        # every phase entered, in order (tests and debugging read it)
        # (what, time.time()) at each phase's entry and the steps of a recovery: benchmarks/recovery.py's breakdown
        self.marks: list[tuple[str, float]] = []
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
        self.run_id: str | None = None
        self.rng = rng_states()
        self.bar = trainer.progress_bar_callback
        # the first event of a RUNNING phase when only rank 0 knows its step (the first start, a restart from "last"):
        # rank 0 reports it once it restored; the driver records it itself if rank 0 dies first
        self.awaiting: tuple[str, str | None] | None = None
        # what the next RUNNING phase resumes from, and the event it records first
        self.resume: Any = self.kwargs.get("ckpt_path")
        self.pending_event: tuple[str, str | None] = ("start", None)
        self.error: BaseException | None = None
        self.hang: _Hung | None = None  # the hung rank(s) named for the current failure, when it was a hang
        self.result: RunResult | None = None
        self.results: list[Any] = []
        # Ray Data input: the driver gives every start of the ranks a fresh streaming split of each Ray Dataset
        self.ray_data = holds_ray_data(self.kwargs)
        self.data_splits: list[Any] = []

    # ------------------------------------------------------------------ messages from rank 0, ticks
    def on_message(self, rank: int, msg: Any) -> None:
        if not isinstance(msg, dict) or relay(msg):  # rank 0's prints and log lines: on the driver's console
            return
        kind = msg.get("type")
        if kind == "progress" and self.bar is not None:
            self.bar.handle(msg["event"])
        elif kind == "heartbeat":
            self.step, self.epoch, self.last_beat = msg["step"], msg["epoch"], time.monotonic()
            self.metrics.heartbeat(self.step, self.epoch, msg.get("loss"))
        elif kind == "snapshot":
            import ray

            try:  # fetch now: the copy then lives on the driver's node, independent of rank 0's
                self.driver_snapshot = (msg["step"], ray.get(msg["ref"], timeout=60))
            except Exception as exc:  # noqa: BLE001 - an older copy is still there
                log.warning("could not fetch the snapshot of step %s: %s", msg.get("step"), exc)
        elif kind == "event":
            fields = dict(msg["fields"])
            if msg["event"] in _FIRST_EVENTS:
                if self.awaiting is None:
                    return  # already recorded by the driver when this message came too late
                self.awaiting = None
                if msg["event"] == "start":
                    fields.update(command_fields())  # the driver's command line, not the rank actor's
            self.events.emit(msg["event"], **fields)
            if msg["event"] == "checkpoint":
                self.metrics.checkpoint()

    def on_tick(self) -> None:
        """Called by the group's wait loop every poll interval: preemption, heartbeat, growth."""
        now = time.monotonic()
        self.metrics.tick(now)
        if self.sigterm and (not self.stop_sent or self.awaiting is not None):
            self._request_stop("preempt")  # again until rank 0 has started: a starting rank clears old requests
        hb_timeout = self.trainer.config.heartbeat_timeout_s
        if now - self.last_beat > hb_timeout:
            raise self._name_hung(f"rank 0 sent no heartbeat for {hb_timeout:.0f} s (Trainer(heartbeat_timeout_s="
                                  f"{hb_timeout:g}))")
        if self.plan.elastic and not self.stop_sent and now - self.last_scale_check >= \
                self.trainer.config.scale_check_interval_s:
            self.last_scale_check = now
            target = self.scaling.should_grow(self.world, _free_slots(self.plan))
            if target is not None:
                target = self._room_for_data(target)
            if target is not None and target > self.world:
                self.resize_to = target
                self._request_stop("resize")

    def _name_hung(self, trigger: str) -> _Hung:
        """Ask every rank where it is (beside its running call) and name the rank(s) that stopped: a rank that
        waits in a collective is a victim, not the cause."""
        found = hangs.find_hung(_call_ranks(self.group, hangs.report, timeout_s=HANG_REPORT_TIMEOUT_S), trigger)
        self.hang = _Hung(found, self.ray_data)
        log.warning("%s", self.hang)  # at once, with the stacks: the restart or the final error comes later
        return self.hang

    def _explain_timeout(self, err: BaseException) -> None:
        """A collective timed out on a rank: that rank waited for another one. Name the one that stopped."""
        if self.hang is None and isinstance(err, RankError) and not err.died and _timed_out(err):
            first = str(getattr(err, "exception", None) or err).strip().splitlines()[0][:200]
            self._name_hung(f"rank {err.rank} timed out in a collective ({first})")

    def _before_shutdown(self, err: BaseException) -> None:
        """A failure the group will not survive: name a hung rank while the ranks still answer, then keep the
        newest snapshot the survivors hold."""
        self._explain_timeout(err)
        self._collect_survivor_snapshots(err)

    def _new_run_id(self) -> str:
        """A name for this start of the ranks: stop requests carry it, so one that reaches a rank before the
        rank's run has begun is not cleared as a leftover of an earlier run."""
        self.run_id = uuid.uuid4().hex
        return self.run_id

    def _request_stop(self, reason: str) -> None:
        self.stop_sent = True
        _call_ranks(self.group, request_stop, reason, self.run_id)

    def _collect_survivor_snapshots(self, err: BaseException) -> None:
        """Before the group is torn down: deliver what ranks still had queued for the driver (events,
        snapshots), then take the newest snapshot any surviving rank holds."""
        for rank, queued in enumerate(_call_ranks(self.group, queued_messages)):
            for msg in queued or []:
                self.on_message(rank, msg)
        # Ask every rank for its snapshot's step, then fetch one snapshot, from the first rank holding the newest
        # (DDP ranks hold the same state: N copies would cost N times the transfer for nothing).
        have = -1 if self.driver_snapshot is None else self.driver_snapshot[0]
        steps = _call_ranks(self.group, snapshot_step)
        for _, rank in sorted((-step, rank) for rank, step in enumerate(steps) if step is not None and step > have):
            outcome = _call_ranks(self.group, latest_snapshot, ranks=[rank])
            if outcome and outcome[0] is not None and outcome[0][0] > have:
                self.driver_snapshot = outcome[0]
                break
        self._collect_survivor_pieces()

    def _collect_survivor_pieces(self) -> None:
        """(sharded runs) The newest step whose pieces the survivors hold for every rank, fetched to the driver."""
        if self.plan.strategy not in FSDP_STRATEGIES:
            return  # DDP ranks hold no pieces: no round trip to ask them
        held = _call_ranks(self.group, held_pieces)
        if not any(held):
            return
        chosen = choose_pieces(held, self.world)
        if chosen is None:
            log.warning("no complete in-memory snapshot of the shards survived (a rank and the rank holding its copy "
                        "were both lost)")
            return
        step, assignment = chosen
        if self.driver_snapshot is not None and self.driver_snapshot[0] >= step:
            return
        pieces = [p for got in _call_ranks(self.group, hand_over_pieces, assignment, step,
                                           timeout_s=PIECE_FETCH_TIMEOUT_S) for p in got or []]
        try:
            self.driver_snapshot = (step, ShardedSnapshot(pieces).to_object_store())
        except ValueError as exc:  # a holder did not answer in time
            log.warning("the snapshot pieces of step %d could not all be fetched: %s", step, exc)

    # ------------------------------------------------------------------ the state machine
    def run(self) -> None:
        """Drive the phases until FINISHED; raises what ends the run (an error, Preempted, exhaustion)."""
        # SIGTERM is a preemption from here on, Ray's start-up included: the ranks stop at their first step boundary
        previous = control.install_sigterm_handler()
        if previous is not None:
            signal.signal(signal.SIGTERM, self._on_sigterm)
        phases = {Phase.STARTING: self._starting, Phase.RUNNING: self._running, Phase.RECOVERING: self._recovering,
                  Phase.RESIZING: self._resizing, Phase.STOPPING: self._stopping}
        try:
            try:
                ensure_ray(self.plan.max_ranks + self._data_headroom(), 0, self.trainer.config.ray_address,
                           num_ranks=self.plan.max_ranks + self.trainer.config.spare_ranks_per_node)
            except SystemExit as exc:  # ray.init answers SIGTERM with sys.exit(15) while it starts
                if exc.code != signal.SIGTERM or previous is None:
                    raise
                self._preempted_while_starting_ray()
            if previous is not None and signal.getsignal(signal.SIGTERM) != self._on_sigterm:
                signal.signal(signal.SIGTERM, self._on_sigterm)  # in case starting Ray replaced it
            self.world = self._initial_world()
            with without_worker_death_notes():  # a rank's death is this run's failure line, not Ray's note too
                while self.phase is not Phase.FINISHED:
                    self.history.append(self.phase)
                    self.marks.append((self.phase.value, time.time()))
                    self.phase = phases[self.phase]()
            self.history.append(self.phase)
        finally:
            control.restore_sigterm_handler(previous)
            if self.group is not None:
                self.group.shutdown(graceful=False)  # idempotent; frees the placement group on any exit
            close_splits(self.data_splits)  # after the ranks: stop the Ray Data executions they read
            self.data_splits = []

    def _starting(self) -> Phase:
        """Place and start a group of ``self.world`` ranks (an elastic run shrinks if they do not fit)."""
        self.group = self.new_group(self.world)
        self.trainer.session.worker_group = self.group
        try:
            self.group.start()
        except PlacementError:
            if self.plan.elastic and self.world > self.plan.min_ranks:
                self.world = max(self.plan.min_ranks, self.world - self._unit())
                return Phase.STARTING
            raise
        return Phase.RUNNING

    def _running(self) -> Phase:
        """Run the fit on the ranks until they return, fail, or stop for a resize."""
        kind, cause = self.pending_event
        # rank 0 reports the first start, and a restart from "last", itself, once it knows the step it resumed at
        self.awaiting = (kind, cause) if kind == "start" or self.resume == "last" else None
        if self.awaiting is None:
            self.events.emit(kind, world_size=self.world, step=self.step, epoch=self.epoch, cause=cause)
        ctl = {"rng": self.rng, "snapshot_every": self.trainer.config.snapshot_every_n_steps,
               "continue_logging": kind != "start", "restarted": kind != "start", "tty": driver_tty(),
               "elastic": self.plan.elastic, "first_event": self.awaiting,
               "stop": "preempt" if self.sigterm else None,  # a SIGTERM that came while Ray or the group started
               "run": self._new_run_id()}
        self.metrics.world(self.world)
        self.stop_sent, self.resize_to, self.last_beat, self.hang = False, None, time.monotonic(), None
        kwargs = self._split_data(dict(self.kwargs, ckpt_path=self.resume))
        try:
            results = self.group.run(
                rank_entry, RankPayload.of(self.trainer), "fit", self.model, kwargs,
                ctl, on_message=self.on_message, on_tick=self.on_tick,
                before_shutdown=self._before_shutdown,
                arg_names=["trainer", "fn", "model", "kwargs", "ctl"],
                keep_on_failure=self.trainer.config.max_failures > 0)
        except (RankError, _Hung) as err:
            self._explain_timeout(err)  # (the group was kept for a repair) a timeout names the rank that hung
            self.error = self.hang or err
            return Phase.RECOVERING
        finally:
            if self.bar is not None:
                self.bar.close()
        self.result, self.results = results[0], results
        self.step, self.epoch = self.result.global_step, self.result.current_epoch
        return Phase.RESIZING if self.result.status == "resize" else Phase.STOPPING

    # ------------------------------------------------------------------ Ray Data input
    def _split_data(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``kwargs`` with each Ray Dataset loader split for this start's ``self.world`` ranks (a fresh split: Ray
        Data cannot resume a pass, so a restart or resize reads the interrupted epoch from its start again)."""
        if not self.ray_data:
            return kwargs
        close_splits(self.data_splits)  # the last start's coordinators: nothing reads them any more
        self.data_splits = []
        cpus, gpus = self.world * self.group.cpus_per_rank, self.world * self.group.gpus_per_rank
        check_room_for_data(cpus, self.world)
        nodes = [r.node_id for r in self.group.ranks] or None  # blocks go preferably to their rank's node
        kwargs, self.data_splits = split_ray_data(kwargs, self.world, {"CPU": cpus, "GPU": gpus}, nodes)
        return kwargs

    def _data_headroom(self) -> int:
        """Logical CPUs beyond the ranks' for Ray Data's tasks, when this fit starts its own local Ray instance."""
        import ray

        return DATA_HEADROOM_CPUS if self.ray_data and not ray.is_initialized() else 0

    def _room_for_data(self, world: int) -> int:
        """(elastic runs reading a Ray Dataset) ``world`` capped so that one CPU of the cluster stays free for
        Ray Data's tasks (ranks reserve one CPU each), but never below the run's minimum."""
        if not self.ray_data:
            return world
        import ray

        cap = int(ray.cluster_resources().get("CPU", 0.0)) - 1
        cap -= cap % self._unit()
        return max(self.plan.min_ranks, min(world, cap))

    def _recovering(self) -> Phase:
        """Settle the survivors, record the failure, and repair in place or restart (or give up)."""
        err = self.error
        assert err is not None
        kept = self._settle(err)
        self.marks.append(("settled", time.time()))
        world_before = self.world
        decision = self._decide(err, kept)
        self.resume = self._resume_point()
        cause = _restart_cause(err)
        if decision.action == "repair":
            dead = sorted(r for r, died in err.failed.items() if died)
            if self.group.reform(dead, marks=self.marks):
                cause += f": rank(s) {dead} replaced, survivors kept" if dead else ": ranks kept"
                self.pending_event = ("restart", cause)
                return Phase.RUNNING
        why = getattr(self.group, "not_kept", None)  # the survivors could not be kept: say why, not just that
        if why and isinstance(err, RankError) and decision.world == world_before:
            cause += f": whole group restarted ({why})"
        if kept:
            self.group.shutdown(graceful=False)
        self.pending_event = ("restart", cause)
        log.debug("restarting at world %d (was %d)", self.world, world_before)
        return Phase.STARTING

    def _resizing(self) -> Phase:
        """The ranks stopped at an agreed step to grow: restart at the new size from their snapshot."""
        result = self.result
        assert result is not None
        self.group.shutdown()
        old = self.world
        self.world = self.resize_to or self.world
        snapshot = result.snapshot
        if isinstance(snapshot, Piece):  # sharded: rank 0's piece, and every other rank's in its result
            snapshot = ShardedSnapshot([snapshot, *self.results[1:]]).to_object_store()
        self.resume = snapshot
        self.driver_snapshot = (result.global_step, snapshot)
        self.pending_event = ("resize", f"world {old} -> {self.world}: more resources available")
        return Phase.STARTING

    def _stopping(self) -> Phase:
        """The ranks returned: the driver takes over their result; a preempted run raises Preempted."""
        result = self.result
        assert result is not None
        group, self.group = self.group, None
        pool.release(group, result.status == "finished")  # a finished call's ranks stay warm for the next call
        result.apply(self.trainer, self.model)
        self.trainer.session.world = self.world
        self.metrics.heartbeat(self.step, self.epoch, training_loss(self.trainer))  # where the ranks ended
        if result.status == "preempted":
            self.events.emit("preemption", world_size=self.world, step=self.step, epoch=self.epoch,
                             cause="SIGTERM", path=result.output)
            raise control.Preempted(
                f"preempted (SIGTERM) at step {self.step}, epoch {self.epoch}; checkpoint written to "
                f"{result.output}. Rerun the same command with ckpt_path='last' to resume (exit code "
                f"{control.PREEMPTED_EXIT_CODE}).", checkpoint=result.output)
        self.events.emit("finish", world_size=self.world, step=self.step, epoch=self.epoch)
        return Phase.FINISHED

    def _settle(self, err: BaseException) -> bool:
        """After a failure with the group kept up: let the survivors stop, gather their snapshots.

        True when the survivors can re-form the group in place; otherwise the group is shut down (a
        survivor stuck past SETTLE_TIMEOUT_S, an error that will not be retried, a hang).
        """
        if self.group is not None:
            self.group.not_kept = None  # set again below if these survivors cannot be kept
        if not getattr(self.group, "started", False):
            return False  # run() already shut it down (max_failures=0, a hang, Ctrl-C)
        retry = isinstance(err, RankError) and _retryable(err, err.died)
        if retry:
            self._collect_survivor_pieces()  # first: a rank that cannot leave a sharded group exits in settle
        ok = retry and self.group.settle(err.failed, timeout_s=SETTLE_TIMEOUT_S, on_message=self.on_message,
                                         before_exits=lambda: self._collect_survivor_snapshots(err))
        self._collect_survivor_snapshots(err)
        if not ok:
            self.group.shutdown(graceful=False)
        return ok

    def _preempted_while_starting_ray(self) -> None:
        """SIGTERM came while Ray started: nothing has trained, so there is nothing to save; record it and exit as a
        preemption (exit code 75), so a scheduler reruns the command."""
        import ray

        if ray.is_initialized():
            ray.shutdown()
        self.events.emit("preemption", world_size=0, step=self.step, epoch=self.epoch,
                         cause="SIGTERM while starting Ray, before any step")
        message = (f"preempted (SIGTERM) while starting Ray, before any step at this call; nothing needed saving. "
                   f"Rerun the same command (with ckpt_path='last' to resume an earlier run) (exit code "
                   f"{control.PREEMPTED_EXIT_CODE}).")
        log.warning("%s", message)  # no rank runs yet to say it, and SystemExit prints nothing
        raise control.Preempted(message)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.sigterm = True

    def _unit(self) -> int:
        return self.plan.ranks_per_node if self.plan.nodes_elastic else 1

    def _initial_world(self) -> int:
        if not self.plan.elastic:
            return self.plan.world_size
        world = self._room_for_data(self.scaling.target(_free_slots(self.plan, capacity=True)))
        if world < self.plan.min_ranks:
            world = self.plan.min_ranks  # wait for MIN in placement (bounded by placement_timeout_s)
        return world - world % self._unit() if self.plan.nodes_elastic else world

    def _decide(self, err: BaseException, survivors_kept: bool) -> RecoveryDecision:
        """Record the failure and let the policies decide; raises when the run ends here."""
        retryable = _retryable(err, getattr(err, "died", False))
        raised_at = getattr(getattr(err, "exception", None), "raytrainer_step", getattr(err, "step", None))
        if isinstance(raised_at, int):
            self.step = raised_at  # the step the rank raised at (heartbeats may be a second old)
        if retryable and self.driver_snapshot is not None and self.driver_snapshot[0] > self.step:
            self.step, snapshot = self.driver_snapshot
            if isinstance(snapshot, dict) and isinstance(snapshot.get("epoch"), int):
                self.epoch = snapshot["epoch"]  # heartbeats come once a second: the snapshot's epoch is newer
        short = _short_cause(err)
        budget = None
        if retryable:
            rank = getattr(err, "rank", None)
            node = getattr(err, "node_ip", None) or None
            died = getattr(err, "died", False)
            # A process lost with its node to a spot/preemptible reclaim (Ray: AUTOSCALER_DRAIN_PREEMPTED) is a
            # preemption, which does not count against max_failures. Only a death's own message is looked at.
            preempted = died and "preempted" in getattr(err, "traceback", "").lower()
            if self.awaiting is not None:  # rank 0's own first event was lost with the group: record it here
                first, first_cause = self.awaiting
                self.awaiting = None
                if first == "start":
                    source = resume_source(self.kwargs.get("ckpt_path"), self.trainer.checkpoint_callback,
                                           self.trainer)
                    self.events.emit("start", world_size=self.world, step=0, epoch=0, **command_fields(),
                                     resumed_from=source)
                else:
                    self.events.emit(first, world_size=self.world, step=self.step, epoch=self.epoch,
                                     cause=first_cause)
            self.events.emit("failure", world_size=self.world, step=self.step, epoch=self.epoch, cause=short,
                             rank=rank, node=node)
            self.metrics.failure()
            budget = self.failures.record(Failure(time.time(), rank, node, short, self.step, preempted=preempted))
        new_world = self.world
        if retryable and budget == "retry" and self.plan.elastic:
            new_world = self._room_for_data(self.scaling.after_failure(self.world,
                                                                       _free_slots(self.plan, capacity=True)))
        decision = decide_recovery(retryable=retryable, budget=budget, survivors_kept=survivors_kept,
                                   world=self.world, new_world=new_world)
        if decision.action == "give_up":
            self.events.emit("finish", world_size=self.world, step=self.step, epoch=self.epoch,
                             cause=f"failed: {short}")
            raise err  # a plain error in user code: retrying would fail the same way
        if decision.action == "exhausted":
            self.events.emit("finish", world_size=self.world, step=self.step, epoch=self.epoch, cause="failed")
            raise FailuresExhausted(self.failures.failures, self.trainer.config.max_failures) from err
        self.world = decision.world
        return decision

    def _resume_point(self) -> Any:
        """The newest snapshot any copy holds, else "last" (the newest valid checkpoint)."""
        if self.driver_snapshot is not None:
            step, state = self.driver_snapshot
            self.step, self.epoch = step, int(state.get("epoch", self.epoch))
            return state
        self.events.emit("snapshot_fallback", world_size=self.world, step=self.step, epoch=self.epoch,
                         cause="no snapshot survived; resuming from the newest valid checkpoint")
        return "last"


_FIRST_EVENTS = ("start", "restart", "resize")  # what a RUNNING phase records first
_DATA_HANG_HINT = "; ranks may be waiting for a batch of the Ray Dataset, whose tasks need CPUs no actor holds"
SETTLE_TIMEOUT_S = 5.0  # survivors of a failure must leave their collectives within this to be kept
PIECE_FETCH_TIMEOUT_S = 60.0  # survivors hand their snapshot pieces (shards) to the driver within this
HANG_REPORT_TIMEOUT_S = 5.0  # each rank answers "where are you" within this, or is named as not answering


class _Hung(RuntimeError):
    """A rank stopped making progress (found when rank 0's heartbeats stopped or a collective timed out); names
    the rank(s) that stopped, where, and their stacks."""

    def __init__(self, found: hangs.HangReport, ray_data: bool = False) -> None:
        hint = _DATA_HANG_HINT if ray_data else ""
        super().__init__(f"{found.summary}{hint}\n{found.details}")
        first = found.first
        self.report = found
        self.rank = found.hung[0] if found.hung else None
        self.node_ip = first.node_ip if first is not None else None
        self.step = first.step if first is not None else None


def _timed_out(err: RankError) -> bool:
    """A rank's collective gave up waiting (gloo/NCCL: "Timed out waiting 300000ms")."""
    return "timed out" in str(getattr(err, "exception", None) or err).lower()


def _restart_cause(err: BaseException) -> str:
    """Why the ranks restart, in words: "rank 1 died", "rank 0 raised ValueError", "rank 1 hung"."""
    rank = getattr(err, "rank", None)
    who = "a rank" if rank is None else f"rank {rank}"
    if isinstance(err, _Hung):
        return f"{who} hung"
    if getattr(err, "died", False):
        return f"{who} died"
    original = getattr(err, "exception", None)
    return f"{who} raised {type(original).__name__}" if original is not None else f"{who} failed"


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


def _call_ranks(group: Any, fn: Any, *args: Any, timeout_s: float = 5.0, ranks: list[int] | None = None) -> list[Any]:
    """Call ``fn(rank_info, *args)`` on every live rank (or ``ranks``) beside its running call; None for ranks that
    fail."""
    return group.call(fn, *args, timeout_s=timeout_s, ranks=ranks) if getattr(group, "started", False) else []


def _free_slots(plan: Plan, capacity: bool = False) -> list[int]:
    """Ranks each alive Ray node could host now (available CPUs/GPUs), or in all (capacity=True)."""
    import ray

    state = ray._private.state
    per_node = state.total_resources_per_node() if capacity else state.available_resources_per_node()
    return free_slots(list(per_node.values()), 1, 1 if plan.accelerator == "cuda" else 0)


