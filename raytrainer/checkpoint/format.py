"""The checkpoint dict: Lightning 2.x's layout plus our own extras under the ``raytrainer`` key.

Everything inside is tensors and plain Python types, so ``torch.load(path)`` with its default
``weights_only=True`` reads every checkpoint we write.
"""
from __future__ import annotations

import inspect
import os
from typing import TYPE_CHECKING, Any

import torch

from raytrainer.utilities import log, rng_states

if TYPE_CHECKING:
    from raytrainer.module import LightningModule
    from raytrainer.trainer.trainer import Trainer

# The Lightning release whose checkpoint layout we write (and test reading back with pytorch_lightning).
LIGHTNING_FORMAT_VERSION = "2.6.6"
FORMAT_KEYS = ("epoch", "global_step", "pytorch-lightning_version", "state_dict", "loops", "callbacks",
               "optimizer_states", "lr_schedulers", "hparams_name", "hyper_parameters")


def _progress(total: int, current: int, keys: tuple[str, ...]) -> dict[str, dict[str, int]]:
    return {"total": {k: total for k in keys}, "current": {k: current for k in keys}}


def _loops_state(trainer: "Trainer", epoch_done: bool) -> dict[str, Any]:
    """Lightning's loop progress counters, filled from our trainer state."""
    e = trainer.current_epoch
    done_in_epoch = trainer._batches_done_in_epoch
    total_batches = trainer._total_batches_seen
    steps = trainer.global_step
    automatic = trainer.lightning_module is None or trainer.lightning_module.automatic_optimization
    four = ("ready", "started", "processed", "completed")
    epoch_progress = {"total": {"ready": e + 1, "started": e + 1, "processed": e + int(epoch_done),
                                "completed": e},
                      "current": {"ready": e + 1, "started": e + 1, "processed": e + int(epoch_done),
                                  "completed": e}}
    batch_progress = _progress(total_batches, done_in_epoch, four)
    batch_progress["is_last_batch"] = bool(epoch_done)
    auto_steps = steps if automatic else 0
    eval_loop = {"state_dict": {}, "batch_progress": {**_progress(0, 0, four), "is_last_batch": False}}
    return {
        "fit_loop": {
            "state_dict": {},
            "epoch_loop.state_dict": {"_batches_that_stepped": trainer._batches_that_stepped},
            "epoch_loop.batch_progress": batch_progress,
            "epoch_loop.scheduler_progress": _progress(0, 0, ("ready", "completed")),
            "epoch_loop.automatic_optimization.state_dict": {},
            "epoch_loop.automatic_optimization.optim_progress": {"optimizer": {
                "step": _progress(auto_steps, 0, ("ready", "completed")),
                "zero_grad": _progress(auto_steps, 0, ("ready", "started", "completed"))}},
            "epoch_loop.manual_optimization.state_dict": {},
            "epoch_loop.manual_optimization.optim_step_progress":
                _progress(0 if automatic else steps, 0, ("ready", "completed")),
            "epoch_loop.val_loop.state_dict": {},
            "epoch_loop.val_loop.batch_progress": {**_progress(0, 0, four), "is_last_batch": False},
            "epoch_progress": epoch_progress,
        },
        "validate_loop": eval_loop,
        "test_loop": eval_loop,
        "predict_loop": {"state_dict": {}, "batch_progress": _progress(0, 0, four)},
    }


