"""Trainer(barebones=True): what it turns off, what it refuses (as pytorch_lightning does), and that a
barebones step does no logging work."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as pl
from raytrainer.core.session import BarebonesResults
from raytrainer.utilities.exceptions import MisconfigurationException

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")

REFUSED = [("enable_checkpointing", True), ("logger", True), ("enable_progress_bar", True),
           ("log_every_n_steps", 10), ("enable_model_summary", True), ("num_sanity_val_steps", 2),
           ("fast_dev_run", True), ("fast_dev_run", 3), ("detect_anomaly", True), ("profiler", "simple")]
ACCEPTED = [("enable_checkpointing", False), ("logger", False), ("logger", None), ("enable_progress_bar", False),
            ("log_every_n_steps", 0), ("enable_model_summary", False), ("num_sanity_val_steps", 0),
            ("fast_dev_run", False), ("fast_dev_run", 0), ("detect_anomaly", False), ("profiler", None)]


@pytest.mark.parametrize(("name", "value"), REFUSED)
def test_an_argument_that_costs_speed_is_refused_as_in_lightning(L, tmp_path, name, value):
    with pytest.raises(ValueError, match=rf"barebones=True, {name}="):  # Lightning raises ValueError
        L.Trainer(barebones=True, default_root_dir=str(tmp_path), **{name: value})
    with pytest.raises(MisconfigurationException, match=rf"`Trainer\(barebones=True, {name}=.*drop barebones"):
        pl.Trainer(barebones=True, default_root_dir=str(tmp_path), **{name: value})


@pytest.mark.parametrize(("name", "value"), ACCEPTED)
def test_a_value_that_keeps_a_feature_off_is_accepted_as_in_lightning(L, tmp_path, name, value):
    L.Trainer(barebones=True, default_root_dir=str(tmp_path), **{name: value})
    pl.Trainer(barebones=True, default_root_dir=str(tmp_path), **{name: value})


def settings(trainer) -> tuple:
    """What barebones switches off, as a Lightning user reads it on the Trainer."""
    kinds = sorted({"checkpoint" if c in trainer.checkpoint_callbacks else "progress" if
                    c is trainer.progress_bar_callback else type(c).__name__ for c in trainer.callbacks})
    return (trainer.barebones, trainer.loggers, trainer.logger, kinds, trainer.log_every_n_steps,
            trainer.num_sanity_val_steps, trainer.checkpoint_callback, trainer.progress_bar_callback)


def test_barebones_turns_off_what_lightning_turns_off(L, tmp_path):
    ours = pl.Trainer(barebones=True, default_root_dir=str(tmp_path))
    theirs = L.Trainer(barebones=True, default_root_dir=str(tmp_path))
    assert settings(ours) == settings(theirs) == (True, [], None, [], 0, 0, None, None)


@pytest.mark.parametrize("callback", ["ModelCheckpoint", "TQDMProgressBar"])
def test_a_callback_that_barebones_turns_off_is_refused(L, tmp_path, callback):
    with pytest.raises(L.utilities.exceptions.MisconfigurationException, match=callback):
        L.Trainer(barebones=True, callbacks=[getattr(L.callbacks, callback)()], default_root_dir=str(tmp_path))
    with pytest.raises(MisconfigurationException, match=rf"barebones=True.*{callback}"):
        pl.Trainer(barebones=True, callbacks=[getattr(pl.callbacks, callback)()], default_root_dir=str(tmp_path))


def fit_logging_module(base, tmp_path, **trainer_kwargs):
    class Model(base.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            loss = self.layer(batch[0]).sum()
            self.log("loss", loss, prog_bar=True)
            return loss

        def validation_step(self, batch, batch_idx):
            self.log("val", self.layer(batch[0]).sum())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = DataLoader(TensorDataset(torch.randn(16, 4)), batch_size=4)
    trainer = base.Trainer(max_epochs=2, default_root_dir=str(tmp_path), **trainer_kwargs)
    model = Model()
    trainer.fit(model, data, data)
    return trainer, model


def test_self_log_warns_and_is_dropped_as_in_lightning(L, tmp_path):
    with pytest.warns(UserWarning, match="barebones"):
        theirs, _ = fit_logging_module(L, tmp_path / "pl", barebones=True)
    with pytest.warns(UserWarning, match=r"self.log\('loss'\).*barebones=True"):
        ours, model = fit_logging_module(pl, tmp_path / "rt", barebones=True)
    assert (dict(ours.callback_metrics), ours.logged_metrics, ours.progress_bar_metrics) == \
        (dict(theirs.callback_metrics), theirs.logged_metrics, theirs.progress_bar_metrics) == ({}, {}, {})
    assert ours.global_step == theirs.global_step == 8
    assert not (tmp_path / "rt" / "lightning_logs").exists()  # no logger, no checkpoint written


def test_a_barebones_step_does_no_logging_work(tmp_path, monkeypatch):
    """Nothing accumulates and the per-step logger path never runs."""
    calls = []
    from raytrainer.core.session import RankSession

    monkeypatch.setattr(RankSession, "log_step_metrics", lambda self: calls.append("step metrics"))
    with pytest.warns(UserWarning, match="barebones"):
        trainer, _ = fit_logging_module(pl, tmp_path, barebones=True)
    results = trainer.session.results
    assert all(isinstance(r, BarebonesResults) for r in results.values())
    assert all(not r.accum and not r.step_values and not r.meta for r in results.values())
    assert calls == []


def test_without_barebones_the_same_module_logs(tmp_path):
    trainer, _ = fit_logging_module(pl, tmp_path, enable_progress_bar=False, enable_model_summary=False,
                                    log_every_n_steps=1)
    assert {"loss", "val"} <= set(trainer.callback_metrics) and not trainer.barebones
