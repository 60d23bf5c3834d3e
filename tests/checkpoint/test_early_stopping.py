"""EarlyStopping's criteria on scripted metric sequences, driven by a real fit."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as rt


class Scripted(rt.LightningModule):
    """Trains a tiny layer; validation logs ``score`` = values[current_epoch]."""

    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.values = values
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("score", float(self.values[min(self.current_epoch, len(self.values) - 1)]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _stop(tmp_path, values, **es_kwargs):
    """Fit with EarlyStopping on ``score``; returns (callback, epochs run)."""
    data = DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2)
    es = rt.EarlyStopping(monitor="score", **es_kwargs)
    t = rt.Trainer(default_root_dir=str(tmp_path), max_epochs=len(values), callbacks=[es], logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0)
    t.fit(Scripted(values), data, data)
    return es, t.current_epoch


def test_patience(tmp_path):
    es, epochs = _stop(tmp_path, [5, 4, 4, 4, 4, 4, 4], patience=2)
    assert (es.stopped_epoch, es.wait_count, epochs) == (3, 2, 4)
    assert float(es.best_score) == 4
    assert "did not improve in the last 2" in es.stopping_reason_message


def test_min_delta(tmp_path):
    es, epochs = _stop(tmp_path, [5, 4.8, 4.7, 4.6, 3.0, 2.0, 1.0], patience=3, min_delta=0.5)
    assert (es.stopped_epoch, epochs) == (3, 4)  # no value beats the best (5) by 0.5
    es, epochs = _stop(tmp_path, [5, 4.8, 4.7, 4.6, 3.0, 2.0, 1.0], patience=3, min_delta=0.1)
    assert epochs == 7 and es.wait_count == 0


def test_mode_max(tmp_path):
    es, epochs = _stop(tmp_path, [1, 2, 3, 2, 2, 9], mode="max", patience=2)
    assert (es.stopped_epoch, epochs) == (4, 5)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_check_finite(tmp_path, bad):
    es, epochs = _stop(tmp_path, [5, 4, bad, 3, 2], patience=5)
    assert (es.stopped_epoch, epochs) == (2, 3)
    assert "not finite" in es.stopping_reason_message
    es, epochs = _stop(tmp_path, [5, 4, bad, 3, 2], patience=5, check_finite=False)
    assert epochs == 5


def test_stopping_threshold(tmp_path):
    es, epochs = _stop(tmp_path, [5, 3, 0.9, 0.5, 0.1], stopping_threshold=1.0, patience=10)
    assert (es.stopped_epoch, epochs) == (2, 3)
    assert "Stopping threshold reached" in es.stopping_reason_message


def test_divergence_threshold(tmp_path):
    es, epochs = _stop(tmp_path, [5, 4, 11, 3], divergence_threshold=10.0, patience=10)
    assert (es.stopped_epoch, epochs) == (2, 3)
    assert "Divergence threshold reached" in es.stopping_reason_message


def test_missing_metric_strict_and_not(tmp_path):
    data = DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2)

    def run(strict):
        es = rt.EarlyStopping(monitor="nope", strict=strict)
        t = rt.Trainer(default_root_dir=str(tmp_path), max_epochs=2, callbacks=[es], logger=False,
                       enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        t.fit(Scripted([1.0]), data, data)
        return t

    with pytest.raises(RuntimeError, match="'nope'.*Logged: \\['score'\\]"):
        run(strict=True)
    assert run(strict=False).current_epoch == 2


def test_state_dict_round_trip():
    es = rt.EarlyStopping(monitor="score", patience=4)
    es.wait_count, es.stopped_epoch, es.best_score = 2, 0, torch.tensor(0.25)
    other = rt.EarlyStopping(monitor="score", patience=4)
    other.load_state_dict(es.state_dict())
    assert (other.wait_count, float(other.best_score), other.patience) == (2, 0.25, 4)
    assert es.state_key == "EarlyStopping{'monitor': 'score', 'mode': 'min'}"
    with pytest.raises(ValueError, match="'min' or 'max'"):
        rt.EarlyStopping(monitor="score", mode="up")
