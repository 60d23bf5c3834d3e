"""self.log with torchmetrics Metric objects: the same step and epoch values, files and resets as
pytorch_lightning 2.x, and the global value over every rank's data on Ray."""
from __future__ import annotations

import csv

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as pl

torchmetrics = pytest.importorskip("torchmetrics")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")


def data(n: int = 40, batch_size: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, :3].argmax(1) + (x[:, 3] > 1).long()) % 3
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def classifier(base, log_kwargs: dict | None = None, collection: bool = False):
    """A 3-class classifier on ``base`` that logs torchmetrics objects, as public Lightning projects do."""
    log_kwargs = log_kwargs if log_kwargs is not None else {"on_step": True, "on_epoch": True}

    class Clf(base.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(6, 3)
            self.train_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=3)
            self.val_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=3)
            self.val_metrics = torchmetrics.MetricCollection(
                {"f1": torchmetrics.classification.MulticlassF1Score(num_classes=3),
                 "prec": torchmetrics.classification.MulticlassPrecision(num_classes=3)}, prefix="val_")

        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self.net(x)
            self.train_acc(logits, y)
            self.log("train_acc", self.train_acc, **log_kwargs)
            return nn.functional.cross_entropy(logits, y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            logits = self.net(x)
            self.val_acc(logits, y)
            self.log("val_acc", self.val_acc)
            if collection:
                self.val_metrics(logits, y)
                self.log_dict(self.val_metrics)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    return Clf()


def fit_both(L, tmp_path, **kw):
    out = []
    for base in (L, pl):
        root = str(tmp_path / base.__name__)
        torch.manual_seed(0)
        model = classifier(base, **kw)
        logger = base.loggers.CSVLogger(root)
        trainer = base.Trainer(max_epochs=2, log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                               enable_checkpointing=False, num_sanity_val_steps=0, default_root_dir=root, logger=logger)
        trainer.fit(model, data(), data(24, seed=1))
        with open(f"{trainer.log_dir}/metrics.csv", newline="") as f:
            rows = [{k: round(float(v), 5) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
        metrics = {k: round(float(v), 5) for k, v in trainer.callback_metrics.items()}
        out.append((model, metrics, rows))
    return out


def test_metric_step_and_epoch_values_match_lightning(L, tmp_path):
    (lm, l_metrics, l_rows), (rm, r_metrics, r_rows) = fit_both(L, tmp_path)
    assert r_metrics == l_metrics
    assert {"train_acc_step", "train_acc_epoch", "val_acc"} <= set(r_metrics)
    assert r_rows == l_rows
    # the epoch value is the accuracy over the whole epoch, not a mean of batch accuracies
    for model in (lm, rm):  # reset at the end of the epoch, as in Lightning
        assert int(model.train_acc.update_count) == 0 and int(model.val_acc.update_count) == 0


def test_metric_collection_through_log_dict_matches_lightning(L, tmp_path):
    (_, l_metrics, l_rows), (_, r_metrics, r_rows) = fit_both(L, tmp_path, collection=True)
    assert {"val_f1", "val_prec"} <= set(r_metrics)
    assert r_metrics == l_metrics and r_rows == l_rows


def test_epoch_only_metric_is_the_whole_epochs_value(tmp_path):
    torch.manual_seed(0)
    model = classifier(pl, log_kwargs={"on_step": False, "on_epoch": True})
    seen = []

    class Capture(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen.append(float(trainer.callback_metrics["train_acc"]))

    trainer = pl.Trainer(max_epochs=1, enable_progress_bar=False, enable_model_summary=False, logger=False,
                         enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
                         callbacks=[Capture()], default_root_dir=str(tmp_path))
    loader = data()
    trainer.fit(model, loader)
    assert "train_acc_step" not in trainer.callback_metrics and len(seen) == 1
    assert int(model.train_acc.update_count) == 0

    # the same epoch value, from the predictions of an identical plain PyTorch run over the whole epoch
    torch.manual_seed(0)
    again = classifier(pl, log_kwargs={"on_step": False, "on_epoch": True})
    preds, targets = [], []
    opt = torch.optim.SGD(again.parameters(), lr=0.5)
    for x, y in loader:
        logits = again.net(x)
        preds.append(logits.detach())
        targets.append(y)
        loss = nn.functional.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    expected = torchmetrics.functional.classification.multiclass_accuracy(torch.cat(preds), torch.cat(targets),
                                                                          num_classes=3)
    assert seen[0] == pytest.approx(float(expected), abs=1e-6)


def test_a_metric_that_is_not_a_scalar_is_refused_clearly(tmp_path):
    class PerClass(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(6, 3)
            self.acc = torchmetrics.classification.MulticlassAccuracy(num_classes=3, average=None)

        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self.net(x)
            self.acc(logits, y)
            self.log("acc", self.acc, on_step=False, on_epoch=True)
            return nn.functional.cross_entropy(logits, y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(max_epochs=1, enable_progress_bar=False, enable_model_summary=False, logger=False,
                         enable_checkpointing=False, default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"self.log\('acc', metric\): the metric computes a value of shape \(3,\)"):
        trainer.fit(PerClass(), data())


def test_other_objects_are_still_refused_with_the_types_that_work(tmp_path):
    class Bad(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(6, 3)

        def training_step(self, batch, batch_idx):
            self.log("bad", {"a": 1})
            return self.net(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(max_epochs=1, enable_progress_bar=False, enable_model_summary=False, logger=False,
                         enable_checkpointing=False, default_root_dir=str(tmp_path))
    with pytest.raises(TypeError, match="a number, a scalar tensor or a torchmetrics Metric, got dict"):
        trainer.fit(Bad(), data())
