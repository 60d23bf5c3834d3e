"""RichModelSummary: ModelSummary's table (layers to max_depth, parameter counts, totals) drawn with rich."""
from __future__ import annotations

from typing import Any

from torch import nn

from raytrainer.callbacks.model_summary import ModelSummary, _fmt, param_totals, summary_rows


class RichModelSummary(ModelSummary):
    """Prints the model summary as a rich table on global rank 0 when fit starts (replaces ModelSummary: the
    Trainer adds no second summary). ``header_style``: the table header's rich style; ``console_kwargs`` (not in
    Lightning) go to ``rich.console.Console``."""

    def __init__(self, max_depth: int = 1, console_kwargs: dict[str, Any] | None = None,
                 **summarize_kwargs: Any) -> None:
        try:
            import rich  # noqa: F401
        except ImportError as exc:  # pragma: no cover - rich is a dependency
            raise ModuleNotFoundError("RichModelSummary needs `rich`: pip install rich.") from exc
        unknown = set(summarize_kwargs) - {"header_style"}
        if unknown:
            raise TypeError(f"RichModelSummary got unknown arguments {sorted(unknown)}; it takes max_depth, "
                            "console_kwargs and header_style.")
        super().__init__(max_depth)
        self.header_style = summarize_kwargs.get("header_style", "bold magenta")
        self._console_kwargs = dict(console_kwargs or {})
        self.console: Any = None

    def render(self, module: nn.Module) -> tuple[Any, Any]:
        """The layer table and the totals grid, as rich renderables."""
        from rich.table import Table

        table = Table(header_style=self.header_style)
        for title in (" ", "Name", "Type", "Params"):
            table.add_column(title, justify="right" if title in (" ", "Params") else "left")
        for i, (name, kind, count) in enumerate(summary_rows(module, self.max_depth)):
            table.add_row(str(i), name, kind, _fmt(count))
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style="bold")
        grid.add_column()
        for label, value in param_totals(module):
            grid.add_row(f"{label}:", value)
        return table, grid

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if not self._should_print(trainer):
            return
        from rich.console import Console

        if self.console is None:
            self.console = Console(**self._console_kwargs)
        table, grid = self.render(pl_module)
        self.console.print(table)
        self.console.print(grid)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["console"] = None
        return state
