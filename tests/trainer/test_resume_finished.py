"""Resuming a finished run (ckpt_path="last" after max_epochs was reached) says so in one line before the run
starts, and trains nothing; as in Lightning, on_train_start/on_train_end do not run."""
from __future__ import annotations

import logging

import torch
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as pl


def build(base):
    class Model(base.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)
            self.calls: list[str] = []

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

        def on_fit_start(self):
            self.calls.append("on_fit_start")

        def on_train_start(self):
            self.calls.append("on_train_start")

        def on_train_end(self):
            self.calls.append("on_train_end")

        def on_fit_end(self):
            self.calls.append("on_fit_end")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)
    return Model


def data():
    return DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=2)


def run(base, root, **kw):
    trainer = base.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                           default_root_dir=str(root), **kw)
    model = build(base)()
    return trainer, model


def test_a_finished_run_resumed_says_so_and_trains_nothing(L, tmp_path, caplog):
    calls = {}
    for name, base in (("lightning", L), ("raytrainer", pl)):
        trainer, model = run(base, tmp_path / name)
        trainer.fit(model, data())
        last = trainer.checkpoint_callback.best_model_path
        trainer, model = run(base, tmp_path / name)
        logger = logging.getLogger("raytrainer")
        logger.addHandler(caplog.handler)
        try:
            trainer.fit(model, data(), ckpt_path=last)
        finally:
            logger.removeHandler(caplog.handler)
        calls[name] = (model.calls, trainer.global_step, trainer.current_epoch)
    assert calls["raytrainer"] == calls["lightning"]
    assert calls["raytrainer"][0] == ["on_fit_start", "on_fit_end"]
    assert "nothing left to train" in caplog.text and "2 finished epoch(s) and 8 step(s)" in caplog.text
    assert "max_epochs=2 is already reached" in caplog.text and "larger max_epochs" in caplog.text


def test_a_run_with_epochs_left_resumes_without_the_note(tmp_path, caplog):
    trainer, model = run(pl, tmp_path)
    trainer.fit(model, data())
    last = trainer.checkpoint_callback.best_model_path
    trainer = pl.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path))
    logger = logging.getLogger("raytrainer")
    logger.addHandler(caplog.handler)
    try:
        trainer.fit(build(pl)(), data(), ckpt_path=last)
    finally:
        logger.removeHandler(caplog.handler)
    assert "nothing left to train" not in caplog.text and trainer.global_step == 12
