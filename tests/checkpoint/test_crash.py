"""SIGKILL a training process while it writes a checkpoint: the previous checkpoint still loads and resumes."""
from __future__ import annotations

import os

import pytest
import torch
from ckpt_models import kill_during_a_write, temp_files

import raytrainer as rt
from raytrainer.io import storage

_TRAIN = r"""
import sys, torch
import raytrainer as rt
from torch.utils.data import DataLoader, TensorDataset

class Big(rt.LightningModule):
    def __init__(self, width: int = 1024, depth: int = 4):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(depth)])

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-4)

rt.seed_everything(0)
data = DataLoader(TensorDataset(torch.randn(64, 1024)), batch_size=8, shuffle=True)
cb = rt.ModelCheckpoint(dirpath=sys.argv[1], every_n_train_steps=1, save_last=True)
trainer = rt.Trainer(max_epochs=1000, callbacks=[cb], logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0)
trainer.fit(Big(), data)
"""


def _kill_during_a_write(directory: str) -> list[str]:
    """Start training, wait for one complete checkpoint, SIGKILL while the next one is being written."""
    return kill_during_a_write(_TRAIN, directory, directory)


@pytest.mark.slow
def test_sigkill_in_the_middle_of_a_save_keeps_the_previous_checkpoint(tmp_path):
    directory = str(tmp_path / "ckpts")
    for _ in range(3):  # the kill lands inside a write almost always; retry the rare miss
        leftovers = _kill_during_a_write(directory)
        if leftovers:
            break
    assert leftovers, "the SIGKILL never landed inside a checkpoint write"

    last = os.path.join(directory, "last.ckpt")
    ckpt = storage.load(last)  # verified against its manifest: old or new content, never a mix
    step = ckpt["global_step"]
    assert step >= 1

    newest, skipped = storage.newest_valid(storage.listdir(directory))
    assert newest is not None, skipped
    namespace: dict = {}
    exec(compile(_TRAIN.split("rt.seed_everything")[0], "big_model", "exec"), namespace)
    Big = namespace["Big"]
    model = Big.load_from_checkpoint(last)
    assert torch.equal(model.net[0].weight, ckpt["state_dict"]["net.0.weight"])

    # and rerunning the command resumes from it
    from torch.utils.data import DataLoader, TensorDataset

    rt.seed_everything(0)
    data = DataLoader(TensorDataset(torch.randn(64, 1024)), batch_size=8, shuffle=True)
    cb = rt.ModelCheckpoint(dirpath=directory, save_last=True)
    starts = []

    class Spy(rt.Callback):
        def on_train_start(self, trainer, pl_module):
            starts.append(trainer.global_step)

    t = rt.Trainer(max_steps=step + 1, callbacks=[cb, Spy()], logger=False, enable_progress_bar=False,
                   enable_model_summary=False)
    t.fit(Big(), data, ckpt_path="last")
    assert starts == [step] and t.global_step == step + 1
    assert not [n for n in temp_files(directory) if n.startswith(".last.ckpt")]  # swept by the next write
    assert all(not os.path.basename(p).startswith(".") for p in storage.listdir(directory))
