"""The loops: fit (train + validation), evaluation (validate/test) and predict, read top to bottom.

Hooks are called in Lightning's order. Per-batch hooks are looked up once per run (only the
callbacks and module methods that are actually overridden are called), so an empty hook costs
nothing in the training step.
"""
from __future__ import annotations

import inspect
import itertools
import math
import time
from typing import TYPE_CHECKING, Any, Iterable

import torch

from raytrainer.core.optimization import clip_gradients

if TYPE_CHECKING:
    from raytrainer.trainer.trainer import Trainer


class StepError(RuntimeError):
    """A user step returned something the loop cannot use; the message names epoch and batch."""


# ---------------------------------------------------------------------------------------------- fit
def fit_loop(trainer: "Trainer") -> None:
    """Train epochs until a stop condition, validating as configured."""
    module = trainer.lightning_module
    trainer._call_hook("on_fit_start")
    if trainer._val_dataloaders and trainer._sanity_steps != 0 and not trainer._resuming:
        trainer.sanity_checking = True
        trainer._call_callbacks("on_sanity_check_start")
        # num_sanity_val_steps=-1 checks every validation batch (up to limit_val_batches), as in Lightning
        evaluation_loop(trainer, "validate", trainer._val_dataloaders,
                        limit=None if trainer._sanity_steps < 0 else trainer._sanity_steps)
        trainer._call_callbacks("on_sanity_check_end")
        trainer.sanity_checking = False
        trainer._results["validate"].reset_epoch()
    trainer._bind_results(trainer._results["train"])  # self.log in on_train_start belongs to training
    trainer._call_hook("on_train_start")
    deadline = time.monotonic() + trainer._max_time_s if trainer._max_time_s else None
    while not _fit_done(trainer):
        completed = train_epoch(trainer, module, deadline)
        if not completed:
            break
        trainer.current_epoch += 1
        if deadline is not None and time.monotonic() >= deadline:
            trainer.should_stop = True
    trainer._call_hook("on_train_end")
    trainer._call_hook("on_fit_end")


def _fit_done(trainer: "Trainer") -> bool:
    if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
        return True
    if trainer.max_epochs is not None and trainer.max_epochs != -1 and trainer.current_epoch >= trainer.max_epochs:
        return True
    if trainer.should_stop:
        if _can_stop_early(trainer):
            return True
        trainer.should_stop = False  # min_epochs/min_steps not reached yet: keep going, as Lightning does
    return trainer.num_training_batches == 0


def _can_stop_early(trainer: "Trainer") -> bool:
    """Whether a should_stop request may end training now: min_epochs and min_steps are met."""
    return trainer.current_epoch >= (trainer.min_epochs or 0) and trainer.global_step >= (trainer.min_steps or 0)


