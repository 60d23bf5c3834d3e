"""torch_xla devices (TPU; XLA's CPU backend in tests): placement, XLA RNG, collectives, and the
precision plugin through which every optimizer step reaches XLA.

XLA tensors are lazy: operations build a graph that runs when it is cut (``torch_xla.sync()``) or a
value is read. The graph is cut after every optimizer step (``XLAPrecision.optimizer_step``) and
before every batch is put on the device (``XLAStrategy.start_batch``), so evaluation and
prediction run batch by batch as well. torch_xla is imported only when an XLA run starts.
"""
from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from raytrainer.core.precision import Precision
from raytrainer.strategies.base import REDUCE_OPS, RankContext, Strategy, refuse_foreign_parts
from raytrainer.utilities import move_to_device
from raytrainer.utilities.exceptions import MisconfigurationException

INSTALL_HINT = 'pip install "raytrainer[tpu]"'
XLA_PRECISIONS = ("32-true", "bf16-mixed")


def import_xla() -> tuple[Any, Any, Any]:
    """(torch_xla, torch_xla.core.xla_model, torch_xla.runtime), or an ImportError saying how to install them."""
    try:
        import torch_xla
        import torch_xla.core.xla_model as xm
        import torch_xla.runtime as xr
    except ImportError as exc:
        raise ImportError(f"TPU runs (tpu_cores=N or accelerator='tpu') need torch_xla, which failed to import "
                          f"({exc}). Install it with `{INSTALL_HINT}`; torch_xla must match your torch version "
                          f"(torch {torch.__version__}).") from exc
    return torch_xla, xm, xr


def check_precision(precision: str) -> None:
    """Refuse precisions XLA cannot run, before any device or process starts."""
    if precision == "16-mixed":
        raise MisconfigurationException(
            "precision='16-mixed' (precision=16) is float16 autocast with a GradScaler, a CUDA "
            "feature. On TPU use precision='bf16-mixed' (or '32-true').")
    if precision not in XLA_PRECISIONS:
        raise MisconfigurationException(
            f"precision={precision!r} is not supported on XLA devices; use one of {XLA_PRECISIONS}.")


