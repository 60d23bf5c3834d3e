"""The Strategy contract: device placement and collectives, the only things loops ask about."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from raytrainer.utilities import move_to_device
from raytrainer.utilities.exceptions import MisconfigurationException


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


class SkipParameterInit(TorchFunctionMode):
    """Inside, ``torch.nn.init`` functions leave tensors as allocated (``init_module(empty_init=True)``)."""

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return kwargs["tensor"] if "tensor" in kwargs else args[0]
        return func(*args, **kwargs)


def refuse_foreign_parts(owner: str, **parts: Any) -> None:
    """Refuse Lightning strategy arguments that name parts raytrainer owns itself (accelerator objects,
    checkpoint IO, cluster environments, explicit device lists), saying what to use instead."""
    advice = {
        "accelerator": "pass accelerator='cpu' / 'gpu' / 'tpu' to the Trainer",
        "checkpoint_io": "raytrainer writes checkpoints itself (local paths and pyarrow.fs URIs such as s3://); "
                         "give ModelCheckpoint(dirpath=...) the destination",
        "cluster_environment": "Ray places the ranks and forms the process group (Trainer(ray_address=...) picks "
                               "the cluster)",
        "parallel_devices": "pass devices=N (or a list of GPU ids) and accelerator=... to the Trainer",
    }
    given = [name for name, value in parts.items() if value is not None]
    if given:
        raise MisconfigurationException(
            f"{owner}({', '.join(f'{n}=...' for n in given)}): raytrainer does not take "
            f"{' or '.join(given)} on a strategy: " + "; ".join(advice[n] for n in given) + ".")


class Strategy:
    """Base strategy: one process, one device. Subclasses override the collectives."""

    wraps_model = False  # True when setup_module wraps the module (DDP): steps must go through the wrapper
    supports_inference_mode = True  # False where evaluation must use no_grad instead (XLA)
    routes_every_step = False  # True: validation/test/predict steps also run through the wrapper (FSDP)
    # True (FSDP): each rank keeps shards; setup_module runs for validate/test/predict too, and
    # init_module(empty_init=True) creates parameters on the meta device
    shards_parameters = False
    strategy_name = "single_device"  # Lightning's registry name; the Plan reads it from a strategy object

    def __init__(self, device: torch.device | str = "cpu", ctx: RankContext | None = None, *,
                 accelerator: Any = None, checkpoint_io: Any = None, precision_plugin: Any = None) -> None:
        refuse_foreign_parts(type(self).__name__, accelerator=accelerator, checkpoint_io=checkpoint_io)
        self.root_device = torch.device(device)
        self.ctx = ctx or RankContext()
        self.model: nn.Module | None = None  # what training calls: the module, or its DDP wrapper
        self._precision_plugin = precision_plugin  # a raytrainer.plugins precision plugin, or None
        self.precision_plugin_running: Any = None  # the running call's precision plugin (the session sets it)

    def bind(self, device: torch.device | str, ctx: RankContext) -> Strategy:
        """Attach this strategy (the user's settings) to one rank's device and place in the world; returns self.
        Launchers call it on the rank that runs, so a strategy object carries settings from the driver."""
        self.root_device = torch.device(device)
        self.ctx = ctx
        return self

    def __getstate__(self) -> dict[str, Any]:
        """A strategy pickles (to the Ray ranks) as its settings: the module and run state stay behind."""
        state = dict(self.__dict__)
        state["model"] = None
        state.pop("_agreement", None)
        state["precision_plugin_running"] = None
        return state

    @property
    def precision_plugin(self) -> Any:
        """The precision plugin: the running call's, else the one this strategy was given (Lightning's name)."""
        return self.precision_plugin_running if self.precision_plugin_running is not None else self._precision_plugin

    @precision_plugin.setter
    def precision_plugin(self, plugin: Any) -> None:
        self.precision_plugin_running = plugin

    @property
    def local_rank(self) -> int:
        return self.ctx.local_rank

    @property
    def node_rank(self) -> int:
        return self.ctx.node_rank

    @contextlib.contextmanager
    def tensor_init_context(self, empty_init: bool | None = None) -> Iterator[None]:
        """Tensors created inside get this strategy's device and the precision's dtype (``trainer.init_module``).

        ``empty_init=True`` skips the initialisation of parameters created inside (their memory is left as
        allocated: load weights into them afterwards), as Lightning's ``_EmptyInit`` does."""
        precision = self.precision_plugin
        dtype_ctx = precision.tensor_init_context() if precision is not None else contextlib.nullcontext()
        skip_init = SkipParameterInit() if empty_init else contextlib.nullcontext()
        with skip_init, self.root_device, dtype_ctx:
            yield

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
    def reduce(self, tensor: torch.Tensor, op: str = "mean", group: Any = None) -> torch.Tensor:
        """Reduce across ranks (or the ranks of process ``group``); one process keeps its value."""
        return tensor

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj

    def barrier(self, name: str = "") -> None:
        """Wait for every rank."""

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def all_gather(self, tensor: torch.Tensor, group: Any = None, sync_grads: bool = False) -> torch.Tensor:
        """Every rank's ``tensor`` stacked on a new leading dimension; one process: the tensor as it is (Lightning)."""
        return tensor

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
