"""Bookkeeping behind ``self.log``: step values, epoch reductions, sync_dist, prog_bar.

The hot path (``log`` during ``training_step``) only stores a reference to the value: no
``.item()``, no host sync, no allocation beyond a dict assignment. Values become floats only when
a logger, the progress bar or a callback reads them.

A torchmetrics ``Metric`` may be logged instead of a value, as in Lightning: its step value is the
batch value its last forward call computed, its epoch value is ``compute()`` (which syncs across
ranks itself), and it is reset when the epoch's values have been published.
"""
from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable
from typing import Any

import torch

from raytrainer.utilities.exceptions import MisconfigurationException, MisconfigurationRuntimeError

# Hooks whose self.log calls default to on_step=True, on_epoch=False (Lightning's defaults).
STEP_LEVEL_FX = frozenset({
    "training_step", "on_train_batch_start", "on_train_batch_end", "on_before_backward",
    "on_after_backward", "on_before_optimizer_step", "on_before_zero_grad", "optimizer_step",
    "configure_gradient_clipping", "clip_gradients",
})
# Hooks where Lightning refuses self.log (its _FxValidator entries without log options).
NO_LOG_FX = frozenset({
    "predict_step", "on_predict_batch_start", "on_predict_batch_end", "on_predict_epoch_start",
    "on_predict_epoch_end", "on_predict_start", "on_predict_end", "configure_optimizers", "setup", "teardown",
    "prepare_data", "lr_scheduler_step", "on_fit_start", "on_fit_end", "on_sanity_check_start",
    "on_sanity_check_end", "on_train_end", "on_validation_end", "on_test_end", "on_before_batch_transfer",
    "transfer_batch_to_device", "on_after_batch_transfer", "on_exception", "state_dict", "on_save_checkpoint",
    "on_load_checkpoint", "load_state_dict", "configure_sharded_model", "configure_model", "train_dataloader",
    "val_dataloader", "test_dataloader", "predict_dataloader", "configure_callbacks",
    "on_validation_model_zero_grad", "on_validation_model_eval", "on_test_model_eval", "on_validation_model_train",
    "on_test_model_train",
})
# Hooks that run once per epoch or stage: only on_step=False, on_epoch=True is allowed there (Lightning).
EPOCH_ONLY_FX = frozenset({
    "on_train_start", "on_validation_start", "on_test_start", "on_train_epoch_start", "on_train_epoch_end",
    "on_validation_epoch_start", "on_validation_epoch_end", "on_test_epoch_start", "on_test_epoch_end",
})
REDUCE_FX = {"mean": "mean", "avg": "mean", "sum": "sum", "max": "max", "min": "min"}
# (value, op, process group or None for every rank) -> the value reduced across ranks
Reduce = Callable[[torch.Tensor, str, Any], torch.Tensor]


class _Meta:
    """How one logged name is treated; decided on the first call and reused afterwards."""

    __slots__ = ("name", "on_step", "on_epoch", "prog_bar", "logger", "reduce", "sync_dist", "dl_suffix", "dl_idx",
                 "metric", "rank_zero_only", "metric_attribute", "fx", "group", "args")

    def __init__(self, name: str, on_step: bool, on_epoch: bool, prog_bar: bool, logger: bool,
                 reduce: str, sync_dist: bool, dl_suffix: str = "", metric: bool = False,
                 rank_zero_only: bool = False, metric_attribute: str | None = None, fx: str = "") -> None:
        self.name, self.on_step, self.on_epoch = name, on_step, on_epoch
        self.prog_bar, self.logger, self.reduce, self.sync_dist = prog_bar, logger, reduce, sync_dist
        self.metric = metric  # a torchmetrics Metric object, not a value
        self.dl_suffix = dl_suffix  # "/dataloader_idx_N", already part of name
        self.dl_idx: int | None = None  # the evaluation dataloader it was logged from, when there are several
        self.rank_zero_only = rank_zero_only  # logged from rank 0 only: never reduced across ranks
        self.metric_attribute = metric_attribute  # the module attribute that holds a logged Metric
        self.fx = fx  # the hook that logged it first
        self.group: Any = None  # sync_dist_group: the process group sync_dist reduces over (None: every rank)
        self.args: tuple | None = None  # the self.log arguments as given, to tell a changed call cheaply

    @property
    def syncs(self) -> bool:
        """Whether this value is reduced across ranks when read (sync_dist, and not rank_zero_only)."""
        return self.sync_dist and not self.rank_zero_only

    def key(self, suffix: str) -> str:
        """Published name: ``loss_step`` / ``loss_epoch`` when both are logged (``loss_epoch/dataloader_idx_1``)."""
        if not (self.on_step and self.on_epoch):
            return self.name
        base = self.name[:len(self.name) - len(self.dl_suffix)] if self.dl_suffix else self.name
        return f"{base}_{suffix}{self.dl_suffix}"


