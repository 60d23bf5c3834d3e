"""Trainer: checks arguments, resolves the Plan, hands the run to a launcher, exposes the results."""
from __future__ import annotations

import functools
import inspect
import math
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterable

import torch
from torch import nn

from raytrainer.callbacks.callback import Callback, overrides
from raytrainer.datamodule import LightningDataModule
from raytrainer.loggers.base import Logger
from raytrainer.module import LightningModule
from raytrainer.core import loops
from raytrainer.core.optimization import (AutomaticStepOptimizer, LightningOptimizer, LRSchedulerConfig,
                                             parse_optimizers)
from raytrainer.trainer.plan import Env, Plan, as_sequence
from raytrainer.core.precision import Precision, make_precision
from raytrainer.core.results import Results, to_float
from raytrainer.core import control
from raytrainer.core.control import Preempted
from raytrainer.utilities import closest, log, set_rng_states

HOT_HOOKS = ("on_train_batch_start", "on_train_batch_end", "on_before_backward", "on_after_backward",
             "on_before_optimizer_step", "on_before_zero_grad")
MONITORING = ("ModelCheckpoint", "EarlyStopping")


def _callback_order(cb: Any) -> tuple[bool, bool]:
    """Sort key: monitoring callbacks after the others, and ModelCheckpoint last of all (as in Lightning), so a
    checkpoint holds the state other callbacks reached in the same hook (e.g. EarlyStopping's wait count)."""
    names = {k.__name__ for k in type(cb).__mro__}
    return bool(names & set(MONITORING)), "ModelCheckpoint" in names


@dataclass
class ResumePosition:
    """Where a restored run re-enters its epoch: the RNG that ordered it, and batches already done."""

    epoch: int
    batch_idx: int
    epoch_rng: torch.Tensor | None  # None for a Lightning checkpoint: the epoch gets a fresh order
    rng: dict[str, Any] | None
    results: dict[str, Any] | None = None  # epoch accumulators of self.log(on_epoch=True) values so far
    segments: list[list[int]] | None = None  # elastic runs: [world, batches per rank, batch size] done so far