def train_epoch(trainer: "Trainer", module: Any, deadline: float | None) -> bool:
    """One training epoch. Returns False when the run stopped in the middle of it."""
    epoch = trainer.current_epoch
    results = trainer._results["train"]
    results.reset_epoch()
    trainer._bind_results(results)
    strategy = trainer.strategy
    loader = trainer._train_dataloader
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    batch_sampler = getattr(loader, "batch_sampler", None)
    if hasattr(batch_sampler, "set_epoch"):
        batch_sampler.set_epoch(epoch)

    # No module.train() here: as in Lightning 2.x the module keeps the modes the user gave its submodules
    # (a frozen backbone stays in eval); evaluation restores them when it ends.
    trainer.training = True
    trainer._call_hook("on_train_epoch_start")

    # Data position: remember the RNG that orders this epoch, so a resume can rebuild the order.
    trainer._epoch_done = False
    start = trainer._resume_position(epoch)
    first = start.batch_idx if start else 0
    if start and start.results:
        from raytrainer.checkpoint.format import load_results_state

        load_results_state(results, start.results)  # epoch means continue over the batches already trained
    if start and not first:
        trainer._restore_rng(start)          # resuming at an epoch boundary: RNG as it was then
    elif start and start.epoch_rng is not None:
        torch.set_rng_state(start.epoch_rng)  # rebuild this epoch's data order ...
    trainer._epoch_start_rng = torch.get_rng_state()
    if hasattr(batch_sampler, "resume_from"):
        # Elastic run: the sampler leaves out what earlier worlds of this epoch trained, so nothing is skipped here.
        trainer._epoch_segments = [list(x) for x in start.segments or []] if start and start.segments else []
        batch_sampler.resume_from(trainer._epoch_segments)
        first = 0
        trainer.num_training_batches = trainer._limit(loader, "train")
    limit = trainer.num_training_batches
    batches: Iterable[Any] = iter(loader)
    if first:
        # ... skip what was trained now (the sampler draws its order on the first batch, so this must happen
        # before the RNG moves on) ...
        for _ in itertools.islice(batches, first):
            pass
        trainer._restore_rng(start)                         # ... and continue with the RNG of that moment
    if limit is not None and not math.isinf(limit):
        batches = itertools.islice(batches, max(int(limit) - first, 0))

    hooks = trainer._hot_hooks
    on_batch_start, on_batch_end = hooks["on_train_batch_start"], hooks["on_train_batch_end"]
    automatic = module.automatic_optimization
    step_fn = trainer._step_callable("training_step")
    to_device = trainer._to_device
    val_every = trainer._val_check_batches
    check_val = trainer._should_validate_epoch(epoch)
    accumulate = trainer.accumulate_grad_batches
    detect = trainer._detect_anomaly
    log_every = trainer.log_every_n_steps
    max_steps = trainer.max_steps
    n_batches = trainer.num_training_batches
    batch_idx = first - 1
    stopped_mid_epoch = False
    snapshotter = trainer._snapshotter
    agree = strategy.stop_agreement() if strategy.distributed else None
    for batch_idx, batch in enumerate(batches, start=first):
        trainer._batch_idx = batch_idx
        if to_device is not None:
            batch = to_device(batch)
        results.batch = batch
        skip_rest = False
        for fn in on_batch_start:
            if fn(batch, batch_idx) == -1:
                skip_rest = True
        if skip_rest:
            break
        results.fx = "training_step"
        if automatic:
            is_last = n_batches is not None and batch_idx + 1 >= n_batches
            window_end = (batch_idx + 1) % accumulate == 0 or is_last
            outputs = _automatic_step(trainer, module, step_fn, batch, batch_idx, epoch,
                                      window_end, accumulate, detect)
        else:
            with trainer._precision.forward_context():
                outputs = step_fn(batch, batch_idx)
            outputs = _manual_outputs(outputs, epoch, batch_idx, detect)
        trainer._batches_done_in_epoch = batch_idx + 1
        trainer._total_batches_seen += 1
        if not automatic:
            trainer._batches_that_stepped += 1
            trainer._stepped_since_log = True
        results.fx = "on_train_batch_end"
        for fn in on_batch_end:
            fn(outputs, batch, batch_idx)
        if trainer._stepped_since_log:
            trainer._stepped_since_log = False
            if trainer._batches_that_stepped % log_every == 0:
                trainer._log_step_metrics()
        not_last = n_batches is None or batch_idx + 1 < n_batches
        if check_val and not_last and ((val_every and _val_count(trainer, batch_idx) % val_every == 0)
                                       or (trainer.should_stop and _can_stop_early(trainer))):
            run_validation_in_fit(trainer)  # as Lightning, a stop request mid-epoch validates before stopping
        if automatic and window_end and trainer.lr_scheduler_configs:
            trainer._step_schedulers("step", plateau=True)  # step-interval ReduceLROnPlateau, after validation
        if snapshotter is not None:
            snapshotter.maybe_take(trainer)
        # Deadlines and preemption can differ between ranks: they are agreed one step later, overlapping the
        # all-reduce with the next step. max_steps and should_stop are the same on every rank already.
        late = trainer._stop_code(deadline)
        if agree is not None:
            late = agree(late)
            if late:
                trainer._adopt_stop_code(late)  # every rank now knows why (preemption, resize, deadline)
        stop = (max_steps != -1 and trainer.global_step >= max_steps) \
            or (trainer.should_stop and _can_stop_early(trainer)) or late
        if stop and not (n_batches is not None and batch_idx + 1 >= n_batches):
            stopped_mid_epoch = True
            break
    if stopped_mid_epoch:
        # Stopped inside the epoch (max_steps, should_stop, max_time, preemption): the state is that of the
        # last finished step, so a checkpoint taken now resumes exactly where this run left off.
        trainer.training = False
        trainer._finish_train_epoch_logging(call_hooks=False)
        return False
    trainer._epoch_done = True
    # As in Lightning: epoch schedulers step before validation and the epoch-end hooks (so an epoch-end
    # checkpoint holds the stepped scheduler); ReduceLROnPlateau waits for this epoch's metrics.
    trainer._step_schedulers("epoch", plateau=False)
    # As in Lightning: with val_check_interval the epoch's last batch validates only when it is a check batch.
    if check_val and (not val_every or _val_count(trainer, batch_idx) % val_every == 0):
        run_validation_in_fit(trainer)
    results.fx = "on_train_epoch_end"
    trainer._publish_train_epoch_metrics()  # on_train_epoch_end hooks read this epoch's reductions
    trainer._call_hook("on_train_epoch_end", monitoring_last=True)
    trainer._finish_train_epoch_logging(call_hooks=True)
    trainer._step_schedulers("epoch", plateau=True)
    trainer._batches_done_in_epoch = 0
    trainer._epoch_done = False
    trainer.training = False
    if hasattr(batch_sampler, "resume_from"):
        # Elastic run: this epoch may have been the remainder of an earlier world's; the next one is whole.
        trainer._epoch_segments = []
        batch_sampler.resume_from([])
        trainer.num_training_batches = trainer._limit(loader, "train")
    return True


