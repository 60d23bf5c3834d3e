"""What the learning-rate and batch-size searches share: a private trial Trainer, putting the module back as it
was, RNG isolation, Lightning's attribute lookup (module, hparams, datamodule), and the one-process rule.

A search never runs the user's Trainer: each trial is a throwaway Trainer built from the same config, with only
the search's own callback and no loggers, checkpoints, progress bar or summary. So the user's Trainer (counters,
callbacks and their state, loggers, optimizers, checkpoint files) is untouched, and the module's weights, buffers,
gradients, train/eval modes and trainer link are put back afterwards.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
from collections.abc import Iterator
from typing import Any

import torch

from raytrainer.plan import FSDP_STRATEGIES
from raytrainer.utilities import log, rng_states, set_rng_states
from raytrainer.utilities.exceptions import MisconfigurationException


def refuse_sharded(trainer: Any, what: str) -> None:
    """Raise, before any rank starts, for a plan whose ranks shard the module (FSDP) or run under torch_xla's
    multi-process launcher: the learning-rate search runs on DDP ranks (and in one process) only."""
    plan = trainer.plan
    if plan.strategy in FSDP_STRATEGIES or (plan.launcher == "xla" and plan.world_size > 1):
        raise MisconfigurationException(
            f"{what} runs in one process or on DDP ranks, and this Trainer runs {plan.describe()}. Find the "
            "learning rate with a single-process or DDP Trainer, e.g. `Tuner(Trainer(num_processes=1)).lr_find("
            "model, ...)`, then fit with this Trainer and the value found.")


def refuse_distributed(trainer: Any, what: str) -> None:
    """Raise, before any rank starts, when ``trainer`` would run several processes: the batch-size search runs
    in one process (Lightning refuses it under distributed strategies too)."""
    plan = trainer.plan
    if plan.world_size > 1 or plan.launcher == "ray":
        raise MisconfigurationException(
            f"{what} runs in one process only, and this Trainer runs {plan.world_size} rank(s) on Ray "
            f"({plan.describe()}); Lightning's batch size finder refuses distributed strategies too. Tune with a "
            f"single-process Trainer first, e.g. `Tuner(Trainer(num_processes=1)).scale_batch_size(model, ...)` "
            f"(or devices=1), set the value it finds on the model (or datamodule), then fit on Ray with "
            f"Trainer(num_processes={plan.world_size}, ...).")


def trial_trainer(trainer: Any, callbacks: list[Any], counters: dict[str, int] | None = None,
                  **config_changes: Any) -> Any:
    """A throwaway Trainer of the same class and config as ``trainer`` (with ``config_changes``) that runs only
    ``callbacks``: no loggers, checkpoints, progress bar, summary, profiler, sanity check, events or time limit.
    Its plan is ``trainer``'s: for a Ray Trainer the trial is a Ray run of its own."""
    config = dataclasses.replace(
        trainer.config, num_sanity_val_steps=0, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, profiler=None, max_time_s=None, snapshot_every_n_steps=None, fast_dev_run=0,
        tuning_trial=True, **config_changes)
    trial = type(trainer).for_rank(config, list(callbacks), [], counters)
    trial.session.events_forwarded = True  # nothing recorded, and a stop asked of a running fit is not cleared
    return trial


def fit_trial(trial: Any, trainer: Any, model: Any, fit_kwargs: dict[str, Any], running: bool) -> None:
    """Run the trial's fit. Inside a rank of a running multi-rank fit (a callback's search) it runs right here, on
    a copy of the running strategy, in the process group the ranks already form (as Lightning's in-fit search
    runs on every rank); otherwise it is a fit of its own: in this process, or on Ray ranks for a Ray Trainer."""
    if running and trainer.world_size > 1:
        strategy = copy.copy(trainer.strategy)  # its settings; the trial wraps the module in a DDP of its own
        trial.session.run("fit", model, strategy, train=fit_kwargs.get("train_dataloaders"),
                          val=fit_kwargs.get("val_dataloaders"), datamodule=fit_kwargs.get("datamodule"))
    else:
        trial.fit(model, **fit_kwargs)


