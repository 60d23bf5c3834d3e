"""LightningDataModule's API: from_datasets, load_from_checkpoint, hparams_initial, state in checkpoints,
on_exception and the rest of Lightning 2.6's public names, checked against pytorch_lightning (the ``L`` fixture)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, SequentialSampler, TensorDataset

import raytrainer as pl

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")

QUIET = dict(enable_progress_bar=False, enable_model_summary=False, logger=False, enable_checkpointing=False,
             accelerator="cpu")


def dataset(n: int = 8) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x.sum(1, keepdim=True))


class Stream(IterableDataset):
    def __iter__(self):
        return iter(torch.arange(4.0))


def regression(base):
    class Reg(base.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.layer(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", nn.functional.mse_loss(self.layer(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Reg


def stateful_datamodule(base):
    class Stateful(base.LightningDataModule):
        def __init__(self, batch_size: int = 4, root: str = "data"):
            super().__init__()
            self.save_hyperparameters()
            self.epochs_served = 0

        def train_dataloader(self):
            self.epochs_served += 1
            return DataLoader(dataset(), batch_size=self.hparams.batch_size)

        def state_dict(self):
            return {"epochs_served": self.epochs_served}

        def load_state_dict(self, state_dict):
            self.epochs_served = state_dict["epochs_served"]

    return Stateful


def test_every_public_lightning_datamodule_name_exists(L):
    theirs = {n for n in dir(L.LightningDataModule) if not n.startswith("_")}
    ours = {n for n in dir(pl.LightningDataModule) if not n.startswith("_")}
    assert theirs <= ours, sorted(theirs - ours)
    for name in ("CHECKPOINT_HYPER_PARAMS_KEY", "CHECKPOINT_HYPER_PARAMS_NAME", "CHECKPOINT_HYPER_PARAMS_TYPE",
                 "name"):
        assert getattr(pl.LightningDataModule, name) == getattr(L.LightningDataModule, name)
    assert pl.LightningDataModule().prepare_data_per_node is L.LightningDataModule().prepare_data_per_node is True


def describe(loaders):
    """Structure, batch size, sampler kind and dataset of from_datasets' loaders (comparable across libraries)."""
    if isinstance(loaders, DataLoader):
        sampler = type(loaders.sampler).__name__ if isinstance(loaders.sampler, (RandomSampler,
                                                                                 SequentialSampler)) else "iterable"
        return (loaders.batch_size, loaders.num_workers, sampler, id(loaders.dataset))
    if isinstance(loaders, dict):
        return {k: describe(v) for k, v in loaders.items()}
    return [describe(v) for v in loaders]


def test_from_datasets_builds_the_loaders_lightning_builds(L):
    train, val, test, stream = dataset(), dataset(4), dataset(2), Stream()
    seen = {}
    for base in (pl, L):
        dm = base.LightningDataModule.from_datasets(train_dataset=train, val_dataset=[val, stream],
                                                    test_dataset={"a": test}, batch_size=2)
        seen[base.__name__] = [describe(dm.train_dataloader()), describe(dm.val_dataloader()),
                               describe(dm.test_dataloader())]
        with pytest.raises(Exception, match="`predict_dataloader` must be implemented"):
            dm.predict_dataloader()
    assert seen["raytrainer"] == seen["pytorch_lightning"]
    assert seen["raytrainer"][0] == (2, 0, "RandomSampler", id(train))
    assert seen["raytrainer"][1][1][2] == "iterable"


def test_from_datasets_passes_batch_size_and_kwargs_to_init(L):
    for base in (pl, L):
        class WithInit(base.LightningDataModule):
            def __init__(self, batch_size: int, tag: str):
                super().__init__()
                self.batch_size, self.tag = batch_size, tag

        dm = WithInit.from_datasets(train_dataset=dataset(), batch_size=3, num_workers=0, tag="x")
        assert (dm.batch_size, dm.tag, dm.train_dataloader().batch_size) == (3, "x", 3)


def test_from_datasets_refuses_what_is_not_a_dataset():
    with pytest.raises(TypeError, match=r"from_datasets\(train_dataset=\.\.\.\) expects a torch Dataset"):
        pl.LightningDataModule.from_datasets(train_dataset=torch.ones(3))


