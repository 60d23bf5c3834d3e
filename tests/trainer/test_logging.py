"""self.log bookkeeping, the metrics dicts, CSVLogger files and hyper-parameters, against pytorch_lightning 2.x."""
from __future__ import annotations

import argparse
import csv
import os

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as pl

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::RuntimeWarning")


def data(n: int = 8, batch_size: int = 2, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=batch_size)


def rounded(metrics: dict) -> dict:
    return {k: round(float(v), 5) for k, v in sorted(metrics.items())}


def read_csv(path: str) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = [{k: (str(round(float(v), 5)) if v not in ("",) else "") for k, v in r.items()} for r in reader]
        return list(reader.fieldnames or []), rows


def loggers_for(base, root):
    """These tests compare metrics.csv: both frameworks get a CSVLogger (the default is TensorBoard, see
    tests/loggers/test_tensorboard.py)."""
    return {"logger": base.loggers.CSVLogger(root)}


def run_both(L, make, tmp_path, fit_kwargs=None, train=None, val=None, then=None):
    """Fit ``make(base)`` under both frameworks; return metrics dicts and the CSV written, for each."""
    out = []
    for base in (L, pl):
        root = str(tmp_path / base.__name__)
        torch.manual_seed(0)
        model = make(base)
        kwargs = dict(max_epochs=2, log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, default_root_dir=root)
        kwargs.update(loggers_for(base, root))
        kwargs.update(fit_kwargs or {})
        trainer = base.Trainer(**kwargs)
        trainer.fit(model, train if train is not None else data(), val if val is not None else data(seed=1))
        res = {"callback": rounded(trainer.callback_metrics), "logged": rounded(trainer.logged_metrics),
               "pbar": rounded(trainer.progress_bar_metrics), "step": trainer.global_step}
        if then is not None:
            res.update(then(trainer, model))
        csv_path = os.path.join(root, "lightning_logs", "version_0", "metrics.csv")
        res["csv"] = read_csv(csv_path) if os.path.exists(csv_path) else None
        out.append(res)
    return out


def assert_same(lightning, ours):
    for key in lightning:
        assert ours[key] == lightning[key], f"{key} differs from Lightning"


