"""LightningModule: the user's model, its steps, hooks and the API the Trainer gives it."""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import inspect
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from raytrainer.utilities import AttributeDict, apply_to_tensors, check_plain_hparams, move_to_device
from raytrainer.utilities.exceptions import MisconfigurationException, MisconfigurationRuntimeError

if TYPE_CHECKING:
    from raytrainer.core.step import LightningOptimizer
    from raytrainer.trainer.trainer import Trainer

_TRAINER_ONLY = "is only available while a Trainer runs this module (attach it with trainer.fit/validate/...)"


class DataHooks:
    """The data hooks LightningModule and LightningDataModule share: dataloaders, prepare_data placement and the
    batch transfer hooks (a datamodule's override wins)."""

    # True: prepare_data runs on local rank 0 of every node; False: only on global rank 0 (a shared filesystem).
    prepare_data_per_node: bool = True
    # False: a rank whose training loader has no batch while others train stops fit with an error (its ranks would
    # step unevenly); True: it trains on, with a warning.
    allow_zero_length_dataloader_with_multiple_devices: bool = False

    def train_dataloader(self) -> Any:
        """The training data (a DataLoader or any iterable of batches); override to give fit its data."""
        raise MisconfigurationException("`train_dataloader` must be implemented to be used with the Trainer: "
                                        f"define it on {type(self).__name__}, or pass train_dataloaders to fit.")

    def val_dataloader(self) -> Any:
        """The validation data; override to validate during fit and in Trainer.validate."""
        raise MisconfigurationException("`val_dataloader` must be implemented to be used with the Trainer: "
                                        f"define it on {type(self).__name__}, or pass the dataloaders.")

    def test_dataloader(self) -> Any:
        """The test data; override to give Trainer.test its data."""
        raise MisconfigurationException("`test_dataloader` must be implemented to be used with the Trainer: "
                                        f"define it on {type(self).__name__}, or pass the dataloaders.")

    def predict_dataloader(self) -> Any:
        """The prediction data; override to give Trainer.predict its data."""
        raise MisconfigurationException("`predict_dataloader` must be implemented to be used with the Trainer: "
                                        f"define it on {type(self).__name__}, or pass the dataloaders.")

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Change a batch before it moves to the device (e.g. augment on CPU); returns the batch."""
        return batch

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Move a batch to ``device``; override for custom batch types (tensors in lists, tuples, dicts move)."""
        return move_to_device(batch, device)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Change a batch once it is on the device (e.g. augment on the GPU); returns the batch."""
        return batch


class restricted_classmethod(classmethod):  # noqa: N801 - used as a decorator, like classmethod
    """A classmethod that refuses to run on an instance (``model.load_from_checkpoint(p)`` would silently drop its
    result), as Lightning's ``load_from_checkpoint`` does."""

    def __get__(self, instance: Any, owner: type | None = None) -> Any:  # type: ignore[override]
        method = self.__func__
        cls = owner if owner is not None else type(instance)

        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Any:
            if instance is not None:
                raise TypeError(f"The classmethod `{cls.__name__}.{method.__name__}` cannot be called on an "
                                f"instance. Call it on the class and use the return value: "
                                f"obj = {cls.__name__}.{method.__name__}(...).")
            return method(cls, *args, **kwargs)

        return call


