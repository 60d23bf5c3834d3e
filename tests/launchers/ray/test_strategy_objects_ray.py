"""strategy=DDPStrategy(...) on Ray ranks: its DistributedDataParallel arguments reach every rank's wrapper."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as pl
from raytrainer.strategies import DDPStrategy

QUIET = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)


class HalfUsed(pl.LightningModule):
    """``unused`` takes no part in the loss: DDP must be told to look for parameters without gradients."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.used = nn.Linear(4, 1)
        self.unused = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        wrapper = self.trainer.strategy.model
        self.log("find_unused", float(wrapper.find_unused_parameters), reduce_fx="min")
        self.log("bucket_view", float(wrapper.gradient_as_bucket_view), reduce_fx="min")
        return nn.functional.mse_loss(self.used(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g)), batch_size=4)


@pytest.mark.slow
def test_find_unused_parameters_reaches_the_ranks_and_is_needed(local_ray, tmp_path):
    model = HalfUsed()
    before = model.used.weight.detach().clone()
    trainer = pl.Trainer(strategy=DDPStrategy(find_unused_parameters=True, gradient_as_bucket_view=True),
                         num_processes=2, max_steps=3, default_root_dir=str(tmp_path / "ok"), **QUIET)
    trainer.fit(model, data())
    assert trainer.global_step == 3 and not torch.equal(model.used.weight, before)
    assert float(trainer.callback_metrics["find_unused"]) == 1.0
    assert float(trainer.callback_metrics["bucket_view"]) == 1.0
    assert isinstance(trainer.strategy, DDPStrategy)  # the driver shows the object it was given

    failing = pl.Trainer(strategy=DDPStrategy(find_unused_parameters=False), num_processes=2, max_steps=3,
                         default_root_dir=str(tmp_path / "fails"), **QUIET)
    with pytest.raises(Exception, match="find_unused_parameters=True") as err:
        failing.fit(HalfUsed(), data())
    assert "did not receive grad" in str(err.value) or "unused" in str(err.value)
