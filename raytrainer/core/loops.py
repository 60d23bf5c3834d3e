"""The loops: fit (train + validation), evaluation (validate/test) and predict, read top to bottom.

Hooks are called in Lightning's order. Per-batch hooks are looked up once per run (only the
callbacks and module methods that are actually overridden are called), so an empty hook costs
nothing in the training step.
"""
from __future__ import annotations

import contextlib
import inspect
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Sampler

from raytrainer.core import step
from raytrainer.data.samplers import data_source, rebuild, skip_at_sampler
from raytrainer.profilers import Profiler, profiled, profiled_iter
from raytrainer.utilities.combined_loader import CombinedLoader

if TYPE_CHECKING:
    from raytrainer.core.session import RankSession


# ---------------------------------------------------------------------------------------------- fit
def fit_loop(session: RankSession) -> None:
    """Train epochs until a stop condition, validating as configured."""
    module, state, sanity_steps = session.module, session.state, session.config.num_sanity_val_steps
    session.hooks.call("on_fit_start")
    if session.val_dataloaders and sanity_steps != 0 and not state.resuming:
        if session.config.reload_dataloaders_every_n_epochs and session.should_validate_epoch(state.current_epoch):
            session.reload_val_if_due(state.current_epoch)  # marks the validation loaders as loaded for this epoch
        stage = session.trainer_state.stage
        session.sanity_checking = True
        session.hooks.callbacks_only("on_sanity_check_start")
        # num_sanity_val_steps=-1 checks every validation batch (up to limit_val_batches), as in Lightning
        evaluation_loop(session, "validate", session.val_dataloaders,
                        limit=None if sanity_steps < 0 else sanity_steps)
        session.hooks.callbacks_only("on_sanity_check_end")
        session.trainer_state.stage = stage  # back to training, as Lightning
        session.results["validate"].reset_epoch()
    session.bind_results(session.results["train"])  # self.log in on_train_start belongs to training
    if _fit_done(session):
        # Nothing to train (a finished run resumed, limit_train_batches=0): as Lightning, no on_train_start/end.
        session.hooks.call("on_fit_end")
        return
    session.hooks.call("on_train_start")
    session.last_val_time = time.monotonic()  # time-based val_check_interval counts from here (Lightning)
    deadline = time.monotonic() + session.config.max_time_s if session.config.max_time_s else None
    run_epoch = train_epoch if session.profiler is None else profiled(session.profiler, "run_training_epoch",
                                                                       train_epoch)
    while not _fit_done(session):
        completed = run_epoch(session, module, deadline)
        if not completed:
            break
        state.current_epoch += 1
        if deadline is not None and time.monotonic() >= deadline:
            session.should_stop = True
    session.hooks.call("on_train_end")
    session.hooks.call("on_fit_end")


def _fit_done(session: RankSession) -> bool:
    state, config = session.state, session.config
    if config.max_steps != -1 and state.global_step >= config.max_steps:
        return True
    if config.max_epochs is not None and config.max_epochs != -1 and state.current_epoch >= config.max_epochs:
        return True
    if session.should_stop:
        if _can_stop_early(session):
            return True
        session.should_stop = False  # min_epochs/min_steps not reached yet: keep going, as Lightning does
    return session.num_training_batches == 0


def _can_stop_early(session: RankSession) -> bool:
    """Whether a should_stop request may end training now: min_epochs and min_steps are met."""
    state, config = session.state, session.config
    return state.current_epoch >= (config.min_epochs or 0) and state.global_step >= (config.min_steps or 0)


