"""CUDA checks for a machine with a GPU and torch (Ray is not needed): the single-GPU in-process path.

    bash tests/gpu/run_gpu_checks.sh            # on the GPU machine; prints one PASS/FAIL/SKIP line per check
    python tests/gpu/gpu_checks.py --cpu-dry-run  # the same checks on CPU (bf16 instead of fp16), for CI

Each check is independent; the exit status is 1 if any check failed. The data is synthetic (64
features with 3-dimensional structure), so nothing beyond torch, numpy, tqdm and pyarrow is needed;
ONNX export is checked when onnx, onnxscript and onnxruntime are installed.
"""
from __future__ import annotations

import argparse
import faulthandler
import importlib.util
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "examples")]

REQUIRED = ("torch", "numpy", "tqdm", "pyarrow")
ONNX = ("onnx", "onnxscript", "onnxruntime")


class Skip(Exception):
    """A check that cannot run on this machine (the reason is printed)."""


def preflight() -> list[str]:
    return [m for m in REQUIRED if importlib.util.find_spec(m) is None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="run the checks on CPU (precision 16 becomes bf16-mixed) to test this script")
    parser.add_argument("--workdir", default=None, help="where runs write logs and checkpoints (default: a temp dir)")
    args = parser.parse_args(argv)
    faulthandler.dump_traceback_later(540, exit=False)  # stacks on stderr if a check hangs (the .sh kills at 600 s)

    missing = preflight()
    if missing:
        print(f"FAIL preflight: missing Python packages {missing}: install them (pip install {' '.join(missing)}) "
              "or pass a wheel folder to run_gpu_checks.sh via RAYTRAINER_GPU_WHEELS")
        return 1
    import torch

    cpu = args.cpu_dry_run
    if not cpu and not torch.cuda.is_available():
        print(f"FAIL preflight: torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False); "
              "run this on a GPU machine with a CUDA build of torch, or use --cpu-dry-run")
        return 1
    where = "CPU (dry run)" if cpu else f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    print(f"INFO torch {torch.__version__}, cuda {torch.version.cuda}, device {where}, python {sys.version.split()[0]}")

    root = Path(args.workdir or tempfile.mkdtemp(prefix="raytrainer-gpu-checks-"))
    checks = Checks(root, cpu)
    failed = 0
    for name, fn in checks.all():
        start = time.perf_counter()
        try:
            detail = fn() or ""
            status = "PASS"
        except Skip as exc:
            status, detail = "SKIP", str(exc)
        except Exception as exc:  # noqa: BLE001 - every check reports, the next one still runs
            status, detail = "FAIL", f"{type(exc).__name__}: {exc}"
            traceback.print_exc(file=sys.stderr)
            failed += 1
        print(f"{status} {name} ({time.perf_counter() - start:.1f}s) {detail}".rstrip(), flush=True)
    ray_loaded = "ray" in sys.modules
    note = "(ray was imported)" if ray_loaded else ""
    print(f"{'FAIL' if ray_loaded else 'PASS'} ray_never_imported {note}".rstrip())
    failed += ray_loaded
    print(f"SUMMARY {'FAILED' if failed else 'OK'}: {failed} failed; runs under {root}")
    return 1 if failed else 0


