"""Parsing configure_optimizers: every form Lightning accepts -> (optimizers, scheduler configs)."""
from __future__ import annotations

from typing import Any

import torch

from raytrainer.utilities.types import LRSchedulerConfig

ACCEPTED_FORMS = (
    "configure_optimizers must return one of: an optimizer; a list or tuple of optimizers; "
    "([optimizers], [schedulers]); a dict {'optimizer': opt, 'lr_scheduler': scheduler or "
    "{'scheduler': s, 'interval': 'epoch'|'step', 'frequency': n, 'monitor': name, 'strict': bool}}; "
    "or a list/tuple of such dicts; or None (no optimizer, manual optimization only)."
)


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
