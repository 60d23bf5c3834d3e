"""Small helpers shared across the package: seeding, hparams containers, logging."""
from __future__ import annotations

import os
import random
import sys
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from raytrainer.utilities.combined_loader import CombinedLoader  # noqa: F401  (Lightning exports it here)
from raytrainer.utilities.console import log  # noqa: F401  (the "raytrainer" logger, at RAYTRAINER_LOG's level)


def env_number(name: str, default: float, meaning: str) -> float:
    """The finite number >= 0 in environment variable ``name`` (``default`` when unset or empty); anything else is a
    ValueError that names the variable, its value and ``meaning`` (what to put there)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return float(default)
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value >= 0 and np.isfinite(value)):
        raise ValueError(f"{name}={text!r} is not {meaning}")
    return value


class AttributeDict(dict):
    """A dict whose keys are also attributes (``self.hparams.lr``)."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"hparams has no '{key}'; it holds {sorted(self)}") from None

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value


PLAIN_TYPES = (bool, int, float, str, type(None))


def check_plain_hparams(values: dict[str, Any], owner: str) -> None:
    """Refuse hyper-parameters that a weights_only torch.load could not read back."""
    def ok(v: Any) -> bool:
        if isinstance(v, PLAIN_TYPES):
            return True
        if isinstance(v, (list, tuple)):
            return all(ok(x) for x in v)
        if isinstance(v, dict):
            return all(isinstance(k, (str, int)) and ok(x) for k, x in v.items())
        return False

    for k, v in values.items():
        if not ok(v):
            raise TypeError(
                f"{owner}.save_hyperparameters: argument {k!r} is a {type(v).__name__}, but checkpoints keep "
                "only plain types (bool, int, float, str, None and lists/tuples/dicts of them) so that "
                f"torch.load(weights_only=True) can read them. Pass ignore=[{k!r}] and rebuild it from "
                "plain arguments, or convert it (e.g. a config object to a dict).")


def seed_everything(seed: int | None = None, workers: bool = False) -> int:
    """Seed python, numpy and torch (all devices); with workers=True, DataLoader workers too."""
    if seed is None:
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    seed = int(seed)
    if not (np.iinfo(np.uint32).min <= seed <= np.iinfo(np.uint32).max):
        raise ValueError(f"seed_everything({seed}): the seed must fit in 32 bits (0 .. 4294967295).")
    os.environ["PL_GLOBAL_SEED"] = str(seed)
    os.environ["PL_SEED_WORKERS"] = str(int(workers))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return seed


