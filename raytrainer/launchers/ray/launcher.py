"""RayLauncher: the driver side of a multi-rank run. It never trains; it starts the rank actors,
draws rank 0's progress bar, and copies the trained state and metrics back when the run ends."""
from __future__ import annotations

import atexit
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch

from raytrainer.trainer.plan import Plan
from raytrainer.utilities import log


@dataclass
class RunResult:
    """What rank 0 (and, for predict, every rank) sends back to the driver."""

    output: Any = None
    status: str = "finished"          # finished | preempted | resize
    snapshot: dict[str, Any] | None = None
    state_dict: dict[str, torch.Tensor] | None = None
    global_step: int = 0
    current_epoch: int = 0
    world_size: int = 1
    callback_metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    logged_metrics: dict[str, Any] = field(default_factory=dict)
    progress_bar_metrics: dict[str, float] = field(default_factory=dict)
    callback_states: list[dict[str, Any]] = field(default_factory=list)
    logger_states: list[dict[str, Any]] = field(default_factory=list)
    batches_that_stepped: int = 0
    saved_checkpoints: list[tuple[int, str]] = field(default_factory=list)
    log_dir: str | None = None


def rank_entry(info: Any, trainer: Any, fn: str, model: Any, kwargs: dict[str, Any],
               ctl: dict[str, Any] | None = None) -> RunResult | Any:
    """Runs on every rank: build the DDP strategy, run the loops, return this rank's share of the result."""
    from raytrainer.launchers.ray import control, snapshots
    from raytrainer.launchers.ray.worker import send_to_driver
    from raytrainer.strategies.ddp import DDPStrategy
    from raytrainer.utilities import set_rng_states

    ctl = ctl or {}
    control.reset()
    snapshots.clear()
    if ctl.get("rng") is not None:
        set_rng_states(ctl["rng"])  # every rank starts from the driver's RNG, as Lightning's ranks share a seed
    strategy = DDPStrategy(info.device, info, timeout_s=trainer.collective_timeout_s)
    rank0 = info.global_rank == 0
    bar = trainer.progress_bar_callback
    if bar is not None and rank0:
        bar.sink = lambda event: send_to_driver({"type": "progress", "event": event})
    trainer._events_forwarded = True
    trainer._events = _ForwardEvents() if rank0 else None
    if fn == "fit":
        trainer._snapshotter = snapshots.Snapshotter(
            ctl.get("snapshot_every"), publish=_publish_snapshot if rank0 else None,
            heartbeat=(lambda step, epoch: send_to_driver({"type": "heartbeat", "step": step, "epoch": epoch}))
            if rank0 else None)
        resume_step = ctl.get("resume_step")
        if resume_step is not None and rank0:
            for lg in trainer.loggers:
                if hasattr(lg, "resume_from_step"):
                    lg.resume_from_step(resume_step)
    status = "finished"
    try:
        out = trainer._run_stage(fn, model, strategy, **kwargs)
    except control.Preempted as exc:
        out, status = exc.checkpoint, "preempted"
    if fn == "predict":  # every rank returns its contiguous shard; the driver concatenates in rank order
        return len(trainer._val_dataloaders), out
    snapshot = None
    if status == "finished" and control.stop_reason() == "resize":
        status = "resize"
        snapshot = trainer._snapshotter.take(trainer) if rank0 else None
    if not rank0:
        return None
    return RunResult(
        output=out, status=status, snapshot=snapshot,
        state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()} if fn == "fit" else None,
        global_step=trainer.global_step, current_epoch=trainer.current_epoch, world_size=info.world_size,
        callback_metrics={k: v.detach().cpu() for k, v in trainer._callback_metrics.items()},
        logged_metrics=dict(trainer._logged_metrics), progress_bar_metrics=dict(trainer._progress_bar_metrics),
        callback_states=[_state(cb) for cb in trainer.callbacks],
        logger_states=[_state(lg) for lg in trainer.loggers], batches_that_stepped=trainer._batches_that_stepped,
        saved_checkpoints=list(trainer.saved_checkpoints), log_dir=trainer.log_dir,
    )


class _ForwardEvents:
    """Rank 0's event sink: checkpoint events go to the driver, which owns the events log."""

    def emit(self, event: str, **fields: Any) -> None:
        from raytrainer.launchers.ray.worker import send_to_driver

        send_to_driver({"type": "event", "event": event, "fields": fields})


