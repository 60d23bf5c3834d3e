"""trainer.init_module(), LightningModule.configure_model(), detect_anomaly and deterministic, against Lightning."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as pl

QUIET = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)


def data() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(8, 4), torch.randn(8, 1)), batch_size=4)


def make_module(base: type) -> type:
    class Lazy(base):
        """Builds its layer in configure_model, once (Lightning's documented idempotent pattern)."""

        def __init__(self) -> None:
            super().__init__()
            self.layer = None
            self.calls: list[tuple[str, torch.dtype]] = []
            self.optimizer_saw_layer = False

        def configure_model(self):
            self.calls.append(("configure_model", torch.get_default_dtype()))
            if self.layer is not None:
                return
            self.layer = nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.layer(x), y)

        def validation_step(self, batch, batch_idx):
            self.log("val", nn.functional.mse_loss(self.layer(batch[0]), batch[1]))

        def configure_optimizers(self):
            self.optimizer_saw_layer = self.layer is not None
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Lazy


@pytest.mark.parametrize("precision", [None, "bf16-true", "64-true"])
def test_init_module_gives_the_dtype_and_device_lightning_gives(L, precision):
    ours = pl.Trainer(precision=precision, **QUIET)
    theirs = L.Trainer(precision=precision, accelerator="cpu", **QUIET)
    with ours.init_module():
        a = nn.Linear(3, 3)
        inside = torch.get_default_dtype()
    with theirs.init_module():
        b = nn.Linear(3, 3)
    assert (a.weight.dtype, a.weight.device) == (b.weight.dtype, b.weight.device)
    assert inside == a.weight.dtype and torch.get_default_dtype() == torch.float32


def test_init_module_empty_init_skips_parameter_initialisation(L):
    """Initialisation draws random numbers; with empty_init=True none are drawn (as Lightning's _EmptyInit)."""
    def draw_after(trainer, empty_init):
        torch.manual_seed(0)
        with trainer.init_module(empty_init=empty_init):
            nn.Linear(3, 3)
        return float(torch.rand(1))

    torch.manual_seed(0)
    untouched = float(torch.rand(1))
    for trainer in (pl.Trainer(**QUIET), L.Trainer(accelerator="cpu", **QUIET)):
        assert draw_after(trainer, True) == untouched
        assert draw_after(trainer, False) != untouched


def test_init_module_on_several_ray_ranks_creates_on_the_cpu_in_the_precision_dtype():
    trainer = pl.Trainer(num_processes=2, precision="bf16-true", **QUIET)
    with trainer.init_module():
        layer = nn.Linear(2, 2)
    assert layer.weight.dtype == torch.bfloat16 and layer.weight.device.type == "cpu"


@pytest.mark.parametrize("precision", [None, "bf16-true"])
def test_configure_model_is_called_like_lightning(L, tmp_path, precision):
    ours, theirs = make_module(pl.LightningModule)(), make_module(L.LightningModule)()
    t1 = pl.Trainer(precision=precision, max_epochs=1, default_root_dir=str(tmp_path), **QUIET)
    t2 = L.Trainer(precision=precision, max_epochs=1, accelerator="cpu", default_root_dir=str(tmp_path), **QUIET)
    t1.fit(ours, data(), data())
    t2.fit(theirs, data(), data())
    t1.validate(ours, data())
    t2.validate(theirs, data())
    assert ours.calls == theirs.calls and len(ours.calls) == 2  # each call runs it; the layer was built once
    assert ours.optimizer_saw_layer and theirs.optimizer_saw_layer
    assert ours.layer.weight.dtype == theirs.layer.weight.dtype


def test_detect_anomaly_is_on_during_fit_and_restored_after(tmp_path):
    seen = []

    class Probe(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            seen.append(torch.is_anomaly_enabled())
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    assert not torch.is_anomaly_enabled()
    pl.Trainer(detect_anomaly=True, max_steps=1, default_root_dir=str(tmp_path), **QUIET).fit(Probe(), data())
    assert seen == [True] and not torch.is_anomaly_enabled()
    pl.Trainer(max_steps=1, default_root_dir=str(tmp_path), **QUIET).fit(Probe(), data())
    assert seen == [True, False]


def test_deterministic_sets_the_cublas_workspace_as_lightning(L, tmp_path, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        L.Trainer(deterministic=True, accelerator="cpu", **QUIET)
        lightning = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
        monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
        model = make_module(pl.LightningModule)()
        pl.Trainer(deterministic=True, max_steps=1, default_root_dir=str(tmp_path), **QUIET).fit(model, data())
        assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == lightning == ":4096:8"
        assert torch.are_deterministic_algorithms_enabled()
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # a user's own deterministic setting is kept
        pl.Trainer(deterministic=True, max_steps=1, default_root_dir=str(tmp_path), **QUIET).fit(model, data())
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
        pl.Trainer(deterministic=False, max_steps=1, default_root_dir=str(tmp_path), **QUIET).fit(model, data())
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
