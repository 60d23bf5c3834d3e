"""From a Plan to the strategy object that runs it: the user's object, or the one Lightning's name stands for."""
from __future__ import annotations

import torch

from raytrainer.plan import FSDP_STRATEGIES, Plan
from raytrainer.strategies.base import RankContext, Strategy
from raytrainer.strategies.ddp import DDPStrategy
from raytrainer.strategies.fsdp import FSDPStrategy
from raytrainer.strategies.single_device import SingleDeviceStrategy


def strategy_for(plan: Plan) -> Strategy:
    """The strategy object of ``plan`` as Lightning's ``trainer.strategy`` shows it before a run: the user's object,
    else a new one for the name (DDPStrategy for 'ddp' and its aliases, SingleDeviceStrategy for one device, ...).
    Not yet bound to a rank: launchers bind it (or a copy, on Ray) to each rank's device."""
    if plan.strategy_object is not None:
        return plan.strategy_object
    world = RankContext(world_size=plan.world_size, local_world_size=plan.ranks_per_node)
    if plan.accelerator == "tpu":
        from raytrainer.strategies.xla import SingleDeviceXLAStrategy, XLAStrategy

        if plan.world_size == 1 and plan.strategy != "xla":
            index = plan.device_ids[0] if plan.device_ids else None
            return SingleDeviceXLAStrategy(index, debug=plan.strategy == "xla_debug")
        return XLAStrategy(debug=plan.strategy == "xla_debug", ctx=world)
    if plan.launcher == "ray" and plan.strategy in FSDP_STRATEGIES:
        return FSDPStrategy(cpu_offload=plan.strategy == "fsdp_cpu_offload", device=_first_device(plan), ctx=world)
    if plan.launcher == "ray":
        unused = plan.find_unused_parameters
        kwargs = {} if unused is None else {"find_unused_parameters": unused}
        return DDPStrategy(device=_first_device(plan), ctx=world, **kwargs)
    return SingleDeviceStrategy(_first_device(plan))


def _first_device(plan: Plan) -> torch.device:
    if plan.accelerator == "cuda":
        return torch.device("cuda", plan.device_ids[0] if plan.device_ids else 0)
    return torch.device("cpu")
