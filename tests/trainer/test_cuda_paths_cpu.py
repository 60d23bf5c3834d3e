"""CUDA-specific code run on a machine without a GPU: the GradScaler path of 16-mixed (with the scaler
disabled, as MixedPrecision builds it off CUDA), CUDA device selection in the plan and the strategy,
and the GPU check script in its CPU dry-run mode. tests/gpu/run_gpu_checks.sh runs the real thing on a GPU."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as pl
from raytrainer.core.precision import MixedPrecision, make_precision
from raytrainer.launchers import make_launcher
from raytrainer.plan import Env, Plan
from raytrainer.strategies.single_device import single_device

REPO = Path(__file__).resolve().parents[2]
FOUR_GPUS = Env(cuda_device_count=4)


# ------------------------------------------------------------------------- GradScaler(enabled=False)
def sgd_layer() -> tuple[nn.Linear, torch.optim.SGD]:
    torch.manual_seed(0)
    layer = nn.Linear(3, 1)
    return layer, torch.optim.SGD(layer.parameters(), lr=0.1)


def test_16_mixed_off_cuda_builds_a_disabled_grad_scaler():
    precision = make_precision("16-mixed", "cpu")
    assert isinstance(precision, MixedPrecision) and precision.dtype == torch.float16
    assert precision.scaler is not None and not precision.scaler.is_enabled()
    assert precision.state_dict() == {}  # a disabled scaler has no state: nothing goes into checkpoints
    precision.load_state_dict({})
    assert make_precision("bf16-mixed", "cuda").scaler is None  # bf16 needs no loss scaling
    assert make_precision("16-mixed", "cuda").scaler is not None


def test_disabled_scaler_steps_exactly_like_plain_sgd():
    layer, opt = sgd_layer()
    ref_layer, ref_opt = sgd_layer()
    precision = MixedPrecision("16-mixed", "cpu")
    x = torch.tensor([[1.0, 2.0, 3.0]])
    for _ in range(3):
        opt.zero_grad()
        loss = layer(x).sum()
        precision.backward(loss)  # scaler.scale() is the identity when disabled
        precision.unscale_gradients(opt)  # nothing to unscale
        precision.optimizer_step(opt)
        ref_opt.zero_grad()
        ref_layer(x).sum().backward()
        ref_opt.step()
        torch.testing.assert_close(layer.weight.grad, ref_layer.weight.grad, rtol=0, atol=0)
    torch.testing.assert_close(layer.weight, ref_layer.weight, rtol=0, atol=0)
    assert precision.scaler.get_scale() == 1.0


def test_disabled_scaler_with_a_closure_runs_it_once_and_returns_its_loss():
    layer, opt = sgd_layer()
    precision = MixedPrecision("16-mixed", "cpu")
    calls = []

    def closure() -> torch.Tensor:
        calls.append(1)
        opt.zero_grad()
        loss = layer(torch.ones(1, 3)).sum()
        precision.backward(loss)
        return loss

    before = layer.weight.detach().clone()
    out = precision.optimizer_step(opt, closure)
    assert len(calls) == 1 and isinstance(out, torch.Tensor)
    torch.testing.assert_close(layer.weight, before - 0.1)  # d(sum(w.x))/dw = x = 1


def test_16_mixed_refuses_lbfgs_closures():
    layer = nn.Linear(3, 1)
    opt = torch.optim.LBFGS(layer.parameters())
    with pytest.raises(TypeError, match="LBFGS"):
        MixedPrecision("16-mixed", "cpu").optimizer_step(opt, lambda: layer(torch.ones(1, 3)).sum())


class Regressor(pl.LightningModule):
    """Linear regression; manual=True steps two optimizers by hand (weight and bias separately)."""

    def __init__(self, manual: bool = False) -> None:
        super().__init__()
        self.automatic_optimization = not manual
        self.w = nn.Linear(4, 1, bias=False)
        self.b = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w(x) + self.b

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x).float(), y)
        self.log("loss", loss, on_epoch=True)
        if self.automatic_optimization:
            return loss
        for opt in self.optimizers():
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in self.optimizers():
            opt.step()
        return None

    def configure_optimizers(self):
        if self.automatic_optimization:
            return torch.optim.SGD(self.parameters(), lr=0.05)
        return [torch.optim.SGD(self.w.parameters(), lr=0.05), torch.optim.SGD([self.b], lr=0.05)]


class UsePrecision(pl.Callback):
    """Installs a precision plugin at setup: the only way to reach the 16-mixed code on a CPU-only machine,
    where Trainer(precision=16) is refused before any work."""

    def __init__(self, precision: MixedPrecision) -> None:
        self.precision = precision

    def setup(self, trainer, pl_module, stage):
        trainer.precision_plugin = self.precision


def fit_with(precision: MixedPrecision, manual: bool, tmp_path: Path) -> tuple[Regressor, pl.Trainer]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.7
    torch.manual_seed(0)
    model = Regressor(manual)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                         callbacks=[UsePrecision(precision)])
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True))
    return model, trainer


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_trainer_16_mixed_path_with_a_disabled_scaler_matches_no_scaler(tmp_path, manual):
    """The scaler branch of MixedPrecision (step, update, closure handling) changes nothing when disabled:
    the same fit without any scaler gives bit-identical weights."""
    scaled, trainer = fit_with(MixedPrecision("16-mixed", "cpu"), manual, tmp_path / "scaler")
    assert trainer.precision_plugin.scaler is not None and not trainer.precision_plugin.scaler.is_enabled()
    plain, _ = fit_with(MixedPrecision("16-mixed", "cpu", scaler=False), manual, tmp_path / "plain")
    for a, b in zip(scaled.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    steps = 3 * 8 * (2 if manual else 1)  # manual: each of the two optimizer steps counts
    assert trainer.global_step == steps
    assert float(trainer.callback_metrics["loss_epoch"]) < 1.0  # started near 14: it trained
    ckpt = tmp_path / "x.ckpt"
    trainer.save_checkpoint(str(ckpt))
    assert "MixedPrecision" not in torch.load(ckpt, weights_only=True)  # a disabled scaler saves no state


# ------------------------------------------------------------------------------- CUDA device selection
@pytest.mark.parametrize("kwargs, ids, launcher", [
    (dict(gpus=[0]), (0,), "in_process"),
    (dict(gpus=[3]), (3,), "in_process"),
    (dict(gpus="2,"), (2,), "in_process"),
    (dict(accelerator="gpu", devices=[1]), (1,), "in_process"),
    (dict(accelerator="cuda", devices="1,3"), (1, 3), "ray"),
    (dict(accelerator="gpu", devices=2), (0, 1), "ray"),
    (dict(accelerator="cuda", devices=-1), (0, 1, 2, 3), "ray"),
    (dict(accelerator="auto"), (0,), "in_process"),
])
def test_cuda_device_forms(kwargs, ids, launcher):
    p = Plan.from_args(env=FOUR_GPUS, **kwargs)
    assert (p.accelerator, p.device_ids, p.launcher) == ("cuda", ids, launcher)
    p.check_hardware(FOUR_GPUS)


@pytest.mark.parametrize("ids, device", [((0,), "cuda:0"), ((3,), "cuda:3"), (None, "cuda:0"), ((), "cuda:0")])
def test_single_gpu_strategy_uses_the_selected_index(ids, device):
    strategy = single_device("cuda", ids)  # builds no CUDA context: only setup_environment touches the GPU
    assert strategy.root_device == torch.device(device)
    assert single_device("cpu", None).root_device == torch.device("cpu")


def test_gpus_list_goes_to_the_in_process_launcher_on_that_device():
    plan = Plan.from_args(env=FOUR_GPUS, gpus=[2])
    launcher = make_launcher(plan)
    assert type(launcher).__name__ == "InProcessLauncher"
    assert single_device(plan.accelerator, plan.device_ids).root_device == torch.device("cuda", 2)


def test_gpu_index_beyond_the_visible_ones_is_refused_before_work():
    p = Plan.from_args(env=Env(cuda_device_count=1), gpus=[1])
    with pytest.raises(RuntimeError, match=r"gpus=\[1\] asks for CUDA device\(s\) \[1\] but only 1 GPU\(s\)"):
        p.check_hardware(Env(cuda_device_count=1))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised on a machine without CUDA")
@pytest.mark.parametrize("kwargs", [dict(gpus=[0]), dict(accelerator="gpu", devices=1), dict(precision=16)])
def test_cuda_arguments_on_a_cpu_machine_fail_before_any_work(kwargs):
    with pytest.raises((RuntimeError, ValueError), match=r"CUDA"):
        pl.Trainer(**kwargs)


# ------------------------------------------------------------------------------ without Ray, GPU script
BLOCK_RAY = """
import runpy, sys
class NoRay:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "ray":
            raise ImportError("ray is blocked: the GPU machine has no Ray")
