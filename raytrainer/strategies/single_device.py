"""One process, one device (CPU or one CUDA GPU): the base Strategy as it is."""
from __future__ import annotations

from typing import Any

import torch

from raytrainer.strategies.base import RankContext, Strategy


class SingleDeviceStrategy(Strategy):
    """Runs everything on ``device``; collectives are identities (Lightning's ``SingleDeviceStrategy``)."""

    strategy_name = "single_device"

    def __init__(self, device: torch.device | str | int = "cpu", ctx: RankContext | None = None, *,
                 accelerator: Any = None, checkpoint_io: Any = None, precision_plugin: Any = None) -> None:
        if isinstance(device, int):  # Lightning accepts a CUDA index
            device = torch.device("cuda", device)
        super().__init__(device, ctx, accelerator=accelerator, checkpoint_io=checkpoint_io,
                         precision_plugin=precision_plugin)

    def setup_environment(self) -> None:
        if self.root_device.type == "cuda":
            torch.cuda.set_device(self.root_device)


def single_device(accelerator: str, device_ids: tuple[int, ...] | None,
                  template: Strategy | None = None) -> Strategy:
    """The strategy for a one-rank plan on this process: ``template`` (the user's strategy object) bound to the
    plan's device when it is a single-device strategy, else a new SingleDeviceStrategy."""
    if accelerator == "cuda":
        device = torch.device("cuda", device_ids[0] if device_ids else 0)
    else:
        device = torch.device("cpu")
    if template is not None and template.strategy_name == "single_device":
        return template.bind(device, RankContext())
    strategy = SingleDeviceStrategy(device, RankContext())
    if template is not None:  # e.g. DDPStrategy(...) with one device: runs here; its precision plugin still applies
        strategy._precision_plugin = template._precision_plugin
    return strategy
