"""Trainer: Lightning's facade. It checks arguments into a RunConfig, hands each call to a launcher,
and shows the run's state, which a RankSession owns, through Lightning's properties."""
from __future__ import annotations

import contextlib
import inspect
import math
import os
import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch

from raytrainer.callbacks.callback import Callback
from raytrainer.callbacks.checkpoint import Checkpoint
from raytrainer.callbacks.early_stopping import EarlyStopping
from raytrainer.callbacks.model_checkpoint import ModelCheckpoint
from raytrainer.callbacks.model_summary import ModelSummary
from raytrainer.callbacks.progress import ProgressBar, TQDMProgressBar
from raytrainer.checkpoint.format import reached_limit
from raytrainer.checkpoint.resolve import resolve_ckpt_path
from raytrainer.core import control
from raytrainer.core.config import RunConfig
from raytrainer.core.hooks import callback_order, defines
from raytrainer.core.precision import make_precision, precision_plugin
from raytrainer.core.session import RankSession
from raytrainer.data.ray_data import wrap_ray_datasets
from raytrainer.datamodule import LightningDataModule
from raytrainer.launchers import make_launcher
from raytrainer.loggers.base import Logger
from raytrainer.loggers.csv import CSVLogger
from raytrainer.loggers.tensorboard import TensorBoardLogger, tensorboard_available
from raytrainer.module import LightningModule, from_compiled, is_compiled_module
from raytrainer.plan import Env, Plan, as_sequence
from raytrainer.profilers import PassThroughProfiler, Profiler
from raytrainer.strategies.base import SkipParameterInit
from raytrainer.strategies.registry import strategy_for
from raytrainer.trainer.states import TrainerState, TrainerStatus
from raytrainer.utilities import closest, log
from raytrainer.utilities.exceptions import MisconfigurationException
from raytrainer.utilities.states import FN_STAGE


def _forward(owner: Callable[[Trainer], Any], name: str, doc: str, settable: bool = True) -> property:
    """A Trainer attribute that is ``owner(trainer).name``: the RunConfig's (arguments), the RankSession's
    (run state) or its LoopState's (counters)."""

    def get(self: Trainer) -> Any:
        return getattr(owner(self), name)

    def set_(self: Trainer, value: Any) -> None:
        setattr(owner(self), name, value)

    return property(get, set_ if settable else None, doc=doc)


def _config_property(name: str, doc: str) -> property:
    """An argument: reads (and, as in Lightning, may overwrite) a RunConfig field."""
    return _forward(lambda t: t.config, name, doc)


def _session_property(name: str, doc: str, settable: bool = False) -> property:
    """Run state: the RankSession's attribute."""
    return _forward(lambda t: t.session, name, doc, settable)


def _state_property(name: str, doc: str) -> property:
    """A loop counter (current_epoch, global_step): the session's LoopState holds it."""
    return _forward(lambda t: t.session.state, name, doc)