def train_epoch(session: RankSession, module: Any, deadline: float | None) -> bool:
    """One training epoch. Returns False when the run stopped in the middle of it."""
    state, config = session.state, session.config
    epoch = state.current_epoch
    results = session.results["train"]
    results.reset_epoch()
    session.bind_results(results)
    strategy = session.strategy
    if config.reload_dataloaders_every_n_epochs:
        session.reload_train_if_due(epoch)
    loader = session.train_dataloader
    combined = loader if isinstance(loader, CombinedLoader) else None
    batch_sampler = None
    for dl in combined.flattened if combined is not None else (loader,):
        batch_sampler = getattr(dl, "batch_sampler", None)
        for part in (getattr(dl, "sampler", None), batch_sampler, data_source(dl)):
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)
    source = data_source(loader) if combined is None else None

    # No module.train() here: as in Lightning 2.x the module keeps the modes the user gave its submodules
    # (a frozen backbone stays in eval); evaluation restores them when it ends.
    session.training = True
    session.hooks.call("on_train_epoch_start")

    # Data position: remember the RNG that orders this epoch, so a resume can rebuild the order.
    state.epoch_done = False
    start = state.take_resume(epoch)
    first = start.batch_idx if start else 0
    if start and start.results:
        results.load_accum_state_dict(start.results)  # epoch means continue over the batches already trained
    if start and not first:
        session.restore_rng(start)          # resuming at an epoch boundary: RNG as it was then
    elif start and start.epoch_rng is not None:
        torch.set_rng_state(start.epoch_rng)  # rebuild this epoch's data order ...
    state.epoch_start_rng = torch.get_rng_state()
    segments = [list(x) for x in start.segments] if start and start.segments else []
    if hasattr(batch_sampler, "resume_from"):
        # Elastic run: the sampler leaves out what earlier worlds of this epoch trained, so nothing is skipped here.
        state.epoch_segments = segments
        batch_sampler.resume_from(state.epoch_segments)
        first = 0
        session.num_training_batches = session.limit(loader, "train")
    elif hasattr(source, "start_at"):
        if start and start.data and source.fingerprint() != start.data:
            raise ValueError(f"the checkpoint's position is in other data: its ParquetDataset had fingerprint "
                             f"{start.data}, this one has {source.fingerprint()} (files, row groups, shuffle, seed, "
                             "shuffle_buffer_size or drop_last changed). Resume with the same dataset and options, "
                             "or start a fresh fit (ckpt_path=None).")
        # A resumable source (ParquetDataset) starts reading at its saved position (same world), or splits what
        # earlier worlds of this epoch left (another world): nothing before it is read.
        if first and not segments:  # a checkpoint without segments: this world's plan, at the saved batch
            segments = [[source.world, first, source.batch_size]]
        first = source.start_at(segments)
        session.num_training_batches = session.limit(loader, "train")
    limit = session.num_training_batches
    skipper = skip_at_sampler(loader, first) if first and combined is None else None
    if skipper is not None:
        loader, prime = skipper
        if loader.persistent_workers and epoch > 0:
            prime()  # a persistent iterator draws no new base seed after its first epoch: the order comes first
    batches: Iterable[Any] = iter(loader) if combined is None else \
        combined.batches(_cycle_restarts(state.epoch_start_rng) if combined.mode == "max_size_cycle" else None)
    if first:
        # ... skip what was trained now, before the RNG moves on (the sampler draws its order on the first batch):
        # by index for a map-style DataLoader, by position for a resumable source, else by reading and dropping
        # batches (a Ray Data loader starts a fresh pass instead, see RayDataLoader) ...
        if skipper is not None:
            prime()
        elif not hasattr(source, "start_at") and not getattr(source, "fresh_pass_on_resume", False):
            for _ in itertools.islice(batches, first):
                pass
        session.restore_rng(start)                         # ... and continue with the RNG of that moment
    if limit is not None and not math.isinf(limit):
        batches = itertools.islice(batches, max(int(limit) - first, 0))
    if session.profiler is not None:
        batches = profiled_iter(session.profiler, "[_TrainingEpochLoop].train_dataloader_next", batches)

    hooks = session.hooks.hot
    on_batch_start, on_batch_end = hooks["on_train_batch_start"], hooks["on_train_batch_end"]
    automatic = module.automatic_optimization
    step_fn = session.step_callable("training_step")
    automatic_step = step.automatic_step if session.profiler is None else \
        profiled(session.profiler, "run_training_batch", step.automatic_step)
    to_device = session.to_device
    val_every = session.val_check_batches
    val_time = config.val_check_time_s
    check_val = session.should_validate_epoch(epoch)
    accumulate = config.accumulate_grad_batches
    detect = config.detect_anomaly
    log_every = config.log_every_n_steps or math.inf  # 0 (barebones): never a step to log
    max_steps = config.max_steps
    n_batches = session.num_training_batches
    batch_idx = first - 1
    stopped_mid_epoch = False
    snapshotter = session.snapshotter
    agree = strategy.stop_agreement() if strategy.distributed else None
    for batch_idx, batch in enumerate(batches, start=first):
        state.batch_idx = batch_idx
        if to_device is not None:
            batch = to_device(batch, 0)
        results.batch = batch
        skip_rest = False
        if on_batch_start:
            results.fx = "on_train_batch_start"  # self.log there: step-level defaults and checks (Lightning)
        for fn in on_batch_start:
            if fn(batch, batch_idx) == -1:
                skip_rest = True
        if skip_rest:
            break
        results.fx = "training_step"
        if automatic:
            is_last = n_batches is not None and batch_idx + 1 >= n_batches
            window_end = (batch_idx + 1) % accumulate == 0 or is_last
            outputs = automatic_step(session, step_fn, batch, batch_idx, epoch, window_end, accumulate, detect)
        else:
            with session.precision.forward_context():
                outputs = step_fn(batch, batch_idx)
            outputs = step.manual_outputs(outputs, epoch, batch_idx, detect)
        state.batches_done_in_epoch = batch_idx + 1
        state.total_batches_seen += 1
        if not automatic:
            state.batches_that_stepped += 1
            state.stepped_since_log = True
        results.fx = "on_train_batch_end"
        for fn in on_batch_end:
            fn(outputs, batch, batch_idx)
        if state.stepped_since_log:
            state.stepped_since_log = False
            if state.batches_that_stepped % log_every == 0:
                session.log_step_metrics()
        not_last = n_batches is None or batch_idx + 1 < n_batches
        if check_val and not_last and ((val_every and _val_count(session, batch_idx) % val_every == 0)
                                       or (session.should_stop and _can_stop_early(session))
                                       or (val_time is not None and time.monotonic() - session.last_val_time
                                           >= val_time)):
            # as Lightning, a stop request mid-epoch validates before stopping
            run_validation_in_fit(session, zero_grad=not automatic or window_end)
        if automatic and window_end and session.lr_scheduler_configs:
            step.step_schedulers(session, "step", plateau=True)  # step-interval ReduceLROnPlateau, after validation
        if snapshotter is not None:
            snapshotter.maybe_take(session)
        # Deadlines and preemption can differ between ranks: they are agreed one step later, overlapping the
        # all-reduce with the next step. max_steps and should_stop are the same on every rank already.
        late = session.stop_code(deadline)
        if agree is not None:
            late = agree(late)
            if late:
                session.adopt_stop_code(late)  # every rank now knows why (preemption, resize, deadline)
        stop = (max_steps != -1 and state.global_step >= max_steps) \
            or (session.should_stop and _can_stop_early(session)) or late
        if stop and not (n_batches is not None and batch_idx + 1 >= n_batches):
            stopped_mid_epoch = True
            break
    if stopped_mid_epoch:
        # Stopped inside the epoch (max_steps, should_stop, max_time, preemption): the state is that of the
        # last finished step, so a checkpoint taken now resumes exactly where this run left off.
        session.finish_train_epoch_logging()
        return False
    state.epoch_done = True
    # As in Lightning: epoch schedulers step before validation and the epoch-end hooks (so an epoch-end
    # checkpoint holds the stepped scheduler); ReduceLROnPlateau waits for this epoch's metrics.
    step.step_schedulers(session, "epoch", plateau=False)
    # As in Lightning: with val_check_interval the epoch's last batch validates only when it is a check batch
    # (or, time-based, when the interval has passed).
    if check_val and (time.monotonic() - session.last_val_time >= val_time if val_time is not None
                      else not val_every or _val_count(session, batch_idx) % val_every == 0):
        run_validation_in_fit(session, zero_grad=True)
    results.fx = "on_train_epoch_end"
    session.publish_train_epoch_metrics()  # on_train_epoch_end hooks read this epoch's reductions
    session.hooks.call("on_train_epoch_end", monitoring_last=True)
    session.finish_train_epoch_logging()
    step.step_schedulers(session, "epoch", plateau=True)
    state.batches_done_in_epoch = 0
    state.epoch_done = False
    if hasattr(batch_sampler, "resume_from") or hasattr(source, "start_at"):
        # This epoch may have been the remainder of an earlier world's; the next one is whole.
        state.epoch_segments = []
        for part in (batch_sampler, source):
            if hasattr(part, "resume_from"):
                part.resume_from([])
            elif hasattr(part, "set_epoch"):
                part.set_epoch(epoch + 1)
        session.num_training_batches = session.limit(loader, "train")
    return True