def _val_count(trainer: "Trainer", batch_idx: int) -> int:
    """Batches counted by val_check_interval: this epoch's, or all so far when check_val_every_n_epoch=None."""
    return batch_idx + 1 if trainer.check_val_every_n_epoch is not None else trainer._total_batches_seen


def _automatic_step(trainer: "Trainer", module: Any, step_fn: Any, batch: Any, batch_idx: int, epoch: int,
                    window_end: bool, accumulate: int, detect: bool) -> Any:
    """training_step -> backward -> (on window end) hooks, clipping, optimizer step, schedulers."""
    optimizer = trainer.optimizers[0]
    first_in_window = batch_idx % accumulate == 0
    closure_used = trainer._closure_optimizer

    def run_step() -> Any:
        with trainer.strategy.no_backward_sync(not window_end):
            with trainer._precision.forward_context():
                out = step_fn(batch, batch_idx)
            loss = _training_loss(out, epoch, batch_idx, detect)
            # As in Lightning: gradients are cleared at a window's first batch even when the step returned
            # None, so the optimizer step that still follows at the window's end never reuses stale gradients.
            if first_in_window and not closure_used:
                trainer._zero_grad(optimizer, epoch, batch_idx)
            if loss is not None:
                trainer._run_backward(loss / accumulate if accumulate > 1 else loss, optimizer)
        return out, loss

    if window_end and (closure_used or trainer._module_optimizer_step is not None):
        # Optimizers like LBFGS re-evaluate the loss, and an overridden optimizer_step decides when the step
        # runs: hand them a closure that runs the whole step.
        box: list[Any] = []

        def closure() -> Any:
            if closure_used:
                trainer._zero_grad(optimizer, epoch, batch_idx)
            out, loss = run_step()
            box.append(out)
            return loss

        trainer._hooked_optimizer_step(optimizer, closure)
        return _step_output(box[-1] if box else None)

    out, loss = run_step()
    if window_end:
        # Lightning steps (and counts the step) at every window end, also when training_step returned None.
        trainer._hooked_optimizer_step(optimizer, None)
    return _step_output(out)


def _step_output(out: Any) -> Any:
    if out is None:
        return {}
    if isinstance(out, torch.Tensor):
        return {"loss": out.detach()}
    if isinstance(out, dict) and isinstance(out.get("loss"), torch.Tensor):
        return {**out, "loss": out["loss"].detach()}
    return out


