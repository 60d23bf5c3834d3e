"""True precisions (16-true, bf16-true, 64-true), precision plugins passed as objects, and the precision arguments
raytrainer refuses, compared with pytorch_lightning running the same module."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as pl
from raytrainer.plugins import DoublePrecision, HalfPrecision, MixedPrecision, Precision

QUIET = dict(logger=False, enable_progress_bar=False, enable_model_summary=False)


def data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)), batch_size=4)


def make_module(base: type) -> type:
    """The same regression module on top of raytrainer's or Lightning's LightningModule."""

    class Reg(base):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.layer = nn.Linear(4, 1)
            self.seen: list[tuple[torch.dtype, torch.dtype, torch.dtype]] = []
            self.losses: list[float] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            self.seen.append((x.dtype, y.dtype, torch.get_default_dtype()))
            loss = nn.functional.mse_loss(self.layer(x), y)
            self.losses.append(float(loss.detach()))
            return loss

        def predict_step(self, batch, batch_idx):
            return self.layer(batch[0])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Reg


@pytest.mark.parametrize("precision", ["bf16-true", "16-true", "64-true", 64])
def test_true_precision_trains_like_lightning(L, tmp_path, precision):
    ours, theirs = make_module(pl.LightningModule)(), make_module(L.LightningModule)()
    pl.Trainer(precision=precision, max_epochs=2, default_root_dir=str(tmp_path / "ours"), **QUIET).fit(ours, data())
    L.Trainer(precision=precision, max_epochs=2, accelerator="cpu", default_root_dir=str(tmp_path / "theirs"),
              **QUIET).fit(theirs, data())
    assert ours.layer.weight.dtype == theirs.layer.weight.dtype != torch.float32
    assert ours.seen == theirs.seen  # batch floats converted; the default dtype during the step
    assert ours.losses == pytest.approx(theirs.losses, rel=1e-6)
    assert torch.get_default_dtype() == torch.float32  # restored after the run


def test_true_precision_checkpoints_load_and_resume(tmp_path):
    trainer = pl.Trainer(precision="bf16-true", max_epochs=1, default_root_dir=str(tmp_path), **QUIET)
    model = make_module(pl.LightningModule)()
    trainer.fit(model, data())
    ckpt = trainer.checkpoint_callback.best_model_path
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert state["layer.weight"].dtype == torch.bfloat16
    loaded = make_module(pl.LightningModule).load_from_checkpoint(ckpt)  # a float32 module takes the weights
    assert torch.equal(loaded.layer.weight, model.layer.weight.float())
    again = pl.Trainer(precision="bf16-true", max_epochs=2, default_root_dir=str(tmp_path), **QUIET)
    resumed = make_module(pl.LightningModule)()
    again.fit(resumed, data(), ckpt_path=ckpt)
    assert again.current_epoch == 2 and resumed.layer.weight.dtype == torch.bfloat16
    out = again.predict(resumed, data())
    assert out[0].dtype == torch.bfloat16


@pytest.mark.parametrize("plugin, name", [(HalfPrecision("bf16-true"), "bf16-true"), (DoublePrecision(), "64-true"),
                                          (MixedPrecision("bf16-mixed", "cpu"), "bf16-mixed"),
                                          (Precision(), "32-true")])
def test_precision_plugin_objects_set_the_precision(L, tmp_path, plugin, name):
    trainer = pl.Trainer(plugins=[plugin], max_steps=1, default_root_dir=str(tmp_path), **QUIET)
    assert trainer.precision == name and trainer.precision_plugin is plugin
    lightning_plugin = getattr(L.plugins, type(plugin).__name__)
    args = {"HalfPrecision": ("bf16-true",), "MixedPrecision": ("bf16-mixed", "cpu")}.get(type(plugin).__name__, ())
    assert L.Trainer(plugins=[lightning_plugin(*args)], accelerator="cpu", **QUIET).precision == name
    model = make_module(pl.LightningModule)()
    trainer.fit(model, data())
    assert model.layer.weight.dtype == {"bf16-true": torch.bfloat16, "64-true": torch.float64}.get(name, torch.float32)


def test_precision_plugin_on_a_strategy_object_is_used(tmp_path):
    from raytrainer.strategies import SingleDeviceStrategy

    trainer = pl.Trainer(strategy=SingleDeviceStrategy(precision_plugin=DoublePrecision()), max_steps=1,
                         default_root_dir=str(tmp_path), **QUIET)
    assert trainer.precision == "64-true"
    model = make_module(pl.LightningModule)()
    trainer.fit(model, data())
    assert model.layer.weight.dtype == torch.float64


def test_plugin_conflicts_raise_as_in_lightning(L):
    for lib in (pl, L):
        plugins = lib.plugins if lib is L else __import__("raytrainer.plugins").plugins
        with pytest.raises(ValueError, match=r"Received both `precision=bf16-true` and `plugins=.*Choose one"):
            lib.Trainer(precision="bf16-true", plugins=[plugins.HalfPrecision("bf16-true")], accelerator="cpu",
                        **QUIET)
        with pytest.raises(Exception, match="Received multiple values for Precision flags") as multiple:
            lib.Trainer(plugins=[plugins.HalfPrecision(), plugins.DoublePrecision()], accelerator="cpu", **QUIET)
        with pytest.raises(Exception, match="invalid type for plugin") as invalid:
            lib.Trainer(plugins=[object()], accelerator="cpu", **QUIET)
        if lib is pl:  # raytrainer's MisconfigurationException is also a ValueError (Lightning's is an Exception)
            assert isinstance(multiple.value, ValueError) and isinstance(invalid.value, ValueError)


def test_lightning_plugin_families_raytrainer_does_not_take_say_why(L):
    from lightning_fabric.plugins.environments import LightningEnvironment

    from raytrainer.utilities.exceptions import MisconfigurationException

    with pytest.raises(MisconfigurationException, match="does not take CheckpointIO plugins.*ModelCheckpoint"):
        pl.Trainer(plugins=[L.plugins.TorchCheckpointIO()], **QUIET)
    with pytest.raises(MisconfigurationException, match="does not take ClusterEnvironment plugins.*Ray places"):
        pl.Trainer(plugins=[LightningEnvironment()], **QUIET)
    with pytest.raises(MisconfigurationException, match="pytorch_lightning's own plugin objects are not accepted"):
        pl.Trainer(plugins=[L.plugins.DoublePrecision()], **QUIET)


@pytest.mark.parametrize("precision", ["transformer-engine", "transformer-engine-float16"])
def test_transformer_engine_is_refused_clearly(precision):
    with pytest.raises(ValueError, match="needs NVIDIA Transformer Engine"):
        pl.Trainer(precision=precision, **QUIET)


def test_plugin_constructors_check_their_arguments():
    with pytest.raises(ValueError, match="must be '16-true' or 'bf16-true'"):
        HalfPrecision("bf16-mixed")
    with pytest.raises(ValueError, match="must be '16-mixed' or 'bf16-mixed'"):
        MixedPrecision("bf16-true", "cpu")
    with pytest.raises(ValueError, match="does not use a GradScaler"):
        MixedPrecision("bf16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))


def test_convert_input_casts_only_floating_point_tensors():
    batch = {"x": torch.ones(2), "ids": torch.arange(2), "pair": (torch.zeros(1), "text")}
    out = HalfPrecision("bf16-true").convert_input(batch)
    assert out["x"].dtype == torch.bfloat16 and out["ids"].dtype == torch.int64
    assert out["pair"][0].dtype == torch.bfloat16 and out["pair"][1] == "text"