def _val_count(session: RankSession, batch_idx: int) -> int:
    """Batches counted by val_check_interval: this epoch's, or all so far when check_val_every_n_epoch=None."""
    return batch_idx + 1 if session.config.check_val_every_n_epoch is not None else session.state.total_batches_seen


def _cycle_restarts(epoch_rng: torch.Tensor | None) -> Callable[[int], AbstractContextManager[Any]]:
    """How a max_size_cycle loader restarts a shorter loader: under a CPU RNG seeded from the epoch's start RNG,
    the loader index and the restart count, so a resumed run's skip rebuilds the same order (the training
    steps in between moved the global RNG, which a skip cannot replay)."""
    gen = torch.Generator()
    if epoch_rng is not None:
        gen.set_state(epoch_rng)
    base = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    restarts: dict[int, int] = {}

    @contextlib.contextmanager
    def context(i: int) -> Iterator[None]:
        restarts[i] = restarts.get(i, 0) + 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(base + 100_003 * i + restarts[i])
            yield
    return context


def run_validation_in_fit(session: RankSession, zero_grad: bool = False) -> None:
    """Validation during fit: eval mode, no grad, then back to training. ``zero_grad``: no accumulation window is
    open, so on_validation_model_zero_grad releases the gradients first (Lightning)."""
    if not session.val_dataloaders:
        return
    if session.config.reload_dataloaders_every_n_epochs:
        session.reload_val_if_due(session.state.current_epoch)
    if zero_grad:
        session.module.on_validation_model_zero_grad()
    stage = session.trainer_state.stage
    session.validating = True
    evaluation_loop(session, "validate", session.val_dataloaders, limit=None)
    session.trainer_state.stage = stage  # back to training, as Lightning
    session.last_val_time = time.monotonic()
    session.bind_results(session.results["train"])


