"""RankSession: the one owner of a rank's run state.

Module, strategy, precision, optimizers and schedulers, hook dispatch, logged results and loop
state live here, with the run's config. The loops read and change only this object, through its
public names; the Trainer's Lightning properties (``global_step``, ``callback_metrics``, ...) read it.
Every launcher runs one call (fit, validate, test, predict) with ``RankSession.run``.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import time
import uuid
import warnings
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from raytrainer.checkpoint import bridge
from raytrainer.checkpoint.resolve import checkpoint_source, resolve_ckpt_path
from raytrainer.core import control, loops, step
from raytrainer.core.config import RunConfig
from raytrainer.core.events import EventLog, command_fields
from raytrainer.core.hooks import Hooks, batch_transfer, callback_order, defines
from raytrainer.core.optimization import LRSchedulerConfig, parse_optimizers
from raytrainer.core.precision import Precision, make_precision, precision_plugin
from raytrainer.core.results import Results, to_float
from raytrainer.core.state import LoopState, ResumePosition
from raytrainer.core.step import LightningOptimizer
from raytrainer.data.ray_data import RayDataLoader, is_ray_dataset
from raytrainer.data.samplers import data_source, distributed_loader, elastic_loader, sequential_loader
from raytrainer.io import storage
from raytrainer.module import hparams_origin, logs_hyperparameters, prepares_data_here
from raytrainer.plan import as_sequence
from raytrainer.profilers import PassThroughProfiler, Profiler, profiled
from raytrainer.utilities import log, set_rng_states
from raytrainer.utilities.combined_loader import CombinedLoader, sized_len, tree_flatten
from raytrainer.utilities.exceptions import MisconfigurationException
from raytrainer.utilities.states import FN_STAGE, RunningStage, TrainerFn, TrainerState, TrainerStatus

if TYPE_CHECKING:
    from raytrainer.datamodule import LightningDataModule
    from raytrainer.module import LightningModule


class StepDispatch(nn.Module):
    """Routes forward() to a named step, so DDP's forward bookkeeping wraps training_step."""

    def __init__(self, module: LightningModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, _fx: str = "training_step", **kwargs: Any) -> Any:
        out = getattr(self.module, _fx)(*args, **kwargs)
        owner = self.__dict__.get("owner")
        if owner is not None and not self.module.automatic_optimization:
            # Manual optimization: DDP must not arm its reducer after forward; each manual_backward does.
            owner.require_backward_grad_sync = False
        return out


class BarebonesResults(Results):
    """Trainer(barebones=True): ``self.log`` warns and drops the value, as in Lightning, so no step does logging
    work (nothing accumulates, nothing reaches callback_metrics or a logger)."""

    def log(self, fx: str, name: str, *args: Any, **kwargs: Any) -> None:
        warnings.warn(f"self.log({name!r}) was called, but Trainer(barebones=True) turns logging off (it costs "
                      "speed): the value is dropped. Drop barebones=True to log.", UserWarning, stacklevel=3)


