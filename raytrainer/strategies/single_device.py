"""One process, one device (CPU or one CUDA GPU): the base Strategy as it is."""
from __future__ import annotations

import torch

from raytrainer.strategies.base import RankContext, Strategy


class SingleDeviceStrategy(Strategy):
    """Runs everything on ``device``; collectives are identities."""

    def setup_environment(self) -> None:
        if self.root_device.type == "cuda":
            torch.cuda.set_device(self.root_device)


def single_device(accelerator: str, device_ids: tuple[int, ...] | None) -> SingleDeviceStrategy:
    """The strategy for a one-rank plan on this process."""
    if accelerator == "cuda":
        index = device_ids[0] if device_ids else 0
        return SingleDeviceStrategy(torch.device("cuda", index), RankContext())
    return SingleDeviceStrategy(torch.device("cpu"), RankContext())