# --------------------------------------------------------------------------------------- evaluation
def evaluation_loop(session: RankSession, stage: str, dataloaders: list[Any], limit: int | None) -> list[dict]:
    """Run validation_step or test_step over every dataloader; returns one dict of metrics per loader."""
    module = session.module
    prefix = "validation" if stage == "validate" else "test"
    step_fn = session.step_callable(f"{prefix}_step")
    takes_dl_idx = _accepts_dataloader_idx(getattr(module, f"{prefix}_step"))
    results = session.results[stage]
    session.bind_results(results)
    counts = [session.unit_batches(dl, stage) for dl in dataloaders]
    if limit is not None:
        counts = [min(c, limit) if c is not None else limit for c in counts]
    session.eval_batch_counts = [0 if not c or math.isinf(c) else int(c) for c in counts]  # 0: unknown
    to_device = session.to_device
    modes = _capture_modes(module)
    getattr(module, f"on_{prefix}_model_eval")()
    session.hooks.call(f"on_{prefix}_start")
    per_loader: list[dict] = []
    with _no_grad(session):
        results.reset_epoch()
        session.hooks.call(f"on_{prefix}_epoch_start")
        for dl_idx, loader in enumerate(dataloaders):
            results.dataloader_suffix = f"/dataloader_idx_{dl_idx}" if len(dataloaders) > 1 else ""
            for batch_idx, batch in _eval_batches(loader, counts[dl_idx], to_device, dl_idx, session.profiler,
                                                  f"[_EvaluationLoop].{'val' if stage == 'validate' else 'test'}_next"):
                results.batch = batch
                extra = (dl_idx,) if len(dataloaders) > 1 else ()
                results.fx = f"on_{prefix}_batch_start"
                session.hooks.call(f"on_{prefix}_batch_start", batch, batch_idx, *extra)
                results.fx = f"{prefix}_step"
                with session.precision.forward_context():
                    if takes_dl_idx and len(dataloaders) > 1:
                        out = step_fn(batch, batch_idx, dl_idx)
                    else:
                        out = step_fn(batch, batch_idx)
                results.fx = f"on_{prefix}_batch_end"
                session.hooks.call(f"on_{prefix}_batch_end", out, batch, batch_idx, *extra)
                if not session.sanity_checking:
                    session.log_eval_step_metrics(stage, dl_idx)
        results.dataloader_suffix = ""
        results.fx = f"on_{prefix}_epoch_end"
        session.publish_eval_epoch_metrics(stage)
        session.hooks.call(f"on_{prefix}_epoch_end")
    per_loader = session.finish_eval_logging(stage, len(dataloaders))
    session.hooks.call(f"on_{prefix}_end", monitoring_last=stage == "validate")
    _restore_modes(module, modes, f"on_{prefix}_model_train")
    return per_loader


