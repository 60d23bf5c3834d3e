"""Trainer attributes Lightning code reads (device_ids, distributed_sampler_kwargs, enable_validation,
val_check_batch, the argument echoes), compared with pytorch_lightning on the same script."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as pl

ATTRS = ("device_ids", "distributed_sampler_kwargs", "enable_validation", "val_check_batch", "overfit_batches",
         "reload_dataloaders_every_n_epochs", "enable_autolog_hparams")


def build(base, validate: bool):
    class Model(base.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)
            self.seen: dict[str, dict] = {}

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

        def on_train_start(self):
            self.seen["on_train_start"] = {a: getattr(self.trainer, a) for a in ATTRS}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    if validate:
        def validation_step(self, batch, batch_idx):
            self.log("v", self.layer(batch[0]).sum())
        Model.validation_step = validation_step
    return Model()


def loader():
    return DataLoader(TensorDataset(torch.randn(12, 2)), batch_size=2)


@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("extra", [dict(), dict(val_check_interval=0.5), dict(val_check_interval=2,
                                                                           check_val_every_n_epoch=None)])
def test_attributes_match_lightning_before_and_during_fit(L, tmp_path, validate, extra):
    seen = {}
    for name, base in (("lightning", L), ("raytrainer", pl)):
        kw = dict(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False, default_root_dir=str(tmp_path / name), num_sanity_val_steps=0, **extra)
        trainer = base.Trainer(**kw)
        before = {a: getattr(trainer, a) for a in ("device_ids", "distributed_sampler_kwargs", "overfit_batches",
                                                    "reload_dataloaders_every_n_epochs", "enable_autolog_hparams")}
        model = build(base, validate)
        trainer.fit(model, loader(), loader() if validate else None)
        seen[name] = (before, model.seen["on_train_start"])
    assert seen["raytrainer"] == seen["lightning"]


def test_two_ranks_get_their_sampler_arguments():
    trainer = pl.Trainer(num_processes=2, logger=False)
    assert trainer.device_ids == [0, 1]
    assert trainer.distributed_sampler_kwargs == {"num_replicas": 2, "rank": 0}