class HyperparametersMixin:
    """``save_hyperparameters``, ``hparams`` and ``hparams_initial``: shared by LightningModule and
    LightningDataModule. State lives in ``__dict__`` (no nn.Module attribute bookkeeping, no __init__ needed)."""

    def save_hyperparameters(self, *args: Any, ignore: Sequence[str] | str | None = None,
                             frame: Any = None, logger: bool = True) -> None:
        """Record __init__ arguments (or a dict / Namespace / named args) into ``self.hparams``."""
        if len(args) == 1 and not isinstance(args[0], str) and not args[0]:
            return  # an empty dict/Namespace: nothing to record (Lightning)
        ignore = [ignore] if isinstance(ignore, str) else [i for i in (ignore or []) if isinstance(i, str)]
        hparams_type = None
        init_args = _collect_init_args(frame or inspect.currentframe().f_back, type(self))
        if len(args) == 1 and isinstance(args[0], (dict, argparse.Namespace)):
            values = dict(vars(args[0]) if isinstance(args[0], argparse.Namespace) else args[0])
            # the __init__ argument holding this object, so load_from_checkpoint can pass it back whole
            name = next((k for k, v in init_args.items() if v is args[0]), None)
            if isinstance(args[0], argparse.Namespace):
                hparams_type = "Namespace"
        else:
            if args:
                missing = [a for a in args if a not in init_args]
                if missing:
                    raise ValueError(f"save_hyperparameters{args}: {missing} are not arguments of "
                                     f"{type(self).__name__}.__init__ ({sorted(init_args)}).")
                values = {a: init_args[a] for a in args}
            else:
                values = init_args
            name = "kwargs"
        values = {k: v for k, v in values.items() if k not in ignore}
        check_plain_hparams(values, type(self).__name__)
        d = self.__dict__
        hparams = d.setdefault("_hparams", AttributeDict())
        hparams.update(values)
        self.remove_ignored_hparams(ignore)  # a subclass may drop what its base class saved (Lightning)
        d["_hparams_initial"] = AttributeDict(copy.deepcopy(dict(hparams)))
        d["_hparams_name"] = name
        d["_log_hyperparams"] = bool(logger)
        d["_hparams_type"] = hparams_type

    def remove_ignored_hparams(self, ignore_list: Sequence[str]) -> None:
        """Drop these names from ``self.hparams`` (what save_hyperparameters(ignore=...) does after saving)."""
        hparams = self.__dict__.get("_hparams")
        if hparams is not None:
            for key in ignore_list:
                hparams.pop(key, None)

    @property
    def hparams(self) -> AttributeDict:
        """The saved hyper-parameters; mutable (``hparams_initial`` keeps what was first saved)."""
        return self.__dict__.setdefault("_hparams", AttributeDict())

    @property
    def hparams_initial(self) -> AttributeDict:
        """A copy of the hyper-parameters as save_hyperparameters recorded them (what loggers receive)."""
        return AttributeDict(copy.deepcopy(dict(self.__dict__.get("_hparams_initial") or {})))


