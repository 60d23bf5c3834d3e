"""Precision plugins, by Lightning's names: ``Precision`` (32-true), ``MixedPrecision`` (16-mixed with a GradScaler,
bf16-mixed), ``HalfPrecision`` (16-true, bf16-true) and ``DoublePrecision`` (64-true).

A "true" precision converts the module's floating-point parameters and the batch's floating-point tensors to its
dtype, and makes it the default dtype while steps run and while a module is created under ``init_module()``.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from raytrainer.utilities import apply_to_tensors
from raytrainer.utilities.exceptions import MisconfigurationException

TRUE_DTYPES = {"16-true": torch.float16, "bf16-true": torch.bfloat16, "64-true": torch.float64}


class Precision:
    """Full precision (32-true): no autocast, no loss scaling. Subclasses change what they must."""

    precision: str = "32-true"
    converts_input = False  # True where convert_input changes batches (the session then applies it per batch)

    def __init__(self, device_type: str = "cpu") -> None:
        self.device_type = device_type
        self.scaler: torch.amp.GradScaler | None = None

    @property
    def name(self) -> str:
        """The precision's Lightning name (``"32-true"``, ``"bf16-mixed"``, ...)."""
        return self.precision

    def convert_module(self, module: nn.Module) -> nn.Module:
        """Bring the module's parameters to this precision's dtype (nothing to do at full precision)."""
        return module

    def convert_input(self, data: Any) -> Any:
        """Bring a batch's floating-point tensors to this precision's dtype (nothing to do at full precision)."""
        return data

    def tensor_init_context(self) -> AbstractContextManager[Any]:
        """Context in which new tensors get this precision's dtype (``trainer.init_module()``)."""
        return contextlib.nullcontext()

    def module_init_context(self) -> AbstractContextManager[Any]:
        """Context in which a module is created (``configure_model``)."""
        return self.tensor_init_context()

    def forward_context(self) -> AbstractContextManager[Any]:
        """Context to run forward passes (training/validation/test/predict steps) in."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        loss.backward(*args, **kwargs)

    def unscale_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Make gradients real-sized before clipping or inspection."""

    def optimizer_step(self, optimizer: torch.optim.Optimizer,
                       closure: Callable[[], Any] | None = None) -> Any:
        return optimizer.step(closure) if closure is not None else optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore scaler state (nothing to do without a scaler)."""

    def for_device(self, device_type: str) -> Precision:
        """This plugin, told the rank's device type (autocast and GradScaler need it)."""
        self.device_type = device_type
        return self


class MixedPrecision(Precision):
    """Automatic mixed precision: autocast to float16 (with a GradScaler) or bfloat16 (no scaler needed).

    ``scaler``: a GradScaler to use, None for the default (16-mixed only), or False (raytrainer) for none.
    """

    def __init__(self, precision: str, device: str = "cuda", scaler: torch.amp.GradScaler | bool | None = None) -> None:
        if precision not in ("16-mixed", "bf16-mixed"):
            raise MisconfigurationException(
                f"MixedPrecision(precision={precision!r}): precision must be '16-mixed' or 'bf16-mixed'. "
                "For 16-true / bf16-true use HalfPrecision, for 64-true DoublePrecision.")
        super().__init__(device)
        self.precision = precision
        self.dtype = torch.float16 if precision == "16-mixed" else torch.bfloat16
        if isinstance(scaler, torch.amp.GradScaler):
            if precision == "bf16-mixed":
                raise MisconfigurationException(
                    "MixedPrecision('bf16-mixed') does not use a GradScaler (bfloat16 has float32's "
                    "range); drop the scaler argument.")
            self.scaler = scaler
        elif scaler is None and precision == "16-mixed" or scaler is True:
            # enabled only on CUDA; GradScaler(enabled=False) is a transparent no-op, which is how the scaler code
            # path is exercised on CPU-only machines.
            self.scaler = torch.amp.GradScaler(device, enabled=device == "cuda")
        self._default_scaler = scaler is None or scaler is True

    def for_device(self, device_type: str) -> Precision:
        if device_type != self.device_type and self._default_scaler and self.scaler is not None:
            self.scaler = torch.amp.GradScaler(device_type, enabled=device_type == "cuda")
        self.device_type = device_type
        return self

    @property
    def device(self) -> str:
        """The autocast device type (Lightning's attribute name)."""
        return self.device_type

    def forward_context(self) -> AbstractContextManager[Any]:
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward(*args, **kwargs)

    def unscale_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None and self.scaler.is_enabled():
            state = self.scaler._per_optimizer_states[id(optimizer)]
            if state["stage"].name == "READY" and _has_grads(optimizer):
                self.scaler.unscale_(optimizer)

    def optimizer_step(self, optimizer: torch.optim.Optimizer,
                       closure: Callable[[], Any] | None = None) -> Any:
        if self.scaler is None:
            return super().optimizer_step(optimizer, closure)
        if closure is not None:
            closure_result = closure()
            if _is_lbfgs(optimizer):
                raise TypeError("LBFGS (an optimizer that re-evaluates a closure) is not supported with "
                                "precision='16-mixed'; use 32-true or bf16-mixed.")
        else:
            closure_result = None
        if self.scaler.is_enabled() and not _has_grads(optimizer):
            # training_step returned None for the whole window: nothing to unscale or step (as in Lightning)
            return closure_result
        out = self.scaler.step(optimizer)
        self.scaler.update()
        return out if out is not None else closure_result

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


