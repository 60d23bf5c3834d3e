"""Model summary printed at fit start: top-level layers and parameter counts."""
from __future__ import annotations

from typing import Any

from torch import nn

from raytrainer.callbacks.callback import Callback


def summarize(module: nn.Module, max_depth: int = 1) -> str:
    """A table of the module's children to ``max_depth``: name, type, parameter count."""
    rows = []
    for name, child in module.named_modules():
        depth = name.count(".") + 1 if name else 0
        if name and depth <= max_depth:
            rows.append((name, type(child).__name__, sum(p.numel() for p in child.parameters())))
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    w = max([len(r[0]) for r in rows] + [4])
    t = max([len(r[1]) for r in rows] + [4])
    lines = [f"  | {'Name':<{w}} | {'Type':<{t}} | Params", "-" * (w + t + 20)]
    lines += [f"{i:<2}| {n:<{w}} | {ty:<{t}} | {_fmt(c)}" for i, (n, ty, c) in enumerate(rows)]
    lines += ["-" * (w + t + 20), f"{_fmt(trainable)} Trainable params",
              f"{_fmt(total - trainable)} Non-trainable params", f"{_fmt(total)} Total params",
              f"{total * 4 / 1e6:.3f} Total estimated model params size (MB)"]
    return "\n".join(lines)


def _fmt(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return str(n)


class ModelSummary(Callback):
    """Prints ``summarize(module)`` on global rank 0 when fit starts."""

    def __init__(self, max_depth: int = 1) -> None:
        self.max_depth = max_depth

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.is_global_zero and self.max_depth > 0:
            print(summarize(pl_module, self.max_depth), flush=True)
