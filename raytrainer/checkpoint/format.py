"""The checkpoint dict: Lightning 2.x's layout plus our own extras under the ``raytrainer`` key.

Everything inside is tensors and plain Python types, so ``torch.load(path)`` with its default
``weights_only=True`` reads every checkpoint we write; ``dump_checkpoint`` refuses anything else
with an error naming the key.

Where a run is inside its data (the "position") is kept twice: Lightning's loop progress counters
under ``loops`` (so Lightning resumes from our files) and, exactly, under ``raytrainer.position``:
the epoch, the batches already trained in it, and the torch RNG state from which the epoch drew
its data order. A resume rebuilds that order, skips the trained batches and restores every RNG,
so an interrupted run continues bit for bit like one that never stopped.

This module is the layout only: plain values in, the checkpoint dict out, and back. Capturing
those values from a running session and restoring them is ``bridge.py``; finding files ("last",
"best") and rebuilding a module from a file is ``resolve.py``.
"""
from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from raytrainer.utilities import log

# The Lightning release whose checkpoint layout we write (and test reading back with pytorch_lightning).
LIGHTNING_FORMAT_VERSION = "2.6.6"
FORMAT_VERSION = 1
FORMAT_KEYS = ("epoch", "global_step", "pytorch-lightning_version", "state_dict", "loops", "callbacks",
               "optimizer_states", "lr_schedulers", "hparams_name", "hyper_parameters")
# Where save_hyperparameters' values, argument name and type go: (values, name, type) keys, as Lightning's
# LightningModule / LightningDataModule CHECKPOINT_HYPER_PARAMS_KEY/NAME/TYPE (a class may override them).
MODULE_HPARAMS_KEYS = ("hyper_parameters", "hparams_name", "hparams_type")
DATAMODULE_HPARAMS_KEYS = ("datamodule_hyper_parameters", "datamodule_hparams_name", "datamodule_hparams_type")
# Leaves torch.load(weights_only=True) accepts besides tensors and containers.
_PLAIN_LEAVES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


# ---------------------------------------------------------------------------------------------- parts
@dataclass
class Progress:
    """The counters Lightning's loop progress (``loops``) is computed from."""

    current_epoch: int = 0
    global_step: int = 0
    batches_done_in_epoch: int = 0
    total_batches_seen: int = 0
    batches_that_stepped: int = 0
    epoch_done: bool = False
    automatic: bool = True
    accumulate: int = 1
    schedulers: list[tuple[str, int]] = field(default_factory=list)  # (interval, frequency) per scheduler


@dataclass
class TrainingParts:
    """What a full (not weights-only) checkpoint adds: optimizer, scheduler, callback state and our extras."""

    callbacks: dict[str, Any]
    optimizer_states: list[dict[str, Any]]
    lr_schedulers: list[dict[str, Any]]
    scaler: dict[str, Any] | None
    rng: dict[str, Any]
    position: dict[str, Any]          # LoopState.state_dict() plus the sampler seed
    world_size: int
    pending_plateau: dict[str, float]


