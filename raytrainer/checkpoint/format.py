"""The checkpoint dict: Lightning 2.x's layout plus our own extras under the ``raytrainer`` key.

Everything inside is tensors and plain Python types, so ``torch.load(path)`` with its default
``weights_only=True`` reads every checkpoint we write; ``dump_checkpoint`` refuses anything else
with an error naming the key.

Where a run is inside its data (the "position") is kept twice: Lightning's loop progress counters
under ``loops`` (so Lightning resumes from our files) and, exactly, under ``raytrainer.position``:
the epoch, the batches already trained in it, and the torch RNG state from which the epoch drew
its data order. A resume rebuilds that order, skips the trained batches and restores every RNG,
so an interrupted run continues bit for bit like one that never stopped.
"""
from __future__ import annotations

import argparse
import collections
import inspect
import math
from typing import TYPE_CHECKING, Any

import torch

from raytrainer.utilities import log, rng_states

if TYPE_CHECKING:
    from raytrainer.module import LightningModule
    from raytrainer.core.results import Results
    from raytrainer.trainer.trainer import Trainer

# The Lightning release whose checkpoint layout we write (and test reading back with pytorch_lightning).
LIGHTNING_FORMAT_VERSION = "2.6.6"
FORMAT_VERSION = 1
FORMAT_KEYS = ("epoch", "global_step", "pytorch-lightning_version", "state_dict", "loops", "callbacks",
               "optimizer_states", "lr_schedulers", "hparams_name", "hyper_parameters")
# Leaves torch.load(weights_only=True) accepts besides tensors and containers.
_PLAIN_LEAVES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


# ---------------------------------------------------------------------------------------------- saving
def _progress(total: dict[str, int], current: dict[str, int]) -> dict[str, dict[str, int]]:
    return {"total": dict(total), "current": dict(current)}


def _counts(keys: tuple[str, ...], value: int, completed: int | None = None) -> dict[str, int]:
    out = {k: value for k in keys}
    if completed is not None and "completed" in out:
        out["completed"] = completed
    return out


def _loops_state(trainer: "Trainer") -> dict[str, Any]:
    """Lightning's loop progress counters, shaped as Lightning writes them at the same point of a run.

    Three points exist: inside an epoch after a finished batch (``mid``), at the end of an epoch
    (``on_train_epoch_end``) and between epochs (before the first batch, or after fit).
    """
    e = trainer.current_epoch
    b = trainer._batches_done_in_epoch
    total = trainer._total_batches_seen
    epoch_done = trainer._epoch_done
    mid = not epoch_done and b > 0
    module = trainer.lightning_module
    automatic = module is None or module.automatic_optimization
    acc = max(trainer.accumulate_grad_batches, 1)
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

    steps = trainer.global_step
    sched_total = sched_current = 0
    for cfg in trainer.lr_scheduler_configs:
        if cfg.interval == "step":
            sched_total += steps // cfg.frequency
            sched_current += steps_in_epoch // cfg.frequency
        else:
            stepped = e + int(epoch_done)
            sched_total += stepped // cfg.frequency
            sched_current += int(epoch_done and stepped % cfg.frequency == 0)
    auto_steps, auto_current = (steps, steps_in_epoch) if automatic else (0, 0)
    manual_steps, manual_current = (0, 0) if automatic else (steps, steps_in_epoch)
    stepped_batches = trainer._batches_that_stepped - (1 if mid and trainer._batches_that_stepped else 0)
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


def results_state(results: "Results") -> dict[str, Any]:
    """The epoch accumulators of ``self.log(..., on_epoch=True)`` values, as plain types and tensors."""
    out: dict[str, Any] = {}
    for name, acc in results.accum.items():
        meta = results.meta.get(name)
        if meta is None or acc.total is None:
            continue
        total = acc.total.detach().clone() if isinstance(acc.total, torch.Tensor) else acc.total
        out[name] = {"total": total, "weight": float(acc.weight),
                     "meta": {k: getattr(meta, k) for k in meta.__slots__}}
    return out


def load_results_state(results: "Results", state: dict[str, Any]) -> None:
    """Put accumulators saved by ``results_state`` back, so epoch means cover the whole epoch."""
    from raytrainer.core.results import _Accum, _Meta

    init_args = set(inspect.signature(_Meta.__init__).parameters) - {"self"}
    for name, item in state.items():
        saved = item["meta"]
        meta = _Meta(**{k: v for k, v in saved.items() if k in init_args})
        for k, v in saved.items():
            if k not in init_args and k in _Meta.__slots__:
                setattr(meta, k, v)
        results.meta[name] = meta
        acc = _Accum()
        acc.total = item["total"]
        acc.weight = float(item["weight"])
        results.accum[name] = acc


