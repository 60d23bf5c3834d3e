"""trainer.state on Ray ranks and on the driver, and a profiler that every rank runs (its report file named by
rank), in one two-rank fit."""
from __future__ import annotations

import re

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as pl
from raytrainer.profilers import SimpleProfiler


class StateRecorder(pl.Callback):
    """Records trainer.state at a few hooks; the records come back to the driver through state_dict."""

    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def _record(self, trainer, where: str) -> None:
        s = trainer.state
        self.seen.append((where, s.fn.value, s.stage.value if s.stage else None, s.status.value, trainer.training,
                          trainer.validating, trainer.sanity_checking, trainer.world_size))

    def on_fit_start(self, trainer, pl_module):
        self._record(trainer, "on_fit_start")

    def on_sanity_check_start(self, trainer, pl_module):
        self._record(trainer, "on_sanity_check_start")

    def on_train_batch_end(self, trainer, pl_module, *args):
        self._record(trainer, "on_train_batch_end")

    def on_validation_end(self, trainer, pl_module):
        self._record(trainer, "on_validation_end")

    def state_dict(self):
        return {"seen": list(self.seen)}

    def load_state_dict(self, state):
        self.seen = [tuple(x) for x in state["seen"]]


class Model(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.slow
def test_state_on_ranks_and_driver_and_one_profile_per_rank(local_ray, tmp_path):
    recorder = StateRecorder()
    data = DataLoader(TensorDataset(torch.randn(16, 4)), batch_size=4)
    trainer = pl.Trainer(num_processes=2, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=1,
                         callbacks=[recorder], profiler=SimpleProfiler(dirpath=tmp_path, filename="perf"),
                         default_root_dir=str(tmp_path))
    trainer.fit(Model(), data, data)
    # the driver: the call finished
    assert (trainer.state.fn, trainer.state.stage, trainer.state.status) == ("fit", None, "finished")
    assert not trainer.training and not trainer.interrupted
    # rank 0, inside its hooks (its callback's records came back with the run's result)
    seen = {where: rest for where, *rest in recorder.seen}
    assert seen["on_fit_start"] == ["fit", "train", "running", True, False, False, 2]
    assert seen["on_sanity_check_start"] == ["fit", "sanity_check", "running", False, False, True, 2]
    assert seen["on_train_batch_end"] == ["fit", "train", "running", True, False, False, 2]
    assert recorder.seen[-1][:3] == ("on_validation_end", "fit", "validate")
    # every rank profiled and wrote its own report, the rank in its name (Lightning's naming)
    for rank in (0, 1):
        text = (tmp_path / f"fit-perf-{rank}.txt").read_text()
        names = {m.group(1) for line in text.splitlines() if (m := re.match(r"\|  (\S+)\s*\t\|", line))}
        assert {"run_training_batch", "[Strategy]DDPStrategy.training_step", "[Strategy]DDPStrategy.backward",
                "[_TrainingEpochLoop].train_dataloader_next"} <= names
        row = next(line for line in text.splitlines() if line.startswith("|  run_training_batch"))
        assert row.split("|")[3].strip() == "2"  # 16 samples, 2 ranks, batches of 4
