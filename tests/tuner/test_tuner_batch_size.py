"""Tuner.scale_batch_size and the BatchSizeFinder callback: the same sizes as Lightning for a module that runs out
of memory above a known batch size, the attribute set where Lightning sets it, the module and Trainer left as
they were, and the one-process rule on Ray plans."""
from __future__ import annotations

import contextlib
import copy
import gc

import pytest
import torch
from torch.utils.data import DataLoader
from tuner_models import assert_bitwise_equal, data_module, files_under, oom_module, regression_data, weights

import raytrainer as rt
from raytrainer.callbacks import BatchSizeFinder, ModelCheckpoint
from raytrainer.loggers import CSVLogger
from raytrainer.tuner import Tuner
from raytrainer.utilities.exceptions import MisconfigurationException

QUIET = dict(enable_progress_bar=False, enable_model_summary=False)


@contextlib.contextmanager
def _frozen_gc():
    """Lightning collects garbage before every trial, which takes ~1 s in a process this large; objects that
    exist now are left out of those collections (their behaviour is the same, only faster)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _scale(pkg, tuner_cls, root, limit, **kwargs):
    pkg.seed_everything(0)
    model = oom_module(pkg.LightningModule, limit=limit)()
    trainer = pkg.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, max_epochs=3,
                          default_root_dir=str(root), **QUIET)
    return tuner_cls(trainer).scale_batch_size(model, **kwargs), model


@pytest.mark.parametrize("limit,kwargs", [
    (23, dict(mode="power")),                                   # 2..16 fit, 32 does not -> 16
    (23, dict(mode="binsearch")),                               # 16 fits, 32 not; bisect to 23; 5% margin -> 21
    (9, dict(mode="binsearch", margin=0.0, init_val=3)),        # 3, 6 fit, 12 not, 9 fits, 10 not -> 9
    (23, dict(mode="power", max_trials=3)),                     # stops at 8 after 3 trials
    (500, dict(mode="power", init_val=64)),                     # 256 >= the 200 samples: not raised further
    (1000, dict(mode="binsearch", max_val=48, init_val=6)),     # capped at max_val=48 (not tried) -> 45 with margin
])
def test_scale_batch_size_matches_lightning(L, tmp_path, limit, kwargs):
    from pytorch_lightning.tuner import Tuner as LTuner

    with _frozen_gc():
        theirs, their_model = _scale(L, LTuner, tmp_path / "pl", limit, **kwargs)
    ours, our_model = _scale(rt, Tuner, tmp_path / "rt", limit, **kwargs)
    assert ours == theirs == our_model.batch_size == their_model.batch_size
    assert_bitwise_equal(weights(our_model), weights(their_model))


def test_scale_batch_size_leaves_trainer_and_module_as_before(tmp_path):
    model = oom_module(rt.LightningModule, limit=23)()
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    trainer = rt.Trainer(max_epochs=2, limit_train_batches=4, default_root_dir=str(tmp_path), callbacks=[ckpt],
                         logger=CSVLogger(str(tmp_path)), **QUIET)
    trainer.fit(model)
    before = dict(w=weights(model), opt=copy.deepcopy(trainer.optimizers[0].state_dict()),
                  counters=(trainer.global_step, trainer.current_epoch), callbacks=list(trainer.callbacks),
                  states=[copy.deepcopy(cb.state_dict()) for cb in trainer.callbacks], loggers=list(trainer.loggers),
                  version=trainer.logger.version, files=files_under(str(tmp_path)), rng=torch.get_rng_state())
    assert Tuner(trainer).scale_batch_size(model, mode="binsearch", margin=0.0) == 23
    assert model.batch_size == 23  # the one thing that changed
    assert_bitwise_equal(weights(model), before["w"])
    assert trainer.optimizers[0].state_dict() == before["opt"]
    assert (trainer.global_step, trainer.current_epoch) == before["counters"] == (8, 2)
    assert trainer.callbacks == before["callbacks"]
    assert [cb.state_dict() for cb in trainer.callbacks] == before["states"]
    assert trainer.loggers == before["loggers"] and trainer.logger.version == before["version"]
    assert files_under(str(tmp_path)) == before["files"]
    assert torch.equal(torch.get_rng_state(), before["rng"])
    assert model.trainer is trainer


def test_fit_after_scale_batch_size_equals_fit_with_that_size(tmp_path):
    def fit(tune: bool, size: int | None = None):
        rt.seed_everything(1)
        model = oom_module(rt.LightningModule, limit=23, n=96)()
        trainer = rt.Trainer(max_epochs=2, default_root_dir=str(tmp_path), logger=False, enable_checkpointing=False,
                             deterministic=True, **QUIET)
        if tune:
            assert Tuner(trainer).scale_batch_size(model) == 16
        else:
            model.batch_size = size
        model.seen.clear()
        trainer.fit(model)
        return model, trainer

    tuned, t1 = fit(True)
    plain, t2 = fit(False, 16)
    assert tuned.seen == plain.seen == [("training_step", 16)] * 12
    assert_bitwise_equal(weights(tuned), weights(plain))
    assert t1.global_step == t2.global_step == 12


@pytest.mark.parametrize("in_hparams", [False, True])
def test_batch_size_on_datamodule_and_hparams(tmp_path, in_hparams):
    model = oom_module(rt.LightningModule, limit=12, batch_size=None)()
    dm = data_module(rt.LightningDataModule, in_hparams=in_hparams)()
    trainer = rt.Trainer(max_epochs=1, default_root_dir=str(tmp_path), logger=False, enable_checkpointing=False,
                         **QUIET)
    assert Tuner(trainer).scale_batch_size(model, datamodule=dm) == 8
    assert (dm.hparams["batch_size"] if in_hparams else dm.batch_size) == 8
    assert not hasattr(model, "batch_size")


def test_model_hparams_batch_size(tmp_path):
    cls = oom_module(rt.LightningModule, limit=12, batch_size=None)

    class HP(cls):
        def __init__(self) -> None:
            super().__init__()
            self.save_hyperparameters({"batch_size": 2})

        def train_dataloader(self) -> DataLoader:
            return DataLoader(regression_data(200), batch_size=self.hparams.batch_size)

    model = HP()
    trainer = rt.Trainer(max_epochs=1, default_root_dir=str(tmp_path), logger=False, enable_checkpointing=False,
                         **QUIET)
    assert Tuner(trainer).scale_batch_size(model, mode="binsearch", margin=0.0) == 12
    assert model.hparams.batch_size == 12


@pytest.mark.parametrize("method,step", [("validate", "validation_step"), ("test", "test_step"),
                                         ("predict", "predict_step")])
def test_eval_methods(tmp_path, method, step):
    model = oom_module(rt.LightningModule, limit=40, val=True, oom_in=step)()
    trainer = rt.Trainer(default_root_dir=str(tmp_path), logger=False, enable_checkpointing=False, **QUIET)
    assert Tuner(trainer).scale_batch_size(model, method=method, mode="binsearch", margin=0.0) == 40
    sizes = {n for fx, n in model.seen if fx == step}
    assert {2, 4, 8, 16, 32, 64, 48, 40, 44, 42, 41} == sizes  # each trial ran the step at its size
    assert all(fx == step for fx, _ in model.seen)  # and nothing else (no training)


def test_errors(tmp_path):
    trainer = rt.Trainer(max_epochs=1, default_root_dir=str(tmp_path), logger=False, enable_checkpointing=False,
                         **QUIET)
    model = oom_module(rt.LightningModule, limit=23)()
    with pytest.raises(MisconfigurationException, match="dataloaders passed in directly"):
        Tuner(trainer).scale_batch_size(model, DataLoader(regression_data(), batch_size=4))
    with pytest.raises(MisconfigurationException, match="batch_arg_name"):
        Tuner(trainer).scale_batch_size(model, batch_arg_name="bs")
    with pytest.raises(ValueError, match="mode='cubic'"):
        Tuner(trainer).scale_batch_size(model, mode="cubic")
    with pytest.raises(ValueError, match="margin"):
        Tuner(trainer).scale_batch_size(model, margin=1.5)
    with pytest.raises(ValueError, match="method 'tune' is invalid"):
        Tuner(trainer).scale_batch_size(model, method="tune")

    class Broken(oom_module(rt.LightningModule, limit=23)):
        def training_step(self, batch, batch_idx):
            if len(batch[0]) > 4:
                raise ValueError("a bug, not memory")
            return super().training_step(batch, batch_idx)

    broken = Broken()
    with pytest.raises(ValueError, match="a bug, not memory"):
        Tuner(trainer).scale_batch_size(broken)
    assert broken.batch_size == 4  # a failed search leaves the size the user had
    never = oom_module(rt.LightningModule, limit=0)()
    with pytest.raises(RuntimeError, match="runs out of memory"):
        Tuner(trainer).scale_batch_size(never, init_val=1)


def test_batch_size_finder_callback(tmp_path):
    """At fit start it finds the size Tuner finds, then the fit trains with loaders of that size; the weights
    equal a fit with that size set by hand."""
    def trainer(callbacks=None):
        return rt.Trainer(max_epochs=2, default_root_dir=str(tmp_path), logger=False, enable_checkpointing=False,
                          deterministic=True, callbacks=callbacks, **QUIET)

    class Counted(oom_module(rt.LightningModule, limit=23, n=96)):
        def setup(self, stage):
            self.calls = getattr(self, "calls", []) + [f"setup:{stage}"]

        def teardown(self, stage):
            self.calls = getattr(self, "calls", []) + [f"teardown:{stage}"]

    rt.seed_everything(2)
    model = Counted()
    finder = BatchSizeFinder(mode="binsearch", margin=0.0)
    t = trainer([finder])
    t.fit(model)
    assert finder.optimal_batch_size == model.batch_size == 23
    assert model.seen[-10:] == [("training_step", 23)] * 4 + [("training_step", 4)] + [("training_step", 23)] * 4 \
        + [("training_step", 4)]  # 96 = 4 x 23 + 4, twice
    assert t.global_step == 10
    assert model.calls == ["setup:fit", "teardown:fit"]  # the trials inside the fit did not run them again
    rt.seed_everything(2)
    plain = oom_module(rt.LightningModule, limit=23, n=96)()
    plain.batch_size = 23
    trainer().fit(plain)
    assert_bitwise_equal(weights(model), weights(plain))
    given = trainer([BatchSizeFinder()])
    with pytest.raises(MisconfigurationException, match="passed to trainer.fit"):
        given.fit(oom_module(rt.LightningModule)(), DataLoader(regression_data(), batch_size=4))


def test_refused_on_ray_before_any_rank_starts(tmp_path):
    trainer = rt.Trainer(num_processes=2, default_root_dir=str(tmp_path), logger=False, **QUIET)
    model = oom_module(rt.LightningModule)()
    with pytest.raises(MisconfigurationException, match=r"Trainer\(num_processes=1\)"):
        Tuner(trainer).scale_batch_size(model)
    trainer = rt.Trainer(num_processes=2, default_root_dir=str(tmp_path), logger=False,
                         callbacks=[BatchSizeFinder()], **QUIET)
    with pytest.raises(MisconfigurationException, match="BatchSizeFinder runs in one process only"):
        trainer.fit(model)
    assert trainer.session.worker_group is None and trainer.last_run is None
    assert model.batch_size == 4


def test_tuning_a_fresh_default_trainer_writes_nothing(tmp_path):
    """With the default logger, checkpointing and progress bar: the tuner writes no file, so the fit after it
    logs into version_0, as without tuning."""
    trainer = rt.Trainer(max_epochs=1, limit_train_batches=2, default_root_dir=str(tmp_path))
    model = oom_module(rt.LightningModule, limit=23)()
    assert Tuner(trainer).scale_batch_size(model) == 16
    assert Tuner(trainer).lr_find(model, num_training=5, update_attr=False) is not None
    assert files_under(str(tmp_path)) == {}
    trainer.fit(model)
    assert trainer.logger.version == 0 and trainer.global_step == 2