def _sampler_seed(trainer: "Trainer") -> int | None:
    """The seed of the training sampler when it has one (DistributedSampler), else None."""
    loader = trainer._train_dataloader
    seed = getattr(getattr(loader, "sampler", None), "seed", None)
    return int(seed) if isinstance(seed, int) else None


def _pending_plateau(trainer: "Trainer") -> dict[str, float]:
    """ReduceLROnPlateau steps still due after an epoch-end checkpoint, with the values they will use."""
    if not trainer._epoch_done:
        return {}
    metrics = trainer.callback_metrics
    due = {}
    for i, cfg in enumerate(trainer.lr_scheduler_configs):
        if cfg.reduce_on_plateau and cfg.interval == "epoch" and (trainer.current_epoch + 1) % cfg.frequency == 0 \
                and cfg.monitor in metrics:
            due[str(i)] = float(metrics[cfg.monitor])
    return due


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


def dump_checkpoint(trainer: "Trainer", weights_only: bool = False, check: bool = True) -> dict[str, Any]:
    """Build the checkpoint dict for the trainer's current state (every rank may call it).

    ``check=False`` skips the weights_only loadability walk: for in-memory snapshots that never become files.

    Tensors are the live ones (no copies); ``storage.AsyncCheckpointWriter.submit`` or ``storage.save``
    copy or serialise them before training changes them.
    """
    module = trainer.lightning_module
    ckpt: dict[str, Any] = {
        "epoch": trainer.current_epoch,
        "global_step": trainer.global_step,
        "pytorch-lightning_version": LIGHTNING_FORMAT_VERSION,
        "state_dict": module.state_dict(),
        "loops": _loops_state(trainer),
        "hparams_name": module.__dict__.get("_hparams_name"),
        "hyper_parameters": dict(module.hparams),
    }
    hparams_type = module.__dict__.get("_hparams_type")
    if hparams_type:
        ckpt["hparams_type"] = hparams_type
    if not weights_only:
        ckpt["callbacks"] = {}
        for cb in trainer.callbacks:
            state = cb.state_dict()
            if state:
                ckpt["callbacks"][cb.state_key] = state
        ckpt["optimizer_states"] = [o.state_dict() for o in trainer.optimizers]
        ckpt["lr_schedulers"] = [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs]
        scaler = trainer._precision.state_dict()
        if scaler:
            ckpt["MixedPrecision"] = scaler  # Lightning's key for the grad scaler state
        epoch_done = trainer._epoch_done
        mid = not epoch_done and trainer._batches_done_in_epoch > 0
        train_results = trainer._results.get("train") if trainer.state_fn == "fit" else None
        ckpt["raytrainer"] = {
            "format": FORMAT_VERSION,
            "rng": rng_states(plain=check),
            "position": {
                "epoch": trainer.current_epoch + 1 if epoch_done else trainer.current_epoch,
                "batch_idx": trainer._batches_done_in_epoch if mid else 0,
                "epoch_start_rng": trainer._epoch_start_rng if trainer._epoch_start_rng is not None
                else torch.get_rng_state(),
                "sampler_seed": _sampler_seed(trainer),
                "segments": trainer._elastic_segments(),  # elastic runs: what each world consumed this epoch
            },
            "world_size": trainer.world_size,
            "grad_scaler": scaler,
            "batches_that_stepped": trainer._batches_that_stepped,
            "total_batches_seen": trainer._total_batches_seen,
            "results": results_state(train_results) if mid and train_results is not None else {},
            "pending_plateau": _pending_plateau(trainer),
        }
    dm = trainer.datamodule
    if dm is not None:
        if getattr(dm, "hparams", None):
            ckpt["datamodule_hyper_parameters"] = dict(dm.hparams)
        dm_state = dm.state_dict()
        if dm_state:
            ckpt[type(dm).__qualname__] = dm_state  # Lightning's key for datamodule state
    for cb in trainer.callbacks:
        cb.on_save_checkpoint(trainer, module, ckpt)
    module.on_save_checkpoint(ckpt)
    to_host = getattr(trainer.strategy, "checkpoint_to_host", None)
    if to_host is not None:  # XLA: device tensors become CPU copies, so the file loads without torch_xla
        ckpt = to_host(ckpt)
    if check:
        check_loadable(ckpt)
    return ckpt


# ------------------------------------------------------------------------------------------- loading
def read_checkpoint(path: str, map_location: Any = None, weights_only: bool = True) -> dict[str, Any]:
    """Load and verify a checkpoint file; clear errors for missing, damaged and non-checkpoint files."""
    from raytrainer.io import storage

    ckpt = storage.load(str(path), map_location=map_location, weights_only=weights_only)
    if "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a Lightning/raytrainer checkpoint: it has no 'state_dict' "
                         f"(top-level keys: {sorted(map(str, ckpt))}).")
    return ckpt


