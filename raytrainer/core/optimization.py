"""Optimizers and schedulers: parsing configure_optimizers, LightningOptimizer, clipping, stepping."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from raytrainer.trainer.trainer import Trainer

ACCEPTED_FORMS = (
    "configure_optimizers must return one of: an optimizer; a list or tuple of optimizers; "
    "([optimizers], [schedulers]); a dict {'optimizer': opt, 'lr_scheduler': scheduler or "
    "{'scheduler': s, 'interval': 'epoch'|'step', 'frequency': n, 'monitor': name, 'strict': bool}}; "
    "or a list/tuple of such dicts; or None (no optimizer, manual optimization only)."
)


@dataclass
class LRSchedulerConfig:
    """One scheduler and when to step it."""

    scheduler: Any
    interval: str = "epoch"
    frequency: int = 1
    monitor: str | None = None
    strict: bool = True
    name: str | None = None
    reduce_on_plateau: bool = False
    opt_idx: int = 0


def _is_optimizer(x: Any) -> bool:
    return isinstance(x, torch.optim.Optimizer)


def _is_scheduler(x: Any) -> bool:
    return hasattr(x, "step") and hasattr(x, "optimizer") and not _is_optimizer(x)


def _scheduler_config(item: Any, default_monitor: str | None = None) -> LRSchedulerConfig:
    if isinstance(item, dict):
        unknown = set(item) - {"scheduler", "interval", "frequency", "monitor", "strict", "name",
                               "reduce_on_plateau", "opt_idx"}
        if "scheduler" not in item or unknown:
            raise ValueError(f"lr_scheduler dict {sorted(item)} is invalid: it needs 'scheduler' and may have "
                             f"interval, frequency, monitor, strict, name. {ACCEPTED_FORMS}")
        interval = item.get("interval", "epoch")
        if interval not in ("epoch", "step"):
            raise ValueError(f"lr_scheduler interval={interval!r}: use 'epoch' or 'step'.")
        cfg = LRSchedulerConfig(item["scheduler"], interval, int(item.get("frequency", 1)),
                                item.get("monitor", default_monitor), bool(item.get("strict", True)),
                                item.get("name"))
    elif _is_scheduler(item):
        cfg = LRSchedulerConfig(item, monitor=default_monitor)
    else:
        raise ValueError(f"{type(item).__name__} is not a learning-rate scheduler. {ACCEPTED_FORMS}")
    if cfg.frequency < 1:
        raise ValueError(f"lr_scheduler frequency={cfg.frequency}: must be >= 1.")
    cfg.reduce_on_plateau = isinstance(cfg.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    if cfg.reduce_on_plateau and cfg.monitor is None:
        raise ValueError("ReduceLROnPlateau needs a metric to watch: return {'optimizer': opt, 'lr_scheduler': "
                         "{'scheduler': sched, 'monitor': 'val_loss'}} from configure_optimizers.")
    return cfg


def parse_optimizers(out: Any) -> tuple[list[torch.optim.Optimizer], list[LRSchedulerConfig]]:
    """Normalise every configure_optimizers form into (optimizers, scheduler configs)."""
    if out is None:
        return [], []
    if _is_optimizer(out):
        return [out], []
    if isinstance(out, dict):
        return _parse_dict(out)
    if isinstance(out, (list, tuple)):
        if len(out) == 2 and isinstance(out[0], (list, tuple)) and isinstance(out[1], (list, tuple)) \
                and all(_is_optimizer(o) for o in out[0]):
            opts = list(out[0])
            scheds = [_scheduler_config(s) for s in out[1]]
            return opts, _assign(scheds, opts)
        if out and all(_is_optimizer(o) for o in out):
            return list(out), []
        if out and all(isinstance(o, dict) for o in out):
            opts, scheds = [], []
            for d in out:
                o, s = _parse_dict(d)
                opts += o
                scheds += s
            return opts, _assign(scheds, opts)
    raise ValueError(f"configure_optimizers returned {type(out).__name__} {_short(out)}. {ACCEPTED_FORMS}")


def _parse_dict(d: dict) -> tuple[list[torch.optim.Optimizer], list[LRSchedulerConfig]]:
    unknown = set(d) - {"optimizer", "lr_scheduler", "monitor", "frequency"}
    if "optimizer" not in d or not _is_optimizer(d["optimizer"]) or unknown:
        raise ValueError(f"configure_optimizers returned a dict with keys {sorted(d)}. {ACCEPTED_FORMS}")
    scheds = []
    if d.get("lr_scheduler") is not None:
        scheds.append(_scheduler_config(d["lr_scheduler"], d.get("monitor")))
    return [d["optimizer"]], _assign(scheds, [d["optimizer"]])


def _assign(scheds: list[LRSchedulerConfig], opts: list[torch.optim.Optimizer]) -> list[LRSchedulerConfig]:
    for s in scheds:
        opt = getattr(s.scheduler, "optimizer", None)
        matches = [i for i, o in enumerate(opts) if o is opt]
        if not matches:
            raise ValueError("a scheduler returned by configure_optimizers wraps an optimizer that was not "
                             "returned with it; return the optimizer too.")
        s.opt_idx = matches[0]
    return scheds


def _short(x: Any) -> str:
    r = repr(x)
    return r if len(r) < 80 else r[:77] + "..."


class LightningOptimizer:
    """Wraps a torch optimizer for manual optimization: precision-aware step, step counting."""

    def __init__(self, optimizer: torch.optim.Optimizer, trainer: "Trainer") -> None:
        self._optimizer = optimizer
        self._trainer = trainer
        self._on_before_step: Callable[[], None] = lambda: None
        self._on_after_step: Callable[[], None] = lambda: None

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self._optimizer.param_groups

    @property
    def state(self) -> Any:
        return self._optimizer.state

    def state_dict(self) -> dict[str, Any]:
        return self._optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._optimizer.load_state_dict(state)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        """Precision/strategy-aware step; counts one global_step, as Lightning does.

        The closure (usually forward + ``manual_backward``) runs first, then gradients are unscaled
        (16-mixed) and ``on_before_optimizer_step`` runs, so the hook sees real-sized gradients.
        """
        if closure is not None and not callable(closure):
            raise TypeError(f"optimizer.step(closure=...) needs a callable closure, got {type(closure).__name__}.")
        if kwargs:
            raise TypeError(f"optimizer.step() got extra arguments {sorted(kwargs)}; raytrainer passes only "
                            "`closure` to the optimizer. Set such options on the optimizer's param_groups instead.")
        t = self._trainer
        optimizer = self._optimizer

        def closure_then_hook() -> Any:
            out = closure() if closure is not None else None
            t._precision.unscale_gradients(optimizer)
            for fn in t._hot_hooks.get("on_before_optimizer_step", ()):
                fn(optimizer)
            return out

        self._on_before_step()
        out = t._optimizer_step(optimizer, closure_then_hook)
        self._on_after_step()
        t._on_manual_optimizer_step()
        return out

    def __getattr__(self, name: str) -> Any:
        # Everything else (defaults, add_param_group, ...) is the wrapped optimizer's, as in Lightning.
        if name == "_optimizer":
            raise AttributeError(name)
        return getattr(self._optimizer, name)

    def __repr__(self) -> str:
        return f"LightningOptimizer({self._optimizer!r})"


class AutomaticStepOptimizer(LightningOptimizer):
    """What an overridden ``LightningModule.optimizer_step`` receives under automatic optimization.

    ``step(closure=optimizer_closure)`` runs training_step, backward and the pre-step hooks inside the
    closure (the Trainer built it), then the precision-aware step. The Trainer counts the global step.
    """

    def step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        return self._trainer._optimizer_step(self._optimizer, closure)


def clip_gradients(optimizer: Any, clip_val: float | None, algorithm: str | None, precision: Any) -> None:
    """Clip one optimizer's gradients in place (unscaling first under 16-mixed)."""
    if clip_val is None or clip_val == 0:
        return
    optimizer = getattr(optimizer, "optimizer", optimizer)
    algorithm = algorithm or "norm"
    if algorithm not in ("norm", "value"):
        raise ValueError(f"gradient_clip_algorithm={algorithm!r}: use 'norm' or 'value'.")
    if clip_val < 0:
        raise ValueError(f"gradient_clip_val={clip_val}: must be >= 0.")
    if precision is not None:
        precision.unscale_gradients(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not params:
        return
    if algorithm == "norm":
        torch.nn.utils.clip_grad_norm_(params, clip_val)
    else:
        torch.nn.utils.clip_grad_value_(params, clip_val)
