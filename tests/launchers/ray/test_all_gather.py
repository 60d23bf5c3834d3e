"""LightningModule.all_gather on two Ray ranks (DDP over gloo): the real gather, with and without gradients, and
a torch.compile'd module trained on the ranks (it travels to them and is compiled again there)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as pl

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")

QUIET = dict(enable_progress_bar=False, enable_model_summary=False, logger=False, enable_checkpointing=False)


class Gathering(pl.LightningModule):
    """One manual step whose loss reads every rank's value through all_gather(sync_grads=True).

    On rank r, v = w * (r + 1); the loss (the same on both ranks) is gathered[0] + 10 * gathered[1]. Gradients
    that cross ranks give w.grad 2 on rank 0 and 2 * 20 = 40 on rank 1, which DDP averages to 21; a gather that
    kept only local gradients would give (1 + 20) / 2 = 10.5.
    """

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        rank = self.global_rank
        plain = self.all_gather({"rows": torch.tensor([rank, 10 * rank]), "n": rank + 1, "flag": rank == 1})
        gathered = self.all_gather(self.w * (rank + 1), sync_grads=True)
        loss = gathered[0] + 10 * gathered[1]
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        self.log_dict({"grad": self.w.grad.detach().clone(), "rows_shape": float(plain["rows"].shape[0]),
                       "rows_sum": plain["rows"].float().sum(), "rank1_rows": plain["rows"][1].float().sum(),
                       "n": plain["n"].float().sum(), "flags": plain["flag"].float().sum(),
                       "gathered_shape": float(gathered.shape[0]), "requires_grad": float(gathered.requires_grad)})
        opt.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def regression_data(n: int = 16) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x.sum(1, keepdim=True))


class Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(4, 1)

    def forward(self, x):
        return self.layer(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.slow
def test_all_gather_on_two_ranks_gathers_and_carries_gradients(local_ray, tmp_path):
    model = Gathering()
    trainer = pl.Trainer(num_processes=2, max_steps=1, default_root_dir=str(tmp_path), **QUIET)
    trainer.fit(model, DataLoader(TensorDataset(torch.zeros(4, 1)), batch_size=1))
    got = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert got == {"grad": 21.0, "rows_shape": 2.0, "rows_sum": 11.0, "rank1_rows": 11.0, "n": 3.0, "flags": 1.0,
                   "gathered_shape": 2.0, "requires_grad": 1.0}
    assert float(model.w) == pytest.approx(1.0 - 0.1 * 21.0)


@pytest.mark.slow
def test_a_compiled_module_trains_on_two_ranks_like_the_plain_module_in_process(local_ray, tmp_path):
    data = regression_data()
    expected = Regression()
    # two ranks with batch 2 each (DistributedSampler: even and odd samples) = one process with batch 4
    pl.Trainer(max_epochs=2, default_root_dir=str(tmp_path), **QUIET).fit(expected, DataLoader(data, batch_size=4))
    model = Regression()
    trainer = pl.Trainer(num_processes=2, max_epochs=2, default_root_dir=str(tmp_path), **QUIET)
    trainer.fit(torch.compile(model, backend="eager"), DataLoader(data, batch_size=2))
    assert trainer.lightning_module is model and model._compiler_ctx["compiler"] == "dynamo"
    assert trainer.global_step == expected.trainer.global_step == 8
    torch.testing.assert_close(model.layer.weight, expected.layer.weight, rtol=1e-5, atol=1e-6)
