"""LearningRateMonitor: the same names, steps and values as Lightning's for the same runs (schedulers with their
intervals and names, parameter groups, several optimizers, momentum and weight decay)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as rt
from raytrainer.callbacks import LearningRateMonitor
from raytrainer.utilities.exceptions import MisconfigurationException


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(40, 4, generator=g), torch.randn(40, 1, generator=g)), batch_size=8)


class _Base:
    """Two layers; ``case`` picks the optimizer setup."""

    def __init__(self, case: str) -> None:
        super().__init__()
        self.case = case
        self.body = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 1)
        self.automatic_optimization = case != "two_optimizers"

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        if self.automatic_optimization:
            return loss
        for opt in self.optimizers():
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in self.optimizers():
            opt.step()
        return None

    def configure_optimizers(self):
        if self.case == "sgd_epoch_scheduler":
            opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]
        if self.case == "adam_groups_named_step_scheduler":
            opt = torch.optim.Adam([{"params": self.body.parameters()},
                                    {"params": self.head.parameters(), "name": "head", "lr": 0.01}], lr=0.02)
            sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=7)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "name": "warmup"}}
        return [torch.optim.SGD(self.body.parameters(), lr=0.1, momentum=0.5),
                torch.optim.SGD(self.head.parameters(), lr=0.2)]


def _records(base, case: str, monitor_kwargs: dict, tmp_path) -> list[tuple[int, dict[str, float]]]:
    """(step, learning-rate metrics) for every logger call of a 3-epoch fit of ``base`` (raytrainer or Lightning)."""
    seen: list[tuple[int, dict[str, float]]] = []

    class Recorder(base.loggers.Logger):
        name, version = "rec", 0

        def log_metrics(self, metrics, step=None):
            got = {k: float(v) for k, v in metrics.items() if k.startswith(("lr-", "warmup"))}
            if got:
                seen.append((step, got))

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    model = type("Model", (_Base, base.LightningModule), {})(case)
    kwargs = dict(max_epochs=3, logger=Recorder(), log_every_n_steps=2, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                  callbacks=[base.callbacks.LearningRateMonitor(**monitor_kwargs)])
    if base is not rt:
        kwargs.update(accelerator="cpu", devices=1)
    base.Trainer(**kwargs).fit(model, _data())
    return seen


@pytest.mark.parametrize("case,monitor_kwargs", [
    ("sgd_epoch_scheduler", {"log_momentum": True, "log_weight_decay": True}),
    ("sgd_epoch_scheduler", {"logging_interval": "step"}),
    ("adam_groups_named_step_scheduler", {"log_momentum": True}),
    ("adam_groups_named_step_scheduler", {"logging_interval": "epoch", "log_weight_decay": True}),
    ("two_optimizers", {"log_momentum": True}),
])
def test_same_names_steps_and_values_as_lightning(L, tmp_path, case, monitor_kwargs):
    ours = _records(rt, case, monitor_kwargs, tmp_path / "ours")
    theirs = _records(L, case, monitor_kwargs, tmp_path / "lightning")
    assert ours and ours == theirs


def test_the_values_land_in_lrs_and_callback_metrics(tmp_path):
    monitor = LearningRateMonitor(log_momentum=True)
    trainer = rt.Trainer(max_epochs=2, callbacks=[monitor], enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=str(tmp_path), log_every_n_steps=1)
    trainer.fit(type("Model", (_Base, rt.LightningModule), {})("sgd_epoch_scheduler"), _data())
    assert monitor.lrs == {"lr-SGD": [0.1, 0.05]}  # logged at each epoch start, the StepLR halving it
    assert monitor.last_momentum_values == {"lr-SGD-momentum": 0.9}
    assert trainer.callback_metrics["lr-SGD"].item() == pytest.approx(0.05)  # a float32 tensor, as Lightning


def test_refused_without_a_logger_and_with_a_bad_interval(tmp_path):
    with pytest.raises(MisconfigurationException, match="logging_interval='batch'"):
        LearningRateMonitor(logging_interval="batch")
    trainer = rt.Trainer(max_epochs=1, logger=False, callbacks=[LearningRateMonitor()], enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    with pytest.raises(MisconfigurationException, match="needs a logger"):
        trainer.fit(type("Model", (_Base, rt.LightningModule), {})("sgd_epoch_scheduler"), _data())