def test_a_from_datasets_datamodule_trains_and_validates(L):
    losses = {}
    for base in (pl, L):
        torch.manual_seed(0)
        model = regression(base)()
        dm = base.LightningDataModule.from_datasets(train_dataset=dataset(), val_dataset=dataset(4), batch_size=4)
        trainer = base.Trainer(**QUIET, max_epochs=1, num_sanity_val_steps=0)
        trainer.fit(model, datamodule=dm)
        losses[base.__name__] = float(trainer.callback_metrics["val_loss"])
    assert losses["raytrainer"] == pytest.approx(losses["pytorch_lightning"], rel=1e-5)


def test_hparams_initial_and_remove_ignored_hparams(L):
    for base in (pl, L):
        dm = stateful_datamodule(base)(batch_size=2)
        assert dict(dm.hparams_initial) == {"batch_size": 2, "root": "data"}
        dm.hparams.batch_size = 5
        dm.remove_ignored_hparams(["root"])
        assert dict(dm.hparams) == {"batch_size": 5} and dm.hparams_initial["batch_size"] == 2


def fit_checkpoint(base, tmp_path, name):
    dm = stateful_datamodule(base)(batch_size=2, root="elsewhere")
    trainer = base.Trainer(**QUIET, max_epochs=1)
    trainer.fit(regression(base)(), datamodule=dm)
    path = str(tmp_path / f"{name}.ckpt")
    trainer.save_checkpoint(path)
    return path


def test_checkpoints_hold_the_datamodule_like_lightnings(tmp_path, L):
    ours = torch.load(fit_checkpoint(pl, tmp_path, "ours"), weights_only=True)
    theirs = torch.load(fit_checkpoint(L, tmp_path, "theirs"), weights_only=True)
    for key in ("datamodule_hyper_parameters", "datamodule_hparams_name"):
        assert ours[key] == theirs[key], key
    state_keys = [k for k in theirs if k.endswith("Stateful")]
    assert state_keys and all(ours[k] == theirs[k] for k in state_keys)


@pytest.mark.parametrize("writer", ["raytrainer", "pytorch_lightning"])
def test_load_from_checkpoint_rebuilds_the_datamodule(tmp_path, L, writer):
    path = fit_checkpoint(pl if writer == "raytrainer" else L, tmp_path, writer)
    for base in (pl, L):
        cls = stateful_datamodule(base)
        dm = cls.load_from_checkpoint(path)
        assert (dict(dm.hparams), dm.epochs_served) == ({"batch_size": 2, "root": "elsewhere"}, 1)
        assert cls.load_from_checkpoint(path, batch_size=8).hparams.batch_size == 8
        with pytest.raises(TypeError, match="cannot be called on an instance"):
            dm.load_from_checkpoint(path)


def test_datamodule_state_is_restored_by_validate_as_well(tmp_path, L):
    for base in (pl, L):
        path = fit_checkpoint(base, tmp_path, base.__name__)
        dm = stateful_datamodule(base)()
        dm.val_dataloader = lambda: DataLoader(dataset(4), batch_size=4)
        base.Trainer(**QUIET).validate(regression(base)(), datamodule=dm, ckpt_path=path, verbose=False)
        assert dm.epochs_served == 1, base.__name__


def test_on_exception_reaches_the_datamodule(L):
    seen = {}
    for base in (pl, L):
        class Failing(regression(base)):
            def training_step(self, batch, batch_idx):
                raise KeyError("boom")

        class Watching(stateful_datamodule(base)):
            def on_exception(self, exception):
                seen[base.__name__] = repr(exception)

        with pytest.raises(KeyError):
            base.Trainer(**QUIET, max_epochs=1).fit(Failing(), datamodule=Watching())
    assert seen == {"raytrainer": "KeyError('boom')", "pytorch_lightning": "KeyError('boom')"}


def test_prepare_data_per_node_false_still_prepares_on_rank_zero(L):
    calls = []
    for base in (pl, L):
        class Prep(stateful_datamodule(base)):
            def __init__(self):
                super().__init__()
                self.prepare_data_per_node = False

            def prepare_data(self):
                calls.append(base.__name__)

        base.Trainer(**QUIET, max_epochs=1).fit(regression(base)(), datamodule=Prep())
    assert calls == ["raytrainer", "pytorch_lightning"]