sys.meta_path.insert(0, NoRay())
"""


def test_import_raytrainer_does_not_import_ray():
    code = "import sys; import raytrainer; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]


@pytest.mark.slow
def test_gpu_check_script_dry_run_on_cpu_without_ray(tmp_path):
    script = BLOCK_RAY + (f"sys.argv = ['gpu_checks.py', '--cpu-dry-run', '--workdir', {str(tmp_path)!r}]\n"
                          f"runpy.run_path({str(REPO / 'tests' / 'gpu' / 'gpu_checks.py')!r}, run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in proc.stdout.splitlines() if line.split(" ")[0] in ("PASS", "FAIL", "SKIP")]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [line.split(" ")[:2] for line in lines] == [
        ["PASS", "gpus1_fit_validate_predict"], ["PASS", "precision16_automatic"],
        ["PASS", "precision16_manual_two_optimizers"], ["PASS", "bf16_mixed"],
        ["SKIP", "gpus_list_selects_device"], ["PASS", "checkpoint_gpu_to_cpu_map_location"],
        ["PASS", "export_torchscript_onnx"], ["SKIP", "ddp_sync_batchnorm"],
        ["PASS", "true_precision_init_module_deterministic"], ["PASS", "fsdp_meta_init_bf16_mixed_nccl"],
        ["PASS", "ray_never_imported"]]
    assert "SUMMARY OK" in proc.stdout