class RankSession:
    """One rank's run: ``trainer`` is the Lightning-facing facade that hooks and callbacks receive."""

    def __init__(self, trainer: Any, config: RunConfig) -> None:
        self.trainer = trainer
        self.config = config
        self.state = LoopState()
        self.module: LightningModule | None = None
        self.datamodule: LightningDataModule | None = None
        self.strategy: Any = None
        self.precision: Precision = make_precision("32-true", "cpu")
        self.optimizers: list[torch.optim.Optimizer] = []
        self.lightning_optimizers: list[LightningOptimizer] = []
        self.lr_scheduler_configs: list[LRSchedulerConfig] = []
        self.closure_optimizer = False
        self.hooks: Hooks | None = None
        self.step_model: nn.Module | None = None     # what training_step runs through (the DDP wrapper)
        # (batch, dataloader_idx) -> batch through the batch transfer hooks; None: use the batch as it is
        self.to_device: Callable[[Any, int], Any] | None = None
        # what this call is doing
        self.trainer_state = TrainerState()    # trainer.state: status, entry point (fn) and stage
        self.profiler: Profiler | None = None   # the running call's profiler; None when profiling is off
        self.should_stop = False
        # logged values
        self.results: dict[str, Results] = {}
        self.active_results: Results | None = None   # where self.log writes now
        self.callback_metrics_store: dict[str, torch.Tensor] = {}
        self.logged_metrics_store: dict[str, Any] = {}
        self.progress_bar_metrics_store: dict[str, float] = {}
        self.eval_steps_seen: dict[tuple[str, int], int] = {}
        self.eval_batch_counts: list[int] = []
        # data
        self.train_dataloader: Any = None
        self.val_dataloaders: list[Any] = []
        self.num_training_batches: float | int | None = 0
        self.val_check_batches: int | None = None
        self.last_val_time = 0.0                       # time-based val_check_interval: when validation last ended
        self.dataloader_iterables: dict[str, Any] = {}  # per stage, the loaders as Lightning's Trainer shows them
        self.max_batches: dict[str, list[int | float]] = {}  # per evaluation stage, batches per loader
        self.data_sources: dict[str, Callable[[], Any] | None] = {}  # per stage, what (re)loads its loaders
        self.reloadable: dict[str, bool] = {}          # loaders from a hook (reload_dataloaders_every_n_epochs)
        self.last_reload: dict[str, int] = {}          # the epoch each stage's loaders were last (re)loaded for
        self.loaded_at: dict[str, int] = {}            # the epoch each stage's loaders were last loaded in
        # set by a launcher on ranks that run elsewhere than the driver
        self.snapshotter: Any = None       # takes in-memory snapshots at step boundaries (Ray)
        self.elastic = False               # data is re-sharded on resize (elastic Ray runs)
        self.events: Any = None            # EventLog (rank 0 in process) or a forwarder to the Ray driver
        self.events_forwarded = False      # the driver writes start/finish itself
        # ... except the first event of a start (or a restart from "last"), which only rank 0 knows the step of:
        # (event, cause) for rank 0 to report once it restored
        self.first_event: tuple[str, str | None] | None = None
        self.continue_logging = False      # a restart or resize on Ray: the loggers go on in the same version
        self.restarted = False             # (every rank) a restart or resize on Ray: what fit prints once, it did
        self.world: int | None = None      # the driver's view of the last run's world size
        self.run_name = uuid.uuid4().hex[:8]  # names this trainer's Ray actors across calls
        self.worker_group: Any = None      # the Ray launcher's group of the running (or last) call
        self.saved_checkpoints: list[tuple[int, str]] = []
        # the checkpoint file this call restored from, named in the run's start event so that `raytrainer status`
        # follows a run resumed into a new log version back to the one it came from
        self.resumed_from: str | None = None

    # ------------------------------------------------------------------ ranks
    @property
    def world_size(self) -> int:
        if self.strategy is not None:
            return self.strategy.world_size
        return self.world or self.config.plan.world_size

    @property
    def global_rank(self) -> int:
        return self.strategy.global_rank if self.strategy is not None else 0

    @property
    def local_rank(self) -> int:
        return self.strategy.ctx.local_rank if self.strategy is not None else 0

    @property
    def is_global_zero(self) -> bool:
        return self.global_rank == 0

    @property
    def callbacks(self) -> list[Any]:
        return self.trainer.callbacks

    # ------------------------------------------------------------------ trainer.state
    @property
    def fn(self) -> TrainerFn | None:
        """The running (or last) entry point; compares equal to "fit", "validate", "test", "predict"."""
        return self.trainer_state.fn

    @fn.setter
    def fn(self, fn: str | None) -> None:
        self.trainer_state.fn = TrainerFn.from_str(fn) if fn is not None else None

    def _stage_flag(self, stage: RunningStage) -> bool:
        return self.trainer_state.stage == stage

    def _set_stage(self, stage: RunningStage, on: bool) -> None:
        """Lightning's stage flags: setting one True enters that stage; False leaves it (only if it is current)."""
        if on:
            self.trainer_state.stage = stage
        elif self.trainer_state.stage == stage:
            self.trainer_state.stage = None

    training = property(lambda self: self._stage_flag(RunningStage.TRAINING),
                        lambda self, on: self._set_stage(RunningStage.TRAINING, on),
                        doc="Whether the fit loop trains (fit's stage outside sanity check and validation).")
    sanity_checking = property(lambda self: self._stage_flag(RunningStage.SANITY_CHECKING),
                               lambda self, on: self._set_stage(RunningStage.SANITY_CHECKING, on),
                               doc="Whether the sanity check (validation before fit) runs.")
    validating = property(lambda self: self._stage_flag(RunningStage.VALIDATING),
                          lambda self, on: self._set_stage(RunningStage.VALIDATING, on),
                          doc="Whether validation runs (in fit, or trainer.validate).")
    testing = property(lambda self: self._stage_flag(RunningStage.TESTING),
                       lambda self, on: self._set_stage(RunningStage.TESTING, on), doc="Whether trainer.test runs.")
    predicting = property(lambda self: self._stage_flag(RunningStage.PREDICTING),
                          lambda self, on: self._set_stage(RunningStage.PREDICTING, on),
                          doc="Whether trainer.predict runs.")

    @property
    def loggers(self) -> list[Any]:
        return self.trainer.loggers

    # ------------------------------------------------------------------ metrics as Lightning shows them
    @property
    def callback_metrics(self) -> dict[str, torch.Tensor]:
        """Every logged value: epoch results, and the latest step values of the running epoch."""
        out = dict(self.callback_metrics_store)
        train = self.results.get("train")
        if train is not None and train.step_values:
            for key, (meta, value) in train.step_metrics().items():
                out[key] = value if isinstance(value, torch.Tensor) else torch.tensor(float(value))
                out[meta.name] = out[key]  # during the epoch the plain name is the latest step value (Lightning)
        return out

    @property
    def logged_metrics(self) -> dict[str, Any]:
        """Every value sent to the loggers, plus the latest training step values (as Lightning)."""
        return {**self.logged_metrics_store, **self._latest_step_floats("logger")}

    @property
    def progress_bar_metrics(self) -> dict[str, float]:
        """Values logged with prog_bar=True, the running epoch's latest step values included."""
        return {**self.progress_bar_metrics_store, **self._latest_step_floats("prog_bar")}

    def _store_eval_prog_bar(self, key: str, value: float) -> None:
        """An evaluation value for the progress bar, after the running epoch's training keys: the bar lists
        metrics in the order they were first logged, as Lightning's (``loss`` before ``val_loss``)."""
        store = self.progress_bar_metrics_store
        if key not in store:
            for name, latest in self._latest_step_floats("prog_bar").items():
                store.setdefault(name, latest)
        store[key] = value

    def _latest_step_floats(self, flag: str) -> dict[str, float]:
        """The running training epoch's latest step values logged with ``flag`` (logger or prog_bar) set."""
        train = self.results.get("train")
        if train is None or not train.step_values:
            return {}
        return {key: to_float(value) for key, (meta, value) in train.step_metrics().items() if getattr(meta, flag)}

    # ------------------------------------------------------------------ one call
    def run(self, fn: str, model: LightningModule, strategy: Any, *, train: Any = None, val: Any = None,
            dataloaders: Any = None, datamodule: LightningDataModule | None = None,
            ckpt_path: str | dict[str, Any] | None = None, return_predictions: bool = True,
            weights_only: bool | None = None) -> Any:
        """Set up, run one entry point's loop on this process, tear down. Used by every launcher."""
        config = self.config
        self.fn = fn
        self.trainer_state.status = TrainerStatus.RUNNING
        self.trainer_state.stage = FN_STAGE[self.trainer_state.fn]
        self.strategy = strategy
        self.module = model
        self.datamodule = datamodule
        self.should_stop = False
        model.trainer = self.trainer
        if datamodule is not None:
            datamodule.trainer = self.trainer
        self.precision = self._make_precision()
        strategy.precision_plugin = self.precision
        results_type = BarebonesResults if config.barebones else Results
        self.results = {s: results_type(s) for s in ("train", "validate", "test")}
        # as Lightning: each fit/validate/test/predict starts with empty metrics
        self.callback_metrics_store, self.logged_metrics_store, self.progress_bar_metrics_store = {}, {}, {}
        self.eval_steps_seen = {}
        self._add_module_callbacks(model)
        self.profiler = self._setup_profiler(fn)
        self.hooks = Hooks(self.trainer, model, self.callbacks, self._set_fx, self.publish_train_epoch_metrics,
                           self.profiler)
        set_determinism(config.deterministic)
        if config.benchmark is not None and torch.backends.cudnn.is_available():
            torch.backends.cudnn.benchmark = bool(config.benchmark)
        strategy.setup_environment()
        try:
            node_rank = strategy.ctx.node_rank
            for owner in (datamodule, model):  # per node, or once in all (prepare_data_per_node=False)
                if owner is not None and prepares_data_here(owner, self.local_rank, node_rank):
                    owner.prepare_data()
            strategy.barrier("prepare_data")
            if datamodule is not None:
                datamodule.setup(fn)
            self.hooks.callbacks_only("setup", fn)
            model.setup(fn)
            self._configure_model(model)
            self._resolve_dataloaders(fn, model, datamodule, train, val, dataloaders)
            self.precision.convert_module(model)  # true precisions (16/bf16/64-true): parameters to their dtype
            if fn == "fit" or strategy.shards_parameters:
                self.step_model = strategy.setup_module(StepDispatch(model) if strategy.wraps_model else model)
            else:
                model.to(strategy.root_device)
                strategy.model = model
                self.step_model = model
            self.to_device = batch_transfer(model, datamodule, strategy)
            if self.precision.converts_input:  # as Lightning: floats to the precision's dtype before the transfer
                self.to_device = _converting(self.precision.convert_input, self.to_device)
            if fn == "fit":
                self._setup_optimizers(model)
            self.resumed_from = None
            if ckpt_path is not None:
                self.restore_from(ckpt_path, fn, weights_only)
                if self.continue_logging and fn == "fit":
                    self._continue_logging()
            self.hooks.collect()
            if self.profiler is not None:
                self._profile_steps(model)
            if config.barebones and self.is_global_zero:
                log.info("Trainer(barebones=True) started running; the progress bar is off, so print progress from "
                         "your module if you want to see it.")
            if fn == "fit":
                self._log_hparams(model, datamodule)
                out: Any = self._fit_with_preemption()
            elif fn in ("validate", "test"):
                self.results[fn].reset_epoch()
                out = loops.evaluation_loop(self, fn, self.val_dataloaders, limit=None)
            else:
                out = loops.predict_loop(self, self.val_dataloaders, return_predictions)
        except BaseException as exc:
            self.trainer_state.status = TrainerStatus.INTERRUPTED
            # the error that ended the call is what the user sees: what fails after it (a logger's last write to
            # the storage that failed) is logged and noted on it, never raised over it
            with storage.skip_unresponsive():
                _secondary(exc, "on_exception", self.hooks.on_exception, exc)
                if datamodule is not None:
                    _secondary(exc, "the datamodule's on_exception", datamodule.on_exception, exc)
                self._finish(model, datamodule, fn, "failed", failure=exc)
            self.trainer_state.stage = None
            raise
        self._finish(model, datamodule, fn, "success")
        self.trainer_state.stage = None
        if isinstance(out, control.Preempted):
            self.trainer_state.status = TrainerStatus.INTERRUPTED
            raise out
        self.trainer_state.status = TrainerStatus.FINISHED
        return out

    def _continue_logging(self) -> None:
        """After a restart restored its step (from a snapshot or, when none survived, from "last"), every logger
        drops or hides what it wrote past that step, so the run's curves never go back."""
        for lg in self.trainer.loggers:
            if hasattr(lg, "resume_from_step"):
                lg.resume_from_step(self.state.global_step)

    def _add_module_callbacks(self, model: LightningModule) -> None:
        """configure_callbacks(): the module's callbacks replace the Trainer's of the same type (a tuner's trial
        runs its own callback only)."""
        if self.config.tuning_trial:
            return
        extra = as_sequence(model.configure_callbacks())
        if not extra:
            return
        types = {type(c) for c in extra}
        self.trainer.callbacks = sorted([c for c in self.callbacks if type(c) not in types] + list(extra),
                                        key=callback_order)

    def _set_fx(self, name: str) -> None:
        if self.active_results is not None:
            self.active_results.fx = name

    def bind_results(self, results: Results | None) -> None:
        """Where ``self.log`` writes from now on (None: logging is not allowed)."""
        self.active_results = results

    def _fit_with_preemption(self) -> control.Preempted | None:
        """Run the fit loop with SIGTERM turned into a stop at the next step and a durable checkpoint."""
        state = self.state
        events = self.events
        if events is None and self.is_global_zero and not self.config.tuning_trial:
            events = self.events = EventLog(self.trainer.log_dir)
        if events is not None and (not self.events_forwarded or self.first_event is not None):
            # after any restore, so a resumed run's start names the step it resumes at
            kind, cause = self.first_event or ("start", None)
            extra = {**command_fields(), "resumed_from": self.resumed_from} if kind == "start" else {"cause": cause}
            events.emit(kind, world_size=self.world_size, step=state.global_step, epoch=state.current_epoch,
                        **extra)
        if not self.events_forwarded:
            control.reset()  # a stop requested in an earlier fit of this process does not carry over
        previous = control.install_sigterm_handler()
        try:
            with torch.autograd.set_detect_anomaly(self.config.detect_anomaly):  # as Lightning: for the fit loop
                loops.fit_loop(self)
        except BaseException as exc:
            if events is not None and not self.events_forwarded:  # every exit of a fit records its end
                self._record_failed_finish(events, exc)
            raise
        finally:
            control.restore_sigterm_handler(previous)
        if control.stop_reason() != "preempt":
            if events is not None and not self.events_forwarded:
                events.emit("finish", world_size=self.world_size, step=state.global_step, epoch=state.current_epoch)
            return None
        path = self._preemption_checkpoint()
        if events is not None and not self.events_forwarded:  # on Ray the driver records it
            events.emit("preemption", world_size=self.world_size, step=state.global_step, epoch=state.current_epoch,
                        cause="SIGTERM", path=path)
        message = (f"preempted (SIGTERM) at step {state.global_step}, epoch {state.current_epoch}; checkpoint "
                   f"written to {path}. Rerun the same command with ckpt_path='last' to resume (exit code "
                   f"{control.PREEMPTED_EXIT_CODE}).")
        if self.is_global_zero:
            log.warning("%s", message)
        return control.Preempted(message, checkpoint=path)

    def _record_failed_finish(self, events: Any, exc: BaseException) -> None:
        """A "finish" event with the step and the cause of a fit that raised (best effort: the error that stopped
        the run, e.g. a full disk, may stop this write too, and must not be hidden by it)."""
        cause = "failed: interrupted (KeyboardInterrupt)" if isinstance(exc, KeyboardInterrupt) else \
            f"failed: {type(exc).__name__}: {exc}"
        try:
            with storage.skip_unresponsive():
                events.emit("finish", world_size=self.world_size, step=self.state.global_step,
                            epoch=self.state.current_epoch, cause=cause.splitlines()[0][:300] if cause else cause)
        except Exception as err:  # noqa: BLE001 - the original exception is re-raised by the caller
            log.warning("could not record the end of the run in the events log: %s", err)

    def _preemption_checkpoint(self) -> str:
        """The durable checkpoint of a preempted run: last.ckpt where ckpt_path="last" will find it."""
        cb = self.trainer.checkpoint_callback
        if cb is not None:
            cb.wait_for_writes()
            if cb.last_model_path and cb.saved_at_step == self.state.global_step:
                return cb.last_model_path
            directory = cb.dirpath
        else:
            directory = storage.join(self.trainer.log_dir, "checkpoints")
        path = storage.join(directory, "last.ckpt")
        if self.is_global_zero:
            storage.makedirs(directory)
        self.save_checkpoint(path)
        if cb is not None:
            cb.last_model_path = path
        return path

    def _finish(self, model: LightningModule, datamodule: Any, stage: str, status: str,
                failure: BaseException | None = None) -> None:
        """Wait for checkpoint writes, finalize the loggers, run the teardown hooks. Every step runs even when one
        before it failed; the first error is raised (unless ``failure``, the error that ended the call, is already
        on its way) and each later one is logged and noted on it."""
        steps: list[tuple[str, Callable[[], Any]]] = []
        for cb in self.callbacks:
            wait = getattr(cb, "wait_for_writes", None)
            if wait is not None:
                steps.append((f"waiting for {type(cb).__name__}'s checkpoint writes", wait))
        if self.is_global_zero:
            for lg in self.loggers:
                steps.append((f"{type(lg).__name__}.finalize", functools.partial(lg.finalize, status)))
        steps.append(("the callbacks' teardown", functools.partial(self.hooks.callbacks_only, "teardown", stage)))
        steps.append(("the module's teardown", functools.partial(model.teardown, stage)))
        if datamodule is not None:
            steps.append(("the datamodule's teardown", functools.partial(datamodule.teardown, stage)))
        if self.profiler is not None:  # as Lightning: the report of a call that ended normally
            report = self.profiler.describe if status == "success" else functools.partial(self.profiler.teardown,
                                                                                          stage)
            steps.append(("the profiler's report", report))
        steps.append(("unbinding the results", functools.partial(self.bind_results, None)))
        if self.strategy is not None:
            steps.append(("the strategy's teardown", self.strategy.teardown))
        first = failure
        for what, step_fn in steps:
            if first is None:
                try:
                    step_fn()
                except Exception as exc:  # the first error: raised once the rest is torn down
                    first = exc
                continue
            with storage.skip_unresponsive():  # storage that just failed is not waited for again
                _secondary(first, what, step_fn)
        if first is not None and first is not failure:
            raise first

    # ------------------------------------------------------------------ profiling (only when a profiler is on)
    def _setup_profiler(self, fn: str) -> Profiler | None:
        """The call's profiler, set up with its stage, the rank (in several-rank runs) and the log dir; None when
        profiling is off, so nothing is wrapped and the loops run exactly as without one."""
        profiler = self.config.profiler
        if profiler is None or isinstance(profiler, PassThroughProfiler):
            return None
        rank = self.global_rank if self.world_size > 1 else None
        profiler.setup(stage=fn, local_rank=rank, log_dir=self.trainer.log_dir)
        return profiler

    def _profile_steps(self, model: LightningModule) -> None:
        """Wrap this run's batch transfer, backward and optimizer step under Lightning's action names (the
        precision object is made per run, so the wrappers end with it)."""
        profiler, precision = self.profiler, self.precision
        strategy_name = f"[Strategy]{type(self.strategy).__name__}"
        if self.to_device is not None:
            self.to_device = profiled(profiler, f"{strategy_name}.batch_to_device", self.to_device)
        precision.backward = profiled(profiler, f"{strategy_name}.backward", precision.backward)
        if not model.automatic_optimization:
            step_name = "optimizer_step"                          # Lightning's name under manual optimization
        elif self.hooks.module_overrides.get("optimizer_step") is not None:
            step_name = f"{strategy_name}.optimizer_step"        # inside the module's own (profiled) optimizer_step
        else:
            step_name = f"[LightningModule]{type(model).__name__}.optimizer_step"
        precision.optimizer_step = profiled(profiler, step_name, precision.optimizer_step)

    def _make_precision(self) -> Precision:
        """The run's precision plugin: the one given in ``plugins`` (or on the strategy object), else the one the
        ``precision`` argument names (the XLA strategy makes its own)."""
        device_type = self.strategy.root_device.type
        plugin = precision_plugin(self.config.plugins, None, self.strategy)
        if plugin is not None:
            return plugin.for_device(device_type)
        maker = getattr(self.strategy, "make_precision", None)
        plan_precision = self.config.plan.precision
        return maker(plan_precision) if maker is not None else make_precision(plan_precision, device_type)

    def _configure_model(self, model: LightningModule) -> None:
        """``configure_model()`` when the module overrides it, under the strategy's and precision's init contexts
        (tensors on the rank's device, in the true precision's dtype). Called in every run, as in Lightning: the
        hook must return early when its layers already exist."""
        if not defines(model, "configure_model"):
            return
        with self.strategy.tensor_init_context(), self.precision.module_init_context():
            model.configure_model()

    # ------------------------------------------------------------------ data
    def _resolve_dataloaders(self, fn: str, model: Any, dm: Any, train: Any, val: Any, loaders: Any) -> None:
        """This call's loaders, from the arguments or the data hooks: prepared (overfit, shards) and counted."""
        src = dm if dm is not None else model

        def from_hook(name: str) -> Callable[[], Any] | None:
            return getattr(src, name) if defines(src, name) else None

        self.last_reload, self.loaded_at = {}, {}
        if fn == "fit":
            self.data_sources = {"train": (lambda: train) if train is not None else from_hook("train_dataloader"),
                                 "validate": (lambda: val) if val is not None else from_hook("val_dataloader")}
            self.reloadable = {"train": train is None, "validate": val is None}
            self._load_train()
            if self.config.limit_val_batches == 0 or not defines(model, "validation_step"):
                self._set_eval_loaders("validate", None)
            else:
                self._load_eval("validate")
            return
        hook = {"validate": "val_dataloader", "test": "test_dataloader", "predict": "predict_dataloader"}[fn]
        self.data_sources = {fn: (lambda: loaders) if loaders is not None else from_hook(hook)}
        self._load_eval(fn)
        if not self.val_dataloaders:
            raise MisconfigurationException(f"Trainer.{fn} found no data: {hook}() returned nothing.")

    def _load_train(self) -> None:
        """(Re)load the training loader from its source; sets the batches per epoch and the validation schedule."""
        source = self.data_sources.get("train")
        train = source() if source is not None else None
        self.loaded_at["train"] = self.state.current_epoch
        if train is None or (isinstance(train, (list, tuple, dict)) and not train):
            raise MisconfigurationException("Trainer.fit found no training data: train_dataloader() returned None.")
        combined = train if isinstance(train, CombinedLoader) else None
        if combined is None and tree_flatten(train)[1][0] != "leaf":
            combined = CombinedLoader(train, "max_size_cycle")  # Lightning's default for a collection of loaders
        if combined is not None:
            if combined.mode == "sequential":
                raise MisconfigurationException(
                    'Training does not support the `CombinedLoader(mode="sequential")` mode. The '
                    "available modes are: ['min_size', 'max_size_cycle', 'max_size'].")
            if self.elastic:
                raise MisconfigurationException(
                    "elastic runs re-shard one training DataLoader; several training loaders (a "
                    "CombinedLoader, a dict or list) are not supported there. Concatenate the "
                    "datasets into one DataLoader, or run without elasticity.")
            combined.flattened = [self._prepare_loader(dl, "train") for dl in combined.flattened]
            self.train_dataloader = combined
            self.dataloader_iterables["train"] = combined.iterables
        else:
            self.train_dataloader = self.dataloader_iterables["train"] = self._prepare_loader(train, "train")
        self.num_training_batches = n = self.unit_batches(self.train_dataloader, "train")
        config = self.config
        if n == 0 and config.limit_train_batches != 0:
            self._check_empty_training_data(self.datamodule if self.datamodule is not None else self.module)
        vci = config.val_check_interval
        self.val_check_batches = None
        if config.val_check_time_s is not None:
            self.last_val_time = time.monotonic()  # time-based: batches do not count (Lightning resets the clock)
        elif isinstance(vci, int):
            if vci > n and config.check_val_every_n_epoch is not None and config.limit_val_batches != 0:
                raise ValueError(f"`val_check_interval` ({vci}) must be less than or equal to the number of the "
                                 f"training batches ({n}). If you want to disable validation set "
                                 "`limit_val_batches` to 0.0 instead. If you want to validate based on the total "
                                 "training batches, set `check_val_every_n_epoch=None`.")
            self.val_check_batches = vci
        elif vci is not None and vci != 1.0 and n:
            if math.isinf(n):
                raise MisconfigurationException(
                    f"val_check_interval={vci!r} is a fraction of an epoch, but the training dataloader has no "
                    "length (an IterableDataset): give an int number of batches, a duration such as "
                    "'00:00:10:00', or 1.0.")
            self.val_check_batches = max(1, int(n * vci))

    def _check_empty_training_data(self, source: Any) -> None:
        """This rank's training loader has no batch: an error when other ranks train (unless the module or
        datamodule sets allow_zero_length_dataloader_with_multiple_devices), else a warning."""
        where = "the training data has no batches (an empty dataset, or fewer samples than ranks with drop_last=True)"
        if self.world_size > 1 and not getattr(source, "allow_zero_length_dataloader_with_multiple_devices", False):
            raise RuntimeError(
                f"rank {self.global_rank}: {where}. Give every rank at least one batch (more samples, a smaller "
                "batch_size, drop_last=False), or set allow_zero_length_dataloader_with_multiple_devices = True on "
                "the module to train on with uneven ranks.")
        log.warning("rank %d: %s, so this rank trains 0 steps.", self.global_rank, where)

    def _load_eval(self, stage: str) -> None:
        """(Re)load the validation/test/predict loaders of ``stage`` from their source, prepared and counted."""
        source = self.data_sources.get(stage)
        self.loaded_at[stage] = self.state.current_epoch
        self._set_eval_loaders(stage, source() if source is not None else None)

    def _set_eval_loaders(self, stage: str, given: Any) -> None:
        """Evaluation loaders as Lightning walks them: one after another (``sequential``), or one unit when a
        CombinedLoader of another mode is given; ``val_dataloaders`` holds what the loop iterates."""
        self.dataloader_iterables[stage] = given
        if given is None:
            self.val_dataloaders, self.max_batches[stage] = [], []
            return
        overfit = self.fn == "fit" and self.config.overfit_batches > 0
        if isinstance(given, CombinedLoader) and given.mode != "sequential":
            if stage == "predict":
                raise MisconfigurationException(
                    '`trainer.predict()` only supports the `CombinedLoader(mode="sequential")` mode.')
            given.flattened = [self._prepare_loader(dl, stage, overfit) for dl in given.flattened]
            self.dataloader_iterables[stage] = given.iterables
            self.unit_batches(given, stage)
            self.val_dataloaders = [given]
            self.max_batches[stage] = list(given.limits or [])
            return
        combined = given if isinstance(given, CombinedLoader) else CombinedLoader(given, "sequential")
        combined.flattened = flat = [self._prepare_loader(dl, stage, overfit) for dl in combined.flattened]
        self.dataloader_iterables[stage] = combined.iterables  # the given structure, with the prepared loaders
        self.val_dataloaders = flat
        self.max_batches[stage] = [self.unit_batches(dl, stage) for dl in flat]

    def _prepare_loader(self, loader: Any, stage: str, overfit: bool | None = None) -> Any:
        """One loader of ``stage``: checked, made sequential for overfit_batches, and sharded across ranks."""
        if is_ray_dataset(loader):  # from a data hook on the ranks; trainer.fit(...) wraps the ones it is given
            loader = RayDataLoader(loader)
        if not isinstance(loader, Iterable):
            raise TypeError(f"expected a DataLoader (or any iterable of batches), got {type(loader).__name__}.")

        if overfit is None:
            overfit = stage == "train" and self.config.overfit_batches > 0
        if overfit:
            loader = sequential_loader(loader, "train" if stage == "train" else "val",
                                       warn=self.strategy is None or self.is_global_zero)
        source = data_source(loader)
        if source is not None:  # ParquetDataset / Ray Data: this rank's share, which it reads itself
            if self.strategy is not None:
                source.bind(self.strategy.ctx.global_rank, self.strategy.ctx.world_size)
            return loader
        if self.strategy is None or not self.config.use_distributed_sampler:
            return loader
        if self.elastic and stage == "train":  # even at world size 1: the epoch may continue another world's
            batch = None
            if self.config.elastic_batch_policy == "global" and getattr(loader, "batch_size", None):
                batch = max(1, loader.batch_size * self.config.plan.max_ranks // self.strategy.world_size)
            return elastic_loader(loader, self.strategy.ctx, batch_size=batch)
        if self.strategy.distributed:
            return distributed_loader(loader, self.strategy.ctx, ordered=stage == "predict")
        return loader

    def _reload_due(self, stage: str, epoch: int) -> bool:
        """reload_dataloaders_every_n_epochs: whether ``stage``'s loaders must come again from their hook now.

        As Lightning, whose loaders load when first used: the first use in a fit reloads only if they were
        loaded in another epoch (a resumed run); later, every N epochs."""
        if not self.config.reload_dataloaders_every_n_epochs or not self.reloadable.get(stage):
            return False
        last = self.last_reload.get(stage)
        due = (self.loaded_at.get(stage) != epoch) if last is None else \
            epoch - last >= self.config.reload_dataloaders_every_n_epochs
        if last is None or due:
            self.last_reload[stage] = epoch
        return due

    def reload_train_if_due(self, epoch: int) -> None:
        """A new training loader from its hook when reload_dataloaders_every_n_epochs says so."""
        if self._reload_due("train", epoch):
            self._load_train()

    def reload_val_if_due(self, epoch: int) -> None:
        """The same for the validation loaders, checked when validation runs."""
        if self._reload_due("validate", epoch):
            self._load_eval("validate")

    def unit_batches(self, loader: Any, stage: str) -> int | float:
        """Batches the loop takes from ``loader``: limit_*_batches applied to it, or to each loader inside a
        CombinedLoader (then counted in its mode), as Lightning does."""
        if not isinstance(loader, CombinedLoader):
            return self.limit(loader, stage)
        loader.limits = [self.limit(dl, stage) for dl in loader.flattened]
        n = sized_len(loader)
        return n if n is not None else float("inf")

    def limit(self, loader: Any, stage: str) -> int | float:
        """How many batches of ``loader`` the stage runs (limit_*_batches applied; inf for unsized loaders)."""
        limit = self.config.limit_for(stage)
        try:
            n: int | None = len(loader)
        except (TypeError, NotImplementedError):
            n = None
        if limit is None:
            return n if n is not None else float("inf")
        if isinstance(limit, float):
            if n is None:
                if limit == 1.0:
                    return float("inf")
                raise MisconfigurationException(
                    f"limit_{stage}_batches={limit} is a fraction but the {stage} dataloader has no length; give "
                    "an int number of batches instead.")
            count = int(n * limit) if limit < 1.0 else n
            if count == 0 and n > 0 and limit > 0:
                raise MisconfigurationException(
                    f"You requested to check {limit} of the {stage} dataloader but {limit} * {n} < 1. Please "
                    f"increase the `limit_{stage}_batches` argument. Try at least `limit_{stage}_batches="
                    f"{1.0 / n}`")
            return count
        return min(int(limit), n) if n is not None else int(limit)

    def should_validate_epoch(self, epoch: int) -> bool:
        if not self.val_dataloaders:
            return False
        every = self.config.check_val_every_n_epoch
        return every is None or (epoch + 1) % every == 0

    def data_fingerprint(self) -> str | None:
        """What identifies the training source's data and order (ParquetDataset), for the resume check."""
        source = data_source(self.train_dataloader)
        return source.fingerprint() if hasattr(source, "fingerprint") else None

    def elastic_segments(self) -> list[list[int]] | None:
        """For an elastic run's data position: what every world of this epoch consumed (None otherwise)."""
        source = data_source(self.train_dataloader)
        if hasattr(source, "segments_at"):  # ParquetDataset: always, so a resume in another world is exact too
            return [] if self.state.epoch_done else source.segments_at(self.state.batches_done_in_epoch)
        bs = getattr(self.train_dataloader, "batch_sampler", None)
        if not hasattr(bs, "resume_from"):
            return None
        if self.state.epoch_done:
            return []
        return [list(x) for x in self.state.epoch_segments] + \
            [[bs.world, self.state.batches_done_in_epoch, bs.batch_size]]

    # ------------------------------------------------------------------ optimizers
    def _setup_optimizers(self, model: LightningModule) -> None:
        opts, scheds = parse_optimizers(model.configure_optimizers())
        config = self.config
        if model.automatic_optimization:
            if not opts:
                raise MisconfigurationException(
                    "configure_optimizers returned no optimizer, which automatic optimization needs. "
                    "Return an optimizer, or set self.automatic_optimization = False.")
            if len(opts) > 1:
                raise ValueError(f"configure_optimizers returned {len(opts)} optimizers, but automatic optimization "
                                 "supports one. Use manual optimization for several: set "
                                 "`self.automatic_optimization = False` in __init__ and step them in training_step "
                                 "with self.optimizers() and self.manual_backward(loss).")
        else:
            if config.gradient_clip_val:
                raise MisconfigurationException(
                    "Trainer(gradient_clip_val=...) does not apply under manual optimization: call "
                    "self.clip_gradients(opt, gradient_clip_val=..., gradient_clip_algorithm=...) in "
                    "training_step before opt.step().")
            if config.accumulate_grad_batches != 1:
                raise MisconfigurationException(
                    "Trainer(accumulate_grad_batches>1) does not apply under manual optimization: "
                    "accumulate yourself, e.g. call opt.step() and opt.zero_grad() every N batches "
                    "in training_step.")
        self.optimizers = opts
        self.lr_scheduler_configs = scheds
        self.lightning_optimizers = [LightningOptimizer(o, self) for o in opts]
        self.closure_optimizer = bool(opts) and isinstance(opts[0], torch.optim.LBFGS)

    def manual_backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """LightningModule.manual_backward: hooks, loss scaling, DDP's reducer armed for this backward."""
        step.backward(self, loss, None, *args, **kwargs)

    def _step_callable(self, name: str) -> Callable[..., Any]:
        module = self.module
        wrapper = self.step_model
        if wrapper is not None and wrapper is not module and (
                name == "training_step" or self.strategy.routes_every_step):
            if module.automatic_optimization or name != "training_step":
                return functools.partial(wrapper, _fx=name)

            def manual_step(*args: Any) -> Any:
                try:
                    return wrapper(*args, _fx=name)
                finally:
                    wrapper.require_backward_grad_sync = True
            return manual_step
        return getattr(module, name)

    def step_callable(self, name: str) -> Callable[..., Any]:
        """The training/validation/test/predict step to call; under DDP, through the DDP wrapper's forward; recorded
        as ``[Strategy]<name>.<step>`` when a profiler is on."""
        fn = self._step_callable(name)
        if self.profiler is not None:
            fn = profiled(self.profiler, f"[Strategy]{type(self.strategy).__name__}.{name}", fn)
        return fn

    # ------------------------------------------------------------------ logging (called by the loops)
    def log_step_metrics(self) -> None:
        train = self.results["train"]
        metrics = {k: to_float(v) for k, (meta, v) in train.step_metrics(self._reduce_fn()).items() if meta.logger}
        if metrics:
            self.send_to_loggers(metrics, self.state.batches_that_stepped - 1, self.state.current_epoch)

    def _reduce_fn(self) -> Callable[[torch.Tensor, str, Any], torch.Tensor] | None:
        """How self.log(sync_dist=True) values are reduced: over the strategy's ranks; None on one process."""
        s = self.strategy
        return self._reduce_in_group if s is not None and s.distributed else None

    def _reduce_in_group(self, value: torch.Tensor, op: str, group: Any) -> torch.Tensor:
        """strategy.reduce over every rank, or over ``sync_dist_group`` when one was given."""
        if group is None:
            return self.strategy.reduce(value, op)
        return self.strategy.reduce(value, op, group=group)

    def send_to_loggers(self, metrics: dict[str, float], step: int, epoch: int | None = None) -> None:
        """Record in logged_metrics and write to the loggers; ``epoch`` is added for the loggers only."""
        self.logged_metrics_store.update(metrics)
        if self.is_global_zero and self.loggers:
            if epoch is not None:
                metrics = {**metrics}
                metrics.setdefault("epoch", epoch)
            for lg in self.loggers:
                lg.log_metrics(metrics, step)

    def log_eval_step_metrics(self, stage: str, dl_idx: int) -> None:
        """self.log(on_step=True) in validation/test steps: written per batch, as Lightning does."""
        results = self.results[stage]
        counter = (stage, dl_idx)
        step = self.eval_steps_seen.get(counter, 0)
        self.eval_steps_seen[counter] = step + 1
        if not results.step_values:
            return
        logged: dict[str, float] = {}
        for key, (meta, v) in results.step_metrics(self._reduce_fn()).items():
            f = to_float(v)
            if meta.prog_bar:
                self._store_eval_prog_bar(key, f)
            if meta.logger:
                logged[key] = f
        results.step_values.clear()
        if logged:
            self.send_to_loggers(logged, step)

    def publish_train_epoch_metrics(self) -> dict[str, tuple[Any, torch.Tensor]]:
        """Put this epoch's training results into callback/progress-bar metrics; returns the epoch values.

        Called before the on_train_epoch_end hooks (and again before the monitoring callbacks), so that they
        read this epoch's reductions, as in Lightning.
        """
        train = self.results["train"]
        reduce = self._reduce_fn()
        step_vals = train.step_metrics(reduce)
        epoch_vals = train.epoch_metrics(reduce, sync_all=False)
        for key, (meta, v) in list(step_vals.items()) + list(epoch_vals.items()):
            tensor = v if isinstance(v, torch.Tensor) else torch.tensor(float(v))
            self.callback_metrics_store[key] = tensor
            if not (meta.on_step and meta.on_epoch) or key.endswith("_epoch"):
                self.callback_metrics_store[meta.name] = tensor
            if meta.prog_bar:
                self.progress_bar_metrics_store[key] = to_float(tensor)
        if step_vals:
            # the last step values stay in logged_metrics, as Lightning keeps them
            self.logged_metrics_store.update({k: to_float(v) for k, (meta, v) in step_vals.items() if meta.logger})
            train.step_values.clear()
        return epoch_vals

    def finish_train_epoch_logging(self) -> None:
        epoch_vals = self.publish_train_epoch_metrics()
        logged = {key: to_float(v) for key, (meta, v) in epoch_vals.items() if meta.logger}
        if logged:
            self.send_to_loggers(logged, max(self.state.batches_that_stepped - 1, 0), self.state.current_epoch)
        self.results["train"].reset_metrics()  # logged torchmetrics start the next epoch empty, as in Lightning

    def publish_eval_epoch_metrics(self, stage: str) -> None:
        """Validation/test epoch reductions into callback/progress-bar metrics before on_*_epoch_end (Lightning)."""
        if self.sanity_checking:
            return
        for key, (meta, v) in self.results[stage].epoch_metrics(self._reduce_fn(), sync_all=True).items():
            self.callback_metrics_store[key] = v
            if key != meta.name:  # on_step and on_epoch: the plain name holds the epoch value too
                self.callback_metrics_store[meta.name] = v
            if meta.prog_bar:
                self._store_eval_prog_bar(key, to_float(v))

    def finish_eval_logging(self, stage: str, n_loaders: int) -> list[dict[str, float]]:
        results = self.results[stage]
        vals = results.epoch_metrics(self._reduce_fn(), sync_all=True)
        per_loader: list[dict[str, float]] = [{} for _ in range(max(n_loaders, 1))]
        logged: dict[str, float] = {}
        for key, (meta, v) in vals.items():
            if self.sanity_checking:
                continue
            self.callback_metrics_store[key] = v
            if key != meta.name:  # on_step and on_epoch: the plain name holds the epoch value too
                self.callback_metrics_store[meta.name] = v
            f = to_float(v)
            if meta.prog_bar:
                self._store_eval_prog_bar(key, f)
            if meta.logger:
                logged[key] = f
            idx = meta.dl_idx
            targets = [idx] if idx is not None and idx < len(per_loader) else range(len(per_loader))
            for i in targets:
                per_loader[i][key] = f
        if logged:
            stepped = self.state.batches_that_stepped
            self.send_to_loggers(logged, max(stepped - 1, 0) if self.fn == "fit" else stepped,
                                 self.state.current_epoch)
        results.reset_metrics()
        return per_loader

    def _log_hparams(self, model: LightningModule, datamodule: Any) -> None:
        if not self.is_global_zero or not self.config.enable_autolog_hparams:  # False: the user logs them, if at all
            return
        # As Lightning: only what save_hyperparameters(logger=True) recorded is logged (no empty hparams.yaml).
        log_module = logs_hyperparameters(model)
        log_dm = datamodule is not None and logs_hyperparameters(datamodule)
        if log_module or log_dm:
            params = dict(model.hparams_initial) if log_module else {}
            if log_dm:
                params.update(getattr(datamodule, "hparams", {}) or {})
            for lg in self.loggers:
                lg.log_hyperparams(params)
        for lg in self.loggers:  # as Lightning: TensorBoardLogger(log_graph=True) traces model.example_input_array
            if hasattr(lg, "log_graph"):
                lg.log_graph(model)

    # ------------------------------------------------------------------ checkpoints
    def hparams_origin(self) -> tuple[str | None, str | None]:
        """(hparams_name, hparams_type) of the module's save_hyperparameters call, for the checkpoint."""
        return hparams_origin(self.module)

    def save_checkpoint(self, filepath: str, weights_only: bool = False) -> None:
        """Write a Lightning-compatible checkpoint of the running (or just finished) fit."""
        if self.module is None:
            raise RuntimeError("save_checkpoint needs a model: call it after (or during) trainer.fit.")
        with self.profiler.profile("save_checkpoint") if self.profiler is not None else contextlib.nullcontext():
            if bridge.writes_sharded(self):  # FSDP: a directory every rank writes its shards into
                bridge.save_sharded(self, [filepath], weights_only)  # written when it returns
                return
            ckpt = bridge.capture(self, weights_only)
            if self.is_global_zero:
                storage.save(ckpt, filepath)
        if self.strategy is not None:
            self.strategy.barrier("save_checkpoint")

    def restore_from(self, ckpt_path: str | dict[str, Any], fn: str, weights_only: bool | None = None) -> None:
        """Restore from a path, "last"/"best", or an in-memory snapshot dict (handed over by the Ray driver);
        ``weights_only`` goes to torch.load."""
        if isinstance(ckpt_path, dict):
            try:
                bridge.restore(self, ckpt_path, full=fn == "fit")
            finally:
                release = getattr(ckpt_path, "release", None)  # a sharded snapshot drops the pieces it read
                if release is not None:
                    release()
            return
        path = resolve_ckpt_path(str(ckpt_path), self.trainer.checkpoint_callback, self.trainer)
        if path is None:
            return
        bridge.restore(self, path, full=fn == "fit", weights_only=weights_only)
        self.resumed_from = checkpoint_source(path)

    def restore_rng(self, pos: ResumePosition) -> None:
        if pos.rng is not None:
            set_rng_states(pos.rng)

    def on_checkpoint_saved(self, path: str, step: int | None = None, epoch: int | None = None) -> None:
        """Record a checkpoint that is complete on storage in the run's events; ``step``/``epoch``: what the file
        holds (default: now), as an asynchronous save lands a few steps after it was taken."""
        step = self.state.global_step if step is None else step
        epoch = self.state.current_epoch if epoch is None else epoch
        self.saved_checkpoints.append((step, path))
        if self.events is not None:
            self.events.emit("checkpoint", world_size=self.world_size, step=step, epoch=epoch, path=path)

    # ------------------------------------------------------------------ stopping
    def stop_code(self, deadline: float | None) -> int:
        """Why this rank wants to stop mid-epoch: 0 no, 1 max_time, 2 resize, 3 preemption (higher wins)."""
        reason = control.stop_reason()
        if reason == "preempt":
            return 3
        if reason == "resize":
            return 2
        return 1 if deadline is not None and time.monotonic() >= deadline else 0

    def adopt_stop_code(self, code: int) -> None:
        """A stop code agreed across ranks: every rank now records why (preemption, resize)."""
        if code == 3:
            control.request_stop("preempt")
        elif code == 2:
            control.request_stop("resize")


def _secondary(first: BaseException, what: str, fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn(*args)`` after ``first`` already ended the call: an error is logged and noted on ``first``, not
    raised (the user sees the first cause, e.g. the checkpoint write that storage refused, not the logger's last
    write to the same storage during teardown)."""
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - reported on the first error
        problem = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        log.warning("%s failed too, after %s: %s", what, type(first).__name__, problem)
        first.add_note(f"then {what} failed too: {problem}")


def _converting(convert: Callable[[Any], Any],
                to_device: Callable[[Any, int], Any] | None) -> Callable[[Any, int], Any]:
    """``to_device`` preceded by the precision's ``convert_input`` (true precisions cast floating-point batches)."""
    if to_device is None:
        return lambda batch, dataloader_idx: convert(batch)
    return lambda batch, dataloader_idx: to_device(convert(batch), dataloader_idx)


def set_determinism(deterministic: bool | str | None) -> None:
    """Lightning's ``deterministic``: True/"warn" turn on deterministic algorithms and, for cuBLAS, a fixed
    workspace (``CUBLAS_WORKSPACE_CONFIG=:4096:8`` unless the user set one); False turns them off; None leaves
    torch as it is."""
    if deterministic is None:
        return
    if not deterministic:
        torch.use_deterministic_algorithms(False)
        return
    torch.use_deterministic_algorithms(True, warn_only=deterministic == "warn")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts on this rank
