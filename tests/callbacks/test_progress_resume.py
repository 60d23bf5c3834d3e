"""A fit resumed in the middle of an epoch: the bar counts on from the batches already trained and ends the epoch at
N/N, as Lightning's does (issue 19: after a recovery on Ray the bar ended at 12/16)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as rt


class Linear(rt.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _fit(root, capsys, **kw) -> str:
    x = torch.randn(32, 4)
    loader = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)  # 8 batches an epoch
    trainer = rt.Trainer(default_root_dir=str(root), callbacks=[rt.ModelCheckpoint(save_last=True)], logger=False,
                         enable_model_summary=False, **kw)
    capsys.readouterr()
    trainer.fit(Linear(), loader, ckpt_path="last")
    return capsys.readouterr().err


def test_a_resumed_epoch_ends_at_its_total(tmp_path, capsys):
    _fit(tmp_path, capsys, max_steps=5)  # stops mid-epoch: last.ckpt resumes at batch 5 of epoch 0
    lines = [line for line in _fit(tmp_path, capsys, max_epochs=1).splitlines() if line.startswith("Epoch 0")]
    assert lines and "8/8" in lines[-1], lines
    assert not any("3/8" in line for line in lines), lines  # not counted from 0