def _eval_batches(loader: Any, count: int | float | None, to_device: Any, dl_idx: int,
                  profiler: Profiler | None = None, action: str = "") -> Iterator[tuple[int, Any]]:
    """(batch_idx, batch) of one evaluation/predict loader: at most ``count`` batches, through the batch
    transfer hooks; each fetch recorded as ``action`` when a profiler is on."""
    batches: Iterable[Any] = iter(loader) if not isinstance(loader, CombinedLoader) else \
        (batch for batch, _, _ in loader)  # a CombinedLoader of a non-sequential mode: one loader of combined batches
    if count is not None and not math.isinf(count):
        batches = itertools.islice(batches, int(count))
    if profiler is not None:
        batches = profiled_iter(profiler, action, batches)
    for batch_idx, batch in enumerate(batches):
        yield batch_idx, (to_device(batch, dl_idx) if to_device is not None else batch)


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


def _no_grad(session: RankSession) -> Any:
    """inference_mode, or no_grad when asked (Trainer(inference_mode=False)) or where the device cannot run
    under it (XLA, as in Lightning)."""
    if session.config.inference_mode and session.strategy.supports_inference_mode:
        return torch.inference_mode()
    return torch.no_grad()


def _accepts_dataloader_idx(fn: Any) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return len(params) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params.values())


# ------------------------------------------------------------------------------------------ predict
def predict_loop(session: RankSession, dataloaders: list[Any], return_predictions: bool) -> list[Any] | None:
    """Run predict_step over every dataloader under inference_mode, in dataset order."""
    module = session.module
    step_fn = session.step_callable("predict_step")
    session.bind_results(None)
    counts = [session.unit_batches(dl, "predict") for dl in dataloaders]
    session.eval_batch_counts = [0 if not c or math.isinf(c) else int(c) for c in counts]  # 0: unknown
    to_device = session.to_device
    modes = _capture_modes(module)
    module.on_predict_model_eval()
    all_preds: list[list[Any]] = []
    # BasePredictionWriter: the dataset indices of each batch, and the predictions of an epoch-interval writer
    writers = [cb for cb in session.callbacks if hasattr(cb, "write_on_epoch_end")]
    keep = return_predictions or any(getattr(cb, "interval", None) in ("epoch", "batch_and_epoch") for cb in writers)
    session.predict_batch_indices = [[] for _ in dataloaders]
    session.current_batch_indices = None
    with _no_grad(session):
        session.hooks.call("on_predict_start")
        session.hooks.call("on_predict_epoch_start")
        for dl_idx, loader in enumerate(dataloaders):
            preds: list[Any] = []
            recorder = None
            if writers and isinstance(loader, DataLoader) and loader.batch_sampler is not None:
                recorder = _IndexRecorder(loader.batch_sampler)
                loader = rebuild(loader, batch_sampler=recorder)
            for batch_idx, batch in _eval_batches(loader, counts[dl_idx], to_device, dl_idx, session.profiler,
                                                  "[_PredictionLoop].predict_next"):
                if recorder is not None:
                    session.current_batch_indices = recorder.seen[batch_idx]
                    session.predict_batch_indices[dl_idx].append(recorder.seen[batch_idx])
                extra = (dl_idx,) if len(dataloaders) > 1 else ()
                session.hooks.call("on_predict_batch_start", batch, batch_idx, *extra)
                with session.precision.forward_context():
                    out = step_fn(batch, batch_idx, dl_idx) if len(dataloaders) > 1 else step_fn(batch, batch_idx)
                session.hooks.call("on_predict_batch_end", out, batch, batch_idx, *extra)
                if keep:
                    preds.append(out)
            all_preds.append(preds)
        session.predictions = all_preds[0] if len(all_preds) == 1 else all_preds
        session.hooks.call("on_predict_epoch_end")
        session.hooks.call("on_predict_end")
    _restore_modes(module, modes, None)
    session.predictions = None  # not kept past the call (they may be large)
    if not return_predictions:
        return None
    return all_preds[0] if len(all_preds) == 1 else all_preds


class _IndexRecorder(Sampler[list[int]]):
    """Wraps a batch sampler and records the dataset indices of every batch it yields (for prediction writers)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seen: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        self.seen = []
        for indices in self.inner:
            self.seen.append(list(indices))
            yield indices

    def __len__(self) -> int:
        return len(self.inner)
