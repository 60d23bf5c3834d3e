"""ModelCheckpoint: save automatically (top-k by a metric, last, every N steps/epochs/seconds)."""
from __future__ import annotations

import math
import re
import time
from datetime import timedelta
from typing import Any

import torch

from raytrainer.callbacks.callback import Callback
from raytrainer.utilities import log

_MODES = {"min": (torch.tensor(math.inf), torch.lt), "max": (torch.tensor(-math.inf), torch.gt)}


class ModelCheckpoint(Callback):
    """Lightning's ModelCheckpoint; writes are crash-safe and, by default, off the training thread."""

    CHECKPOINT_NAME_LAST = "last"
    FILE_EXTENSION = ".ckpt"

    def __init__(self, dirpath: str | None = None, filename: str | None = None, monitor: str | None = None,
                 verbose: bool = False, save_last: bool | None = None, save_top_k: int = 1,
                 save_weights_only: bool = False, mode: str = "min", auto_insert_metric_name: bool = True,
                 every_n_train_steps: int | None = None, train_time_interval: timedelta | None = None,
                 every_n_epochs: int | None = None, save_on_train_epoch_end: bool | None = None,
                 async_save: bool = True) -> None:
        if mode not in _MODES:
            raise ValueError(f"ModelCheckpoint(mode={mode!r}): use 'min' or 'max'.")
        if save_top_k < -1:
            raise ValueError(f"ModelCheckpoint(save_top_k={save_top_k}): use -1 (all), 0 (none) or k >= 1.")
        if monitor is None and save_top_k not in (-1, 0, 1):
            raise ValueError(f"ModelCheckpoint(save_top_k={save_top_k}) ranks checkpoints by a metric: "
                             "pass monitor='val_loss' (or another logged name).")
        given = [n for n, v in (("every_n_train_steps", every_n_train_steps),
                                ("train_time_interval", train_time_interval),
                                ("every_n_epochs", every_n_epochs)) if v]
        if len(given) > 1:
            raise ValueError(f"ModelCheckpoint: {given} are mutually exclusive; pick one trigger.")
        for n, v in (("every_n_train_steps", every_n_train_steps), ("every_n_epochs", every_n_epochs)):
            if v is not None and v < 0:
                raise ValueError(f"ModelCheckpoint({n}={v}) must be >= 0.")
        self.dirpath = dirpath
        self.filename = filename
        self.monitor = monitor
        self.verbose = verbose
        self.save_last = save_last
        self.save_top_k = save_top_k
        self.save_weights_only = save_weights_only
        self.mode = mode
        self.auto_insert_metric_name = auto_insert_metric_name
        self.every_n_train_steps = every_n_train_steps or 0
        self.train_time_interval = train_time_interval
        self.every_n_epochs = every_n_epochs if every_n_epochs is not None else (0 if given else 1)
        self.save_on_train_epoch_end = save_on_train_epoch_end
        self.async_save = async_save
        self.best_k_models: dict[str, torch.Tensor] = {}
        self.kth_best_model_path = ""
        self.kth_value = _MODES[mode][0].clone()
        self.best_model_path = ""
        self.best_model_score: torch.Tensor | None = None
        self.current_score: torch.Tensor | None = None
        self.last_model_path = ""
        self._last_global_step_saved = -1
        self._last_time = time.monotonic()
        self._writer: Any = None

    @property
    def state_key(self) -> str:
        return (f"ModelCheckpoint{{'monitor': {self.monitor!r}, 'mode': {self.mode!r}, 'every_n_train_steps': "
                f"{self.every_n_train_steps}, 'every_n_epochs': {self.every_n_epochs}, 'train_time_interval': "
                f"{self.train_time_interval!r}}}")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "best_model_score": self.best_model_score,
                "best_model_path": self.best_model_path, "current_score": self.current_score,
                "dirpath": self.dirpath, "best_k_models": dict(self.best_k_models),
                "kth_best_model_path": self.kth_best_model_path, "kth_value": self.kth_value,
                "last_model_path": self.last_model_path}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        same_dir = state_dict.get("dirpath") == self.dirpath
        self.best_model_score = state_dict.get("best_model_score")
        self.best_model_path = state_dict.get("best_model_path", "")
        if same_dir:
            self.best_k_models = dict(state_dict.get("best_k_models", {}))
            self.kth_best_model_path = state_dict.get("kth_best_model_path", "")
            kth = state_dict.get("kth_value")
            if kth is not None:
                self.kth_value = kth
            self.last_model_path = state_dict.get("last_model_path", "")

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.dirpath is None:
            from raytrainer.loggers.csv import _join

            base = trainer.log_dir if trainer.loggers else trainer.default_root_dir
            self.dirpath = _join(base, "checkpoints")
        if stage == "fit" and trainer.is_global_zero:
            from raytrainer.checkpoint import storage

            storage.makedirs(self.dirpath)
        self._last_time = time.monotonic()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_global_step_saved:
            return
        due = False
        if self.every_n_train_steps and step % self.every_n_train_steps == 0:
            due = True
        elif self.train_time_interval is not None:
            elapsed = time.monotonic() - self._last_time
            if trainer.strategy is not None and trainer.strategy.distributed:
                elapsed = float(trainer.strategy.broadcast(elapsed))
            due = elapsed >= self.train_time_interval.total_seconds()
        if due:
            self._save_all(trainer)
            self._last_time = time.monotonic()

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.every_n_train_steps or self.train_time_interval is not None:
            if self.save_last:
                self._save_last(trainer, self._metrics(trainer))
            return
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._save_all(trainer)
        elif self.save_last:
            self._save_last(trainer, self._metrics(trainer))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        # A run stopped mid-epoch (max_steps, max_time, preemption) still leaves a resumable last.ckpt.
        if self.save_last is not False and trainer.global_step != self._last_global_step_saved \
                and trainer._batches_done_in_epoch:
            self._save_last(trainer, self._metrics(trainer), force=True)
        self.wait_for_writes()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self._writer is not None:
            try:
                self._writer.wait()
            except Exception as exc:  # keep the original exception; report the write failure
                log.warning("a background checkpoint write also failed: %s", exc)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # ------------------------------------------------------------------ saving
    def _metrics(self, trainer: Any) -> dict[str, Any]:
        metrics = dict(trainer.callback_metrics)
        metrics["epoch"] = torch.tensor(trainer.current_epoch)
        metrics["step"] = torch.tensor(trainer.global_step)
        return metrics

    def _save_all(self, trainer: Any) -> None:
        metrics = self._metrics(trainer)
        if self.save_top_k != 0:
            if self.monitor is None:
                self._save_none_monitor(trainer, metrics)
            else:
                self._save_monitored(trainer, metrics)
        if self.save_last:
            self._save_last(trainer, metrics)

    def _save_none_monitor(self, trainer: Any, metrics: dict[str, Any]) -> None:
        path = self.format_checkpoint_name(metrics)
        previous = self.best_model_path
        self.best_model_path = path  # the state written into the checkpoint already names it
        self._write(trainer, path)
        if self.save_top_k == 1 and previous and previous != path:
            self._remove_after_write(trainer, previous)

    def _save_monitored(self, trainer: Any, metrics: dict[str, Any]) -> None:
        if self.monitor not in metrics:
            raise RuntimeError(f"ModelCheckpoint(monitor={self.monitor!r}) found no such metric at epoch "
                               f"{trainer.current_epoch}, step {trainer.global_step}. Logged: "
                               f"{sorted(k for k in metrics if k not in ('epoch', 'step'))}. Log it with "
                               "self.log, or change monitor.")
        current = torch.as_tensor(metrics[self.monitor]).detach().float().cpu()
        if torch.isnan(current):
            current = torch.tensor(math.inf if self.mode == "min" else -math.inf)
        self.current_score = current
        k = len(self.best_k_models) if self.save_top_k == -1 else self.save_top_k
        better = _MODES[self.mode][1]
        if self.save_top_k != -1 and len(self.best_k_models) >= k and not better(current, self.kth_value):
            return
        path = self.format_checkpoint_name(metrics)
        self.best_k_models[path] = current
        worst = None
        if self.save_top_k != -1 and len(self.best_k_models) > k:
            worst = self.kth_best_model_path
            del self.best_k_models[worst]
        pick = max if self.mode == "min" else min
        self.kth_best_model_path = pick(self.best_k_models, key=lambda p: float(self.best_k_models[p]))
        self.kth_value = self.best_k_models[self.kth_best_model_path]
        best = min if self.mode == "min" else max
        self.best_model_path = best(self.best_k_models, key=lambda p: float(self.best_k_models[p]))
        self.best_model_score = self.best_k_models[self.best_model_path]
        self._write(trainer, path)
        if worst is not None and worst != path:
            self._remove_after_write(trainer, worst)
        if self.verbose and trainer.is_global_zero:
            log.info("epoch %d, step %d: %s=%.5g, saved %s", trainer.current_epoch, trainer.global_step,
                     self.monitor, float(current), path)

    def _save_last(self, trainer: Any, metrics: dict[str, Any], force: bool = False) -> None:
        from raytrainer.loggers.csv import _join

        path = _join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
        if not force and trainer.global_step == self._last_global_step_saved and self.last_model_path == path:
            return
        self._write(trainer, path)
        self.last_model_path = path

    def _write(self, trainer: Any, path: str) -> None:
        """Stage the state on the host now; serialise and write it in the background (rank 0 only)."""
        from raytrainer.checkpoint import storage
        from raytrainer.checkpoint.format import dump_checkpoint

        ckpt = dump_checkpoint(trainer, self.save_weights_only)
        self._last_global_step_saved = trainer.global_step
        if not trainer.is_global_zero:
            return
        if self.async_save:
            if self._writer is None:
                self._writer = storage.AsyncCheckpointWriter()
            self._writer.submit(ckpt, path)
        else:
            storage.save(ckpt, path)
        trainer._on_checkpoint_saved(path)

    def _remove_after_write(self, trainer: Any, path: str) -> None:
        """Delete a rotated-out checkpoint only once the newer one is safely on storage."""
        from raytrainer.checkpoint import storage

        if not trainer.is_global_zero or path in (self.last_model_path, self.best_model_path):
            return
        if not path.startswith(str(self.dirpath)):
            return  # a previous run's file: never ours to delete
        if self._writer is not None:
            self._writer.wait()
        storage.remove(path, missing_ok=True)

    def wait_for_writes(self) -> None:
        """Block until every background write has finished (re-raises a failed write)."""
        if self._writer is not None:
            self._writer.wait()

    def format_checkpoint_name(self, metrics: dict[str, Any], filename: str | None = None) -> str:
        """Fill the filename template ({epoch}, {step}, metric names) and join it to dirpath."""
        from raytrainer.loggers.csv import _join

        template = filename or self.filename or "{epoch}-{step}"
        name = template
        for key in re.findall(r"\{([^{}:]+)(?::[^{}]*)?\}", template):
            if self.auto_insert_metric_name:
                name = re.sub(r"\{(" + re.escape(key) + r")(:[^{}]*)?\}", key.replace("/", "_") + r"={\1\2}",
                              name, count=1)
        values = {k.replace("/", "_"): _num(v) for k, v in metrics.items()}
        fmt_name = re.sub(r"\{([^{}:]+)", lambda m: "{" + m.group(1).replace("/", "_"), name)
        try:
            text = fmt_name.format(**values)
        except KeyError as exc:
            raise RuntimeError(f"ModelCheckpoint(filename={template!r}) uses {exc}, which was not logged. "
                               f"Logged: {sorted(values)}.") from None
        return _join(self.dirpath, text + self.FILE_EXTENSION)

    def find_last_candidates(self, trainer: Any) -> list[str]:
        """Checkpoints a rerun may resume from: this dirpath, or every version's checkpoints folder."""
        from raytrainer.checkpoint import storage
        from raytrainer.loggers.csv import _join

        dirs = []
        if self.dirpath is not None:
            dirs.append(self.dirpath)
        lg = trainer.logger
        if lg is not None and getattr(lg, "root_dir", None):
            from pyarrow import fs as pafs

            fs, root = storage.resolve(lg.root_dir)
            for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
                if info.type == pafs.FileType.Directory:
                    dirs.append(_join(_join(lg.root_dir, info.base_name), "checkpoints"))
        else:
            dirs.append(_join(trainer.default_root_dir, "checkpoints"))
        files: list[str] = []
        for d in dict.fromkeys(dirs):
            files += [f for f in storage.listdir(d, missing_ok=True) if f.endswith(self.FILE_EXTENSION)]
        return files

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_writer"] = None
        return state


def _num(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item()
    return v
