"""Hooks run in Lightning's order: the calls of a module and a callback, recorded under both frameworks."""
from __future__ import annotations

import difflib

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as pl

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")

MODULE_HOOKS = [
    "setup", "teardown", "prepare_data", "configure_callbacks",
    "on_fit_start", "on_fit_end", "on_train_start", "on_train_end",
    "on_train_epoch_start", "on_train_epoch_end", "on_train_batch_start", "on_train_batch_end",
    "on_validation_start", "on_validation_end", "on_validation_epoch_start", "on_validation_epoch_end",
    "on_validation_batch_start", "on_validation_batch_end", "on_validation_model_eval", "on_validation_model_train",
    "on_test_start", "on_test_end", "on_test_epoch_start", "on_test_epoch_end", "on_test_batch_start",
    "on_test_batch_end", "on_test_model_eval", "on_test_model_train",
    "on_predict_start", "on_predict_end", "on_predict_epoch_start", "on_predict_epoch_end",
    "on_predict_batch_start", "on_predict_batch_end", "on_predict_model_eval",
    "on_before_backward", "on_after_backward", "on_before_optimizer_step", "on_before_zero_grad",
    "configure_gradient_clipping", "optimizer_zero_grad", "backward", "optimizer_step", "lr_scheduler_step",
]
CALLBACK_HOOKS = [
    "setup", "teardown", "on_fit_start", "on_fit_end", "on_sanity_check_start", "on_sanity_check_end",
    "on_train_start", "on_train_end", "on_train_epoch_start", "on_train_epoch_end", "on_train_batch_start",
    "on_train_batch_end", "on_validation_start", "on_validation_end", "on_validation_epoch_start",
    "on_validation_epoch_end", "on_validation_batch_start", "on_validation_batch_end", "on_test_start",
    "on_test_end", "on_test_epoch_start", "on_test_epoch_end", "on_test_batch_start", "on_test_batch_end",
    "on_predict_start", "on_predict_end", "on_predict_epoch_start", "on_predict_epoch_end",
    "on_predict_batch_start", "on_predict_batch_end", "on_before_backward", "on_after_backward",
    "on_before_optimizer_step", "on_before_zero_grad",
]


def describe(value) -> str:
    """A framework-neutral summary of a hook argument."""
    if isinstance(value, torch.Tensor):
        return f"T{tuple(value.shape)}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(describe(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{describe(v)}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, torch.optim.Optimizer) or hasattr(value, "param_groups"):
        return "optimizer"
    if isinstance(value, (int, float, str)) or value is None:
        return repr(getattr(value, "value", value))
    if callable(value) and not isinstance(value, nn.Module):
        return "closure"
    return type(value).__name__


