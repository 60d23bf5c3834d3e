"""DeviceStatsMonitor: log the device's memory (CUDA allocator) or CPU/RAM use (psutil) around each batch."""
from __future__ import annotations

from typing import Any

import torch

from raytrainer.callbacks.callback import Callback, logs_at
from raytrainer.utilities.exceptions import MisconfigurationException


def cpu_stats() -> dict[str, float]:
    """System-wide CPU use and RAM/swap use in percent, from psutil (Lightning's key names)."""
    try:
        import psutil
    except ImportError as exc:  # pragma: no cover - psutil is a dependency
        raise ModuleNotFoundError("DeviceStatsMonitor needs `psutil` for CPU stats: pip install psutil.") from exc
    return {"cpu_vm_percent": float(psutil.virtual_memory().percent), "cpu_percent": float(psutil.cpu_percent()),
            "cpu_swap_percent": float(psutil.swap_memory().percent)}


def device_stats(device: torch.device) -> dict[str, float]:
    """What the accelerator reports for ``device``: CUDA allocator stats, or the CPU stats."""
    if device.type == "cuda":
        return {k: float(v) for k, v in torch.cuda.memory_stats(device).items()}
    if device.type == "cpu":
        return cpu_stats()
    return {}


class DeviceStatsMonitor(Callback):
    """Logs ``DeviceStatsMonitor.<hook>/<stat>`` at the start and end of each training, validation and test batch
    (on the steps ``log_every_n_steps`` picks). ``cpu_stats``: None logs CPU stats only when training on CPU, True
    adds them on any accelerator, False never logs them."""

    def __init__(self, cpu_stats: bool | None = None) -> None:
        self._cpu_stats = cpu_stats
        self._step = 0
        self._eval_ready = 0

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        if not trainer.loggers:
            raise MisconfigurationException(
                "DeviceStatsMonitor writes to the Trainer's loggers, but this Trainer has none (logger=False). "
                "Pass a logger (e.g. logger=CSVLogger('logs')) or remove DeviceStatsMonitor.")
        if self._cpu_stats is not False:
            try:
                import psutil  # noqa: F401
            except ImportError as exc:  # pragma: no cover - psutil is a dependency
                raise ModuleNotFoundError("DeviceStatsMonitor needs `psutil` for CPU stats: pip install psutil.") \
                    from exc

    def _log(self, trainer: Any, hook: str) -> None:
        if not trainer.is_global_zero or not trainer.loggers:
            return
        device = trainer.strategy.root_device
        if self._cpu_stats is False and device.type == "cpu":
            return
        stats = device_stats(device)
        if self._cpu_stats and device.type != "cpu":
            stats.update(cpu_stats())
        prefix = f"{type(self).__qualname__}.{hook}"
        for lg in trainer.loggers:
            sep = getattr(lg, "group_separator", "/")
            lg.log_metrics({f"{prefix}{sep}{k}": v for k, v in stats.items()}, self._step)

    # Lightning's step for these rows is the loggers' step before this batch's optimizer step, at both hooks.
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._step = trainer.session.state.batches_that_stepped
        if logs_at(trainer, self._step + 1):
            self._log(trainer, "on_train_batch_start")

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if logs_at(trainer, self._step + 1):
            self._log(trainer, "on_train_batch_end")

    def _eval_start(self, trainer: Any) -> None:
        self._eval_ready = 0
        stepped = trainer.session.state.batches_that_stepped
        # inside fit, Lightning validates before it counts the batch's optimizer step; raytrainer counted it already
        self._step = max(stepped - 1, 0) if trainer.state.fn == "fit" else stepped

    def _eval_batch(self, trainer: Any, hook: str, start: bool) -> None:
        if start:
            self._eval_ready += 1
        if logs_at(trainer, self._eval_ready):
            self._log(trainer, hook)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._eval_start(trainer)

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        self._eval_start(trainer)

    def on_validation_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        self._eval_batch(trainer, "on_validation_batch_start", True)

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        self._eval_batch(trainer, "on_validation_batch_end", False)

    def on_test_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        self._eval_batch(trainer, "on_test_batch_start", True)

    def on_test_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                          dataloader_idx: int = 0) -> None:
        self._eval_batch(trainer, "on_test_batch_end", False)
