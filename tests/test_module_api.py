"""LightningModule's API beyond the training loop: all_gather, strict_loading, the checkpoint hyper-parameter keys,
remove_ignored_hparams, prepare_data_per_node, compiled modules, weights_only and trainer.ckpt_path, each checked
against pytorch_lightning 2.6 (the ``L`` fixture) where it can run the same code."""
from __future__ import annotations

from collections import namedtuple

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as pl
from raytrainer.module import from_compiled, prepares_data_here, to_uncompiled
from raytrainer.utilities.exceptions import MisconfigurationException

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")

# LightningModule names raytrainer does not have, and why (see the README's "Coming from Lightning").
LEFT_OUT = {
    "fabric": "raytrainer has no Lightning Fabric to attach a module to",
    "device_mesh": "no ModelParallelStrategy: the DDP and single-device strategies shard no model",
    "to_tensorrt": "needs torch_tensorrt and CUDA; export with to_onnx or to_torchscript",
    "configure_sharded_model": "deprecated in Lightning 2.x in favour of configure_model",
}


def quiet(base, **kwargs):
    """Trainer arguments for a fast, silent run on the CPU."""
    out = dict(enable_progress_bar=False, enable_model_summary=False, logger=False, enable_checkpointing=False,
               accelerator="cpu")
    out.update(kwargs)
    return out


def data(n: int = 8, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=batch_size)