class Checks:
    """The checks, in order. Each builds its own Trainer; the fp32 fit is reused by later checks."""

    def __init__(self, root: Path, cpu: bool) -> None:
        import torch

        self.root, self.cpu = root, cpu
        self.device_type = "cpu" if cpu else "cuda"
        self.fp16 = "bf16-mixed" if cpu else 16  # 16-mixed needs CUDA; the dry run takes the same code paths
        self.fitted: tuple[Any, Any, Any] | None = None
        self.torch = torch

    def all(self) -> list[tuple[str, Callable[[], str | None]]]:
        return [("gpus1_fit_validate_predict", self.gpus1_fit_validate_predict),
                ("precision16_automatic", self.precision16_automatic),
                ("precision16_manual_two_optimizers", self.precision16_manual),
                ("bf16_mixed", self.bf16_mixed),
                ("gpus_list_selects_device", self.gpus_list_selects_device),
                ("checkpoint_gpu_to_cpu_map_location", self.checkpoint_to_cpu),
                ("export_torchscript_onnx", self.export),
                ("ddp_sync_batchnorm", self.ddp_sync_batchnorm),
                ("true_precision_init_module_deterministic", self.true_precision_init_module_deterministic),
                ("fsdp_meta_init_bf16_mixed_nccl", self.fsdp_meta_init_bf16_mixed)]

    # ------------------------------------------------------------------ helpers
    def trainer(self, name: str, **kwargs: Any) -> Any:
        import raytrainer as pl

        if self.cpu:
            kwargs.pop("gpus", None)
            kwargs.setdefault("accelerator", "cpu")
        else:
            kwargs.setdefault("gpus", 1)
        kwargs.setdefault("enable_progress_bar", False)
        kwargs.setdefault("enable_model_summary", False)
        kwargs.setdefault("logger", False)
        return pl.Trainer(default_root_dir=str(self.root / name), **kwargs)

    def data(self) -> Any:
        return synthetic_datamodule()

    def expect_device(self, module: Any, index: int = 0) -> None:
        devices = {p.device for p in module.parameters()}
        want = self.torch.device("cpu") if self.cpu else self.torch.device("cuda", index)
        if devices != {want}:
            raise AssertionError(f"parameters are on {devices}, expected {want}")

    # ------------------------------------------------------------------ checks
    def gpus1_fit_validate_predict(self) -> str:
        from autoencoder import LitAutoEncoder

        import raytrainer as pl

        pl.seed_everything(0)
        trainer = self.trainer("fp32", max_epochs=4)
        model, dm = LitAutoEncoder(), self.data()
        before = trainer.validate(model, datamodule=dm, verbose=False)[0]["val_loss"]
        trainer.fit(model, datamodule=dm)
        after = trainer.validate(model, datamodule=dm, verbose=False)[0]["val_loss"]
        self.expect_device(model)
        assert trainer.global_step == 4 * 16, trainer.global_step  # 1024 samples / 64
        assert after < 0.5 * before, f"val_loss {before:.4f} -> {after:.4f} did not halve"
        preds = trainer.predict(model, datamodule=dm)
        assert sum(p.shape[0] for p in preds) == 256 and preds[0].shape[1] == 3, [p.shape for p in preds]
        self.fitted = (trainer, model, dm)
        return f"val_loss {before:.4f} -> {after:.4f}; predictions on {preds[0].device}"

    def precision16_automatic(self) -> str:
        from autoencoder import LitAutoEncoder

        import raytrainer as pl

        pl.seed_everything(0)
        trainer = self.trainer("fp16", max_epochs=4, precision=self.fp16)
        model, dm = LitAutoEncoder(), self.data()
        before = trainer.validate(model, datamodule=dm, verbose=False)[0]["val_loss"]
        trainer.fit(model, datamodule=dm)
        after = trainer.validate(model, datamodule=dm, verbose=False)[0]["val_loss"]
        self.expect_device(model)
        assert after < 0.5 * before, f"val_loss {before:.4f} -> {after:.4f} did not halve"
        assert all(p.dtype == self.torch.float32 for p in model.parameters())
        scaler = trainer.precision_plugin.scaler
        if self.cpu:
            return f"val_loss {before:.4f} -> {after:.4f} (bf16-mixed stands in for 16-mixed on CPU)"
        assert scaler is not None and scaler.is_enabled(), "16-mixed on CUDA must use an enabled GradScaler"
        path = self.root / "fp16.ckpt"
        trainer.save_checkpoint(str(path))
        ckpt = self.torch.load(path, map_location="cpu", weights_only=True)
        assert ckpt.get("MixedPrecision", {}).get("scale") is not None, "checkpoint lacks the GradScaler state"
        return f"val_loss {before:.4f} -> {after:.4f}; GradScaler scale {scaler.get_scale():.0f}"

    def precision16_manual(self) -> str:
        from gan import DigitsGAN

        import raytrainer as pl

        pl.seed_everything(0)
        model = DigitsGAN(hidden=64)
        g0 = [p.detach().clone() for p in model.generator.parameters()]
        d0 = [p.detach().clone() for p in model.discriminator.parameters()]
        loader = self.torch.utils.data.DataLoader(synthetic_images(), batch_size=64, shuffle=True,
                                                  drop_last=True)
        trainer = self.trainer("gan_fp16", max_steps=40, precision=self.fp16)
        trainer.fit(model, train_dataloaders=loader)
        self.expect_device(model)
        assert trainer.global_step == 40, trainer.global_step  # each LightningOptimizer.step counts
        for name, before, after in (("generator", g0, model.generator), ("discriminator", d0, model.discriminator)):
            if all(self.torch.equal(b.to(a.device), a) for b, a in zip(before, after.parameters())):
                raise AssertionError(f"the {name}'s parameters did not change")
        g, d = (float(trainer.callback_metrics[k]) for k in ("g_loss_epoch", "d_loss_epoch"))
        assert all(map(lambda v: v == v and abs(v) != float("inf"), (g, d))), (g, d)
        scale = trainer.precision_plugin.scaler.get_scale() if not self.cpu else None
        return f"g_loss {g:.3f}, d_loss {d:.3f}" + (f"; GradScaler scale {scale:.0f}" if scale else "")

    def bf16_mixed(self) -> str:
        from autoencoder import LitAutoEncoder

        import raytrainer as pl

        if not self.cpu and not self.torch.cuda.is_bf16_supported():
            raise Skip("this GPU has no bfloat16 support")
        pl.seed_everything(0)
        model, dm = LitAutoEncoder(), self.data()
        seen: set[Any] = set()
        model.encoder.register_forward_hook(lambda mod, inp, out: seen.add(out.dtype))
        trainer = self.trainer("bf16", max_epochs=4, precision="bf16-mixed")
        before = trainer.validate(model, datamodule=dm, verbose=False)[0]["val_loss"]
        trainer.fit(model, datamodule=dm)
        after = trainer.validate(model, datamodule=dm, verbose=False)[0]["val_loss"]
        assert seen == {self.torch.bfloat16}, seen
        assert after < 0.5 * before, f"val_loss {before:.4f} -> {after:.4f} did not halve"
        return f"val_loss {before:.4f} -> {after:.4f}"

    def gpus_list_selects_device(self) -> str:
        from autoencoder import LitAutoEncoder

        if self.cpu:
            raise Skip("device selection needs CUDA devices")
        picked = []
        for index in sorted({0, self.torch.cuda.device_count() - 1}):
            trainer = self.trainer(f"gpus_{index}", gpus=[index], max_steps=2)
            model = LitAutoEncoder()
            trainer.fit(model, datamodule=self.data())
            self.expect_device(model, index)
            assert trainer.strategy.root_device == self.torch.device("cuda", index), trainer.strategy.root_device
            picked.append(f"gpus=[{index}] -> {trainer.strategy.root_device}")
        return "; ".join(picked) + ("" if len(picked) > 1 else " (one GPU: only index 0 checked)")

    def ddp_sync_batchnorm(self) -> str:
        """Trainer(sync_batchnorm=True)'s strategy step on CUDA: BatchNorm -> SyncBatchNorm, then DDP over NCCL
        (a one-process group here) trains through it."""
        import os
        import socket

        import torch.distributed as dist

        from raytrainer.strategies.base import RankContext
        from raytrainer.strategies.ddp import DDPStrategy

        if self.cpu:
            raise Skip("SyncBatchNorm needs CUDA devices")
        torch, nn = self.torch, self.torch.nn
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1"})
        model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
        strategy = DDPStrategy(device="cuda:0", ctx=RankContext(), timeout_s=60, sync_batchnorm=True)
        strategy.setup_environment()
        try:
            wrapped = strategy.setup_module(model)
            assert isinstance(model[1], nn.SyncBatchNorm), type(model[1])
            loss = wrapped(torch.randn(16, 4, device="cuda")).pow(2).mean()
            loss.backward()
            assert model[1].weight.grad is not None and dist.get_backend() == "nccl"
        finally:
            strategy.teardown()
        return "BatchNorm1d -> SyncBatchNorm, forward/backward through DDP on NCCL"

    def fsdp_meta_init_bf16_mixed(self) -> str:
        """FSDPStrategy on one GPU (NCCL, a world of one): a module built on meta is materialised as CUDA shards,
        bf16-mixed computes in bfloat16 with fp32 parameters, and the full state gathers back to the CPU."""
        import os
        import socket

        from torch.distributed.tensor import DTensor

        from raytrainer.core.precision import make_precision
        from raytrainer.strategies.base import RankContext
        from raytrainer.strategies.fsdp import FSDPStrategy

        torch, nn = self.torch, self.torch.nn
        if not self.cpu and not torch.cuda.is_bf16_supported():
            raise Skip("this GPU has no bfloat16 support")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1"})
        device = "cpu" if self.cpu else "cuda:0"
        strategy = FSDPStrategy(auto_wrap_policy={nn.Linear}, device=device, ctx=RankContext(), timeout_s=60)
        strategy.precision_plugin = make_precision("bf16-mixed", self.device_type)
        strategy.setup_environment()
        try:
            with strategy.tensor_init_context(empty_init=True):
                model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
            seen: set[Any] = set()
            model[0].register_forward_hook(lambda mod, inp, out: seen.add(out.dtype))
            root = strategy.setup_module(model)
            assert all(isinstance(p, DTensor) and p.device.type == self.device_type for p in model.parameters())
            root(torch.randn(8, 16, device=device)).float().pow(2).mean().backward()
            assert seen == {torch.bfloat16}, seen
            assert all(p.grad is not None and p.dtype == torch.float32 for p in model.parameters())
            full = strategy.full_state(model.state_dict())
            assert all(v.device.type == "cpu" and not isinstance(v, DTensor) for v in full.values())
        finally:
            strategy.teardown()
        return f"meta -> {self.device_type} shards, bf16 compute, fp32 grads, full state on CPU"

    def true_precision_init_module_deterministic(self) -> str:
        """precision='16-true' / 'bf16-true' on CUDA: init_module() creates the module on the GPU in that dtype, fit
        keeps it there; deterministic=True sets CUBLAS_WORKSPACE_CONFIG before the first cuBLAS call of the run."""
        import os

        from autoencoder import LitAutoEncoder

        import raytrainer as pl

        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        done = []
        device = "cpu" if self.cpu else "cuda"
        runs = [("16-true", self.torch.float16)] if not self.cpu else []  # fp16 matmuls on CPU are slow
        for precision, dtype in runs + [("bf16-true", self.torch.bfloat16)]:
            pl.seed_everything(0)
            trainer = self.trainer(f"true-{precision}", max_steps=8, precision=precision, deterministic=True)
            with trainer.init_module():
                model = LitAutoEncoder()
            params = {(p.device.type, p.dtype) for p in model.parameters()}
            assert params == {(device, dtype)}, params
            trainer.fit(model, datamodule=self.data())
            self.expect_device(model)
            assert {p.dtype for p in model.parameters()} == {dtype}
            assert all(bool(self.torch.isfinite(p).all()) for p in model.parameters()), "non-finite weights"
            assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == ":4096:8", os.environ.get("CUBLAS_WORKSPACE_CONFIG")
            done.append(f"{precision}: params {dtype} on {device}, step {trainer.global_step}")
        self.torch.use_deterministic_algorithms(False)
        return "; ".join(done) + "; CUBLAS_WORKSPACE_CONFIG=:4096:8"

    def checkpoint_to_cpu(self) -> str:
        from autoencoder import LitAutoEncoder

        if self.fitted is None:
            raise Skip("needs the gpus1 fit")
        trainer, model, dm = self.fitted
        path = self.root / "gpu.ckpt"
        trainer.save_checkpoint(str(path))
        ckpt = self.torch.load(path, map_location="cpu", weights_only=True)
        devices = {t.device.type for t in _tensors(ckpt)}
        assert devices == {"cpu"}, devices
        loaded = LitAutoEncoder.load_from_checkpoint(str(path), map_location="cpu")
        assert {p.device.type for p in loaded.parameters()} == {"cpu"}
        x = dm.val_set.tensors[0][:16]
        with self.torch.no_grad():
            ref = model(x.to(model.device)).cpu()
            got = loaded(x)
        self.torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
        return f"saved from {model.device}, loaded on cpu; {len(ckpt['state_dict'])} tensors"

    def export(self) -> str:
        from raytrainer.export import verify_export

        if self.fitted is None:
            raise Skip("needs the gpus1 fit")
        _, model, _ = self.fitted
        ts = self.root / "model.pt"
        model.to_torchscript(str(ts))
        diff_ts = verify_export(str(ts), model, atol=1e-4)
        missing = [m for m in ONNX if importlib.util.find_spec(m) is None]
        if missing:
            return f"torchscript max diff {diff_ts:.2g}; ONNX not checked (missing {missing})"
        onnx_path = self.root / "model.onnx"
        model.to_onnx(str(onnx_path))
        diff_onnx = verify_export(str(onnx_path), model, sample=self.torch.rand(5, 64), atol=1e-4)
        return f"torchscript max diff {diff_ts:.2g}, onnx max diff {diff_onnx:.2g} (exported from {model.device})"