def _training_loss(out: Any, epoch: int, batch_idx: int, detect: bool) -> torch.Tensor | None:
    if out is None:
        return None
    if isinstance(out, torch.Tensor):
        loss = out
    elif isinstance(out, dict):
        if "loss" not in out:
            raise StepError(f"training_step returned a dict without a 'loss' key (keys: {sorted(out)}) at epoch "
                            f"{epoch}, batch {batch_idx}. Return {{'loss': loss, ...}}, a loss tensor, or None "
                            "to skip the batch.")
        loss = out["loss"]
        if loss is None:
            return None
    else:
        raise StepError(f"training_step returned {type(out).__name__} at epoch {epoch}, batch {batch_idx}. "
                        "Return a scalar loss tensor, a dict with 'loss', or None to skip the batch.")
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0 and loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise StepError(f"training_step must return a scalar loss, got {shape} at epoch {epoch}, batch "
                        f"{batch_idx}. Reduce it first, e.g. loss.mean().")
    if not loss.requires_grad:
        raise StepError(f"the loss returned by training_step at epoch {epoch}, batch {batch_idx} does not "
                        "require grad: it is not connected to any trainable parameter (was it computed under "
                        "torch.no_grad() or from detached tensors?).")
    if detect and not bool(torch.isfinite(loss).all()):
        raise StepError(f"the loss is {loss.item()} at epoch {epoch}, batch {batch_idx} "
                        "(detect_anomaly=True). Lower the learning rate, check the inputs for NaN/inf, "
                        "or use gradient clipping.")
    return loss


def _manual_outputs(out: Any, epoch: int, batch_idx: int, detect: bool) -> Any:
    if detect and isinstance(out, torch.Tensor) and not bool(torch.isfinite(out).all()):
        raise StepError(f"training_step returned a non-finite value at epoch {epoch}, batch {batch_idx} "
                        "(detect_anomaly=True).")
    return _step_output(out)


def run_validation_in_fit(trainer: "Trainer") -> None:
    """Validation during fit: eval mode, no grad, then back to training."""
    if not trainer._val_dataloaders:
        return
    module = trainer.lightning_module
    was_training = trainer.training
    trainer.training = False
    evaluation_loop(trainer, "validate", trainer._val_dataloaders, limit=None)
    trainer.training = was_training
    trainer._bind_results(trainer._results["train"])


# --------------------------------------------------------------------------------------- evaluation
def evaluation_loop(trainer: "Trainer", stage: str, dataloaders: list[Any], limit: int | None) -> list[dict]:
    """Run validation_step or test_step over every dataloader; returns one dict of metrics per loader."""
    module = trainer.lightning_module
    prefix = "validation" if stage == "validate" else "test"
    step_fn = trainer._step_callable(f"{prefix}_step")
    takes_dl_idx = _accepts_dataloader_idx(getattr(module, f"{prefix}_step"))
    results = trainer._results[stage]
    trainer._bind_results(results)
    counts = [trainer._limit(dl, stage) for dl in dataloaders]
    if limit is not None:
        counts = [min(c, limit) if c is not None else limit for c in counts]
    trainer._eval_batch_counts = [c or 0 for c in counts]
    modes = _capture_modes(module)
    getattr(module, f"on_{prefix}_model_eval")()
    trainer._call_hook(f"on_{prefix}_start")
    per_loader: list[dict] = []
    with _no_grad(trainer):
        results.reset_epoch()
        trainer._call_hook(f"on_{prefix}_epoch_start")
        for dl_idx, loader in enumerate(dataloaders):
            results.dataloader_suffix = f"/dataloader_idx_{dl_idx}" if len(dataloaders) > 1 else ""
            batches: Iterable[Any] = iter(loader)
            if counts[dl_idx] is not None:
                batches = itertools.islice(batches, counts[dl_idx])
            for batch_idx, batch in enumerate(batches):
                batch = trainer.strategy.batch_to_device(batch)
                results.batch = batch
                extra = (dl_idx,) if len(dataloaders) > 1 else ()
                results.fx = f"on_{prefix}_batch_start"
                trainer._call_hook(f"on_{prefix}_batch_start", batch, batch_idx, *extra)
                results.fx = f"{prefix}_step"
                with trainer._precision.forward_context():
                    if takes_dl_idx and len(dataloaders) > 1:
                        out = step_fn(batch, batch_idx, dl_idx)
                    else:
                        out = step_fn(batch, batch_idx)
                results.fx = f"on_{prefix}_batch_end"
                trainer._call_hook(f"on_{prefix}_batch_end", out, batch, batch_idx, *extra)
                if not trainer.sanity_checking:
                    trainer._log_eval_step_metrics(stage, dl_idx)
        results.dataloader_suffix = ""
        results.fx = f"on_{prefix}_epoch_end"
        trainer._publish_eval_epoch_metrics(stage)
        trainer._call_hook(f"on_{prefix}_epoch_end")
    per_loader = trainer._finish_eval_logging(stage, len(dataloaders))
    trainer._call_hook(f"on_{prefix}_end", monitoring_last=stage == "validate")
    _restore_modes(module, modes, f"on_{prefix}_model_train")
    return per_loader


