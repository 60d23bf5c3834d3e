"""StochasticWeightAveraging: average the weights of the last epochs and train them with SWALR (Lightning's SWA)."""
from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import SWALR, update_bn

from raytrainer.callbacks.callback import Callback
from raytrainer.utilities import log
from raytrainer.utilities.exceptions import MisconfigurationException
from raytrainer.utilities.types import LRSchedulerConfig

AvgFn = Callable[[Tensor, Tensor, Tensor], Tensor]
CPU = torch.device("cpu")


def _has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def equal_average(averaged: Tensor, current: Tensor, n_averaged: Tensor) -> Tensor:
    """Running mean: the average of ``n_averaged`` models, moved toward ``current`` by 1/(n+1)."""
    return averaged + (current - averaged) / (n_averaged + 1)


class StochasticWeightAveraging(Callback):
    """From epoch ``swa_epoch_start`` on, averages the parameters at the start of every epoch and anneals the
    learning rate to ``swa_lrs``; when training ends the model holds the average (BatchNorm statistics recomputed
    with one pass over the training data)."""

    def __init__(self, swa_lrs: float | list[float], swa_epoch_start: int | float = 0.8, annealing_epochs: int = 10,
                 annealing_strategy: str = "cos", avg_fn: AvgFn | None = None,
                 device: torch.device | str | None = CPU) -> None:
        bad_start = "StochasticWeightAveraging(swa_epoch_start=%r): use an int >= 1 or a float in [0, 1]."
        if isinstance(swa_epoch_start, bool) or not isinstance(swa_epoch_start, (int, float)):
            raise MisconfigurationException(bad_start % (swa_epoch_start,))
        if isinstance(swa_epoch_start, int) and swa_epoch_start < 1:
            raise MisconfigurationException(bad_start % (swa_epoch_start,))
        if isinstance(swa_epoch_start, float) and not 0 <= swa_epoch_start <= 1:
            raise MisconfigurationException(bad_start % (swa_epoch_start,))
        lrs_ok = (isinstance(swa_lrs, float) and swa_lrs > 0) or (
            isinstance(swa_lrs, list) and all(isinstance(lr, float) and lr > 0 for lr in swa_lrs))
        if not lrs_ok:
            raise MisconfigurationException(f"StochasticWeightAveraging(swa_lrs={swa_lrs!r}): give a positive float "
                                            "or a list of positive floats (one per parameter group).")
        if annealing_strategy not in ("cos", "linear"):
            raise MisconfigurationException(f"StochasticWeightAveraging(annealing_strategy={annealing_strategy!r}): "
                                            "use 'cos' or 'linear'.")
        if avg_fn is not None and not callable(avg_fn):
            raise MisconfigurationException("StochasticWeightAveraging(avg_fn=...) must be callable "
                                            "(averaged, current, n_averaged) -> tensor.")
        if device is not None and not isinstance(device, (torch.device, str)):
            raise MisconfigurationException(f"StochasticWeightAveraging(device={device!r}): give a torch.device, a "
                                            "string such as 'cpu', or None (the module's device).")
        self._swa_epoch_start: int | float = swa_epoch_start
        self._swa_lrs: float | list[float] = swa_lrs
        self._annealing_epochs = annealing_epochs
        self._annealing_strategy = annealing_strategy
        self._avg_fn: AvgFn = avg_fn or equal_average
        self._device = device
        self.n_averaged: Tensor | None = None
        self._average_model: nn.Module | None = None
        self._initialized = False
        self._swa_scheduler: SWALR | None = None
        self._scheduler_state: dict[str, Any] | None = None
        self._init_n_averaged = 0
        self._latest_update_epoch = -1
        self._max_epochs = -1
        self._has_bn = False

    # ------------------------------------------------------------------ epochs (0-based)
    @property
    def swa_start(self) -> int:
        """First epoch whose start is averaged (0-based)."""
        return max(int(self._swa_epoch_start) - 1, 0)

    @property
    def swa_end(self) -> float:
        """Last epoch whose start is averaged (0-based); infinite with max_epochs=-1."""
        return float("inf") if self._max_epochs == -1 else self._max_epochs - 1

    def _in_window(self, epoch: int) -> bool:
        return self.swa_start <= epoch <= self.swa_end

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if getattr(trainer.strategy, "shards_parameters", False):
            raise MisconfigurationException("StochasticWeightAveraging needs whole parameters on every rank; it does "
                                            "not work with a sharded strategy (FSDP). Use DDP or one process.")
        self._average_model = copy.deepcopy(pl_module)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if len(trainer.optimizers) != 1:
            raise MisconfigurationException(f"StochasticWeightAveraging works with one optimizer; "
                                            f"configure_optimizers returned {len(trainer.optimizers)}.")
        if len(trainer.lr_scheduler_configs) > 1:
            raise MisconfigurationException("StochasticWeightAveraging replaces the learning-rate scheduler and so "
                                            "works with at most one; configure_optimizers returned "
                                            f"{len(trainer.lr_scheduler_configs)}.")
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None else -1
        if isinstance(self._swa_epoch_start, float):
            if max_epochs == -1:
                raise MisconfigurationException("StochasticWeightAveraging(swa_epoch_start=<float>) needs max_epochs; "
                                                "with max_epochs=-1 give swa_epoch_start as an int epoch.")
            self._swa_epoch_start = int(max_epochs * self._swa_epoch_start)
        self._max_epochs = max_epochs
        self._has_bn = _has_batch_norm(pl_module)
        if self._scheduler_state is not None:  # resumed inside the SWA phase: SWALR replaces the user's scheduler
            trainer.lr_scheduler_configs.clear()

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        epoch = trainer.current_epoch
        if not self._initialized and self._in_window(epoch):
            self._start_swa(trainer, pl_module, epoch)
        if self._in_window(epoch) and epoch > self._latest_update_epoch:
            assert self._average_model is not None and self.n_averaged is not None
            self.update_parameters(self._average_model, pl_module, self.n_averaged, self._avg_fn)
            self._latest_update_epoch = epoch

    def _start_swa(self, trainer: Any, pl_module: Any, epoch: int) -> None:
        """Move the average to its device and install SWALR (restored from a checkpoint when resuming)."""
        self._initialized = True
        assert self._average_model is not None
        self._average_model = self._average_model.to(self._device or pl_module.device)
        optimizer = trainer.optimizers[0]
        if isinstance(self._swa_lrs, float):
            self._swa_lrs = [self._swa_lrs] * len(optimizer.param_groups)
        if len(self._swa_lrs) != len(optimizer.param_groups):
            raise MisconfigurationException(f"StochasticWeightAveraging(swa_lrs=...) has {len(self._swa_lrs)} values "
                                            f"but the optimizer has {len(optimizer.param_groups)} parameter groups; "
                                            "give one value per group or a single float.")
        for lr, group in zip(self._swa_lrs, optimizer.param_groups):
            group["initial_lr"] = lr
        self._swa_scheduler = SWALR(optimizer, swa_lr=self._swa_lrs, anneal_epochs=self._annealing_epochs,
                                    anneal_strategy=self._annealing_strategy,  # type: ignore[arg-type]
                                    last_epoch=self._max_epochs if self._annealing_strategy == "cos" else -1)
        if self._scheduler_state is not None:
            self._swa_scheduler.load_state_dict(self._scheduler_state)
        elif epoch != self.swa_start:
            log.warning("StochasticWeightAveraging starts at epoch %d, after swa_epoch_start, without a saved state: "
                        "the average begins now.", epoch)
        config = LRSchedulerConfig(self._swa_scheduler)  # stepped once per epoch
        configs = trainer.lr_scheduler_configs
        if configs:
            if configs[0].interval != "epoch" or configs[0].frequency != 1:
                log.warning("StochasticWeightAveraging steps its scheduler every epoch; the replaced scheduler "
                            "stepped every %s %s(s).", configs[0].frequency, configs[0].interval)
            configs[0] = config
        else:
            configs.append(config)
        if self.n_averaged is None:
            self.n_averaged = torch.tensor(self._init_n_averaged, dtype=torch.long, device=pl_module.device)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        finished = trainer.current_epoch - 1 == self.swa_end or self._max_epochs == -1
        if not finished or self._average_model is None or not self._initialized:
            return
        self.transfer_weights(self._average_model, pl_module)
        if self._has_bn:  # the averaged weights need their own BatchNorm statistics
            was_training = pl_module.training
            update_bn(trainer.train_dataloader, pl_module, device=pl_module.device)
            pl_module.train(was_training)

    # ------------------------------------------------------------------ averaging
    @staticmethod
    def update_parameters(average: nn.Module, model: nn.Module, n_averaged: Tensor, avg_fn: AvgFn) -> None:
        """Fold ``model``'s parameters into ``average`` (a copy when it is the first) and count it."""
        with torch.no_grad():
            for p_avg, p_model in zip(average.parameters(), model.parameters()):
                current = p_model.detach().to(p_avg.device)
                p_avg.detach().copy_(current if n_averaged == 0 else
                                     avg_fn(p_avg.detach(), current, n_averaged.to(p_avg.device)))
        n_averaged += 1

    @staticmethod
    def transfer_weights(src: nn.Module, dst: nn.Module) -> None:
        """Copy ``src``'s parameters into ``dst`` (on ``dst``'s devices)."""
        with torch.no_grad():
            for p_src, p_dst in zip(src.parameters(), dst.parameters()):
                p_dst.detach().copy_(p_src.to(p_dst.device))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "n_averaged": 0 if self.n_averaged is None else int(self.n_averaged.item()),
            "latest_update_epoch": self._latest_update_epoch,
            "scheduler_state": None if self._swa_scheduler is None else self._swa_scheduler.state_dict(),
            "average_model_state": None if self._average_model is None else self._average_model.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._init_n_averaged = int(state_dict["n_averaged"])
        self._latest_update_epoch = int(state_dict["latest_update_epoch"])
        self._scheduler_state = state_dict["scheduler_state"]
        self.n_averaged = None
        self._initialized = False
        self._swa_scheduler = None
        average = state_dict.get("average_model_state")
        if self._average_model is not None and average is not None:
            self._average_model.load_state_dict(average)

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        # SWALR's state travels in this callback's state: the checkpoint's scheduler list (SWALR in place of the
        # user's scheduler) is not loaded into the schedulers configure_optimizers made again.
        mine = checkpoint.get("callbacks", {}).get(self.state_key) or {}
        if mine.get("scheduler_state") is not None and "lr_schedulers" in checkpoint:
            checkpoint["lr_schedulers"] = []
