"""The batch transfer hooks and freeze/unfreeze, against pytorch_lightning 2.x: the same calls, in the same
order, with the same arguments, for fit, validate, test and predict; a datamodule's override wins."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as pl

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def loader(n: int = 6) -> DataLoader:
    x = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=2)


class Batch:
    """A custom batch type only a user's transfer_batch_to_device knows how to move."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y


def hooked(base, calls: list, where: str = "module"):
    """A module (and a datamodule) that wrap batches in ``Batch`` before transfer and record every hook call."""

    def before(self, batch, dataloader_idx):
        calls.append((f"{where}.before", dataloader_idx))
        return Batch(*batch)

    def transfer(self, batch, device, dataloader_idx):
        calls.append((f"{where}.transfer", str(device), dataloader_idx, type(batch).__name__))
        return Batch(batch.x.to(device), batch.y.to(device))

    def after(self, batch, dataloader_idx):
        calls.append((f"{where}.after", dataloader_idx))
        batch.x = batch.x * 2  # on the device: the steps must see this
        return batch

    hooks = {"on_before_batch_transfer": before, "transfer_batch_to_device": transfer, "on_after_batch_transfer": after}

    class M(base.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.layer = nn.Linear(3, 1)

        def training_step(self, batch, batch_idx):
            calls.append(("train", batch_idx, float(batch.x.sum())))
            return nn.functional.mse_loss(self.layer(batch.x), batch.y)

        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            calls.append(("val", batch_idx, dataloader_idx, float(batch.x.sum())))

        def test_step(self, batch, batch_idx):
            calls.append(("test", batch_idx, float(batch.x.sum())))

        def predict_step(self, batch, batch_idx):
            return batch.x.sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class DM(base.LightningDataModule):
        def train_dataloader(self):
            return loader()

        def val_dataloader(self):
            return [loader(4), loader(2)]

        def test_dataloader(self):
            return loader(2)

        def predict_dataloader(self):
            return loader(2)

    target = M if where == "module" else DM
    for name, fn in hooks.items():
        setattr(target, name, fn)
    return M(), DM()


def run(base, where: str) -> list:
    calls: list = []
    model, dm = hooked(base, calls, where)
    kwargs = dict(max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0, enable_progress_bar=False,
                  enable_model_summary=False, logger=False, enable_checkpointing=False)
    trainer = base.Trainer(**kwargs)
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    preds = trainer.predict(model, datamodule=dm)
    calls.append(("predict", [float(p) for p in preds]))
    return calls


@pytest.mark.parametrize("where", ["module", "datamodule"])
def test_batch_transfer_hooks_match_lightning(L, where):
    ours = run(pl, where)
    assert ours == run(L, where)
    assert (f"{where}.transfer", "cpu", 1, "Batch") in ours  # the second validation loader's index reaches it


def test_datamodule_override_wins_over_the_modules(caplog):
    calls: list = []
    model, dm = hooked(pl, calls, "datamodule")
    type(model).on_after_batch_transfer = lambda self, batch, idx: (calls.append(("module.after", idx)), batch)[1]
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, enable_progress_bar=False,
                         enable_model_summary=False, logger=False, enable_checkpointing=False)
    with caplog.at_level(logging.WARNING, logger="raytrainer"):
        trainer.fit(model, datamodule=dm)
    assert ("datamodule.after", 0) in calls and ("module.after", 0) not in calls
    assert "on_after_batch_transfer is overridden in both" in caplog.text


def test_freeze_and_unfreeze_match_lightning(L):
    for base in (L, pl):
        model, _ = hooked(base, [])
        assert model.freeze() is model
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        assert model.unfreeze() is model
        assert model.training and all(p.requires_grad for p in model.parameters())