class ModuleSnapshot:
    """A module's weights, buffers, gradients, train/eval modes and trainer link, copied so that ``restore``
    puts them back bitwise (in place: optimizers holding the parameters stay valid)."""

    def __init__(self, module: torch.nn.Module, datamodule: Any = None) -> None:
        self.module, self.datamodule = module, datamodule
        self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        self.grads = [(p, None if p.grad is None else p.grad.detach().clone()) for p in module.parameters()]
        self.modes = [(m, m.training) for m in module.modules()]
        self.trainer = module.__dict__.get("_trainer")
        self.dm_trainer = getattr(datamodule, "trainer", None) if datamodule is not None else None

    def restore(self) -> None:
        """Put everything captured back."""
        missing, unexpected = self.module.load_state_dict(self.state, strict=False)
        if missing or unexpected:  # e.g. layers configure_model() created during the search
            log.warning("the tuner restored the module's weights, but its parameters changed during the search "
                        "(new: %s; gone: %s); those keep the values the search left.", missing, unexpected)
        for p, grad in self.grads:
            p.grad = None if grad is None else grad.clone()
        for m, training in self.modes:
            m.training = training
        self.module.trainer = self.trainer
        if self.datamodule is not None:
            self.datamodule.trainer = self.dm_trainer


@contextlib.contextmanager
def no_lifecycle_hooks(*owners: Any) -> Iterator[None]:
    """Inside a fit in progress (the callbacks), a trial must not run the module's and datamodule's
    prepare_data/setup/teardown again (Lightning's in-fit search does not): they are no-ops for the block."""
    names = ("prepare_data", "setup", "teardown")
    shadowed = []
    try:
        for owner in owners:
            if owner is None:
                continue
            for name in names:
                if name not in owner.__dict__:
                    owner.__dict__[name] = _noop
                    shadowed.append((owner, name))
        yield
    finally:
        for owner, name in shadowed:
            owner.__dict__.pop(name, None)


def _noop(*args: Any, **kwargs: Any) -> None:
    """Stands in for a hook the trial must not call."""


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Python, numpy, torch and CUDA RNG states as they were before the block (as Lightning's isolate_rng): the
    fit after a search draws the same numbers as a fit without one."""
    states = rng_states(plain=False)
    try:
        yield
    finally:
        set_rng_states(states)


def is_oom_error(exc: BaseException) -> bool:
    """Whether ``exc`` says memory ran out: torch.OutOfMemoryError (CUDA), or a RuntimeError saying "out of
    memory" or the CPU allocator's "can't allocate memory"."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    if not isinstance(exc, RuntimeError) or not exc.args:
        return False
    text = str(exc.args[0])
    return "out of memory" in text or "DefaultCPUAllocator: can't allocate memory" in text \
        or "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED." in text


def free_memory(collect: bool = False) -> None:
    """Release CUDA's cached blocks; with ``collect`` first the Python garbage a failed trial left (its traceback
    holds the frames and their tensors). A full collection takes about a second in a large process, so it runs
    only where device memory is at stake (CUDA in use); on the CPU the young generations are enough."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if collect:
        gc.collect() if cuda else gc.collect(1)
    if cuda:
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------- Lightning's attribute lookup
def attr_holders(module: Any, datamodule: Any, name: str) -> list[Any]:
    """Where ``name`` lives, in Lightning's order: the module, its hparams, the datamodule, its hparams."""
    holders: list[Any] = []
    for owner in (module, datamodule):
        if owner is None:
            continue
        if hasattr(owner, name):
            holders.append(owner)
        hparams = getattr(owner, "hparams", None)
        if hparams is not None and name in hparams:
            holders.append(hparams)
    return holders


def has_attr(module: Any, datamodule: Any, name: str) -> bool:
    return bool(attr_holders(module, datamodule, name))


def get_attr(module: Any, datamodule: Any, name: str) -> Any:
    """The value Lightning reads: that of the last holder (the datamodule's wins)."""
    holders = attr_holders(module, datamodule, name)
    if not holders:
        raise AttributeError(f"{name!r} is not an attribute of the model, model.hparams, the datamodule or "
                             "datamodule.hparams.")
    last = holders[-1]
    return last[name] if isinstance(last, dict) else getattr(last, name)


def set_attr(module: Any, datamodule: Any, name: str, value: Any) -> None:
    """Set ``name`` on every holder, as Lightning does."""
    holders = attr_holders(module, datamodule, name)
    if not holders:
        raise AttributeError(f"{name!r} is not an attribute of the model, model.hparams, the datamodule or "
                             "datamodule.hparams.")
    for holder in holders:
        if isinstance(holder, dict):
            holder[name] = value
        else:
            setattr(holder, name, value)
