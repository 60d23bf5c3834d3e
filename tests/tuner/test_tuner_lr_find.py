"""Tuner.lr_find and the LearningRateFinder callback: the same learning rates, losses and suggestion as Lightning,
the module and Trainer left as they were (on Ray: test_lr_find_ray.py)."""
from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch.utils.data import DataLoader
from tuner_models import assert_bitwise_equal, files_under, lr_module, regression_data, weights

import raytrainer as rt
from raytrainer.callbacks import LearningRateFinder, ModelCheckpoint
from raytrainer.loggers import CSVLogger
from raytrainer.tuner import LRFinderResult, Tuner
from raytrainer.utilities.exceptions import MisconfigurationException

QUIET = dict(enable_progress_bar=False, enable_model_summary=False)


def _lr_find(pkg, tuner_cls, root, **kwargs):
    pkg.seed_everything(7)
    model = lr_module(pkg.LightningModule)()
    trainer = pkg.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, deterministic=True,
                          default_root_dir=str(root), max_epochs=5, **QUIET)
    loader = DataLoader(regression_data(), batch_size=16, shuffle=True)
    result = tuner_cls(trainer).lr_find(model, loader, num_training=30, **kwargs)
    return result, model


@pytest.mark.parametrize("mode,max_lr", [("exponential", 1.0), ("exponential", 100.0), ("linear", 50.0)])
def test_lr_find_matches_lightning(L, tmp_path, mode, max_lr):
    """Same learning rates, smoothed losses (bitwise), early stop and suggestion as Lightning's Tuner.lr_find."""
    from pytorch_lightning.tuner import Tuner as LTuner

    theirs, their_model = _lr_find(L, LTuner, tmp_path / "pl", mode=mode, max_lr=max_lr)
    ours, our_model = _lr_find(rt, Tuner, tmp_path / "rt", mode=mode, max_lr=max_lr)
    assert ours.results["lr"] == theirs.results["lr"]
    assert ours.results["loss"] == theirs.results["loss"]
    if max_lr > 1.0:  # the loss diverged: both stopped at the same step, well before the end
        assert len(ours.results["lr"]) < 28
    for skip in ((10, 1), (0, 1), (2, 3)):
        assert ours.suggestion(*skip) == theirs.suggestion(*skip)
    assert our_model.lr == their_model.lr  # update_attr=True: the suggestion (or 0.01 when there is none)
    assert_bitwise_equal(weights(our_model), weights(their_model))  # both put the weights back


def test_lr_find_leaves_trainer_and_module_as_before(tmp_path):
    """After a fit: the tuner changes no weight, optimizer state, counter, callback, logger or file."""
    rt.seed_everything(0)
    model = lr_module(rt.LightningModule)()
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    trainer = rt.Trainer(max_epochs=4, limit_train_batches=5, default_root_dir=str(tmp_path), callbacks=[ckpt],
                         logger=CSVLogger(str(tmp_path)), **QUIET)
    loader = DataLoader(regression_data(), batch_size=16, shuffle=True)
    trainer.fit(model, loader)
    before = dict(w=weights(model), opt=copy.deepcopy(trainer.optimizers[0].state_dict()),
                  counters=(trainer.global_step, trainer.current_epoch), callbacks=list(trainer.callbacks),
                  states=[copy.deepcopy(cb.state_dict()) for cb in trainer.callbacks], loggers=list(trainer.loggers),
                  version=trainer.logger.version, files=files_under(str(tmp_path)), rng=torch.get_rng_state(),
                  lr=model.lr, metrics=dict(trainer.callback_metrics), training=model.training,
                  grads=[None if p.grad is None else p.grad.clone() for p in model.parameters()])
    result = Tuner(trainer).lr_find(model, loader, num_training=30, update_attr=False, early_stop_threshold=None)
    assert len(result.results["loss"]) == 20  # as Lightning: the Trainer's max_epochs x limit_train_batches bound it
    assert_bitwise_equal(weights(model), before["w"])
    for p, g in zip(model.parameters(), before["grads"]):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    after_opt = trainer.optimizers[0].state_dict()
    assert after_opt["param_groups"] == before["opt"]["param_groups"]
    for k, st in before["opt"]["state"].items():
        assert torch.equal(after_opt["state"][k]["momentum_buffer"], st["momentum_buffer"])
    assert (trainer.global_step, trainer.current_epoch) == before["counters"] == (20, 4)
    assert trainer.callbacks == before["callbacks"]
    assert [cb.state_dict() for cb in trainer.callbacks] == before["states"]
    assert trainer.loggers == before["loggers"] and trainer.logger.version == before["version"]
    assert files_under(str(tmp_path)) == before["files"]  # no checkpoint, log or temp file written or removed
    assert torch.equal(torch.get_rng_state(), before["rng"])
    assert model.lr == before["lr"] and model.trainer is trainer and model.training == before["training"]
    assert trainer.callback_metrics.keys() == before["metrics"].keys()


def test_fit_after_lr_find_equals_fit_with_that_lr(tmp_path):
    """Tune then fit (one Trainer) gives bitwise the weights of a fit that only sets the tuned lr."""
    def fit(tune: bool, lr: float | None = None):
        rt.seed_everything(3)
        model = lr_module(rt.LightningModule)()
        trainer = rt.Trainer(max_epochs=2, default_root_dir=str(tmp_path), logger=False,
                             enable_checkpointing=False, deterministic=True, **QUIET)
        loader = DataLoader(regression_data(), batch_size=16, shuffle=True)
        if tune:
            result = Tuner(trainer).lr_find(model, loader, num_training=25, max_lr=10.0)
            assert model.lr == result.suggestion() != 0.01
        else:
            model.lr = lr
        trainer.fit(model, loader)
        return model, trainer

    tuned, t1 = fit(True)
    plain, t2 = fit(False, tuned.lr)
    assert_bitwise_equal(weights(tuned), weights(plain))
    assert t1.global_step == t2.global_step == 32


