"""The rank side of a Ray run: what each rank actor executes (rank_entry) and the small calls the
driver makes beside a running rank (newest snapshot, queued messages, stop requests)."""
from __future__ import annotations

import time
from typing import Any

import torch

from raytrainer.core import control
from raytrainer.launchers.base import RankPayload, RunResult
from raytrainer.launchers.ray import hangs, rendezvous, snapshots
from raytrainer.launchers.ray.console import rank_console
from raytrainer.launchers.ray.messages import drain_messages, send_to_driver
from raytrainer.plan import FSDP_STRATEGIES
from raytrainer.strategies.ddp import DDPStrategy
from raytrainer.strategies.fsdp import FSDPStrategy
from raytrainer.utilities import set_rng_states


def rank_entry(info: Any, payload: RankPayload, fn: str, model: Any, kwargs: dict[str, Any],
               ctl: dict[str, Any] | None = None) -> RunResult | Any:
    """Runs on every rank: rebuild the Trainer from its payload, build the DDP strategy, run the loops,
    return this rank's share of the result."""
    ctl = ctl or {}
    _as_fresh_process()  # a warm rank (pool.py) ran earlier calls: nothing of theirs carries over
    trainer = payload.build()
    with rank_console(info.global_rank == 0, ctl.get("tty")):  # rank 0 prints on the driver's console
        return _run_rank(info, trainer, fn, model, kwargs, ctl)


def _run_rank(info: Any, trainer: Any, fn: str, model: Any, kwargs: dict[str, Any], ctl: dict[str, Any]) -> Any:
    session = trainer.session
    control.reset(ctl.get("run"))  # a request the driver sent this run while the rank was starting stays
    if ctl.get("stop"):
        control.request_stop(ctl["stop"])
    snapshots.clear()
    if ctl.get("rng") is not None:
        set_rng_states(ctl["rng"])  # every rank starts from the driver's RNG, as Lightning's ranks share a seed
    strategy = rank_strategy(trainer, info, model)
    rank0 = info.global_rank == 0
    sharded = isinstance(strategy, FSDPStrategy)  # every rank snapshots its own shards, a holder keeps a copy
    rendezvous.SHARDED_MODULE_HOLDS_GROUP = sharded
    bar = trainer.progress_bar_callback
    if bar is not None and rank0:
        bar.sink = lambda event: send_to_driver({"type": "progress", "event": event})
    session.events_forwarded = True
    first = ctl.get("first_event")
    session.first_event = tuple(first) if first is not None and rank0 else None
    session.elastic = bool(ctl.get("elastic"))
    session.restarted = bool(ctl.get("restarted"))  # the fit goes on after a failure or resize: no second summary
    session.events = _ForwardEvents() if rank0 else None
    if fn == "fit":
        beat = (lambda step, epoch: send_to_driver({"type": "heartbeat", "step": step, "epoch": epoch,
                                                    "loss": training_loss(trainer)})) if rank0 else None
        every = ctl.get("snapshot_every")
        session.snapshotter = snapshots.ShardSnapshotter(every, strategy, heartbeat=beat) if sharded else \
            snapshots.Snapshotter(every, publish=_publish_snapshot if rank0 else None, heartbeat=beat)
        session.continue_logging = bool(ctl.get("continue_logging")) and rank0
    status = "finished"
    hangs.watch(session)  # where this fit is, for the driver's question when it suspects a hang
    try:
        out = session.run(fn, model, strategy, **kwargs)
    except control.Preempted as exc:
        out, status = exc.checkpoint, "preempted"
    except Exception as exc:
        exc.raytrainer_step = session.state.global_step  # the driver records the failure at this step
        raise
    finally:
        hangs.unwatch()
    if fn == "predict":  # every rank returns its contiguous shard; the driver concatenates in rank order
        return len(session.val_dataloaders), out
    snapshot = None
    if status == "finished" and control.stop_reason() == "resize":
        status = "resize"
        snapshot = session.snapshotter.take(session) if rank0 or sharded else None  # sharded: every rank's piece
    full_weights = strategy.full_state(session.module.state_dict()) if sharded and fn == "fit" else None
    if not rank0:
        return snapshot  # None, or (resizing a sharded run) this rank's piece for the driver
    result = RunResult.from_session(session, fn, out, info.world_size, status=status, snapshot=snapshot)
    if full_weights is not None:  # the driver's module gets whole tensors, gathered from every rank's shards
        result.state_dict = full_weights
    return result