def _capture_modes(module: torch.nn.Module) -> list[tuple[torch.nn.Module, bool]]:
    """Every submodule's training flag, to put back after evaluation (Lightning's _ModuleMode)."""
    return [(m, m.training) for m in module.modules()]


def _restore_modes(module: Any, modes: list[tuple[torch.nn.Module, bool]], hook: str | None) -> None:
    """Call the user's on_*_model_train when overridden; otherwise restore the captured flags."""
    from raytrainer.callbacks.callback import overrides
    from raytrainer.module import LightningModule

    if hook is not None and overrides(module, LightningModule, hook):
        getattr(module, hook)()
        return
    for m, training in modes:
        m.training = training


def _no_grad(trainer: "Trainer") -> Any:
    """inference_mode, or no_grad when asked (Trainer(inference_mode=False)) or where the device cannot run
    under it (XLA, as in Lightning)."""
    if trainer.inference_mode and trainer.strategy.supports_inference_mode:
        return torch.inference_mode()
    return torch.no_grad()


def _accepts_dataloader_idx(fn: Any) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return len(params) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params.values())


# ------------------------------------------------------------------------------------------ predict
def predict_loop(trainer: "Trainer", dataloaders: list[Any], return_predictions: bool) -> list[Any] | None:
    """Run predict_step over every dataloader under inference_mode, in dataset order."""
    module = trainer.lightning_module
    step_fn = module.predict_step
    trainer._bind_results(None)
    counts = [trainer._limit(dl, "predict") for dl in dataloaders]
    trainer._eval_batch_counts = [c or 0 for c in counts]
    modes = _capture_modes(module)
    module.on_predict_model_eval()
    all_preds: list[list[Any]] = []
    with _no_grad(trainer):
        trainer._call_hook("on_predict_start")
        trainer._call_hook("on_predict_epoch_start")
        for dl_idx, loader in enumerate(dataloaders):
            preds: list[Any] = []
            batches: Iterable[Any] = iter(loader)
            if counts[dl_idx] is not None:
                batches = itertools.islice(batches, counts[dl_idx])
            for batch_idx, batch in enumerate(batches):
                batch = trainer.strategy.batch_to_device(batch)
                extra = (dl_idx,) if len(dataloaders) > 1 else ()
                trainer._call_hook("on_predict_batch_start", batch, batch_idx, *extra)
                with trainer._precision.forward_context():
                    out = step_fn(batch, batch_idx, dl_idx) if len(dataloaders) > 1 else step_fn(batch, batch_idx)
                trainer._call_hook("on_predict_batch_end", out, batch, batch_idx, *extra)
                if return_predictions:
                    preds.append(out)
            all_preds.append(preds)
        trainer._call_hook("on_predict_epoch_end")
        trainer._call_hook("on_predict_end")
    _restore_modes(module, modes, None)
    if not return_predictions:
        return None
    return all_preds[0] if len(all_preds) == 1 else all_preds


def clip_for_trainer(trainer: "Trainer", optimizer: torch.optim.Optimizer) -> None:
    """Trainer-level gradient clipping (gradient_clip_val / gradient_clip_algorithm)."""
    clip_gradients(optimizer, trainer.gradient_clip_val, trainer.gradient_clip_algorithm, trainer._precision)
