"""The checkpoint dict, hyper-parameters, load_from_checkpoint and its errors."""
from __future__ import annotations

import argparse
import io
import os

import pytest
import torch
from ckpt_models import Regressor, assert_bitwise_equal, loaders, params, trainer

import raytrainer as rt
from raytrainer.checkpoint import format as ckpt_format
from raytrainer.io import storage


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """(checkpoint path, trained model) of a short run with save_last."""
    root = tmp_path_factory.mktemp("fitted")
    rt.seed_everything(5)
    model = Regressor(hidden=12, lr=0.01)
    cb = rt.ModelCheckpoint(save_last=True)
    trainer(root, max_epochs=2, callbacks=[cb]).fit(model, *loaders())
    return cb.last_model_path, model


def test_top_level_keys_and_plain_torch_load(fitted):
    path, model = fitted
    ckpt = torch.load(path)  # torch's default weights_only=True
    assert set(ckpt_format.FORMAT_KEYS) <= set(ckpt)
    major, minor = (int(p) for p in ckpt["pytorch-lightning_version"].split(".")[:2])
    assert major == 2 and minor >= 0
    assert (ckpt["epoch"], ckpt["global_step"]) == (1, 20)
    assert ckpt["hparams_name"] == "kwargs"
    assert ckpt["hyper_parameters"] == {"hidden": 12, "lr": 0.01, "dropout": 0.1, "scheduler": "step",
                                        "val_metric_offset": 0.0}
    assert len(ckpt["optimizer_states"]) == 1 and len(ckpt["lr_schedulers"]) == 1
    assert ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"] == 2
    ours = ckpt["raytrainer"]
    assert ours["position"]["epoch"] == 2 and ours["position"]["batch_idx"] == 0
    assert ours["world_size"] == 1 and "grad_scaler" in ours
    assert any(k.startswith("ModelCheckpoint{") for k in ckpt["callbacks"])
    # the manual route
    fresh = Regressor(hidden=12)
    fresh.load_state_dict(ckpt["state_dict"])
    assert_bitwise_equal(params(fresh), params(model))


def test_save_hyperparameters_ignore_and_non_plain_values():
    class WithBackbone(rt.LightningModule):
        def __init__(self, backbone: torch.nn.Module, lr: float = 0.1, tags=("a", "b")):
            super().__init__()
            self.save_hyperparameters(ignore=["backbone"])
            self.backbone = backbone

    m = WithBackbone(torch.nn.Linear(2, 2), lr=0.5)
    assert dict(m.hparams) == {"lr": 0.5, "tags": ("a", "b")}

    class Unfiltered(rt.LightningModule):
        def __init__(self, backbone: torch.nn.Module, lr: float = 0.1):
            super().__init__()
            self.save_hyperparameters()

    with pytest.raises(TypeError, match="'backbone' is a Linear.*ignore=\\['backbone'\\]"):
        Unfiltered(torch.nn.Linear(2, 2))


class FromDict(rt.LightningModule):
    def __init__(self, config: dict):
        super().__init__()
        self.save_hyperparameters(config)
        self.layer = torch.nn.Linear(config["width"], 1)


class FromNamespace(rt.LightningModule):
    def __init__(self, args: argparse.Namespace):
        super().__init__()
        self.save_hyperparameters(args)
        self.layer = torch.nn.Linear(args.width, 1)


def _save_weights(model: rt.LightningModule, path) -> str:
    """A checkpoint of an untrained module (through a Trainer, as users get them)."""
    t = trainer(os.path.dirname(path), max_epochs=1, logger=False, enable_checkpointing=False)
    t.lightning_module = model  # save_checkpoint outside fit: weights and hparams of this module
    model.trainer = t
    t.save_checkpoint(str(path), weights_only=True)
    return str(path)


def test_save_hyperparameters_dict_and_namespace_round_trip(tmp_path):
    m = FromDict({"width": 3, "name": "x"})
    assert dict(m.hparams) == {"width": 3, "name": "x"}
    path = _save_weights(m, tmp_path / "dict.ckpt")
    ckpt = torch.load(path)
    assert ckpt["hparams_name"] == "config" and ckpt["hyper_parameters"] == {"width": 3, "name": "x"}
    back = FromDict.load_from_checkpoint(path)
    assert back.layer.in_features == 3 and dict(back.hparams) == {"width": 3, "name": "x"}
    assert_bitwise_equal(params(back), params(m))

    n = FromNamespace(argparse.Namespace(width=4, lr=0.1))
    path = _save_weights(n, tmp_path / "ns.ckpt")
    back = FromNamespace.load_from_checkpoint(path, map_location="cpu")
    assert back.layer.in_features == 4 and back.hparams.lr == 0.1
    assert_bitwise_equal(params(back), params(n))