class Trainer:
    """Lightning's Trainer API. One device runs in this process; more ranks run on Ray actors."""

    def __init__(
        self,
        *,
        accelerator: str | None = "auto",
        strategy: str | None = "auto",
        devices: Any = "auto",
        num_nodes: Any = 1,
        precision: Any = None,
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
        overfit_batches: int | float = 0.0,
        val_check_interval: int | float | str | timedelta | dict[str, int] | None = None,
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
        profiler: Any = None,
        detect_anomaly: bool = False,
        barebones: bool = False,
        plugins: Any = None,
        sync_batchnorm: bool = False,
        reload_dataloaders_every_n_epochs: int = 0,
        default_root_dir: str | None = None,
        enable_autolog_hparams: bool = True,
        model_registry: str | None = None,
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
        # a precision plugin (plugins=[HalfPrecision(...)] or on a strategy object) names the run's precision
        plugin = precision_plugin(list(as_sequence(plugins)), precision,
                                  strategy if strategy is not None and not isinstance(strategy, str) else None)
        self.plan = Plan.from_args(accelerator=accelerator, devices=devices, strategy=strategy,
                                   num_nodes=num_nodes, precision=precision if plugin is None else plugin.precision,
                                   num_processes=num_processes, gpus=gpus, tpu_cores=tpu_cores, env=self._env)
        self.plan.check_hardware(self._env)
        self.config, logger = RunConfig.from_args(
            self.plan, fast_dev_run=fast_dev_run, max_epochs=max_epochs, min_epochs=min_epochs,
            max_steps=max_steps, min_steps=min_steps, max_time=max_time, limit_train_batches=limit_train_batches,
            limit_val_batches=limit_val_batches, limit_test_batches=limit_test_batches,
            limit_predict_batches=limit_predict_batches, overfit_batches=overfit_batches,
            val_check_interval=val_check_interval,
            check_val_every_n_epoch=check_val_every_n_epoch, num_sanity_val_steps=num_sanity_val_steps,
            log_every_n_steps=log_every_n_steps, enable_checkpointing=enable_checkpointing,
            enable_progress_bar=enable_progress_bar, enable_model_summary=enable_model_summary,
            accumulate_grad_batches=accumulate_grad_batches, gradient_clip_val=gradient_clip_val,
            gradient_clip_algorithm=gradient_clip_algorithm, deterministic=deterministic, benchmark=benchmark,
            inference_mode=inference_mode, use_distributed_sampler=use_distributed_sampler,
            detect_anomaly=detect_anomaly, profiler=profiler, barebones=barebones, plugins=plugins,
            enable_autolog_hparams=enable_autolog_hparams, model_registry=model_registry,
            default_root_dir=str(default_root_dir) if default_root_dir is not None else os.getcwd(),
            sync_batchnorm=sync_batchnorm, reload_dataloaders_every_n_epochs=reload_dataloaders_every_n_epochs,
            max_failures=max_failures, placement_timeout_s=placement_timeout_s,
            collective_timeout_s=collective_timeout_s, snapshot_every_n_steps=snapshot_every_n_steps,
            heartbeat_timeout_s=heartbeat_timeout_s, elastic_batch_policy=elastic_batch_policy,
            scale_check_interval_s=scale_check_interval_s, ray_address=ray_address,
            spare_ranks_per_node=spare_ranks_per_node, logger=logger)
        _warn_if_ephemeral_root(self.config.default_root_dir, given=default_root_dir is not None)
        self.callbacks: list[Callback] = self._default_callbacks(as_sequence(callbacks))
        self.loggers: list[Logger] = self._make_loggers(logger)
        self.session = RankSession(self, self.config)
        if plugin is not None or self.plan.accelerator != "tpu":  # trainer.precision_plugin before a run (Lightning)
            self.session.precision = plugin if plugin is not None else \
                make_precision(self.plan.precision, "cuda" if self.plan.accelerator == "cuda" else "cpu")
        self.last_run: Any = None   # the FitController of the last Ray fit: its phases and failures

    @classmethod
    def for_rank(cls, config: RunConfig, callbacks: list[Callback], loggers: list[Logger],
                 counters: dict[str, int] | None = None) -> Trainer:
        """The Trainer a rank runs under: rebuilt from the driver's config, callbacks and loggers (never
        unpickled from the driver), with the loop counters of the driver's session."""
        trainer = cls.__new__(cls)
        trainer.plan, trainer.config = config.plan, config
        trainer.callbacks, trainer.loggers = list(callbacks), list(loggers)
        trainer.session = RankSession(trainer, config)
        trainer.last_run = None
        if counters:
            trainer.session.state.load_counters(counters)
        return trainer

    def __reduce__(self) -> Any:
        """A Trainer pickles as what it is built from (config, callbacks, loggers, counters), never its run.

        Callbacks and loggers travel as state, set after the Trainer exists, so a callback that holds its
        Trainer (a cycle) pickles too."""
        return (type(self).for_rank, (self.config, [], []),
                {"callbacks": self.callbacks, "loggers": self.loggers, "counters": self.session.state.counters()})

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.callbacks, self.loggers = list(state["callbacks"]), list(state["loggers"])
        self.session.state.load_counters(state["counters"])

    # ------------------------------------------------------------------ construction helpers
    def _default_callbacks(self, user: list[Callback]) -> list[Callback]:
        for cb in user:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be raytrainer.callbacks.Callback instances; got "
                                f"{type(cb).__name__}. Subclass raytrainer.Callback.")
        config = self.config
        cbs = list(user)
        if config.enable_progress_bar and not any(isinstance(c, ProgressBar) for c in cbs):
            cbs.append(TQDMProgressBar())
        if not config.enable_progress_bar:
            bar = next((c for c in cbs if isinstance(c, ProgressBar)), None)
            if bar is not None:  # as Lightning: a progress bar callback contradicts enable_progress_bar=False
                raise MisconfigurationException(
                    f"Trainer was configured with `enable_progress_bar=False`{_barebones(config)} but found "
                    f"`{type(bar).__name__}` in callbacks list. Remove one of them.")
        if config.enable_model_summary and not any(isinstance(c, ModelSummary) for c in cbs):
            cbs.append(ModelSummary())
        has_ckpt = any(isinstance(c, ModelCheckpoint) for c in cbs)
        if has_ckpt and not config.enable_checkpointing:
            raise MisconfigurationException(
                f"Trainer was configured with `enable_checkpointing=False`{_barebones(config)} but found "
                "`ModelCheckpoint` in callbacks list. Remove one of them.")
        if config.enable_checkpointing and not has_ckpt:
            cbs.append(ModelCheckpoint())
        # monitoring callbacks run after the others, as in Lightning
        return sorted(cbs, key=callback_order)

    def _make_loggers(self, logger: Any) -> list[Logger]:
        if logger is False:
            return []
        if logger is None or logger is True:  # Lightning's default: TensorBoard when it is installed, else CSV
            if tensorboard_available():
                return [TensorBoardLogger(self.config.default_root_dir)]
            return [CSVLogger(self.config.default_root_dir)]
        return list(as_sequence(logger))

    # ------------------------------------------------------------------ configuration (RunConfig)
    fast_dev_run = _config_property("fast_dev_run", "Batches per stage of a fast_dev_run (0: off).")
    max_epochs = _config_property("max_epochs", "Stop after this many epochs (-1: no limit).")
    min_epochs = _config_property("min_epochs", "Train at least this many epochs before an early stop.")
    max_steps = _config_property("max_steps", "Stop after this many optimizer steps (-1: no limit).")
    min_steps = _config_property("min_steps", "Train at least this many steps before an early stop.")
    limit_train_batches = _config_property("limit_train_batches", "Training batches per epoch (int or fraction).")
    limit_val_batches = _config_property("limit_val_batches", "Validation batches per run (int or fraction).")
    limit_test_batches = _config_property("limit_test_batches", "Test batches per run (int or fraction).")
    limit_predict_batches = _config_property("limit_predict_batches", "Predict batches per run (int or fraction).")
    val_check_interval = _config_property("val_check_interval", "Validate every N batches or fraction of an epoch.")
    check_val_every_n_epoch = _config_property("check_val_every_n_epoch", "Validate every N epochs.")
    num_sanity_val_steps = _config_property("num_sanity_val_steps", "Validation batches checked before fit.")
    log_every_n_steps = _config_property("log_every_n_steps", "Write step metrics every N optimizer steps.")
    accumulate_grad_batches = _config_property("accumulate_grad_batches", "Batches per optimizer step.")
    gradient_clip_val = _config_property("gradient_clip_val", "Clip gradients to this value (None: off).")
    gradient_clip_algorithm = _config_property("gradient_clip_algorithm", "'norm' or 'value'.")
    deterministic = _config_property("deterministic", "torch.use_deterministic_algorithms for the run.")
    benchmark = _config_property("benchmark", "cudnn.benchmark for the run.")
    inference_mode = _config_property("inference_mode", "Evaluate under torch.inference_mode (else no_grad).")
    use_distributed_sampler = _config_property("use_distributed_sampler", "Shard loaders across ranks.")
    default_root_dir = _config_property("default_root_dir", "Where logs and checkpoints go by default.")
    enable_progress_bar = _config_property("enable_progress_bar", "Show the progress bar.")
    enable_model_summary = _config_property("enable_model_summary", "Print the model summary at fit start.")
    enable_checkpointing = _config_property("enable_checkpointing", "Add a ModelCheckpoint by default.")
    sync_batchnorm = _config_property("sync_batchnorm", "Lightning's sync_batchnorm argument.")
    overfit_batches = _config_property("overfit_batches", "Train and validate on this many (or this fraction of) "
                                       "the first batches.")
    reload_dataloaders_every_n_epochs = _config_property("reload_dataloaders_every_n_epochs",
                                                         "Rebuild the loaders from their hooks every N epochs.")
    enable_autolog_hparams = _config_property("enable_autolog_hparams", "Log save_hyperparameters' values.")
    max_failures = _config_property("max_failures", "Ray runs: failures survived by restart or repair.")
    placement_timeout_s = _config_property("placement_timeout_s", "Ray runs: wait for resources this long.")
    collective_timeout_s = _config_property("collective_timeout_s", "Ray runs: timeout of one collective.")
    snapshot_every_n_steps = _config_property("snapshot_every_n_steps", "Ray runs: in-memory snapshot interval.")
    heartbeat_timeout_s = _config_property("heartbeat_timeout_s", "Ray runs: a rank silent this long is hung.")
    elastic_batch_policy = _config_property("elastic_batch_policy", "Elastic runs: 'rank' or 'global' batch.")
    scale_check_interval_s = _config_property("scale_check_interval_s", "Elastic runs: how often to look for growth.")
    ray_address = _config_property("ray_address", "Ray runs: the cluster to join (None: RAY_ADDRESS or local).")
    spare_ranks_per_node = _config_property("spare_ranks_per_node", "Ray runs: warm spare processes per node.")

    # ------------------------------------------------------------------ run state (RankSession)
    current_epoch = _state_property("current_epoch", "The epoch the loop is in (or stopped at).")
    global_step = _state_property("global_step", "Optimizer steps taken so far.")
    lightning_module = _session_property("module", "The module of the running (or last) call.", settable=True)
    datamodule = _session_property("datamodule", "The datamodule of the running (or last) call.")
    @property
    def strategy(self) -> Any:
        """The running call's strategy; outside a run on this process (the driver of a Ray run, or before fit) the
        plan's strategy object: the one passed as ``strategy=``, or the one its name stands for (as Lightning)."""
        running = self.session.strategy
        if running is not None:
            return running
        template = self.__dict__.get("_strategy_object")
        if template is None:
            template = self.__dict__["_strategy_object"] = strategy_for(self.plan)
        return template

    @contextlib.contextmanager
    def init_module(self, empty_init: bool | None = None) -> Iterator[None]:
        """Create a module's tensors right on the run's device and in the true precision's dtype (``bf16-true``:
        bfloat16). ``empty_init=True`` leaves parameters uninitialised (load a checkpoint into them next).

        A run on several Ray ranks creates the module on the driver, which sends it to the ranks: there tensors are
        created on the CPU (in the precision's dtype) and each rank moves its copy to its device."""
        if empty_init and self.strategy.shards_parameters:  # FSDP: on meta; each rank materialises its own shards
            with torch.device("meta"), self.precision_plugin.tensor_init_context():
                yield
            return
        device = self.strategy.root_device if self.plan.launcher == "in_process" else torch.device("cpu")
        with SkipParameterInit() if empty_init else contextlib.nullcontext(), device, \
                self.precision_plugin.tensor_init_context():
            yield
    optimizers = _session_property("optimizers", "The optimizers from configure_optimizers.", settable=True)
    lr_scheduler_configs = _session_property("lr_scheduler_configs", "Schedulers and when they step.")
    should_stop = _session_property("should_stop", "Set True to stop fit at the next check.", settable=True)
    training = _session_property("training", "Whether fit trains (its stage outside sanity check and validation).",
                                 settable=True)
    sanity_checking = _session_property("sanity_checking", "Whether the sanity check runs.", settable=True)
    validating = _session_property("validating", "Whether validation runs (inside fit, or trainer.validate).",
                                   settable=True)
    testing = _session_property("testing", "Whether trainer.test runs.", settable=True)
    predicting = _session_property("predicting", "Whether trainer.predict runs.", settable=True)
    state_fn = _session_property("fn", "The running (or last) entry point: fit, validate, test, predict.")
    callback_metrics = _session_property("callback_metrics", "Every logged value, as tensors.")
    logged_metrics = _session_property("logged_metrics", "Every value sent to the loggers.")
    progress_bar_metrics = _session_property("progress_bar_metrics", "Values logged with prog_bar=True.")
    num_training_batches = _session_property("num_training_batches", "Training batches per epoch.",
                                             settable=True)
    @property
    def train_dataloader(self) -> Any:
        """The training loader(s) of fit, as given (a dict or list of loaders stays one; sharded on Ray ranks)."""
        return self.session.dataloader_iterables.get("train")
    saved_checkpoints = _session_property("saved_checkpoints", "(step, path) of every checkpoint written.")
    world_size = _session_property("world_size", "Ranks in the run.")
    global_rank = _session_property("global_rank", "This process's rank.")
    local_rank = _session_property("local_rank", "This process's rank on its node.")
    is_global_zero = _session_property("is_global_zero", "Whether this is rank 0.")

    @property
    def precision_plugin(self) -> Any:
        """The precision of the running call (loss scaling, autocast), as Lightning's precision plugin."""
        return self.session.precision

    @precision_plugin.setter
    def precision_plugin(self, precision: Any) -> None:
        self.session.precision = precision

    @property
    def node_rank(self) -> int:
        s = self.session.strategy
        return s.ctx.node_rank if s is not None else 0

    @property
    def logger(self) -> Logger | None:
        return self.loggers[0] if self.loggers else None

    @property
    def log_dir(self) -> str:
        lg = self.logger
        return lg.log_dir if lg is not None and lg.log_dir is not None else self.config.default_root_dir

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
    def checkpoint_callback(self) -> ModelCheckpoint | None:
        """The first ModelCheckpoint (its API resolves "last"/"best"); other Checkpoint subclasses are in
        checkpoint_callbacks."""
        return next((c for c in self.callbacks if isinstance(c, ModelCheckpoint)), None)

    @property
    def checkpoint_callbacks(self) -> list[Checkpoint]:
        """Every Checkpoint callback (ModelCheckpoint, OnExceptionCheckpoint, user subclasses)."""
        return [c for c in self.callbacks if isinstance(c, Checkpoint)]

    @property
    def early_stopping_callback(self) -> Any:
        return next((c for c in self.callbacks if type(c).__name__ == "EarlyStopping"), None)

    @property
    def early_stopping_callbacks(self) -> list[Any]:
        """Every EarlyStopping callback of the Trainer."""
        return [c for c in self.callbacks if isinstance(c, EarlyStopping)]

    # ------------------------------------------------------------------ state (Lightning's trainer.state)
    @property
    def state(self) -> TrainerState:
        """The status, entry point (fn) and stage of the running (or last) call."""
        return self.session.trainer_state

    @property
    def evaluating(self) -> bool:
        """Whether validation, testing or the sanity check runs."""
        stage = self.session.trainer_state.stage
        return stage is not None and stage.evaluating

    @property
    def interrupted(self) -> bool:
        """Whether the last call ended with an exception (or KeyboardInterrupt)."""
        return self.session.trainer_state.status == TrainerStatus.INTERRUPTED

    @property
    def received_sigterm(self) -> bool:
        """Whether this process received SIGTERM during fit (it then stops at the next step with a checkpoint)."""
        return control.stop_reason() == "preempt"

    @property
    def is_last_batch(self) -> bool:
        """Whether fit's training loop is at the last batch of its epoch (False for loaders without a length)."""
        s = self.session
        n = s.num_training_batches
        return s.fn == "fit" and bool(n) and not math.isinf(n) and s.state.batch_idx + 1 >= n

    @property
    def model(self) -> torch.nn.Module | None:
        """The module as the strategy runs it during a call (DistributedDataParallel on DDP ranks); the
        LightningModule otherwise. ``lightning_module`` is always the plain module."""
        s = self.session
        if s.trainer_state.status == TrainerStatus.RUNNING and s.step_model is not None:
            return s.step_model
        return s.module

    @property
    def scaler(self) -> Any:
        """The GradScaler of 16-mixed precision (None otherwise)."""
        return getattr(self.session.precision, "scaler", None)

    @property
    def profiler(self) -> Profiler:
        """The profiler of the run: the one given, or a PassThroughProfiler that records nothing."""
        if self.config.profiler is not None:
            return self.config.profiler
        return self.__dict__.setdefault("_pass_through_profiler", PassThroughProfiler())

    @property
    def barebones(self) -> bool:
        """Whether Trainer(barebones=True) turned off everything that costs speed."""
        return self.config.barebones

    def print(self, *args: Any, **kwargs: Any) -> None:
        """print() on the first process of each node only (Lightning's rule: local rank 0)."""
        if self.local_rank == 0:
            print(*args, **kwargs)

    @property
    def progress_bar_callback(self) -> ProgressBar | None:
        return next((c for c in self.callbacks if isinstance(c, ProgressBar)), None)

    @property
    def estimated_stepping_batches(self) -> float:
        n = self.num_training_batches or 0
        per_epoch = math.ceil(n / self.accumulate_grad_batches) if n and not math.isinf(n) else float("inf")
        if self.max_steps != -1:
            return min(self.max_steps, per_epoch * max(self.max_epochs, 1)) if self.max_epochs not in (None, -1) \
                else self.max_steps
        return per_epoch * (self.max_epochs if self.max_epochs not in (None, -1) else 1)

    @property
    def val_check_batch(self) -> int | float | None:
        """Training batches between two validations of fit (None before fit resolves its data)."""
        session = self.session
        if session.val_check_batches is not None:
            return session.val_check_batches
        if self.config.val_check_time_s is not None:
            return float("inf")  # time-based: no batch count triggers validation
        return session.num_training_batches if session.train_dataloader is not None else None

    @property
    def enable_validation(self) -> bool:
        """Whether fit validates: the module defines validation_step, validation data exists and
        limit_val_batches is not 0."""
        module = self.lightning_module
        if module is None or not defines(module, "validation_step") or self.limit_val_batches == 0:
            return False
        source = self.datamodule if self.datamodule is not None else module
        return bool(self.session.val_dataloaders) or defines(source, "val_dataloader")

    @property
    def device_ids(self) -> list[int]:
        """The device index of each rank on a node (CPU ranks count from 0), as Lightning's."""
        plan = self.plan
        return list(plan.device_ids) if plan.device_ids else list(range(plan.ranks_per_node))

    @property
    def distributed_sampler_kwargs(self) -> dict[str, int] | None:
        """What a DistributedSampler needs on this rank (num_replicas, rank); None for one process."""
        if self.world_size <= 1:
            return None
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    @property
    def val_dataloaders(self) -> Any:
        """The validation loader(s) of fit or validate, as given (sharded on Ray ranks); None when there are none."""
        return self.session.dataloader_iterables.get("validate")

    @property
    def test_dataloaders(self) -> Any:
        """The test loader(s) of the last Trainer.test, as given (sharded on Ray ranks)."""
        return self.session.dataloader_iterables.get("test")

    @property
    def predict_dataloaders(self) -> Any:
        """The loader(s) of the last Trainer.predict, as given (sharded on Ray ranks)."""
        return self.session.dataloader_iterables.get("predict")

    @property
    def num_val_batches(self) -> list[int | float]:
        """Validation batches per loader (limit_val_batches applied), of fit or validate."""
        return list(self.session.max_batches.get("validate", []))

    @property
    def num_sanity_val_batches(self) -> list[int | float]:
        """Validation batches per loader that fit's sanity check runs."""
        steps = self.num_sanity_val_steps
        return [min(float("inf") if steps == -1 else steps, n) for n in self.num_val_batches]

    @property
    def num_test_batches(self) -> list[int | float]:
        """Test batches per loader (limit_test_batches applied)."""
        return list(self.session.max_batches.get("test", []))

    @property
    def num_predict_batches(self) -> list[int | float]:
        """Predict batches per loader (limit_predict_batches applied)."""
        return list(self.session.max_batches.get("predict", []))

    def save_checkpoint(self, filepath: str, weights_only: bool = False, storage_options: Any = None) -> None:
        """Write a Lightning-compatible checkpoint of the running (or just finished) fit."""
        self.session.save_checkpoint(filepath, weights_only)

    # ------------------------------------------------------------------ entry points
    def fit(self, model: LightningModule, train_dataloaders: Any = None, val_dataloaders: Any = None,
            datamodule: LightningDataModule | None = None, ckpt_path: str | os.PathLike[str] | None = None,
            weights_only: bool | None = None) -> None:
        """Train ``model`` (or ``torch.compile(model)``); with ckpt_path (a path, "last" or "best") resume from a
        checkpoint, read with torch.load(weights_only=...) (None: torch's default, True)."""
        model = self._unwrap_compiled("fit", model)
        if isinstance(train_dataloaders, LightningDataModule):
            datamodule, train_dataloaders = train_dataloaders, None
        # a ray.data.Dataset is read through a RayDataLoader: on Ray, each rank reads its own streaming split
        train_dataloaders, val_dataloaders = wrap_ray_datasets(train_dataloaders), wrap_ray_datasets(val_dataloaders)
        self._check_inputs("fit", model, datamodule, train_dataloaders, val_dataloaders)
        if train_dataloaders is None and datamodule is None and not defines(model, "train_dataloader"):
            raise MisconfigurationException("Trainer.fit got no training data: pass train_dataloaders=DataLoader(...), "
                                            "datamodule=..., or define train_dataloader() on the module.")
        self._launch("fit", model, dict(train=train_dataloaders, val=val_dataloaders, datamodule=datamodule,
                                        ckpt_path=self._resume_note(self._select_ckpt_path("fit", ckpt_path)),
                                        weights_only=weights_only))

    def validate(self, model: LightningModule | None = None, dataloaders: Any = None,
                 ckpt_path: str | os.PathLike[str] | None = None, verbose: bool = True,
                 datamodule: LightningDataModule | None = None,
                 weights_only: bool | None = None) -> list[dict[str, float]]:
        """Run validation_step over the data once; returns one metrics dict per dataloader."""
        return self._evaluate("validate", model, dataloaders, ckpt_path, verbose, datamodule, weights_only)

    def test(self, model: LightningModule | None = None, dataloaders: Any = None,
             ckpt_path: str | os.PathLike[str] | None = None, verbose: bool = True,
             datamodule: LightningDataModule | None = None,
             weights_only: bool | None = None) -> list[dict[str, float]]:
        """Run test_step over the data once; returns one metrics dict per dataloader."""
        return self._evaluate("test", model, dataloaders, ckpt_path, verbose, datamodule, weights_only)

    def predict(self, model: LightningModule | None = None, dataloaders: Any = None,
                datamodule: LightningDataModule | None = None, return_predictions: bool | None = None,
                ckpt_path: str | os.PathLike[str] | None = None,
                weights_only: bool | None = None) -> list[Any] | None:
        """Run predict_step (default: forward) under inference_mode; outputs in dataset order."""
        model = self._unwrap_compiled("predict", model) if model is not None else self.lightning_module
        if isinstance(dataloaders, LightningDataModule):
            datamodule, dataloaders = dataloaders, None
        dataloaders = wrap_ray_datasets(dataloaders)
        self._check_inputs("predict", model, datamodule, dataloaders, None)
        if dataloaders is None and datamodule is None and not defines(model, "predict_dataloader"):
            raise MisconfigurationException(
                "Trainer.predict got no data: pass dataloaders=..., datamodule=..., or define "
                "predict_dataloader() on the module.")
        return self._launch("predict", model, dict(dataloaders=dataloaders, datamodule=datamodule,
                                                   ckpt_path=self._select_ckpt_path("predict", ckpt_path),
                                                   weights_only=weights_only,
                                                   return_predictions=True if return_predictions is None
                                                   else return_predictions))

    def _evaluate(self, stage: str, model: Any, dataloaders: Any, ckpt_path: Any, verbose: bool,
                  datamodule: Any, weights_only: bool | None = None) -> list[dict[str, float]]:
        model = self._unwrap_compiled(stage, model) if model is not None else self.lightning_module
        if isinstance(dataloaders, LightningDataModule):
            datamodule, dataloaders = dataloaders, None
        dataloaders = wrap_ray_datasets(dataloaders)
        self._check_inputs(stage, model, datamodule, dataloaders, None)
        hook = "val_dataloader" if stage == "validate" else "test_dataloader"
        if dataloaders is None and datamodule is None and not defines(model, hook):
            raise MisconfigurationException(
                f"Trainer.{stage} got no data: pass dataloaders=..., datamodule=..., or define "
                f"{hook}() on the module.")
        out = self._launch(stage, model, dict(dataloaders=dataloaders, datamodule=datamodule,
                                              ckpt_path=self._select_ckpt_path(stage, ckpt_path),
                                              weights_only=weights_only))
        if verbose and out:
            _print_eval(stage, out)
        return out

    def _resume_note(self, path: Any) -> Any:
        """Say in one line, before any rank starts, when the checkpoint a fit resumes from has nothing left to
        train (a finished run resumed with ckpt_path="last"): which file, which limit, how to train more."""
        if isinstance(path, str) and os.path.isfile(path):
            try:  # mmap: only the small loop counters are read, not the weights
                ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except Exception:  # noqa: BLE001 -- a damaged file gets its own clear error when the run restores it
                return path
            from raytrainer.checkpoint.bridge import resume_position

            saved = ckpt.get("raytrainer")
            resume_position(ckpt, int(saved.get("world_size", 1)) if isinstance(saved, dict) else 1, path)
            reached = reached_limit(ckpt, self.config.max_epochs, self.config.max_steps)
            if reached is not None:
                limit, epochs, step = reached
                log.warning("fit: nothing left to train: %s holds %d finished epoch(s) and %d step(s), so %s is "
                            "already reached. Pass a larger %s to train more, or ckpt_path=None to start fresh.",
                            path, epochs, step, limit, limit.split("=")[0])
        return path

    def _unwrap_compiled(self, fn: str, model: Any) -> Any:
        """``torch.compile(module)`` -> the module itself, its forward and steps compiled (Lightning's
        from_compiled), so the Trainer trains, checkpoints and returns the module the user holds."""
        if not is_compiled_module(model):
            return model
        if self.plan.launcher == "xla":
            raise RuntimeError(f"Trainer.{fn} got a torch.compile'd module, which the XLA strategy cannot run (as in "
                               "Lightning, only the single-device and DDP strategies run compiled modules). Pass "
                               "the module itself.")
        return from_compiled(model)

    @property
    def ckpt_path(self) -> str | None:
        """The checkpoint the last fit/validate/test/predict loaded ("last"/"best" resolved to the file), else None.

        Setting it makes the next calls load that checkpoint, until it is set to None or a call passes ckpt_path.
        """
        return self.__dict__.get("_ckpt_path")

    @ckpt_path.setter
    def ckpt_path(self, path: str | os.PathLike[str] | None) -> None:
        self.__dict__["_ckpt_path"] = os.fspath(path) if path is not None else None
        self.__dict__["_ckpt_user_managed"] = bool(path)

    def _select_ckpt_path(self, fn: str, ckpt_path: str | os.PathLike[str] | dict[str, Any] | None) -> Any:
        """The checkpoint file this call loads: ``ckpt_path`` ("last"/"best"/a path) or the one set through
        ``trainer.ckpt_path``; resolved here, on the driver, and recorded as ``trainer.ckpt_path``. A snapshot
        dict (an in-memory checkpoint) passes through as it is."""
        user_set = self.__dict__.get("_ckpt_path") if self.__dict__.get("_ckpt_user_managed") else None
        if user_set is not None and ckpt_path is not None:
            warnings.warn(f"`trainer.ckpt_path = {user_set!r}` was set, but then `trainer.{fn}(ckpt_path="
                          f"{os.fspath(ckpt_path)!r})` was called: the latter is loaded.", stacklevel=3)
            self.__dict__["_ckpt_user_managed"] = False
            user_set = None
        chosen = ckpt_path if user_set is None else user_set
        if isinstance(chosen, dict):  # an in-memory snapshot (raytrainer's own resume path): no file to resolve
            self.__dict__["_ckpt_path"] = None
            return chosen  # type: ignore[return-value]
        if chosen is not None and not isinstance(chosen, (str, os.PathLike)):
            raise TypeError(f"Trainer.{fn}(ckpt_path=...) takes a path, \"last\" or \"best\"; got "
                            f"{type(chosen).__name__}.")
        path = resolve_ckpt_path(os.fspath(chosen), self.checkpoint_callback, self) if chosen is not None else None
        if user_set is None:
            self.__dict__["_ckpt_path"] = path
        return path

    def _check_inputs(self, fn: str, model: Any, datamodule: Any, loaders: Any, val: Any) -> None:
        if model is None:
            raise MisconfigurationException(
                f"Trainer.{fn} needs a model: pass a LightningModule (no model was fitted before).")
        if not isinstance(model, LightningModule):
            raise TypeError(f"Trainer.{fn} expects a raytrainer.LightningModule, got {type(model).__name__}. Subclass "
                            "raytrainer.LightningModule (import raytrainer as pl; pl.LightningModule); "
                            "torch.compile(module) of one is accepted too.")
        if datamodule is not None and not isinstance(datamodule, LightningDataModule):
            raise TypeError(f"datamodule must be a raytrainer.LightningDataModule, got {type(datamodule).__name__}.")
        if datamodule is not None and (loaders is not None or val is not None):
            raise MisconfigurationException(f"Trainer.{fn}: pass either dataloaders or a datamodule, not both.")

    def _launch(self, fn: str, model: LightningModule, kwargs: dict[str, Any]) -> Any:
        for cb in self.callbacks:  # a callback that cannot run under this plan (the tuner's) says so before any rank
            if hasattr(cb, "check_launch"):
                cb.check_launch(self, fn)
        self.session.fn = fn
        state = self.session.trainer_state  # the driver's, also when the ranks run on Ray
        state.status, state.stage = TrainerStatus.RUNNING, FN_STAGE[state.fn]
        try:
            out = make_launcher(self.plan).launch(self, fn, model, kwargs)
        except BaseException:
            state.status, state.stage = TrainerStatus.INTERRUPTED, None
            raise
        state.status, state.stage = TrainerStatus.FINISHED, None
        return out