def build(*, progress: Progress, state_dict: dict[str, Any], hparams_name: str | None,
          hyper_parameters: dict[str, Any], hparams_type: str | None = None,
          training: TrainingParts | None = None,
          datamodule: tuple[str, dict[str, Any] | None, dict[str, Any] | None] | None = None,
          hparams_keys: tuple[str, str, str] = MODULE_HPARAMS_KEYS,
          datamodule_hparams_name: str | None = None,
          datamodule_hparams_keys: tuple[str, str, str] = DATAMODULE_HPARAMS_KEYS) -> dict[str, Any]:
    """The checkpoint dict, in Lightning 2.x's layout, from plain parts (no copies of tensors).

    ``datamodule`` is (its class's qualified name, its hparams, its state_dict); the ``*_keys`` say where
    hyper-parameters go (the classes' CHECKPOINT_HYPER_PARAMS_KEY/NAME/TYPE)."""
    values_key, name_key, type_key = hparams_keys
    ckpt: dict[str, Any] = {
        "epoch": progress.current_epoch,
        "global_step": progress.global_step,
        "pytorch-lightning_version": LIGHTNING_FORMAT_VERSION,
        "state_dict": state_dict,
        "loops": lightning_loops(progress),
        name_key: hparams_name,
        values_key: dict(hyper_parameters),
    }
    if hparams_type:
        ckpt[type_key] = hparams_type
    if training is not None:
        ckpt["callbacks"] = training.callbacks
        ckpt["optimizer_states"] = training.optimizer_states
        ckpt["lr_schedulers"] = training.lr_schedulers
        if training.scaler:
            ckpt["MixedPrecision"] = training.scaler  # Lightning's key for the grad scaler state
        pos = dict(training.position)
        ckpt["raytrainer"] = {
            "format": FORMAT_VERSION,
            "rng": training.rng,
            "position": {k: pos.pop(k, None) for k in ("epoch", "batch_idx", "epoch_start_rng", "sampler_seed",
                                                       "segments", "data")},
            "world_size": training.world_size,
            "grad_scaler": training.scaler,
            **pos,   # batches_that_stepped, total_batches_seen, results
            "pending_plateau": training.pending_plateau,
        }
    if datamodule is not None:
        key, hparams, state = datamodule
        if hparams:
            ckpt[datamodule_hparams_keys[0]] = dict(hparams)
            if datamodule_hparams_name:
                ckpt[datamodule_hparams_keys[1]] = datamodule_hparams_name
        if state:
            ckpt[key] = state  # Lightning's key for datamodule state: the class's qualified name
    return ckpt


def scaler_state(ckpt: dict[str, Any]) -> dict[str, Any] | None:
    """The grad scaler state under our key or either of Lightning's."""
    ours = ckpt.get("raytrainer") or {}
    return ours.get("grad_scaler") or ckpt.get("MixedPrecision") or ckpt.get("native_amp_scaling_state")


@dataclass
class Position:
    """Where a checkpoint resumes: LoopState's dict, the RNG states, and ReduceLROnPlateau steps still due."""

    loop_state: dict[str, Any]
    rng: dict[str, Any] | None
    pending_plateau: dict[str, float]


def read_position(ckpt: dict[str, Any], world_size: int, where: str) -> Position:
    """The resume position of ``ckpt`` for a run of ``world_size`` ranks (ours exactly; Lightning's from
    its loop counters, with a fresh data order since Lightning keeps no RNG that would rebuild it)."""
    ours = ckpt.get("raytrainer")
    global_step = int(ckpt.get("global_step", 0))
    if ours is not None:
        pos = ours["position"]
        epoch, batch_idx = int(pos["epoch"]), int(pos["batch_idx"])
        epoch_rng, rng = pos["epoch_start_rng"], ours["rng"]
        saved_ws = int(ours.get("world_size", world_size))
        segments = pos.get("segments")
        if saved_ws != world_size and batch_idx and segments is None:
            # Each rank saw batch_idx batches of its shard; continue after as many samples, approximately.
            batch_idx = batch_idx * saved_ws // world_size
            epoch_rng = rng = None
            log.warning("%s was written by %d rank(s), this run has %d: resuming at batch %d of epoch %d; the data "
                        "order and RNG streams cannot be continued exactly.", where, saved_ws, world_size,
                        batch_idx, epoch)
        state = {"epoch": epoch, "batch_idx": batch_idx, "epoch_start_rng": epoch_rng, "segments": segments,
                 "data": pos.get("data"),
                 "batches_that_stepped": int(ours.get("batches_that_stepped", global_step)),
                 "total_batches_seen": int(ours.get("total_batches_seen", 0)),
                 "results": ours.get("results") or None}
        return Position(state, rng, dict(ours.get("pending_plateau", {})))
    epoch, batch_idx, stepped = lightning_position(ckpt)
    fit_loop = ckpt.get("loops", {}).get("fit_loop", {})
    state = {"epoch": epoch, "batch_idx": batch_idx, "epoch_start_rng": None, "segments": None,
             "batches_that_stepped": int(stepped if stepped is not None else global_step),
             "total_batches_seen": int(fit_loop.get("epoch_loop.batch_progress", {}).get("total", {})
                                       .get("processed", 0)),
             "results": None}
    return Position(state, None, {})


