"""Tests for raytrainer.export: TorchScript and ONNX export, fresh-process loading, error messages."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from raytrainer.export import ExportError, to_onnx, to_torchscript, verify_export

pytestmark = pytest.mark.filterwarnings(
    "ignore::torch.jit.TracerWarning",
    "ignore:.*LeafSpec.*:FutureWarning",  # torch 2.13 internals, not ours
    "ignore:`torch.jit.*` is deprecated:DeprecationWarning",  # 2.13 deprecates TorchScript itself
    "ignore:The feature will be removed:DeprecationWarning",  # the legacy ONNX exporter, asked for once
)


# --------------------------------------------------------------------------- models


class AutoEncoder(nn.Module):
    """64 -> 16 -> 64 MLP; the dropout makes train/eval mode visible in the outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 16))
        self.decoder = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 64))
        self.example_input_array = torch.randn(1, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class MaskedPair(nn.Module):
    """Two inputs and two outputs, to check tuple and dict samples."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(64, 16)
        self.back = nn.Linear(16, 64)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        code = self.proj(x * mask)
        return self.back(code), code


class FakeTrainer:
    current_epoch = 3


class LightningLike(nn.Module):
    """What matters about a LightningModule for export: properties that need a Trainer, untyped hooks."""

    __jit_unused_properties__ = ["trainer", "current_epoch", "device", "example_input_array", "hparams"]
    _jit_is_scripting = False

    def __init__(self) -> None:
        super().__init__()
        self.__dict__["_trainer"] = None
        self.__dict__["_example_input_array"] = None
        self.__dict__["_hparams"] = {"lr": 1e-3, "name": "ae", "sizes": [64, 16], "callable": print}

    @property
    def trainer(self) -> Any:
        if self.__dict__["_trainer"] is None and not self._jit_is_scripting:
            raise RuntimeError(f"{type(self).__name__} is not attached to a Trainer")
        return self.__dict__["_trainer"]

    @property
    def current_epoch(self) -> int:
        return self.trainer.current_epoch if self.__dict__["_trainer"] is not None else 0

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def hparams(self) -> dict:
        return self.__dict__["_hparams"]

    @property
    def example_input_array(self) -> Any:
        return self.__dict__["_example_input_array"]

    @example_input_array.setter
    def example_input_array(self, value: Any) -> None:
        self.__dict__["_example_input_array"] = value

    def log(self, name, value, prog_bar=False, **kwargs):  # untyped on purpose, like Lightning's
        self.trainer.logged[name] = value

    def training_step(self, batch, batch_idx):
        loss = nn.functional.mse_loss(self(batch), batch)
        self.log("loss", loss, prog_bar=True)
        return loss


class LitLikeAutoEncoder(LightningLike):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, 16), nn.ReLU())
        self.decoder = nn.Linear(16, 64)
        self.example_input_array = torch.randn(1, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class VarArgs(nn.Module):
    """Unscriptable: TorchScript rejects *args."""

    def forward(self, x, *rest):
        return x * 2


class UnscriptableRoot(nn.Module):
    """Children script fine; the root's own forward does not (try/except)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self.fc(x)
        except RuntimeError:
            return x


class NumpyRoundTrip(nn.Module):
    """Untraceable: x.numpy() fails on a tensor that requires grad while tracing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.tanh(x.numpy()))


class DataDependentBranch(nn.Module):
    """Not exportable by torch.export: Python control flow on a tensor's value."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x - 1


class Alternating(nn.Module):
    """Untraceable: Python-side state changes the graph on each call, so the trace check fails."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x * 2 if self.calls % 2 else x + 1


class Nested(nn.Module):
    """encoder.body.<1> is the given culprit; everything else is ordinary."""

    def __init__(self, bad: nn.Module) -> None:
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.body = nn.Sequential(nn.Linear(4, 4), bad)
        self.decoder = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder.body(x))


def _eager(module: nn.Module, *args: torch.Tensor) -> Any:
    module.eval()
    with torch.no_grad():
        return module(*args)


# --------------------------------------------------------------------------- TorchScript


@pytest.mark.parametrize("method", ["script", "trace"])
def test_torchscript_round_trip(tmp_path: Path, method: str) -> None:
    torch.manual_seed(0)
    model = AutoEncoder()
    model.train()
    model.decoder.eval()  # a submodule with its own mode must get it back
    path = tmp_path / "sub" / f"ae_{method}.pt"

    exported = to_torchscript(model, path, method=method)

    assert isinstance(exported, torch.jit.ScriptModule)
    assert model.training and model.encoder[2].training and not model.decoder.training
    assert path.is_file()
    loaded = torch.jit.load(str(path))
    x = torch.randn(8, 64)
    want = _eager(model, x)
    for m in (exported, loaded):
        got = m(x)
        assert got.shape == (8, 64)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # dropout off: exported in eval mode


def test_trace_uses_explicit_inputs_and_dict_samples() -> None:
    model = MaskedPair()
    x, mask = torch.randn(3, 64), torch.ones(3, 64)
    from_tuple = to_torchscript(model, method="trace", example_inputs=(x, mask))
    from_dict = to_torchscript(model, method="trace", example_inputs={"x": x, "mask": mask})
    want = _eager(model, x, mask)
    for exported in (from_tuple, from_dict):
        for got, ref in zip(exported(x, mask), want):
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_lightning_like_module_scripts_and_keeps_its_api() -> None:
    model = LitLikeAutoEncoder()
    with pytest.raises(RuntimeError, match="not attached"):
        model.trainer

    scripted = to_torchscript(model, method="script")

    x = torch.randn(5, 64)
    torch.testing.assert_close(scripted(x), _eager(model, x), rtol=0, atol=1e-6)
    # the flag was only raised during export
    assert "_jit_is_scripting" not in model.__dict__ and model._jit_is_scripting is False
    with pytest.raises(RuntimeError, match="not attached"):
        model.trainer
    # hooks with untyped args stay plain Python methods of the original module
    model.__dict__["_trainer"] = FakeTrainer()
    model.trainer.logged = {}
    model.training_step(x, 0)
    assert "loss" in model.trainer.logged


def test_raising_property_without_flag_is_named() -> None:
    class NoFlag(LitLikeAutoEncoder):
        @property
        def trainer(self) -> Any:
            raise RuntimeError("NoFlag is not attached to a Trainer")

    with pytest.raises(ExportError) as info:
        to_torchscript(NoFlag(), method="script")
    message = str(info.value)
    assert "property 'trainer'" in message
    assert "__jit_unused_properties__" in message and "_jit_is_scripting" in message


def test_invalid_method_lists_options() -> None:
    with pytest.raises(ValueError, match=r"method='compile'.*'script', 'trace'"):
        to_torchscript(AutoEncoder(), method="compile")


def test_trace_without_input_says_how_to_give_one() -> None:
    model = MaskedPair()  # no example_input_array attribute at all
    with pytest.raises(ValueError, match=r"example_inputs=.*example_input_array"):
        to_torchscript(model, method="trace")
    model.example_input_array = None  # set but None counts as absent
    with pytest.raises(ValueError, match="example_input_array"):
        to_torchscript(model, method="trace")


def test_unscriptable_submodule_is_named() -> None:
    with pytest.raises(ExportError) as info:
        to_torchscript(Nested(VarArgs()), method="script")
    message = str(info.value)
    assert "submodule 'encoder.body.1' (VarArgs)" in message
    assert "def forward(self, x, *rest)" in message  # TorchScript's own source pointer survives
    assert f"{__file__}:" in message


def test_unscriptable_top_level_forward_is_named() -> None:
    with pytest.raises(ExportError) as info:
        to_torchscript(UnscriptableRoot(), method="script")
    message = str(info.value)
    assert "top-level module (UnscriptableRoot)" in message
    assert "try" in message


def test_untraceable_submodule_is_named_with_its_line() -> None:
    with pytest.raises(ExportError) as info:
        to_torchscript(Nested(NumpyRoundTrip()), method="trace", example_inputs=torch.randn(2, 4))
    message = str(info.value)
    assert "submodule 'encoder.body.1' (NumpyRoundTrip)" in message
    assert "np.tanh(x.numpy())" in message  # the failing source line


def test_trace_check_failure_is_located_by_tracing_children() -> None:
    with pytest.raises(ExportError) as info:
        to_torchscript(Nested(Alternating()), method="trace", example_inputs=torch.randn(2, 4))
    message = str(info.value)
    assert "submodule 'encoder.body.1' (Alternating)" in message
    assert "TracingCheckError" in message


def test_scripting_a_good_model_after_a_failed_one_still_works() -> None:
    with pytest.raises(ExportError):
        to_torchscript(Nested(VarArgs()), method="script")
    scripted = to_torchscript(Nested(nn.ReLU()), method="script")
    assert scripted(torch.randn(2, 4)).shape == (2, 4)


# --------------------------------------------------------------------------- ONNX


def _ort(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_onnx_batch_one_export_runs_at_batch_256(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = AutoEncoder()
    assert model.example_input_array.shape[0] == 1
    path = tmp_path / "ae.onnx"

    to_onnx(model, path, export_params=True)

    assert model.training  # mode restored
    assert [p.name for p in tmp_path.iterdir()] == ["ae.onnx"]  # one self-contained file
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    session = _ort(path)
    name = session.get_inputs()[0].name
    for batch in (1, 7, 256):
        x = torch.randn(batch, 64)
        (got,) = session.run(None, {name: x.numpy()})
        assert got.shape == (batch, 64)
        np.testing.assert_allclose(got, _eager(model, x).numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("as_dict", [False, True])
def test_onnx_two_inputs_share_a_dynamic_batch(tmp_path: Path, as_dict: bool) -> None:
    model = MaskedPair()
    x, mask = torch.randn(1, 64), torch.ones(1, 64)
    sample = {"x": x, "mask": mask} if as_dict else (x, mask)
    path = tmp_path / "pair.onnx"
    to_onnx(model, path, input_sample=sample)

    session = _ort(path)
    x, mask = torch.randn(256, 64), (torch.rand(256, 64) > 0.5).float()
    names = [i.name for i in session.get_inputs()]
    assert names == ["x", "mask"]
    got = session.run(None, {"x": x.numpy(), "mask": mask.numpy()})
    for g, want in zip(got, _eager(model, x, mask)):
        assert g.shape[0] == 256
        np.testing.assert_allclose(g, want.numpy(), rtol=0, atol=1e-5)
    assert verify_export(path, model, sample={"x": x, "mask": mask}) <= 1e-5


def test_onnx_caller_dynamic_shapes_win(tmp_path: Path) -> None:
    path = tmp_path / "static.onnx"
    to_onnx(AutoEncoder(), path, dynamic_shapes={"x": None})  # the caller asks for a static batch
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 64]
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        _ort(path).run(None, {"x": np.zeros((256, 64), np.float32)})


def test_onnx_legacy_exporter_also_gets_dynamic_batch(tmp_path: Path) -> None:
    model = AutoEncoder()
    path = tmp_path / "legacy.onnx"
    to_onnx(model, path, dynamo=False)
    session = _ort(path)
    assert [i.name for i in session.get_inputs()] == ["input"]
    x = torch.randn(256, 64)
    (got,) = session.run(None, {"input": x.numpy()})
    np.testing.assert_allclose(got, _eager(model, x).numpy(), rtol=0, atol=1e-5)


def test_onnx_external_data_travels_with_the_model(tmp_path: Path) -> None:
    model = AutoEncoder()
    to_onnx(model, tmp_path / "out" / "big.onnx", external_data=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["big.onnx", "big.onnx.data"]
    assert verify_export(tmp_path / "out" / "big.onnx", model) <= 1e-5


def test_export_paths_must_name_a_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="names a directory"):
        to_onnx(AutoEncoder(), f"{tmp_path}/")
    with pytest.raises(FileNotFoundError, match="no exported file"):
        verify_export(tmp_path / "missing.pt", AutoEncoder())


def test_onnx_without_input_says_how_to_give_one(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"input_sample=.*example_input_array"):
        to_onnx(MaskedPair(), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_onnx_export_failure_names_the_module_and_line(tmp_path: Path) -> None:
    with pytest.raises(ExportError) as info:
        to_onnx(Nested(DataDependentBranch()), tmp_path / "bad.onnx", input_sample=torch.randn(2, 4))
    message = str(info.value)
    assert "torch.onnx.export failed in submodule 'encoder.body.1' (DataDependentBranch)" in message
    assert "if x.sum() > 0:" in message
    assert not (tmp_path / "bad.onnx").exists()


# --------------------------------------------------------------------------- verification


def test_verify_export_fp32_is_within_1e5(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = AutoEncoder()
    paths = [tmp_path / "s.pt", tmp_path / "t.pt", tmp_path / "m.onnx"]
    to_torchscript(model, paths[0], method="script")
    to_torchscript(model, paths[1], method="trace")
    to_onnx(model, paths[2])
    big = torch.randn(64, 64)
    for path in paths:
        assert 0.0 <= verify_export(path, model) <= 1e-5
        assert 0.0 <= verify_export(str(path), model, sample=big) <= 1e-5


def test_verify_export_catches_a_stale_file(tmp_path: Path) -> None:
    model = AutoEncoder()
    to_torchscript(model, tmp_path / "m.pt")
    to_onnx(model, tmp_path / "m.onnx")
    with torch.no_grad():
        model.decoder[2].bias.add_(0.5)  # the module moved on after export
    for name in ("m.pt", "m.onnx"):
        with pytest.raises(ExportError, match=r"max abs diff 0\.5"):
            verify_export(tmp_path / name, model)


def test_verify_export_without_sample_says_how_to_give_one(tmp_path: Path) -> None:
    model = MaskedPair()
    path = tmp_path / "p.pt"
    to_torchscript(model, path)
    with pytest.raises(ValueError, match="sample=.*example_input_array"):
        verify_export(path, model)


# --------------------------------------------------------------------------- files elsewhere


FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    x = np.load(sys.argv[1])
    out = {}
    import torch
    for name in ("script.pt", "trace.pt"):
        m = torch.jit.load(sys.argv[2] + "/" + name)
        out[name] = m(torch.from_numpy(x)).detach().numpy().tolist()
    import onnxruntime as ort
    s = ort.InferenceSession(sys.argv[2] + "/model.onnx", providers=["CPUExecutionProvider"])
    out["model.onnx"] = s.run(None, {s.get_inputs()[0].name: x})[0].tolist()
    out["raytrainer_imported"] = any(k.split(".")[0] == "raytrainer" for k in sys.modules)
    print(json.dumps(out))
    """
)