def _as_fresh_process() -> None:
    """Torch's process-wide switches as a new rank process has them (each call sets what its Trainer asks for)."""
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.benchmark = False
    torch.set_grad_enabled(True)


def rank_strategy(trainer: Any, info: Any, model: Any) -> DDPStrategy:
    """This rank's DDPStrategy: the user's object (this rank's unpickled copy, with its DDP arguments) or the one
    the strategy name stands for, bound to the rank's device and place in the world."""
    plan, config = trainer.plan, trainer.config
    template = plan.strategy_object
    if isinstance(template, DDPStrategy):
        strategy = template.bind(info.device, info)
    elif plan.strategy in FSDP_STRATEGIES:
        strategy = FSDPStrategy(cpu_offload=plan.strategy == "fsdp_cpu_offload", device=info.device, ctx=info)
    else:
        unused = plan.find_unused_parameters
        strategy = DDPStrategy(device=info.device, ctx=info,
                               **({} if unused is None else {"find_unused_parameters": unused}))
        if template is not None:
            strategy._precision_plugin = template._precision_plugin
    if not strategy.timeout_given:
        strategy.timeout_s = config.collective_timeout_s
    strategy.sync_batchnorm = config.sync_batchnorm
    # Manual optimization (GANs: each loss touches only some parameters) needs DDP to find unused parameters,
    # unless the user said otherwise.
    if not model.automatic_optimization and "find_unused_parameters" not in strategy._ddp_kwargs:
        strategy.find_unused_parameters = True
    return strategy


LOSS_NAMES = ("train_loss_step", "train_loss", "loss")  # what the live loss is called, in the order looked for


def training_loss(trainer: Any) -> tuple[str, float] | None:
    """(name, value) of the training loss the progress bar shows now: one of ``LOSS_NAMES``, else the first
    progress-bar value with "loss" in its name that is not a validation or test value; None if none is logged."""
    try:
        metrics = trainer.progress_bar_metrics
    except Exception:  # noqa: BLE001 - a heartbeat never fails for want of a loss
        return None
    named = [k for k in LOSS_NAMES if k in metrics] + [
        k for k in metrics if "loss" in k and not k.startswith(("val", "test"))]
    for key in named:
        try:
            return key, float(metrics[key])
        except (TypeError, ValueError):
            continue
    return None


class _ForwardEvents:
    """Rank 0's event sink: checkpoint events go to the driver, which owns the events log."""

    def emit(self, event: str, **fields: Any) -> None:
        send_to_driver({"type": "event", "event": event, "fields": {**fields, "time": round(time.time(), 3)}})


def _publish_snapshot(step: int, state: dict[str, Any]) -> None:
    """(rank 0, background thread) Put a snapshot in the object store and tell the driver where it is."""
    import ray

    send_to_driver({"type": "snapshot", "step": step, "ref": ray.put(state)})


def latest_snapshot(info: Any) -> tuple[int, dict[str, Any]] | None:
    """(any rank, while another call may be stuck in a collective) This rank's newest snapshot."""
    return snapshots.latest()


def snapshot_step(info: Any) -> int | None:
    """(any rank, while another call may be stuck in a collective) The step of this rank's newest snapshot."""
    return snapshots.latest_step()


def held_pieces(info: Any) -> dict[int, list[int]] | None:
    """(any rank of a sharded run) The steps of the snapshot pieces this rank holds, by owner."""
    return snapshots.held_pieces()


def hand_over_pieces(info: Any, assignment: dict[int, list[int]], step: int) -> list[Any]:
    """(any rank of a sharded run) The pieces of ``step`` the driver asks this rank for."""
    return snapshots.pieces_at(assignment.get(info.global_rank, []), step)


def queued_messages(info: Any) -> list[Any]:
    """(any rank) Messages for the driver that were not polled yet."""
    return drain_messages()


def request_stop(info: Any, reason: str, run: str | None = None) -> int:
    """(any rank) Stop at the next agreed step boundary, for "preempt" or "resize", in the driver's ``run``."""
    control.request_stop(reason, run)
    return info.global_rank