def _barebones(config: RunConfig) -> str:
    """How an argument was turned off, for messages: by barebones=True or by the user."""
    return " (by barebones=True)" if config.barebones else ""


_EPHEMERAL_WARNED: set[str] = set()


def _warn_if_ephemeral_root(root: str, given: bool) -> None:
    """Warn once when logs and checkpoints would land in Ray's per-job working directory (a cluster job run
    without --default_root_dir): Ray deletes it with its session, and the checkpoints with it."""
    if "://" in root or f"{os.sep}runtime_resources{os.sep}" not in os.path.abspath(root) + os.sep:
        return
    if root in _EPHEMERAL_WARNED:
        return
    _EPHEMERAL_WARNED.add(root)
    how = "default_root_dir points" if given else "without default_root_dir, logs and checkpoints go"
    log.warning("%s into Ray's working directory for this job (%s), which Ray deletes with its session: the "
                "checkpoints would be lost. Pass a lasting place, e.g. `-- --default_root_dir s3://bucket/runs` "
                "(or a path every node shares) after `raytrainer fit ... --address ...`, or "
                "Trainer(default_root_dir=...).", how, root)


def _print_eval(stage: str, out: list[dict[str, float]]) -> None:
    rows = [(k, v) for d in out for k, v in d.items()]
    if not rows:
        return
    w = max(len(k) for k, _ in rows) + 2
    title = "Validate metric" if stage == "validate" else "Test metric"
    print(f"{title:<{w}}  DataLoader 0")
    for k, v in rows:
        print(f"{k:<{w}}  {v:.6g}")