class _Accum:
    """Running epoch reduction for one name (weighted mean by batch size, or sum/max/min)."""

    __slots__ = ("total", "weight")

    def __init__(self) -> None:
        self.total: Any = None
        self.weight: float = 0.0

    def add(self, value: Any, weight: float, reduce: str) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach()
        if self.total is None:
            self.total = value * weight if reduce == "mean" else value
        elif reduce == "mean":
            self.total = self.total + value * weight
        elif reduce == "sum":
            self.total = self.total + value
        elif reduce == "max":
            self.total = torch.maximum(torch.as_tensor(self.total), torch.as_tensor(value))
        else:
            self.total = torch.minimum(torch.as_tensor(self.total), torch.as_tensor(value))
        self.weight += weight

    def value(self, reduce: str) -> torch.Tensor:
        v = torch.as_tensor(self.total, dtype=torch.float32) if not isinstance(self.total, torch.Tensor) \
            else self.total.float()
        return v / self.weight if reduce == "mean" else v


def is_metric(value: Any) -> bool:
    """Whether ``value`` is a torchmetrics Metric (recognised by its interface; torchmetrics is not imported)."""
    return isinstance(value, torch.nn.Module) and callable(getattr(value, "compute", None)) \
        and callable(getattr(value, "reset", None)) and hasattr(value, "_forward_cache")


def to_float(v: Any) -> float:
    return float(v.item()) if isinstance(v, torch.Tensor) else float(v)