def test_load_from_checkpoint_overrides_map_location_and_strict(fitted, tmp_path):
    path, model = fitted
    back = Regressor.load_from_checkpoint(path, lr=0.5)
    assert back.hparams.lr == 0.5 and back.hparams.hidden == 12
    assert_bitwise_equal(params(back), params(model))
    moved = Regressor.load_from_checkpoint(path, map_location=lambda storage_, loc: storage_)
    assert_bitwise_equal(params(moved), params(model))
    on_cpu = Regressor.load_from_checkpoint(path, map_location=torch.device("cpu"))
    assert on_cpu.device == torch.device("cpu")

    class Wider(Regressor):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.extra = torch.nn.Linear(1, 1)

    with pytest.raises(RuntimeError, match="extra.weight") as err:
        Wider.load_from_checkpoint(path)
    assert path in str(err.value.__notes__)
    loose = Wider.load_from_checkpoint(path, strict=False)
    assert_bitwise_equal({k: v for k, v in params(loose).items() if not k.startswith("extra")}, params(model))


def test_load_errors_name_the_file_and_the_argument(fitted, tmp_path):
    path, _ = fitted
    missing = str(tmp_path / "missing.ckpt")
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        Regressor.load_from_checkpoint(missing)
    text = tmp_path / "notes.ckpt"
    text.write_text("these are not weights\n")
    with pytest.raises(storage.CheckpointCorruptError, match="notes.ckpt.*not a torch checkpoint"):
        Regressor.load_from_checkpoint(str(text))
    tensor_file = tmp_path / "tensor.ckpt"
    torch.save({"weights": torch.zeros(2)}, tensor_file)
    with pytest.raises(ValueError, match="tensor.ckpt is not a Lightning/raytrainer checkpoint"):
        Regressor.load_from_checkpoint(str(tensor_file))

    class Other(rt.LightningModule):
        def __init__(self, width: int = 3):
            super().__init__()

    with pytest.raises(TypeError, match="hyper_parameters \\[.*'hidden'.*\\] are not arguments of Other") as err:
        Other.load_from_checkpoint(path)
    assert path in str(err.value)

    class NeedsMore(Regressor):
        def __init__(self, depth: int, **kwargs):
            super().__init__(**kwargs)

    with pytest.raises(TypeError, match="needs \\['depth'\\].*depth=\\.\\.\\.") as err:
        NeedsMore.load_from_checkpoint(path)
    assert path in str(err.value)
    assert NeedsMore.load_from_checkpoint(path, depth=2).hparams.hidden == 12


class _Opaque:
    """Not a plain type: torch.load(weights_only=True) refuses it."""

    def __init__(self, value):
        self.value = value


def test_pickled_objects_need_an_explicit_opt_in(fitted, tmp_path):
    path, model = fitted
    ckpt = torch.load(path)
    ckpt["extra"] = _Opaque(3)
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save(ckpt, unsafe)
    with pytest.raises(Exception, match="unsafe.ckpt.*weights_only=False"):
        Regressor.load_from_checkpoint(str(unsafe))
    back = Regressor.load_from_checkpoint(str(unsafe), weights_only=False)
    assert_bitwise_equal(params(back), params(model))


def test_dump_refuses_state_that_plain_torch_load_could_not_read(tmp_path):
    class Opaque(rt.Callback):
        def state_dict(self):
            return {"thing": _Opaque(1)}

    with pytest.raises(TypeError, match="\\['callbacks'\\]\\['.*Opaque'\\]\\['thing'\\] is a .*_Opaque"):
        rt.seed_everything(0)
        trainer(tmp_path, max_epochs=1, callbacks=[Opaque()]).fit(Regressor(), *loaders())


def test_on_save_and_on_load_checkpoint_hooks(tmp_path):
    class Hooked(Regressor):
        loaded = None

        def on_save_checkpoint(self, checkpoint):
            checkpoint["my_note"] = {"epochs": self.current_epoch}

        def on_load_checkpoint(self, checkpoint):
            type(self).loaded = checkpoint.get("my_note")

    cb = rt.ModelCheckpoint()
    rt.seed_everything(0)
    trainer(tmp_path, max_epochs=1, callbacks=[cb]).fit(Hooked(), *loaders())
    assert torch.load(cb.best_model_path)["my_note"] == {"epochs": 0}
    Hooked.load_from_checkpoint(cb.best_model_path)
    assert Hooked.loaded == {"epochs": 0}


def test_storage_load_reads_our_files_from_bytes(fitted):
    path, _ = fitted
    raw = storage.read_verified(path)
    assert torch.load(io.BytesIO(raw))["global_step"] == 20
