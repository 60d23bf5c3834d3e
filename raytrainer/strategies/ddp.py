"""Distributed data parallel: one rank per process, gradients averaged by DistributedDataParallel.

The process group is normally formed before the strategy exists (by the Ray rank worker); under
torchrun, ``setup_environment`` joins one from the ``MASTER_ADDR``/``RANK`` variables instead.
"""
from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from raytrainer.strategies.base import REDUCE_OPS, RankContext, Strategy, refuse_foreign_parts
from raytrainer.utilities.exceptions import MisconfigurationException

_TORCH_OPS = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM,
              "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


DDP_START_METHODS = ("popen", "spawn", "fork", "forkserver")
BACKENDS = ("gloo", "nccl")
# DistributedDataParallel's own keyword arguments, which DDPStrategy(**kwargs) passes through (as Lightning does)
DDP_KWARGS = tuple(p for p in inspect.signature(DistributedDataParallel.__init__).parameters
                   if p not in ("self", "module", "device_ids", "output_device", "process_group", "device_mesh"))


class DDPStrategy(Strategy):
    """Collectives over torch.distributed and a DistributedDataParallel-wrapped module.

    Built as Lightning's: ``DDPStrategy(find_unused_parameters=True, static_graph=..., gradient_as_bucket_view=...,
    timeout=timedelta(...), process_group_backend="gloo", ddp_comm_hook=..., ...)``; every keyword that
    DistributedDataParallel takes reaches the wrapper on each rank. ``timeout=None`` uses the Trainer's
    ``collective_timeout_s``. ``start_method`` is accepted for Lightning's names, but Ray starts the ranks.
    """

    wraps_model = True
    strategy_name = "ddp"

    def __init__(self, accelerator: Any = None, parallel_devices: Any = None, cluster_environment: Any = None,
                 checkpoint_io: Any = None, precision_plugin: Any = None, ddp_comm_state: object | None = None,
                 ddp_comm_hook: Callable[..., Any] | None = None, ddp_comm_wrapper: Callable[..., Any] | None = None,
                 model_averaging_period: int | None = None, process_group_backend: str | None = None,
                 timeout: timedelta | float | None = None, start_method: str = "popen", *,
                 device: torch.device | str = "cpu", ctx: RankContext | None = None, timeout_s: float | None = None,
                 sync_batchnorm: bool = False, **kwargs: Any) -> None:
        refuse_foreign_parts("DDPStrategy", accelerator=accelerator, parallel_devices=parallel_devices,
                             cluster_environment=cluster_environment, checkpoint_io=checkpoint_io)
        super().__init__(device, ctx, precision_plugin=precision_plugin)
        unknown = sorted(set(kwargs) - set(DDP_KWARGS))
        if unknown:
            raise TypeError(f"DDPStrategy got unknown argument(s) {unknown}: besides its own arguments it passes "
                            f"DistributedDataParallel's to the wrapper, which are {list(DDP_KWARGS)}.")
        if model_averaging_period is not None or _is_post_local_sgd(ddp_comm_state):
            raise MisconfigurationException(
                "DDPStrategy(model_averaging_period=..., post-localSGD state): periodic model "
                "averaging (post-localSGD) is not supported by raytrainer. Use a plain DDP comm hook "
                "(e.g. ddp_comm_hook=default_hooks.fp16_compress_hook) or none.")
        if start_method not in DDP_START_METHODS:
            raise MisconfigurationException(
                f"DDPStrategy(start_method={start_method!r}): use one of {DDP_START_METHODS} (on "
                "raytrainer every start method runs the ranks as Ray actors).")
        if process_group_backend is not None and process_group_backend not in BACKENDS:
            raise MisconfigurationException(
                f"DDPStrategy(process_group_backend={process_group_backend!r}): raytrainer forms "
                f"process groups with {BACKENDS} ('nccl' on CUDA only); pick one of them or None "
                "(nccl on GPUs, gloo on CPU).")
        if timeout is not None and timeout_s is not None:
            raise MisconfigurationException("DDPStrategy: give timeout (Lightning's timedelta) or timeout_s, not both.")
        if isinstance(timeout, timedelta):
            timeout_s = timeout.total_seconds()
        elif timeout is not None:
            timeout_s = float(timeout)
        if timeout_s is not None and timeout_s <= 0:
            raise MisconfigurationException(f"DDPStrategy: timeout (timeout_s) must be > 0 seconds, got {timeout_s}")
        self.timeout_given = timeout_s is not None  # else the Trainer's collective_timeout_s applies
        self.timeout_s = timeout_s if timeout_s is not None else 300.0
        self._ddp_kwargs = dict(kwargs)
        self._ddp_comm_state = ddp_comm_state
        self._ddp_comm_hook = ddp_comm_hook
        self._ddp_comm_wrapper = ddp_comm_wrapper
        self._process_group_backend = process_group_backend
        self._start_method = start_method
        self.sync_batchnorm = sync_batchnorm  # BatchNorm layers become SyncBatchNorm before wrapping
        self._module: nn.Module | None = None  # the unwrapped module
        self._owns_process_group = False

    @property
    def find_unused_parameters(self) -> bool:
        return bool(self._ddp_kwargs.get("find_unused_parameters", False))

    @find_unused_parameters.setter
    def find_unused_parameters(self, value: bool) -> None:
        self._ddp_kwargs["find_unused_parameters"] = bool(value)

    @property
    def process_group_backend(self) -> str | None:
        """The backend asked for (None: nccl on GPUs, gloo on CPU)."""
        return self._process_group_backend

    @property
    def timeout(self) -> timedelta:
        return timedelta(seconds=self.timeout_s)

    @property
    def num_processes(self) -> int:
        """Ranks on this node."""
        return self.ctx.local_world_size

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_module"] = None
        state["_owns_process_group"] = False
        return state

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
        backend = self._process_group_backend or ("nccl" if self.root_device.type == "cuda" else "gloo")
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
        self.model = DistributedDataParallel(module, device_ids=device_ids, **self._ddp_kwargs)
        if torch.are_deterministic_algorithms_enabled():
            fix_bucket_layout(self.model)
        if self._ddp_comm_hook is not None:
            hook = self._ddp_comm_hook
            if self._ddp_comm_wrapper is not None:
                hook = self._ddp_comm_wrapper(hook)
            self.model.register_comm_hook(state=self._ddp_comm_state, hook=hook)
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

    def reduce(self, tensor: torch.Tensor | float, op: str = "mean", group: Any = None) -> torch.Tensor:
        """All-reduce a copy of ``tensor`` across ranks (or the ranks of process ``group``); the input is left
        untouched. A rank outside ``group`` gets its own value back."""
        if op not in REDUCE_OPS:
            raise ValueError(f"reduce op must be one of {REDUCE_OPS}, got {op!r}")
        if not isinstance(tensor, torch.Tensor):
            tensor = torch.tensor(tensor)
        if group is not None and dist.get_rank(group) < 0:
            return tensor.detach().clone()
        out_device = tensor.device
        work = tensor.detach().clone().to(self._collective_device())
        if op == "mean" and not (work.is_floating_point() or work.is_complex()):
            work = work.to(torch.get_default_dtype())
        dist.all_reduce(work, op=_TORCH_OPS[op], group=group)
        if op == "mean":
            work = work / (self.world_size if group is None else dist.get_world_size(group))
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

    def all_gather(self, tensor: torch.Tensor, group: Any = None, sync_grads: bool = False) -> torch.Tensor:
        """Every rank's ``tensor`` (same shape on each) stacked on a new leading dimension, in rank order.

        ``sync_grads=True`` keeps autograd: each rank's input receives the gradients every rank's result sends
        back to its slice (torch.distributed.nn's all_gather)."""
        import contextlib
        import warnings

        from torch.distributed.nn.functional import all_gather as differentiable_all_gather

        if not dist.is_initialized():  # after teardown of a process group this strategy formed: one process
            return tensor
        device = tensor.device
        work = tensor.contiguous().to(self._collective_device())
        with contextlib.nullcontext() if sync_grads else torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_gather is deprecated",
                                    FutureWarning)  # its replacement has no autograd on gloo yet
            gathered = differentiable_all_gather(work, group=group if group is not None else dist.group.WORLD)
        return torch.stack(gathered).to(device)

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


def _is_post_local_sgd(state: object | None) -> bool:
    """Whether a DDP comm state is torch's post-localSGD state (it needs periodic model averaging)."""
    return state is not None and type(state).__name__ == "PostLocalSGDState"


def fix_bucket_layout(ddp: DistributedDataParallel) -> None:
    """Give DDP its final gradient-bucket layout before the first step (parameter order), not after it.

    DDP lays its buckets out again after its first backward, in the order the gradients became ready. A resumed run
    (a checkpoint, or a snapshot after a failure) builds a new DDP, whose first step then all-reduces with the first
    layout while the uninterrupted run already used the second: elements land in other chunks of gloo's ring, are
    summed in another order, and with more than 2 ranks the result differed in the last bit. With one layout from
    the start, every run, resumed or not, sums every element in the same order (``deterministic=True`` only: the
    ready order overlaps communication with the backward a little better)."""
    reducer = getattr(ddp, "reducer", None)
    if reducer is not None and not ddp.find_unused_parameters and hasattr(reducer, "_push_all_rebuilt_params"):
        reducer._push_all_rebuilt_params()  # the first forward's _rebuild_buckets() then uses parameter order
