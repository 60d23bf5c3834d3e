"""SpikeDetection against Lightning's: a scripted loss sequence spikes at the same batch, with the same file."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as rt
from raytrainer.callbacks import SpikeDetection, TrainingSpikeException

LOSSES = [1.0, 0.9, 0.8, 0.85, 0.7, 0.75, 0.6, 3.5, 0.5, 0.4]  # small rises, then a spike at batch 7


class ScriptedMixin:
    """training_step returns the next loss of ``losses`` (attached to a parameter so it can be optimized)."""

    def __init__(self, losses: list[float]) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.losses = losses

    def training_step(self, batch, batch_idx):
        return (self.w * 0).sum() + self.losses[batch_idx]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Scripted(ScriptedMixin, rt.LightningModule):
    pass


def _data(n: int) -> DataLoader:
    return DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=1)


def _run(lib, cls, cb, root, losses):
    trainer = lib.Trainer(callbacks=[cb], max_epochs=1, default_root_dir=str(root), logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(Exception) as info:
        trainer.fit(cls(losses), _data(len(losses)))
    return info.value


@pytest.mark.parametrize("kwargs,losses,spike_at", [
    (dict(window=3), LOSSES, 7),
    (dict(window=3, rtol=None, atol=0.04), LOSSES, 3),  # absolute: 0.85 is 0.05 above the mean of 1, .9, .8
    (dict(window=5, warmup=2), [1.0, 0.9, 0.8, math.nan, 0.5], 3),  # not finite
])
def test_spike_matches_lightning(L, tmp_path, kwargs, losses, spike_at):
    class LScripted(ScriptedMixin, L.LightningModule):
        pass

    ours = _run(rt, Scripted, SpikeDetection(**kwargs), tmp_path / "rt", losses)
    theirs = _run(L, LScripted, L.callbacks.SpikeDetection(**kwargs), tmp_path / "pl", losses)
    assert isinstance(ours, TrainingSpikeException) and type(theirs).__name__ == "TrainingSpikeException"
    assert str(ours) == str(theirs) == f"Training spike detected in batch {spike_at}"
    written = json.loads((tmp_path / "rt" / "skip_batches.json").read_text())
    assert written == json.loads((tmp_path / "pl" / "skip_batches.json").read_text()) == [spike_at - 1, spike_at]


def test_no_spike_trains_through_and_state_round_trips(tmp_path):
    cb = SpikeDetection(window=3, exclude_batches_path=str(tmp_path / "d"))
    trainer = rt.Trainer(callbacks=[cb], max_epochs=1, default_root_dir=str(tmp_path), logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Scripted(LOSSES[:7]), _data(7))
    assert trainer.global_step == 7 and not (tmp_path / "d" / "skip_batches.json").exists()
    assert cb.last_val == pytest.approx(0.6)
    copy = SpikeDetection(window=3)
    copy.load_state_dict(cb.state_dict())
    assert copy.state_dict() == cb.state_dict() and copy._is_spike(3.5) and not copy._is_spike(0.7)
    with pytest.raises(ValueError, match="mode"):
        SpikeDetection(mode="relative")