class Results:
    """One stage's logged values (train, validate, test): what is current and what has accumulated."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.meta: dict[str, _Meta] = {}
        self.step_values: dict[str, Any] = {}      # name -> latest raw value (on_step names)
        self.accum: dict[str, _Accum] = {}          # name -> epoch accumulator (on_epoch names)
        self.metrics: dict[str, Any] = {}           # name -> torchmetrics Metric logged this epoch
        self.dataloader_suffix = ""
        self.fx = ""       # the hook or step now running (decides self.log defaults)
        self.batch: Any = None  # the batch now processed (batch size inference); None outside batches
        self._metric_attributes: dict[int, str] | None = None  # id(Metric) -> module attribute, found once

    def reset_epoch(self) -> None:
        self.accum.clear()
        self.step_values.clear()
        self.reset_metrics()

    def reset_metrics(self) -> None:
        """Reset every Metric logged this epoch (Lightning does so once the epoch's values are published)."""
        for metric in self.metrics.values():
            metric.reset()
        self.metrics.clear()

    def log(self, fx: str, name: str, value: Any, prog_bar: bool, logger: bool, on_step: bool | None,
            on_epoch: bool | None, reduce_fx: Any, sync_dist: bool, batch_size: int | None,
            batch: Any, add_dataloader_idx: bool = True, sync_dist_group: Any = None,
            metric_attribute: str | None = None, rank_zero_only: bool = False, module: Any = None) -> None:
        suffix = self.dataloader_suffix if add_dataloader_idx else ""
        full = name + suffix
        meta = self.meta.get(full)
        args = (fx, prog_bar, logger, on_step, on_epoch, reduce_fx, sync_dist, sync_dist_group, metric_attribute,
                rank_zero_only)
        if meta is None:
            meta = self._new_meta(fx, full, value, prog_bar, logger, on_step, on_epoch, reduce_fx, sync_dist,
                                  add_dataloader_idx, sync_dist_group, metric_attribute, rank_zero_only, module)
            meta.args = args
            meta.dl_suffix = suffix
            if self.dataloader_suffix:
                meta.dl_idx = int(self.dataloader_suffix.rsplit("_", 1)[1])
        elif meta.args != args:
            self._check_same_call(meta, args, value, add_dataloader_idx, module)
        if meta.metric:
            self.metrics[full] = value
            if meta.on_step:
                self.step_values[full] = value
            return
        if meta.on_step:
            self.step_values[full] = value
        if meta.on_epoch:
            acc = self.accum.get(full)
            if acc is None:
                acc = self.accum[full] = _Accum()
            weight = 1.0
            if meta.reduce == "mean":
                weight = float(batch_size) if batch_size is not None else float(infer_batch_size(batch))
            acc.add(value, weight, meta.reduce)

    def _check_same_call(self, meta: _Meta, args: tuple, value: Any, add_dataloader_idx: bool, module: Any) -> None:
        """A name logged again from the same hook must keep its arguments (Lightning refuses a change)."""
        fx = args[0]
        if meta.args is None:  # restored from a checkpoint (a process group cannot be saved): adopt this call's
            meta.args, meta.group = args, args[7]
            return
        if fx != meta.fx:
            return  # logged from another hook too: the first hook's settings stay in force
        probe = self._resolve(fx, meta.name, value, *args[1:7], add_dataloader_idx, *args[7:], module)
        fields = ("on_step", "on_epoch", "prog_bar", "logger", "reduce", "sync_dist", "group", "metric_attribute",
                  "rank_zero_only")
        changed = [f"{f}: {getattr(meta, f)!r} -> {getattr(probe, f)!r}" for f in fields
                   if getattr(meta, f) != getattr(probe, f)]
        if changed:
            raise MisconfigurationException(
                f"You called self.log({meta.name!r}, ...) twice in `{fx}` with different arguments "
                f"({'; '.join(changed)}). This is not allowed: use the same arguments each time, or another name.")
        meta.args = args  # the same call spelled differently (e.g. reduce_fx="mean" and torch.mean)

    def _new_meta(self, fx: str, name: str, value: Any, prog_bar: bool, logger: bool,
                  on_step: bool | None, on_epoch: bool | None, reduce_fx: Any, sync_dist: bool,
                  add_dataloader_idx: bool = True, sync_dist_group: Any = None, metric_attribute: str | None = None,
                  rank_zero_only: bool = False, module: Any = None) -> _Meta:
        meta = self._resolve(fx, name, value, prog_bar, logger, on_step, on_epoch, reduce_fx, sync_dist,
                             add_dataloader_idx, sync_dist_group, metric_attribute, rank_zero_only, module)
        self.meta[name] = meta
        return meta

    def _resolve(self, fx: str, name: str, value: Any, prog_bar: bool, logger: bool,
                 on_step: bool | None, on_epoch: bool | None, reduce_fx: Any, sync_dist: bool,
                 add_dataloader_idx: bool, sync_dist_group: Any, metric_attribute: str | None,
                 rank_zero_only: bool, module: Any) -> _Meta:
        """Check one self.log call as Lightning does and settle its levels, reduction and sync."""
        if fx in NO_LOG_FX:
            raise MisconfigurationRuntimeError(
                f"self.log({name!r}) was called in `{fx}`, where logging is not supported. Log from "
                "training/validation/test steps or their batch/epoch hooks (or write to self.logger.experiment).")
        metric = is_metric(value)
        if isinstance(value, torch.Tensor) and value.numel() != 1:
            raise ValueError(f"self.log({name!r}, value) needs a scalar (one-element tensor or number), "
                             f"got a tensor of shape {tuple(value.shape)}. Reduce it first, e.g. value.mean().")
        if not metric and not isinstance(value, (torch.Tensor, numbers.Number)):
            raise TypeError(f"self.log({name!r}, value): value must be a number, a scalar tensor or a torchmetrics "
                            f"Metric, got {type(value).__name__}. For several values use self.log_dict.")
        base = name[:len(name) - len(self.dataloader_suffix)] if add_dataloader_idx and self.dataloader_suffix \
            else name
        if add_dataloader_idx and "/dataloader_idx_" in base:
            raise MisconfigurationException(
                f"self.log({base!r}): the name must not contain '/dataloader_idx_' while add_dataloader_idx=True; "
                "the index is appended for you. Drop it from the name, or pass add_dataloader_idx=False.")
        step_default = fx in STEP_LEVEL_FX and self.stage == "train"
        on_step = step_default if on_step is None else bool(on_step)
        on_epoch = (not step_default) if on_epoch is None else bool(on_epoch)
        if fx in EPOCH_ONLY_FX and (on_step or not on_epoch):
            bad = f"on_step={on_step}" if on_step else f"on_epoch={on_epoch}"
            raise MisconfigurationException(
                f"self.log({name!r}, {bad}) in `{fx}`: this hook runs once per epoch, so only on_step=False, "
                "on_epoch=True is allowed there.")
        if not on_step and not on_epoch:
            raise MisconfigurationException(
                f"self.log({name!r}, on_step=False, on_epoch=False) is not useful: the value would be published "
                "nowhere. Set on_step=True, on_epoch=True, or both.")
        if self.stage != "train" and on_step and fx not in STEP_LEVEL_FX and not fx.endswith("_step") \
                and not fx.endswith("batch_end") and not fx.endswith("batch_start"):
            on_step = False
        if callable(reduce_fx) and not isinstance(reduce_fx, str):
            reduce_fx = {torch.mean: "mean", torch.sum: "sum", torch.max: "max", torch.min: "min"}.get(
                reduce_fx, reduce_fx)
        if isinstance(reduce_fx, str):
            reduce_fx = reduce_fx.lower()
        if reduce_fx not in REDUCE_FX:
            raise MisconfigurationException(
                f"self.log({name!r}, reduce_fx={reduce_fx!r}): use 'mean', 'sum', 'max' or 'min' (or torch.mean/"
                "sum/max/min). For a custom reduction, log a torchmetrics Metric instead.")
        if metric and metric_attribute is None and module is not None:
            metric_attribute = self._find_metric_attribute(module, value, name)
        meta = _Meta(name, on_step, on_epoch, prog_bar, logger, REDUCE_FX[reduce_fx], sync_dist, metric=metric,
                     rank_zero_only=bool(rank_zero_only), metric_attribute=metric_attribute, fx=fx)
        meta.group = sync_dist_group
        return meta

    def _find_metric_attribute(self, module: Any, value: Any, name: str) -> str:
        """The module attribute that holds a logged Metric (Lightning requires one, or metric_attribute=)."""
        if self._metric_attributes is None:
            self._metric_attributes = {id(m): n for n, m in module.named_modules() if is_metric(m)}
            if not self._metric_attributes:
                raise MisconfigurationException(
                    f"self.log({name!r}, metric): the torchmetrics Metric is not an attribute of the "
                    "LightningModule, and the module holds no Metric at all. Assign it in __init__ "
                    "(self.acc = Accuracy(...)) so it moves to the device and its state is saved.")
        attr = self._metric_attributes.get(id(value))
        if attr is None:
            raise MisconfigurationException(
                f"self.log({name!r}, metric): could not find the LightningModule attribute holding this "
                f"torchmetrics Metric. Pass self.log({name!r}, ..., metric_attribute=name) with name one of "
                f"{list(self._metric_attributes.values())}, or assign the metric as an attribute.")
        return attr

    def accum_state_dict(self) -> dict[str, Any]:
        """The epoch accumulators of ``self.log(..., on_epoch=True)`` values, as plain types and tensors."""
        out: dict[str, Any] = {}
        for name, acc in self.accum.items():
            meta = self.meta.get(name)
            if meta is None or acc.total is None:
                continue
            total = acc.total.detach().clone() if isinstance(acc.total, torch.Tensor) else acc.total
            out[name] = {"total": total, "weight": float(acc.weight),  # a process group cannot be saved
                         "meta": {k: getattr(meta, k) for k in meta.__slots__ if k not in ("group", "args")}}
        return out

    def load_accum_state_dict(self, state: dict[str, Any]) -> None:
        """Put accumulators saved by ``accum_state_dict`` back, so epoch means cover the whole epoch."""
        init_args = set(inspect.signature(_Meta.__init__).parameters) - {"self"}
        for name, item in state.items():
            saved = item["meta"]
            meta = _Meta(**{k: v for k, v in saved.items() if k in init_args})
            for k, v in saved.items():
                if k not in init_args and k in _Meta.__slots__:
                    setattr(meta, k, v)
            self.meta[name] = meta
            acc = _Accum()
            acc.total = item["total"]
            acc.weight = float(item["weight"])
            self.accum[name] = acc

    def step_metrics(self, reduce: Reduce | None = None) -> dict[str, tuple[_Meta, Any]]:
        """Latest step values keyed by their published name (``name`` or ``name_step``); sync_dist values
        reduced across ``sync_dist_group`` (every rank by default) when ``reduce`` is given."""
        out = {}
        for name, value in self.step_values.items():
            meta = self.meta[name]
            if meta.metric:
                # the batch value of the metric's last forward(); None when only update() ran (nothing to log)
                value = value._forward_cache
                if value is None:
                    continue
                out[meta.key("step")] = (meta, _scalar(value.detach(), meta.name))
                continue
            if isinstance(value, torch.Tensor):
                value = value.detach()
            if reduce is not None and meta.syncs:
                value = reduce(torch.as_tensor(value).float(), meta.reduce, meta.group)
            out[meta.key("step")] = (meta, value)
        return out

    def epoch_metrics(self, reduce: Reduce | None, sync_all: bool) -> dict[str, tuple[_Meta, torch.Tensor]]:
        """Reduce every on_epoch value over the epoch, and across ranks when asked (sync_dist, over its
        sync_dist_group) or when sync_all; rank_zero_only values stay this rank's own.

        A mean across ranks is weighted by batch size (the sums and batch counts are reduced, as Lightning does),
        so ranks that saw different numbers of samples count by their samples, not equally."""
        out = {}
        metrics = [n for n, m in self.metrics.items() if self.meta[n].on_epoch]
        for name in sorted([*self.accum, *metrics]):  # same order on every rank, so collectives line up
            meta = self.meta[name]
            if meta.metric:  # compute() gathers the metric's state from every rank itself
                out[meta.key("epoch")] = (meta, _scalar(self.metrics[name].compute(), meta.name))
                continue
            acc = self.accum[name]
            if reduce is not None and not meta.rank_zero_only and (meta.sync_dist or sync_all):
                if meta.reduce == "mean":
                    total = torch.as_tensor(acc.total).detach().float().reshape(())
                    both = reduce(torch.stack([total, torch.tensor(acc.weight, device=total.device)]), "sum",
                                  meta.group)
                    value = both[0] / both[1]
                else:
                    value = reduce(acc.value(meta.reduce), meta.reduce, meta.group)
            else:
                value = acc.value(meta.reduce)
            out[meta.key("epoch")] = (meta, value)
        return out


def _scalar(value: Any, name: str) -> torch.Tensor:
    """A logged Metric's value as a float tensor; a Metric that computes several values cannot be logged."""
    value = torch.as_tensor(value)
    if value.numel() != 1:
        raise ValueError(f"self.log({name!r}, metric): the metric computes a value of shape {tuple(value.shape)}, "
                         "not a scalar. Log a scalar metric (e.g. average='macro'), or log each element yourself.")
    return value.detach().float().reshape(())


def infer_batch_size(batch: Any) -> int:
    """Size of dim 0 of the first tensor found in the batch; 1 when there is none."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, (list, tuple)):
        for b in batch:
            n = infer_batch_size(b)
            if n:
                return n
    if isinstance(batch, dict):
        for b in batch.values():
            n = infer_batch_size(b)
            if n:
                return n
    return 1
