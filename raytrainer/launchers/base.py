"""What every launcher shares: the Launcher protocol, what ranks receive (RankPayload) and send back
(RunResult), applying that result on the driver, and merging predictions."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from raytrainer.checkpoint.host_copy import to_host
from raytrainer.core.config import RunConfig
from raytrainer.core.hooks import defines
from raytrainer.plan import Plan
from raytrainer.utilities import log


class Launcher(Protocol):
    """Runs one call (fit, validate, test, predict) of a plan and leaves the driver's Trainer as after it."""

    plan: Plan

    def launch(self, trainer: Any, fn: str, model: Any, kwargs: dict[str, Any]) -> Any:
        """Run ``fn`` with ``model`` and the data in ``kwargs``; return what Trainer.<fn> returns."""
        ...


@dataclass
class RankPayload:
    """What a rank that runs outside the driver receives to rebuild its Trainer: the config, callbacks and
    loggers, the loop counters of earlier calls, and the Trainer class (a user's subclass included)."""

    trainer_cls: type
    config: RunConfig
    callbacks: list[Any]
    loggers: list[Any]
    counters: dict[str, int]
    env: dict[str, str] = field(default_factory=dict)  # the driver's FORWARDED_ENV at this call

    @classmethod
    def of(cls, trainer: Any) -> RankPayload:
        return cls(type(trainer), trainer.config, list(trainer.callbacks), list(trainer.loggers),
                   trainer.session.state.counters(), forwarded_env())

    def build(self) -> Any:
        """This rank's Trainer (with a fresh RankSession), in the driver's forwarded environment of this call
        (a warm rank process may have started under an earlier call's seed)."""
        for name in FORWARDED_ENV:
            if name in self.env:
                os.environ[name] = self.env[name]
            else:
                os.environ.pop(name, None)
        return self.trainer_cls.for_rank(self.config, self.callbacks, self.loggers, self.counters)


FORWARDED_ENV = ("RAYTRAINER_S3_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
                 "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "PL_GLOBAL_SEED", "PL_SEED_WORKERS", "RAYTRAINER_LOG",
                 "RAYTRAINER_STORAGE_TIMEOUT_S")


def forwarded_env() -> dict[str, str]:
    """Environment the ranks need from the driver (object store endpoints and credentials, seeds)."""
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}


@dataclass
class RunResult:
    """What rank 0 (and, for predict, every rank) sends back to the driver."""

    output: Any = None
    status: str = "finished"          # finished | preempted | resize
    snapshot: dict[str, Any] | None = None
    state_dict: dict[str, torch.Tensor] | None = None
    counters: dict[str, int] = field(default_factory=dict)
    world_size: int = 1
    callback_metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    logged_metrics: dict[str, Any] = field(default_factory=dict)
    progress_bar_metrics: dict[str, float] = field(default_factory=dict)
    callback_states: list[dict[str, Any]] = field(default_factory=list)
    logger_states: list[dict[str, Any]] = field(default_factory=list)
    saved_checkpoints: list[tuple[int, str]] = field(default_factory=list)
    log_dir: str | None = None

    @property
    def global_step(self) -> int:
        return int(self.counters.get("global_step", 0))

    @property
    def current_epoch(self) -> int:
        return int(self.counters.get("current_epoch", 0))

    @classmethod
    def from_session(cls, session: Any, fn: str, output: Any, world_size: int, status: str = "finished",
                     snapshot: dict[str, Any] | None = None) -> RunResult:
        """Rank 0's state after a run, copied to host memory (any launcher that runs ranks elsewhere)."""
        return cls(
            output=output, status=status, snapshot=snapshot,
            state_dict=to_host(session.module.state_dict()) if fn == "fit" else None,
            counters=session.state.counters(), world_size=world_size,
            callback_metrics=to_host(dict(session.callback_metrics_store)),
            logged_metrics=dict(session.logged_metrics_store),
            progress_bar_metrics=dict(session.progress_bar_metrics_store),
            callback_states=[to_host(cb.state_dict()) for cb in session.callbacks],
            logger_states=[lg.state_dict() for lg in session.loggers],
            saved_checkpoints=list(session.saved_checkpoints), log_dir=session.trainer.log_dir,
        )

    def apply(self, trainer: Any, model: Any) -> None:
        """Make the driver's trainer and module look as they would after an in-process run."""
        if self.state_dict is not None:
            if defines(model, "configure_model") and self.state_dict.keys() - model.state_dict().keys():
                model.trainer = trainer  # layers built on the ranks by configure_model: build them here too
                model.configure_model()
            # a module built on the meta device (FSDP's init_module(empty_init=True)) takes the tensors as they are
            model.load_state_dict(self.state_dict, assign=any(t.is_meta for t in model.state_dict().values()))
        session = trainer.session
        model.trainer = trainer
        session.module = model
        session.state.load_counters(self.counters)
        session.world = self.world_size
        session.callback_metrics_store = dict(self.callback_metrics)
        session.logged_metrics_store = dict(self.logged_metrics)
        session.progress_bar_metrics_store = dict(self.progress_bar_metrics)
        session.saved_checkpoints = list(self.saved_checkpoints)
        for lg, state in zip(trainer.loggers, self.logger_states):
            lg.load_state_dict(state)  # the rows rank 0 wrote, so later runs append to them
        for cb, state in zip(trainer.callbacks, self.callback_states):
            cb.load_state_dict(state)
            if hasattr(cb, "apply_on_driver"):  # a callback that changed the ranks' module beyond its weights
                cb.apply_on_driver(trainer, model)
        log.debug("run finished on the ranks: step %d, epoch %d", self.global_step, self.current_epoch)


def merge_predictions(per_rank: list[tuple[int, Any]]) -> Any:
    """Concatenate rank shards in rank order (each rank predicted a contiguous block of the data)."""
    n_loaders, first = per_rank[0]
    if first is None:
        return None
    shards = [out if n_loaders > 1 else [out] for _, out in per_rank]
    merged = [[batch for shard in shards for batch in shard[i]] for i in range(n_loaders)]
    return merged if n_loaders > 1 else merged[0]
