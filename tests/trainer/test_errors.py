"""Bad input gets a clear error that says what was wrong, where (epoch and batch) and how to fix it."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import raytrainer as pl
from raytrainer.core.step import StepError

QUIET = dict(enable_progress_bar=False, enable_model_summary=False, logger=False, enable_checkpointing=False)


def data(n: int = 8, batch_size: int = 2) -> DataLoader:
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=batch_size)


def module(step):
    """A module whose training_step is ``step(self, batch, batch_idx)``."""

    class M(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            return step(self, batch, batch_idx)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return M()


def loss_of(self, batch):
    return nn.functional.mse_loss(self.layer(batch[0]), batch[1])


def fit(model, **kwargs):
    trainer = pl.Trainer(**{**QUIET, "max_epochs": 2, **kwargs})
    trainer.fit(model, data())
    return trainer


# --------------------------------------------------------------------------- what training_step returns
def test_non_scalar_loss_names_epoch_batch_and_fix():
    def step(self, batch, batch_idx):
        if self.current_epoch == 1 and batch_idx == 2:
            return (self.layer(batch[0]) - batch[1]) ** 2  # forgot .mean()
        return loss_of(self, batch)

    with pytest.raises(StepError, match=r"training_step must return a scalar loss, got \(2, 1\) at epoch 1, batch 2\. "
                                        r"Reduce it first, e\.g\. loss\.mean\(\)"):
        fit(module(step))


def test_dict_without_loss_names_its_keys_epoch_and_batch():
    with pytest.raises(StepError, match=r"returned a dict without a 'loss' key \(keys: \['acc', 'out'\]\) at epoch 0, "
                                        r"batch 0\. Return \{'loss': loss, \.\.\.\}"):
        fit(module(lambda self, b, i: {"out": loss_of(self, b), "acc": 1.0}))


def test_other_return_types_are_refused():
    with pytest.raises(StepError,
                       match=r"training_step returned str at epoch 0, batch 0\. Return a scalar loss tensor"):
        fit(module(lambda self, b, i: "loss"))


def test_loss_without_grad_is_explained():
    with pytest.raises(StepError, match=r"at epoch 0, batch 0 does not require grad.*torch\.no_grad\(\)"):
        fit(module(lambda self, b, i: loss_of(self, b).detach()))


def test_step_error_is_a_runtime_error():
    assert issubclass(StepError, RuntimeError)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_loss_with_detect_anomaly(bad):
    def step(self, batch, batch_idx):
        loss = loss_of(self, batch)
        return loss * bad if (self.current_epoch, batch_idx) == (1, 3) else loss

    model = module(step)
    with pytest.raises(StepError, match=rf"the loss is {bad} at epoch 1, batch 3 \(detect_anomaly=True\)\. "
                                        r"Lower the learning rate"):
        fit(model, detect_anomaly=True)
    before = [p.detach().clone() for p in model.parameters()]
    assert all(torch.isfinite(p).all() for p in before)  # the bad step was refused before any update


def test_non_finite_loss_without_detect_anomaly_keeps_going():
    trainer = fit(module(lambda self, b, i: loss_of(self, b) * math.nan if i == 0 else loss_of(self, b)))
    assert trainer.global_step == 8


# --------------------------------------------------------------------------- missing or wrong inputs
def test_fit_without_any_dataloader():
    with pytest.raises(ValueError,
                       match=r"Trainer\.fit got no training data: pass train_dataloaders=DataLoader\(\.\.\.\), "
                             r"datamodule=\.\.\., or define train_dataloader\(\) on the module"):
        pl.Trainer(**QUIET).fit(module(lambda self, b, i: loss_of(self, b)))


@pytest.mark.parametrize("fn, hook", [("validate", "val_dataloader"), ("test", "test_dataloader"),
                                      ("predict", "predict_dataloader")])
def test_evaluation_without_data(fn, hook):
    with pytest.raises(ValueError, match=rf"Trainer\.{fn} got no data: pass dataloaders=\.\.\., datamodule=\.\.\., "
                                         rf"or define {hook}\(\) on the module"):
        getattr(pl.Trainer(**QUIET), fn)(module(lambda self, b, i: None))


def test_train_dataloader_hook_returning_none():
    class NoData(pl.LightningModule):
        def train_dataloader(self):
            return None

        def training_step(self, batch, batch_idx):
            return None

        def configure_optimizers(self):
            return None

    with pytest.raises(ValueError, match=r"train_dataloader\(\) returned None"):
        pl.Trainer(**QUIET).fit(NoData())


def test_evaluation_without_a_model():
    with pytest.raises(ValueError, match=r"Trainer\.validate needs a model"):
        pl.Trainer(**QUIET).validate(dataloaders=data())


def test_a_plain_nn_module_is_refused():
    with pytest.raises(TypeError, match=r"expects a raytrainer\.LightningModule, got Linear"):
        pl.Trainer(**QUIET).fit(nn.Linear(4, 1), data())


def test_a_lightning_module_from_pytorch_lightning_is_refused():
    lightning = pytest.importorskip("pytorch_lightning")

    class Theirs(lightning.LightningModule):
        pass

    with pytest.raises(TypeError, match=r"Subclass raytrainer\.LightningModule"):
        pl.Trainer(**QUIET).fit(Theirs(), data())


def test_dataloaders_and_datamodule_together():
    with pytest.raises(ValueError, match=r"pass either dataloaders or a datamodule, not both"):
        pl.Trainer(**QUIET).fit(module(lambda self, b, i: None), data(), datamodule=pl.LightningDataModule())


def test_wrong_datamodule_type():
    with pytest.raises(TypeError, match=r"datamodule must be a raytrainer\.LightningDataModule, got dict"):
        pl.Trainer(**QUIET).fit(module(lambda self, b, i: None), datamodule={})


def test_sequential_combined_training_loaders_are_refused():
    with pytest.raises(ValueError, match=r"Training does not support the `CombinedLoader\(mode=\"sequential\"\)`"):
        pl.Trainer(**QUIET).fit(module(lambda self, b, i: loss_of(self, b)),
                                pl.utilities.CombinedLoader([data(), data()], "sequential"))


def test_not_an_iterable():
    with pytest.raises(TypeError, match=r"expected a DataLoader \(or any iterable of batches\), got int"):
        pl.Trainer(**QUIET).fit(module(lambda self, b, i: loss_of(self, b)), 5)


def test_training_step_not_defined():
    class Empty(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 1)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(NotImplementedError, match=r"needs `training_step\(self, batch, batch_idx\)` to be defined on "
                                                  r"Empty"):
        pl.Trainer(**QUIET, max_epochs=1).fit(Empty(), data())


def test_fractional_limit_on_a_loader_without_length():
    class Stream(IterableDataset):
        def __iter__(self):
            for _ in range(4):
                x = torch.randn(2, 4)
                yield x, x.sum(1, keepdim=True)

    with pytest.raises(ValueError, match=r"limit_train_batches=0\.5 is a fraction but the train dataloader has no "
                                         r"length; give an int number of batches"):
        pl.Trainer(**QUIET, max_epochs=1, limit_train_batches=0.5).fit(
            module(lambda self, b, i: loss_of(self, b)), DataLoader(Stream(), batch_size=None))
    trainer = pl.Trainer(**QUIET, max_epochs=2, limit_train_batches=3)
    trainer.fit(module(lambda self, b, i: loss_of(self, b)), DataLoader(Stream(), batch_size=None))
    assert trainer.global_step == 6


# --------------------------------------------------------------------------- bad Trainer values
@pytest.mark.parametrize("kwargs, message", [
    (dict(limit_train_batches=1.5), r"limit_train_batches=1\.5: use a float in \[0\.0, 1\.0\]"),
    (dict(limit_val_batches=-1), r"limit_val_batches=-1"),
    (dict(limit_test_batches="all"), r"limit_test_batches='all'"),
    (dict(val_check_interval=2.5), r"val_check_interval=2\.5: use a float in \(0, 1\]"),
    (dict(val_check_interval=0), r"val_check_interval=0"),
    (dict(val_check_interval=0.5, check_val_every_n_epoch=None), r"check_val_every_n_epoch=None counts batches"),
    (dict(check_val_every_n_epoch=0), r"check_val_every_n_epoch=0 must be an int >= 1, or None"),
    (dict(log_every_n_steps=0), r"log_every_n_steps=0 must be >= 1"),
    (dict(fast_dev_run=-1), r"fast_dev_run=-1 must be a bool or a non-negative int"),
    (dict(max_steps=-2), r"max_steps=-2 must be -1 \(no limit\) or a non-negative int"),
    (dict(max_failures=-1), r"max_failures=-1 must be >= 0"),
    (dict(spare_ranks_per_node=-1), r"spare_ranks_per_node=-1: use an int >= 0"),
    (dict(spare_ranks_per_node=True), r"spare_ranks_per_node=True: use an int >= 0"),
])
def test_bad_trainer_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pl.Trainer(**kwargs)


def test_checkpoint_callback_with_checkpointing_disabled():
    # Lightning's MisconfigurationException (a ValueError too), with Lightning's message
    with pytest.raises(ValueError, match=r"`enable_checkpointing=False` but found `ModelCheckpoint` in callbacks"):
        pl.Trainer(enable_checkpointing=False, callbacks=[pl.ModelCheckpoint()])


def test_trainer_only_attributes_before_fit():
    model = module(lambda self, b, i: None)
    with pytest.raises(RuntimeError, match=r"M\.trainer is only available while a Trainer runs this module"):
        _ = model.trainer
    assert (model.current_epoch, model.global_step) == (0, 0)
    with pytest.raises(RuntimeError, match=r"save_checkpoint needs a model"):
        pl.Trainer(**QUIET).save_checkpoint("x.ckpt")


@pytest.mark.parametrize("kwargs", [{}, {"num_processes": 2}])
def test_sync_batchnorm_off_cuda_is_refused_before_any_work(kwargs):
    with pytest.raises(ValueError, match=r"sync_batchnorm=True needs CUDA devices, but this run is on cpu.*Remove "
                                         r"sync_batchnorm"):
        pl.Trainer(sync_batchnorm=True, **kwargs)
