"""Bad Trainer arguments are refused at Trainer(...), before any work, with a message naming the value and the
fix; the wrong types Lightning lets through to fail mid-run (max_epochs="3") are refused too."""
from __future__ import annotations

import logging

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as pl
from raytrainer.utilities.exceptions import MisconfigurationException


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_epochs=-5), r"max_epochs=-5 .*-1 \(no limit\)"),
    (dict(max_epochs="3"), r"max_epochs='3' \(str\)"),
    (dict(min_epochs=-1), r"min_epochs=-1"),
    (dict(min_steps="a"), r"min_steps='a'"),
    (dict(log_every_n_steps=2.5), r"log_every_n_steps=2.5 \(float\)"),
    (dict(num_sanity_val_steps=-3), r"num_sanity_val_steps=-3"),
    (dict(num_processes=0), r"num_processes=0 asks for no process"),
    (dict(num_processes=2.5), r"num_processes=2.5 must be a positive integer"),
    (dict(accelerator="cpu", devices=1.7), r"devices=1.7 must be a positive integer"),
    (dict(num_nodes=1.5), r"num_nodes=1.5 must be a positive integer"),
    (dict(num_nodes=True), r"num_nodes=True must be a positive integer"),
])
def test_bad_counts_and_types_are_refused_at_construction(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match) as info:
        pl.Trainer(logger=False, enable_progress_bar=False, **kwargs)
    assert isinstance(info.value, ValueError)  # code that catches ValueError keeps working


def test_whole_numbers_in_other_types_are_accepted():
    assert pl.Trainer(num_processes=2.0, logger=False).plan.world_size == 2
    assert pl.Trainer(accelerator="cpu", devices="2", logger=False).plan.world_size == 2
    assert pl.Trainer(max_epochs=-1, logger=False).max_epochs == -1


def test_lightning_refuses_a_negative_max_epochs_too(L):
    with pytest.raises(Exception, match="max_epochs"):
        L.Trainer(max_epochs=-5, logger=False)


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_an_empty_training_loader_warns_that_nothing_trains(tmp_path, caplog):
    empty = DataLoader(TensorDataset(torch.zeros(0, 2)), batch_size=4)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=str(tmp_path))
    logger = logging.getLogger("raytrainer")
    logger.addHandler(caplog.handler)
    try:
        trainer.fit(Tiny(), empty)
    finally:
        logger.removeHandler(caplog.handler)
    assert trainer.global_step == 0
    assert "training data has no batches" in caplog.text



@pytest.mark.parametrize("damage, match", [
    (lambda c: c["raytrainer"].pop("position"), "no 'position' entry"),
    (lambda c: c.__setitem__("global_step", "lots"), "'global_step' is 'lots'"),
    (lambda c: c["raytrainer"]["position"].__setitem__("batch_idx", "x"), "loop position is damaged"),
], ids=["no-position", "global-step-text", "batch-idx-text"])
def test_a_damaged_checkpoint_dict_is_refused_before_anything_loads(tmp_path, damage, match):
    """Issue 20 item 9: the error names the file and the key, and the module's weights are untouched."""
    from raytrainer.io import storage

    loader = DataLoader(TensorDataset(torch.ones(8, 2)), batch_size=4)
    quiet = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer = pl.Trainer(max_steps=2, enable_checkpointing=False, **quiet)
    trainer.fit(Tiny(), loader)
    path = str(tmp_path / "damaged.ckpt")
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    damage(ckpt)
    storage.save(ckpt, path)
    fresh = Tiny()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(storage.CheckpointCorruptError, match=match) as err:
        pl.Trainer(max_steps=4, enable_checkpointing=False, **quiet).fit(fresh, loader, ckpt_path=path)
    assert "damaged.ckpt" in str(err.value) and "Nothing was loaded" in str(err.value)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, before[k]), k
