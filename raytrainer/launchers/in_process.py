"""Run one rank in this process: the laptop CPU or one CUDA device."""
from __future__ import annotations

from typing import Any

from raytrainer.plan import Plan
from raytrainer.strategies.single_device import single_device


class InProcessLauncher:
    """The simplest launcher: no processes, no Ray; the loops run right here."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    def launch(self, trainer: Any, fn: str, model: Any, kwargs: dict[str, Any]) -> Any:
        strategy = single_device(self.plan.accelerator, self.plan.device_ids, self.plan.strategy_object)
        return trainer.session.run(fn, model, strategy, **kwargs)