def regression(base):
    class Reg(base.LightningModule):
        def __init__(self, lr: float = 0.1):
            super().__init__()
            self.save_hyperparameters()
            self.layer = nn.Linear(4, 1)

        def forward(self, x):
            return self.layer(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", nn.functional.mse_loss(self(x), y))

        def test_step(self, batch, batch_idx):
            x, y = batch
            self.log("test_loss", nn.functional.mse_loss(self(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    return Reg


# ------------------------------------------------------------------------------------------- public names
def test_every_public_lightning_module_name_exists_or_is_left_out_on_purpose(L):
    torch_names = set(dir(nn.Module))
    theirs = {n for n in dir(L.LightningModule) if not n.startswith("_") and n not in torch_names}
    ours = {n for n in dir(pl.LightningModule) if not n.startswith("_")}
    assert theirs - ours <= set(LEFT_OUT), sorted(theirs - ours - set(LEFT_OUT))


def test_checkpoint_hyper_params_keys_and_defaults_are_lightnings(L):
    for name in ("CHECKPOINT_HYPER_PARAMS_KEY", "CHECKPOINT_HYPER_PARAMS_NAME", "CHECKPOINT_HYPER_PARAMS_TYPE"):
        assert getattr(pl.LightningModule, name) == getattr(L.LightningModule, name)
    for base in (pl, L):
        model = regression(base)()
        assert model.strict_loading is True and model.on_gpu is False and model.prepare_data_per_node is True


def test_dataloader_hooks_exist_and_refuse_when_not_overridden(L):
    for base, error in ((pl, MisconfigurationException), (L, L.utilities.exceptions.MisconfigurationException)):
        model = regression(base)()
        for hook in ("train_dataloader", "val_dataloader", "test_dataloader", "predict_dataloader"):
            with pytest.raises(error, match=f"`{hook}` must be implemented"):
                getattr(model, hook)()
    assert issubclass(MisconfigurationException, ValueError)


# ------------------------------------------------------------------------------------------- all_gather
Pair = namedtuple("Pair", "left right")


def gather_inputs():
    return {"t": torch.arange(3.0), "i": 4, "f": 0.5, "b": True, "arr": np.arange(2),
            "nested": [torch.ones(2, 2), (7, "label")], "pair": Pair(torch.zeros(1), 2)}


def describe(value):
    """Structure, values and dtypes of an all_gather result, comparable across the two libraries."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype), value.tolist())
    if isinstance(value, dict):
        return {k: describe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [describe(v) for v in value])
    return value


def test_all_gather_on_one_process_returns_lightnings_types_and_shapes(L):
    seen = {}
    for base in (pl, L):
        class Gather(regression(base)):
            def training_step(self, batch, batch_idx):
                seen[base.__name__] = describe(self.all_gather(gather_inputs()))
                return super().training_step(batch, batch_idx)

        base.Trainer(**quiet(base, max_steps=1)).fit(Gather(), data())
    assert seen["raytrainer"] == seen["pytorch_lightning"]
    assert seen["raytrainer"]["t"] == ("tensor", (3,), "torch.float32", [0.0, 1.0, 2.0])
    assert seen["raytrainer"]["nested"][1][1][1][1] == "label"  # non-numbers pass through


def test_all_gather_with_sync_grads_keeps_the_graph_on_one_process():
    model = regression(pl)()
    trainer = pl.Trainer(**quiet(pl, max_steps=1))
    trainer.fit(model, data())
    x = torch.ones(2, requires_grad=True)
    model.all_gather(x * 3, sync_grads=True).sum().backward()
    assert x.grad.tolist() == [3.0, 3.0]


def test_all_gather_without_a_trainer_says_so():
    with pytest.raises(RuntimeError, match=r"all_gather is only available while a Trainer runs"):
        regression(pl)().all_gather(torch.ones(1))


# ------------------------------------------------------------------------------------------- hyper-parameters
def hparams_after_ignore(base):
    class Base(base.LightningModule):
        def __init__(self, width: int = 3, depth: int = 2):
            super().__init__()
            self.save_hyperparameters()

    class Child(Base):
        def __init__(self, width: int = 3, depth: int = 2, dropout: float = 0.1):
            super().__init__(width, depth)
            self.save_hyperparameters(ignore=["depth"])

    child = Child()
    child.remove_ignored_hparams(["width"])
    return dict(child.hparams), dict(child.hparams_initial)


def test_save_hyperparameters_ignore_drops_what_a_base_class_saved(L):
    assert hparams_after_ignore(pl) == hparams_after_ignore(L) == ({"dropout": 0.1}, {"width": 3, "dropout": 0.1})


def test_hparams_initial_is_a_copy(L):
    for base in (pl, L):
        model = regression(base)(lr=0.5)
        model.hparams_initial["lr"] = 9.0
        model.hparams.lr = 0.25
        assert model.hparams_initial["lr"] == 0.5


def test_custom_checkpoint_hyper_params_keys_are_written_and_read(tmp_path, L):
    class Keyed(regression(pl)):
        CHECKPOINT_HYPER_PARAMS_KEY = "my_hparams"
        CHECKPOINT_HYPER_PARAMS_NAME = "my_hparams_name"

    trainer = pl.Trainer(**quiet(pl, max_steps=1))
    trainer.fit(Keyed(lr=0.3), data())
    path = str(tmp_path / "keyed.ckpt")
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["my_hparams"] == {"lr": 0.3} and ckpt["my_hparams_name"] == "kwargs"
    assert "hyper_parameters" not in ckpt
    assert Keyed.load_from_checkpoint(path).hparams.lr == 0.3


def test_load_from_checkpoint_refuses_an_instance_like_lightning(tmp_path, L):
    trainer = pl.Trainer(**quiet(pl, max_steps=1))
    model = regression(pl)()
    trainer.fit(model, data())
    path = str(tmp_path / "m.ckpt")
    trainer.save_checkpoint(path)
    with pytest.raises(TypeError, match=r"`Reg\.load_from_checkpoint` cannot be called on an instance"):
        model.load_from_checkpoint(path)
    with pytest.raises(TypeError, match=r"cannot be called on an instance"):
        regression(L)().load_from_checkpoint(path)


def test_hparams_file_replaces_the_checkpoint_hyper_parameters(tmp_path, L):
    trainer = pl.Trainer(**quiet(pl, max_steps=1))
    trainer.fit(regression(pl)(lr=0.1), data())
    path = str(tmp_path / "m.ckpt")
    trainer.save_checkpoint(path)
    (tmp_path / "hparams.yaml").write_text("lr: 0.7\n")
    (tmp_path / "hparams.csv").write_text("key,value\nlr,0.9\n")
    for base in (pl, L):
        cls = regression(base)
        assert cls.load_from_checkpoint(path, hparams_file=str(tmp_path / "hparams.yaml")).hparams.lr == 0.7
        assert cls.load_from_checkpoint(path, hparams_file=str(tmp_path / "hparams.csv")).hparams.lr == 0.9
    with pytest.raises(ValueError, match=r"use a \.yaml, \.yml or \.csv file"):
        regression(pl).load_from_checkpoint(path, hparams_file=str(tmp_path / "m.ckpt"))


# ------------------------------------------------------------------------------------------- strict_loading
def with_extra_buffer(base, strict_loading):
    class Extra(regression(base)):
        def __init__(self, lr: float = 0.1):
            super().__init__(lr)
            self.register_buffer("running", torch.zeros(2))
            if strict_loading is not None:
                self.strict_loading = strict_loading

    return Extra


def test_strict_loading_false_lets_fit_resume_from_a_checkpoint_with_missing_keys(tmp_path, L):
    trainer = pl.Trainer(**quiet(pl, max_steps=1))
    trainer.fit(regression(pl)(), data())
    path = str(tmp_path / "plain.ckpt")
    trainer.save_checkpoint(path)
    outcomes = {}
    for base in (pl, L):
        for strict_loading in (None, False):
            model = with_extra_buffer(base, strict_loading)()
            try:
                base.Trainer(**quiet(base, max_steps=2)).fit(model, data(), ckpt_path=path)
                outcomes[base.__name__, strict_loading] = "loaded"
            except RuntimeError as exc:
                assert "Missing key(s)" in str(exc)
                outcomes[base.__name__, strict_loading] = "refused"
    assert outcomes == {("raytrainer", None): "refused", ("raytrainer", False): "loaded",
                        ("pytorch_lightning", None): "refused", ("pytorch_lightning", False): "loaded"}


def test_load_from_checkpoint_calls_configure_model_before_loading_weights(tmp_path, L):
    trainer = pl.Trainer(**quiet(pl, max_steps=1))
    fitted = regression(pl)()
    trainer.fit(fitted, data())
    path = str(tmp_path / "m.ckpt")
    trainer.save_checkpoint(path)
    for base in (pl, L):
        class Lazy(regression(base)):
            def __init__(self, lr: float = 0.1):
                super().__init__(lr)
                del self.layer
                self.layer = None

            def configure_model(self):
                if self.layer is None:
                    self.layer = nn.Linear(4, 1)

        torch.testing.assert_close(Lazy.load_from_checkpoint(path).layer.weight, fitted.layer.weight)


def test_load_from_checkpoint_follows_strict_loading_and_refuses_a_conflict(tmp_path, L):
    trainer = pl.Trainer(**quiet(pl, max_steps=1))
    trainer.fit(regression(pl)(), data())
    path = str(tmp_path / "plain.ckpt")
    trainer.save_checkpoint(path)
    for base in (pl, L):
        assert with_extra_buffer(base, False).load_from_checkpoint(path).running.tolist() == [0.0, 0.0]
        with pytest.raises(RuntimeError, match="Missing key"):
            with_extra_buffer(base, None).load_from_checkpoint(path)
        with pytest.raises(ValueError, match=r"strict=True.*strict_loading=False"):
            with_extra_buffer(base, False).load_from_checkpoint(path, strict=True)


# ------------------------------------------------------------------------------------------- prepare_data
@pytest.mark.parametrize("per_node", [True, False])
def test_prepare_data_runs_where_lightning_runs_it(per_node):
    owner = type("Owner", (), {"prepare_data_per_node": per_node})()
    where = {(node, local) for node in range(2) for local in range(2) if prepares_data_here(owner, local, node)}
    assert where == ({(0, 0), (1, 0)} if per_node else {(0, 0)})


def test_prepare_data_is_called_once_in_process_for_module_and_datamodule(L):
    calls = []
    for base in (pl, L):
        class Prep(regression(base)):
            def __init__(self):
                super().__init__()
                self.prepare_data_per_node = False

            def prepare_data(self):
                calls.append(base.__name__)

        base.Trainer(**quiet(base, max_steps=1)).fit(Prep(), data())
    assert calls == ["raytrainer", "pytorch_lightning"]


# ------------------------------------------------------------------------------------------- torch.compile
def test_fit_a_compiled_module_trains_the_module_itself(L):
    result = {}
    for base in (pl, L):
        model = regression(base)()
        before = model.layer.weight.detach().clone()
        trainer = base.Trainer(**quiet(base, max_epochs=2))
        trainer.fit(torch.compile(model, backend="eager"), data(), data())
        ctx = model._compiler_ctx
        result[base.__name__] = (trainer.lightning_module is model, not torch.equal(before, model.layer.weight),
                                 ctx["compiler"], "training_step" in vars(model),
                                 "val_loss" in trainer.callback_metrics)
    assert result["raytrainer"] == result["pytorch_lightning"] == (True, True, "dynamo", True, True)


def test_a_compiled_module_pickles_for_ray_and_compiles_again():
    import cloudpickle  # what Ray sends a module to its ranks with

    model = from_compiled(torch.compile(regression(pl)(), backend="eager"))
    copy = cloudpickle.loads(cloudpickle.dumps(model))
    assert copy._compiler_ctx["compiler"] == "dynamo" and "forward" in vars(copy)
    x = torch.randn(3, 4)
    torch.testing.assert_close(copy(x), model(x))
    assert to_uncompiled(copy) is copy and "forward" not in vars(copy) and copy._compiler_ctx is None


def test_compiled_module_errors():
    with pytest.raises(ValueError, match=r"must be the result of torch\.compile"):
        from_compiled(regression(pl)())
    with pytest.raises(ValueError, match="not a compiled raytrainer LightningModule"):
        from_compiled(torch.compile(nn.Linear(2, 2), backend="eager"))
    with pytest.raises(ValueError, match="was not compiled"):
        to_uncompiled(regression(pl)())
    with pytest.raises(TypeError, match=r"a compiled Linear, not a compiled raytrainer LightningModule"):
        pl.Trainer(**quiet(pl)).fit(torch.compile(nn.Linear(4, 1), backend="eager"), data())
    with pytest.raises(TypeError, match=r"expects a raytrainer\.LightningModule, got Linear.*torch\.compile"):
        pl.Trainer(**quiet(pl)).fit(nn.Linear(4, 1), data())


@pytest.mark.slow
def test_fit_a_module_compiled_with_inductor():
    model = regression(pl)()
    before = model.layer.weight.detach().clone()
    pl.Trainer(**quiet(pl, max_epochs=1)).fit(torch.compile(model), data())
    assert not torch.equal(before, model.layer.weight)


# ------------------------------------------------------------------------------------------- ckpt_path, weights_only
def fitted_checkpoint(tmp_path, extra=None):
    model = regression(pl)()
    trainer = pl.Trainer(**quiet(pl, max_steps=1))
    trainer.fit(model, data())
    path = str(tmp_path / "fitted.ckpt")
    trainer.save_checkpoint(path)
    if extra is not None:  # as another tool would write it: plain torch.save, no manifest
        ckpt = torch.load(path, weights_only=True)
        ckpt["extra"] = extra
        path = str(tmp_path / "with_extra.ckpt")
        torch.save(ckpt, path)
    return model, path


class Opaque:
    """A pickled Python object inside a checkpoint: only weights_only=False loads it."""


def test_weights_only_is_passed_to_torch_load_in_every_entry_point(tmp_path, L):
    _, path = fitted_checkpoint(tmp_path, extra=Opaque())
    for base in (pl, L):
        trainer = base.Trainer(**quiet(base, max_steps=2))
        with pytest.raises(Exception, match=r"(?i)weights.only"):
            trainer.validate(regression(base)(), data(), ckpt_path=path, weights_only=True, verbose=False)
        trainer.validate(regression(base)(), data(), ckpt_path=path, weights_only=False, verbose=False)
        trainer.test(regression(base)(), data(), ckpt_path=path, weights_only=False, verbose=False)
        inputs = DataLoader(data().dataset.tensors[0], batch_size=4)
        assert len(trainer.predict(regression(base)(), inputs, ckpt_path=path, weights_only=False)) == 2
        trainer.fit(regression(base)(), data(), ckpt_path=path, weights_only=False)
        assert trainer.global_step == 2


def test_ckpt_path_is_the_checkpoint_the_last_call_loaded(tmp_path, L):
    fitted, path = fitted_checkpoint(tmp_path)
    seen = {}
    for base in (pl, L):
        trainer = base.Trainer(**quiet(base, max_steps=1))
        trace = [trainer.ckpt_path]
        trainer.validate(regression(base)(), data(), ckpt_path=path, verbose=False)
        trace.append(trainer.ckpt_path)
        trainer.validate(regression(base)(), data(), verbose=False)
        trace.append(trainer.ckpt_path)
        seen[base.__name__] = trace
    assert seen["raytrainer"] == seen["pytorch_lightning"] == [None, path, None]


def test_ckpt_path_set_by_the_user_is_loaded_until_a_call_passes_one(tmp_path, L):
    fitted, path = fitted_checkpoint(tmp_path)
    for base in (pl, L):
        trainer = base.Trainer(**quiet(base))
        trainer.ckpt_path = path
        model = regression(base)()
        trainer.validate(model, data(), verbose=False)
        torch.testing.assert_close(model.layer.weight, fitted.layer.weight)
        assert trainer.ckpt_path == path
        with pytest.warns(UserWarning, match="(?i)the latter"):
            trainer.validate(regression(base)(), data(), ckpt_path=path, verbose=False)
        fresh = regression(base)()
        weight = fresh.layer.weight.detach().clone()
        trainer.validate(fresh, data(), verbose=False)  # no longer user-managed: nothing loads
        torch.testing.assert_close(fresh.layer.weight, weight)


def test_ckpt_path_last_resolves_to_the_file(tmp_path):
    trainer = pl.Trainer(**quiet(pl, max_epochs=1, enable_checkpointing=True, default_root_dir=str(tmp_path)))
    trainer.fit(regression(pl)(), data())
    trainer = pl.Trainer(**quiet(pl, max_epochs=2, enable_checkpointing=True, default_root_dir=str(tmp_path)))
    trainer.fit(regression(pl)(), data(), ckpt_path="last")
    assert trainer.ckpt_path is not None and trainer.ckpt_path.endswith(".ckpt")
    with pytest.raises(TypeError, match=r"ckpt_path=\.\.\.\) takes a path"):
        trainer.fit(regression(pl)(), data(), ckpt_path=3)