def recorder(base, calls: list[str], with_args: bool = True, scheduler: bool = False):
    """A module and a callback on ``base`` whose every hook appends to ``calls``."""

    def record(prefix, name, args):
        calls.append(f"{prefix}{name}" + (f"({','.join(describe(a) for a in args)})" if with_args else ""))

    class Rec(base.Callback):
        pass

    def cb_hook(name):
        def hook(self, trainer, pl_module, *args, **kwargs):
            record("cb.", name, args + tuple(kwargs.values()))
        return hook

    for name in CALLBACK_HOOKS:
        setattr(Rec, name, cb_hook(name))

    class Model(base.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            record("", "training_step", (batch, batch_idx))
            return self.layer(batch[0]).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            record("", "validation_step", (batch, batch_idx))

        def test_step(self, batch, batch_idx):
            record("", "test_step", (batch, batch_idx))

        def predict_step(self, batch, batch_idx):
            record("", "predict_step", (batch, batch_idx))
            return self.layer(batch[0])

        def configure_optimizers(self):
            record("", "configure_optimizers", ())
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            if scheduler:
                return {"optimizer": opt, "lr_scheduler": {
                    "scheduler": torch.optim.lr_scheduler.StepLR(opt, 1), "interval": "step"}}
            return opt

    def module_hook(name):
        parent = getattr(base.LightningModule, name)

        def hook(self, *args, **kwargs):
            record("", name, args + tuple(kwargs.values()))
            return parent(self, *args, **kwargs)
        return hook

    for name in MODULE_HOOKS:
        setattr(Model, name, module_hook(name))
    return Model, Rec


def data(n: int = 6, batch_size: int = 2) -> DataLoader:
    x = torch.arange(n * 4, dtype=torch.float32).reshape(n, 4) / 10
    return DataLoader(TensorDataset(x), batch_size=batch_size)


def record_run(base, fn: str, trainer_kwargs=None, with_args=True, scheduler=False) -> list[str]:
    calls: list[str] = []
    Model, Rec = recorder(base, calls, with_args, scheduler)
    kwargs = dict(max_epochs=1, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=1,
                  callbacks=[Rec()], enable_progress_bar=False, enable_model_summary=False, logger=False,
                  enable_checkpointing=False)
    kwargs.update(trainer_kwargs or {})
    trainer = base.Trainer(**kwargs)
    model = Model()
    if fn == "fit":
        trainer.fit(model, data(), data())
    elif fn == "validate":
        trainer.validate(model, data(), verbose=False)
    elif fn == "test":
        trainer.test(model, data(), verbose=False)
    else:
        trainer.predict(model, data())
    return calls


def assert_same_calls(lightning: list[str], ours: list[str]) -> None:
    if ours != lightning:
        diff = "\n".join(difflib.unified_diff(lightning, ours, "lightning", "raytrainer", lineterm="", n=2))
        pytest.fail(f"hook calls differ from Lightning:\n{diff}")


@pytest.mark.parametrize("fn", ["fit", "validate", "test", "predict"])
def test_hook_order_and_arguments_match_lightning(L, fn):
    assert_same_calls(record_run(L, fn), record_run(pl, fn))


@pytest.mark.parametrize("kwargs", [
    dict(max_epochs=2, limit_train_batches=3, accumulate_grad_batches=2),
    dict(max_epochs=1, limit_train_batches=2, gradient_clip_val=0.5),
    dict(max_epochs=2, limit_train_batches=4, val_check_interval=2, num_sanity_val_steps=0),
    dict(max_epochs=1, limit_train_batches=2, limit_val_batches=0),
], ids=["accumulate", "clip", "val_check_interval", "no_validation"])
def test_hook_order_in_fit_variants_matches_lightning(L, kwargs):
    assert_same_calls(record_run(L, "fit", kwargs, with_args=False),
                      record_run(pl, "fit", kwargs, with_args=False))


def test_lr_scheduler_step_hook_is_called_like_lightning(L):
    kwargs = dict(max_epochs=1, limit_train_batches=2)
    lightning = record_run(L, "fit", kwargs, with_args=False, scheduler=True)
    assert "lr_scheduler_step" in lightning
    assert_same_calls(lightning, record_run(pl, "fit", kwargs, with_args=False, scheduler=True))


def test_returning_minus_one_from_on_train_batch_start_skips_the_rest_of_the_epoch(L):
    seen = {}
    for base in (L, pl):
        steps = []

        class Skip(base.LightningModule):
            def __init__(self):
                super().__init__()
                self.layer = nn.Linear(4, 1)

            def on_train_batch_start(self, batch, batch_idx):
                return -1 if batch_idx == 1 else None

            def training_step(self, batch, batch_idx):
                steps.append((self.current_epoch, batch_idx))
                return self.layer(batch[0]).sum()

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        trainer = base.Trainer(max_epochs=2, enable_progress_bar=False, enable_model_summary=False, logger=False,
                               enable_checkpointing=False)
        trainer.fit(Skip(), data())
        seen[base.__name__] = (steps, trainer.global_step, trainer.current_epoch)
    assert seen["raytrainer"] == seen["pytorch_lightning"]


def test_configure_callbacks_adds_and_replaces_callbacks():
    order = []

    class Tag(pl.Callback):
        def __init__(self, tag):
            self.tag = tag

        def on_fit_start(self, trainer, pl_module):
            order.append(self.tag)

    class Other(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            order.append("other")

    Model, _ = recorder(pl, [])

    class WithCallbacks(Model):
        def configure_callbacks(self):
            return [Tag("from_module")]

    trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, callbacks=[Tag("from_trainer"), Other()],
                         enable_progress_bar=False, enable_model_summary=False, logger=False,
                         enable_checkpointing=False)
    trainer.fit(WithCallbacks(), data())
    assert order == ["other", "from_module"]


def test_on_exception_reaches_callbacks_and_teardown_still_runs():
    events = []

    class Watch(pl.Callback):
        def on_exception(self, trainer, pl_module, exception):
            events.append(("exception", type(exception).__name__))

        def teardown(self, trainer, pl_module, stage):
            events.append(("teardown", stage))

    class Boom(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            raise KeyError("user bug")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(KeyError, match="user bug"):
        pl.Trainer(max_epochs=1, callbacks=[Watch()], enable_progress_bar=False, enable_model_summary=False,
                   logger=False, enable_checkpointing=False).fit(Boom(), data())
    assert events == [("exception", "KeyError"), ("teardown", "fit")]


def test_callback_state_key_and_type_check():
    assert pl.Callback().state_key == "Callback"
    with pytest.raises(TypeError, match=r"callbacks must be raytrainer\.callbacks\.Callback instances; got int"):
        pl.Trainer(callbacks=[3])