def resolve_ckpt_path(trainer: "Trainer", ckpt_path: str, fn: str) -> str | None:
    """Turn "last"/"best"/a path into a file, or None for "last" when nothing was saved yet."""
    from raytrainer.io import storage

    ckpt_path = str(ckpt_path)
    cb = trainer.checkpoint_callback
    if ckpt_path == "best":
        best = getattr(cb, "best_model_path", "") if cb is not None else ""
        if not best:
            raise ValueError('ckpt_path="best" but no best checkpoint is known: run fit with a ModelCheckpoint '
                             "first, or pass a file path.")
        return best
    if ckpt_path == "last":
        candidates = cb.find_last_candidates(trainer) if cb is not None else _default_candidates(trainer)
        path, bad = storage.newest_valid(candidates)
        for file, why in bad:
            log.warning("ckpt_path=\"last\": skipping %s, which cannot be used: %s", file, why)
        if path is None:
            log.info('ckpt_path="last": no checkpoint found, starting from scratch.')
        else:
            log.info('ckpt_path="last": resuming from %s', path)
        return path
    if not storage.exists(ckpt_path):
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r} does not exist. Pass an existing checkpoint file, "
                                '"last" (resume from the newest one if any) or "best".')
    return ckpt_path


def _default_candidates(trainer: "Trainer") -> list[str]:
    """Where "last" looks without a ModelCheckpoint: every version's checkpoints folder."""
    from raytrainer.callbacks.model_checkpoint import ModelCheckpoint

    return ModelCheckpoint.find_last_candidates(ModelCheckpoint(), trainer)


def _lightning_position(ckpt: dict[str, Any]) -> tuple[int, int, int | None]:
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


def restore_training_state(trainer: "Trainer", path: "str | dict[str, Any]", full: bool) -> None:
    """Load weights (and with full=True: optimizers, schedulers, counters, callbacks, RNG, data position).

    ``path`` is a checkpoint file, or an already loaded checkpoint dict (an in-memory snapshot)."""
    from raytrainer.trainer.trainer import ResumePosition

    module = trainer.lightning_module
    if isinstance(path, dict):
        ckpt, path = path, "<in-memory snapshot>"
    else:
        # torch.load cannot map onto an XLA device: load on CPU, load_state_dict copies onto the device
        ckpt = read_checkpoint(path, map_location="cpu" if module.device.type == "xla" else module.device)
    module.on_load_checkpoint(ckpt)
    _load_state_dict(module, ckpt["state_dict"], path, strict=True)
    if not full:
        return
    if trainer.optimizers and "optimizer_states" not in ckpt:
        raise ValueError(f"{path} holds only model weights (saved with save_weights_only=True), so fit cannot resume "
                         "from it. Load the weights with Model.load_from_checkpoint(path) and call fit without "
                         "ckpt_path, or resume from a full checkpoint.")
    dm = trainer.datamodule
    if dm is not None and type(dm).__qualname__ in ckpt:
        dm.load_state_dict(ckpt[type(dm).__qualname__])
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
    sched_states = ckpt.get("lr_schedulers", [])
    if sched_states and len(sched_states) != len(trainer.lr_scheduler_configs):
        raise ValueError(f"{path} holds {len(sched_states)} lr scheduler state(s) but configure_optimizers "
                         f"returned {len(trainer.lr_scheduler_configs)}; resume with the same scheduler setup.")
    for cfg, state in zip(trainer.lr_scheduler_configs, sched_states):
        cfg.scheduler.load_state_dict(state)
    ours = ckpt.get("raytrainer")
    scaler = (ours or {}).get("grad_scaler") or ckpt.get("MixedPrecision") or ckpt.get("native_amp_scaling_state")
    if scaler:
        trainer._precision.load_state_dict(scaler)
    trainer.global_step = int(ckpt.get("global_step", 0))
    if ours is not None:
        pos = ours["position"]
        epoch, batch_idx = int(pos["epoch"]), int(pos["batch_idx"])
        epoch_rng, rng = pos["epoch_start_rng"], ours["rng"]
        saved_ws = int(ours.get("world_size", trainer.world_size))
        segments = pos.get("segments")
        if saved_ws != trainer.world_size and batch_idx and segments is None:
            # Each rank saw batch_idx batches of its shard; continue after as many samples, approximately.
            batch_idx = batch_idx * saved_ws // trainer.world_size
            epoch_rng = rng = None
            log.warning("%s was written by %d rank(s), this run has %d: resuming at batch %d of epoch %d; the data "
                        "order and RNG streams cannot be continued exactly.", path, saved_ws, trainer.world_size,
                        batch_idx, epoch)
        for idx, value in ours.get("pending_plateau", {}).items():
            trainer.lr_scheduler_configs[int(idx)].scheduler.step(value)
        trainer.current_epoch = epoch
        trainer._batches_that_stepped = int(ours.get("batches_that_stepped", trainer.global_step))
        trainer._total_batches_seen = int(ours.get("total_batches_seen", 0))
        trainer._resume = ResumePosition(epoch=epoch, batch_idx=batch_idx, epoch_rng=epoch_rng, rng=rng,
                                         results=ours.get("results") or None, segments=segments)
    else:
        # Written by Lightning: its counters give epoch, step and the batches done in the epoch; the epoch's
        # data order is drawn afresh (Lightning keeps no RNG that would rebuild it).
        epoch, batch_idx, stepped = _lightning_position(ckpt)
        fit_loop = ckpt.get("loops", {}).get("fit_loop", {})
        trainer.current_epoch = epoch
        trainer._batches_that_stepped = int(stepped if stepped is not None else trainer.global_step)
        trainer._total_batches_seen = int(fit_loop.get("epoch_loop.batch_progress", {}).get("total", {})
                                          .get("processed", 0))
        trainer._resume = ResumePosition(epoch=epoch, batch_idx=batch_idx, epoch_rng=None, rng=None)
    trainer._resuming = True


