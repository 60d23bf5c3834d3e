"""RayLauncher: the driver side of a multi-rank run. It never trains; it starts the rank actors,
draws rank 0's progress bar, and copies the trained state and metrics back when the run ends.
A fit runs under the FitController (controller.py), which recovers, resizes and stops it."""
from __future__ import annotations

import atexit
import math
from typing import Any

import torch

from raytrainer.data.ray_data import (
    DATA_HEADROOM_CPUS,
    check_room_for_data,
    close_splits,
    holds_ray_data,
    split_ray_data,
)
from raytrainer.launchers.base import RankPayload, RunResult, forwarded_env, merge_predictions
from raytrainer.launchers.ray import pool
from raytrainer.launchers.ray.console import driver_tty, relay
from raytrainer.launchers.ray.controller import FitController, RetryableError
from raytrainer.launchers.ray.group import WorkerGroup, check_picklable, ensure_ray
from raytrainer.launchers.ray.policies import ScalingPolicy
from raytrainer.launchers.ray.rank import rank_entry
from raytrainer.plan import Plan
from raytrainer.utilities import rng_states

__all__ = ["RayLauncher", "RetryableError"]


class RayLauncher:
    """Runs a plan with more than one rank (or strategy="ray") on a group of Ray actors.

    ``fit`` runs under the FitController: it repairs or restarts after failures (up to ``max_failures``)
    from the newest snapshot, grows or shrinks an elastic world, and turns SIGTERM into a clean stop.
    """

    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    # ------------------------------------------------------------------ groups
    def _new_group(self, trainer: Any, world: int, spares: bool = False) -> Any:
        """A group of ``world`` ranks for this call: the warm one a finished call left (pool.py) when its shape
        matches, else a new one (not started yet)."""
        session, config = trainer.session, trainer.config
        nodes, per_node = self._scaling(trainer).layout(world) if self.plan.elastic else \
            (self.plan.num_nodes, self.plan.ranks_per_node)
        # a DDPStrategy(process_group_backend=..., timeout=...) object decides how the ranks' process group forms
        template = self.plan.strategy_object
        backend = getattr(template, "process_group_backend", None)
        timeout_s = template.timeout_s if getattr(template, "timeout_given", False) else config.collective_timeout_s
        args = dict(num_nodes=nodes, ranks_per_node=per_node, cpus_per_rank=1,
                    gpus_per_rank=1 if self.plan.accelerator == "cuda" else 0,
                    placement_timeout_s=config.placement_timeout_s, collective_timeout_s=timeout_s,
                    ray_address=config.ray_address, env=forwarded_env(),
                    spares_per_node=config.spare_ranks_per_node if spares else 0, backend=backend)
        keep = not self.plan.elastic and pool.idle_seconds() > 0  # (a bad setting is refused before any rank)
        group = pool.take(pool.group_key(args), args["spares_per_node"]) if keep else None
        if group is None:
            pool.shutdown()  # an idle group of another shape must not hold the resources this one needs
            group = WorkerGroup(run_name=session.run_name, **args)
            atexit.register(group.shutdown)
        group.pool_args = args if keep else None
        return group

    def _scaling(self, trainer: Any) -> ScalingPolicy:
        p = self.plan
        return ScalingPolicy(p.min_ranks, p.max_ranks, p.ranks_per_node, p.nodes_elastic)

    # ------------------------------------------------------------------ entry
    def launch(self, trainer: Any, fn: str, model: Any, kwargs: dict[str, Any]) -> Any:
        _check_sendable(trainer, model, kwargs)  # before Ray or any actor starts
        if fn == "fit":
            controller = FitController(self.plan, trainer, model, kwargs, scaling=self._scaling(trainer),
                                       new_group=lambda world: self._new_group(trainer, world, spares=True))
            trainer.last_run = controller  # its phases and failures stay readable after the fit, or its error
            controller.run()
            return None
        # Each entry point gets its own group, released when it returns (as Lightning's processes end).
        group = self._new_group(trainer, trainer.session.world or self.plan.world_size)
        trainer.session.worker_group = group
        kwargs, data_splits = _split_ray_data(group, kwargs, trainer.config.ray_address)
        bar = trainer.progress_bar_callback

        def on_message(rank: int, msg: Any) -> None:
            if relay(msg):  # rank 0's prints and log lines: on the driver's console
                return
            if isinstance(msg, dict) and msg.get("type") == "progress" and bar is not None:
                bar.handle(msg["event"])

        ok = False
        try:
            ctl = {"rng": rng_states(), "tty": driver_tty()}
            results = group.run(rank_entry, RankPayload.of(trainer), fn, model, kwargs, ctl,
                                on_message=on_message, arg_names=["trainer", "fn", "model", "kwargs", "ctl"])
            ok = True
        finally:
            if bar is not None:
                bar.close()
            pool.release(group, ok)
            close_splits(data_splits)
        if fn == "predict":
            return merge_predictions(results)
        result: RunResult = results[0]
        result.apply(trainer, model)
        return result.output


def _split_ray_data(group: Any, kwargs: dict[str, Any], address: str | None) -> tuple[dict[str, Any], list[Any]]:
    """(validate/test/predict) ``kwargs`` with each Ray Dataset loader split over the group's ranks, after making
    sure Ray runs with room for Ray Data's tasks beside the ranks; also the splits, to close after the call."""
    if not holds_ray_data(kwargs):
        return kwargs, []
    import ray

    world = group.world_size
    cpus, gpus = world * group.cpus_per_rank, world * group.gpus_per_rank
    headroom = 0 if ray.is_initialized() else DATA_HEADROOM_CPUS  # only a local instance started here grows
    ensure_ray(math.ceil(cpus) + headroom, math.ceil(gpus), address)
    check_room_for_data(cpus, world)
    return split_ray_data(kwargs, world, {"CPU": cpus, "GPU": gpus})  # the group starts later: no node hints


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
