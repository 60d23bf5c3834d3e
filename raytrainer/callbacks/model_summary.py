"""Model summary printed at fit start: top-level layers and parameter counts."""
from __future__ import annotations

from typing import Any

from torch import nn

from raytrainer.callbacks.callback import Callback


def summary_rows(module: nn.Module, max_depth: int = 1) -> list[tuple[str, str, int]]:
    """(name, type, parameter count) of each submodule down to ``max_depth``: the rows of the summary table."""
    rows = []
    for name, child in module.named_modules():
        if name and (max_depth < 0 or name.count(".") + 1 <= max_depth):  # -1: every level
            rows.append((name, type(child).__name__, sum(p.numel() for p in child.parameters())))
    return rows


def param_totals(module: nn.Module) -> list[tuple[str, str]]:
    """The summary's closing lines as (label, value): trainable, non-trainable and total counts, size in MB."""
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return [("Trainable params", _fmt(trainable)), ("Non-trainable params", _fmt(total - trainable)),
            ("Total params", _fmt(total)), ("Total estimated model params size (MB)", f"{total * 4 / 1e6:.3f}")]


def summarize(module: nn.Module, max_depth: int = 1) -> str:
    """A table of the module's children to ``max_depth``: name, type, parameter count."""
    rows = summary_rows(module, max_depth)
    w = max([len(r[0]) for r in rows] + [4])
    t = max([len(r[1]) for r in rows] + [4])
    lines = [f"  | {'Name':<{w}} | {'Type':<{t}} | Params", "-" * (w + t + 20)]
    lines += [f"{i:<2}| {n:<{w}} | {ty:<{t}} | {_fmt(c)}" for i, (n, ty, c) in enumerate(rows)]
    lines += ["-" * (w + t + 20)]
    lines += [f"{value} {label}" for label, value in param_totals(module)]
    return "\n".join(lines)


def _fmt(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return str(n)


class ModelSummary(Callback):
    """Prints ``summarize(module)`` on global rank 0 when fit starts."""

    def __init__(self, max_depth: int = 1, **summarize_kwargs: Any) -> None:
        if not isinstance(max_depth, int) or max_depth < -1:
            raise ValueError(f"ModelSummary(max_depth={max_depth!r}): use an int >= 0 (-1 for every level, 0 for "
                             "no summary).")
        self.max_depth = max_depth
        self._summarize_kwargs = summarize_kwargs  # as Lightning: options for a subclass's table (RichModelSummary)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self._should_print(trainer):
            print(summarize(pl_module, self.max_depth), flush=True)

    def _should_print(self, trainer: Any) -> bool:
        """Global rank 0, once per fit: not again when Ray restarts or resizes the ranks of the same fit."""
        return trainer.is_global_zero and self.max_depth != 0 and \
            not getattr(getattr(trainer, "session", None), "restarted", False)
