"""Fully sharded data parallel on PyTorch's FSDP2 (``fully_shard``, DTensor parameters).

Each rank keeps 1/N of every parameter, gradient and optimizer state; a sharded group's parameters are all-gathered
for its forward and backward only. Process group, collectives and ``reduce`` come from DDPStrategy.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from raytrainer.checkpoint.shard_snapshot import ShardSource
from raytrainer.strategies.base import RankContext, refuse_foreign_parts
from raytrainer.strategies.ddp import DDPStrategy
from raytrainer.utilities.exceptions import MisconfigurationException

# Lightning's sharding strategies -> FSDP2's reshard_after_forward; the hybrid ones shard over a 2-D mesh's inner
# dimension (the ranks of a node) and replicate over its outer one (the nodes)
SHARDING_STRATEGIES = {"FULL_SHARD": True, "SHARD_GRAD_OP": False, "HYBRID_SHARD": True, "_HYBRID_SHARD_ZERO2": False}
STATE_DICT_TYPES = ("sharded", "full")


def _policy_fn(policy: Any, what: str) -> Callable[[nn.Module], bool] | None:
    """A module predicate from None, a set/list/tuple of nn.Module classes, or a callable(module) -> bool."""
    if policy is None:
        return None
    if isinstance(policy, type) and issubclass(policy, nn.Module):
        policy = {policy}
    if isinstance(policy, (set, frozenset, list, tuple)):
        classes = tuple(policy)
        bad = [c for c in classes if not (isinstance(c, type) and issubclass(c, nn.Module))]
        if bad:
            raise MisconfigurationException(f"FSDPStrategy({what}=...): every entry must be an nn.Module class, got "
                                            f"{bad}.")
        return lambda m: isinstance(m, classes)
    if callable(policy):
        return policy
    raise MisconfigurationException(f"FSDPStrategy({what}={policy!r}): give a set of nn.Module classes or a "
                                    "callable(module) -> bool.")


class FSDPStrategy(DDPStrategy):
    """Lightning's ``FSDPStrategy`` on FSDP2: ``FSDPStrategy(auto_wrap_policy={Block}, sharding_strategy="FULL_SHARD",
    cpu_offload=False, mixed_precision=None, activation_checkpointing_policy={Block}, state_dict_type="sharded")``.

    ``auto_wrap_policy`` picks the submodules sharded as their own group (a set of classes or a callable); the root
    is always sharded. ``mixed_precision`` is a ``torch.distributed.fsdp.MixedPrecisionPolicy`` (default: from the
    Trainer's precision)."""

    strategy_name = "fsdp"
    routes_every_step = True  # every step runs through the sharded root, so its all-gather hooks fire
    shards_parameters = True  # validate/test/predict shard the module too (it may be built on meta)
    supports_inference_mode = False  # FSDP2 all-gathers in no_grad, not inference_mode

    def __init__(self, accelerator: Any = None, parallel_devices: Any = None, cluster_environment: Any = None,
                 checkpoint_io: Any = None, precision_plugin: Any = None, process_group_backend: str | None = None,
                 timeout: timedelta | float | None = None, cpu_offload: bool = False,
                 mixed_precision: Any = None, auto_wrap_policy: Any = None,
                 activation_checkpointing_policy: Any = None, sharding_strategy: str = "FULL_SHARD",
                 state_dict_type: str = "sharded", device_mesh: tuple[int, int] | None = None, *,
                 device: torch.device | str = "cpu",
                 ctx: RankContext | None = None, timeout_s: float | None = None, **kwargs: Any) -> None:
        refuse_foreign_parts("FSDPStrategy", accelerator=accelerator, parallel_devices=parallel_devices,
                             cluster_environment=cluster_environment, checkpoint_io=checkpoint_io)
        if kwargs:
            raise TypeError(f"FSDPStrategy got unknown argument(s) {sorted(kwargs)}: it takes auto_wrap_policy, "
                            "sharding_strategy, cpu_offload, mixed_precision, activation_checkpointing_policy, "
                            "state_dict_type, timeout, process_group_backend.")
        super().__init__(precision_plugin=precision_plugin, process_group_backend=process_group_backend,
                         timeout=timeout, device=device, ctx=ctx, timeout_s=timeout_s)
        name = str(getattr(sharding_strategy, "name", sharding_strategy)).upper()
        if name == "NO_SHARD":
            raise MisconfigurationException(
                "FSDPStrategy(sharding_strategy='NO_SHARD') replicates every parameter, which is data parallel: "
                "use strategy='ddp' (DDPStrategy) instead.")
        if name not in SHARDING_STRATEGIES:
            raise MisconfigurationException(f"FSDPStrategy(sharding_strategy={sharding_strategy!r}): use one of "
                                            f"{sorted(SHARDING_STRATEGIES)}.")
        if state_dict_type not in STATE_DICT_TYPES:
            raise MisconfigurationException(f"FSDPStrategy(state_dict_type={state_dict_type!r}): use one of "
                                            f"{STATE_DICT_TYPES}.")
        if mixed_precision is not None:
            from torch.distributed.fsdp import MixedPrecisionPolicy

            if not isinstance(mixed_precision, MixedPrecisionPolicy):
                raise MisconfigurationException(
                    f"FSDPStrategy(mixed_precision={type(mixed_precision).__name__}(...)): give a "
                    "torch.distributed.fsdp.MixedPrecisionPolicy (FSDP2), or None to follow the Trainer's precision.")
        if not isinstance(cpu_offload, bool):  # FSDP1's CPUOffload(offload_params=...), as Lightning accepts
            cpu_offload = bool(getattr(cpu_offload, "offload_params", cpu_offload))
        self.sharding_strategy = name
        self.reshard_after_forward = SHARDING_STRATEGIES[name]
        self.cpu_offload = cpu_offload
        self.mixed_precision = mixed_precision
        self.auto_wrap_policy = auto_wrap_policy
        self.activation_checkpointing_policy = activation_checkpointing_policy
        self.state_dict_type = state_dict_type
        if device_mesh is not None and not (isinstance(device_mesh, tuple) and len(device_mesh) == 2 and all(
                isinstance(n, int) and n >= 1 for n in device_mesh) and name.startswith(("HYBRID", "_HYBRID"))):
            raise MisconfigurationException(
                f"FSDPStrategy(device_mesh={device_mesh!r}): give (replicas, shard_size) as two ints >= 1, with "
                "sharding_strategy='HYBRID_SHARD' (other strategies shard over every rank).")
        self.device_mesh = device_mesh  # hybrid: (replicas, shard size); None: (nodes, ranks per node)
        _policy_fn(auto_wrap_policy, "auto_wrap_policy")  # check now, on the driver
        _policy_fn(activation_checkpointing_policy, "activation_checkpointing_policy")
        self._mesh: Any = None
        self._checkpoint_group: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_mesh"] = None
        state["_checkpoint_group"] = None
        return state

    # -- precision ------------------------------------------------------------------------------
    def _mp_policy(self) -> Any:
        """The MixedPrecisionPolicy: the user's, else the one the Trainer's precision stands for."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if self.mixed_precision is not None:
            return self.mixed_precision
        name = getattr(self.precision_plugin, "name", "32-true")
        if name == "bf16-mixed":
            return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if name == "16-mixed":
            raise MisconfigurationException(
                "precision='16-mixed' with FSDPStrategy is not supported by raytrainer yet: the gradient scaler's "
                "inf/nan check is not agreed across the shards. Use precision='bf16-mixed' (or 'bf16-true').")
        return MixedPrecisionPolicy()  # 32-true, and the true precisions (the module is already converted)

    # -- module ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def tensor_init_context(self, empty_init: bool | None = None) -> Iterator[None]:
        """``empty_init=True``: parameters are created on the meta device (no memory); setup_module materialises
        only this rank's shards and calls each submodule's ``reset_parameters()``."""
        if not empty_init:
            with super().tensor_init_context(empty_init):
                yield
            return
        precision = self.precision_plugin
        dtype_ctx = precision.tensor_init_context() if precision is not None else contextlib.nullcontext()
        with torch.device("meta"), dtype_ctx:
            yield

    def setup_module(self, module: nn.Module) -> nn.Module:
        """Activation checkpointing for the given classes, fully_shard on the policy's submodules and the root,
        then meta parameters materialised as this rank's shards; returns the sharded root."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        if self.sync_batchnorm:
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        self._module = module
        on_meta = any(t.is_meta for t in _tensors(module))
        if not on_meta:
            module.to(self.root_device)
            self._sync_from_rank0(module)  # as DDP: every rank starts from rank 0's weights
        ac = _policy_fn(self.activation_checkpointing_policy, "activation_checkpointing_policy")
        if ac is not None:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

            apply_activation_checkpointing(module, check_fn=ac)
        if self._mesh is None:
            self._mesh = self._make_mesh(init_device_mesh)
        offload = CPUOffloadPolicy() if self.cpu_offload and self.root_device.type != "cpu" else OffloadPolicy()
        kwargs = {"mesh": self._mesh, "reshard_after_forward": self.reshard_after_forward,
                  "mp_policy": self._mp_policy(), "offload_policy": offload}
        wrap = _policy_fn(self.auto_wrap_policy, "auto_wrap_policy")
        if wrap is not None:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

            wrapped = {id(m._checkpoint_wrapped_module) for m in module.modules() if isinstance(m, CheckpointWrapper)}
            picked = [m for m in module.modules() if m is not module and (
                wrap(m._checkpoint_wrapped_module) if isinstance(m, CheckpointWrapper)
                else id(m) not in wrapped and wrap(m))]  # a checkpointed module is sharded as its wrapper
            for m in reversed(picked):  # bottom up
                fully_shard(m, **kwargs)
        fully_shard(module, **kwargs)
        if on_meta:
            self._materialize(module)
        self.model = module
        return module

    def _make_mesh(self, init_device_mesh: Callable[..., Any]) -> Any:
        """All ranks in one shard group, or (hybrid) a (replicas, shard size) mesh."""
        if not self.sharding_strategy.startswith(("HYBRID", "_HYBRID")):
            return init_device_mesh(self.root_device.type, (self.world_size,))
        shape = self.device_mesh or (self.world_size // self.ctx.local_world_size, self.ctx.local_world_size)
        if shape[0] * shape[1] != self.world_size:
            raise MisconfigurationException(
                f"FSDPStrategy(sharding_strategy={self.sharding_strategy!r}, device_mesh={shape}): the mesh holds "
                f"{shape[0] * shape[1]} ranks but the run has {self.world_size}. Give device_mesh=(replicas, "
                "shard_size) whose product is the number of ranks.")
        return init_device_mesh(self.root_device.type, shape, mesh_dim_names=("replicate", "shard"))

    def _sync_from_rank0(self, module: nn.Module) -> None:
        """Broadcast rank 0's parameters and buffers (before sharding), so every rank shards the same weights."""
        with torch.no_grad():
            for t in _tensors(module):
                work = t.detach() if self._collective_device() == t.device else t.detach().to(
                    self._collective_device())
                dist.broadcast(work, src=0)
                if work is not t:
                    t.detach().copy_(work)

    def _materialize(self, module: nn.Module) -> None:
        """Allocate this rank's shards of meta parameters (and buffers) and initialise them with each submodule's
        ``reset_parameters()``. That runs on whole tensors of one submodule at a time (the same draws on every rank,
        as an unsharded init would make); each rank keeps its shard, so no shard repeats another's values."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        module.to_empty(device=self.root_device)
        with torch.no_grad():
            for m in module.modules():
                reset = getattr(m, "reset_parameters", None)
                if not callable(reset):
                    continue
                sharded = {n: p for n, p in m.named_parameters(recurse=False) if isinstance(p, DTensor)}
                for n, p in sharded.items():
                    m._parameters[n] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=self.root_device),
                                                    requires_grad=p.requires_grad)
                try:
                    reset()
                finally:
                    for n, p in sharded.items():
                        whole = m._parameters[n].detach()
                        p.to_local().copy_(distribute_tensor(whole, p.device_mesh, p.placements,
                                                             src_data_rank=None).to_local())
                        m._parameters[n] = p

    @contextlib.contextmanager
    def no_backward_sync(self, enabled: bool) -> Iterator[None]:
        """Accumulation: gradients stay unsharded and local until the window's last backward reduce-scatters."""
        model = self.model
        if not enabled or not hasattr(model, "set_requires_gradient_sync"):
            yield
            return
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    def teardown(self) -> None:
        """Leave the process group unless this strategy formed it (the module stays sharded)."""
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_process_group = False

    # -- full state (single-file checkpoints) -----------------------------------------------------
    def full_state(self, obj: Any) -> Any:
        """``obj`` (a state dict, nested) with every sharded tensor gathered whole onto the CPU. Collective: every
        rank calls it with the same structure."""
        from torch.distributed.tensor import DTensor

        def gather(value: Any) -> Any:
            if isinstance(value, DTensor):
                return value.full_tensor().cpu()
            if isinstance(value, dict):
                return type(value)((k, gather(v)) for k, v in value.items())
            if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
                return type(value)(gather(v) for v in value)
            return value
        return gather(obj)

    def shard_module_state(self, module: nn.Module, state_dict: dict[str, Any]) -> dict[str, Any]:
        """A full state dict (from a file) cut to this rank's shards of ``module``'s sharded entries."""
        live = module.state_dict()
        return {k: _shard_like(live.get(k), v) for k, v in state_dict.items()}

    def shard_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
        """A full optimizer state dict (ids in param_groups order, as torch saves it) cut to this rank's shards."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        per_param = {}
        for idx, values in state.get("state", {}).items():
            param = params[idx] if isinstance(idx, int) and idx < len(params) else None
            per_param[idx] = {k: _shard_like(param, v) if isinstance(v, (torch.Tensor, ShardSource))
                              and param is not None and tuple(v.shape) == tuple(param.shape) else v
                              for k, v in values.items()}
        return {**state, "state": per_param}

    def checkpoint_group(self) -> Any:
        """A gloo process group kept for asynchronous checkpoint writes (their background thread must not share the
        training collectives' group); None without a process group. Collective the first time: every rank calls
        it."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        if self._checkpoint_group is None:
            self._checkpoint_group = dist.new_group(backend="gloo")
        return self._checkpoint_group

    def checkpoint_layout(self) -> str:
        """What a checkpoint save writes: 'sharded' (a directory every rank writes its shards into,
        raytrainer.checkpoint.sharded) or 'full' (one Lightning-format file, gathered on every rank, written by
        rank 0)."""
        return self.state_dict_type


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def _shard_like(target: Any, value: Any) -> Any:
    """``value`` (a whole tensor, or a snapshot's ShardSource) placed as the sharded ``target`` is; a whole tensor is
    unchanged when ``target`` is not sharded."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(value, ShardSource):
        return value.place_like(target)
    if not isinstance(target, DTensor) or not isinstance(value, torch.Tensor) or isinstance(value, DTensor):
        return value
    return distribute_tensor(value.to(device=target.device, dtype=target.dtype), target.device_mesh,
                             target.placements, src_data_rank=None)
