"""WeightAveraging and EMAWeightAveraging: a torch AveragedModel updated after optimizer steps (Lightning's)."""
from __future__ import annotations

import copy
import itertools
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn

from raytrainer.callbacks.callback import Callback
from raytrainer.utilities import log


class WeightAveraging(Callback):
    """Keeps an ``AveragedModel`` of the module (equal-weight SWA unless ``avg_fn``/``multi_avg_fn`` is given in
    ``kwargs``), updated when ``should_update`` says so. Validation runs on the average, and training ends with
    the average in the module. Checkpoints hold the average as ``state_dict`` and the trained weights as
    ``current_model_state``, as Lightning's do."""

    def __init__(self, device: torch.device | str | int | None = None, use_buffers: bool = True,
                 **kwargs: Any) -> None:
        self._device = torch.device(device) if isinstance(device, str) else device
        self._use_buffers = use_buffers
        self._kwargs = kwargs
        self._average_model: AveragedModel | None = None
        self._latest_update_step = 0
        self._latest_update_epoch = -1

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """Whether to fold the model in after optimizer step ``step_idx`` or epoch ``epoch_idx`` (one is None);
        override to choose. Default: after every optimizer step."""
        return step_idx is not None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        if _overrides_configure_model(pl_module):
            log.warning("WeightAveraging cannot average sharded layers; configure_model() is called now so the "
                        "average holds every layer (this may use a lot of memory).")
            pl_module.configure_model()
        self._average_model = AveragedModel(pl_module, device=self._device or pl_module.device,
                                            use_buffers=self._use_buffers, **self._kwargs)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step > self._latest_update_step and self.should_update(step_idx=step - 1):
            assert self._average_model is not None
            self._average_model.update_parameters(pl_module)
            self._latest_update_step = step

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        epoch = trainer.current_epoch
        if epoch > self._latest_update_epoch and self.should_update(epoch_idx=epoch):
            assert self._average_model is not None
            self._average_model.update_parameters(pl_module)
            self._latest_update_epoch = epoch

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        assert self._average_model is not None
        with torch.no_grad():
            for avg, cur in self._pairs(pl_module):
                cur.copy_(avg)

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self._average_model is not None:
            self._swap(pl_module)

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._average_model is not None:
            self._swap(pl_module)

    def _pairs(self, pl_module: Any) -> Any:
        assert self._average_model is not None
        avg = itertools.chain(self._average_model.module.parameters(), self._average_model.module.buffers())
        cur = itertools.chain(pl_module.parameters(), pl_module.buffers())
        return ((a.data, c.data) for a, c in zip(avg, cur))

    def _swap(self, pl_module: Any) -> None:
        """Exchange the values of the module and the average (twice restores both)."""
        with torch.no_grad():
            for avg, cur in self._pairs(pl_module):
                held = avg.clone()
                avg.copy_(cur)
                cur.copy_(held)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"latest_update_step": self._latest_update_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._latest_update_step = int(state_dict["latest_update_step"])

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        if self._average_model is None:
            log.info("WeightAveraging: a checkpoint saved outside fit holds no averaging state.")
            return
        average = self._average_model.state_dict()
        checkpoint["current_model_state"] = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k[len("module."):]: v for k, v in average.items() if k.startswith("module.")}
        checkpoint["averaging_state"] = {k: v for k, v in average.items() if not k.startswith("module.")}

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        if self._average_model is None:
            log.warning("WeightAveraging: a checkpoint loaded outside fit cannot restore the average; remove the "
                        "callback to silence this if you only evaluate or predict.")
        elif "current_model_state" in checkpoint and "averaging_state" in checkpoint:
            average = {"module." + k: v for k, v in checkpoint["state_dict"].items()}
            average.update(checkpoint["averaging_state"])
            self._average_model.load_state_dict(average)
            pl_module.load_state_dict(checkpoint["current_model_state"])
        else:
            log.warning("WeightAveraging: the checkpoint was not saved with WeightAveraging; the average starts "
                        "from its weights.")
            self._average_model.module.load_state_dict(copy.deepcopy(checkpoint["state_dict"]), strict=False)


def _overrides_configure_model(pl_module: Any) -> bool:
    """Whether the user's module class defines configure_model (not raytrainer's empty one)."""
    for klass in type(pl_module).__mro__:
        if klass.__module__.startswith("raytrainer."):
            return False
        if "configure_model" in klass.__dict__:
            return True
    return False


class EMAWeightAveraging(WeightAveraging):
    """Exponential moving average of the weights (``decay`` per update), updated every ``update_every_n_steps``
    optimizer steps from ``update_starting_at_step``, and at epoch ends from ``update_starting_at_epoch``."""

    def __init__(self, device: torch.device | str | int | None = None, use_buffers: bool = True, decay: float = 0.999,
                 update_every_n_steps: int = 1, update_starting_at_step: int | None = None,
                 update_starting_at_epoch: int | None = None, **kwargs: Any) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMAWeightAveraging(decay={decay}): use a value in [0, 1] (e.g. 0.999).")
        super().__init__(device=device, use_buffers=use_buffers, **kwargs, avg_fn=get_ema_avg_fn(decay=decay))
        self.update_every_n_steps = update_every_n_steps
        self.update_starting_at_step = update_starting_at_step
        self.update_starting_at_epoch = update_starting_at_epoch

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        if step_idx is not None:
            started = self.update_starting_at_step is None or step_idx >= self.update_starting_at_step
            due = self.update_every_n_steps > 0 and step_idx % self.update_every_n_steps == 0
            if started and due:
                return True
        return epoch_idx is not None and self.update_starting_at_epoch is not None \
            and epoch_idx >= self.update_starting_at_epoch