class LightningModule(HyperparametersMixin, DataHooks, nn.Module):
    """A torch.nn.Module with Lightning's training API; run it with ``raytrainer.Trainer``."""

    # Properties TorchScript must skip when scripting the module (they touch the Trainer).
    __jit_unused_properties__: list[str] = [
        "trainer", "device", "current_epoch", "global_step", "hparams", "hparams_initial",
        "automatic_optimization", "example_input_array", "local_rank", "global_rank", "on_gpu",
        "dtype", "logger", "loggers", "strict_loading", "on_gpu",
    ]
    # Set by raytrainer.export while torch.jit.script/trace inspect the module: they read every
    # property, so `trainer` must not raise then.
    _jit_is_scripting = False  # no annotation: TorchScript would try to resolve the string "bool"

    # The checkpoint keys of save_hyperparameters' values, the argument name and its type (Lightning's).
    CHECKPOINT_HYPER_PARAMS_KEY = "hyper_parameters"
    CHECKPOINT_HYPER_PARAMS_NAME = "hparams_name"
    CHECKPOINT_HYPER_PARAMS_TYPE = "hparams_type"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        d = self.__dict__
        d["_trainer"] = None
        d["_automatic_optimization"] = True
        d["_example_input_array"] = None
        d["_hparams"] = AttributeDict()
        d["_hparams_initial"] = AttributeDict()
        d["_hparams_name"] = None
        d["_hparams_type"] = None
        d["_param_requires_grad_state"] = {}
        d["_warned_no_trainer"] = False
        d["_strict_loading"] = None    # None: not set by the user (strict); see strict_loading
        d["_compiler_ctx"] = None      # set by from_compiled: torch.compile's context and the original methods

    # ------------------------------------------------------------------ steps (user overrides)
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return super().forward(*args, **kwargs)

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("Trainer.fit needs `training_step(self, batch, batch_idx)` to be defined "
                                  f"on {type(self).__name__}.")

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        """Override to run validation."""

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        """Override to run testing."""

    def predict_step(self, batch: Any, batch_idx: int = 0, dataloader_idx: int = 0) -> Any:
        """Default prediction: ``self(batch)``."""
        return self(batch)

    def configure_optimizers(self) -> Any:
        raise NotImplementedError(f"Trainer.fit needs `configure_optimizers` to be defined on "
                                  f"{type(self).__name__}; return an optimizer, e.g. "
                                  "torch.optim.Adam(self.parameters(), lr=1e-3).")

    # ------------------------------------------------------------------ hooks (no-ops by default)
    def setup(self, stage: str) -> None: ...
    def teardown(self, stage: str) -> None: ...
    def prepare_data(self) -> None: ...
    def on_fit_start(self) -> None: ...
    def on_fit_end(self) -> None: ...
    def on_train_start(self) -> None: ...
    def on_train_end(self) -> None: ...
    def on_train_epoch_start(self) -> None: ...
    def on_train_epoch_end(self) -> None: ...
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Any: ...
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None: ...
    def on_validation_start(self) -> None: ...
    def on_validation_end(self) -> None: ...
    def on_validation_epoch_start(self) -> None: ...
    def on_validation_epoch_end(self) -> None: ...
    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_validation_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_validation_model_zero_grad(self) -> None:
        """Called in fit before validation (outside an accumulation window) to release the gradients' memory."""
        self.zero_grad(set_to_none=True)

    def on_validation_model_eval(self) -> None:
        self.eval()

    def on_validation_model_train(self) -> None:
        self.train()

    def on_test_start(self) -> None: ...
    def on_test_end(self) -> None: ...
    def on_test_epoch_start(self) -> None: ...
    def on_test_epoch_end(self) -> None: ...
    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_test_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_test_model_eval(self) -> None:
        self.eval()

    def on_test_model_train(self) -> None:
        self.train()

    def on_predict_start(self) -> None: ...
    def on_predict_end(self) -> None: ...
    def on_predict_epoch_start(self) -> None: ...
    def on_predict_epoch_end(self) -> None: ...
    def on_predict_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_predict_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_predict_model_eval(self) -> None:
        self.eval()

    def on_before_backward(self, loss: torch.Tensor) -> None: ...
    def on_after_backward(self) -> None: ...
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None: ...
    def on_before_zero_grad(self, optimizer: torch.optim.Optimizer) -> None: ...
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None: ...
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None: ...

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """Automatic optimization's step; override (e.g. for warm-up) and call optimizer.step(closure=...)."""
        optimizer.step(closure=optimizer_closure)

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        """Step one scheduler (metric is the monitored value for ReduceLROnPlateau, else None)."""
        if metric is None:
            scheduler.step()
        else:
            scheduler.step(metric)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        """Clear gradients before the backward of a new accumulation window."""
        optimizer.zero_grad()

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer,
                                    gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip with the Trainer's settings; override for custom clipping."""
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_callbacks(self) -> Sequence[Any] | Any:
        return []

    def configure_model(self) -> None:
        """Create layers here to have them made on the rank's device and in the true precision's dtype. Called at
        the start of every fit/validate/test/predict: return early when the layers already exist."""

    def freeze(self) -> LightningModule:
        """Freeze every parameter (requires_grad=False) and switch to eval mode, for inference."""
        for param in self.parameters():
            param.requires_grad = False
        return self.eval()

    def unfreeze(self) -> LightningModule:
        """Make every parameter trainable again (requires_grad=True) and switch to train mode."""
        for param in self.parameters():
            param.requires_grad = True
        return self.train()

    # ------------------------------------------------------------------ trainer-backed attributes
    @property
    def trainer(self) -> Trainer:
        t = self.__dict__["_trainer"]
        if t is None and not self._jit_is_scripting:
            raise RuntimeError(f"{type(self).__name__}.trainer {_TRAINER_ONLY}.")
        return t

    @trainer.setter
    def trainer(self, trainer: Trainer | None) -> None:
        self.__dict__["_trainer"] = trainer

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return torch.get_default_dtype()

    @property
    def on_gpu(self) -> bool:
        """Whether the module's parameters are on a CUDA device."""
        return self.device.type == "cuda"

    @property
    def current_epoch(self) -> int:
        t = self.__dict__["_trainer"]
        return t.current_epoch if t is not None else 0

    @property
    def global_step(self) -> int:
        t = self.__dict__["_trainer"]
        return t.global_step if t is not None else 0

    @property
    def global_rank(self) -> int:
        t = self.__dict__["_trainer"]
        return t.global_rank if t is not None else 0

    @property
    def local_rank(self) -> int:
        t = self.__dict__["_trainer"]
        return t.local_rank if t is not None else 0

    @property
    def logger(self) -> Any:
        t = self.__dict__["_trainer"]
        return t.logger if t is not None else None

    @property
    def loggers(self) -> list[Any]:
        t = self.__dict__["_trainer"]
        return t.loggers if t is not None else []

    @property
    def automatic_optimization(self) -> bool:
        return self.__dict__["_automatic_optimization"]

    @automatic_optimization.setter
    def automatic_optimization(self, value: bool) -> None:
        self.__dict__["_automatic_optimization"] = bool(value)

    @property
    def example_input_array(self) -> Any:
        return self.__dict__.get("_example_input_array")

    @example_input_array.setter
    def example_input_array(self, value: Any) -> None:
        self.__dict__["_example_input_array"] = value

    # ------------------------------------------------------------------ logging
    def log(self, name: str, value: Any, prog_bar: bool = False, logger: bool = True,
            on_step: bool | None = None, on_epoch: bool | None = None, reduce_fx: Any = "mean",
            enable_graph: bool = False, sync_dist: bool = False, sync_dist_group: Any = None,
            add_dataloader_idx: bool = True, batch_size: int | None = None,
            metric_attribute: str | None = None, rank_zero_only: bool = False) -> None:
        """Record a scalar for the progress bar, loggers and callbacks (see Lightning's self.log)."""
        trainer = self.__dict__["_trainer"]
        session = trainer.session if trainer is not None else None
        results = session.active_results if session is not None else None
        if results is None and session is not None and session.fn:
            raise MisconfigurationRuntimeError(
                f"self.log({name!r}) was called outside the training, validation and test loops "
                "(in predict, configure_optimizers, setup or after the run), where logging is not "
                "supported. Log from training/validation/test steps or their batch/epoch hooks.")
        if results is None:
            if not self.__dict__["_warned_no_trainer"]:
                self.__dict__["_warned_no_trainer"] = True
                warnings.warn(f"self.log({name!r}) was called with no Trainer running this module; "
                              "the value is dropped.", stacklevel=2)
            return
        results.log(results.fx, name, value, prog_bar, logger, on_step, on_epoch, reduce_fx, sync_dist,
                    batch_size, results.batch, add_dataloader_idx, sync_dist_group, metric_attribute,
                    rank_zero_only, self)

    def log_dict(self, dictionary: Mapping[str, Any], prog_bar: bool = False, logger: bool = True,
                 on_step: bool | None = None, on_epoch: bool | None = None, reduce_fx: Any = "mean",
                 enable_graph: bool = False, sync_dist: bool = False, sync_dist_group: Any = None,
                 add_dataloader_idx: bool = True, batch_size: int | None = None,
                 rank_zero_only: bool = False) -> None:
        """``self.log`` for every item of a mapping, or every Metric of a torchmetrics MetricCollection."""
        items: Any = dictionary.items()
        if isinstance(dictionary, nn.Module):
            from torchmetrics import MetricCollection

            if isinstance(dictionary, MetricCollection):  # its Metrics by their prefixed names, as Lightning
                items = dictionary.items(keep_base=False, copy_state=not dictionary._enable_compute_groups)
        for k, v in items:
            self.log(k, v, prog_bar=prog_bar, logger=logger, on_step=on_step, on_epoch=on_epoch,
                     reduce_fx=reduce_fx, enable_graph=enable_graph, sync_dist=sync_dist,
                     sync_dist_group=sync_dist_group, add_dataloader_idx=add_dataloader_idx,
                     batch_size=batch_size, rank_zero_only=rank_zero_only)

    def print(self, *args: Any, **kwargs: Any) -> None:
        """Print from global rank 0 only."""
        if self.global_rank == 0:
            print(*args, **kwargs)

    def all_gather(self, data: Any, group: Any = None, sync_grads: bool = False) -> Any:
        """Gather a tensor, number or collection of them from every rank: each tensor gains a leading world-size
        dimension (one process: returned as it is, as Lightning). Every rank must call it with the same shapes.

        ``sync_grads=True`` keeps the result in the autograd graph, so gradients flow back to each rank's input.
        """
        trainer = self.__dict__["_trainer"]
        if trainer is None:
            raise RuntimeError(f"{type(self).__name__}.all_gather {_TRAINER_ONLY}.")
        strategy = trainer.strategy
        device = self.device
        as_tensor = functools.partial(_to_tensor, device=device)
        if strategy is None:  # no run in this process (e.g. the driver after a Ray run): one process, as Lightning
            return apply_to_tensors(data, as_tensor, as_tensor)
        return apply_to_tensors(data, lambda t: strategy.all_gather(t.to(device), group=group, sync_grads=sync_grads),
                                as_tensor)

    # ------------------------------------------------------------------ optimization API
    def optimizers(self, use_pl_optimizer: bool = True) -> LightningOptimizer | list[Any] | Any:
        """The optimizers from configure_optimizers: one object when there is one, else a list."""
        t = self.trainer
        opts = t.session.lightning_optimizers if use_pl_optimizer else t.optimizers
        if not opts:
            raise RuntimeError("self.optimizers() found no optimizer: configure_optimizers returned None, or "
                               "has not run yet (it runs when trainer.fit starts; call self.optimizers() from "
                               "training_step or later hooks).")
        return opts[0] if len(opts) == 1 else list(opts)

    def lr_schedulers(self) -> Any:
        """The schedulers from configure_optimizers: None, one object, or a list."""
        configs = self.trainer.lr_scheduler_configs
        if not configs:
            return None
        scheds = [c.scheduler for c in configs]
        return scheds[0] if len(scheds) == 1 else scheds

    def manual_backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """Backward for manual optimization: hooks, loss scaling under mixed precision, DDP-aware."""
        t = self.trainer
        if self.automatic_optimization:
            raise RuntimeError("manual_backward is for manual optimization: set "
                               "`self.automatic_optimization = False` in __init__, or return the loss "
                               "from training_step and let the Trainer call backward.")
        t.session.manual_backward(loss, *args, **kwargs)

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """How the Trainer runs backward; override for custom backward calls."""
        self.trainer.precision_plugin.backward(loss, *args, **kwargs)

    def toggle_optimizer(self, optimizer: Any) -> None:
        """Freeze every parameter that belongs only to other optimizers (requires_grad=False)."""
        optimizer = getattr(optimizer, "optimizer", optimizer)
        own = {id(p) for g in optimizer.param_groups for p in g["params"]}
        state: dict[int, tuple[torch.Tensor, bool]] = {}
        for opt in self.trainer.optimizers:
            if opt is optimizer:
                continue
            for g in opt.param_groups:
                for p in g["params"]:
                    if id(p) not in own and id(p) not in state:
                        state[id(p)] = (p, p.requires_grad)
                        p.requires_grad = False
        self.__dict__["_param_requires_grad_state"] = state

    def untoggle_optimizer(self, optimizer: Any) -> None:
        """Restore the requires_grad flags changed by toggle_optimizer."""
        for p, flag in self.__dict__["_param_requires_grad_state"].values():
            p.requires_grad = flag
        self.__dict__["_param_requires_grad_state"] = {}

    @contextlib.contextmanager
    def toggled_optimizer(self, optimizer: Any) -> Iterator[None]:
        """``with self.toggled_optimizer(opt):`` toggles on entry and untoggles on exit."""
        self.toggle_optimizer(optimizer)
        try:
            yield
        finally:
            self.untoggle_optimizer(optimizer)

    def clip_gradients(self, optimizer: Any, gradient_clip_val: float | None = None,
                       gradient_clip_algorithm: str | None = None) -> None:
        """Clip the gradients of an optimizer's parameters by norm (default) or by value."""
        from raytrainer.utilities import clip_gradients

        t = self.__dict__["_trainer"]
        clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm,
                       t.precision_plugin if t is not None else None)

    # ------------------------------------------------------------------ checkpoints and export
    @property
    def strict_loading(self) -> bool:
        """Whether restoring a checkpoint needs its state_dict keys to match the module's exactly (default True);
        set False to load modules that keep some weights elsewhere (e.g. a frozen backbone left out)."""
        return self.__dict__.get("_strict_loading") in (None, True)

    @strict_loading.setter
    def strict_loading(self, value: bool) -> None:
        self.__dict__["_strict_loading"] = value

    @restricted_classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, map_location: Any = None, hparams_file: Any = None,
                             strict: bool | None = None, weights_only: bool | None = None,
                             **kwargs: Any) -> LightningModule:
        """Rebuild the module from a checkpoint's hyper_parameters (overridden by ``hparams_file`` and kwargs) and
        load its weights; ``strict=None`` follows the module's ``strict_loading``."""
        from raytrainer.checkpoint.resolve import load_module

        return load_module(cls, checkpoint_path, map_location=map_location, strict=strict,
                           weights_only=weights_only, overrides=kwargs, hparams_file=hparams_file)

    def to_torchscript(self, file_path: str | None = None, method: str = "script",
                       example_inputs: Any = None, **kwargs: Any) -> Any:
        """Export to TorchScript (script or trace) and save it when given a path."""
        from raytrainer import export

        return export.to_torchscript(self, file_path=file_path, method=method,
                                     example_inputs=example_inputs, **kwargs)

    def to_onnx(self, file_path: str, input_sample: Any = None, **kwargs: Any) -> Any:
        """Export to ONNX with a dynamic batch axis; kwargs go to torch.onnx.export."""
        from raytrainer import export

        return export.to_onnx(self, file_path, input_sample=input_sample, **kwargs)

    # ------------------------------------------------------------------ pickling (to Ray workers)
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_trainer"] = None
        ctx = state.get("_compiler_ctx")
        if ctx is not None:
            # torch.compile's wrapped methods do not pickle; its context does: the copy compiles them again
            for name in _COMPILED_METHODS:
                state.pop(name, None)
            state["_compiler_ctx"] = {"compiler": ctx["compiler"], "dynamo_ctx": ctx["dynamo_ctx"]}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        ctx = state.get("_compiler_ctx")
        if ctx is not None:
            _apply_compile(self, ctx["dynamo_ctx"])