def dump_checkpoint(trainer: "Trainer", weights_only: bool = False) -> dict[str, Any]:
    """Build the checkpoint dict for the trainer's current state (every rank may call it)."""
    module = trainer.lightning_module
    epoch_done = trainer._epoch_done
    ckpt: dict[str, Any] = {
        "epoch": trainer.current_epoch,
        "global_step": trainer.global_step,
        "pytorch-lightning_version": LIGHTNING_FORMAT_VERSION,
        "state_dict": {k: v.detach() for k, v in module.state_dict().items()},
        "loops": _loops_state(trainer, epoch_done),
        "hparams_name": module.__dict__.get("_hparams_name") or "kwargs",
        "hyper_parameters": dict(module.hparams),
    }
    if not weights_only:
        ckpt["callbacks"] = {cb.state_key: cb.state_dict() for cb in trainer.callbacks if cb.state_dict()}
        ckpt["optimizer_states"] = [o.state_dict() for o in trainer.optimizers]
        ckpt["lr_schedulers"] = [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs]
        scaler = trainer._precision.state_dict()
        if scaler:
            ckpt["MixedPrecision"] = scaler  # Lightning's key for the grad scaler state
        next_epoch = trainer.current_epoch + 1 if epoch_done else trainer.current_epoch
        ckpt["raytrainer"] = {
            "format": 1,
            "rng": rng_states(),
            "position": {
                "epoch": next_epoch,
                "batch_idx": 0 if epoch_done else trainer._batches_done_in_epoch,
                "epoch_start_rng": trainer._epoch_start_rng if trainer._epoch_start_rng is not None
                else torch.get_rng_state(),
                "sampler_seed": 0,
            },
            "world_size": trainer.world_size,
            "grad_scaler": scaler,
            "batches_that_stepped": trainer._batches_that_stepped,
            "total_batches_seen": trainer._total_batches_seen,
        }
    dm = trainer.datamodule
    if dm is not None and getattr(dm, "hparams", None):
        ckpt["datamodule_hyper_parameters"] = dict(dm.hparams)
    for cb in trainer.callbacks:
        cb.on_save_checkpoint(trainer, module, ckpt)
    module.on_save_checkpoint(ckpt)
    return ckpt


def read_checkpoint(path: str, map_location: Any = None, weights_only: bool = True) -> dict[str, Any]:
    """Load a checkpoint file (verified against its manifest when we wrote it) with a clear error."""
    from raytrainer.checkpoint import storage

    try:
        ckpt = storage.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as exc:
        if weights_only and "weights_only" in str(exc) and not isinstance(exc, FileNotFoundError):
            raise ValueError(f"{path} holds pickled Python objects that torch.load(weights_only=True) refuses. "
                             "If you trust the file, load it with weights_only=False.") from exc
        raise
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a Lightning/raytrainer checkpoint: it has no 'state_dict' "
                         f"(top-level keys: {sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__}).")
    return ckpt


def resolve_ckpt_path(trainer: "Trainer", ckpt_path: str, fn: str) -> str | None:
    """Turn "last"/"best"/a path into a file, or None for "last" when nothing was saved yet."""
    from raytrainer.checkpoint import storage

    cb = trainer.checkpoint_callback
    if ckpt_path == "best":
        best = getattr(cb, "best_model_path", "") if cb is not None else ""
        if not best:
            raise ValueError(f'ckpt_path="best" but no best checkpoint is known: run fit with a ModelCheckpoint '
                             "first, or pass a file path.")
        return best
    if ckpt_path == "last":
        candidates = cb.find_last_candidates(trainer) if cb is not None else []
        path, bad = storage.newest_valid(candidates)
        for file, why in bad:
            log.warning("skipping checkpoint %s: %s", file, why)
        if path is None:
            log.info('ckpt_path="last": no checkpoint found, starting from scratch.')
        return path
    if not storage.exists(ckpt_path):
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r} does not exist. Pass an existing checkpoint file, "
                                '"last" (resume from the newest one if any) or "best".')
    return ckpt_path


