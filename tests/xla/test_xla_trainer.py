"""tpu_cores=1 / accelerator="tpu": the Trainer on one XLA device in this process (XLA's CPU backend here)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch_xla = pytest.importorskip("torch_xla", reason="torch_xla is not installed here: run these tests with "
                                "`make test-xla`")

import torch  # noqa: E402

import raytrainer as pl  # noqa: E402
from raytrainer.export import verify_export  # noqa: E402
from raytrainer.strategies.xla import XLAPrecision, XLAStrategy, all_gather_objects, all_reduce, broadcast_object  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples"))
from autoencoder import DigitsDataModule, LitAutoEncoder  # noqa: E402
from gan import DigitsGAN, digits_tensor  # noqa: E402

pytestmark = pytest.mark.timeout(240)


def make_trainer(root: Path, **kwargs) -> pl.Trainer:
    kwargs.setdefault("tpu_cores", 1)
    return pl.Trainer(default_root_dir=str(root), enable_progress_bar=False, enable_model_summary=False, **kwargs)


def on_xla(module: torch.nn.Module) -> bool:
    return all(p.device.type == "xla" for p in module.parameters())


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One autoencoder fit on XLA that several tests inspect: (trainer, model, datamodule, val loss before)."""
    root = tmp_path_factory.mktemp("fit")
    pl.seed_everything(0)
    trainer = make_trainer(root, max_epochs=3, log_every_n_steps=5)
    model, dm = LitAutoEncoder(), DigitsDataModule()
    before = trainer.validate(model, datamodule=dm, verbose=False)[0]["val_loss"]
    trainer.fit(model, datamodule=dm)
    return trainer, model, dm, before


def test_fit_validate_predict_on_xla(fitted):
    trainer, model, dm, before = fitted
    assert trainer.plan.launcher == "xla" and isinstance(trainer.strategy, XLAStrategy)
    assert isinstance(trainer.precision_plugin, XLAPrecision)
    assert on_xla(model) and str(trainer.strategy.root_device) == "xla:0"
    assert trainer.global_step == 3 * 22  # 1400 images in batches of 64
    after = trainer.validate(model, datamodule=dm, verbose=False)[0]["val_loss"]
    assert after < 0.7 * before, f"validation loss did not fall: {before} -> {after}"
    test = trainer.test(model, datamodule=dm, verbose=False)[0]["test_loss"]
    assert test < 0.7 * before
    preds = trainer.predict(model, datamodule=dm)
    assert [p.shape for p in preds] == [torch.Size([197, 3])]
    assert preds[0].device.type == "cpu"  # as Lightning: predictions come back on the CPU
    x = dm.test_set.tensors[0]
    with torch.no_grad():
        expected = model.encoder(x.to(model.device)).cpu()
    torch.testing.assert_close(preds[0], expected, rtol=1e-5, atol=1e-5)


def test_accelerator_tpu_devices_1_and_core_index(tmp_path):
    trainer = pl.Trainer(accelerator="tpu", devices=1, max_steps=2, default_root_dir=str(tmp_path),
                         enable_progress_bar=False, enable_model_summary=False)
    model = LitAutoEncoder()
    trainer.fit(model, datamodule=DigitsDataModule())
    assert trainer.global_step == 2 and on_xla(model)

    trainer = make_trainer(tmp_path, tpu_cores=[0], max_steps=1)  # a list selects one core by index
    trainer.fit(LitAutoEncoder(), datamodule=DigitsDataModule())
    assert str(trainer.strategy.root_device) == "xla:0"

    with pytest.raises(ValueError, match=r"tpu_cores=\[3\] selects XLA device 3, but this process sees 1"):
        make_trainer(tmp_path, tpu_cores=[3], max_steps=1).fit(LitAutoEncoder(), datamodule=DigitsDataModule())


def test_bf16_mixed_autocasts_forward_and_trains(tmp_path):
    pl.seed_everything(0)
    model, dm = LitAutoEncoder(), DigitsDataModule()
    seen: set[torch.dtype] = set()
    model.encoder.register_forward_hook(lambda mod, inp, out: seen.add(out.dtype))
    trainer = make_trainer(tmp_path, precision="bf16-mixed", max_epochs=2)
    before = trainer.validate(model, datamodule=dm, verbose=False)[0]["val_loss"]
    trainer.fit(model, datamodule=dm)
    after = trainer.validate(model, datamodule=dm, verbose=False)[0]["val_loss"]
    assert seen == {torch.bfloat16}  # linear layers ran in bfloat16 under torch.autocast("xla")
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay float32
    assert after < 0.8 * before


def test_16_mixed_is_refused_with_the_bf16_alternative(tmp_path):
    trainer = make_trainer(tmp_path, precision=16, max_steps=1)
    with pytest.raises(ValueError, match="bf16-mixed"):
        trainer.fit(LitAutoEncoder(), datamodule=DigitsDataModule())


def test_manual_optimization_with_two_optimizers(tmp_path):
    pl.seed_everything(0)
    model = DigitsGAN(hidden=32)
    g0 = [p.detach().clone() for p in model.generator.parameters()]
    d0 = [p.detach().clone() for p in model.discriminator.parameters()]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(digits_tensor()), batch_size=64,
                                         shuffle=True, drop_last=True)
    trainer = make_trainer(tmp_path, max_steps=20, log_every_n_steps=2)
    trainer.fit(model, train_dataloaders=loader)
    assert trainer.global_step == 20  # two LightningOptimizer.step calls per batch, each through XLAPrecision
    assert on_xla(model)
    for before, after in ((g0, model.generator.parameters()), (d0, model.discriminator.parameters())):
        assert any(not torch.equal(b, a.detach().cpu()) for b, a in zip(before, after))
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["g_loss_epoch"].cpu()) and torch.isfinite(metrics["d_loss_epoch"].cpu())


