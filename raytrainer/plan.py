"""Resolve Lightning 1.x and 2.x Trainer arguments into one inspectable Plan.

Everything here is pure: it looks at the arguments and at an ``Env`` description of the machine,
never at the hardware itself, so every combination can be unit-tested on a laptop. The hardware
check is a separate step (``Plan.check_hardware``) that the Trainer runs before any work starts.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from raytrainer.utilities.exceptions import MisconfigurationException

PRECISIONS = {
    "32": "32-true", "32-true": "32-true", "32-TRUE": "32-true",
    "16": "16-mixed", "16-mixed": "16-mixed",
    "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed",
    "16-true": "16-true", "bf16-true": "bf16-true",
    "64": "64-true", "64-true": "64-true",
}
# Lightning's DDP names: how the processes start differs there; on raytrainer Ray starts the ranks for all of them.
DDP_STRATEGIES = {f"{base}{suffix}": unused
                  for base in ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")
                  for suffix, unused in (("", None), ("_find_unused_parameters_true", True),
                                         ("_find_unused_parameters_false", False))}
FSDP_STRATEGIES = ("fsdp", "fsdp_cpu_offload")  # sharded data parallel (FSDP2), always on Ray ranks
STRATEGIES = {"auto", "single_device", "ray", "ray_ddp", "xla", "xla_debug", "single_xla", *DDP_STRATEGIES,
              *FSDP_STRATEGIES}
UNSUPPORTED_STRATEGIES = {
    **{name: "DeepSpeed is not supported by raytrainer" for name in (
        "deepspeed", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_2_offload", "deepspeed_stage_3",
        "deepspeed_stage_3_offload", "deepspeed_stage_3_offload_nvme")},
    "single_tpu": "Lightning's legacy name; use strategy='single_xla'",
}
ACCELERATORS = {"auto": "auto", "cpu": "cpu", "gpu": "cuda", "cuda": "cuda", "tpu": "tpu"}


@dataclass(frozen=True)
class Env:
    """What the machine offers; ``Env.detect()`` reads it, tests build it by hand."""

    cuda_device_count: int = 0
    xla_installed: bool = False

    @staticmethod
    def detect() -> Env:
        import torch

        cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return Env(cuda_device_count=cuda,
                   xla_installed=importlib.util.find_spec("torch_xla") is not None)


@dataclass(frozen=True)
class Plan:
    """Where and how a run executes: the single answer every later part reads.

    ``ranks_per_node`` ranks run on each of ``num_nodes`` nodes. An elastic run has
    ``min_ranks < max_ranks``; ``nodes_elastic`` says whether the range counts whole nodes.
    """

    accelerator: str = "cpu"                 # cpu | cuda | tpu
    device_ids: tuple[int, ...] | None = None  # per node; None for cpu, () for "all visible"
    ranks_per_node: int = 1
    num_nodes: int = 1
    min_ranks: int = 1
    max_ranks: int = 1
    nodes_elastic: bool = False
    precision: str = "32-true"
    strategy: str = "auto"
    launcher: str = "in_process"             # in_process | xla | ray
    requested: dict[str, Any] = field(default_factory=dict)
    # the user's strategy object (raytrainer.strategies.DDPStrategy(...)), which carries its settings to the ranks
    strategy_object: Any = field(default=None, compare=False, repr=False)

    @property
    def find_unused_parameters(self) -> bool | None:
        """What a strategy name says about DDP's find_unused_parameters (None: it says nothing)."""
        return DDP_STRATEGIES.get(self.strategy)

    @property
    def world_size(self) -> int:
        """Ranks at the start of the run (the maximum the plan asks for)."""
        return self.max_ranks

    @property
    def elastic(self) -> bool:
        return self.min_ranks != self.max_ranks

    def describe(self) -> str:
        ids = "" if self.device_ids is None else f" ids={list(self.device_ids)}"
        rng = f" (elastic {self.min_ranks}:{self.max_ranks})" if self.elastic else ""
        return (f"{self.world_size} rank(s){rng} = {self.num_nodes} node(s) x {self.ranks_per_node}"
                f" on {self.accelerator}{ids}, precision={self.precision}, launcher={self.launcher}")

    def check_hardware(self, env: Env) -> None:
        """Raise before any work when this machine cannot run the plan, saying what to change."""
        asked = ", ".join(f"{k}={v!r}" for k, v in self.requested.items()) or "the defaults"
        if self.accelerator == "cuda":
            if env.cuda_device_count == 0:
                raise RuntimeError(
                    f"{asked} asks for CUDA but torch.cuda.is_available() is False: this torch build or"
                    " machine has no GPU. Install a CUDA build of torch on a GPU machine, or drop the GPU"
                    " arguments to train on CPU.")
            if self.launcher != "ray" or self.num_nodes == 1:
                ids = self.device_ids or tuple(range(self.ranks_per_node))
                missing = [i for i in ids if i >= env.cuda_device_count]
                if missing:
                    raise RuntimeError(
                        f"{asked} asks for CUDA device(s) {missing} but only {env.cuda_device_count} "
                        f"GPU(s) are visible (ids 0..{env.cuda_device_count - 1}). Ask for fewer GPUs.")
        if self.accelerator == "tpu" and not env.xla_installed:
            raise RuntimeError(
                f"{asked} asks for TPU cores but torch_xla is not installed. Install it with "
                "`pip install \"raytrainer[tpu]\"` (torch_xla must match your torch version).")
        if self.precision == "16-mixed" and self.accelerator == "cpu":
            raise MisconfigurationException(
                               "precision='16-mixed' (precision=16) needs a CUDA GPU: float16 autocast with a "
                               "GradScaler is a GPU feature. On CPU use precision='bf16-mixed' or '32-true'.")

    @staticmethod
    def from_args(
        *,
        accelerator: str | None = "auto",
        devices: Any = "auto",
        strategy: Any = "auto",
        num_nodes: Any = 1,
        precision: Any = "32-true",
        num_processes: Any = None,
        gpus: Any = None,
        tpu_cores: Any = None,
        env: Env | None = None,
    ) -> Plan:
        """Turn Trainer arguments of either Lightning generation into a Plan, or raise ValueError."""
        env = env if env is not None else Env()
        requested = {k: v for k, v in dict(
            accelerator=accelerator, devices=devices, strategy=strategy, num_nodes=num_nodes,
            precision=precision, num_processes=num_processes, gpus=gpus, tpu_cores=tpu_cores,
        ).items() if v is not None and not (v == "auto" or (k == "num_nodes" and v == 1)
                                            or (k == "precision" and v == "32-true"))}
        strategy_object = None
        if strategy is not None and not isinstance(strategy, str):
            strategy_object, strategy = strategy, _strategy_object_name(strategy)
            accelerator, devices = _devices_of_strategy(strategy_object, strategy, accelerator, devices)
        strategy = "auto" if strategy is None else str(strategy).lower()
        if strategy in UNSUPPORTED_STRATEGIES:
            raise MisconfigurationException(
                f"strategy={strategy!r} is not supported: {UNSUPPORTED_STRATEGIES[strategy]}. "
                "raytrainer runs 'ddp' (and its Lightning aliases) on Ray, and 'xla' on TPUs.")
        if strategy not in STRATEGIES:
            raise MisconfigurationException(
                f"strategy={strategy!r} is not known. Use one of {sorted(STRATEGIES)}, or a strategy "
                "object from raytrainer.strategies (DDPStrategy(...), SingleDeviceStrategy(...)).")
        acc_in = "auto" if accelerator is None else str(accelerator).lower()
        if acc_in not in ACCELERATORS:
            raise MisconfigurationException(
                f"accelerator={accelerator!r} is not known. Use one of {sorted(ACCELERATORS)}.")
        acc = ACCELERATORS[acc_in]
        if strategy in ("xla_debug", "single_xla"):
            _require(acc in ("auto", "tpu"), f"strategy={strategy!r} needs accelerator='tpu' (or tpu_cores=N).")
            acc = "tpu"

        legacy = {k: v for k, v in (("gpus", gpus), ("tpu_cores", tpu_cores),
                                    ("num_processes", num_processes)) if _given(v)}
        if len(legacy) > 1:
            raise MisconfigurationException(
                f"{' and '.join(f'{k}={v!r}' for k, v in legacy.items())} conflict: each picks "
                "a different device type. Pass only one of gpus, tpu_cores, num_processes.")
        if legacy and devices not in ("auto", None):
            (k, v), = legacy.items()
            raise MisconfigurationException(f"{k}={v!r} and devices={devices!r} both set the device count. Use "
                                            f"accelerator=... with devices=... (Lightning 2.x) or {k} alone (1.x).")
        prec = _resolve_precision(precision)

        count: Any
        ids: tuple[int, ...] | None = None
        if "gpus" in legacy:
            _require(acc in ("auto", "cuda"), f"gpus={gpus!r} conflicts with accelerator={accelerator!r}.")
            acc = "cuda"
            count, ids = _parse_gpus(gpus, env, "gpus")
        elif "tpu_cores" in legacy:
            _require(acc in ("auto", "tpu"), f"tpu_cores={tpu_cores!r} conflicts with accelerator={accelerator!r}.")
            acc = "tpu"
            count, ids = _parse_tpu(tpu_cores)
        elif num_processes is not None and _strict_int(num_processes) == 0:
            raise MisconfigurationException("num_processes=0 asks for no process at all: use num_processes=1 (this "
                                            "process) or more (Ray actors), or leave it out.")
        elif "num_processes" in legacy:
            _require(acc in ("auto", "cpu"),
                     f"num_processes={num_processes!r} means CPU processes but accelerator={accelerator!r}; "
                     "use devices=... with that accelerator instead.")
            acc = "cpu"
            count = _parse_count(num_processes, "num_processes")
        else:
            if acc == "auto":
                # gpus=0 / "0" / [] is Lightning 1.x for "no GPU": train on CPU even where CUDA is present
                acc = "cuda" if env.cuda_device_count and gpus is None else "cpu"
            if acc == "cuda":
                count, ids = _parse_gpus(1 if devices in ("auto", None) else devices, env, "devices")
            elif acc == "tpu":
                count, ids = _parse_tpu(1 if devices in ("auto", None) else devices)
            else:
                count = 1 if devices in ("auto", None) else _parse_count(devices, "devices")

        nodes = _parse_count(num_nodes, "num_nodes")
        if isinstance(nodes, tuple) and isinstance(count, tuple):
            raise MisconfigurationException(f"num_nodes={num_nodes!r} and a per-node range {count} are both elastic; "
                                            "give the range on one of them only.")
        nodes_elastic = isinstance(nodes, tuple)
        if isinstance(count, tuple):
            min_r, max_r = count
            per_node = max_r
            n_nodes = 1
            _require(nodes == 1, "an elastic rank range (MIN:MAX ranks) cannot be combined with "
                     f"num_nodes={num_nodes!r}; use num_nodes='MIN:MAX' for whole-node elasticity.")
        elif nodes_elastic:
            per_node = count
            min_r, max_r = nodes[0] * count, nodes[1] * count
            n_nodes = nodes[1]
        else:
            per_node = count
            n_nodes = nodes
            min_r = max_r = nodes * count

        if acc == "tpu" and (n_nodes > 1 or nodes_elastic or min_r != max_r):
            raise MisconfigurationException("TPU runs use torch_xla's own launcher on one host: num_nodes and elastic "
                                            "ranges are not supported with tpu_cores/accelerator='tpu'.")
        if acc == "tpu":
            launcher = "xla"
        elif max_r > 1 or n_nodes > 1 or strategy in ("ray", "ray_ddp", *FSDP_STRATEGIES) or min_r != max_r:
            launcher = "ray"
        else:
            launcher = "in_process"
        if strategy == "xla" and acc != "tpu":
            raise MisconfigurationException("strategy='xla' needs accelerator='tpu' (or tpu_cores=N).")
        if strategy in ("single_device", "single_xla") and (max_r > 1 or n_nodes > 1):
            raise MisconfigurationException(
                f"strategy={strategy!r} runs one device, but the arguments ask for {max_r} rank(s) on "
                f"{n_nodes} node(s). Use strategy='ddp' (or DDPStrategy(...)) for several devices.")
        if strategy in FSDP_STRATEGIES and prec == "16-mixed":
            raise MisconfigurationException(
                "precision='16-mixed' with FSDP is not supported by raytrainer yet: the gradient scaler's inf/nan "
                "check is not agreed across the shards. Use precision='bf16-mixed' (or 'bf16-true').")
        if strategy in FSDP_STRATEGIES and acc == "tpu":
            raise MisconfigurationException(f"strategy={strategy!r} (FSDP) runs on CPUs and CUDA GPUs; TPUs run "
                                            "strategy='xla'.")
        if DDP_STRATEGIES.get(strategy) is not None and acc == "tpu":
            raise MisconfigurationException(f"strategy={strategy!r} is a DDP strategy; TPUs run strategy='xla'.")
        return Plan(accelerator=acc, device_ids=ids, ranks_per_node=per_node, num_nodes=n_nodes,
                    min_ranks=min_r, max_ranks=max_r, nodes_elastic=nodes_elastic, precision=prec,
                    strategy=strategy, launcher=launcher, requested=requested, strategy_object=strategy_object)


