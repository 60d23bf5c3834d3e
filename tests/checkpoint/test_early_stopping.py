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


def _scripted(base, values):
    class S(base.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            self.log("score", float(values[min(self.current_epoch, len(values) - 1)]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    return S()


def _stop_both(L, tmp_path, values, **es_kwargs):
    """The same scripted fit under pytorch_lightning and raytrainer; (callback, trainer) for each."""
    out = []
    for base in (L, rt):
        data = DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2)
        es = base.callbacks.EarlyStopping(monitor="score", **es_kwargs)
        t = base.Trainer(default_root_dir=str(tmp_path / base.__name__), max_epochs=len(values), callbacks=[es],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
        t.fit(_scripted(base, values), data, data)
        out.append((es, t))
    return out


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("values,kwargs,reason", [
    ([5, 4, 4, 4, 4, 4, 4], dict(patience=2), "PATIENCE_EXHAUSTED"),
    ([5, 3, 0.9, 0.5, 0.1], dict(stopping_threshold=1.0, patience=10), "STOPPING_THRESHOLD"),
    ([5, 4, 11, 3], dict(divergence_threshold=10.0, patience=10), "DIVERGENCE_THRESHOLD"),
    ([1, 2, 0.2, 3], dict(divergence_threshold=0.5, mode="max", patience=10), "DIVERGENCE_THRESHOLD"),
    ([5, 4, math.nan, 3, 2], dict(patience=5), "NON_FINITE_METRIC"),
    ([5, 4, 3, 2], dict(patience=2), "NOT_STOPPED"),
])
def test_stopping_reason_matches_lightning(L, tmp_path, values, kwargs, reason):
    from pytorch_lightning.callbacks.early_stopping import EarlyStoppingReason as LReason

    from raytrainer.callbacks.early_stopping import EarlyStoppingReason

    (l_es, l_t), (r_es, r_t) = _stop_both(L, tmp_path, values, **kwargs)
    assert r_es.stopping_reason is EarlyStoppingReason[reason]
    assert l_es.stopping_reason is LReason[reason]
    assert r_es.stopping_reason.value == l_es.stopping_reason.value
    assert (r_es.stopped_epoch, r_t.current_epoch, r_es.wait_count) == (l_es.stopped_epoch, l_t.current_epoch,
                                                                         l_es.wait_count)
    if reason == "NOT_STOPPED":
        assert r_es.stopping_reason_message is None and l_es.stopping_reason_message is None
    elif reason == "DIVERGENCE_THRESHOLD":  # ours shows the comparison that fired; Lightning the mode's sign
        assert r_es.stopping_reason_message.split(" = ")[0] == l_es.stopping_reason_message.split(" = ")[0]
        assert r_es.stopping_reason_message.endswith(f"{kwargs['divergence_threshold']}. Signaling Trainer to stop.")
    else:
        assert r_es.stopping_reason_message == l_es.stopping_reason_message
    # the state carries the reason, with Lightning's keys, in both directions
    r_state, l_state = r_es.state_dict(), l_es.state_dict()
    assert set(r_state) == set(l_state)
    assert r_state["stopping_reason"] == l_state["stopping_reason"]
    assert r_state["stopping_reason_message"] == r_es.stopping_reason_message
    fresh = rt.EarlyStopping(monitor="score")
    fresh.load_state_dict(l_state)
    assert (fresh.stopping_reason, fresh.stopping_reason_message) == (r_es.stopping_reason,
                                                                     l_es.stopping_reason_message)
    fresh_l = L.callbacks.EarlyStopping(monitor="score")
    fresh_l.load_state_dict(r_state)
    assert fresh_l.stopping_reason.value == r_es.stopping_reason.value


def test_stopping_reason_round_trips_and_old_states_load(tmp_path):
    es, _ = _stop(tmp_path, [5, 3, 0.9, 0.5], stopping_threshold=1.0, patience=10)
    other = rt.EarlyStopping(monitor="score")
    other.load_state_dict(es.state_dict())
    assert other.stopping_reason.name == "STOPPING_THRESHOLD"
    assert other.stopping_reason_message == es.stopping_reason_message
    old = {k: v for k, v in es.state_dict().items() if not k.startswith("stopping_reason")}  # before 2.6
    other.load_state_dict(old)
    assert other.stopping_reason.name == "NOT_STOPPED" and other.stopping_reason_message is None


def test_bad_mode_is_a_misconfiguration(L):
    from raytrainer.utilities.exceptions import MisconfigurationException

    with pytest.raises(L.utilities.exceptions.MisconfigurationException):
        L.callbacks.EarlyStopping(monitor="score", mode="up")
    with pytest.raises(MisconfigurationException, match="'min' or 'max'"):
        rt.EarlyStopping(monitor="score", mode="up")
