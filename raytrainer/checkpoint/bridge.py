"""Capture and restore: between a running RankSession and the checkpoint format's plain parts.

Checkpoint files, in-memory snapshots and elastic resizes all go through ``capture``/``restore``,
so they save and restore the same state the same way.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from raytrainer.checkpoint import format, sharded
from raytrainer.checkpoint.resolve import load_state_dict_checked, read_checkpoint
from raytrainer.checkpoint.shard_snapshot import ShardedSnapshot
from raytrainer.utilities import rng_states

if TYPE_CHECKING:
    from raytrainer.core.session import RankSession


def progress(session: RankSession) -> format.Progress:
    """The session's counters as the format needs them for Lightning's ``loops`` entry."""
    state, module = session.state, session.module
    return format.Progress(
        current_epoch=state.current_epoch, global_step=state.global_step,
        batches_done_in_epoch=state.batches_done_in_epoch, total_batches_seen=state.total_batches_seen,
        batches_that_stepped=state.batches_that_stepped, epoch_done=state.epoch_done,
        automatic=module is None or module.automatic_optimization,
        accumulate=session.config.accumulate_grad_batches,
        schedulers=[(c.interval, c.frequency) for c in session.lr_scheduler_configs])


def _sampler_seed(session: RankSession) -> int | None:
    """The seed of the training sampler when it has one (DistributedSampler), else None."""
    seed = getattr(getattr(session.train_dataloader, "sampler", None), "seed", None)
    return int(seed) if isinstance(seed, int) else None


def _pending_plateau(session: RankSession) -> dict[str, float]:
    """ReduceLROnPlateau steps still due after an epoch-end checkpoint, with the values they will use."""
    state = session.state
    if not state.epoch_done:
        return {}
    metrics = session.callback_metrics
    due = {}
    for i, cfg in enumerate(session.lr_scheduler_configs):
        if cfg.reduce_on_plateau and cfg.interval == "epoch" and (state.current_epoch + 1) % cfg.frequency == 0 \
                and cfg.monitor in metrics:
            due[str(i)] = float(metrics[cfg.monitor])
    return due


def capture(session: RankSession, weights_only: bool = False, check: bool = True,
            gather: bool = True, plain_rng: bool | None = None) -> dict[str, Any]:
    """Build the checkpoint dict for the session's current state (every rank may call it).

    ``check=False`` skips the weights_only loadability walk: for in-memory snapshots that never become files.
    ``gather=False`` keeps sharded tensors as this rank's shards (for a sharded checkpoint directory).
    ``plain_rng`` (default: ``check``) stores the RNG states as plain tensors and numbers, which weights_only loads.
    Tensors are the live ones (no copies); the async writer or ``storage.save`` copy or serialise them
    before training changes them.
    """
    module, trainer = session.module, session.trainer
    # FSDP: gathers the shards (collective, every rank)
    whole = getattr(session.strategy, "full_state", None) if gather else None
    training = None
    if not weights_only:
        train_results = session.results.get("train") if session.fn == "fit" else None
        position = session.state.state_dict(
            segments=session.elastic_segments(),  # elastic runs: what each world consumed this epoch
            results=train_results.accum_state_dict() if train_results is not None else None)
        position["sampler_seed"] = _sampler_seed(session)
        position["data"] = session.data_fingerprint()
        callbacks = {}
        for cb in session.callbacks:
            cb_state = cb.state_dict()
            if cb_state:
                callbacks[cb.state_key] = cb_state
        training = format.TrainingParts(
            callbacks=callbacks, optimizer_states=[o.state_dict() if whole is None else whole(o.state_dict())
                                                   for o in session.optimizers],
            lr_schedulers=[c.scheduler.state_dict() for c in session.lr_scheduler_configs],
            scaler=session.precision.state_dict(),
            rng=rng_states(plain=check if plain_rng is None else plain_rng), position=position,
            world_size=session.world_size, pending_plateau=_pending_plateau(session))
    dm = session.datamodule
    datamodule = (type(dm).__qualname__, getattr(dm, "hparams", None), dm.state_dict()) if dm is not None else None
    hparams_name, hparams_type = session.hparams_origin()
    weights = module.state_dict() if whole is None else whole(module.state_dict())
    ckpt = format.build(progress=progress(session), state_dict=weights, hparams_name=hparams_name,
                        hyper_parameters=dict(module.hparams), hparams_type=hparams_type, training=training,
                        datamodule=datamodule, hparams_keys=hparams_keys(module, format.MODULE_HPARAMS_KEYS),
                        datamodule_hparams_name=getattr(dm, "__dict__", {}).get("_hparams_name"),
                        datamodule_hparams_keys=hparams_keys(dm, format.DATAMODULE_HPARAMS_KEYS))
    for cb in session.callbacks:
        cb.on_save_checkpoint(trainer, module, ckpt)
    module.on_save_checkpoint(ckpt)
    to_host = getattr(session.strategy, "checkpoint_to_host", None)
    if to_host is not None:  # XLA: device tensors become CPU copies, so the file loads without torch_xla
        ckpt = to_host(ckpt)
    if check:
        format.check_loadable(ckpt)
    return ckpt


def writes_sharded(session: RankSession) -> bool:
    """Whether the session's checkpoints are sharded directories (FSDP with state_dict_type='sharded')."""
    layout = getattr(session.strategy, "checkpoint_layout", None)
    return layout is not None and layout() == "sharded"


