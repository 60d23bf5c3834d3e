"""LearningRateMonitor: log each optimizer's learning rate (and optionally momentum and weight decay)."""
from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from raytrainer.callbacks.callback import Callback, logs_at
from raytrainer.utilities import log
from raytrainer.utilities.exceptions import MisconfigurationException


class LearningRateMonitor(Callback):
    """Logs ``lr-<Optimizer>`` per optimizer and parameter group, named as Lightning names them.

    Names: a scheduler's ``name`` when given, else ``lr-<OptimizerClass>`` (``-1``, ``-2`` ... for further optimizers
    of the same class); several parameter groups add ``/<group name>`` or ``/pg<i>``. ``log_momentum`` adds
    ``<name>-momentum`` (``betas[0]`` for Adam-like optimizers) and ``log_weight_decay`` ``<name>-weight_decay``.
    With ``logging_interval=None`` each scheduled optimizer is logged at its scheduler's interval, an unscheduled one
    at every epoch start and every logged step.
    """

    def __init__(self, logging_interval: str | None = None, log_momentum: bool = False,
                 log_weight_decay: bool = False) -> None:
        if logging_interval not in (None, "step", "epoch"):
            raise MisconfigurationException(f"LearningRateMonitor(logging_interval={logging_interval!r}): use "
                                            "'step', 'epoch' or None.")
        self.logging_interval = logging_interval
        self.log_momentum = log_momentum
        self.log_weight_decay = log_weight_decay
        self.lrs: dict[str, list[float]] = {}
        self.last_momentum_values: dict[str, float | None] = {}
        self.last_weight_decay_values: dict[str, float | None] = {}

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.loggers:
            raise MisconfigurationException("LearningRateMonitor needs a logger: the Trainer has none "
                                            "(logger=False). Pass a logger or remove the callback.")
        if self.log_momentum and not all("momentum" in o.defaults or "betas" in o.defaults
                                         for o, _, _ in self._named(trainer)):
            log.warning("LearningRateMonitor(log_momentum=True): some optimizers have no momentum; 0 is logged "
                        "for them.")
        names = [n for _, _, group_names in self._named(trainer) for n in group_names]
        self.lrs = {n: [] for n in names}
        self.last_momentum_values = {f"{n}-momentum": None for n in names}
        self.last_weight_decay_values = {f"{n}-weight_decay": None for n in names}

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.logging_interval == "epoch" or not logs_at(trainer, trainer.session.state.batches_that_stepped + 1):
            return
        self._log(trainer, "step" if self.logging_interval is None else "any")

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self.logging_interval != "step":
            self._log(trainer, "epoch" if self.logging_interval is None else "any")

    # ---------------------------------------------------------------------------------------------------- internals
    def _named(self, trainer: Any) -> list[tuple[torch.optim.Optimizer, str, list[str]]]:
        """(optimizer, interval or "any", one name per parameter group): scheduled optimizers first, then the
        others."""
        out: list[tuple[torch.optim.Optimizer, str, list[str]]] = []
        seen: list[torch.optim.Optimizer] = []
        per_type: Counter = Counter()

        def add(opt: torch.optim.Optimizer, name: str | None, interval: str) -> None:
            seen.append(opt)
            if name is None:  # only unnamed entries count towards the -1, -2 ... suffixes
                per_type[type(opt)] += 1
            base = name or f"lr-{type(opt).__name__}"
            if per_type[type(opt)] > 1:  # as Lightning: a scheduler's own name gets the suffix too
                base += f"-{per_type[type(opt)] - 1}"
            groups = opt.param_groups
            labels = [g.get("name") for g in groups]
            given = [n for n in labels if n is not None]
            if len(given) != len(set(given)):
                raise MisconfigurationException(f"{base}: parameter groups of one optimizer need distinct 'name' "
                                                f"values, got {given}.")
            if len(groups) > 1:
                out.append((opt, interval, [f"{base}/{lab or f'pg{i + 1}'}" for i, lab in enumerate(labels)]))
            else:
                out.append((opt, interval, [f"{base}/{labels[0]}" if labels[0] else base]))

        for cfg in trainer.lr_scheduler_configs:
            add(cfg.scheduler.optimizer, cfg.name, cfg.interval)
        for opt in trainer.optimizers:
            opt = getattr(opt, "optimizer", opt)  # a LightningOptimizer wrapper
            if not any(opt is s for s in seen):
                add(opt, None, "any")  # as Lightning: logged at every epoch start and logged step
        return out

    def _log(self, trainer: Any, interval: str) -> None:
        stats: dict[str, float] = {}
        for opt, when, names in self._named(trainer):
            if "any" not in (interval, when) and when != interval:
                continue
            betas = "betas" in opt.defaults
            for group, name in zip(opt.param_groups, names):
                lr = group["lr"]
                self.lrs.setdefault(name, []).append(lr)
                stats[name] = lr
                if self.log_momentum:
                    m = group["betas"][0] if betas else group.get("momentum", 0)
                    stats[f"{name}-momentum"] = self.last_momentum_values[f"{name}-momentum"] = m
                if self.log_weight_decay:
                    wd = group["weight_decay"]
                    stats[f"{name}-weight_decay"] = self.last_weight_decay_values[f"{name}-weight_decay"] = wd
        if not stats:
            return
        session = trainer.session
        session.callback_metrics_store.update({k: torch.tensor(v) for k, v in stats.items()})
        session.send_to_loggers(stats, session.state.batches_that_stepped)