def test_checkpoint_from_xla_loads_with_plain_cpu_torch(fitted, tmp_path):
    trainer, model, dm, _ = fitted
    path = tmp_path / "manual.ckpt"
    trainer.save_checkpoint(str(path))
    auto = trainer.checkpoint_callback.best_model_path  # written by ModelCheckpoint during the XLA fit
    assert auto and os.path.exists(auto)
    x = dm.test_set.tensors[0][:5]
    with torch.no_grad():
        expected = model(x.to(model.device)).cpu()
    torch.save(x, tmp_path / "x.pt")
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys
        class NoXLA:  # this process must not be able to import torch_xla at all
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "torch_xla":
                    raise ImportError("torch_xla is blocked in this check")
        sys.meta_path.insert(0, NoXLA())
        sys.path[:0] = [{str(REPO)!r}, {str(REPO / "examples")!r}]
        import torch
        from autoencoder import LitAutoEncoder

        def tensors(obj):
            if isinstance(obj, torch.Tensor):
                yield obj
            elif isinstance(obj, dict):
                for v in obj.values():
                    yield from tensors(v)
            elif isinstance(obj, (list, tuple)):
                for v in obj:
                    yield from tensors(v)

        for path in ({str(path)!r}, {auto!r}):
            ckpt = torch.load(path, weights_only=True)  # no map_location: fails on any XLA-tagged storage
            found = list(tensors(ckpt))
            assert found and all(t.device.type == "cpu" for t in found), path
            assert ckpt["optimizer_states"][0]["state"], "optimizer state missing"
        model = LitAutoEncoder.load_from_checkpoint({str(path)!r})
        out = model(torch.load({str(tmp_path / "x.pt")!r}))
        torch.testing.assert_close(out, torch.load({str(tmp_path / "expected.pt")!r}), rtol=1e-4, atol=1e-5)
        print("loaded on", torch.__version__, "without torch_xla")
    """)
    plain = REPO / ".venv" / "bin" / "python"  # the main venv (torch CPU build, no torch_xla) when it exists
    python = str(plain) if plain.exists() else sys.executable
    proc = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "without torch_xla" in proc.stdout


def test_resume_fit_on_xla_from_a_checkpoint(fitted, tmp_path):
    trainer, model, dm, _ = fitted
    path = tmp_path / "resume.ckpt"
    trainer.save_checkpoint(str(path))
    resumed = make_trainer(tmp_path, max_epochs=4)
    fresh = LitAutoEncoder()
    resumed.fit(fresh, datamodule=dm, ckpt_path=str(path))
    assert resumed.global_step == 4 * 22 and resumed.current_epoch == 4
    assert on_xla(fresh)


def test_export_torchscript_and_onnx_of_an_xla_trained_module(fitted, tmp_path):
    pytest.importorskip("onnxruntime")
    _, model, _, _ = fitted
    assert on_xla(model)
    ts = tmp_path / "model.pt"
    scripted = model.to_torchscript(str(ts))
    assert all(p.device.type == "cpu" for p in scripted.parameters())
    assert verify_export(str(ts), model, atol=1e-4) <= 1e-4
    onnx_path = tmp_path / "model.onnx"
    model.to_onnx(str(onnx_path))
    assert verify_export(str(onnx_path), model, sample=torch.rand(7, 64), atol=1e-4) <= 1e-4
    assert on_xla(model)  # exporting used a CPU copy; the trained module and its optimizer are untouched


def test_seed_reaches_the_xla_rng(tmp_path):
    draws = []
    for _ in range(2):
        pl.seed_everything(123)
        strategy = XLAStrategy()
        strategy.setup_environment()
        draws.append(torch.rand(4, device=strategy.root_device).cpu())
    torch.testing.assert_close(draws[0], draws[1], rtol=0, atol=0)
    pl.seed_everything(124)
    strategy.setup_environment()
    assert not torch.equal(torch.rand(4, device=strategy.root_device).cpu(), draws[0])


def test_collective_helpers_on_one_device():
    device = torch_xla.device()
    assert all_reduce(torch.tensor([1.0, 3.0]), "mean", 1, device).tolist() == [1.0, 3.0]
    assert all_reduce(torch.tensor(5, dtype=torch.int32), "max", 1, device).item() == 5
    assert all_reduce(torch.tensor(2), "sum", 1, device).item() == 2
    assert all_gather_objects({"a": [1, 2]}) == [{"a": [1, 2]}]
    assert broadcast_object(("x", 3), src=0, rank=0) == ("x", 3)
    strategy = XLAStrategy()
    assert strategy.reduce(torch.tensor(2.0)).item() == 2.0 and strategy.all_gather_object(7) == [7]
    assert strategy.stop_agreement() is None


def test_multi_device_launch_after_the_runtime_started_is_a_clear_error(tmp_path):
    torch.zeros(1, device=torch_xla.device()).cpu()  # the runtime of this process is now initialised
    trainer = make_trainer(tmp_path, tpu_cores=2, max_steps=1)
    with pytest.raises(RuntimeError, match="runtime is already initialised in this process"):
        trainer.fit(LitAutoEncoder(), datamodule=DigitsDataModule())
