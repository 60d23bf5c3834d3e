"""The Strategy contract: device placement and collectives, the only things loops ask about."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from raytrainer.utilities import move_to_device


@dataclass
class RankContext:
    """Who this process is in the run; a rank other than 0 writes nothing."""

    global_rank: int = 0
    local_rank: int = 0
    node_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def is_global_zero(self) -> bool:
        return self.global_rank == 0


REDUCE_OPS = ("mean", "sum", "max", "min")


class Strategy:
    """Base strategy: one process, one device. Subclasses override the collectives."""

    wraps_model = False  # True when setup_module wraps the module (DDP): steps must go through the wrapper
    supports_inference_mode = True  # False where evaluation must use no_grad instead (XLA)

    def __init__(self, device: torch.device | str = "cpu", ctx: RankContext | None = None) -> None:
        self.root_device = torch.device(device)
        self.ctx = ctx or RankContext()
        self.model: nn.Module | None = None  # what training calls: the module, or its DDP wrapper

    # -- identity -----------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.ctx.world_size

    @property
    def global_rank(self) -> int:
        return self.ctx.global_rank

    @property
    def is_global_zero(self) -> bool:
        return self.ctx.global_rank == 0

    @property
    def distributed(self) -> bool:
        return self.ctx.world_size > 1

    # -- lifecycle ----------------------------------------------------------------------------
    def setup_environment(self) -> None:
        """Prepare the device (and, for distributed strategies, the process group)."""

    def setup_module(self, module: nn.Module) -> nn.Module:
        """Move the module to the device and wrap it if the strategy needs to; returns what to call."""
        module.to(self.root_device)
        self.model = module
        return module

    def teardown(self) -> None:
        """Release what setup_environment took."""

    # -- data ---------------------------------------------------------------------------------
    def start_batch(self) -> None:
        """Called before each batch is transferred (the XLA strategy cuts the previous step's graph here)."""

    def batch_to_device(self, batch: Any) -> Any:
        return move_to_device(batch, self.root_device)

    # -- collectives (identity on one process) -------------------------------------------------
    def reduce(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        return tensor

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj

    def barrier(self, name: str = "") -> None:
        """Wait for every rank."""

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        """Agree across ranks: all=True needs every rank to say yes, all=False any rank."""
        return decision

    @contextlib.contextmanager
    def no_backward_sync(self, enabled: bool) -> Iterator[None]:
        """Skip the gradient all-reduce for accumulation steps (DDP's no_sync)."""
        yield

    def pre_backward(self, loss: torch.Tensor) -> None:
        """Called before each manual_backward; DDP arms its gradient all-reduce here."""

    def stop_agreement(self) -> Callable[[int], int] | None:
        """A function that agrees on a stop code across ranks (None when there is one rank)."""
        if not self.distributed:
            return None
        agreement = self.__dict__.get("_agreement")
        if agreement is None:
            agreement = self.__dict__["_agreement"] = LaggedAgreement()
        return agreement

    def optimizer_step(self, optimizer: torch.optim.Optimizer, closure: Callable[[], Any] | None) -> Any:
        return optimizer.step(closure) if closure is not None else optimizer.step()


class LaggedAgreement:
    """Agree on a stop code across ranks one call late: each call starts an async MAX all-reduce of the
    local code (on its own gloo group) and returns the result of the previous call's. Every rank
    therefore sees the same answer at the same step, and the collective overlaps a training step."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self._group = dist.new_group(backend="gloo")
        self._buf = torch.zeros(1)
        self._work: Any = None

    def __call__(self, code: int) -> int:
        agreed = 0
        if self._work is not None:
            self._work.wait()
            agreed = int(self._buf[0])
        self._buf = torch.full((1,), float(code))
        self._work = self._dist.all_reduce(self._buf, op=self._dist.ReduceOp.MAX, group=self._group, async_op=True)
        return agreed

    def drain(self) -> int:
        """Finish the outstanding all-reduce (call on every rank at the same point); returns its answer."""
        if self._work is None:
            return 0
        self._work.wait()
        self._work = None
        return int(self._buf[0])
