"""ModelCheckpoint: save automatically (top-k by a metric, last, every N steps/epochs/seconds).

Writes are crash-safe (``checkpoint.storage``: temporary name + atomic rename, or upload + manifest)
and, by default, asynchronous. The training thread copies to host memory only what the next forward
could change (buffers, RNG states); a helper thread copies the parameters and optimizer state while
the next step computes, and the next optimizer step waits for that copy (``_Snapshot``, built on
``checkpoint.host_copy.HostCopy``); the ``checkpoint.writer.AsyncCheckpointWriter`` thread
serialises, hashes and writes. ``fit`` waits for all of it before it returns. A checkpoint rotated
out by ``save_top_k`` is deleted only once its replacement is completely on storage, so rotation
never removes the only valid one. A ``checkpoint`` event (``trainer.saved_checkpoints``, events.jsonl)
is recorded only once its file is complete on storage, on the training thread at the next step or
wait; a write that fails or never finishes records nothing.
"""
from __future__ import annotations

import collections
import math
import re
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch

from raytrainer.callbacks.checkpoint import Checkpoint
from raytrainer.checkpoint.host_copy import HostCopy, view_key
from raytrainer.utilities import log
from raytrainer.utilities.exceptions import MisconfigurationException, MisconfigurationRuntimeError

_MODES = {"min": (torch.tensor(math.inf), torch.lt), "max": (torch.tensor(-math.inf), torch.gt)}