def _collect_init_args(frame: Any, cls: type) -> dict[str, Any]:
    """Walk up from save_hyperparameters' caller to the outermost __init__ of this object's class."""
    collected: dict[str, Any] = {}
    obj = frame.f_locals.get("self")
    while frame is not None:
        code = frame.f_code
        if code.co_name != "__init__" or frame.f_locals.get("self") is not obj:
            break
        local = frame.f_locals
        nargs = code.co_argcount + code.co_kwonlyargcount
        names = code.co_varnames[:nargs]
        args = {n: local[n] for n in names if n != "self" and n in local}
        flags = code.co_flags
        idx = nargs
        if flags & inspect.CO_VARARGS:
            idx += 1
        if flags & inspect.CO_VARKEYWORDS:
            args.update(local.get(code.co_varnames[idx], {}))
        for k, v in args.items():
            collected.setdefault(k, v)  # the subclass (earlier frame) wins
        frame = frame.f_back
    for k in [k for k in collected if k in ("__class__",)]:
        del collected[k]
    return collected


def hparams_origin(module: Any) -> tuple[str | None, str | None]:
    """(hparams_name, hparams_type) that save_hyperparameters recorded: how load_from_checkpoint passes them
    back (one named dict/Namespace argument, or keyword arguments)."""
    state = getattr(module, "__dict__", {})
    return state.get("_hparams_name"), state.get("_hparams_type")


