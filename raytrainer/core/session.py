"""RankSession: the one owner of a rank's run state.

Module, strategy, precision, optimizers and schedulers, hook dispatch, logged results and loop
state live here, with the run's config. The loops read and change only this object, through its
public names; the Trainer's Lightning properties (``global_step``, ``callback_metrics``, ...) read it.
Every launcher runs one call (fit, validate, test, predict) with ``RankSession.run``.
"""
from __future__ import annotations

import functools
import math
import time
import uuid
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from raytrainer.checkpoint import bridge
from raytrainer.checkpoint.resolve import resolve_ckpt_path
from raytrainer.core import control, loops, step
from raytrainer.core.config import RunConfig
from raytrainer.core.events import EventLog, command_fields
from raytrainer.core.hooks import Hooks, batch_transfer, callback_order, defines
from raytrainer.core.optimization import LRSchedulerConfig, parse_optimizers
from raytrainer.core.precision import Precision, make_precision
from raytrainer.core.results import Results, to_float
from raytrainer.core.state import LoopState, ResumePosition
from raytrainer.core.step import LightningOptimizer
from raytrainer.io import storage
from raytrainer.module import hparams_origin, logs_hyperparameters
from raytrainer.plan import as_sequence
from raytrainer.utilities import log, set_rng_states

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
        self.fn: str | None = None
        self.should_stop = False
        self.training = False
        self.sanity_checking = False
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
        # set by a launcher on ranks that run elsewhere than the driver
        self.snapshotter: Any = None       # takes in-memory snapshots at step boundaries (Ray)
        self.elastic = False               # data is re-sharded on resize (elastic Ray runs)
        self.events: Any = None            # EventLog (rank 0 in process) or a forwarder to the Ray driver
        self.events_forwarded = False      # the driver writes start/finish itself
        self.forward_start = False         # ... except the first start, which only rank 0 knows the step of
        self.world: int | None = None      # the driver's view of the last run's world size
        self.run_name = uuid.uuid4().hex[:8]  # names this trainer's Ray actors across calls
        self.worker_group: Any = None      # the Ray launcher's group of the running (or last) call
        self.saved_checkpoints: list[tuple[int, str]] = []

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

    def _latest_step_floats(self, flag: str) -> dict[str, float]:
        """The running training epoch's latest step values logged with ``flag`` (logger or prog_bar) set."""
        train = self.results.get("train")
        if train is None or not train.step_values:
            return {}
        return {key: to_float(value) for key, (meta, value) in train.step_metrics().items() if getattr(meta, flag)}

    # ------------------------------------------------------------------ one call
    def run(self, fn: str, model: LightningModule, strategy: Any, *, train: Any = None, val: Any = None,
            dataloaders: Any = None, datamodule: LightningDataModule | None = None,
            ckpt_path: str | dict[str, Any] | None = None, return_predictions: bool = True) -> Any:
        """Set up, run one entry point's loop on this process, tear down. Used by every launcher."""
        config = self.config
        self.fn = fn
        self.strategy = strategy
        self.module = model
        self.datamodule = datamodule
        self.should_stop = False
        model.trainer = self.trainer
        if datamodule is not None:
            datamodule.trainer = self.trainer
        self.precision = self._make_precision()
        self.results = {s: Results(s) for s in ("train", "validate", "test")}
        # as Lightning: each fit/validate/test/predict starts with empty metrics
        self.callback_metrics_store, self.logged_metrics_store, self.progress_bar_metrics_store = {}, {}, {}
        self.eval_steps_seen = {}
        self._add_module_callbacks(model)
        self.hooks = Hooks(self.trainer, model, self.callbacks, self._set_fx, self.publish_train_epoch_metrics)
        if config.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=config.deterministic == "warn")
        if config.benchmark is not None and torch.backends.cudnn.is_available():
            torch.backends.cudnn.benchmark = bool(config.benchmark)
        strategy.setup_environment()
        try:
            if self.local_rank == 0:
                if datamodule is not None:
                    datamodule.prepare_data()
                model.prepare_data()
            strategy.barrier("prepare_data")
            if datamodule is not None:
                datamodule.setup(fn)
            self.hooks.callbacks_only("setup", fn)
            model.setup(fn)
            self._resolve_dataloaders(fn, model, datamodule, train, val, dataloaders)
            if fn == "fit":
                self.step_model = strategy.setup_module(StepDispatch(model) if strategy.wraps_model else model)
            else:
                model.to(strategy.root_device)
                strategy.model = model
                self.step_model = model
            self.to_device = batch_transfer(model, datamodule, strategy)
            if fn == "fit":
                self._setup_optimizers(model)
            if ckpt_path is not None:
                self.restore_from(ckpt_path, fn)
            self.hooks.collect()
            if fn == "fit":
                self._log_hparams(model, datamodule)
                out: Any = self._fit_with_preemption()
            elif fn in ("validate", "test"):
                self.results[fn].reset_epoch()
                out = loops.evaluation_loop(self, fn, self.val_dataloaders, limit=None)
            else:
                out = loops.predict_loop(self, self.val_dataloaders, return_predictions)
        except BaseException as exc:
            self.hooks.on_exception(exc)
            self._finish(model, datamodule, fn, "failed")
            raise
        self._finish(model, datamodule, fn, "success")
        if isinstance(out, control.Preempted):
            raise out
        return out

    def _add_module_callbacks(self, model: LightningModule) -> None:
        """configure_callbacks(): the module's callbacks replace the Trainer's of the same type."""
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
        if events is None and self.is_global_zero:
            events = self.events = EventLog(self.trainer.log_dir)
        if events is not None and (not self.events_forwarded or self.forward_start):
            # after any restore, so a resumed run's start names the step it resumes at
            events.emit("start", world_size=self.world_size, step=state.global_step, epoch=state.current_epoch,
                        **command_fields())
        if not self.events_forwarded:
            control.reset()  # a stop requested in an earlier fit of this process does not carry over
        previous = control.install_sigterm_handler()
        try:
            loops.fit_loop(self)
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

    def _finish(self, model: LightningModule, datamodule: Any, stage: str, status: str) -> None:
        for cb in self.callbacks:
            wait = getattr(cb, "wait_for_writes", None)
            if wait is not None:
                wait()
        if self.is_global_zero:
            for lg in self.loggers:
                lg.finalize(status)
        self.hooks.callbacks_only("teardown", stage)
        model.teardown(stage)
        if datamodule is not None:
            datamodule.teardown(stage)
        self.bind_results(None)
        if self.strategy is not None:
            self.strategy.teardown()

    def _make_precision(self) -> Precision:
        device_type = self.strategy.root_device.type
        maker = getattr(self.strategy, "make_precision", None)
        plan_precision = self.config.plan.precision
        return maker(plan_precision) if maker is not None else make_precision(plan_precision, device_type)

    # ------------------------------------------------------------------ data
    def _resolve_dataloaders(self, fn: str, model: Any, dm: Any, train: Any, val: Any, loaders: Any) -> None:
        src = dm if dm is not None else model

        def from_hook(name: str) -> list[Any]:
            hook = getattr(src, name, None)
            if hook is None or not defines(src, name):
                return []
            return list(as_sequence(hook()))

        if fn == "fit":
            train = train if train is not None else (from_hook("train_dataloader") or [None])[0]
            if train is None:
                raise ValueError("Trainer.fit found no training data: train_dataloader() returned None.")
            if isinstance(train, (list, tuple, dict)):
                raise ValueError("Trainer.fit takes one training DataLoader (combining several is not supported); "
                                 "concatenate the datasets into one DataLoader.")
            self.train_dataloader = self._prepare_loader(train, shuffle_default=True)
            vals = list(as_sequence(val)) if val is not None else from_hook("val_dataloader")
            self.val_dataloaders = [] if self.config.limit_val_batches == 0 or \
                not defines(model, "validation_step") else \
                [self._prepare_loader(v, shuffle_default=False) for v in vals]
            self.num_training_batches = self.limit(self.train_dataloader, "train")
            n = self.num_training_batches
            vci = self.config.val_check_interval
            if vci is None or (isinstance(vci, float) and vci == 1.0) or not n:
                self.val_check_batches = None
            elif isinstance(vci, float):
                self.val_check_batches = max(1, int(n * vci)) if n is not None and not math.isinf(n) else None
            else:
                self.val_check_batches = int(vci)
        else:
            hook = {"validate": "val_dataloader", "test": "test_dataloader", "predict": "predict_dataloader"}[fn]
            items = list(as_sequence(loaders)) if loaders is not None else from_hook(hook)
            if not items:
                raise ValueError(f"Trainer.{fn} found no data: {hook}() returned nothing.")
            self.val_dataloaders = [self._prepare_loader(v, shuffle_default=False,
                                                         ordered=fn == "predict") for v in items]

    def _prepare_loader(self, loader: Any, shuffle_default: bool, ordered: bool = False) -> Any:
        if not isinstance(loader, Iterable):
            raise TypeError(f"expected a DataLoader (or any iterable of batches), got {type(loader).__name__}.")
        if self.strategy is None or not self.config.use_distributed_sampler:
            return loader
        from raytrainer.data.samplers import distributed_loader, elastic_loader

        if self.elastic and shuffle_default:  # even at world size 1: the epoch may continue another world's
            batch = None
            if self.config.elastic_batch_policy == "global" and getattr(loader, "batch_size", None):
                batch = max(1, loader.batch_size * self.config.plan.max_ranks // self.strategy.world_size)
            return elastic_loader(loader, self.strategy.ctx, batch_size=batch)
        if self.strategy.distributed:
            return distributed_loader(loader, self.strategy.ctx, ordered=ordered)
        return loader

    def limit(self, loader: Any, stage: str) -> int | float | None:
        """How many batches of ``loader`` the stage runs (limit_*_batches applied; inf for unsized loaders)."""
        limit = self.config.limit_for(stage)
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

    def should_validate_epoch(self, epoch: int) -> bool:
        if not self.val_dataloaders:
            return False
        every = self.config.check_val_every_n_epoch
        return every is None or (epoch + 1) % every == 0

    def elastic_segments(self) -> list[list[int]] | None:
        """For an elastic run's data position: what every world of this epoch consumed (None otherwise)."""
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
                raise ValueError("configure_optimizers returned no optimizer, which automatic optimization needs. "
                                 "Return an optimizer, or set self.automatic_optimization = False.")
            if len(opts) > 1:
                raise ValueError(f"configure_optimizers returned {len(opts)} optimizers, but automatic optimization "
                                 "supports one. Use manual optimization for several: set "
                                 "`self.automatic_optimization = False` in __init__ and step them in training_step "
                                 "with self.optimizers() and self.manual_backward(loss).")
        else:
            if config.gradient_clip_val:
                raise ValueError("Trainer(gradient_clip_val=...) does not apply under manual optimization: call "
                                 "self.clip_gradients(opt, gradient_clip_val=..., gradient_clip_algorithm=...) in "
                                 "training_step before opt.step().")
            if config.accumulate_grad_batches != 1:
                raise ValueError("Trainer(accumulate_grad_batches>1) does not apply under manual optimization: "
                                 "accumulate yourself, e.g. call opt.step() and opt.zero_grad() every N batches "
                                 "in training_step.")
        self.optimizers = opts
        self.lr_scheduler_configs = scheds
        self.lightning_optimizers = [LightningOptimizer(o, self) for o in opts]
        self.closure_optimizer = bool(opts) and isinstance(opts[0], torch.optim.LBFGS)

    def manual_backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """LightningModule.manual_backward: hooks, loss scaling, DDP's reducer armed for this backward."""
        step.backward(self, loss, None, *args, **kwargs)

    def step_callable(self, name: str) -> Callable[..., Any]:
        """The training/validation/test step to call; under DDP, through the DDP wrapper's forward."""
        module = self.module
        wrapper = self.step_model
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

    # ------------------------------------------------------------------ logging (called by the loops)
    def log_step_metrics(self) -> None:
        train = self.results["train"]
        metrics = {k: to_float(v) for k, (meta, v) in train.step_metrics(self._reduce_fn()).items() if meta.logger}
        if metrics:
            self.send_to_loggers(metrics, self.state.batches_that_stepped - 1, self.state.current_epoch)

    def _reduce_fn(self) -> Callable[[torch.Tensor, str], torch.Tensor] | None:
        s = self.strategy
        return s.reduce if s is not None and s.distributed else None

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
                self.progress_bar_metrics_store[key] = f
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
                self.progress_bar_metrics_store[key] = to_float(v)

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
                self.progress_bar_metrics_store[key] = f
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
        if not self.is_global_zero:
            return
        # As Lightning: only what save_hyperparameters(logger=True) recorded is logged (no empty hparams.yaml).
        log_module = logs_hyperparameters(model)
        log_dm = datamodule is not None and logs_hyperparameters(datamodule)
        if not (log_module or log_dm):
            return
        params = dict(model.hparams_initial) if log_module else {}
        if log_dm:
            params.update(getattr(datamodule, "hparams", {}) or {})
        for lg in self.loggers:
            lg.log_hyperparams(params)

    # ------------------------------------------------------------------ checkpoints
    def hparams_origin(self) -> tuple[str | None, str | None]:
        """(hparams_name, hparams_type) of the module's save_hyperparameters call, for the checkpoint."""
        return hparams_origin(self.module)

    def save_checkpoint(self, filepath: str, weights_only: bool = False) -> None:
        """Write a Lightning-compatible checkpoint of the running (or just finished) fit."""
        if self.module is None:
            raise RuntimeError("save_checkpoint needs a model: call it after (or during) trainer.fit.")
        ckpt = bridge.capture(self, weights_only)
        if self.is_global_zero:
            storage.save(ckpt, filepath)
        if self.strategy is not None:
            self.strategy.barrier("save_checkpoint")

    def restore_from(self, ckpt_path: str | dict[str, Any], fn: str) -> None:
        """Restore from a path, "last"/"best", or an in-memory snapshot dict (handed over by the Ray driver)."""
        if isinstance(ckpt_path, dict):
            bridge.restore(self, ckpt_path, full=fn == "fit")
            return
        path = resolve_ckpt_path(str(ckpt_path), self.trainer.checkpoint_callback, self.trainer)
        if path is None:
            return
        bridge.restore(self, path, full=fn == "fit")

    def restore_rng(self, pos: ResumePosition) -> None:
        if pos.rng is not None:
            set_rng_states(pos.rng)

    def on_checkpoint_saved(self, path: str) -> None:
        """Record a checkpoint write in the run's events."""
        self.saved_checkpoints.append((self.state.global_step, path))
        if self.events is not None:
            self.events.emit("checkpoint", world_size=self.world_size, step=self.state.global_step,
                             epoch=self.state.current_epoch, path=path)

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