class Trainer:
    """Lightning's Trainer API. One device runs in this process; more ranks run on Ray actors."""

    def __init__(
        self,
        *,
        accelerator: str | None = "auto",
        strategy: str | None = "auto",
        devices: Any = "auto",
        num_nodes: Any = 1,
        precision: Any = "32-true",
        logger: Any = None,
        callbacks: Callback | list[Callback] | None = None,
        fast_dev_run: bool | int = False,
        max_epochs: int | None = None,
        min_epochs: int | None = None,
        max_steps: int = -1,
        min_steps: int | None = None,
        max_time: str | timedelta | dict[str, int] | None = None,
        limit_train_batches: int | float | None = None,
        limit_val_batches: int | float | None = None,
        limit_test_batches: int | float | None = None,
        limit_predict_batches: int | float | None = None,
        val_check_interval: int | float | None = None,
        check_val_every_n_epoch: int | None = 1,
        num_sanity_val_steps: int | None = None,
        log_every_n_steps: int | None = None,
        enable_checkpointing: bool | None = None,
        enable_progress_bar: bool | None = None,
        enable_model_summary: bool | None = None,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
        deterministic: bool | str | None = None,
        benchmark: bool | None = None,
        inference_mode: bool = True,
        use_distributed_sampler: bool = True,
        detect_anomaly: bool = False,
        default_root_dir: str | None = None,
        sync_batchnorm: bool = False,
        reload_dataloaders_every_n_epochs: int = 0,
        # Lightning 1.x device arguments
        num_processes: Any = None,
        gpus: Any = None,
        tpu_cores: Any = None,
        # raytrainer: Ray backend and fault tolerance
        max_failures: int = 0,
        placement_timeout_s: float = 60.0,
        collective_timeout_s: float = 300.0,
        snapshot_every_n_steps: int | None = None,
        heartbeat_timeout_s: float = 300.0,
        elastic_batch_policy: str = "rank",
        scale_check_interval_s: float = 5.0,
        ray_address: str | None = None,
        spare_ranks_per_node: int | None = None,
        **unknown: Any,
    ) -> None:
        if unknown:
            valid = [p for p in inspect.signature(Trainer.__init__).parameters if p not in ("self", "unknown")]
            msgs = []
            for name in unknown:
                hint = closest(name, valid)
                msgs.append(f"{name!r}" + (f" (did you mean {hint!r}?)" if hint else ""))
            raise TypeError(f"Trainer got unknown argument(s) {', '.join(msgs)}. Valid arguments: "
                            f"{', '.join(valid)}.")
        self._env = Env.detect()
        self.plan = Plan.from_args(accelerator=accelerator, devices=devices, strategy=strategy,
                                   num_nodes=num_nodes, precision=precision, num_processes=num_processes,
                                   gpus=gpus, tpu_cores=tpu_cores, env=self._env)
        self.plan.check_hardware(self._env)

        self.fast_dev_run = int(fast_dev_run) if not isinstance(fast_dev_run, bool) else (1 if fast_dev_run else 0)
        if self.fast_dev_run < 0:
            raise ValueError(f"fast_dev_run={fast_dev_run!r} must be a bool or a non-negative int.")
        for name, value in (("max_steps", max_steps),):
            if not isinstance(value, int) or value < -1:
                raise ValueError(f"{name}={value!r} must be -1 (no limit) or a non-negative int.")
        if not isinstance(accumulate_grad_batches, int) or accumulate_grad_batches < 1:
            raise ValueError(f"accumulate_grad_batches={accumulate_grad_batches!r} must be an int >= 1.")
        if gradient_clip_algorithm not in (None, "norm", "value"):
            raise ValueError(f"gradient_clip_algorithm={gradient_clip_algorithm!r}: use 'norm' or 'value'.")
        if gradient_clip_val is not None and gradient_clip_val < 0:
            raise ValueError(f"gradient_clip_val={gradient_clip_val!r} must be >= 0.")
        if max_failures < 0:
            raise ValueError(f"max_failures={max_failures!r} must be >= 0.")

        if self.fast_dev_run:
            max_epochs, max_steps, num_sanity_val_steps = 1, self.fast_dev_run, 0
            limit_train_batches = limit_val_batches = limit_test_batches = limit_predict_batches = self.fast_dev_run
            val_check_interval, logger, enable_checkpointing = 1.0, False, False
        self.max_epochs = max_epochs if max_epochs is not None else (1000 if max_steps == -1 and max_time is None else -1)
        self.min_epochs = min_epochs
        self.max_steps = max_steps
        self.min_steps = min_steps
        self._max_time_s = _parse_max_time(max_time)
        self.limit_train_batches = _check_limit("limit_train_batches", limit_train_batches)
        self.limit_val_batches = _check_limit("limit_val_batches", limit_val_batches)
        self.limit_test_batches = _check_limit("limit_test_batches", limit_test_batches)
        self.limit_predict_batches = _check_limit("limit_predict_batches", limit_predict_batches)
        if val_check_interval is not None and (val_check_interval <= 0 or
                                               (isinstance(val_check_interval, float) and val_check_interval > 1)):
            raise ValueError(f"val_check_interval={val_check_interval!r}: use a float in (0, 1] (fraction of an "
                             "epoch) or an int >= 1 (number of training batches).")
        if check_val_every_n_epoch is None and isinstance(val_check_interval, float):
            raise ValueError(f"val_check_interval={val_check_interval!r} is a fraction of an epoch, but "
                             "check_val_every_n_epoch=None counts batches across epochs: give an int number of "
                             "training batches, or set check_val_every_n_epoch.")
        if check_val_every_n_epoch is not None and (not isinstance(check_val_every_n_epoch, int)
                                                     or check_val_every_n_epoch < 1):
            raise ValueError(f"check_val_every_n_epoch={check_val_every_n_epoch!r} must be an int >= 1, or None "
                             "(validate every val_check_interval batches, across epochs).")
        self.val_check_interval = val_check_interval
        self.check_val_every_n_epoch = check_val_every_n_epoch
        self._sanity_steps = 2 if num_sanity_val_steps is None else int(num_sanity_val_steps)
        self.num_sanity_val_steps = self._sanity_steps
        self.log_every_n_steps = 50 if log_every_n_steps is None else int(log_every_n_steps)
        if self.log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps={log_every_n_steps!r} must be >= 1.")
        self.accumulate_grad_batches = accumulate_grad_batches
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.deterministic = deterministic
        self.benchmark = benchmark
        self.use_distributed_sampler = use_distributed_sampler
        self.inference_mode = bool(inference_mode)
        self._detect_anomaly = detect_anomaly
        self.default_root_dir = str(default_root_dir) if default_root_dir is not None else os.getcwd()
        self.enable_progress_bar = True if enable_progress_bar is None else bool(enable_progress_bar)
        self.enable_model_summary = True if enable_model_summary is None else bool(enable_model_summary)
        self.enable_checkpointing = True if enable_checkpointing is None else bool(enable_checkpointing)
        self.sync_batchnorm = sync_batchnorm
        self.max_failures = max_failures
        self.placement_timeout_s = float(placement_timeout_s)
        self.collective_timeout_s = float(collective_timeout_s)
        if snapshot_every_n_steps is not None and snapshot_every_n_steps < 0:
            raise ValueError(f"snapshot_every_n_steps={snapshot_every_n_steps!r}: use an int >= 1, 0 to turn "
                             "in-memory snapshots off, or None to snapshot every step while that costs under 5% "
                             "of the step time.")
        if spare_ranks_per_node is not None and (not isinstance(spare_ranks_per_node, int)
                                                 or isinstance(spare_ranks_per_node, bool) or spare_ranks_per_node < 0):
            raise ValueError(f"spare_ranks_per_node={spare_ranks_per_node!r}: use an int >= 0 (warm spare processes "
                             "per node that replace a dead rank at once), or None for 1 when max_failures > 0.")
        self.spare_ranks_per_node = (1 if max_failures > 0 else 0) if spare_ranks_per_node is None \
            else spare_ranks_per_node
        for name, value in (("heartbeat_timeout_s", heartbeat_timeout_s),
                            ("scale_check_interval_s", scale_check_interval_s),
                            ("placement_timeout_s", placement_timeout_s),
                            ("collective_timeout_s", collective_timeout_s)):
            if not value > 0:
                raise ValueError(f"{name}={value!r} must be > 0 seconds.")
        self.snapshot_every_n_steps = snapshot_every_n_steps
        self.heartbeat_timeout_s = float(heartbeat_timeout_s)
        if elastic_batch_policy not in ("rank", "global"):
            raise ValueError(f"elastic_batch_policy={elastic_batch_policy!r}: use 'rank' (keep each rank's batch "
                             "size; the global batch follows the world size) or 'global' (keep the global batch; "
                             "each rank's batch is batch_size * MAX / world).")
        self.elastic_batch_policy = elastic_batch_policy
        self.scale_check_interval_s = float(scale_check_interval_s)
        self.ray_address = ray_address

        self.callbacks: list[Callback] = self._default_callbacks(as_sequence(callbacks))
        self.loggers: list[Logger] = self._make_loggers(logger)

        # run state
        self.lightning_module: LightningModule | None = None
        self.datamodule: LightningDataModule | None = None
        self.strategy: Any = None
        self._precision: Precision = make_precision("32-true", "cpu")
        self.optimizers: list[torch.optim.Optimizer] = []
        self._lightning_optimizers: list[LightningOptimizer] = []
        self.lr_scheduler_configs: list[LRSchedulerConfig] = []
        self.current_epoch = 0
        self.global_step = 0
        self._batches_that_stepped = 0
        self._stepped_since_log = False
        self._batch_idx = 0
        self._batches_done_in_epoch = 0
        self._total_batches_seen = 0
        self._epoch_done = False
        self._epoch_start_rng: torch.Tensor | None = None
        self._resume: ResumePosition | None = None
        self._resuming = False
        self.should_stop = False
        self.training = False
        self.sanity_checking = False
        self.state_fn: str | None = None
        self._results: dict[str, Results] = {}
        self._callback_metrics: dict[str, torch.Tensor] = {}
        self._logged_metrics: dict[str, Any] = {}
        self._progress_bar_metrics: dict[str, float] = {}
        self._eval_batch_counts: list[int] = []
        self._eval_steps_seen: dict[tuple[str, int], int] = {}
        self._hot_hooks: dict[str, list[Callable[..., Any]]] = {}
        self._train_dataloader: Any = None
        self._val_dataloaders: list[Any] = []
        self.num_training_batches: float | int | None = 0
        self._val_check_batches: int | None = None
        self._to_device: Callable[[Any], Any] | None = None
        self._closure_optimizer = False
        self._step_model: nn.Module | None = None
        self._module_optimizer_step: Callable[..., Any] | None = None
        self._module_lr_scheduler_step: Callable[..., Any] | None = None
        self._snapshotter: Any = None  # set on Ray ranks: takes in-memory snapshots at step boundaries
        self._elastic = False           # set on Ray ranks of an elastic run: data is re-sharded on resize
        self._epoch_segments: list[list[int]] = []
        self._events: Any = None       # EventLog (rank 0 of an in-process run) or a forwarder to the Ray driver
        self._events_forwarded = False  # True on Ray ranks: the driver writes start/finish itself
        self._forward_start = False     # ... except the first start, which only rank 0 knows the step of
        self.saved_checkpoints: list[tuple[int, str]] = []
        self.last_run: Any = None   # RunResult / events of the last Ray run

    # ------------------------------------------------------------------ construction helpers
    def _default_callbacks(self, user: list[Callback]) -> list[Callback]:
        from raytrainer.callbacks.model_checkpoint import ModelCheckpoint
        from raytrainer.callbacks.model_summary import ModelSummary
        from raytrainer.callbacks.progress import TQDMProgressBar

        for cb in user:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be raytrainer.callbacks.Callback instances; got "
                                f"{type(cb).__name__}. Subclass raytrainer.Callback.")
        cbs = list(user)
        if self.enable_progress_bar and not any(isinstance(c, TQDMProgressBar) for c in cbs):
            cbs.append(TQDMProgressBar())
        if not self.enable_progress_bar:
            cbs = [c for c in cbs if not isinstance(c, TQDMProgressBar)]
        if self.enable_model_summary and not any(isinstance(c, ModelSummary) for c in cbs):
            cbs.append(ModelSummary())
        has_ckpt = any(isinstance(c, ModelCheckpoint) for c in cbs)
        if has_ckpt and not self.enable_checkpointing:
            raise ValueError("enable_checkpointing=False but a ModelCheckpoint callback was passed; remove one.")
        if self.enable_checkpointing and not has_ckpt:
            cbs.append(ModelCheckpoint())
        # monitoring callbacks run after the others, as in Lightning
        return sorted(cbs, key=_callback_order)

    def _make_loggers(self, logger: Any) -> list[Logger]:
        from raytrainer.loggers.csv import CSVLogger

        if logger is False:
            return []
        if logger is None or logger is True:
            return [CSVLogger(self.default_root_dir)]
        return list(as_sequence(logger))

    # ------------------------------------------------------------------ public properties
    @property
    def logger(self) -> Logger | None:
        return self.loggers[0] if self.loggers else None

    @property
    def log_dir(self) -> str:
        lg = self.logger
        return lg.log_dir if lg is not None and lg.log_dir is not None else self.default_root_dir

    @property
    def world_size(self) -> int:
        return self.strategy.world_size if self.strategy is not None else self.plan.world_size

    @property
    def global_rank(self) -> int:
        return self.strategy.global_rank if self.strategy is not None else 0

    @property
    def local_rank(self) -> int:
        return self.strategy.ctx.local_rank if self.strategy is not None else 0

    @property
    def node_rank(self) -> int:
        return self.strategy.ctx.node_rank if self.strategy is not None else 0

    @property
    def is_global_zero(self) -> bool:
        return self.global_rank == 0

    @property
    def num_devices(self) -> int:
        return self.plan.ranks_per_node

    @property
    def num_nodes(self) -> int:
        return self.plan.num_nodes

    @property
    def precision(self) -> str:
        return self.plan.precision

    @property
    def checkpoint_callback(self) -> Any:
        from raytrainer.callbacks.model_checkpoint import ModelCheckpoint

        return next((c for c in self.callbacks if isinstance(c, ModelCheckpoint)), None)

    @property
    def checkpoint_callbacks(self) -> list[Any]:
        from raytrainer.callbacks.model_checkpoint import ModelCheckpoint

        return [c for c in self.callbacks if isinstance(c, ModelCheckpoint)]

    @property
    def early_stopping_callback(self) -> Any:
        return next((c for c in self.callbacks if type(c).__name__ == "EarlyStopping"), None)

    @property
    def progress_bar_callback(self) -> Any:
        from raytrainer.callbacks.progress import TQDMProgressBar

        return next((c for c in self.callbacks if isinstance(c, TQDMProgressBar)), None)

    @property
    def callback_metrics(self) -> dict[str, torch.Tensor]:
        """Every logged value: epoch results, and the latest step values of the running epoch."""
        out = dict(self._callback_metrics)
        train = self._results.get("train")
        if train is not None and train.step_values:
            for key, (meta, value) in train.step_metrics().items():
                out[key] = value if isinstance(value, torch.Tensor) else torch.tensor(float(value))
                out[meta.name] = out[key]  # during the epoch the plain name is the latest step value (Lightning)
        return out

    @property
    def logged_metrics(self) -> dict[str, Any]:
        """Every value sent to the loggers, plus the latest training step values (as Lightning)."""
        out = dict(self._logged_metrics)
        train = self._results.get("train")
        if train is not None and train.step_values:
            for key, (meta, value) in train.step_metrics().items():
                if meta.logger:
                    out[key] = to_float(value)
        return out

    @property
    def progress_bar_metrics(self) -> dict[str, float]:
        out = dict(self._progress_bar_metrics)
        train = self._results.get("train")
        if train is not None and train.step_values:
            for key, (meta, value) in train.step_metrics().items():
                if meta.prog_bar:
                    out[key] = to_float(value)
        return out

    @property
    def estimated_stepping_batches(self) -> float:
        n = self.num_training_batches or 0
        per_epoch = math.ceil(n / self.accumulate_grad_batches) if n and not math.isinf(n) else float("inf")
        if self.max_steps != -1:
            return min(self.max_steps, per_epoch * max(self.max_epochs, 1)) if self.max_epochs not in (None, -1) \
                else self.max_steps
        return per_epoch * (self.max_epochs if self.max_epochs not in (None, -1) else 1)

    @property
    def train_dataloader(self) -> Any:
        return self._train_dataloader

    @property
    def val_dataloaders(self) -> Any:
        v = self._val_dataloaders
        return v[0] if len(v) == 1 else v

    # ------------------------------------------------------------------ entry points
    def fit(self, model: LightningModule, train_dataloaders: Any = None, val_dataloaders: Any = None,
            datamodule: LightningDataModule | None = None, ckpt_path: str | None = None) -> None:
        """Train ``model``; with ckpt_path (a path, "last" or "best") resume from a checkpoint."""
        if isinstance(train_dataloaders, LightningDataModule):
            datamodule, train_dataloaders = train_dataloaders, None
        self._check_inputs("fit", model, datamodule, train_dataloaders, val_dataloaders)
        if train_dataloaders is None and datamodule is None and not _defines(model, "train_dataloader"):
            raise ValueError("Trainer.fit got no training data: pass train_dataloaders=DataLoader(...), "
                             "datamodule=..., or define train_dataloader() on the module.")
        self._launch("fit", model, dict(train=train_dataloaders, val=val_dataloaders, datamodule=datamodule,
                                        ckpt_path=ckpt_path))

    def validate(self, model: LightningModule | None = None, dataloaders: Any = None, ckpt_path: str | None = None,
                 verbose: bool = True, datamodule: LightningDataModule | None = None) -> list[dict[str, float]]:
        """Run validation_step over the data once; returns one metrics dict per dataloader."""
        return self._evaluate("validate", model, dataloaders, ckpt_path, verbose, datamodule)

    def test(self, model: LightningModule | None = None, dataloaders: Any = None, ckpt_path: str | None = None,
             verbose: bool = True, datamodule: LightningDataModule | None = None) -> list[dict[str, float]]:
        """Run test_step over the data once; returns one metrics dict per dataloader."""
        return self._evaluate("test", model, dataloaders, ckpt_path, verbose, datamodule)

    def predict(self, model: LightningModule | None = None, dataloaders: Any = None,
                datamodule: LightningDataModule | None = None, return_predictions: bool | None = None,
                ckpt_path: str | None = None) -> list[Any] | None:
        """Run predict_step (default: forward) under inference_mode; outputs in dataset order."""
        model = model or self.lightning_module
        if isinstance(dataloaders, LightningDataModule):
            datamodule, dataloaders = dataloaders, None
        self._check_inputs("predict", model, datamodule, dataloaders, None)
        if dataloaders is None and datamodule is None and not _defines(model, "predict_dataloader"):
            raise ValueError("Trainer.predict got no data: pass dataloaders=..., datamodule=..., or define "
                             "predict_dataloader() on the module.")
        return self._launch("predict", model, dict(dataloaders=dataloaders, datamodule=datamodule,
                                                   ckpt_path=ckpt_path,
                                                   return_predictions=True if return_predictions is None
                                                   else return_predictions))

    def _evaluate(self, stage: str, model: Any, dataloaders: Any, ckpt_path: str | None, verbose: bool,
                  datamodule: Any) -> list[dict[str, float]]:
        model = model or self.lightning_module
        if isinstance(dataloaders, LightningDataModule):
            datamodule, dataloaders = dataloaders, None
        self._check_inputs(stage, model, datamodule, dataloaders, None)
        hook = "val_dataloader" if stage == "validate" else "test_dataloader"
        if dataloaders is None and datamodule is None and not _defines(model, hook):
            raise ValueError(f"Trainer.{stage} got no data: pass dataloaders=..., datamodule=..., or define "
                             f"{hook}() on the module.")
        out = self._launch(stage, model, dict(dataloaders=dataloaders, datamodule=datamodule, ckpt_path=ckpt_path))
        if verbose and out:
            _print_eval(stage, out)
        return out

    def _check_inputs(self, fn: str, model: Any, datamodule: Any, loaders: Any, val: Any) -> None:
        if model is None:
            raise ValueError(f"Trainer.{fn} needs a model: pass a LightningModule (no model was fitted before).")
        if not isinstance(model, LightningModule):
            raise TypeError(f"Trainer.{fn} expects a raytrainer.LightningModule, got {type(model).__name__}. "
                            "Subclass raytrainer.LightningModule (import raytrainer as pl; pl.LightningModule).")
        if datamodule is not None and not isinstance(datamodule, LightningDataModule):
            raise TypeError(f"datamodule must be a raytrainer.LightningDataModule, got {type(datamodule).__name__}.")
        if datamodule is not None and (loaders is not None or val is not None):
            raise ValueError(f"Trainer.{fn}: pass either dataloaders or a datamodule, not both.")

    def _launch(self, fn: str, model: LightningModule, kwargs: dict[str, Any]) -> Any:
        from raytrainer.launchers.base import make_launcher

        self.state_fn = fn
        return make_launcher(self.plan).launch(self, fn, model, kwargs)

    # ------------------------------------------------------------------ one rank's run
    def _run_stage(self, fn: str, model: LightningModule, strategy: Any, *, train: Any = None, val: Any = None,
                   dataloaders: Any = None, datamodule: LightningDataModule | None = None,
                   ckpt_path: str | None = None, return_predictions: bool = True) -> Any:
        """Set up, run one entry point's loop on this process, tear down. Used by every launcher."""
        self.state_fn = fn
        self.strategy = strategy
        self.lightning_module = model
        self.datamodule = datamodule
        self.should_stop = False
        model.trainer = self
        if datamodule is not None:
            datamodule.trainer = self
        self._precision = self._make_precision()
        stage = {"fit": "fit", "validate": "validate", "test": "test", "predict": "predict"}[fn]
        self._results = {s: Results(s) for s in ("train", "validate", "test")}
        # as Lightning: each fit/validate/test/predict starts with empty metrics
        self._callback_metrics, self._logged_metrics, self._progress_bar_metrics = {}, {}, {}
        self._eval_steps_seen = {}
        extra_cbs = as_sequence(model.configure_callbacks())
        added = [c for c in extra_cbs if type(c) not in {type(x) for x in self.callbacks}]
        self.callbacks = sorted([c for c in self.callbacks if type(c) not in {type(x) for x in extra_cbs}]
                                + list(extra_cbs), key=_callback_order) if added or \
            extra_cbs else self.callbacks
        if self.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=self.deterministic == "warn")
        if self.benchmark is not None and torch.backends.cudnn.is_available():
            torch.backends.cudnn.benchmark = bool(self.benchmark)
        strategy.setup_environment()
        try:
            if self.local_rank == 0:
                if datamodule is not None:
                    datamodule.prepare_data()
                model.prepare_data()
            strategy.barrier("prepare_data")
            if datamodule is not None:
                datamodule.setup(stage)
            self._call_callbacks("setup", stage)
            model.setup(stage)
            self._resolve_dataloaders(fn, model, datamodule, train, val, dataloaders)
            if fn == "fit":
                model_for_steps = strategy.setup_module(StepDispatch(model) if strategy.wraps_model else model)
            else:
                model_for_steps = self._eval_module(model, strategy)
            self._step_model = model_for_steps
            self._to_device = None if strategy.root_device.type == "cpu" else strategy.batch_to_device
            if fn == "fit":
                self._setup_optimizers(model)
            if ckpt_path is not None:
                self._restore_from(ckpt_path, fn)
            self._hot_hooks = self._collect_hot_hooks(model)
            if fn == "fit":
                self._log_hparams(model, datamodule)
                out: Any = self._fit_with_preemption()
            elif fn in ("validate", "test"):
                self._results[fn].reset_epoch()
                out = loops.evaluation_loop(self, fn, self._val_dataloaders, limit=None)
            else:
                out = loops.predict_loop(self, self._val_dataloaders, return_predictions)
        except BaseException as exc:
            for cb in self.callbacks:
                if overrides(cb, Callback, "on_exception"):
                    cb.on_exception(self, model, exc)
            self._finish(model, datamodule, stage, "failed")
            raise
        self._finish(model, datamodule, stage, "success")
        if isinstance(out, Preempted):
            raise out
        return out

    def _fit_with_preemption(self) -> "Preempted | None":
        """Run the fit loop with SIGTERM turned into a stop at the next step and a durable checkpoint."""
        events = self._events
        if events is None and self.is_global_zero:
            from raytrainer.core.events import EventLog

            events = self._events = EventLog(self.log_dir)
        if events is not None and (not self._events_forwarded or self._forward_start):
            # after any restore, so a resumed run's start names the step it resumes at
            from raytrainer.core.events import command_fields

            events.emit("start", world_size=self.world_size, step=self.global_step, epoch=self.current_epoch,
                        **command_fields())
        if not self._events_forwarded:
            control.reset()  # a stop requested in an earlier fit of this process does not carry over
        previous = control.install_sigterm_handler()
        try:
            loops.fit_loop(self)
        finally:
            control.restore_sigterm_handler(previous)
        if control.stop_reason() != "preempt":
            if events is not None and not self._events_forwarded:
                events.emit("finish", world_size=self.world_size, step=self.global_step, epoch=self.current_epoch)
            return None
        path = self._preemption_checkpoint()
        if events is not None and not self._events_forwarded:  # on Ray the driver records it
            events.emit("preemption", world_size=self.world_size, step=self.global_step, epoch=self.current_epoch,
                        cause="SIGTERM", path=path)
        message = (f"preempted (SIGTERM) at step {self.global_step}, epoch {self.current_epoch}; checkpoint written "
                   f"to {path}. Rerun the same command with ckpt_path='last' to resume (exit code "
                   f"{control.PREEMPTED_EXIT_CODE}).")
        if self.is_global_zero:
            log.warning("%s", message)
        return Preempted(message, checkpoint=path)

    def _preemption_checkpoint(self) -> str:
        """The durable checkpoint of a preempted run: last.ckpt where ckpt_path="last" will find it."""
        from raytrainer.io import storage

        cb = self.checkpoint_callback
        if cb is not None:
            cb.wait_for_writes()
            if cb.last_model_path and cb._last_global_step_saved == self.global_step:
                return cb.last_model_path
            directory = cb.dirpath
        else:
            directory = storage.join(self.log_dir, "checkpoints")
        path = storage.join(directory, "last.ckpt")
        if self.is_global_zero:
            storage.makedirs(directory)
        self.save_checkpoint(path)
        if cb is not None:
            cb.last_model_path = path
        return path

    def _finish(self, model: LightningModule, datamodule: Any, stage: str, status: str) -> None:
        for cb in self.callbacks:
            wait = getattr(cb, "wait_for_writes", None)
            if wait is not None:
                wait()
        if self.is_global_zero:
            for lg in self.loggers:
                lg.finalize(status)
        self._call_callbacks("teardown", stage)
        model.teardown(stage)
        if datamodule is not None:
            datamodule.teardown(stage)
        self._bind_results(None)
        if self.strategy is not None:
            self.strategy.teardown()

    def _make_precision(self) -> Precision:
        device_type = self.strategy.root_device.type
        maker = getattr(self.strategy, "make_precision", None)
        return maker(self.plan.precision) if maker is not None else make_precision(self.plan.precision, device_type)

    def _eval_module(self, model: LightningModule, strategy: Any) -> nn.Module:
        model.to(strategy.root_device)
        strategy.model = model
        return model

    def _resolve_dataloaders(self, fn: str, model: Any, dm: Any, train: Any, val: Any, loaders: Any) -> None:
        src = dm if dm is not None else model

        def from_hook(name: str) -> list[Any]:
            hook = getattr(src, name, None)
            if hook is None or not _defines(src, name):
                return []
            return list(as_sequence(hook()))

        if fn == "fit":
            train = train if train is not None else (from_hook("train_dataloader") or [None])[0]
            if train is None:
                raise ValueError("Trainer.fit found no training data: train_dataloader() returned None.")
            if isinstance(train, (list, tuple, dict)):
                raise ValueError("Trainer.fit takes one training DataLoader (combining several is not supported); "
                                 "concatenate the datasets into one DataLoader.")
            self._train_dataloader = self._prepare_loader(train, shuffle_default=True)
            vals = list(as_sequence(val)) if val is not None else from_hook("val_dataloader")
            limit_val = self.limit_val_batches
            self._val_dataloaders = [] if limit_val == 0 or not _defines(model, "validation_step") else \
                [self._prepare_loader(v, shuffle_default=False) for v in vals]
            self.num_training_batches = self._limit(self._train_dataloader, "train")
            n = self.num_training_batches
            vci = self.val_check_interval
            if vci is None or (isinstance(vci, float) and vci == 1.0) or not n:
                self._val_check_batches = None
            elif isinstance(vci, float):
                self._val_check_batches = max(1, int(n * vci)) if n is not None and not math.isinf(n) else None
            else:
                self._val_check_batches = int(vci)
        else:
            hook = {"validate": "val_dataloader", "test": "test_dataloader", "predict": "predict_dataloader"}[fn]
            items = list(as_sequence(loaders)) if loaders is not None else from_hook(hook)
            if not items:
                raise ValueError(f"Trainer.{fn} found no data: {hook}() returned nothing.")
            self._val_dataloaders = [self._prepare_loader(v, shuffle_default=False,
                                                          ordered=fn == "predict") for v in items]

    def _prepare_loader(self, loader: Any, shuffle_default: bool, ordered: bool = False) -> Any:
        if not isinstance(loader, Iterable):
            raise TypeError(f"expected a DataLoader (or any iterable of batches), got {type(loader).__name__}.")
        if self.strategy is None or not self.use_distributed_sampler:
            return loader
        from raytrainer.strategies.sampler import distributed_loader, elastic_loader

        if self._elastic and shuffle_default:  # even at world size 1: the epoch may continue another world's
            batch = None
            if self.elastic_batch_policy == "global" and getattr(loader, "batch_size", None):
                batch = max(1, loader.batch_size * self.plan.max_ranks // self.strategy.world_size)
            return elastic_loader(loader, self.strategy.ctx, batch_size=batch)
        if self.strategy.distributed:
            return distributed_loader(loader, self.strategy.ctx, ordered=ordered)
        return loader

    def _limit(self, loader: Any, stage: str) -> int | float | None:
        limit = {"train": self.limit_train_batches, "validate": self.limit_val_batches,
                 "test": self.limit_test_batches, "predict": self.limit_predict_batches}[stage]
        try:
            n: int | None = len(loader)
        except TypeError:
            n = None
        if limit is None:
            return n if n is not None else float("inf")
        if isinstance(limit, float):
            if n is None:
                if limit == 1.0:
                    return float("inf")
                raise ValueError(f"limit_{stage}_batches={limit} is a fraction but the {stage} dataloader has no "
                                 "length; give an int number of batches instead.")
            return int(n * limit) if limit < 1.0 else n
        return min(int(limit), n) if n is not None else int(limit)

    def _should_validate_epoch(self, epoch: int) -> bool:
        if not self._val_dataloaders:
            return False
        every = self.check_val_every_n_epoch
        return every is None or (epoch + 1) % every == 0

    def _setup_optimizers(self, model: LightningModule) -> None:
        opts, scheds = parse_optimizers(model.configure_optimizers())
        if model.automatic_optimization:
            if not opts:
                raise ValueError("configure_optimizers returned no optimizer, which automatic optimization needs. "
                                 "Return an optimizer, or set self.automatic_optimization = False.")
            if len(opts) > 1:
                raise ValueError(f"configure_optimizers returned {len(opts)} optimizers, but automatic optimization "
                                 "supports one. Use manual optimization for several: set "
                                 "`self.automatic_optimization = False` in __init__ and step them in training_step "
                                 "with self.optimizers() and self.manual_backward(loss).")
        else:
            if self.gradient_clip_val:
                raise ValueError("Trainer(gradient_clip_val=...) does not apply under manual optimization: call "
                                 "self.clip_gradients(opt, gradient_clip_val=..., gradient_clip_algorithm=...) in "
                                 "training_step before opt.step().")
            if self.accumulate_grad_batches != 1:
                raise ValueError("Trainer(accumulate_grad_batches>1) does not apply under manual optimization: "
                                 "accumulate yourself, e.g. call opt.step() and opt.zero_grad() every N batches "
                                 "in training_step.")
        self.optimizers = opts
        self.lr_scheduler_configs = scheds
        self._lightning_optimizers = [LightningOptimizer(o, self) for o in opts]
        self._closure_optimizer = bool(opts) and isinstance(opts[0], torch.optim.LBFGS)

    def _collect_hot_hooks(self, model: LightningModule) -> dict[str, list[Callable[..., Any]]]:
        hooks: dict[str, list[Callable[..., Any]]] = {}
        for name in HOT_HOOKS:
            fns: list[Callable[..., Any]] = [functools.partial(getattr(cb, name), self, model)
                                             for cb in self.callbacks if overrides(cb, Callback, name)]
            if overrides(model, LightningModule, name):
                fns.append(getattr(model, name))
            hooks[name] = fns
        self._module_backward = model.backward if overrides(model, LightningModule, "backward") else None
        self._module_zero_grad = model.optimizer_zero_grad \
            if overrides(model, LightningModule, "optimizer_zero_grad") else None
        self._module_clip = model.configure_gradient_clipping \
            if overrides(model, LightningModule, "configure_gradient_clipping") else None
        self._module_optimizer_step = model.optimizer_step \
            if overrides(model, LightningModule, "optimizer_step") else None
        self._module_lr_scheduler_step = model.lr_scheduler_step \
            if overrides(model, LightningModule, "lr_scheduler_step") else None
        return hooks

    def _step_callable(self, name: str) -> Callable[..., Any]:
        """The training/validation/test step to call; under DDP, through the DDP wrapper's forward."""
        module = self.lightning_module
        wrapper = self._step_model
        if name == "training_step" and wrapper is not None and wrapper is not module:
            if module.automatic_optimization:
                return functools.partial(wrapper, _fx=name)

            def manual_step(*args: Any) -> Any:
                try:
                    return wrapper(*args, _fx=name)
                finally:
                    wrapper.require_backward_grad_sync = True
            return manual_step
        return getattr(module, name)

    # ------------------------------------------------------------------ hooks
    def _call_callbacks(self, name: str, *args: Any) -> None:
        model = self.lightning_module
        for cb in self.callbacks:
            getattr(cb, name)(self, model, *args)

    def _call_hook(self, name: str, *args: Any, monitoring_last: bool = False) -> Any:
        """Callbacks first, then the module (monitoring callbacks after the module when asked)."""
        model = self.lightning_module
        results = model.__dict__.get("_results")
        if results is not None:
            results.fx = name
        late = []
        for cb in self.callbacks:
            if monitoring_last and type(cb).__name__ in MONITORING:
                late.append(cb)
                continue
            getattr(cb, name)(self, model, *args)
        out = getattr(model, name)(*args) if hasattr(model, name) else None
        if late and name == "on_train_epoch_end":
            self._publish_train_epoch_metrics()  # what the module logged in on_train_epoch_end, for monitors
        for cb in late:
            getattr(cb, name)(self, model, *args)
        return out

    def _bind_results(self, results: Results | None) -> None:
        if self.lightning_module is not None:
            self.lightning_module.__dict__["_results"] = results

    # ------------------------------------------------------------------ optimization (called by loops)
    def _run_backward(self, loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> None:
        for fn in self._hot_hooks["on_before_backward"]:
            fn(loss)
        if optimizer is None and self.strategy.wraps_model:  # manual_backward under DDP
            self.strategy.pre_backward(loss)
        if self._module_backward is not None:
            self._module_backward(loss, *args, **kwargs)
        else:
            self._precision.backward(loss, *args, **kwargs)
        for fn in self._hot_hooks["on_after_backward"]:
            fn()

    def _zero_grad(self, optimizer: torch.optim.Optimizer, epoch: int, batch_idx: int) -> None:
        for fn in self._hot_hooks["on_before_zero_grad"]:
            fn(optimizer)
        if self._module_zero_grad is not None:
            self._module_zero_grad(epoch, batch_idx, optimizer)
        else:
            optimizer.zero_grad(set_to_none=True)

    def _hooked_optimizer_step(self, optimizer: torch.optim.Optimizer, closure: Callable[[], Any] | None) -> None:
        """Automatic optimization: unscale, on_before_optimizer_step, clipping, step, counters, schedulers.

        With a closure (LBFGS, or a module that overrides ``optimizer_step``) the hooks and clipping run
        after each closure evaluation, as Lightning's precision plugin does.
        """
        if closure is None:
            self._after_closure(optimizer)
            step_closure = None
        else:
            def step_closure() -> Any:
                loss = closure()
                self._after_closure(optimizer)
                return loss
        if self._module_optimizer_step is not None:
            self._module_optimizer_step(self.current_epoch, self._batch_idx, AutomaticStepOptimizer(optimizer, self),
                                        step_closure)
        else:
            self._optimizer_step(optimizer, step_closure)
        self.global_step += 1  # as Lightning: counts optimizer_step calls, even an override that skips the step
        self._batches_that_stepped += 1
        self._stepped_since_log = True
        if self.lr_scheduler_configs:
            self._step_schedulers("step", plateau=False)

    def _after_closure(self, optimizer: torch.optim.Optimizer) -> None:
        """Between backward and the optimizer step: unscale, on_before_optimizer_step, gradient clipping."""
        self._precision.unscale_gradients(optimizer)
        for fn in self._hot_hooks["on_before_optimizer_step"]:
            fn(optimizer)
        if self._module_clip is not None:
            self._module_clip(optimizer, self.gradient_clip_val, self.gradient_clip_algorithm)
        elif self.gradient_clip_val:
            loops.clip_for_trainer(self, optimizer)

    def _optimizer_step(self, optimizer: torch.optim.Optimizer, closure: Callable[[], Any] | None) -> Any:
        return self._precision.optimizer_step(optimizer, closure)

    def _on_manual_optimizer_step(self) -> None:
        self.global_step += 1

    def _step_schedulers(self, interval: str, plateau: bool | None = None) -> None:
        """Step the schedulers of ``interval``; plateau=True/False picks only (non-)ReduceLROnPlateau ones."""
        model = self.lightning_module
        if not self.lr_scheduler_configs or not model.automatic_optimization:
            return
        for cfg in self.lr_scheduler_configs:
            if cfg.interval != interval or (plateau is not None and bool(cfg.reduce_on_plateau) != plateau):
                continue
            # as Lightning: step intervals count this epoch's batches (batch_idx + 1), not global_step
            idx = self._batch_idx + 1 if interval == "step" else self.current_epoch + 1
            if idx % cfg.frequency != 0:
                continue
            if cfg.reduce_on_plateau:
                metrics = self.callback_metrics
                if cfg.monitor not in metrics:
                    if cfg.strict:
                        raise RuntimeError(
                            f"ReduceLROnPlateau monitors {cfg.monitor!r}, which was not logged at epoch "
                            f"{self.current_epoch}. Logged: {sorted(metrics)}. Log it with self.log or set "
                            "'strict': False in the lr_scheduler dict.")
                    log.warning("ReduceLROnPlateau: %r not found; scheduler not stepped (strict=False).", cfg.monitor)
                    continue
                if self._module_lr_scheduler_step is not None:
                    self._module_lr_scheduler_step(cfg.scheduler, metrics[cfg.monitor])
                else:
                    cfg.scheduler.step(float(metrics[cfg.monitor]))
            elif self._module_lr_scheduler_step is not None:
                self._module_lr_scheduler_step(cfg.scheduler, None)
            else:
                cfg.scheduler.step()

    # ------------------------------------------------------------------ logging (called by loops)
    def _log_step_metrics(self) -> None:
        train = self._results["train"]
        metrics = {k: to_float(v) for k, (meta, v) in train.step_metrics(self._reduce_fn()).items() if meta.logger}
        if metrics:
            self._send_to_loggers(metrics, self._batches_that_stepped - 1, self.current_epoch)

    def _reduce_fn(self) -> Callable[[torch.Tensor, str], torch.Tensor] | None:
        s = self.strategy
        return s.reduce if s is not None and s.distributed else None

    def _send_to_loggers(self, metrics: dict[str, float], step: int, epoch: int | None = None) -> None:
        """Record in logged_metrics and write to the loggers; ``epoch`` is added for the loggers only."""
        self._logged_metrics.update(metrics)
        if self.is_global_zero and self.loggers:
            if epoch is not None:
                metrics = {**metrics}
                metrics.setdefault("epoch", epoch)
            for lg in self.loggers:
                lg.log_metrics(metrics, step)

    def _log_eval_step_metrics(self, stage: str, dl_idx: int) -> None:
        """self.log(on_step=True) in validation/test steps: written per batch, as Lightning does."""
        results = self._results[stage]
        counter = (stage, dl_idx)
        step = self._eval_steps_seen.get(counter, 0)
        self._eval_steps_seen[counter] = step + 1
        if not results.step_values:
            return
        logged: dict[str, float] = {}
        for key, (meta, v) in results.step_metrics(self._reduce_fn()).items():
            f = to_float(v)
            if meta.prog_bar:
                self._progress_bar_metrics[key] = f
            if meta.logger:
                logged[key] = f
        results.step_values.clear()
        if logged:
            self._send_to_loggers(logged, step)

    def _publish_train_epoch_metrics(self) -> dict[str, tuple[Any, torch.Tensor]]:
        """Put this epoch's training results into callback/progress-bar metrics; returns the epoch values.

        Called before the on_train_epoch_end hooks (and again before the monitoring callbacks), so that they
        read this epoch's reductions, as in Lightning.
        """
        train = self._results["train"]
        reduce = self._reduce_fn()
        step_vals = train.step_metrics(reduce)
        epoch_vals = train.epoch_metrics(reduce, sync_all=False)
        for key, (meta, v) in list(step_vals.items()) + list(epoch_vals.items()):
            tensor = v if isinstance(v, torch.Tensor) else torch.tensor(float(v))
            self._callback_metrics[key] = tensor
            if not (meta.on_step and meta.on_epoch) or key.endswith("_epoch"):
                self._callback_metrics[meta.name] = tensor
            if meta.prog_bar:
                self._progress_bar_metrics[key] = to_float(tensor)
        if step_vals:
            # the last step values stay in logged_metrics, as Lightning keeps them
            self._logged_metrics.update({k: to_float(v) for k, (meta, v) in step_vals.items() if meta.logger})
            train.step_values.clear()
        return epoch_vals

    def _finish_train_epoch_logging(self, call_hooks: bool) -> None:
        epoch_vals = self._publish_train_epoch_metrics()
        logged = {key: to_float(v) for key, (meta, v) in epoch_vals.items() if meta.logger}
        if logged:
            self._send_to_loggers(logged, max(self._batches_that_stepped - 1, 0), self.current_epoch)

    def _publish_eval_epoch_metrics(self, stage: str) -> None:
        """Validation/test epoch reductions into callback/progress-bar metrics before on_*_epoch_end (Lightning)."""
        if self.sanity_checking:
            return
        for key, (meta, v) in self._results[stage].epoch_metrics(self._reduce_fn(), sync_all=True).items():
            self._callback_metrics[key] = v
            if key != meta.name:  # on_step and on_epoch: the plain name holds the epoch value too
                self._callback_metrics[meta.name] = v
            if meta.prog_bar:
                self._progress_bar_metrics[key] = to_float(v)

    def _finish_eval_logging(self, stage: str, n_loaders: int) -> list[dict[str, float]]:
        results = self._results[stage]
        vals = results.epoch_metrics(self._reduce_fn(), sync_all=True)
        per_loader: list[dict[str, float]] = [{} for _ in range(max(n_loaders, 1))]
        logged: dict[str, float] = {}
        for key, (meta, v) in vals.items():
            if self.sanity_checking:
                continue
            self._callback_metrics[key] = v
            if key != meta.name:  # on_step and on_epoch: the plain name holds the epoch value too
                self._callback_metrics[meta.name] = v
            f = to_float(v)
            if meta.prog_bar:
                self._progress_bar_metrics[key] = f
            if meta.logger:
                logged[key] = f
            idx = meta.dl_idx
            targets = [idx] if idx is not None and idx < len(per_loader) else range(len(per_loader))
            for i in targets:
                per_loader[i][key] = f
        if logged:
            step = max(self._batches_that_stepped - 1, 0) if self.state_fn == "fit" else self._batches_that_stepped
            self._send_to_loggers(logged, step, self.current_epoch)
        return per_loader

    def _log_hparams(self, model: LightningModule, datamodule: Any) -> None:
        if not self.is_global_zero:
            return
        # As Lightning: only what save_hyperparameters(logger=True) recorded is logged (no empty hparams.yaml).
        log_module = model.__dict__.get("_log_hyperparams", False)
        log_dm = datamodule is not None and datamodule.__dict__.get("_log_hyperparams", False)
        if not (log_module or log_dm):
            return
        params = dict(model.hparams_initial) if log_module else {}
        if log_dm:
            params.update(getattr(datamodule, "hparams", {}) or {})
        for lg in self.loggers:
            lg.log_hyperparams(params)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, filepath: str, weights_only: bool = False, storage_options: Any = None) -> None:
        """Write a Lightning-compatible checkpoint of the running (or just finished) fit."""
        from raytrainer.checkpoint.format import dump_checkpoint
        from raytrainer.io import storage

        if self.lightning_module is None:
            raise RuntimeError("save_checkpoint needs a model: call it after (or during) trainer.fit.")
        ckpt = dump_checkpoint(self, weights_only)
        if self.is_global_zero:
            storage.save(ckpt, filepath)
        if self.strategy is not None:
            self.strategy.barrier("save_checkpoint")

    def _restore_from(self, ckpt_path: "str | dict[str, Any]", fn: str) -> None:
        from raytrainer.checkpoint.format import resolve_ckpt_path, restore_training_state

        if isinstance(ckpt_path, dict):  # an in-memory snapshot handed over by the Ray driver
            restore_training_state(self, ckpt_path, full=fn == "fit")
            return
        path = resolve_ckpt_path(self, ckpt_path, fn)
        if path is None:
            return
        restore_training_state(self, path, full=fn == "fit")

    def _elastic_segments(self) -> list[list[int]] | None:
        """For an elastic run's data position: what every world of this epoch consumed (None otherwise)."""
        bs = getattr(self._train_dataloader, "batch_sampler", None)
        if not hasattr(bs, "resume_from"):
            return None
        if self._epoch_done:
            return []
        return [list(x) for x in self._epoch_segments] + [[bs.world, self._batches_done_in_epoch, bs.batch_size]]

    def _resume_position(self, epoch: int) -> ResumePosition | None:
        pos = self._resume
        if pos is None or pos.epoch != epoch:
            return None
        self._resume = None
        return pos

    def _restore_rng(self, pos: ResumePosition) -> None:
        if pos.rng is not None:
            set_rng_states(pos.rng)

    def _on_checkpoint_saved(self, path: str) -> None:
        """Record a checkpoint write in the run's events."""
        self.saved_checkpoints.append((self.global_step, path))
        if self._events is not None:
            self._events.emit("checkpoint", world_size=self.world_size, step=self.global_step,
                              epoch=self.current_epoch, path=path)

    def _stop_code(self, deadline: float | None) -> int:
        """Why this rank wants to stop mid-epoch: 0 no, 1 max_time, 2 resize, 3 preemption (higher wins)."""
        reason = control.stop_reason()
        if reason == "preempt":
            return 3
        if reason == "resize":
            return 2
        return 1 if deadline is not None and time.monotonic() >= deadline else 0

    def _adopt_stop_code(self, code: int) -> None:
        if code == 3:
            control.request_stop("preempt")
        elif code == 2:
            control.request_stop("resize")

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for k in ("lightning_module", "datamodule", "strategy", "optimizers", "_lightning_optimizers",
                  "lr_scheduler_configs", "_hot_hooks", "_train_dataloader", "_val_dataloaders", "_step_model",
                  "_to_device", "_module_backward", "_module_zero_grad", "_module_clip", "_results",
                  "_module_optimizer_step", "_module_lr_scheduler_step",
                  "_worker_group", "_snapshotter", "_events"):
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init_run_state()
        self.__dict__.update(state)

    def __init_run_state(self) -> None:
        self.lightning_module = None
        self.datamodule = None
        self.strategy = None
        self.optimizers, self._lightning_optimizers, self.lr_scheduler_configs = [], [], []
        self._hot_hooks, self._results, self._snapshotter, self._events = {}, {}, None, None
        self._train_dataloader, self._val_dataloaders, self._step_model, self._to_device = None, [], None, None


class StepDispatch(nn.Module):
    """Routes forward() to a named step, so DDP's forward bookkeeping wraps training_step."""

    def __init__(self, module: LightningModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, _fx: str = "training_step", **kwargs: Any) -> Any:
        out = getattr(self.module, _fx)(*args, **kwargs)
        owner = self.__dict__.get("_owner")
        if owner is not None and not self.module.automatic_optimization:
            # Manual optimization: DDP must not arm its reducer after forward; each manual_backward does.
            owner.require_backward_grad_sync = False
        return out


def _defines(obj: Any, name: str) -> bool:
    """Whether the user defined ``name`` (not just inherited an empty base hook)."""
    if obj is None:
        return False
    for klass in type(obj).__mro__:
        if klass.__module__.startswith("raytrainer."):
            return False
        if name in klass.__dict__:
            return True
    return name in getattr(obj, "__dict__", {})


def _check_limit(name: str, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or \
            (isinstance(value, float) and value > 1.0):
        raise ValueError(f"{name}={value!r}: use a float in [0.0, 1.0] (fraction) or an int >= 0 (batches).")
    return value


def _parse_max_time(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, dict):
        return timedelta(**value).total_seconds()
    if isinstance(value, str):
        parts = value.split(":")
        if len(parts) != 4 or not all(p.isdigit() for p in parts):
            raise ValueError(f"max_time={value!r}: use 'DD:HH:MM:SS', a timedelta or a dict like {{'hours': 1}}.")
        d, h, m, s = map(int, parts)
        return timedelta(days=d, hours=h, minutes=m, seconds=s).total_seconds()
    raise ValueError(f"max_time={value!r}: use 'DD:HH:MM:SS', a timedelta or a dict like {{'hours': 1}}.")


def _print_eval(stage: str, out: list[dict[str, float]]) -> None:
    rows = [(k, v) for d in out for k, v in d.items()]
    if not rows:
        return
    w = max(len(k) for k, _ in rows) + 2
    title = "Validate metric" if stage == "validate" else "Test metric"
    print(f"{title:<{w}}  DataLoader 0")
    for k, v in rows:
        print(f"{k:<{w}}  {v:.6g}")