def worker_init_fn(worker_id: int) -> None:
    """Seed numpy and python in a DataLoader worker from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def rng_states(plain: bool = True) -> dict[str, Any]:
    """Capture python, numpy, torch (and CUDA) RNG states.

    ``plain`` (for files): lists and tensors that ``torch.load(weights_only=True)`` reads. Without it
    (in-memory snapshots, taken every step) the states stay as Python and numpy return them, uncopied.
    """
    np_state = np.random.get_state() if plain else _NUMPY_STATE.get()
    python = random.getstate()
    states: dict[str, Any] = {"python": python, "numpy": np_state, "torch": torch.get_rng_state()}
    if plain:
        version, internal, gauss = python
        states["python"] = [version, list(internal), gauss]
        # int64, not uint32: pickling a uint32 tensor fails in torch (Ray ships these states to ranks)
        states["numpy"] = [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                           int(np_state[3]), float(np_state[4])]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


class _NumpyStateCache:
    """numpy's global RNG state, read cheaply when it has not moved since the last read.

    ``np.random.get_state()`` copies the 624-word Mersenne Twister key in a Python-level loop (about
    50 us), too slow for a snapshot every step. The raw generator state (key and position) is read
    through numpy's public ctypes view of the bit generator instead (well under a microsecond); if it
    is unchanged and no cached Gaussian was pending, the previous state is still exact: only a draw,
    which moves the generator, can set the cached Gaussian. The layout is checked against
    ``get_state()`` once; if it does not match, every read takes the slow path.
    """

    _RAW_BYTES = 624 * 4 + 4  # uint32 key[624]; int pos

    def __init__(self) -> None:
        self._raw: bytes | None = None
        self._state: Any = None
        self._usable: bool | None = None

    def _read_raw(self) -> bytes:
        import ctypes

        return ctypes.string_at(np.random.mtrand._rand._bit_generator.ctypes.state_address, self._RAW_BYTES)

    def get(self) -> Any:
        if self._usable is None:
            try:
                raw, state = self._read_raw(), np.random.get_state()
                self._usable = state[0] == "MT19937" and raw[:-4] == state[1].astype("<u4").tobytes() and \
                    int.from_bytes(raw[-4:], sys.byteorder, signed=True) == state[2]
            except Exception:  # noqa: BLE001 - another numpy: always read the state the slow way
                self._usable = False
        if not self._usable:
            return np.random.get_state()
        raw = self._read_raw()
        if raw != self._raw or self._state is None or self._state[3]:
            self._state, self._raw = np.random.get_state(), raw
        return self._state


_NUMPY_STATE = _NumpyStateCache()


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what rng_states captured."""
    if "python" in states:
        v, internal, gauss = states["python"]
        random.setstate((v, tuple(internal), gauss))
    if "numpy" in states:
        name, keys, pos, has_gauss, cached = states["numpy"]
        keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
        np.random.set_state((name, keys.astype(np.uint32), pos, has_gauss, cached))
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])



def closest(name: str, options: list[str]) -> str | None:
    """The most similar valid name, for 'did you mean' messages."""
    import difflib

    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return match[0] if match else None


def clip_gradients(optimizer: Any, clip_val: float | None, algorithm: str | None, precision: Any) -> None:
    """Clip one optimizer's gradients in place (unscaling first under 16-mixed)."""
    if clip_val is None or clip_val == 0:
        return
    optimizer = getattr(optimizer, "optimizer", optimizer)
    algorithm = algorithm or "norm"
    if algorithm not in ("norm", "value"):
        raise ValueError(f"gradient_clip_algorithm={algorithm!r}: use 'norm' or 'value'.")
    if clip_val < 0:
        raise ValueError(f"gradient_clip_val={clip_val}: must be >= 0.")
    if precision is not None:
        precision.unscale_gradients(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not params:
        return
    if algorithm == "norm":
        torch.nn.utils.clip_grad_norm_(params, clip_val)
    else:
        torch.nn.utils.clip_grad_value_(params, clip_val)


def apply_to_tensors(data: Any, fn: Callable[[Any], Any], leaf: Callable[[Any], Any] | None = None) -> Any:
    """``fn`` applied to every tensor in nested dicts, lists, tuples and namedtuples, keeping their types.

    ``leaf`` turns other values into tensors first (numbers, arrays); without it they are returned unchanged."""
    if isinstance(data, torch.Tensor):
        return fn(data)
    if isinstance(data, Mapping):
        items = [(k, apply_to_tensors(v, fn, leaf)) for k, v in data.items()]
        try:
            return type(data)(items)
        except TypeError:  # a mapping type that cannot be built from pairs
            return dict(items)
    if isinstance(data, (list, tuple)):
        items = [apply_to_tensors(d, fn, leaf) for d in data]
        if hasattr(data, "_fields"):  # namedtuple
            return type(data)(*items)
        return type(data)(items) if isinstance(data, tuple) else items
    if leaf is not None:
        value = leaf(data)
        return fn(value) if isinstance(value, torch.Tensor) else value
    return data


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Every tensor of a (nested) batch on ``device``; non-blocking copies to CUDA."""
    non_blocking = device.type == "cuda"
    return apply_to_tensors(batch, lambda t: t.to(device, non_blocking=non_blocking))