class XLAPrecision(Precision):
    """32-true or bf16-mixed on XLA; each optimizer step averages gradients over the ranks, then cuts the graph."""

    def __init__(self, precision: str = "32-true") -> None:
        check_precision(precision)
        super().__init__("xla")
        self.precision = precision
        self.dtype = torch.bfloat16 if precision == "bf16-mixed" else None

    def forward_context(self) -> AbstractContextManager[Any]:
        """bf16-mixed: ``torch.autocast("xla", bfloat16)`` (torch_xla.amp.autocast fails on XLA's CPU backend)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("xla", dtype=self.dtype)

    def optimizer_step(self, optimizer: torch.optim.Optimizer,
                       closure: Callable[[], Any] | None = None) -> Any:
        """Run the closure (forward/backward/hooks), mean the gradients over ranks, step, ``torch_xla.sync()``."""
        torch_xla, xm, _ = import_xla()

        if closure is None:
            xm.reduce_gradients(optimizer)  # an all-reduce with scale 1/world; nothing at world size 1
            out = optimizer.step()
        else:
            def reduced_closure() -> Any:
                result = closure()
                xm.reduce_gradients(optimizer)
                return result

            out = optimizer.step(reduced_closure)
        torch_xla.sync()
        return out


class XLAStrategy(Strategy):
    """One XLA device per rank. Collectives use XLA's (``xm.all_reduce``, ``xm.rendezvous``).

    Built as Lightning's (``XLAStrategy(debug=..., sync_module_states=...)``); the device is looked up when the
    rank first needs it, so a strategy object made on the driver does not start the XLA runtime there."""

    supports_inference_mode = False  # XLA tensors cannot be created under torch.inference_mode: loops use no_grad
    strategy_name = "xla"

    def __init__(self, accelerator: Any = None, parallel_devices: Any = None, checkpoint_io: Any = None,
                 precision_plugin: Any = None, debug: bool = False, sync_module_states: bool = True, *,
                 device_index: int | None = None, ctx: RankContext | None = None) -> None:
        import_xla()
        refuse_foreign_parts(type(self).__name__, accelerator=accelerator, parallel_devices=parallel_devices,
                             checkpoint_io=checkpoint_io)
        self._device: torch.device | None = None
        self.device_index = device_index
        super().__init__("cpu", ctx, precision_plugin=precision_plugin)
        self.debug = debug
        self.sync_module_states = sync_module_states  # ranks start from the same pickled module: always in sync
        self._agreement: Callable[[int], int] | None = None

    @property
    def root_device(self) -> torch.device:
        """This rank's XLA device (``device_index`` of those this process sees, else torch_xla's default)."""
        if self._device is None:
            torch_xla, _, _ = import_xla()
            if self.device_index is None:
                self._device = torch_xla.device()
            else:
                devices = torch_xla.devices()
                if not 0 <= self.device_index < len(devices):
                    raise ValueError(f"tpu_cores=[{self.device_index}] selects XLA device {self.device_index}, but "
                                     f"this process sees {len(devices)} ({[str(d) for d in devices]}). Pick an "
                                     f"index below {len(devices)}.")
                self._device = devices[self.device_index]
        return self._device

    @root_device.setter
    def root_device(self, device: torch.device) -> None:
        """Set by the base constructor (a placeholder) and by ``bind``: the lookup above decides the XLA device."""
        self._device = None

    def bind(self, device: Any, ctx: RankContext) -> Strategy:
        """Attach to a rank: ``device`` is the XLA device index of this process (None: torch_xla's default)."""
        self.device_index = device if isinstance(device, int) else None
        self._device = None
        self.ctx = ctx
        return self

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_device"] = None
        state["_agreement"] = None
        return state

    # -- lifecycle ----------------------------------------------------------------------------
    def setup_environment(self) -> None:
        """Seed the device's RNG from torch's seed: ``torch.manual_seed`` alone does not reach XLA's RNG."""
        if self.debug:
            os.environ["PT_XLA_DEBUG"] = "1"  # as Lightning's XLAStrategy(debug=True)
        _, xm, _ = import_xla()
        xm.set_rng_state(torch.initial_seed() % (2**63), device=str(self.root_device))

    def setup_module(self, module: nn.Module) -> nn.Module:
        module.to(self.root_device)
        self.model = module
        return module

    def teardown(self) -> None:
        """Run what is still queued, so nothing is left half-computed when the run returns."""
        torch_xla, _, _ = import_xla()
        torch_xla.sync()

    def make_precision(self, precision: str) -> Precision:
        """The Trainer's precision plugin on this strategy (``Trainer._make_precision`` asks for it)."""
        return XLAPrecision(precision)

    # -- data ---------------------------------------------------------------------------------
    def start_batch(self) -> None:
        """Cut the previous batch's graph before the next batch moves (as torch_xla's device loader does)."""
        torch_xla, _, _ = import_xla()
        torch_xla.sync()

    def batch_to_device(self, batch: Any) -> Any:
        return move_to_device(batch, self.root_device)

    # -- checkpoints ------------------------------------------------------------------------------
    def checkpoint_to_host(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """A CPU copy of ``checkpoint``, so it loads with plain torch on machines without torch_xla."""
        from raytrainer.checkpoint.host_copy import to_host

        torch_xla, _, _ = import_xla()
        torch_xla.sync()  # one execution for everything pending, then plain transfers
        return to_host(checkpoint)

    # -- collectives ----------------------------------------------------------------------------
    def reduce(self, tensor: torch.Tensor | float, op: str = "mean", group: Any = None) -> torch.Tensor:
        if op not in REDUCE_OPS:
            raise ValueError(f"reduce op must be one of {REDUCE_OPS}, got {op!r}")
        if group is not None:
            raise ValueError("XLA reduces over every device: a process group (self.log(sync_dist_group=...)) "
                             "is not supported there. Drop sync_dist_group, or use strategy='ddp'.")
        if not self.distributed:
            return tensor if isinstance(tensor, torch.Tensor) else torch.tensor(tensor)
        return all_reduce(tensor, op, self.world_size, self.root_device)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not self.distributed:
            return obj
        return broadcast_object(obj, src, self.global_rank)

    def barrier(self, name: str = "") -> None:
        if self.distributed:
            _, xm, _ = import_xla()
            xm.rendezvous(name or "raytrainer-barrier")

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        return all_gather_objects(obj)

    def all_gather(self, tensor: torch.Tensor, group: Any = None, sync_grads: bool = False) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along dim 0 (a scalar becomes shape (world,)), as Lightning's XLA
        strategy; one rank: the tensor as it is. ``sync_grads=True`` uses the differentiable gather."""
        if not self.distributed:
            return tensor
        _, xm, _ = import_xla()
        import torch_xla.core.functions as xf

        if tensor.dim() == 0:
            tensor = tensor.unsqueeze(0)
        device = tensor.device
        work = tensor.to(self.root_device)
        return (xf.all_gather(work) if sync_grads else xm.all_gather(work)).to(device)

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        if not self.distributed:
            return decision
        votes = all_reduce(torch.tensor(int(bool(decision)), dtype=torch.int32), "sum", self.world_size,
                           self.root_device)
        return bool(votes.item() == self.world_size) if all else bool(votes.item() > 0)

    def stop_agreement(self) -> Callable[[int], int] | None:
        """Agree on a stop code at every step with an XLA all-reduce (MAX); None for one rank."""
        if not self.distributed:
            return None
        if self._agreement is None:
            device, world = self.root_device, self.world_size
            self._agreement = lambda code: int(all_reduce(torch.tensor(int(code), dtype=torch.int32), "max", world,
                                                          device).item())
        return self._agreement


class SingleDeviceXLAStrategy(XLAStrategy):
    """One XLA device in this process (Lightning's ``SingleDeviceXLAStrategy``); ``device`` is its index."""

    strategy_name = "single_xla"

    def __init__(self, device: int | torch.device | None = None, accelerator: Any = None, checkpoint_io: Any = None,
                 precision_plugin: Any = None, debug: bool = False) -> None:
        index = device.index if isinstance(device, torch.device) else device
        super().__init__(accelerator=accelerator, checkpoint_io=checkpoint_io, precision_plugin=precision_plugin,
                         debug=debug, device_index=index)


# ----------------------------------------------------------------------------------- collectives
# Module functions (not only methods) so that a one-device run can exercise the same code paths.
def all_reduce(tensor: torch.Tensor | float, op: str, world_size: int, device: torch.device) -> torch.Tensor:
    """All-reduce a copy of ``tensor`` over the XLA ranks; returned on the input's device."""
    _, xm, _ = import_xla()
    if not isinstance(tensor, torch.Tensor):
        tensor = torch.tensor(tensor)
    out_device = tensor.device
    work = tensor.detach().clone().to(device)
    if op == "mean" and not (work.is_floating_point() or work.is_complex()):
        work = work.to(torch.get_default_dtype())
    kind = {"sum": xm.REDUCE_SUM, "mean": xm.REDUCE_SUM, "max": xm.REDUCE_MAX, "min": xm.REDUCE_MIN}[op]
    out = xm.all_reduce(kind, work, scale=1.0 / world_size if op == "mean" else 1.0)
    return out.to(out_device)


def all_gather_objects(obj: Any, tag: str = "raytrainer-all-gather-object") -> list[Any]:
    """Every rank's picklable object, in rank order (``xm.rendezvous`` exchanges the bytes)."""
    _, xm, _ = import_xla()
    return [pickle.loads(b) for b in xm.rendezvous(tag, pickle.dumps(obj))]


def broadcast_object(obj: Any, src: int, rank: int, tag: str = "raytrainer-broadcast") -> Any:
    """``src``'s object on every rank; the other ranks send nothing."""
    _, xm, _ = import_xla()
    payloads = xm.rendezvous(tag, pickle.dumps(obj) if rank == src else b"")
    return pickle.loads(payloads[src])