def _publish_snapshot(step: int, state: dict[str, Any]) -> None:
    """(rank 0, background thread) Put a snapshot in the object store and tell the driver where it is."""
    import ray

    from raytrainer.launchers.ray.worker import send_to_driver

    send_to_driver({"type": "snapshot", "step": step, "ref": ray.put(state)})


def _latest_snapshot(info: Any) -> tuple[int, dict[str, Any]] | None:
    """(any rank, while another call may be stuck in a collective) This rank's newest snapshot."""
    from raytrainer.launchers.ray import snapshots

    return snapshots.latest()


def _request_stop(info: Any, reason: str) -> int:
    """(any rank) Stop at the next agreed step boundary, for "preempt" or "resize"."""
    from raytrainer.launchers.ray import control

    control.request_stop(reason)
    return info.global_rank


def _state(obj: Any) -> dict[str, Any]:
    return dict(obj.__getstate__() if hasattr(obj, "__getstate__") else obj.__dict__)


class RayLauncher:
    """Runs a plan with more than one rank (or strategy="ray") on a group of Ray actors."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    def _group(self, trainer: Any) -> Any:
        from raytrainer.launchers.ray.group import WorkerGroup

        group = trainer.__dict__.get("_worker_group")
        if group is not None and group.started:
            return group
        plan = self.plan
        group = WorkerGroup(
            run_name=f"{uuid.uuid4().hex[:8]}", num_nodes=plan.num_nodes, ranks_per_node=plan.ranks_per_node,
            cpus_per_rank=1, gpus_per_rank=1 if plan.accelerator == "cuda" else 0,
            placement_timeout_s=trainer.placement_timeout_s, collective_timeout_s=trainer.collective_timeout_s,
            ray_address=trainer.ray_address,
        )
        trainer.__dict__["_worker_group"] = group
        atexit.register(group.shutdown)
        return group

    def launch(self, trainer: Any, fn: str, model: Any, kwargs: dict[str, Any]) -> Any:
        if self.plan.elastic:
            raise ValueError(f"an elastic range ({self.plan.min_ranks}:{self.plan.max_ranks} ranks) needs the "
                             "fault-tolerant controller; give a fixed number of ranks for now.")
        group = self._group(trainer)
        bar = trainer.progress_bar_callback

        def on_message(rank: int, msg: Any) -> None:
            if isinstance(msg, dict) and msg.get("type") == "progress" and bar is not None:
                bar.handle(msg["event"])

        try:
            results = group.run(rank_entry, trainer, fn, model, kwargs, on_message=on_message,
                                arg_names=["trainer", "fn", "model", "kwargs"])
        finally:
            if bar is not None:
                bar.close()
        if fn == "predict":
            return _merge_predictions(results)
        result: RunResult = results[0]
        self._apply(trainer, model, result)
        return result.output

    @staticmethod
    def _apply(trainer: Any, model: Any, result: RunResult) -> None:
        """Make the driver's trainer and module look as they would after an in-process run."""
        if result.state_dict is not None:
            model.load_state_dict(result.state_dict)
        model.trainer = trainer
        trainer.lightning_module = model
        trainer.global_step = result.global_step
        trainer.current_epoch = result.current_epoch
        trainer._callback_metrics = dict(result.callback_metrics)
        trainer._logged_metrics = dict(result.logged_metrics)
        trainer._progress_bar_metrics = dict(result.progress_bar_metrics)
        trainer.saved_checkpoints = list(result.saved_checkpoints)
        trainer._batches_that_stepped = result.batches_that_stepped
        for lg, state in zip(trainer.loggers, result.logger_states):
            lg.__dict__.update(state)  # the rows rank 0 wrote, so later runs append to them
        for cb, state in zip(trainer.callbacks, result.callback_states):
            state = {k: v for k, v in state.items() if k not in ("_bar", "sink", "_writer")}
            cb.__dict__.update(state)
        log.debug("ray run finished: step %d, epoch %d", result.global_step, result.current_epoch)


def _merge_predictions(per_rank: list[tuple[int, Any]]) -> Any:
    """Concatenate rank shards in rank order (each rank predicted a contiguous block of the data)."""
    n_loaders, first = per_rank[0]
    if first is None:
        return None
    shards = [out if n_loaders > 1 else [out] for _, out in per_rank]
    merged = [[batch for shard in shards for batch in shard[i]] for i in range(n_loaders)]
    return merged if n_loaders > 1 else merged[0]
