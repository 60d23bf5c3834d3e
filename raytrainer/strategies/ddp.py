"""Distributed data parallel: one rank per process, gradients averaged by DistributedDataParallel.

The process group is normally formed before the strategy exists (by the Ray rank worker); under
torchrun, ``setup_environment`` joins one from the ``MASTER_ADDR``/``RANK`` variables instead.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from raytrainer.strategies.base import REDUCE_OPS, RankContext, Strategy

_TORCH_OPS = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM,
              "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class DDPStrategy(Strategy):
    """Collectives over torch.distributed and a DistributedDataParallel-wrapped module."""

    wraps_model = True

    def __init__(self, device: torch.device | str = "cpu", ctx: RankContext | None = None,
                 timeout_s: float = 300, find_unused_parameters: bool = False, sync_batchnorm: bool = False) -> None:
        super().__init__(device, ctx)
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
        self.timeout_s = timeout_s
        self.find_unused_parameters = find_unused_parameters
        self.sync_batchnorm = sync_batchnorm  # BatchNorm layers become SyncBatchNorm before wrapping
        self._module: nn.Module | None = None  # the unwrapped module
        self._owns_process_group = False

    # -- lifecycle ----------------------------------------------------------------------------
    def setup_environment(self) -> None:
        """Select the CUDA device and make sure this process is in a process group of the
        expected size (joining one from torchrun variables if nobody formed it yet)."""
        if self.root_device.type == "cuda":
            torch.cuda.set_device(self.root_device)
        if not dist.is_available():
            raise RuntimeError("torch.distributed is not available in this torch build; "
                               "DDP needs it")
        if not dist.is_initialized():
            self._join_from_env()
        if dist.get_world_size() != self.ctx.world_size or dist.get_rank() != self.ctx.global_rank:
            raise RuntimeError(
                f"the process group has rank {dist.get_rank()} of {dist.get_world_size()} but "
                f"this strategy was told rank {self.ctx.global_rank} of {self.ctx.world_size}; "
                "the RankContext and the launcher disagree")

    def _join_from_env(self) -> None:
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")
                   if v not in os.environ]
        if missing:
            raise RuntimeError(
                "DDPStrategy needs a torch.distributed process group, but none is initialised "
                f"and the torchrun variables {missing} are not set. Launch with the Ray launcher "
                "(Trainer(strategy='ddp', devices=N)) or with torchrun.")
        backend = "nccl" if self.root_device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://",
                                timeout=timedelta(seconds=self.timeout_s))
        self._owns_process_group = True

    def setup_module(self, module: nn.Module) -> nn.Module:
        """Move the module to the device (its BatchNorm layers made SyncBatchNorm when asked) and wrap it in
        DistributedDataParallel."""
        if self.sync_batchnorm:  # children are replaced in place; the parameters stay the same objects
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        module.to(self.root_device)
        self._module = module
        if not any(p.requires_grad for p in module.parameters()):
            self.model = module  # DDP refuses modules with nothing to train (e.g. predict only)
            return module
        device_ids = [self.root_device.index] if self.root_device.type == "cuda" else None
        self.model = DistributedDataParallel(module, device_ids=device_ids,
                                             find_unused_parameters=self.find_unused_parameters)
        module.__dict__["owner"] = self.model  # lets a StepDispatch reach its DDP wrapper (not a submodule)
        return self.model

    def pre_backward(self, loss: torch.Tensor) -> None:
        """Manual optimization: arm DDP's reducer for this backward (each manual_backward is its own sync)."""
        m = self.model
        if isinstance(m, DistributedDataParallel) and torch.is_grad_enabled():
            m.reducer._rebuild_buckets()
            m.reducer.prepare_for_backward([loss] if m.find_unused_parameters and not m.static_graph else [])

    def teardown(self) -> None:
        """Unwrap the module; leave the process group unless this strategy formed it."""
        if isinstance(self.model, DistributedDataParallel):
            self.model = self.model.module
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_process_group = False

    # -- collectives ----------------------------------------------------------------------------
    def _collective_device(self) -> torch.device:
        return self.root_device if dist.get_backend() == "nccl" else torch.device("cpu")

    def reduce(self, tensor: torch.Tensor | float, op: str = "mean") -> torch.Tensor:
        """All-reduce a copy of ``tensor`` across ranks; the input is left untouched."""
        if op not in REDUCE_OPS:
            raise ValueError(f"reduce op must be one of {REDUCE_OPS}, got {op!r}")
        if not isinstance(tensor, torch.Tensor):
            tensor = torch.tensor(tensor)
        out_device = tensor.device
        work = tensor.detach().clone().to(self._collective_device())
        if op == "mean" and not (work.is_floating_point() or work.is_complex()):
            work = work.to(torch.get_default_dtype())
        dist.all_reduce(work, op=_TORCH_OPS[op])
        if op == "mean":
            work = work / self.world_size
        return work.to(out_device)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Every rank gets ``src``'s object."""
        box = [obj]
        dist.broadcast_object_list(box, src=src, device=self._collective_device())
        return box[0]

    def barrier(self, name: str = "") -> None:
        """Wait for every rank (bounded by the process group's timeout)."""
        if dist.get_backend() == "nccl" and self.root_device.index is not None:
            dist.barrier(device_ids=[self.root_device.index])
        else:
            dist.barrier()

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Each rank's object, in rank order, on every rank."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        """all=True: every rank must say yes; all=False: one yes is enough."""
        votes = self.reduce(torch.tensor(int(bool(decision))), op="sum")
        return bool(votes.item() == self.world_size) if all else bool(votes.item() > 0)

    @contextlib.contextmanager
    def no_backward_sync(self, enabled: bool) -> Iterator[None]:
        """Skip DDP's gradient all-reduce inside the block (gradient accumulation)."""
        if enabled and isinstance(self.model, DistributedDataParallel):
            with self.model.no_sync():
                yield
        else:
            yield
