"""Strategies: device placement and collectives, by Lightning's names (``from raytrainer.strategies import
DDPStrategy``, ``FSDPStrategy``). DeepSpeed and model parallelism are not supported: their classes refuse to be
built."""
from __future__ import annotations

from typing import Any

from raytrainer.strategies.base import Strategy
from raytrainer.strategies.ddp import DDPStrategy
from raytrainer.strategies.fsdp import FSDPStrategy
from raytrainer.strategies.single_device import SingleDeviceStrategy
from raytrainer.strategies.xla import SingleDeviceXLAStrategy, XLAStrategy
from raytrainer.utilities.exceptions import MisconfigurationException

ParallelStrategy = DDPStrategy  # Lightning's base of the multi-process strategies; DDP is raytrainer's only one


class _Unsupported:
    """A Lightning strategy class raytrainer cannot run: building one raises, saying what to use instead."""

    reason = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise MisconfigurationException(
            f"{type(self).__name__} is not supported by raytrainer: {self.reason}. Use "
            "DDPStrategy(...) (data parallel over Ray) on CPUs and GPUs, or XLAStrategy on TPUs.")


class DeepSpeedStrategy(_Unsupported):
    """Lightning's DeepSpeed strategy (not supported)."""

    reason = "DeepSpeed is not integrated"


class ModelParallelStrategy(_Unsupported):
    """Lightning's tensor/2D parallel strategy (not supported)."""

    reason = "tensor and 2D parallelism (torch.distributed device meshes) are not integrated"


__all__ = ["DDPStrategy", "DeepSpeedStrategy", "FSDPStrategy", "ModelParallelStrategy", "ParallelStrategy",
           "SingleDeviceStrategy", "SingleDeviceXLAStrategy", "Strategy", "XLAStrategy"]