def _strict_int(value: Any) -> int | None:
    """An int, a whole float (2.0) or a string of digits as an int; None for anything else (2.5, True, "x"): a count
    is never silently truncated."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def _given(v: Any) -> bool:
    return v is not None and v != 0 and v != "0" and v != [] and v != ""


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise MisconfigurationException(message)


def _resolve_precision(precision: Any) -> str:
    if precision is None:  # Lightning 2.x's default: full precision unless a plugin says otherwise
        return "32-true"
    key = str(precision).strip()
    if key.endswith(".0"):
        key = key[:-2]
    if key.startswith("transformer-engine"):
        raise MisconfigurationException(
            f"precision={precision!r} needs NVIDIA Transformer Engine (FP8 layers), which raytrainer "
            "does not support. Use 'bf16-mixed' or 'bf16-true' on GPUs that have FP8, or '16-mixed'.")
    if key not in PRECISIONS:
        raise MisconfigurationException(
            f"precision={precision!r} is not supported. Use one of 32 / '32-true', "
            "16 / '16-mixed' (CUDA), 'bf16' / 'bf16-mixed', '16-true', 'bf16-true', 64 / '64-true'.")
    return PRECISIONS[key]


def _strategy_object_name(strategy: Any) -> str:
    """The registry name of a raytrainer strategy object; a clear error for anything else."""
    name = getattr(strategy, "strategy_name", None)
    module = type(strategy).__module__
    if module.startswith(("pytorch_lightning", "lightning")):
        raise MisconfigurationException(
            f"strategy={type(strategy).__name__}(...) is pytorch_lightning's class. Use raytrainer's "
            f"class of the same name (from raytrainer.strategies import {type(strategy).__name__}).")
    if not isinstance(name, str) or (name not in STRATEGIES and name not in UNSUPPORTED_STRATEGIES):
        raise MisconfigurationException(
            f"strategy={strategy!r} is neither a strategy name nor a raytrainer strategy object. Use "
            "a name such as 'ddp' or an object from raytrainer.strategies (DDPStrategy(...)).")
    return name


def _devices_of_strategy(strategy: Any, name: str, accelerator: Any, devices: Any) -> tuple[Any, Any]:
    """A SingleDeviceStrategy(device) object picks the accelerator and device, as in Lightning."""
    if name != "single_device":
        return accelerator, devices
    device = strategy.root_device
    acc = "cuda" if device.type == "cuda" else "cpu"
    if accelerator not in (None, "auto") and ACCELERATORS.get(str(accelerator).lower()) != acc:
        raise MisconfigurationException(f"strategy=SingleDeviceStrategy({str(device)!r}) runs on {acc}, but "
                                        f"accelerator={accelerator!r}; give one of them only.")
    if devices not in ("auto", None, 1, "1", [device.index]) and acc == "cpu" or \
            acc == "cuda" and devices not in ("auto", None, 1, "1", [device.index or 0]):
        raise MisconfigurationException(
            f"strategy=SingleDeviceStrategy({str(device)!r}) runs one device, but devices={devices!r}."
            " Drop devices=..., or use DDPStrategy(...) for several.")
    return acc, ([device.index or 0] if acc == "cuda" else 1)


def parse_range(value: Any, name: str) -> tuple[int, int] | None:
    """Parse ``"MIN:MAX"`` or ``(min, max)`` into a tuple; return None for a plain count."""
    if isinstance(value, str) and ":" in value:
        lo, _, hi = value.partition(":")
        try:
            pair = (int(lo), int(hi))
        except ValueError:
            raise MisconfigurationException(
                f"{name}={value!r}: a range must look like 'MIN:MAX' with integers, e.g. '1:4'.") \
                from None
    elif isinstance(value, tuple) and len(value) == 2:
        pair = (int(value[0]), int(value[1]))
    else:
        return None
    if not 1 <= pair[0] <= pair[1]:
        raise MisconfigurationException(f"{name}={value!r}: need 1 <= MIN <= MAX.")
    return pair if pair[0] != pair[1] else None or pair


def _parse_count(value: Any, name: str) -> int | tuple[int, int]:
    rng = parse_range(value, name)
    if rng is not None:
        return rng if rng[0] != rng[1] else rng[0]
    n = _strict_int(value)
    if n is None:
        raise MisconfigurationException(f"{name}={value!r} must be a positive integer or a 'MIN:MAX' range.")
    if n < 1:
        raise MisconfigurationException(f"{name}={value!r} must be at least 1.")
    return n


def _parse_gpus(value: Any, env: Env, name: str) -> tuple[int | tuple[int, int], tuple[int, ...] | None]:
    """gpus/devices for CUDA: int, -1 (all), list of ids, '1,3' strings, or a 'MIN:MAX' range."""
    if isinstance(value, str):
        s = value.strip()
        if ":" in s:
            return _parse_count(s, name), None
        if "," in s:
            value = [int(x) for x in s.split(",") if x.strip()]
        else:
            try:
                value = int(s)
            except ValueError:
                raise MisconfigurationException(
                    f"{name}={value!r}: expected an int, -1, a list of ids or '1,3'.") from None
    if isinstance(value, tuple) and len(value) == 2 and name == "devices":
        return _parse_count(value, name), None
    if isinstance(value, (list, tuple)):
        ids = tuple(int(i) for i in value)
        if not ids or len(set(ids)) != len(ids) or min(ids) < 0:
            raise MisconfigurationException(f"{name}={value!r}: device ids must be distinct non-negative integers.")
        return len(ids), ids
    n = int(value)
    if n == -1:
        if env.cuda_device_count == 0:
            raise MisconfigurationException(f"{name}=-1 asks for every GPU but none is visible "
                                            "(torch.cuda.is_available() is False).")
        n = env.cuda_device_count
    if n < 1:
        raise MisconfigurationException(f"{name}={value!r} must be at least 1 (or -1 for all GPUs).")
    return n, tuple(range(n))


def _parse_tpu(value: Any) -> tuple[int, tuple[int, ...] | None]:
    if isinstance(value, (list, tuple)):
        ids = tuple(int(i) for i in value)
        if len(ids) != 1:
            raise MisconfigurationException(
                f"tpu_cores={value!r}: a list selects one core, e.g. [5]; use an int for many.")
        return 1, ids
    if parse_range(value, "tpu_cores") is not None:
        return _parse_count(value, "tpu_cores"), None  # rejected below with the TPU launcher's reason
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise MisconfigurationException(
            f"tpu_cores={value!r} must be a positive integer (or a list with one core id).") from None
    if n < 1:
        raise MisconfigurationException(f"tpu_cores={value!r} must be at least 1.")
    return n, None


def as_sequence(value: Any) -> Sequence[Any]:
    """Wrap a single item in a list; leave lists and tuples alone."""
    if value is None:
        return []
    return value if isinstance(value, (list, tuple)) else [value]