def restore_training_state(trainer: "Trainer", path: str, full: bool) -> None:
    """Load weights (and with full=True: optimizers, schedulers, counters, callbacks, RNG, data position)."""
    from raytrainer.trainer.trainer import ResumePosition

    module = trainer.lightning_module
    ckpt = read_checkpoint(path, map_location=module.device)
    module.on_load_checkpoint(ckpt)
    module.load_state_dict(ckpt["state_dict"])
    if not full:
        return
    for cb in trainer.callbacks:
        cb.on_load_checkpoint(trainer, module, ckpt)
    states = ckpt.get("callbacks", {})
    for cb in trainer.callbacks:
        if cb.state_key in states:
            cb.load_state_dict(states[cb.state_key])
    opt_states = ckpt.get("optimizer_states", [])
    if opt_states and len(opt_states) != len(trainer.optimizers):
        raise ValueError(f"{path} holds {len(opt_states)} optimizer state(s) but configure_optimizers returned "
                         f"{len(trainer.optimizers)}; resume with the same optimizer setup.")
    for opt, state in zip(trainer.optimizers, opt_states):
        opt.load_state_dict(state)
    for cfg, state in zip(trainer.lr_scheduler_configs, ckpt.get("lr_schedulers", [])):
        cfg.scheduler.load_state_dict(state)
    ours = ckpt.get("raytrainer")
    scaler = (ours or {}).get("grad_scaler") or ckpt.get("MixedPrecision") or ckpt.get("native_amp_scaling_state")
    if scaler:
        trainer._precision.load_state_dict(scaler)
    trainer.global_step = int(ckpt.get("global_step", 0))
    fit_loop = ckpt.get("loops", {}).get("fit_loop", {})
    if ours is not None:
        pos = ours["position"]
        trainer.current_epoch = int(pos["epoch"])
        trainer._batches_that_stepped = int(ours.get("batches_that_stepped", trainer.global_step))
        trainer._total_batches_seen = int(ours.get("total_batches_seen", 0))
        trainer._resume = ResumePosition(epoch=int(pos["epoch"]), batch_idx=int(pos["batch_idx"]),
                                         epoch_rng=pos["epoch_start_rng"], rng=ours["rng"])
    else:
        # A checkpoint written by Lightning: take its epoch/step counters; the epoch restarts from its start.
        ep = fit_loop.get("epoch_progress", {}).get("current", {})
        done = ep.get("processed", ckpt.get("epoch", 0))
        trainer.current_epoch = int(done)
        trainer._batches_that_stepped = int(fit_loop.get("epoch_loop.state_dict", {})
                                            .get("_batches_that_stepped", trainer.global_step))
    trainer._resuming = True


def load_module(cls: type["LightningModule"], path: str, map_location: Any = None, strict: bool = True,
                weights_only: bool = True, overrides: dict[str, Any] | None = None) -> "LightningModule":
    """Rebuild ``cls`` from a checkpoint's hyper_parameters (plus overrides) and load its state_dict."""
    ckpt = read_checkpoint(str(path), map_location=map_location or "cpu", weights_only=weights_only)
    hparams = dict(ckpt.get("hyper_parameters") or {})
    hparams.update(overrides or {})
    sig = inspect.signature(cls.__init__)
    params = sig.parameters
    takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in params.values())
    if not takes_kwargs:
        unknown = [k for k in hparams if k not in params]
        if unknown:
            raise TypeError(f"{path}: hyper_parameters {unknown} are not arguments of {cls.__name__}.__init__"
                            f"{sig}. Is this checkpoint from a different model class?")
    missing = [n for n, p in params.items() if n != "self" and p.default is p.empty
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in hparams]
    if missing:
        raise TypeError(f"{path}: {cls.__name__}.__init__ needs {missing}, which the checkpoint's hyper_parameters "
                        f"({sorted(hparams)}) do not have. Pass them: {cls.__name__}.load_from_checkpoint(path, "
                        + ", ".join(f"{m}=..." for m in missing) + ").")
    model = cls(**hparams)
    model.on_load_checkpoint(ckpt)
    result = model.load_state_dict(ckpt["state_dict"], strict=strict)
    if not strict and (result.missing_keys or result.unexpected_keys):
        log.warning("load_from_checkpoint(strict=False): missing %s, unexpected %s",
                    result.missing_keys, result.unexpected_keys)
    if map_location is not None:
        device = map_location if isinstance(map_location, (str, torch.device)) else None
        if device is not None:
            model.to(device)
    return model


def is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def local_path(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else os.path.abspath(path)