def test_update_attr_hparams_attr_name_and_errors(tmp_path):
    loader = DataLoader(regression_data(64), batch_size=8)

    def tuner():
        return Tuner(rt.Trainer(max_epochs=3, default_root_dir=str(tmp_path), logger=False,
                                enable_checkpointing=False, **QUIET))

    model = lr_module(rt.LightningModule, hparams=True, attr="learning_rate")()
    res = tuner().lr_find(model, loader, num_training=20)
    assert model.hparams.learning_rate == res.suggestion() != 0.01
    model = lr_module(rt.LightningModule, attr="my_lr")()
    with pytest.raises(AttributeError, match="attr_name"):
        tuner().lr_find(model, loader, num_training=20)
    res = tuner().lr_find(model, loader, num_training=20, attr_name="my_lr")
    assert model.my_lr == res.suggestion()
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        tuner().lr_find(model, loader, attr_name="nope")
    with pytest.raises(ValueError, match="'exponential' or 'linear'"):
        tuner().lr_find(model, loader, mode="cubic")
    with pytest.raises(MisconfigurationException, match="method='fit' only"):
        tuner().lr_find(model, method="test", dataloaders=loader)
    with pytest.raises(MisconfigurationException, match="not dataloaders"):
        tuner().lr_find(model, dataloaders=loader)
    assert Tuner(rt.Trainer(fast_dev_run=True, default_root_dir=str(tmp_path), **QUIET)).lr_find(model, loader) \
        is None  # as Lightning: skipped under fast_dev_run


def test_suggestion_and_plot(tmp_path, monkeypatch):
    res = LRFinderResult("exponential", 1e-4, 1.0, 6)
    res.results = {"lr": [1e-4, 1e-3, 1e-2, 1e-1, 0.5, 1.0], "loss": [1.0, 0.9, 0.5, 0.4, float("nan"), 3.0]}
    # gradients over the finite points 1e-3, 1e-2, 1e-1 (skip 1 and 1): steepest fall at 1e-3
    assert res.suggestion(skip_begin=1, skip_end=1) == 1e-3
    assert res.suggestion(skip_begin=5, skip_end=1) is None  # fewer than 2 points
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "matplotlib.pyplot", None)  # as if matplotlib were not installed
        with pytest.raises(ImportError, match="pip install matplotlib"):
            res.plot()
    matplotlib = pytest.importorskip("matplotlib")  # a dev dependency (pyproject)
    matplotlib.use("Agg")
    res.results = {"lr": [10 ** (-4 + i / 4) for i in range(16)], "loss": [2.0] * 12 + [1.9, 0.5, 0.4, 0.4]}
    best = res.suggestion()
    import numpy as np  # an independent reference: numpy's gradient over the unevenly spaced points kept

    kept_lr, kept_loss = np.array(res.results["lr"][10:-1]), np.array(res.results["loss"][10:-1], dtype=np.float32)
    assert best == res.results["lr"][10 + int(np.argmin(np.gradient(kept_loss, kept_lr.astype(np.float32))))]
    assert best in res.results["lr"][12:14]  # where 1.9 -> 0.5 falls
    fig = res.plot(suggest=True)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "Learning rate" and ax.get_ylabel() == "Loss"
    assert len(ax.lines) == 2 and list(ax.lines[1].get_xdata()) == [best]  # the curve and the red suggestion
    assert list(ax.lines[0].get_ydata()) == res.results["loss"]
    import matplotlib.pyplot as plt

    _, own_ax = plt.subplots()
    assert res.plot(ax=own_ax) is own_ax.figure


def test_learning_rate_finder_callback(tmp_path):
    """At fit start it finds what Tuner.lr_find finds, sets it on the module and on the fit's optimizer, and the fit
    then equals a fit with that lr set by hand."""
    def trainer(callbacks=None):
        return rt.Trainer(max_epochs=2, default_root_dir=str(tmp_path), logger=False,
                          enable_checkpointing=False, deterministic=True, callbacks=callbacks, **QUIET)

    def loader():
        return DataLoader(regression_data(), batch_size=16, shuffle=True)

    rt.seed_everything(5)
    ref = Tuner(trainer()).lr_find(lr_module(rt.LightningModule)(), loader(), num_training=25, max_lr=10.0)
    class Counted(lr_module(rt.LightningModule)):
        def setup(self, stage):
            self.calls = getattr(self, "calls", []) + [f"setup:{stage}"]

        def teardown(self, stage):
            self.calls = getattr(self, "calls", []) + [f"teardown:{stage}"]

    rt.seed_everything(5)
    model = Counted()
    finder = LearningRateFinder(num_training_steps=25, max_lr=10.0)
    seen = []

    class SeeLR(rt.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    t = trainer([finder, SeeLR()])
    t.fit(model, loader())
    assert finder.optimal_lr.results == ref.results
    assert model.lr == ref.suggestion() == seen[0]
    assert t.global_step == 32
    assert model.calls == ["setup:fit", "teardown:fit"]  # the search inside the fit did not run them again
    rt.seed_everything(5)
    plain = lr_module(rt.LightningModule)()
    plain.lr = ref.suggestion()
    trainer().fit(plain, loader())
    assert_bitwise_equal(weights(model), weights(plain))