def _tensors(obj: Any) -> list[Any]:
    import torch

    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def synthetic_datamodule() -> Any:
    """1280 samples of 64 features near a 3-dimensional subspace (the autoencoder's latent size), as a datamodule."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    import raytrainer as pl

    class SyntheticData(pl.LightningDataModule):
        def __init__(self) -> None:
            super().__init__()
            x = synthetic_features()
            y = torch.zeros(len(x), dtype=torch.long)
            self.train_set = TensorDataset(x[:1024], y[:1024])
            self.val_set = TensorDataset(x[1024:], y[1024:])

        def train_dataloader(self) -> Any:
            return DataLoader(self.train_set, batch_size=64, shuffle=True)

        def val_dataloader(self) -> Any:
            return DataLoader(self.val_set, batch_size=128)

        def predict_dataloader(self) -> Any:
            return self.val_dataloader()

    return SyntheticData()


def synthetic_features() -> Any:
    import torch

    g = torch.Generator().manual_seed(0)
    basis = torch.randn(3, 64, generator=g)
    z = torch.rand(1280, 3, generator=g)
    return torch.sigmoid(z @ basis) + 0.01 * torch.randn(1280, 64, generator=g)


def synthetic_images() -> Any:
    """The same kind of data scaled to [-1, 1], for the GAN (whose generator ends in tanh)."""
    from torch.utils.data import TensorDataset

    return TensorDataset(synthetic_features()[:1024] * 2 - 1)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "4")
    sys.exit(main())