def _load_state_dict(module: torch.nn.Module, state_dict: dict[str, Any], path: str, strict: bool) -> None:
    """module.load_state_dict with the checkpoint's name in the error; warns about mismatches if not strict."""
    try:
        result = module.load_state_dict(state_dict, strict=strict)
    except RuntimeError as exc:
        exc.add_note(f"while loading the state_dict of {path} into {type(module).__name__}; pass strict=False to "
                     "load the matching keys only.")
        raise
    if not strict and (result.missing_keys or result.unexpected_keys):
        log.warning("%s loaded with strict=False: missing keys %s, unexpected keys %s", path,
                    result.missing_keys, result.unexpected_keys)


def init_kwargs_from_checkpoint(cls: type, ckpt: dict[str, Any], path: str,
                                overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The keyword arguments that rebuild ``cls`` from a checkpoint's hyper_parameters (plus overrides)."""
    hparams = dict(ckpt.get("hyper_parameters") or {})
    sig = inspect.signature(cls.__init__)
    params = {n: p for n, p in list(sig.parameters.items())[1:]
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    name = ckpt.get("hparams_name")
    if name and name != "kwargs" and name in params:
        # save_hyperparameters(config) recorded one dict/Namespace argument: pass it back whole
        value: Any = argparse.Namespace(**hparams) if ckpt.get("hparams_type") == "Namespace" else hparams
        kwargs = {name: value}
    else:
        kwargs = hparams
    kwargs.update(overrides or {})
    if not takes_kwargs:
        unknown = [k for k in kwargs if k not in params]
        if unknown:
            raise TypeError(f"{path}: hyper_parameters {unknown} are not arguments of {cls.__name__}.__init__"
                            f"{sig}. Is this checkpoint from a different model class? Load it into the class that "
                            "wrote it, or load only the weights: model.load_state_dict(torch.load(path)"
                            "['state_dict']).")
    missing = [n for n, p in params.items() if p.default is p.empty and n not in kwargs]
    if missing:
        raise TypeError(f"{path}: {cls.__name__}.__init__ needs {missing}, which the checkpoint's hyper_parameters "
                        f"({sorted(hparams)}) do not have. Pass them: {cls.__name__}.load_from_checkpoint(path, "
                        + ", ".join(f"{m}=..." for m in missing) + ").")
    return kwargs


def load_module(cls: type["LightningModule"], path: str, map_location: Any = None, strict: bool = True,
                weights_only: bool = True, overrides: dict[str, Any] | None = None) -> "LightningModule":
    """Rebuild ``cls`` from a checkpoint's hyper_parameters (plus overrides) and load its state_dict.

    Tensors load onto ``map_location`` (default: CPU). ``weights_only=False`` allows pickled Python
    objects inside the file: use it only for files you trust.
    """
    path = str(path)
    ckpt = read_checkpoint(path, map_location=map_location if map_location is not None else "cpu",
                           weights_only=weights_only)
    kwargs = init_kwargs_from_checkpoint(cls, ckpt, path, overrides)
    try:
        model = cls(**kwargs)
    except TypeError as exc:
        exc.add_note(f"while rebuilding {cls.__name__} from the hyper_parameters of {path}: {sorted(kwargs)}")
        raise
    model.on_load_checkpoint(ckpt)
    _load_state_dict(model, ckpt["state_dict"], path, strict)
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model