@pytest.mark.slow
def test_exported_files_load_in_a_fresh_process_without_raytrainer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = LitLikeAutoEncoder()
    to_torchscript(model, f"file://{tmp_path}/script.pt", method="script")
    to_torchscript(model, tmp_path / "trace.pt", method="trace")
    to_onnx(model, tmp_path / "model.onnx")
    x = torch.randn(32, 64)
    np.save(tmp_path / "x.npy", x.numpy())

    # -I: isolated mode (no cwd, no PYTHONPATH, no user site), so nothing of this repo leaks in.
    proc = subprocess.run(
        [sys.executable, "-I", "-c", FRESH_PROCESS, str(tmp_path / "x.npy"), str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out.pop("raytrainer_imported") is False
    want = _eager(model, x).numpy()
    assert set(out) == {"script.pt", "trace.pt", "model.onnx"}
    for name, got in out.items():
        np.testing.assert_allclose(np.asarray(got, dtype=np.float32), want, rtol=0, atol=1e-5, err_msg=name)


@pytest.mark.slow
def test_export_to_s3_uri_and_verify_from_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    moto_server = pytest.importorskip("moto.server")
    import pyarrow.fs as pafs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        fs = pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", region="us-east-1",
                               allow_bucket_creation=True, connect_timeout=5, request_timeout=20)
        fs.create_dir("export-bucket")
        query = f"endpoint_override={host}:{port}&scheme=http&region=us-east-1"
        model = AutoEncoder()
        to_torchscript(model, f"s3://export-bucket/run/ae.pt?{query}")
        to_onnx(model, f"s3://export-bucket/run/ae.onnx?{query}")

        listed = {i.path for i in fs.get_file_info(pafs.FileSelector("export-bucket/run"))}
        assert listed == {"export-bucket/run/ae.pt", "export-bucket/run/ae.onnx"}
        assert verify_export(f"s3://export-bucket/run/ae.pt?{query}", model) <= 1e-5
        assert verify_export(f"s3://export-bucket/run/ae.onnx?{query}", model) <= 1e-5
        with pytest.raises(FileNotFoundError, match="no exported file"):
            verify_export(f"s3://export-bucket/run/missing.pt?{query}", model)

        # the endpoint can also come from the environment, as for checkpoints
        monkeypatch.setenv("RAYTRAINER_S3_ENDPOINT", f"http://{host}:{port}")
        to_onnx(model, "s3://export-bucket/env/ae.onnx")
        assert fs.get_file_info("export-bucket/env/ae.onnx").type == pafs.FileType.File
        assert verify_export("s3://export-bucket/env/ae.onnx", model) <= 1e-5
    finally:
        server.stop()


# --------------------------------------------------------------------------- raytrainer.LightningModule


def _lit_autoencoder() -> nn.Module:
    from raytrainer.module import LightningModule

    class LitAE(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Sequential(nn.Linear(64, 16), nn.ReLU())
            self.decoder = nn.Linear(16, 64)
            self.example_input_array = torch.randn(1, 64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.decoder(self.encoder(x))

        def training_step(self, batch, batch_idx):
            loss = nn.functional.mse_loss(self(batch), batch)
            self.log("train_loss", loss)
            return loss

    return LitAE()


@pytest.mark.parametrize("method", ["script", "trace"])
def test_lightning_module_to_torchscript(tmp_path: Path, method: str) -> None:
    model = _lit_autoencoder()
    path = tmp_path / f"lit_{method}.pt"
    exported = model.to_torchscript(file_path=str(path), method=method)
    x = torch.randn(4, 64)
    torch.testing.assert_close(exported(x), _eager(model, x), rtol=0, atol=1e-6)
    assert verify_export(path, model) <= 1e-5
    with pytest.raises(RuntimeError):
        model.trainer  # still detached afterwards


def test_lightning_module_to_onnx(tmp_path: Path) -> None:
    model = _lit_autoencoder()
    path = tmp_path / "lit.onnx"
    model.to_onnx(str(path))
    x = torch.randn(256, 64)
    session = _ort(path)
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(got, _eager(model, x).numpy(), rtol=0, atol=1e-5)
    assert verify_export(path, model) <= 1e-5