class ModelCheckpoint(Checkpoint):
    """Lightning's ModelCheckpoint; writes are crash-safe and, by default, off the training thread."""

    CHECKPOINT_NAME_LAST = "last"
    CHECKPOINT_JOIN_CHAR = "-"
    CHECKPOINT_EQUALS_CHAR = "="
    FILE_EXTENSION = ".ckpt"
    STARTING_VERSION = 1

    def __init__(self, dirpath: str | None = None, filename: str | None = None, monitor: str | None = None,
                 verbose: bool = False, save_last: bool | None = None, save_top_k: int = 1,
                 save_on_exception: bool = False, save_weights_only: bool = False, mode: str = "min",
                 auto_insert_metric_name: bool = True,
                 every_n_train_steps: int | None = None, train_time_interval: timedelta | None = None,
                 every_n_epochs: int | None = None, save_on_train_epoch_end: bool | None = None,
                 enable_version_counter: bool = True, async_save: bool = True) -> None:
        """Arguments as in Lightning (``save_on_exception``: also write a checkpoint when the run raises);
        ``async_save=False`` writes on the training thread instead."""
        if mode not in _MODES:
            raise MisconfigurationException(f"ModelCheckpoint(mode={mode!r}): use 'min' or 'max'.")
        if not isinstance(save_top_k, int) or save_top_k < -1:
            raise MisconfigurationException(
                f"ModelCheckpoint(save_top_k={save_top_k!r}): use -1 (all), 0 (none) or k >= 1.")
        if monitor is None and save_top_k not in (-1, 0, 1):
            raise MisconfigurationException(f"ModelCheckpoint(save_top_k={save_top_k}) ranks checkpoints by a "
                                            "metric: pass monitor='val_loss' (or another logged name).")
        if train_time_interval is not None and not isinstance(train_time_interval, timedelta):
            raise TypeError(f"ModelCheckpoint(train_time_interval={train_time_interval!r}) must be a "
                            "datetime.timedelta, e.g. timedelta(minutes=30).")
        given = [n for n, v in (("every_n_train_steps", every_n_train_steps),
                                ("train_time_interval", train_time_interval),
                                ("every_n_epochs", every_n_epochs)) if v]
        for n, v in (("every_n_train_steps", every_n_train_steps), ("every_n_epochs", every_n_epochs)):
            if v is not None and (not isinstance(v, int) or v < 0):
                raise MisconfigurationException(f"ModelCheckpoint({n}={v!r}) must be an int >= 0.")
        if len(given) > 1:
            raise MisconfigurationException(f"ModelCheckpoint: {given} are mutually exclusive; pick one trigger.")
        self._dirpath_given = dirpath is not None
        self.dirpath = str(dirpath) if dirpath is not None else None
        self.filename = filename
        self.monitor = monitor
        self.verbose = verbose
        self.save_last = save_last
        self.save_top_k = save_top_k
        self.save_on_exception = save_on_exception
        self.save_weights_only = save_weights_only
        self.mode = mode
        self.auto_insert_metric_name = auto_insert_metric_name
        self.every_n_train_steps = every_n_train_steps or 0
        self.train_time_interval = train_time_interval
        self.every_n_epochs = every_n_epochs if every_n_epochs is not None else (0 if given else 1)
        self.save_on_train_epoch_end = save_on_train_epoch_end
        self.enable_version_counter = enable_version_counter
        self.async_save = async_save
        self.best_k_models: dict[str, torch.Tensor] = {}
        self.kth_best_model_path = ""
        self.kth_value = _MODES[mode][0].clone()
        self.best_model_path = ""
        self.best_model_score: torch.Tensor | None = None
        self.current_score: torch.Tensor | None = None
        self.last_model_path = ""
        self._last_global_step_saved = 0  # no checkpoint before the first optimizer step
        self._last_time = time.monotonic()
        self._val_ran = False
        self._warned_missing: set[str] = set()
        self._written: set[str] = set()  # paths this run wrote or queued (so version counters see queued files)
        self._to_remove: list[tuple[str, str]] = []  # (rotated-out path, the newer path it waits for)
        self._writer: Any = None
        self._snapshot: _Snapshot | None = None
        self._sharded_pending: list[Any] = []  # FSDP: asynchronous sharded saves in flight (sharded.PendingSave)
        self._sharded_landing: _Landing | None = None  # what the sharded saves in flight record once published
        # (session, step, epoch, path) of files complete on storage, appended by the writer thread and recorded
        # as checkpoint events by the training thread (_record_landed)
        self._landed: collections.deque[tuple[Any, int, int, str]] = collections.deque()
        self._pool: dict[tuple, torch.Tensor] = {}  # host buffers reused by consecutive snapshots

    @property
    def state_key(self) -> str:
        """Lightning's key for this callback's state: the settings that tell two instances apart."""
        return (f"ModelCheckpoint{{'monitor': {self.monitor!r}, 'mode': {self.mode!r}, 'every_n_train_steps': "
                f"{self.every_n_train_steps}, 'every_n_epochs': {self.every_n_epochs}, 'train_time_interval': "
                f"{self.train_time_interval!r}}}")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Best scores and paths, as Lightning stores them."""
        return {"monitor": self.monitor, "best_model_score": self.best_model_score,
                "best_model_path": self.best_model_path, "current_score": self.current_score,
                "dirpath": self.dirpath, "best_k_models": dict(self.best_k_models),
                "kth_best_model_path": self.kth_best_model_path, "kth_value": self.kth_value,
                "last_model_path": self.last_model_path}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore best scores; the top-k bookkeeping only when the checkpoints live in this dirpath."""
        self.best_model_score = state_dict.get("best_model_score")
        self.best_model_path = state_dict.get("best_model_path", "")
        self.current_score = state_dict.get("current_score")
        if self.dirpath is None:  # not set up in this process (the driver after a run on Ray ranks): adopt it
            self.dirpath = state_dict.get("dirpath")
        if state_dict.get("dirpath") == self.dirpath:
            self.best_k_models = dict(state_dict.get("best_k_models", {}))
            self.kth_best_model_path = state_dict.get("kth_best_model_path", "")
            kth = state_dict.get("kth_value")
            if kth is not None:
                self.kth_value = torch.as_tensor(kth)
            self.last_model_path = state_dict.get("last_model_path", "")

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Pick the directory (``<log_dir>/checkpoints`` unless dirpath was given) and create it."""
        from raytrainer.io import storage

        if self.dirpath is None:
            base = trainer.log_dir if trainer.loggers else trainer.default_root_dir
            lg = trainer.logger
            if getattr(lg, "sub_dir", None):  # as Lightning: <save_dir>/<name>/<version>/checkpoints, not in sub_dir
                base = storage.join(lg.root_dir, lg.version if isinstance(lg.version, str) else f"version_{lg.version}")
            self.dirpath = storage.join(base, "checkpoints")
        if stage == "fit" and trainer.is_global_zero:
            storage.makedirs(self.dirpath)
        self._val_ran = False

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Start the train_time_interval clock when training starts."""
        self._last_time = time.monotonic()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Record the saves that landed meanwhile; save every ``every_n_train_steps`` optimizer steps or every
        ``train_time_interval``."""
        self._poll_sharded()
        self._record_landed()
        step = trainer.global_step
        if step == self._last_global_step_saved:
            return
        due = False
        if self.every_n_train_steps:
            due = step % self.every_n_train_steps == 0
        elif self.train_time_interval is not None:
            elapsed = time.monotonic() - self._last_time
            if trainer.strategy is not None and trainer.strategy.distributed:
                elapsed = float(trainer.strategy.broadcast(elapsed))  # every rank decides alike
            due = elapsed >= self.train_time_interval.total_seconds()
        if due:
            self._save_all(trainer)
            self._last_time = time.monotonic()

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Epoch-end saves (when validation does not decide them, see ``on_validation_end``)."""
        self._record_landed()
        if self._save_on_epoch_end(trainer):
            self._save_epoch(trainer)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        """Save after each validation when it runs mid-epoch or not every epoch, as Lightning does."""
        if trainer.state_fn != "fit" or trainer.sanity_checking:
            return
        self._val_ran = True
        if not self._save_on_epoch_end(trainer):
            self._save_epoch(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Make a run stopped mid-epoch (max_steps, max_time, preemption) resumable, then wait for writes."""
        if self.save_last is not False and trainer.session.state.batches_done_in_epoch \
                and trainer.global_step != self._last_global_step_saved:
            self._save_last(trainer)
        self.wait_for_writes()

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """The fence of a pipelined snapshot: weights change only after their host copy is complete."""
        if self._snapshot is not None:
            self._snapshot.wait_copied()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Let queued writes finish; with ``save_on_exception`` write a checkpoint of the state the exception left
        (named by the filename template, plus last.ckpt with save_last), as Lightning does. A write failure is
        logged so the original exception stays visible (the caller re-raises it)."""
        try:
            self._join_snapshot()
            self._wait_sharded()
            if self._writer is not None:
                self._writer.wait()
        except Exception as exc:
            log.warning("a background checkpoint write also failed: %s", exc)
        self._record_landed(quiet=True)
        if not self._should_save_on_exception(trainer):
            return
        try:
            metrics = self._metrics(trainer)
            paths = [self.format_checkpoint_name(metrics)]
            if self.save_last:
                self.last_model_path = self._last_path()
                paths.append(self.last_model_path)
            self._write_now(trainer, paths)
        except Exception as exc:
            log.warning("ModelCheckpoint(save_on_exception=True) could not write a checkpoint after %s: %s",
                        type(exception).__name__, exc)
            return
        if trainer.is_global_zero:
            log.info("An %s was raised with message: %s, saved checkpoint to %s", type(exception).__name__,
                     exception, paths[0])

    def _should_save_on_exception(self, trainer: Any) -> bool:
        """Lightning's rule: not in a fast_dev_run or the sanity check, and not again at an already saved step."""
        return (self.save_on_exception and not trainer.fast_dev_run and not trainer.sanity_checking
                and trainer.session.module is not None and self._last_global_step_saved != trainer.global_step)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Finish writes and deferred deletions, stop the writer thread, and record what was written."""
        try:
            try:
                self._join_snapshot()
                self._wait_sharded()
                if self._writer is None and self._to_remove:
                    self._flush_removals(block=True)  # sharded: the directories they wait for are published now
            finally:
                if self._writer is not None:
                    try:
                        self._flush_removals(block=True)
                    finally:
                        self._writer.close()
                        self._writer = None
        except BaseException:
            self._record_landed(quiet=True)
            raise
        self._record_landed()

    # ------------------------------------------------------------------ deciding
    def _save_on_epoch_end(self, trainer: Any) -> bool:
        """True when epoch-end saving happens in on_train_epoch_end rather than after each validation."""
        if self.save_on_train_epoch_end is not None:
            return self.save_on_train_epoch_end
        if not trainer.session.val_dataloaders:
            return True
        if trainer.check_val_every_n_epoch != 1:
            return False
        return trainer.val_check_interval in (None, 1.0)

    def _save_epoch(self, trainer: Any) -> None:
        if trainer.global_step == self._last_global_step_saved:
            return  # already saved at this step (or no step was taken yet)
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._save_all(trainer)
        elif self.save_last:
            self._save_last(trainer)

    def _metrics(self, trainer: Any) -> dict[str, Any]:
        """What filename templates and monitor can use: every logged value plus epoch and step."""
        metrics = dict(trainer.callback_metrics)
        metrics["epoch"] = torch.tensor(trainer.current_epoch)
        metrics["step"] = torch.tensor(trainer.global_step)
        return metrics

    def _save_all(self, trainer: Any) -> None:
        """Top-k (or newest) and last.ckpt at this step: one state dump and one host copy for both files."""
        metrics = self._metrics(trainer)
        planned = None
        if self.save_top_k != 0:
            planned = self._plan_none_monitor(trainer, metrics) if self.monitor is None \
                else self._plan_monitored(trainer, metrics)
        paths = [planned[0]] if planned else []
        if self.save_last:
            paths.append(self._last_path())
            self.last_model_path = paths[-1]
        if not paths:
            return
        self._write(trainer, paths)  # the bookkeeping above is already in the state these files hold
        if planned and planned[1] is not None and planned[1] != planned[0]:
            self._remove_after_write(trainer, planned[1], planned[0])
        if planned and self.verbose and trainer.is_global_zero:
            log.info("epoch %d, step %d: saved %s%s", trainer.current_epoch, trainer.global_step, planned[0],
                     f" ({self.monitor}={float(self.current_score):.5g})" if self.monitor else "")

    def _plan_none_monitor(self, trainer: Any, metrics: dict[str, Any]) -> tuple[str, str | None]:
        """(path to write, path it replaces) when no metric ranks the checkpoints: keep the newest (or all)."""
        previous = self.best_model_path
        path = self._free_name(trainer, metrics, replacing=previous if self.save_top_k == 1 else None)
        self.best_model_path = path
        return path, (previous or None) if self.save_top_k == 1 else None

    def _plan_monitored(self, trainer: Any, metrics: dict[str, Any]) -> tuple[str, str | None] | None:
        """(path to write, path rotated out) if the monitored value makes the top k, else None."""
        if self.monitor not in metrics:
            message = (f"ModelCheckpoint(monitor={self.monitor!r}) found no such metric at epoch "
                       f"{trainer.current_epoch}, step {trainer.global_step}. Logged: "
                       f"{sorted(k for k in metrics if k not in ('epoch', 'step'))}. Log it with self.log, "
                       "or change monitor.")
            if self._val_ran or not trainer.session.val_dataloaders:
                raise MisconfigurationRuntimeError(message)
            if self.monitor not in self._warned_missing:  # e.g. a val metric before the first validation
                self._warned_missing.add(self.monitor)
                log.warning("%s Skipping this save.", message)
            return None
        current = torch.as_tensor(metrics[self.monitor]).detach().float().cpu().squeeze()
        if not torch.isfinite(current):
            current = torch.tensor(math.inf if self.mode == "min" else -math.inf)
        self.current_score = current
        k = self.save_top_k
        better = _MODES[self.mode][1]
        if k != -1 and len(self.best_k_models) >= k and not better(current, self.kth_value):
            if self.verbose and trainer.is_global_zero:
                log.info("epoch %d, step %d: %s=%.5g is not in the top %d", trainer.current_epoch,
                         trainer.global_step, self.monitor, float(current), k)
            return None
        worst = self.kth_best_model_path if k != -1 and len(self.best_k_models) >= k else None
        path = self._free_name(trainer, metrics, replacing=worst)
        self.best_k_models[path] = current
        if worst is not None and worst != path:
            del self.best_k_models[worst]
        pick = max if self.mode == "min" else min
        self.kth_best_model_path = pick(self.best_k_models, key=lambda p: float(self.best_k_models[p]))
        self.kth_value = self.best_k_models[self.kth_best_model_path]
        best = min if self.mode == "min" else max
        self.best_model_path = best(self.best_k_models, key=lambda p: float(self.best_k_models[p]))
        self.best_model_score = self.best_k_models[self.best_model_path]
        return path, worst

    def _last_path(self) -> str:
        from raytrainer.io import storage

        return storage.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)

    def _save_last(self, trainer: Any) -> None:
        """(Over)write ``last.ckpt``; the previous content stays valid until the new one is complete."""
        self.last_model_path = self._last_path()
        self._write(trainer, [self.last_model_path])

    def _free_name(self, trainer: Any, metrics: dict[str, Any], replacing: str | None) -> str:
        """The formatted name, with -v1, -v2, ... when another file of that name exists (Lightning's counter)."""
        from raytrainer.io import storage

        path = self.format_checkpoint_name(metrics)
        if not self.enable_version_counter:
            return path
        version = self.STARTING_VERSION
        while path != replacing and (path in self._written or (trainer.is_global_zero and storage.exists(path))):
            path = self.format_checkpoint_name(metrics, ver=version)
            version += 1
        return path

    # ------------------------------------------------------------------ writing
    def _write(self, trainer: Any, paths: list[str]) -> None:
        """Stage the state on the host (partly now, partly while the next step computes); serialise and write
        it to every path in the background (rank 0 only)."""
        from raytrainer.checkpoint.bridge import capture, writes_sharded
        from raytrainer.io import storage

        if writes_sharded(trainer.session):  # every rank writes its shards, in parallel
            self._write_sharded(trainer, paths, self.async_save)
            return
        ckpt = capture(trainer.session, self.save_weights_only)
        self._last_global_step_saved = trainer.global_step
        if not trainer.is_global_zero:
            return
        self._written.update(paths)
        landing = _Landing(trainer.session, trainer.global_step, trainer.current_epoch, self._landed)
        if self.async_save:
            self._join_snapshot()  # the previous snapshot is copied and queued (normally long done)
            if self._writer is None:
                from raytrainer.checkpoint.writer import AsyncCheckpointWriter

                self._writer = AsyncCheckpointWriter()
            idle = self._writer.pending == 0
            removals = self._due_removals() if idle else []  # their replacements have landed meanwhile
            lazy = _optimizer_owned(trainer) if _can_pipeline(trainer) else set()
            pool = self._pool if idle else None  # reuse the host buffers once the writer released them
            self._snapshot = _Snapshot(ckpt, paths, lazy, pool, self._writer, removals, landing)
            if pool is not None:
                self._pool = self._snapshot.pool
        else:
            for path in paths:
                storage.save(ckpt, path)
                landing(path)
            self._record_landed()
        self._notify_loggers(trainer)

    def _notify_loggers(self, trainer: Any) -> None:
        """Lightning's after_save_checkpoint on every logger (rank 0), e.g. for log_model uploads."""
        for lg in trainer.loggers:
            hook = getattr(lg, "after_save_checkpoint", None)
            if hook is not None:
                hook(self)

    def _write_now(self, trainer: Any, paths: list[str]) -> None:
        """Write the current state to ``paths`` on this thread (rank 0 writes); returns once it is on storage."""
        from raytrainer.checkpoint.bridge import capture, writes_sharded
        from raytrainer.io import storage

        self._last_global_step_saved = trainer.global_step
        if writes_sharded(trainer.session):
            self._write_sharded(trainer, paths, asynchronous=False)
            return
        ckpt = capture(trainer.session, self.save_weights_only)
        if not trainer.is_global_zero:
            return
        for path in paths:
            storage.save(ckpt, path)
            self._written.add(path)
            trainer.session.on_checkpoint_saved(path)
        self._notify_loggers(trainer)

    def _write_sharded(self, trainer: Any, paths: list[str], asynchronous: bool) -> None:
        """FSDP: directories that every rank writes its shards into (rank 0's names, so all write the same). Async:
        the training thread copies the shards to host memory; the previous save must be done before the next."""
        from raytrainer.checkpoint.bridge import save_sharded

        self._wait_sharded()
        if self._to_remove:
            self._flush_removals(block=False)  # what waited for the directory just published
        self._last_global_step_saved = trainer.global_step
        step, epoch = trainer.global_step, trainer.current_epoch
        paths, self._sharded_pending = save_sharded(trainer.session, paths, self.save_weights_only, asynchronous)
        if trainer.is_global_zero:
            self._written.update(paths)
            landing = _Landing(trainer.session, step, epoch, self._landed, paths)
            if self._sharded_pending:
                self._sharded_landing = landing  # recorded once rank 0's PendingSave has published the directory
            else:
                landing()
                self._record_landed()
            self._notify_loggers(trainer)

    def _wait_sharded(self) -> None:
        """Wait for the sharded saves in flight (this rank's part; rank 0: published); re-raise a failed one, which
        then records no checkpoint event."""
        pending, self._sharded_pending = self._sharded_pending, []
        landing, self._sharded_landing = self._sharded_landing, None
        for save in pending:
            save.wait()
        if landing is not None:
            landing()

    def _poll_sharded(self) -> None:
        """Queue the checkpoint events of sharded saves that were published meanwhile (a failed one waits for
        ``_wait_sharded`` to raise its error)."""
        if self._sharded_landing is not None and all(save.succeeded for save in self._sharded_pending):
            landing, self._sharded_landing = self._sharded_landing, None
            landing()

    def _record_landed(self, quiet: bool = False) -> None:
        """(training thread) Record a checkpoint event for each file that is now complete on storage; ``quiet``
        (another error is on its way) logs a failure to record instead of raising it over that error."""
        while self._landed:
            session, step, epoch, path = self._landed.popleft()
            try:
                session.on_checkpoint_saved(path, step=step, epoch=epoch)
            except Exception as exc:
                if not quiet:
                    raise
                log.warning("could not record checkpoint %s in the events log: %s", path, exc)

    def _join_snapshot(self) -> None:
        """Wait until the running snapshot is copied and handed to the writer; re-raise its error."""
        snapshot, self._snapshot = self._snapshot, None
        if snapshot is not None:
            snapshot.join()

    def _remove_after_write(self, trainer: Any, path: str, newer: str) -> None:
        """Delete a rotated-out checkpoint, but only once ``newer`` is completely on storage."""
        if not trainer.is_global_zero:
            return
        if not path.startswith(str(self.dirpath)):
            return  # a previous run's file (resumed with another dirpath): never ours to delete
        self._to_remove.append((path, newer))
        if self._writer is None and not self._sharded_pending:  # else: once the sharded save in flight is done
            self._flush_removals(block=False)

    def _due_removals(self) -> list[str]:
        """Rotated-out checkpoints whose replacement is completely written (call with no write in flight)."""
        if not self._to_remove:
            return []
        if self._writer is not None:
            self._writer.wait()  # returns at once when idle; raises a failed write before anything is deleted
        todo, self._to_remove = self._to_remove, []
        due = []
        for old, newer in todo:
            if old in (self.best_model_path, self.last_model_path) or old in self.best_k_models:
                continue  # in use again (e.g. the same name was written anew)
            if not _is_file(newer):
                log.warning("keeping checkpoint %s: its replacement %s was not written", old, newer)
                continue
            due.append(old)
            self._written.discard(old)
        return due

    def _flush_removals(self, block: bool) -> None:
        """Carry out deferred deletions once no write is in flight (``block`` waits for that)."""
        if self._writer is not None and not block and self._writer.pending:
            return
        _remove_all(self._due_removals())

    def wait_for_writes(self) -> None:
        """Block until every background write (and the deletions waiting for it) has finished, and record a
        checkpoint event for each file written."""
        try:
            self._join_snapshot()
            self._wait_sharded()
            if self._writer is not None:
                self._writer.wait()
            self._flush_removals(block=True)
        except BaseException:
            self._record_landed(quiet=True)  # the files that did land; the write error goes on
            raise
        self._record_landed()

    # ------------------------------------------------------------------ names
    def format_checkpoint_name(self, metrics: dict[str, Any], filename: str | None = None,
                               ver: int | None = None) -> str:
        """Fill the filename template ({epoch}, {step}, metric names, format specs) and join it to dirpath.

        As in Lightning, ``{val_loss:.2f}`` becomes ``val_loss=0.12`` (just ``0.12`` with
        ``auto_insert_metric_name=False``), and a name that was not logged yet is filled with 0.
        """
        from raytrainer.io import storage

        template = filename or self.filename or "{epoch}" + self.CHECKPOINT_JOIN_CHAR + "{step}"
        names = re.findall(r"\{([^{}:]+)(?::[^{}]*)?\}", template)
        values = {}
        for i, name in enumerate(names):
            if name not in metrics and name not in self._warned_missing:
                self._warned_missing.add(name)
                log.warning("ModelCheckpoint(filename=%r): %r was not logged (yet); it is written as 0. Logged: %s",
                            template, name, sorted(metrics))
            values[f"m{i}"] = _num(metrics.get(name, 0))
        counter = iter(range(len(names)))

        def field(match: re.Match) -> str:
            name, spec = match.group(1), match.group(2) or ""
            slot = f"{{m{next(counter)}{spec}}}"
            # a metric name like "val/loss" must not create folders
            label = name.replace("/", "_")
            return f"{label}{self.CHECKPOINT_EQUALS_CHAR}{slot}" if self.auto_insert_metric_name else slot

        text = re.sub(r"\{([^{}:]+)(:[^{}]*)?\}", field, template).format(**values)
        if ver is not None:
            text += f"{self.CHECKPOINT_JOIN_CHAR}v{ver}"
        return storage.join(self.dirpath, text + self.FILE_EXTENSION)

    @property
    def saved_at_step(self) -> int:
        """The global step of the newest checkpoint this callback wrote (0 before any)."""
        return self._last_global_step_saved

    def find_last_candidates(self, trainer: Any) -> list[str]:
        """Checkpoints a rerun may resume from: the given dirpath, else every logger version's checkpoints."""
        from raytrainer.checkpoint.resolve import last_candidates

        return last_candidates(trainer, self.dirpath, self._dirpath_given, self.FILE_EXTENSION)

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the writer thread (the callback travels to Ray workers)."""
        state = self.__dict__.copy()
        state["_writer"] = None
        state["_snapshot"] = None
        state["_sharded_pending"] = []
        state["_sharded_landing"] = None
        state["_landed"] = collections.deque()
        state["_pool"] = {}
        return state


_STAGING_TIMEOUT_S = 600.0


def _can_pipeline(trainer: Any) -> bool:
    """Whether every optimizer step passes on_before_optimizer_step first (the fence a pipelined copy needs)."""
    return bool(trainer.optimizers) and not trainer.session.closure_optimizer


def _optimizer_owned(trainer: Any) -> set[tuple]:
    """Tensors that only an optimizer step changes: the optimized parameters and the optimizer state."""
    owned: set[tuple] = set()
    for opt in trainer.optimizers:
        for group in opt.param_groups:
            owned.update(view_key(p) for p in group["params"])
        for state in opt.state.values():
            owned.update(view_key(v) for v in state.values() if isinstance(v, torch.Tensor))
    return owned


class _Landing:
    """What a save records once its files are complete on storage: calling it with a path (or, for a sharded save,
    with none: every path) queues that path's checkpoint event, with the step and epoch the files hold."""

    def __init__(self, session: Any, step: int, epoch: int, landed: collections.deque,
                 paths: Sequence[str] = ()) -> None:
        self.session, self.step, self.epoch = session, step, epoch
        self._landed = landed
        self._paths = list(paths)

    def __call__(self, path: str | None = None) -> None:
        """(any thread) Queue the checkpoint event of ``path`` (None: of every path given at construction)."""
        for p in self._paths if path is None else [path]:
            self._landed.append((self.session, self.step, self.epoch, p))


class _Snapshot:
    """A checkpoint's host copy, taken in two parts (CheckFreq's pipelined snapshot).

    Tensors that training may change before the next optimizer step (buffers, frozen weights, RNG
    states) are copied on the training thread right away. Optimized parameters and optimizer state
    change only in the next optimizer step, so a helper thread copies them while the next forward and
    backward run; ``on_before_optimizer_step`` waits for that copy. The helper then hands the complete
    copy to the AsyncCheckpointWriter, which serialises and writes it. An in-place change to a
    parameter outside the optimizer step while it is being copied is detected (tensor version
    counters) and fails the checkpoint instead of writing a mix of two states. ``host_copy.HostCopy``
    does the copying; this class runs the helper thread and hands the copy over.
    """

    def __init__(self, ckpt: dict[str, Any], paths: list[str], lazy: set[tuple],
                 pool: dict[tuple, torch.Tensor] | None, writer: Any, removals: list[str],
                 on_written: _Landing | None = None) -> None:
        """Copy what cannot wait, then start the helper thread, which copies the rest, queues one write per
        path (``on_written(path)`` runs once that file is complete) and deletes ``removals`` (rotated-out files
        whose replacement is already written)."""
        self.paths = paths
        self.path = paths[0]
        self._removals = removals
        self._on_written = on_written
        self._host = HostCopy(ckpt, defer=lazy, pool=pool, name="checkpoint")
        self.staged = self._host.result
        self.pool: dict[tuple, torch.Tensor] = self._host.pool
        self._writer = writer
        self._error: BaseException | None = None
        self._copied = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raytrainer-checkpoint-stager", daemon=False)
        self._thread.start()

    def _run(self) -> None:
        """Helper thread: copy the optimizer-owned tensors, check nothing changed them meanwhile, queue the write."""
        try:
            self._copy()
            if self._error is None:
                try:
                    for path in self.paths:
                        self._writer.submit(self.staged, path, staged=True, timeout=_STAGING_TIMEOUT_S,
                                            on_written=self._on_written)
                except BaseException as exc:
                    self._error = exc
        finally:
            _remove_all(self._removals)

    def _copy(self) -> None:
        """Fill the host buffers; always releases ``wait_copied``, recording any failure."""
        try:
            changed = self._host.finish()
            if changed:
                raise RuntimeError(
                    f"checkpoint {self.path} was not written: {changed[:3]} changed in place between the save and "
                    "the next optimizer step, while being copied in the background. Change weights only in the "
                    "optimizer step, or pass ModelCheckpoint(async_save=False).")
        except BaseException as exc:
            self._error = exc
        finally:
            self._copied.set()

    def wait_copied(self) -> None:
        """Block until the host copy is complete (the optimizer may change the weights afterwards)."""
        if not self._copied.wait(_STAGING_TIMEOUT_S):
            raise TimeoutError(f"copying checkpoint {self.path} to host memory took over {_STAGING_TIMEOUT_S}s")

    def join(self) -> None:
        """Wait until the copy is queued for writing; raise what went wrong on the helper thread."""
        self.wait_copied()
        if self._thread is not None:
            self._thread.join(_STAGING_TIMEOUT_S)
            if self._thread.is_alive():
                raise TimeoutError(f"checkpoint {self.path} was not queued for writing within "
                                   f"{_STAGING_TIMEOUT_S}s: the previous write is still running")
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def _remove_all(paths: list[str]) -> None:
    """Delete checkpoint files (with manifests) or sharded directories; a failure is logged, never raised: the file
    is only surplus."""
    from raytrainer.checkpoint import sharded
    from raytrainer.io import storage

    for path in paths:
        try:
            if sharded.is_directory(path):
                sharded.remove_sharded(path, missing_ok=True)
            else:
                storage.remove(path, missing_ok=True)
        except OSError as exc:
            log.warning("could not delete rotated-out checkpoint %s: %s", path, exc)


def _is_file(uri: str) -> bool:
    """True when a complete file or sharded directory is at ``uri`` (both become visible only when complete)."""
    from pyarrow import fs as pafs

    from raytrainer.checkpoint import sharded
    from raytrainer.io import storage

    fs, path = storage.resolve(uri)
    with storage.operation("checking checkpoint", uri, fs):
        return fs.get_file_info(path).type == pafs.FileType.File or sharded.is_sharded_checkpoint(uri)


def _num(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item()
    return v
