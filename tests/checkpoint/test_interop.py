"""Checkpoints cross over with pytorch_lightning 2.x in both directions (the real package, installed)."""
from __future__ import annotations

import logging
import os
import warnings

import pytest
import torch
from ckpt_models import Regressor, assert_bitwise_equal, loaders, make_body, params, trainer

import raytrainer as rt

pl = pytest.importorskip("pytorch_lightning")
PLRegressor = make_body(pl.LightningModule)


@pytest.fixture(autouse=True)
def _quiet_lightning():
    """Lightning's tips and dataloader warnings are noise here."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _pl_trainer(**kwargs) -> pl.Trainer:
    args = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                devices=1, log_every_n_steps=1)
    args.update(kwargs)
    return pl.Trainer(**args)


class _Starts:
    """Records (epoch, global_step) at each epoch start: where a resumed run re-entered."""

    def __init__(self):
        self.seen = []

    def hook(self, trainer, pl_module):
        self.seen.append((trainer.current_epoch, trainer.global_step))


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """raytrainer checkpoints: mid-epoch (step 13), epoch end (step 20) and after fit (step 30)."""
    root = tmp_path_factory.mktemp("ours")
    rt.seed_everything(11)
    model = Regressor()
    step_cb = rt.ModelCheckpoint(dirpath=str(root / "steps"), every_n_train_steps=13, save_top_k=-1)
    epoch_cb = rt.ModelCheckpoint(dirpath=str(root / "epochs"), save_top_k=-1, monitor="val_loss")
    t = trainer(root, max_epochs=3, callbacks=[step_cb, epoch_cb])
    t.fit(model, *loaders())
    t.save_checkpoint(str(root / "after.ckpt"))
    return {"mid": str(root / "steps" / "epoch=1-step=13.ckpt"), "end": str(root / "epochs" / "epoch=1-step=20.ckpt"),
            "after": str(root / "after.ckpt"), "model": model}


def test_lightning_loads_our_checkpoint(ours):
    model = PLRegressor.load_from_checkpoint(ours["after"])
    assert isinstance(model, pl.LightningModule) and model.hparams.lr == 0.02
    assert_bitwise_equal(params(model), params(ours["model"]))


@pytest.mark.parametrize("which, first_batch", [("mid", (1, 3, 13)), ("end", (2, 0, 20)), ("after", (3, 0, 30))])
def test_lightning_resumes_fit_from_our_checkpoint(ours, which, first_batch):
    batches = []

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            batches.append((trainer.current_epoch, batch_idx, trainer.global_step))

    model = PLRegressor()
    t = _pl_trainer(max_epochs=4, enable_checkpointing=False, callbacks=[Spy()])
    t.fit(model, *loaders(), ckpt_path=ours[which])
    assert batches[0] == first_batch  # epoch, batch within it, and step where Lightning carried on
    assert (t.current_epoch, t.global_step) == (4, 40)
    # optimizer and scheduler state came across: Lightning continued the same AdamW moments
    assert t.optimizers[0].state_dict()["state"][0]["step"] == 40


@pytest.fixture(scope="module")
def theirs(tmp_path_factory):
    """Lightning checkpoints: mid-epoch (step 13), epoch end (step 20), after fit (step 30)."""
    root = tmp_path_factory.mktemp("theirs")
    pl.seed_everything(11, verbose=False)
    model = PLRegressor(hidden=24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step_cb = pl.callbacks.ModelCheckpoint(dirpath=str(root / "steps"), every_n_train_steps=13, save_top_k=-1)
        epoch_cb = pl.callbacks.ModelCheckpoint(dirpath=str(root / "epochs"), save_top_k=-1, monitor="val_loss")
        t = _pl_trainer(max_epochs=3, callbacks=[step_cb, epoch_cb])
        t.fit(model, *loaders())
        t.save_checkpoint(str(root / "after.ckpt"))
    return {"mid": str(root / "steps" / "epoch=1-step=13.ckpt"), "end": str(root / "epochs" / "epoch=1-step=20.ckpt"),
            "after": str(root / "after.ckpt"), "model": model, "best": epoch_cb.best_model_path}


def test_we_load_a_lightning_checkpoint(theirs):
    ckpt = torch.load(theirs["after"])  # Lightning's files are plain too
    assert "raytrainer" not in ckpt
    model = Regressor.load_from_checkpoint(theirs["after"])
    assert model.hparams.hidden == 24
    assert_bitwise_equal(params(model), params(theirs["model"]))


@pytest.mark.parametrize("which, start", [("mid", (1, 13)), ("end", (2, 20)), ("after", (3, 30))])
def test_we_resume_fit_from_a_lightning_checkpoint(theirs, tmp_path, which, start):
    starts = _Starts()

    class Spy(rt.Callback):
        on_train_epoch_start = starts.hook

    steps_in_first_epoch = []

    class Count(rt.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.current_epoch == start[0]:
                steps_in_first_epoch.append(batch_idx)

    cb = rt.ModelCheckpoint(monitor="val_loss", save_top_k=-1)
    t = trainer(tmp_path, max_epochs=4, callbacks=[Spy(), Count(), cb])
    t.fit(Regressor(hidden=24), *loaders(), ckpt_path=theirs[which])
    assert starts.seen[0] == start
    assert steps_in_first_epoch[0] == start[1] % 10  # the batches done before the save are not trained again
    assert (t.current_epoch, t.global_step) == (4, 40)
    assert t.optimizers[0].state_dict()["state"][0]["step"] == 40


def test_we_restore_lightning_model_checkpoint_state(theirs, tmp_path):
    cb = rt.ModelCheckpoint(dirpath=os.path.dirname(theirs["best"]), monitor="val_loss", save_top_k=-1)
    t = trainer(tmp_path, max_epochs=3, callbacks=[cb])
    t.fit(Regressor(hidden=24), *loaders(), ckpt_path=theirs["after"])
    assert t.global_step == 30  # nothing left to train
    assert cb.best_model_path == theirs["best"]
    assert len(cb.best_k_models) == 3
