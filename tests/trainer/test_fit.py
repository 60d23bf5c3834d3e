"""Fit, validate, test and predict on one CPU, checked against pytorch_lightning 2.x and plain torch."""
from __future__ import annotations

import copy
import os
import re
import time

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as pl

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")


def quiet(**kwargs):
    """Trainer arguments for a fast, silent run (no bar, summary, logger or checkpoints)."""
    base = dict(enable_progress_bar=False, enable_model_summary=False, logger=False, enable_checkpointing=False)
    base.update(kwargs)
    return base


def data(n: int = 10, batch_size: int = 2, seed: int = 0, dim: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = x.sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def regression_module(base, events=None, returns="tensor", skip=(), lr=0.1):
    """A linear regression LightningModule on ``base`` (raytrainer or Lightning), recording what runs."""
    events = events if events is not None else []

    class Reg(base.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            events.append(f"t{self.current_epoch}.{batch_idx}")
            if batch_idx in skip:
                return None
            x, y = batch
            loss = nn.functional.mse_loss(self.layer(x), y)
            if returns == "dict":
                return {"loss": loss, "extra": torch.tensor(float(batch_idx))}
            return loss

        def validation_step(self, batch, batch_idx):
            events.append(f"v{self.current_epoch}.{batch_idx}" + ("s" if self.trainer.sanity_checking else ""))
            x, y = batch
            self.log("val_loss", nn.functional.mse_loss(self.layer(x), y))

        def test_step(self, batch, batch_idx):
            x, y = batch
            self.log("test_loss", nn.functional.mse_loss(self.layer(x), y))

        def predict_step(self, batch, batch_idx, dataloader_idx=0):
            return self.layer(batch[0])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=lr)

    torch.manual_seed(0)
    return Reg()


def fit_both(L, trainer_kwargs, n=10, batch_size=2, val=True, **module_kwargs):
    """Fit the same module under Lightning and raytrainer; return (events, global_step, epoch, params) each."""
    out = []
    for base in (L, pl):
        events: list[str] = []
        model = regression_module(base, events, **module_kwargs)
        trainer = base.Trainer(**quiet(**trainer_kwargs))
        trainer.fit(model, data(n, batch_size), data(n, batch_size, seed=1) if val else None)
        out.append((" ".join(events), trainer.global_step, trainer.current_epoch,
                    [p.detach().clone() for p in model.parameters()]))
    return out


def assert_same_run(lightning, ours, epochs=True):
    assert ours[0] == lightning[0], "batches and validation ran in a different order"
    assert ours[1] == lightning[1], "global_step differs"
    if epochs:
        assert ours[2] == lightning[2], "current_epoch differs"
    for a, b in zip(lightning[3], ours[3]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- loop control vs Lightning
@pytest.mark.parametrize("kwargs", [
    dict(max_epochs=2),
    dict(max_epochs=2, limit_train_batches=3, limit_val_batches=1),
    dict(max_epochs=2, limit_train_batches=0.5, limit_val_batches=0.4),
    dict(max_epochs=1, limit_val_batches=0),
    dict(max_epochs=1, limit_train_batches=0),
    dict(max_epochs=2, val_check_interval=0.5, limit_val_batches=1),
    dict(max_epochs=1, val_check_interval=0.25, limit_val_batches=1, limit_train_batches=4),
    dict(max_epochs=2, val_check_interval=2, limit_val_batches=1),
    dict(max_epochs=2, val_check_interval=3, check_val_every_n_epoch=None, limit_val_batches=1),
    dict(max_epochs=3, check_val_every_n_epoch=2, limit_val_batches=1),
    dict(max_epochs=1, num_sanity_val_steps=0),
    dict(max_epochs=1, num_sanity_val_steps=-1, limit_val_batches=3),
    dict(max_epochs=1, num_sanity_val_steps=4),
    dict(fast_dev_run=True),
    dict(fast_dev_run=3),
    dict(max_epochs=2, accumulate_grad_batches=2),
    dict(max_epochs=-1, max_steps=10),
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_loop_control_matches_lightning(L, kwargs):
    lightning, ours = fit_both(L, kwargs)
    assert_same_run(lightning, ours)


@pytest.mark.parametrize("kwargs", [dict(max_steps=3, max_epochs=5), dict(max_steps=7, max_epochs=5),
                                    dict(max_steps=3, accumulate_grad_batches=2, max_epochs=5)])
def test_max_steps_stops_at_the_same_batch_as_lightning(L, kwargs):
    lightning, ours = fit_both(L, kwargs)
    assert ours[1] == kwargs["max_steps"]
    assert_same_run(lightning, ours, epochs=False)


@pytest.mark.xfail(strict=True, reason="known divergence: Lightning counts an epoch cut short by max_steps as "
                                       "finished (current_epoch + 1, on_train_epoch_end runs); raytrainer keeps "
                                       "current_epoch at the unfinished epoch so that last.ckpt resumes mid-epoch")
def test_current_epoch_after_max_steps_mid_epoch_matches_lightning(L):
    lightning, ours = fit_both(L, dict(max_steps=3, max_epochs=5))
    assert ours[2] == lightning[2]


def test_min_epochs_overrides_an_early_stop_request(L):
    results = []
    for base in (L, pl):
        class StopNow(base.Callback):
            def on_train_epoch_end(self, trainer, pl_module):
                trainer.should_stop = True

        events: list[str] = []
        model = regression_module(base, events)
        trainer = base.Trainer(**quiet(max_epochs=10, min_epochs=3, callbacks=[StopNow()], limit_val_batches=1))
        trainer.fit(model, data(4), data(4))
        results.append((" ".join(events), trainer.global_step, trainer.current_epoch))
    assert results[1] == results[0]
    assert results[1][2] == 3


def test_should_stop_in_a_batch_ends_training(L):
    results = []
    for base in (L, pl):
        class StopAtBatch(base.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if trainer.global_step == 7:
                    trainer.should_stop = True

        events: list[str] = []
        trainer = base.Trainer(**quiet(max_epochs=10, callbacks=[StopAtBatch()], limit_val_batches=1))
        trainer.fit(regression_module(base, events), data(10), data(4))
        results.append((" ".join(events), trainer.global_step))
    assert results[1] == results[0]


def test_max_time_stops_a_long_run():
    class Slow(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            time.sleep(0.05)
            return self.layer(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    trainer = pl.Trainer(**quiet(max_epochs=1000, max_time={"seconds": 0.6}))
    start = time.monotonic()
    trainer.fit(Slow(), data(40))
    elapsed = time.monotonic() - start
    assert elapsed < 5.0
    assert 3 <= trainer.global_step <= 40


@pytest.mark.parametrize("max_time", ["00:00:00:01", {"seconds": 1}])
def test_max_time_forms_are_accepted(max_time):
    assert pl.Trainer(**quiet(max_time=max_time)).config.max_time_s == 1.0


def test_max_time_bad_string():
    with pytest.raises(ValueError, match=r"max_time='1h': use 'DD:HH:MM:SS'"):
        pl.Trainer(max_time="1h")


# --------------------------------------------------------------------------- what training_step returns
@pytest.mark.parametrize("returns", ["tensor", "dict"])
def test_training_step_return_forms_train_like_lightning(L, returns):
    lightning, ours = fit_both(L, dict(max_epochs=2), returns=returns)
    assert_same_run(lightning, ours)


def test_returning_none_skips_the_update_like_lightning(L):
    lightning, ours = fit_both(L, dict(max_epochs=2), skip=(1, 3))
    assert_same_run(lightning, ours)
    assert ours[1] == 10  # Lightning still counts the (empty) optimizer step of a skipped batch


def test_returning_none_inside_an_accumulation_window(L):
    lightning, ours = fit_both(L, dict(max_epochs=2, accumulate_grad_batches=2), skip=(0, 3))
    assert_same_run(lightning, ours)


def test_outputs_reach_on_train_batch_end(L):
    seen = {}
    for base in (L, pl):
        got = []

        class Grab(base.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                got.append({k: (float(v), v.requires_grad) for k, v in outputs.items()})

        trainer = base.Trainer(**quiet(max_epochs=1, callbacks=[Grab()]))
        trainer.fit(regression_module(base, returns="dict", skip=(2,)), data(8))
        seen[base.__name__] = got
    ours, lightning = seen["raytrainer"], seen["pytorch_lightning"]
    assert ours == lightning
    assert ours[2] == {} and set(ours[0]) == {"loss", "extra"} and ours[0]["loss"][1] is False


# --------------------------------------------------------------------------- numerics vs plain torch
def plain_sgd(model, batches, lr, steps_per_update=1, clip=None):
    """Reference loop: mean loss over each group of batches, one SGD step per group."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    group = []
    for i, (x, y) in enumerate(batches):
        group.append((x, y))
        if len(group) == steps_per_update or i == len(batches) - 1:
            opt.zero_grad()
            for gx, gy in group:
                (nn.functional.mse_loss(model(gx), gy) / steps_per_update).backward()
            if clip == "norm":
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            elif clip == "value":
                torch.nn.utils.clip_grad_value_(model.parameters(), 0.01)
            opt.step()
            group = []


def test_gradient_accumulation_equals_a_bigger_batch():
    model = regression_module(pl, lr=0.05)
    reference = copy.deepcopy(model.layer)
    trainer = pl.Trainer(**quiet(max_epochs=3, accumulate_grad_batches=4))
    trainer.fit(model, data(16, batch_size=2))
    assert trainer.global_step == 3 * 2
    big_batches = list(data(16, batch_size=8))
    for _ in range(3):
        plain_sgd(reference, big_batches, lr=0.05)
    for a, b in zip(model.layer.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_matches_plain_torch(algorithm):
    model = regression_module(pl, lr=0.5)
    reference = copy.deepcopy(model.layer)
    val = 0.05 if algorithm == "norm" else 0.01
    trainer = pl.Trainer(**quiet(max_epochs=2, gradient_clip_val=val, gradient_clip_algorithm=algorithm))
    trainer.fit(model, data(8))
    batches = list(data(8))
    for _ in range(2):
        plain_sgd(reference, batches, lr=0.5, clip=algorithm)
    for a, b in zip(model.layer.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    unclipped = regression_module(pl, lr=0.5)
    pl.Trainer(**quiet(max_epochs=2)).fit(unclipped, data(8))
    assert not torch.allclose(unclipped.layer.weight, model.layer.weight)  # clipping changed the result


def test_gradient_clipping_with_accumulation_matches_lightning(L):
    lightning, ours = fit_both(L, dict(max_epochs=2, accumulate_grad_batches=3, gradient_clip_val=0.1), n=14)
    assert_same_run(lightning, ours)


# --------------------------------------------------------------------------- determinism and precision
def shuffled_run(seed: int) -> list[torch.Tensor]:
    pl.seed_everything(seed, workers=True)

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.2), nn.ReLU(), nn.Linear(16, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    model = Net()
    x = torch.randn(32, 4)
    loader = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4, shuffle=True)
    pl.Trainer(**quiet(max_epochs=2, deterministic=True)).fit(model, loader)
    return [p.detach().clone() for p in model.parameters()]


def test_seed_everything_and_deterministic_give_bitwise_identical_parameters():
    first, second, other = shuffled_run(7), shuffled_run(7), shuffled_run(8)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    torch.use_deterministic_algorithms(False)


def test_seed_everything_returns_and_records_the_seed(monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    assert pl.seed_everything(123, workers=True) == 123
    assert os.environ["PL_GLOBAL_SEED"] == "123" and os.environ["PL_SEED_WORKERS"] == "1"
    a = torch.rand(3)
    pl.seed_everything(123)
    assert torch.equal(a, torch.rand(3))
    with pytest.raises(ValueError, match="must fit in 32 bits"):
        pl.seed_everything(2**40)


def test_bf16_mixed_trains_on_cpu_under_autocast():
    seen = {}

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            out = self.layer(x)
            seen.setdefault("dtype", out.dtype)
            seen.setdefault("autocast", torch.is_autocast_enabled("cpu"))
            loss = nn.functional.mse_loss(out.float(), y)
            self.log("loss", loss, on_epoch=True, on_step=False)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    torch.manual_seed(0)
    model = Net()
    losses = []

    class Track(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            losses.append(float(trainer.callback_metrics["loss"]))

    trainer = pl.Trainer(**quiet(max_epochs=4, precision="bf16-mixed", accelerator="cpu", callbacks=[Track()]))
    trainer.fit(model, data(32, batch_size=8))
    assert seen == {"dtype": torch.bfloat16, "autocast": True}
    assert model.layer.weight.dtype == torch.float32
    assert losses[-1] < 0.5 * losses[0]
    assert not torch.is_autocast_enabled("cpu")


# --------------------------------------------------------------------------- progress bar, summary, devices
def test_progress_bar_shows_epoch_and_prog_bar_metrics(capsys):
    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            loss = self.layer(batch[0]).pow(2).mean()
            self.log("my_loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_model_summary=False).fit(
        Net(), data(8))
    err = capsys.readouterr().err
    assert "Epoch 0" in err and "Epoch 1" in err
    assert "it/s" in err or "s/it" in err
    pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
               enable_progress_bar=False).fit(Net(), data(8))
    assert "Epoch" not in capsys.readouterr().err


def test_progress_bar_metrics_reach_the_bar():
    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            time.sleep(0.12)  # let tqdm redraw (it refreshes at most every 0.1 s)
            loss = self.layer(batch[0]).pow(2).mean()
            self.log("my_loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    postfixes = []

    class Spy(pl.TQDMProgressBar):
        def advance(self, n, metrics):
            super().advance(n, metrics)
            if self._bar is not None:
                postfixes.append(self._bar.postfix)

    pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
               callbacks=[Spy()]).fit(Net(), data(6))
    assert any(p and "my_loss=" in p for p in postfixes)


def test_model_summary_printed_at_fit_start(capsys):
    model = regression_module(pl)
    pl.Trainer(**quiet(max_epochs=1, enable_model_summary=True)).fit(model, data(4))
    out = capsys.readouterr().out
    assert re.search(r"0\s*\| layer\s*\| Linear\s*\| 5\b", out)
    assert "5 Trainable params" in out and "5 Total params" in out
    pl.Trainer(**quiet(max_epochs=1)).fit(regression_module(pl), data(4))
    assert "Total params" not in capsys.readouterr().out


def test_device_attributes_during_and_after_fit():
    seen = {}

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.update(device=pl_module.device, root=trainer.strategy.root_device, module=trainer.lightning_module,
                        trainer=pl_module.trainer, step=pl_module.global_step, training=trainer.training,
                        batch_device=batch[0].device)

    model = regression_module(pl)
    trainer = pl.Trainer(**quiet(max_epochs=1, accelerator="cpu", devices=1, callbacks=[Probe()]))
    trainer.fit(model, data(4))
    assert seen["device"] == torch.device("cpu") == seen["root"] == seen["batch_device"]
    assert seen["module"] is model and seen["trainer"] is trainer and seen["training"] is True
    assert (trainer.world_size, trainer.global_rank, trainer.is_global_zero) == (1, 0, True)
    assert trainer.num_training_batches == 2
    assert (model.global_step, model.current_epoch) == (trainer.global_step, trainer.current_epoch) == (2, 1)


def test_submodule_modes_are_kept_like_lightning(L):
    """A frozen submodule left in eval() stays in eval through fit and validation, as in Lightning 2.x."""
    modes = {}
    for base in (L, pl):
        seen = []

        class Frozen(base.LightningModule):
            def __init__(self):
                super().__init__()
                self.backbone = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
                self.head = nn.Linear(4, 1)
                self.backbone.eval()

            def training_step(self, batch, batch_idx):
                seen.append(("train", self.training, self.backbone.training, self.head.training))
                return self.head(self.backbone(batch[0])).pow(2).mean()

            def validation_step(self, batch, batch_idx):
                seen.append(("val", self.training, self.backbone.training, self.head.training))

            def configure_optimizers(self):
                return torch.optim.SGD(self.head.parameters(), lr=0.01)

        model = Frozen()
        trainer = base.Trainer(**quiet(max_epochs=2, limit_val_batches=1, num_sanity_val_steps=1))
        trainer.fit(model, data(4), data(4))
        trainer.validate(model, data(4), verbose=False)
        modes[base.__name__] = (seen, model.training, model.backbone.training, model.head.training)
    assert modes["raytrainer"] == modes["pytorch_lightning"]


# --------------------------------------------------------------------------- validate / test / predict
def eval_module(base):
    class Eval(base.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 1)

        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            x, y = batch
            self.log("val_loss", nn.functional.mse_loss(self.layer(x), y))
            self.log("val_sum", x.sum(), reduce_fx="sum")

        def test_step(self, batch, batch_idx, dataloader_idx=0):
            x, y = batch
            self.log("test_loss", nn.functional.mse_loss(self.layer(x), y), prog_bar=True)
            self.log("test_acc", (self.layer(x) > y).float().mean(), on_step=True)

        def predict_step(self, batch, batch_idx, dataloader_idx=0):
            return self.layer(batch[0])

    torch.manual_seed(0)
    return Eval()


def rounded(outputs):
    return [{k: round(float(v), 5) for k, v in d.items()} for d in outputs]


@pytest.mark.parametrize("fn", ["validate", "test"])
@pytest.mark.parametrize("n_loaders", [1, 2])
def test_validate_and_test_return_what_lightning_returns(L, fn, n_loaders):
    outs = []
    for base in (L, pl):
        trainer = base.Trainer(**quiet())
        loaders = [data(10, 3, seed=s) for s in range(n_loaders)]
        out = getattr(trainer, fn)(eval_module(base), loaders if n_loaders > 1 else loaders[0], verbose=False)
        outs.append(rounded(out))
    assert outs[1] == outs[0]
    assert len(outs[1]) == n_loaders


def test_validate_prints_a_table_when_verbose(capsys):
    pl.Trainer(**quiet()).validate(eval_module(pl), data(6))
    out = capsys.readouterr().out
    assert "val_loss" in out and "Validate metric" in out


def test_predict_returns_outputs_in_dataset_order(L):
    for base in (L, pl):
        model = eval_module(base)
        loader = data(7, 3)
        preds = base.Trainer(**quiet()).predict(model, loader)
        assert len(preds) == 3 and [p.shape[0] for p in preds] == [3, 3, 1]
        torch.testing.assert_close(torch.cat(preds), model.layer(torch.cat([b[0] for b in loader])).detach())
    two = pl.Trainer(**quiet()).predict(eval_module(pl), [data(4, 2), data(6, 3)])
    assert [len(p) for p in two] == [2, 2]
    assert pl.Trainer(**quiet()).predict(eval_module(pl), data(4), return_predictions=False) is None


def test_predict_runs_without_grad_and_restores_train_mode():
    seen = []

    class P(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 1)

        def predict_step(self, batch, batch_idx):
            seen.append((torch.is_inference_mode_enabled(), self.training))
            return self.layer(batch[0])

    model = P()
    out = pl.Trainer(**quiet()).predict(model, data(4))
    assert seen == [(True, False), (True, False)]
    assert model.training and not out[0].requires_grad


def test_default_predict_step_calls_forward():
    class F(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 2)

        def forward(self, x):
            return self.layer(x) * 2

    model = F()
    x = torch.randn(3, 4)
    (out,) = pl.Trainer(**quiet()).predict(model, DataLoader(x, batch_size=3))
    torch.testing.assert_close(out, model(x).detach())


def test_validate_then_test_after_fit_reuses_the_fitted_model():
    model = regression_module(pl)
    trainer = pl.Trainer(**quiet(max_epochs=3))
    trainer.fit(model, data(8), data(8, seed=1))
    val = trainer.validate(dataloaders=data(8, seed=1), verbose=False)
    x, y = next(iter(data(8, batch_size=8, seed=1)))
    expected = float(nn.functional.mse_loss(model.layer(x), y))
    assert val[0]["val_loss"] == pytest.approx(expected, rel=1e-5)
    test = trainer.test(dataloaders=data(8, seed=1), verbose=False)
    assert test[0]["test_loss"] == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------- LightningDataModule
def datamodule_calls(base):
    calls: list[str] = []

    class DM(base.LightningDataModule):
        def __init__(self, batch_size: int = 2):
            super().__init__()
            self.save_hyperparameters()

        def prepare_data(self):
            calls.append("prepare_data")

        def setup(self, stage):
            calls.append(f"setup:{getattr(stage, 'value', stage)}")
            self.ds = data(8, self.hparams.batch_size).dataset

        def teardown(self, stage):
            calls.append(f"teardown:{getattr(stage, 'value', stage)}")

        def train_dataloader(self):
            calls.append("train_dataloader")
            return DataLoader(self.ds, batch_size=self.hparams.batch_size)

        def val_dataloader(self):
            calls.append("val_dataloader")
            return DataLoader(self.ds, batch_size=4)

        def test_dataloader(self):
            calls.append("test_dataloader")
            return DataLoader(self.ds, batch_size=4)

        def predict_dataloader(self):
            calls.append("predict_dataloader")
            return DataLoader(self.ds, batch_size=4)

    return calls, DM


def test_datamodule_hooks_and_stages_match_lightning(L):
    seen = {}
    for base in (L, pl):
        calls, DM = datamodule_calls(base)
        dm = DM(batch_size=4)
        model = regression_module(base)
        trainer = base.Trainer(**quiet(max_epochs=1, num_sanity_val_steps=0))
        trainer.fit(model, datamodule=dm)
        calls.append("|")
        trainer.validate(model, datamodule=dm, verbose=False)
        calls.append("|")
        trainer.test(model, datamodule=dm, verbose=False)
        calls.append("|")
        trainer.predict(model, datamodule=dm)
        seen[base.__name__] = calls
        assert dm.hparams == {"batch_size": 4}
        assert trainer.datamodule is dm
        assert trainer.global_step == 2
    assert seen["raytrainer"] == seen["pytorch_lightning"]


def test_datamodule_passed_positionally_to_fit():
    calls, DM = datamodule_calls(pl)
    trainer = pl.Trainer(**quiet(max_epochs=1))
    trainer.fit(regression_module(pl), DM())
    assert "setup:fit" in calls and trainer.global_step == 4


def test_dataloaders_defined_on_the_module():
    class WithData(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 1)

        def train_dataloader(self):
            return data(6)

        def training_step(self, batch, batch_idx):
            return nn.functional.mse_loss(self.layer(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(**quiet(max_epochs=2))
    trainer.fit(WithData())
    assert trainer.global_step == 6


def test_min_epochs_keeps_an_epoch_going_after_a_mid_epoch_stop_request(L):
    results = []
    for base in (L, pl):
        class StopEarly(base.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if batch_idx == 1:
                    trainer.should_stop = True

        events: list[str] = []
        trainer = base.Trainer(**quiet(max_epochs=10, min_epochs=2, callbacks=[StopEarly()], limit_val_batches=1))
        trainer.fit(regression_module(base, events), data(8), data(4))
        results.append((" ".join(events), trainer.global_step))
    assert results[1] == results[0]


@pytest.mark.parametrize("limit", [1, 2, 0.5])
def test_limit_test_and_predict_batches_match_lightning(L, limit):
    outs = []
    for base in (L, pl):
        trainer = base.Trainer(**quiet(limit_test_batches=limit, limit_predict_batches=limit))
        model = eval_module(base)
        test = rounded(trainer.test(model, data(12, 3), verbose=False))
        preds = trainer.predict(model, data(12, 3))
        outs.append((test, len(preds)))
    assert outs[1] == outs[0]