def reached_limit(ckpt: dict[str, Any], max_epochs: int | None, max_steps: int) -> tuple[str, int, int] | None:
    """(the limit, epochs done, global step) when a fit resumed from ``ckpt`` has nothing left to train because
    max_steps or max_epochs is already reached; None when it trains on."""
    position = read_position(ckpt, int((ckpt.get("raytrainer") or {}).get("world_size", 1)), "")
    step, epochs = int(ckpt.get("global_step", 0)), int(position.loop_state["epoch"])
    if max_steps != -1 and step >= max_steps:
        return f"max_steps={max_steps}", epochs, step
    if max_epochs is not None and max_epochs != -1 and epochs >= max_epochs:
        return f"max_epochs={max_epochs}", epochs, step
    return None


def _progress(total: dict[str, int], current: dict[str, int]) -> dict[str, dict[str, int]]:
    return {"total": dict(total), "current": dict(current)}


def _counts(keys: tuple[str, ...], value: int, completed: int | None = None) -> dict[str, int]:
    out = {k: value for k in keys}
    if completed is not None and "completed" in out:
        out["completed"] = completed
    return out


def lightning_loops(p: Progress) -> dict[str, Any]:
    """Lightning's loop progress counters, shaped as Lightning writes them at the same point of a run.

    Three points exist: inside an epoch after a finished batch (``mid``), at the end of an epoch
    (``on_train_epoch_end``) and between epochs (before the first batch, or after fit).
    """
    e = p.current_epoch
    b = p.batches_done_in_epoch
    total = p.total_batches_seen
    epoch_done = p.epoch_done
    mid = not epoch_done and b > 0
    automatic = p.automatic
    acc = max(p.accumulate, 1)
    steps_in_epoch = (math.ceil(b / acc) if automatic else b) if (mid or epoch_done) else 0
    four = ("ready", "started", "processed", "completed")

    if mid:    # as Lightning at on_train_batch_end: the batch is processed, not yet "completed"
        batch_progress = _progress(_counts(four, total, total - 1), _counts(four, b, b - 1))
        epoch_progress = _progress(_counts(four, e + 1, e), _counts(four, e + 1, e))
        for part in epoch_progress.values():
            part["processed"] = e
    elif epoch_done:  # as Lightning at on_train_epoch_end
        batch_progress = _progress(_counts(four, total), _counts(four, b))
        epoch_progress = _progress(_counts(four, e + 1, e), _counts(four, e + 1, e))
    else:      # between epochs
        batch_progress = _progress(_counts(four, total), _counts(four, 0))
        epoch_progress = _progress(_counts(four, e), _counts(four, e))
    batch_progress["is_last_batch"] = bool(epoch_done)

    steps = p.global_step
    sched_total = sched_current = 0
    for interval, frequency in p.schedulers:
        if interval == "step":
            sched_total += steps // frequency
            sched_current += steps_in_epoch // frequency
        else:
            stepped = e + int(epoch_done)
            sched_total += stepped // frequency
            sched_current += int(epoch_done and stepped % frequency == 0)
    auto_steps, auto_current = (steps, steps_in_epoch) if automatic else (0, 0)
    manual_steps, manual_current = (0, 0) if automatic else (steps, steps_in_epoch)
    stepped_batches = p.batches_that_stepped - (1 if mid and p.batches_that_stepped else 0)
    eval_progress = {**_progress(_counts(four, 0), _counts(four, 0)), "is_last_batch": False}
    return {
        "fit_loop": {
            "state_dict": {},
            "epoch_loop.state_dict": {"_batches_that_stepped": stepped_batches},
            "epoch_loop.batch_progress": batch_progress,
            "epoch_loop.scheduler_progress": _progress(_counts(("ready", "completed"), sched_total),
                                                       _counts(("ready", "completed"), sched_current)),
            "epoch_loop.automatic_optimization.state_dict": {},
            "epoch_loop.automatic_optimization.optim_progress": {"optimizer": {
                "step": _progress(_counts(("ready", "completed"), auto_steps),
                                  _counts(("ready", "completed"), auto_current)),
                "zero_grad": _progress(_counts(("ready", "started", "completed"), auto_steps),
                                       _counts(("ready", "started", "completed"), auto_current))}},
            "epoch_loop.manual_optimization.state_dict": {},
            "epoch_loop.manual_optimization.optim_step_progress":
                _progress(_counts(("ready", "completed"), manual_steps),
                          _counts(("ready", "completed"), manual_current)),
            "epoch_loop.val_loop.state_dict": {},
            "epoch_loop.val_loop.batch_progress": dict(eval_progress),
            "epoch_progress": epoch_progress,
        },
        "validate_loop": {"state_dict": {}, "batch_progress": dict(eval_progress)},
        "test_loop": {"state_dict": {}, "batch_progress": dict(eval_progress)},
        "predict_loop": {"state_dict": {}, "batch_progress": _progress(_counts(four, 0), _counts(four, 0))},
    }