class _TruePrecision(Precision):
    """Everything in one dtype: parameters, floating-point inputs, and tensors created during steps."""

    converts_input = True
    dtype: torch.dtype = torch.float32

    def convert_module(self, module: nn.Module) -> nn.Module:
        return module.to(dtype=self.dtype)

    def convert_input(self, data: Any) -> Any:
        return convert_floats(data, self.dtype)

    def tensor_init_context(self) -> AbstractContextManager[Any]:
        return default_dtype(self.dtype)

    def forward_context(self) -> AbstractContextManager[Any]:
        return default_dtype(self.dtype)


class HalfPrecision(_TruePrecision):
    """16-true (float16) or bf16-true (bfloat16): the whole module and its inputs in half precision, no autocast."""

    def __init__(self, precision: str = "16-true") -> None:
        if precision not in ("16-true", "bf16-true"):
            raise MisconfigurationException(
                f"HalfPrecision(precision={precision!r}): precision must be '16-true' or 'bf16-true'.")
        super().__init__()
        self.precision = precision
        self.dtype = TRUE_DTYPES[precision]


class DoublePrecision(_TruePrecision):
    """64-true: the whole module and its inputs in float64."""

    precision = "64-true"
    dtype = torch.float64


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """``torch.set_default_dtype(dtype)`` inside the block; the previous default afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def convert_floats(data: Any, dtype: torch.dtype) -> Any:
    """``data`` with every floating-point tensor in it (in lists, tuples, namedtuples, dicts) cast to ``dtype``."""
    return apply_to_tensors(data, lambda t: t.to(dtype) if t.is_floating_point() else t)


def _has_grads(optimizer: torch.optim.Optimizer) -> bool:
    return any(p.grad is not None for g in optimizer.param_groups for p in g["params"])


def _is_lbfgs(optimizer: torch.optim.Optimizer) -> bool:
    return isinstance(optimizer, torch.optim.LBFGS)


def make_precision(precision: str, device_type: str) -> Precision:
    """Build the plugin for a resolved precision string (see plan.PRECISIONS)."""
    if precision == "32-true":
        return Precision(device_type)
    if precision in ("16-mixed", "bf16-mixed"):
        return MixedPrecision(precision, device_type)
    if precision in ("16-true", "bf16-true"):
        return HalfPrecision(precision).for_device(device_type)
    if precision == "64-true":
        return DoublePrecision().for_device(device_type)
    raise ValueError(f"unknown precision {precision!r}")


PLUGIN_KINDS = "precision plugins (raytrainer.plugins.Precision, MixedPrecision, HalfPrecision, DoublePrecision)"


def precision_plugin(plugins: list[Any], precision: Any, strategy: Any = None) -> Precision | None:
    """The precision plugin among ``plugins`` (or on ``strategy``), checked as Lightning checks it; None if none.

    Raises for a type raytrainer cannot run, for two precision plugins, and for a plugin together with a
    ``precision`` argument (Lightning: "Choose one")."""

    found: list[Precision] = []
    for plugin in plugins:
        if isinstance(plugin, Precision):
            found.append(plugin)
            continue
        kind = _lightning_kind(plugin)
        if kind is not None:
            raise MisconfigurationException(
                f"plugins=[{type(plugin).__name__}(...)]: raytrainer does not take {kind} plugins. "
                f"{_UNSUPPORTED[kind]} raytrainer takes {PLUGIN_KINDS}.")
        raise MisconfigurationException(
            f"Found invalid type for plugin {plugin!r} ({type(plugin).__module__}.{type(plugin).__name__}). "
            f"raytrainer takes {PLUGIN_KINDS}; pytorch_lightning's own plugin objects are not accepted: use the "
            "raytrainer class of the same name.")
    if len(found) > 1:
        raise MisconfigurationException("Received multiple values for Precision flags in `plugins`. Expected one "
                                        f"value for each type at most (got {[type(p).__name__ for p in found]}).")
    on_strategy = getattr(strategy, "_precision_plugin", None)
    if on_strategy is not None:
        if found:
            raise MisconfigurationException("precision set through both strategy class and plugins, choose one")
        found.append(on_strategy)
    if found and precision is not None:
        raise MisconfigurationException(
            f"Received both `precision={precision}` and `plugins={found[0]!r}`. Choose one.")
    return found[0] if found else None


_UNSUPPORTED = {
    "CheckpointIO": "Checkpoints are written by raytrainer's own writer (local paths and pyarrow.fs URIs such as "
                    "s3://, atomically and in the background); give ModelCheckpoint(dirpath=...) the destination.",
    "ClusterEnvironment": "Ray places the ranks and forms the process group itself (Trainer(ray_address=...) picks "
                          "the cluster), so no cluster environment is read.",
    "LayerSync": "Use Trainer(sync_batchnorm=True) for SyncBatchNorm on CUDA.",
}


def _lightning_kind(plugin: Any) -> str | None:
    """Which of Lightning's other plugin families ``plugin`` belongs to, by its class names."""
    names = {c.__name__ for c in type(plugin).__mro__}
    for kind in _UNSUPPORTED:
        if kind in names:
            return kind
    if "TorchSyncBatchNorm" in names:
        return "LayerSync"
    return None