def save_sharded(session: RankSession, paths: list[str], weights_only: bool = False,
                 asynchronous: bool = False) -> tuple[list[str], list[sharded.PendingSave]]:
    """Write the session's state as a sharded checkpoint directory at each of ``paths`` (rank 0's, so every rank
    writes the same directories); every rank calls it. Returns the paths and, with ``asynchronous=True``, the saves
    still being written in the background (the training thread only copied the shards to host memory)."""
    strategy = session.strategy
    paths = list(strategy.broadcast(list(paths), 0))
    ckpt = capture(session, weights_only, check=False, gather=False, plain_rng=True)
    meta = {k: v for k, v in ckpt.items() if k not in ("state_dict", "optimizer_states")}
    format.check_loadable(meta)
    optimizers = [] if weights_only else session.optimizers
    group = strategy.checkpoint_group() if asynchronous else False
    pending = sharded.save_sharded(paths[0], session.module, optimizers, meta, rank=strategy.global_rank,
                                   barrier=lambda: strategy.barrier("sharded checkpoint"), async_group=group,
                                   copies=paths[1:])  # one write; rank 0 copies it to the other names
    return paths, [] if pending is None else [pending]


def hparams_keys(obj: Any, default: tuple[str, str, str]) -> tuple[str, str, str]:
    """The (values, name, type) checkpoint keys of ``obj``'s hyper-parameters: its class's
    CHECKPOINT_HYPER_PARAMS_KEY/NAME/TYPE, else ``default``."""
    return (getattr(obj, "CHECKPOINT_HYPER_PARAMS_KEY", default[0]),
            getattr(obj, "CHECKPOINT_HYPER_PARAMS_NAME", default[1]),
            getattr(obj, "CHECKPOINT_HYPER_PARAMS_TYPE", default[2]))


