"""Precision plugins: 32-true, 16-mixed (CUDA + GradScaler), bf16-mixed (autocast)."""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch


class Precision:
    """Full precision: no autocast, no loss scaling. Subclasses change what they must."""

    name = "32-true"

    def __init__(self, device_type: str = "cpu") -> None:
        self.device_type = device_type
        self.scaler: torch.amp.GradScaler | None = None

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


class MixedPrecision(Precision):
    """Autocast to float16 (with GradScaler) or bfloat16 (no scaler needed)."""

    def __init__(self, device_type: str, dtype: torch.dtype, scaler: bool | None = None) -> None:
        super().__init__(device_type)
        self.dtype = dtype
        self.name = "16-mixed" if dtype == torch.float16 else "bf16-mixed"
        use_scaler = (dtype == torch.float16) if scaler is None else scaler
        if use_scaler:
            # enabled only where it makes sense; GradScaler(enabled=False) is a transparent no-op,
            # which is how the scaler code path is exercised on CPU-only machines.
            self.scaler = torch.amp.GradScaler(device_type, enabled=device_type == "cuda")

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


def _has_grads(optimizer: torch.optim.Optimizer) -> bool:
    return any(p.grad is not None for g in optimizer.param_groups for p in g["params"])


def _is_lbfgs(optimizer: torch.optim.Optimizer) -> bool:
    return isinstance(optimizer, torch.optim.LBFGS)


def make_precision(precision: str, device_type: str) -> Precision:
    """Build the plugin for a resolved precision string (see plan.PRECISIONS)."""
    if precision == "32-true":
        return Precision(device_type)
    if precision == "bf16-mixed":
        return MixedPrecision(device_type, torch.bfloat16)
    if precision == "16-mixed":
        return MixedPrecision(device_type, torch.float16)
    raise ValueError(f"unknown precision {precision!r}")