def logs_hyperparameters(obj: Any) -> bool:
    """Whether save_hyperparameters(logger=True) ran on ``obj`` (a LightningModule or LightningDataModule)."""
    return bool(getattr(obj, "__dict__", {}).get("_log_hyperparams", False))


def _to_tensor(value: Any, device: torch.device) -> Any:
    """A number or array as a tensor on ``device`` (Lightning's dtypes: bool->uint8, int->int32, float->float32);
    tensors move to ``device``; anything else is returned unchanged."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, bool):  # before int: bool is an int; torch.bool cannot travel through NCCL
        return torch.tensor(value, dtype=torch.uint8, device=device)
    if isinstance(value, int):
        return torch.tensor(value, dtype=torch.int, device=device)
    if isinstance(value, float):
        return torch.tensor(value, dtype=torch.float, device=device)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value).to(device)
    return value




def prepares_data_here(obj: Any, local_rank: int, node_rank: int) -> bool:
    """Whether this rank calls ``obj.prepare_data()``: local rank 0 of each node, or only global rank 0 (local rank
    0 of node 0) when ``obj.prepare_data_per_node`` is False (Lightning's rule)."""
    if local_rank != 0:
        return False
    return bool(getattr(obj, "prepare_data_per_node", True)) or node_rank == 0


# The methods torch.compile's context wraps on a compiled LightningModule (Lightning's from_compiled).
_COMPILED_METHODS = ("forward", "training_step", "validation_step", "test_step", "predict_step")


def _apply_compile(module: LightningModule, dynamo_ctx: Any) -> None:
    """Wrap the module's forward and step methods with torch.compile's context; remember the originals."""
    ctx: dict[str, Any] = {"compiler": "dynamo", "dynamo_ctx": dynamo_ctx}
    for name in _COMPILED_METHODS:
        module.__dict__.pop(name, None)  # compiled before: wrap the plain method, not the earlier wrapper
        original = getattr(module, name)
        ctx[f"original_{name}"] = original
        module.__dict__[name] = dynamo_ctx(original)
    module.__dict__["_compiler_ctx"] = ctx


def from_compiled(model: Any) -> LightningModule:
    """The LightningModule inside ``torch.compile(module)``, with its forward and step methods compiled the same
    way, so the Trainer trains (and checkpoints) the module itself while running compiled code."""
    from torch._dynamo.eval_frame import OptimizedModule

    if not isinstance(model, OptimizedModule):
        raise ValueError(f"`model` must be the result of torch.compile(...), got {type(model).__name__}.")
    original = model._orig_mod
    if not isinstance(original, LightningModule):
        # ValueError as Lightning's from_compiled, TypeError as the Trainer's refusal of other modules
        raise MisconfigurationException(f"`model` is a compiled {type(original).__name__}, not a compiled raytrainer "
                                        "LightningModule. Compile a LightningModule: torch.compile(MyModule()).")
    _apply_compile(original, model.dynamo_ctx)
    return original


def to_uncompiled(model: Any) -> LightningModule:
    """Undo ``from_compiled`` (or unwrap ``torch.compile``'s result): the module with its plain methods."""
    from torch._dynamo.eval_frame import OptimizedModule

    if isinstance(model, OptimizedModule):
        original = model._orig_mod
        if not isinstance(original, LightningModule):
            raise TypeError(f"the compiled module wraps a {type(original).__name__}, not a LightningModule.")
    elif isinstance(model, LightningModule):
        if model.__dict__.get("_compiler_ctx") is None:
            raise ValueError("`model` is a LightningModule that was not compiled (neither torch.compile's result "
                             "nor from_compiled's).")
        original = model
    else:
        raise ValueError(f"`model` must be torch.compile's result or a LightningModule, got {type(model).__name__}.")
    ctx = original.__dict__.get("_compiler_ctx")
    if ctx is not None:
        for name in _COMPILED_METHODS:
            original.__dict__.pop(name, None)
        original.__dict__["_compiler_ctx"] = None
    return original


def is_compiled_module(model: Any) -> bool:
    """Whether ``model`` is torch.compile's wrapper (an OptimizedModule), without importing dynamo otherwise."""
    import sys

    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return eval_frame is not None and isinstance(model, eval_frame.OptimizedModule)