def restore(session: RankSession, path: str | dict[str, Any], full: bool, weights_only: bool | None = None) -> None:
    """Load weights (and with full=True: optimizers, schedulers, counters, callbacks, RNG, data position).

    ``path`` is a checkpoint file, or an already loaded checkpoint dict (an in-memory snapshot).
    ``weights_only`` goes to torch.load (None: torch's default, True). The weights load with
    ``strict=module.strict_loading``, as Lightning's."""
    module, trainer = session.module, session.trainer
    in_place = False  # a sharded directory loads weights and optimizer shards into the module and optimizers itself
    if isinstance(path, ShardedSnapshot):  # every rank's shards: placed onto this rank's layout by the cut below
        ckpt, path = path.state(), f"<in-memory snapshot of {path.world_size} shards>"
    elif isinstance(path, dict):
        ckpt, path = path, "<in-memory snapshot>"
    elif getattr(session.strategy, "shards_parameters", False) and sharded.is_sharded_checkpoint(path):
        if full:  # the loop position is checked before the shards are loaded into the module
            resume_position(sharded.read_meta(path), session.world_size, path)
        ckpt = sharded.load_sharded(path, module, session.optimizers if full else [], strict=module.strict_loading)
        in_place = True
    else:
        # torch.load cannot map onto an XLA device: load on CPU, load_state_dict copies onto the device
        ckpt = read_checkpoint(path, map_location="cpu" if module.device.type == "xla" else module.device,
                               weights_only=weights_only)
    pos = resume_position(ckpt, session.world_size, path) if full else None  # before anything is loaded
    module.on_load_checkpoint(ckpt)
    cut = getattr(session.strategy, "shard_module_state", None)  # FSDP: whole tensors cut to this rank's shards
    if not in_place:
        weights = ckpt["state_dict"] if cut is None else cut(module, ckpt["state_dict"])
        load_state_dict_checked(module, weights, path, strict=module.strict_loading)
    dm = session.datamodule
    if dm is not None and type(dm).__qualname__ in ckpt:  # every entry point, as Lightning's restore_datamodule
        dm.load_state_dict(ckpt[type(dm).__qualname__])
    if not full:
        return
    if session.optimizers and "optimizer_states" not in ckpt and not in_place:
        raise ValueError(f"{path} holds only model weights (saved with save_weights_only=True), so fit cannot resume "
                         "from it. Load the weights with Model.load_from_checkpoint(path) and call fit without "
                         "ckpt_path, or resume from a full checkpoint.")
    for cb in session.callbacks:
        cb.on_load_checkpoint(trainer, module, ckpt)
    states = ckpt.get("callbacks", {})
    for cb in session.callbacks:
        if cb.state_key in states:
            cb.load_state_dict(states[cb.state_key])
    if not in_place:
        opt_states = ckpt.get("optimizer_states", [])
        if cut is not None:
            n = len(session.optimizers)
            opt_states = [session.strategy.shard_optimizer_state(o, s)
                          for o, s in zip(session.optimizers, opt_states)] + list(opt_states[n:])
        _load_list(opt_states, session.optimizers, path,
                   "optimizer state(s)", "configure_optimizers returned", "optimizer setup")
    _load_list(ckpt.get("lr_schedulers", []), [c.scheduler for c in session.lr_scheduler_configs],
               path, "lr scheduler state(s)", "configure_optimizers returned", "scheduler setup")
    scaler = format.scaler_state(ckpt)
    if scaler:
        session.precision.load_state_dict(scaler)
    assert pos is not None
    for idx, value in pos.pending_plateau.items():
        session.lr_scheduler_configs[int(idx)].scheduler.step(value)
    session.state.load_state_dict(pos.loop_state, global_step=int(ckpt.get("global_step", 0)), rng=pos.rng)


def resume_position(ckpt: dict[str, Any], world_size: int, path: Any) -> format.Position:
    """The loop position a fit resumes at, read (and so checked) before anything of the checkpoint is loaded: a
    damaged or foreign dict raises an error naming the file and the key, with the module still untouched."""
    from raytrainer.io.storage import CheckpointCorruptError

    for key in ("global_step", "epoch"):
        value = ckpt.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, (int, torch.Tensor)):
            raise CheckpointCorruptError(f"{path} cannot be resumed from: its {key!r} is {value!r}, not a whole "
                                         "number. Nothing was loaded; resume from another checkpoint, or take its "
                                         "weights with Model.load_from_checkpoint.")
    try:
        return format.read_position(ckpt, world_size, str(path))
    except KeyError as exc:
        raise CheckpointCorruptError(f"{path} cannot be resumed from: its loop position has no {exc.args[0]!r} "
                                     "entry (the file is damaged or was edited). Nothing was loaded; resume from "
                                     "another checkpoint, or take its weights with Model.load_from_checkpoint."
                                     ) from exc
    except (TypeError, ValueError, AttributeError) as exc:
        raise CheckpointCorruptError(f"{path} cannot be resumed from: its loop position is damaged ({exc}). "
                                     "Nothing was loaded; resume from another checkpoint, or take its weights "
                                     "with Model.load_from_checkpoint.") from exc


def _load_list(states: list[Any], targets: list[Any], path: Any, what: str, source: str,
               setup: str) -> None:
    """Load one saved state per optimizer/scheduler, refusing a count that does not match."""
    if states and len(states) != len(targets):
        raise ValueError(f"{path} holds {len(states)} {what} but {source} {len(targets)}; resume with the same "
                         f"{setup}.")
    for target, state in zip(targets, states):
        target.load_state_dict(state)
