"""ModelCheckpoint(save_on_exception=True): the checkpoint written when fit raises, against pytorch_lightning 2.6
(file names, the step and epoch it holds, the weights), and the exception still reaching the caller."""
from __future__ import annotations

import os

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as rt

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                        "ignore::FutureWarning")


class Boom(Exception):
    """The user's error, raised from a hook at a chosen global step."""


def model(base, fail_at: int | None, where: str = "training_step"):
    class M(base.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 1)

        def training_step(self, batch, batch_idx):
            if where == "training_step" and self.global_step == fail_at:
                raise Boom(f"failed at step {self.global_step}")
            loss = (self.layer(batch[0]) - batch[1]).pow(2).mean()
            self.log("loss", loss, on_epoch=True)
            return loss

        def on_train_batch_end(self, outputs, batch, batch_idx):
            if where == "on_train_batch_end" and self.global_step == fail_at:
                raise Boom(f"failed after step {self.global_step}")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return M()


def fit(base, tmp_path, fail_at, where="training_step", raises=True, **ckpt_kwargs):
    """Fit on ``base``; return (file names written, the trainer, the checkpoint callback)."""
    torch.manual_seed(0)
    dirpath = tmp_path / base.__name__
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, generator=g)
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)
    cb = base.callbacks.ModelCheckpoint(dirpath=str(dirpath), **ckpt_kwargs)
    kwargs = dict(max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                  callbacks=[cb], default_root_dir=str(tmp_path))
    trainer = base.Trainer(**kwargs)
    m = model(base, fail_at, where)
    if raises:
        with pytest.raises(Boom):
            trainer.fit(m, data)
    else:
        trainer.fit(m, data)
    # raytrainer writes a manifest next to each checkpoint (crash-safe writes); compare the checkpoints
    files = sorted(f for f in os.listdir(dirpath) if not f.endswith(".manifest.json")) if dirpath.exists() else []
    return files, trainer, cb


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_an_exception_writes_the_checkpoint_lightning_writes(L, tmp_path):
    l_files, _, l_cb = fit(L, tmp_path, fail_at=6, save_on_exception=True)
    r_files, _, r_cb = fit(rt, tmp_path, fail_at=6, save_on_exception=True)
    assert r_files == l_files == ["epoch=0-step=4.ckpt", "epoch=1-step=6.ckpt"]
    lc, rc = load(tmp_path / "pytorch_lightning" / l_files[-1]), load(tmp_path / "raytrainer" / r_files[-1])
    assert (rc["global_step"], rc["epoch"]) == (lc["global_step"], lc["epoch"]) == (6, 1)
    for k, v in lc["state_dict"].items():
        torch.testing.assert_close(rc["state_dict"][k], v)
    # the epoch-0 top-1 checkpoint stays best: the exception checkpoint is not ranked
    assert os.path.basename(r_cb.best_model_path) == os.path.basename(l_cb.best_model_path)


def test_save_last_writes_last_ckpt_too(L, tmp_path):
    l_files, *_ = fit(L, tmp_path, fail_at=2, save_on_exception=True, save_last=True)
    r_files, *_ = fit(rt, tmp_path, fail_at=2, save_on_exception=True, save_last=True)
    assert r_files == l_files == ["epoch=0-step=2.ckpt", "last.ckpt"]
    assert load(tmp_path / "raytrainer" / "last.ckpt")["global_step"] == 2


def test_off_by_default(L, tmp_path):
    l_files, *_ = fit(L, tmp_path, fail_at=6)
    r_files, *_ = fit(rt, tmp_path, fail_at=6)
    assert r_files == l_files == ["epoch=0-step=4.ckpt"]


def test_no_second_file_for_a_step_already_saved(L, tmp_path):
    """every_n_train_steps=2 saved step 2 in on_train_batch_end before the module's hook raised."""
    kw = dict(save_on_exception=True, every_n_train_steps=2, save_top_k=-1)
    l_files, *_ = fit(L, tmp_path, fail_at=2, where="on_train_batch_end", **kw)
    r_files, *_ = fit(rt, tmp_path, fail_at=2, where="on_train_batch_end", **kw)
    assert r_files == l_files == ["epoch=0-step=2.ckpt"]


def test_no_file_before_the_first_step(L, tmp_path):
    l_files, *_ = fit(L, tmp_path, fail_at=0, save_on_exception=True)
    r_files, *_ = fit(rt, tmp_path, fail_at=0, save_on_exception=True)
    assert r_files == l_files == []


def test_the_exception_checkpoint_resumes(tmp_path):
    files, *_ = fit(rt, tmp_path, fail_at=6, save_on_exception=True)
    path = str(tmp_path / "raytrainer" / "epoch=1-step=6.ckpt")
    trainer = rt.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=str(tmp_path))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, generator=g)
    trainer.fit(model(rt, fail_at=None), DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4),
                ckpt_path=path)
    assert trainer.global_step == 12


def test_settings_lightning_refuses_are_misconfigurations(L):
    from raytrainer.utilities.exceptions import MisconfigurationException

    for kwargs in (dict(save_top_k=-2), dict(mode="up"), dict(save_top_k=3), dict(every_n_epochs=-1),
                   dict(every_n_train_steps=-1), dict(every_n_epochs=2, every_n_train_steps=3)):
        with pytest.raises(L.utilities.exceptions.MisconfigurationException):
            L.callbacks.ModelCheckpoint(**kwargs)
        with pytest.raises(MisconfigurationException):
            rt.ModelCheckpoint(**kwargs)
