"""The Trainer facade: arguments live in a RunConfig, run state in a RankSession, and a Trainer that
travels (to a rank, inside a callback) pickles as what it is built from, never as its run."""
from __future__ import annotations

import pickle

import torch
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as pl
from raytrainer.launchers.base import RankPayload, RunResult


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(16, 3, generator=g), torch.randn(16, 1, generator=g)), batch_size=4)


def _trainer(tmp_path, **kw) -> pl.Trainer:
    return pl.Trainer(default_root_dir=str(tmp_path), enable_progress_bar=False, enable_model_summary=False,
                      **kw)


def test_arguments_read_and_write_the_config(tmp_path):
    t = _trainer(tmp_path, max_epochs=3, gradient_clip_val=0.5)
    assert t.max_epochs == 3 and t.config.max_epochs == 3 and t.gradient_clip_val == 0.5
    t.max_epochs = 5
    assert t.config.max_epochs == 5


def test_run_state_lives_in_the_session(tmp_path):
    t = _trainer(tmp_path, max_epochs=2)
    t.fit(Tiny(), _loader())
    assert (t.global_step, t.current_epoch) == (8, 2) == (t.session.state.global_step, t.session.state.current_epoch)
    assert "loss" in t.callback_metrics and t.lightning_module is t.session.module
    t.should_stop = True
    assert t.session.should_stop


def test_a_pickled_trainer_carries_config_callbacks_loggers_and_counters_only(tmp_path):
    t = _trainer(tmp_path, max_epochs=2)
    model = Tiny()
    t.fit(model, _loader())
    copy = pickle.loads(pickle.dumps(t))
    assert type(copy) is pl.Trainer and copy is not t
    assert copy.config == t.config and copy.global_step == 8 and copy.current_epoch == 2
    assert [type(c) for c in copy.callbacks] == [type(c) for c in t.callbacks]
    assert copy.lightning_module is None and copy.optimizers == [] and copy.callback_metrics == {}


class MyTrainer(pl.Trainer):
    """A user's Trainer subclass: ranks run under the same class."""


class HoldsTrainer(pl.Callback):
    """Keeps its Trainer, as user callbacks often do: a Trainer -> callback -> Trainer cycle."""

    def setup(self, trainer, pl_module, stage):
        self.trainer = trainer


def test_a_trainer_held_by_its_own_callback_pickles(tmp_path):
    t = _trainer(tmp_path, max_epochs=1, callbacks=[HoldsTrainer()])
    t.fit(Tiny(), _loader())
    copy = pickle.loads(pickle.dumps(t))
    held = next(c for c in copy.callbacks if isinstance(c, HoldsTrainer))
    assert held.trainer is copy and copy.global_step == 4
    payload = pickle.loads(pickle.dumps(RankPayload.of(t)))
    assert next(c for c in payload.callbacks if isinstance(c, HoldsTrainer)).trainer.global_step == 4


def test_rank_payload_rebuilds_the_users_trainer_subclass(tmp_path):
    t = MyTrainer(default_root_dir=str(tmp_path), enable_progress_bar=False, max_steps=3)
    rank_trainer = pickle.loads(pickle.dumps(RankPayload.of(t))).build()
    assert type(rank_trainer) is MyTrainer and rank_trainer.max_steps == 3
    assert rank_trainer.session is not t.session and rank_trainer.session.trainer is rank_trainer


def test_run_result_applies_to_the_driver_trainer(tmp_path):
    """What rank 0 sends back makes the driver's Trainer and module look as after an in-process run."""
    worker = _trainer(tmp_path, max_epochs=1)
    model = Tiny()
    worker.fit(model, _loader())
    result = RunResult.from_session(worker.session, "fit", None, world_size=2)
    driver, fresh = _trainer(tmp_path, max_epochs=1), Tiny()
    result.apply(driver, fresh)
    assert driver.global_step == worker.global_step and driver.world_size == 2
    assert torch.equal(fresh.layer.weight, model.layer.weight) and fresh.trainer is driver
    assert driver.checkpoint_callback.last_model_path == worker.checkpoint_callback.last_model_path
    assert driver.logger.version == worker.logger.version