def _first_unloadable(obj: Any) -> tuple[list[Any], str] | None:
    """(key path, problem) of the first value torch.load(weights_only=True) would refuse, or None."""
    if isinstance(obj, (torch.Tensor, *_PLAIN_LEAVES)):
        return None
    if type(obj) in (dict, collections.OrderedDict):
        for k, v in obj.items():
            if not isinstance(k, _PLAIN_LEAVES):
                return [], f"has a key of type {type(k).__name__} ({k!r})"
            if isinstance(v, (torch.Tensor, *_PLAIN_LEAVES)):
                continue
            found = _first_unloadable(v)
            if found is not None:
                return [k, *found[0]], found[1]
        return None
    if type(obj) in (list, tuple, set):
        for i, v in enumerate(obj):
            if isinstance(v, (torch.Tensor, *_PLAIN_LEAVES)):
                continue
            found = _first_unloadable(v)
            if found is not None:
                return [i, *found[0]], found[1]
        return None
    return [], f"is a {type(obj).__module__}.{type(obj).__qualname__}"


def check_loadable(obj: Any, where: str = "checkpoint") -> None:
    """Raise TypeError naming the key of the first value ``torch.load(weights_only=True)`` would refuse."""
    found = _first_unloadable(obj)
    if found is None:
        return
    path, problem = found
    raise TypeError(f"{where}{''.join(f'[{k!r}]' for k in path)} {problem}; checkpoints hold only tensors and plain "
                    "Python types (numbers, str, None, lists/tuples/dicts of them) so that "
                    "torch.load(weights_only=True) can read them. Store it as plain data instead (e.g. a dict of "
                    "its fields) and rebuild it when loading.")


def lightning_position(ckpt: dict[str, Any]) -> tuple[int, int, int | None]:
    """(epoch, batches done in it, batches that stepped) from a checkpoint Lightning wrote."""
    fit_loop = ckpt.get("loops", {}).get("fit_loop", {})
    ep = fit_loop.get("epoch_progress", {}).get("current", {})
    bp = fit_loop.get("epoch_loop.batch_progress", {}).get("current", {})
    processed = int(ep.get("processed", ckpt.get("epoch", 0)))
    started = int(ep.get("started", processed))
    mid_epoch = started > processed  # saved inside an epoch (on_train_batch_end) rather than at its end
    batch_idx = int(bp.get("processed", 0)) if mid_epoch else 0
    stepped = fit_loop.get("epoch_loop.state_dict", {}).get("_batches_that_stepped")
    if stepped is not None and mid_epoch and bp.get("completed", 0) < bp.get("processed", 0):
        stepped += 1  # Lightning counts the batch of a batch-end checkpoint only after the save
    return processed, batch_idx, stepped