def full_module(base):
    class Logs(base.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            loss = nn.functional.mse_loss(self.layer(batch[0]), batch[1])
            self.log("loss", loss)                                            # step only (default)
            self.log("both", float(batch_idx), on_step=True, on_epoch=True, prog_bar=True)
            self.log("total", float(batch_idx), on_step=False, on_epoch=True, reduce_fx="sum")
            self.log("peak", float(batch_idx), on_step=False, on_epoch=True, reduce_fx="max", logger=False,
                     prog_bar=True)
            self.log("low", torch.tensor(float(batch_idx)), on_epoch=True, reduce_fx=torch.min)
            self.log("weighted", float(batch_idx + 1), on_step=False, on_epoch=True, batch_size=batch_idx + 1)
            self.log_dict({"d1": 1.0, "d2": torch.tensor(2.0)}, on_step=False, on_epoch=True)
            return loss

        def on_train_batch_end(self, outputs, batch, batch_idx):
            self.log("from_batch_end", float(batch_idx) * 2)

        def on_train_epoch_start(self):
            self.log("from_epoch_start", float(self.current_epoch) + 0.5)

        def on_train_epoch_end(self):
            self.log("from_epoch_end", float(self.current_epoch))

        def validation_step(self, batch, batch_idx):
            self.log("val", float(batch_idx))
            self.log("val_steps", float(batch_idx), on_step=True, prog_bar=True)
            self.log("val_only_step", float(batch_idx), on_step=True, on_epoch=False)

        def on_validation_epoch_end(self):
            self.log("val_epoch_end", 3.0)

        def test_step(self, batch, batch_idx):
            self.log("test", float(batch_idx))
            self.log("test_both", float(batch_idx), on_step=True, on_epoch=True)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Logs()


def test_metrics_dicts_and_csv_match_lightning(L, tmp_path):
    def evaluate(trainer, model):
        val = trainer.validate(model, data(seed=1), verbose=False)
        after_val = rounded(trainer.callback_metrics)
        test = trainer.test(model, data(seed=2), verbose=False)
        return {"validate": [rounded(d) for d in val], "after_validate": after_val,
                "test": [rounded(d) for d in test], "logged_after_test": rounded(trainer.logged_metrics)}

    lightning, ours = run_both(L, full_module, tmp_path, then=evaluate)
    assert_same(lightning, ours)
    header, rows = ours["csv"]
    assert header == sorted(header) and "epoch" in header and "step" in header
    assert rows[0]["step"] == "0.0" and rows[0]["epoch"] == "0.0"


@pytest.mark.parametrize("every", [1, 3, 50])
def test_log_every_n_steps_decides_the_csv_rows(L, tmp_path, every):
    lightning, ours = run_both(L, full_module, tmp_path, fit_kwargs=dict(log_every_n_steps=every, max_epochs=3),
                               train=data(14, 2))
    assert_same(lightning, ours)


def test_log_every_n_steps_with_accumulation(L, tmp_path):
    lightning, ours = run_both(L, full_module, tmp_path,
                               fit_kwargs=dict(log_every_n_steps=2, accumulate_grad_batches=3, max_epochs=2),
                               train=data(14, 2))
    assert_same(lightning, ours)


def test_batch_size_weighting_of_epoch_means(L, tmp_path):
    def make(base):
        class Weighted(base.LightningModule):
            def __init__(self):
                super().__init__()
                self.layer = nn.Linear(4, 1)

            def training_step(self, batch, batch_idx):
                x, y = batch
                self.log("inferred", x.mean(), on_step=False, on_epoch=True)
                self.log("dict_batch", float(batch_idx), on_step=False, on_epoch=True)
                self.log("given", float(batch_idx), on_step=False, on_epoch=True, batch_size=10 - batch_idx)
                return nn.functional.mse_loss(self.layer(x), y)

            def validation_step(self, batch, batch_idx):
                self.log("val_mean", batch[0].sum())

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        return Weighted()

    lightning, ours = run_both(L, make, tmp_path, train=data(7, 3), val=data(5, 2, seed=1))
    assert_same(lightning, ours)
    x = data(7, 7).dataset.tensors[0]
    assert ours["callback"]["inferred"] == pytest.approx(round(float(x.mean()), 5), abs=1e-5)


def test_several_validation_dataloaders_name_their_metrics_like_lightning(L, tmp_path):
    def make(base):
        class Multi(base.LightningModule):
            def __init__(self):
                super().__init__()
                self.layer = nn.Linear(4, 1)

            def training_step(self, batch, batch_idx):
                return nn.functional.mse_loss(self.layer(batch[0]), batch[1])

            def validation_step(self, batch, batch_idx, dataloader_idx=0):
                self.log("v", float(batch_idx + 10 * dataloader_idx))
                self.log("vb", float(batch_idx), on_step=True, on_epoch=True)
                self.log(f"own_{dataloader_idx}", 1.0 + dataloader_idx, add_dataloader_idx=False)

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        return Multi()

    def evaluate(trainer, model):
        out = trainer.validate(model, [data(4, seed=1), data(6, seed=2)], verbose=False)
        return {"validate": [rounded(d) for d in out]}

    lightning, ours = run_both(L, make, tmp_path, val=[data(4, seed=1), data(6, seed=2)], then=evaluate)
    assert_same(lightning, ours)
    assert "vb_epoch/dataloader_idx_1" in ours["callback"] and "own_1" in ours["callback"]


def test_callback_metrics_during_the_run_match_lightning(L):
    """What hooks see in trainer.callback_metrics while the epoch is running and at its end."""
    seen = {}
    for base in (L, pl):
        snaps = []

        def snap(tag, trainer):
            snaps.append((tag, rounded(trainer.callback_metrics)))

        class Watch(base.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                snap("batch_end", trainer)

            def on_train_epoch_end(self, trainer, pl_module):
                snap("train_epoch_end", trainer)

            def on_validation_epoch_end(self, trainer, pl_module):
                snap("val_epoch_end", trainer)

            def on_validation_end(self, trainer, pl_module):
                snap("val_end", trainer)

        class M(base.LightningModule):
            def __init__(self):
                super().__init__()
                self.layer = nn.Linear(4, 1)

            def training_step(self, batch, batch_idx):
                self.log("tl", float(batch_idx + 10 * self.current_epoch), on_epoch=True)
                return self.layer(batch[0]).pow(2).mean()

            def on_train_epoch_end(self):
                snap("module_train_epoch_end", self.trainer)
                self.log("logged_at_epoch_end", 5.0 + self.current_epoch)

            def validation_step(self, batch, batch_idx):
                self.log("vl", float(batch_idx + 10 * self.current_epoch))

            def on_validation_epoch_end(self):
                snap("module_val_epoch_end", self.trainer)

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        trainer = base.Trainer(max_epochs=2, callbacks=[Watch()], enable_progress_bar=False, logger=False,
                               enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0)
        trainer.fit(M(), data(6), data(4))
        seen[base.__name__] = snaps
    assert seen["raytrainer"] == seen["pytorch_lightning"]


def test_logging_with_logger_false_still_fills_the_dicts(L, tmp_path):
    lightning, ours = run_both(L, full_module, tmp_path, fit_kwargs=dict(logger=False))
    assert ours["csv"] is None
    assert_same(lightning, ours)


# --------------------------------------------------------------------------- bad self.log calls
def log_module(where, value=1.0, **log_kwargs):
    class Bad(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            if where == "training_step":
                self.log("bad", value, **log_kwargs)
            return self.layer(batch[0]).sum()

        def predict_step(self, batch, batch_idx):
            if where == "predict_step":
                self.log("bad", value)
            return self.layer(batch[0])

        def configure_optimizers(self):
            if where == "configure_optimizers":
                self.log("bad", value)
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Bad()


QUIET = dict(max_epochs=1, enable_progress_bar=False, enable_model_summary=False, logger=False,
             enable_checkpointing=False)


def test_log_of_a_non_scalar_tensor_says_how_to_fix():
    with pytest.raises(ValueError, match=r"self\.log\('bad', value\) needs a scalar.*shape \(3,\).*value\.mean\(\)"):
        pl.Trainer(**QUIET).fit(log_module("training_step", torch.ones(3)), data(4))


def test_log_of_a_string_is_a_type_error():
    with pytest.raises(TypeError,
                       match=r"must be a number, a scalar tensor or a torchmetrics Metric, got str.*self\.log_dict"):
        pl.Trainer(**QUIET).fit(log_module("training_step", "high"), data(4))


def test_log_with_an_unknown_reduce_fx():
    with pytest.raises(ValueError, match=r"reduce_fx='median'\): use 'mean', 'sum', 'max' or 'min'"):
        pl.Trainer(**QUIET).fit(log_module("training_step", 1.0, reduce_fx="median", on_epoch=True), data(4))


@pytest.mark.parametrize("where", ["predict_step", "configure_optimizers"])
def test_log_where_lightning_forbids_it(where):
    trainer = pl.Trainer(**QUIET)
    with pytest.raises(RuntimeError, match=r"self\.log\('bad'\) was called outside the training, validation and "
                                           r"test loops.*where logging is not supported"):
        if where == "predict_step":
            trainer.predict(log_module(where), data(4))
        else:
            trainer.fit(log_module(where), data(4))


def test_log_without_a_trainer_warns_once_and_drops_the_value():
    model = log_module("none")
    with pytest.warns(UserWarning, match=r"no Trainer running this module"):
        model.log("x", 1.0)
    model.log("x", 2.0)  # no second warning, no error


# --------------------------------------------------------------------------- CSVLogger
def test_csv_logger_writes_versioned_metrics_and_hparams(tmp_path):
    class HP(pl.LightningModule):
        def __init__(self, hidden: int = 8, lr: float = 0.1, name: str = "mlp", dims: tuple = (1, 2)):
            super().__init__()
            self.save_hyperparameters()
            self.layer = nn.Linear(4, self.hparams.hidden)

        def training_step(self, batch, batch_idx):
            loss = self.layer(batch[0]).pow(2).mean()
            self.log("train_loss", loss, on_epoch=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    for version in range(2):
        trainer = pl.Trainer(max_epochs=2, default_root_dir=str(tmp_path), enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=2,
                             logger=pl.CSVLogger(str(tmp_path)))
        trainer.fit(HP(hidden=3, lr=0.05), data(8))
        log_dir = tmp_path / "lightning_logs" / f"version_{version}"
        assert trainer.log_dir == str(log_dir)
        assert trainer.logger.version == version
    header, rows = read_csv(str(log_dir / "metrics.csv"))
    assert header == ["epoch", "step", "train_loss_epoch", "train_loss_step"]
    assert [(r["epoch"], r["step"]) for r in rows if r["train_loss_step"]] == [("0.0", "1.0"), ("0.0", "3.0"),
                                                                              ("1.0", "5.0"), ("1.0", "7.0")]
    assert [(r["epoch"], r["step"]) for r in rows if r["train_loss_epoch"]] == [("0.0", "3.0"), ("1.0", "7.0")]
    hparams = yaml.safe_load((log_dir / "hparams.yaml").read_text())
    assert hparams == {"hidden": 3, "lr": 0.05, "name": "mlp", "dims": [1, 2]}


def test_no_hparams_yaml_without_save_hyperparameters(L, tmp_path):
    for base in (L, pl):
        root = str(tmp_path / base.__name__)
        torch.manual_seed(0)
        base.Trainer(max_epochs=1, default_root_dir=root, enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=False, **loggers_for(base, root)).fit(full_module(base), data(4), data(4))
    for base in (L, pl):
        files = sorted(os.listdir(tmp_path / base.__name__ / "lightning_logs" / "version_0"))
        assert "hparams.yaml" not in files and "metrics.csv" in files


def test_csv_logger_arguments_and_several_loggers(tmp_path):
    first = pl.CSVLogger(str(tmp_path / "a"), name="exp", version="run7")
    second = pl.CSVLogger(str(tmp_path / "b"), name="")
    trainer = pl.Trainer(max_epochs=1, logger=[first, second], enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, log_every_n_steps=1)
    trainer.fit(full_module(pl), data(4), data(4))
    assert trainer.logger is first and trainer.loggers == [first, second]
    assert trainer.log_dir == str(tmp_path / "a" / "exp" / "run7")
    for path in (tmp_path / "a" / "exp" / "run7" / "metrics.csv", tmp_path / "b" / "version_0" / "metrics.csv"):
        header, rows = read_csv(str(path))
        assert "loss" in header and len(rows) > 2


def test_custom_logger_receives_metrics_and_hparams():
    class Recorder(pl.Logger):
        def __init__(self):
            self.metrics, self.params, self.status = [], None, None

        def log_metrics(self, metrics, step):
            self.metrics.append((step, dict(metrics)))

        def log_hyperparams(self, params):
            self.params = dict(params)

        def finalize(self, status):
            self.status = status

    class HP(pl.LightningModule):
        def __init__(self, width: int = 2):
            super().__init__()
            self.save_hyperparameters()
            self.layer = nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            loss = self.layer(batch[0]).pow(2).mean()
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    rec = Recorder()
    pl.Trainer(max_epochs=1, logger=rec, log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
               enable_checkpointing=False).fit(HP(width=5), data(6))
    assert rec.params == {"width": 5} and rec.status == "success"
    assert [step for step, _ in rec.metrics] == [0, 1, 2]
    assert all(set(m) == {"loss", "epoch"} for _, m in rec.metrics)


# --------------------------------------------------------------------------- save_hyperparameters
def test_save_hyperparameters_forms_match_lightning(L):
    def make(base):
        class Plain(base.LightningModule):
            def __init__(self, a: int, b: float = 0.5, *, c: str = "x", **extra):
                super().__init__()
                self.save_hyperparameters()

        class Ignored(base.LightningModule):
            def __init__(self, a: int, net: object = None, b: int = 2):
                super().__init__()
                self.save_hyperparameters(ignore=["net"])

        class Named(base.LightningModule):
            def __init__(self, a: int, b: int = 2, c: int = 3):
                super().__init__()
                self.save_hyperparameters("a", "c")

        class FromDict(base.LightningModule):
            def __init__(self, config: dict):
                super().__init__()
                self.save_hyperparameters(config)

        class FromNamespace(base.LightningModule):
            def __init__(self, args):
                super().__init__()
                self.save_hyperparameters(args)

        class Child(Named):
            def __init__(self, a: int, d: int = 4):
                super().__init__(a, c=9)
                self.save_hyperparameters()

        return [Plain(1, c="y", extra_arg=7), Ignored(3, net=nn.Linear(1, 1)), Named(1, 5, 6),
                FromDict({"lr": 0.1, "layers": [1, 2]}), FromNamespace(argparse.Namespace(lr=0.2, depth=3)),
                Child(2)]

    theirs = [dict(m.hparams) for m in make(L)]
    ours = [dict(m.hparams) for m in make(pl)]
    assert ours == theirs
    m = make(pl)[0]
    assert m.hparams.a == 1 and m.hparams.c == "y"
    m.hparams.a = 10
    assert m.hparams_initial.a == 1
    with pytest.raises(AttributeError, match=r"hparams has no 'zz'"):
        _ = m.hparams.zz


def test_save_hyperparameters_refuses_objects_a_checkpoint_cannot_hold():
    class Bad(pl.LightningModule):
        def __init__(self, net: nn.Module):
            super().__init__()
            self.save_hyperparameters()

    with pytest.raises(TypeError, match=r"argument 'net' is a Linear.*Pass ignore=\['net'\]"):
        Bad(nn.Linear(2, 2))


def test_save_hyperparameters_unknown_name():
    class Bad(pl.LightningModule):
        def __init__(self, a: int = 1):
            super().__init__()
            self.save_hyperparameters("b")

    with pytest.raises(ValueError, match=r"\['b'\] are not arguments of Bad\.__init__"):
        Bad()


def test_datamodule_hparams_are_logged_with_the_module(tmp_path):
    class DM(pl.LightningDataModule):
        def __init__(self, batch_size: int = 2):
            super().__init__()
            self.save_hyperparameters()

        def train_dataloader(self):
            return data(4, self.hparams.batch_size)

    class HP(pl.LightningModule):
        def __init__(self, lr: float = 0.1):
            super().__init__()
            self.save_hyperparameters()
            self.layer = nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    trainer = pl.Trainer(max_epochs=1, default_root_dir=str(tmp_path), enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(HP(), datamodule=DM(batch_size=4))
    hparams = yaml.safe_load((tmp_path / "lightning_logs" / "version_0" / "hparams.yaml").read_text())
    assert hparams == {"lr": 0.1, "batch_size": 4}
