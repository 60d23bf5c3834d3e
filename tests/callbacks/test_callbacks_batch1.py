"""Timer, LambdaCallback, GradientAccumulationScheduler, Base/BackboneFinetuning, OnExceptionCheckpoint,
BasePredictionWriter and the Checkpoint/ProgressBar base classes, in process; Lightning is the oracle where it can
run the same snippet."""
from __future__ import annotations

import json
import os
from datetime import timedelta

import pytest
import torch
from batch1_models import Backbone, BackboneMixin, Indexed, Reg, RegMixin, ShardWriter, WriterMixin, loader
from torch.utils.data import DataLoader

import raytrainer as rt
from raytrainer.callbacks import (
    BackboneFinetuning,
    BaseFinetuning,
    BasePredictionWriter,
    Checkpoint,
    GradientAccumulationScheduler,
    LambdaCallback,
    ModelCheckpoint,
    OnExceptionCheckpoint,
    ProgressBar,
    Timer,
    TQDMProgressBar,
)
from raytrainer.utilities.exceptions import MisconfigurationException


def _kw(root, **kw):
    base = dict(enable_progress_bar=False, enable_model_summary=False, logger=False, enable_checkpointing=False,
                deterministic=True, default_root_dir=str(root))
    base.update(kw)
    return base


def _lkw(root, **kw):
    return {**_kw(root, **kw), "accelerator": "cpu", "devices": 1}


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _lit(L, mixin):
    return type(f"Lit{mixin.__name__}", (mixin, L.LightningModule), {})


# ---------------------------------------------------------------------------------------------- Timer
def test_timer_arguments_and_queries():
    assert Timer("01:02:03:04")._duration == timedelta(days=1, hours=2, minutes=3, seconds=4).total_seconds()
    assert Timer({"minutes": 2})._duration == 120 and Timer(timedelta(seconds=5))._duration == 5
    with pytest.raises(MisconfigurationException, match="DD:HH:MM:SS"):
        Timer("1 hour")
    with pytest.raises(MisconfigurationException, match="interval"):
        Timer(interval="batch")
    with pytest.raises(MisconfigurationException, match="timedelta arguments"):
        Timer({"fortnights": 1})
    t = Timer()
    assert t.start_time() is None and t.time_elapsed() == 0 and t.time_remaining() is None


@pytest.mark.parametrize("interval", ["step", "epoch"])
def test_timer_stops_like_lightning(L, tmp_path, interval):
    """A budget of 1 microsecond is spent by the first check: both stop after the first step (or epoch)."""
    steps = []
    for lib, make in ((rt, Reg), (L, _lit(L, RegMixin))):
        timer = lib.callbacks.Timer(duration=timedelta(microseconds=1), interval=interval, verbose=False)
        trainer = lib.Trainer(max_epochs=3, callbacks=[timer], **(_kw if lib is rt else _lkw)(tmp_path))
        trainer.fit(make(), loader())
        assert timer.time_elapsed() > 0 and timer.time_remaining() < 0
        assert timer.start_time() is not None and timer.end_time() >= timer.start_time()
        steps.append(trainer.global_step)
    assert steps[0] == steps[1] == (1 if interval == "step" else 8)


def test_timer_elapsed_survives_checkpoint(tmp_path):
    timer = Timer(duration="00:01:00:00")
    trainer = rt.Trainer(max_epochs=1, callbacks=[timer], **_kw(tmp_path))
    trainer.fit(Reg(), loader())
    path = str(tmp_path / "a.ckpt")
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["callbacks"]["Timer"]["time_elapsed"]
    assert saved["train"] == pytest.approx(timer.time_elapsed(), rel=1e-6) and saved["train"] > 0
    # resumed: the elapsed time counts on from the checkpoint's ...
    timer2 = Timer(duration="00:01:00:00")
    trainer2 = rt.Trainer(max_epochs=2, callbacks=[timer2], **_kw(tmp_path))
    trainer2.fit(Reg(), loader(), ckpt_path=path)
    assert trainer2.global_step == 16 and timer2.time_elapsed() > saved["train"]
    # ... so a budget already spent before the resume stops it at once (on_fit_start), without training
    timer3 = Timer(duration=timedelta(seconds=saved["train"] * 0.99), verbose=False)
    trainer3 = rt.Trainer(max_epochs=5, callbacks=[timer3], **_kw(tmp_path))
    trainer3.fit(Reg(), loader(), ckpt_path=path)
    assert trainer3.global_step == 8


# ---------------------------------------------------------------------------------------------- LambdaCallback
def test_lambda_callback_calls_hooks_like_lightning(L, tmp_path):
    counts = []
    for lib, make in ((rt, Reg), (L, _lit(L, RegMixin))):
        seen: dict[str, int] = {}

        def hit(name, seen=seen):
            return lambda trainer, pl_module, *args, **kwargs: seen.__setitem__(name, seen.get(name, 0) + 1)

        cb = lib.callbacks.LambdaCallback(**{n: hit(n) for n in (
            "setup", "on_fit_start", "on_train_epoch_end", "on_train_batch_end", "on_before_optimizer_step",
            "teardown")})
        lib.Trainer(max_epochs=2, callbacks=[cb], **(_kw if lib is rt else _lkw)(tmp_path)).fit(make(), loader())
        counts.append(seen)
    assert counts[0] == counts[1] == {"setup": 1, "on_fit_start": 1, "on_train_epoch_end": 2,
                                      "on_train_batch_end": 16, "on_before_optimizer_step": 16, "teardown": 1}


def test_lambda_callback_rejects_unknown_hooks():
    with pytest.raises(TypeError, match="unknown hook 'on_train_epoch_ends'.*did you mean 'on_train_epoch_end'"):
        LambdaCallback(on_train_epoch_ends=lambda t, m: None)
    with pytest.raises(TypeError, match="must be a function"):
        LambdaCallback(on_fit_start=3)
    assert "on_fit_start" not in vars(LambdaCallback(on_fit_start=None))


# ---------------------------------------------------------------------------------------------- accumulation
def test_accumulation_schedule_matches_lightning(L, tmp_path):
    weights, factors = [], []
    for lib, make in ((rt, Reg), (L, _lit(L, RegMixin))):
        lib.seed_everything(0)
        model = make()
        seen: list[int] = []
        rec = lib.callbacks.LambdaCallback(
            on_train_epoch_end=lambda trainer, pl_module, seen=seen: seen.append(trainer.accumulate_grad_batches))
        sched = lib.callbacks.GradientAccumulationScheduler(scheduling={0: 1, 1: 2, 2: 4})
        trainer = lib.Trainer(max_epochs=3, callbacks=[sched, rec], **(_kw if lib is rt else _lkw)(tmp_path))
        trainer.fit(model, loader())
        weights.append(_weights(model))
        factors.append((seen, trainer.global_step))
    assert factors[0] == factors[1] == ([1, 2, 4], 8 + 4 + 2)
    _assert_same(weights[0], weights[1])


def test_accumulation_schedule_validation(tmp_path):
    with pytest.raises(TypeError, match="empty"):
        GradientAccumulationScheduler({})
    with pytest.raises(MisconfigurationException, match="ints >= 0"):
        GradientAccumulationScheduler({-1: 2})
    with pytest.raises(MisconfigurationException, match="ints >= 1"):
        GradientAccumulationScheduler({0: 0})
    sched = GradientAccumulationScheduler({2: 3})
    assert sched.scheduling == {2: 3, 0: 1} and [sched.get_accumulate_grad_batches(e) for e in range(4)] == [1, 1, 3, 3]
    with pytest.raises(ValueError, match="remove accumulate_grad_batches"):
        rt.Trainer(max_epochs=1, accumulate_grad_batches=2, callbacks=[GradientAccumulationScheduler({0: 2})],
                   **_kw(tmp_path)).fit(Reg(), loader())

    class Manual(Reg):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            loss = super().training_step(batch, batch_idx)
            self.manual_backward(loss)
            opt.step()
            opt.zero_grad()

    with pytest.raises(RuntimeError, match="automatic optimization"):
        rt.Trainer(max_epochs=1, callbacks=[GradientAccumulationScheduler({0: 2})], **_kw(tmp_path)).fit(
            Manual(), loader())
    # the same trainer fits again: the factor it set itself is not mistaken for Trainer(accumulate_grad_batches=)
    trainer = rt.Trainer(max_epochs=2, callbacks=[GradientAccumulationScheduler({1: 2})], **_kw(tmp_path))
    trainer.fit(Reg(), loader())
    trainer.fit(Reg(), loader())


# ---------------------------------------------------------------------------------------------- finetuning
class _Record:
    """Per epoch end: each param group's lr, and which backbone parameters train."""

    def __init__(self) -> None:
        self.rows: list[tuple] = []

    def __call__(self, trainer, pl_module) -> None:
        opt = trainer.optimizers[0]
        self.rows.append(([g["lr"] for g in opt.param_groups],
                          [p.requires_grad for p in pl_module.backbone.parameters()]))


def test_backbone_finetuning_matches_lightning(L, tmp_path):
    runs = []
    for lib, make in ((rt, Backbone), (L, _lit(L, BackboneMixin))):
        lib.seed_everything(0)
        model = make()
        rec = _Record()
        ft = lib.callbacks.BackboneFinetuning(unfreeze_backbone_at_epoch=1, lambda_func=lambda e: 2.0,
                                              backbone_initial_ratio_lr=0.1)
        trainer = lib.Trainer(max_epochs=3, callbacks=[ft, lib.callbacks.LambdaCallback(on_train_epoch_end=rec)],
                              **(_kw if lib is rt else _lkw)(tmp_path))
        trainer.fit(model, loader(n=16))
        runs.append((rec.rows, _weights(model), ft.state_dict()))
    (rows, w, state), (lrows, lw, lstate) = runs
    assert len(rows) == 3 and rows[0][1] == [False, False, True, True]  # frozen (BatchNorm trains: train_bn=True)
    assert all(all(r[1]) for r in rows[1:])
    for (lrs, grads), (llrs, lgrads) in zip(rows, lrows):
        assert lrs == pytest.approx(llrs, rel=1e-12) and grads == lgrads
    assert len(rows[1][0]) == 2 and rows[1][0][1] == pytest.approx(0.1 * 0.8 * 0.1 * 0.8)  # added at epoch 1, StepLR-ed
    assert state["previous_backbone_lr"] == pytest.approx(lstate["previous_backbone_lr"], rel=1e-12)
    assert state["internal_optimizer_metadata"][0][1]["params"] == lstate["internal_optimizer_metadata"][0][1][
        "params"] == ["backbone.0.weight", "backbone.0.bias", "backbone.1.weight", "backbone.1.bias"]
    _assert_same(w, lw)


def test_backbone_finetuning_resumes_after_unfreeze_bitwise(tmp_path):
    def run(max_epochs, ckpt=None, save=None):
        rt.seed_everything(0)
        model = Backbone(bn=False)
        ft = BackboneFinetuning(unfreeze_backbone_at_epoch=1, lambda_func=lambda e: 2.0)
        trainer = rt.Trainer(max_epochs=max_epochs, callbacks=[ft], **_kw(tmp_path))
        trainer.fit(model, loader(shuffle=True), ckpt_path=ckpt)
        if save:
            trainer.save_checkpoint(save)
        return model, trainer, ft

    ref, ref_trainer, _ = run(4)
    path = str(tmp_path / "two.ckpt")
    run(2, save=path)
    saved = torch.load(path, weights_only=True)["callbacks"]["BackboneFinetuning"]
    assert len(saved["internal_optimizer_metadata"][0]) == 2
    model, trainer, ft = run(4, ckpt=path)
    assert all(p.requires_grad for p in model.backbone.parameters()), "the unfrozen backbone must train again"
    assert [g["lr"] for g in trainer.optimizers[0].param_groups] == \
        [g["lr"] for g in ref_trainer.optimizers[0].param_groups]
    _assert_same(_weights(model), _weights(ref))


def test_finetuning_helpers_and_errors(tmp_path):
    nn = torch.nn
    net = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.BatchNorm1d(2), nn.Linear(2, 1)))
    assert [type(m).__name__ for m in BaseFinetuning.flatten_modules(net)] == ["Linear", "BatchNorm1d", "Linear"]
    BaseFinetuning.freeze(net, train_bn=False)
    assert not any(p.requires_grad for p in net.parameters()) and not net[1][0].track_running_stats
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    BaseFinetuning.unfreeze_and_add_param_group(net, opt, train_bn=False)
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == 0.1 and len(opt.param_groups[1]["params"]) == 4
    assert len(list(BaseFinetuning.filter_params(net, train_bn=True))) == 6

    with pytest.raises(MisconfigurationException, match="`backbone`"):
        rt.Trainer(max_epochs=1, callbacks=[BackboneFinetuning()], **_kw(tmp_path)).fit(Reg(), loader())
    with pytest.raises(NotImplementedError, match="freeze_before_training"):
        rt.Trainer(max_epochs=1, callbacks=[BaseFinetuning()], **_kw(tmp_path)).fit(Reg(), loader())


# ---------------------------------------------------------------------------------------------- OnExceptionCheckpoint
def test_on_exception_checkpoint_resumes_bitwise(tmp_path):
    rt.seed_everything(0)
    ref = Reg()
    rt.Trainer(max_epochs=2, **_kw(tmp_path)).fit(ref, loader(shuffle=True))

    rt.seed_everything(0)
    model = Reg(fail_at=11)
    cb = OnExceptionCheckpoint(tmp_path / "exc")
    trainer = rt.Trainer(max_epochs=2, callbacks=[cb], **_kw(tmp_path))
    assert trainer.checkpoint_callbacks == [cb] and trainer.checkpoint_callback is None
    with pytest.raises(ValueError, match="injected failure"):
        trainer.fit(model, loader(shuffle=True))
    assert cb.ckpt_path == str(tmp_path / "exc" / "on_exception.ckpt") and os.path.exists(cb.ckpt_path)
    assert torch.load(cb.ckpt_path, weights_only=True)["global_step"] == 11

    model.fail_at = None
    trainer = rt.Trainer(max_epochs=2, callbacks=[cb], **_kw(tmp_path))
    trainer.fit(model, loader(shuffle=True), ckpt_path=cb.ckpt_path)
    assert trainer.global_step == 16
    _assert_same(_weights(model), _weights(ref))
    assert not os.path.exists(cb.ckpt_path), "a call that succeeded removes the stale file, as Lightning"
    with pytest.raises(ValueError, match="file name"):
        OnExceptionCheckpoint(tmp_path, filename="")


# ---------------------------------------------------------------------------------------------- prediction writer
def test_prediction_writer_indices_match_lightning(L, tmp_path):
    rows = []
    for lib, make, root in ((rt, Reg, tmp_path / "rt"), (L, _lit(L, RegMixin), tmp_path / "L")):
        root.mkdir()
        writer_cls = type("W", (WriterMixin, lib.callbacks.BasePredictionWriter), {}) if lib is L else ShardWriter
        writer = writer_cls(str(root), "batch_and_epoch")
        trainer = lib.Trainer(callbacks=[writer], **(_kw if lib is rt else _lkw)(tmp_path))
        out = trainer.predict(make(), DataLoader(Indexed(10), batch_size=3), return_predictions=False)
        assert out is None
        batch = [json.loads(line) for line in open(root / "rank0.batch.json")]
        epoch = [json.loads(line) for line in open(root / "rank0.epoch.json")]
        rows.append((batch, epoch))
    assert rows[0] == rows[1]
    batch, epoch = rows[0]
    assert [r["indices"] for r in batch] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert all(r["indices"] == [int(v) for v in r["inputs"]] for r in batch)
    assert epoch == [{"indices": [[[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]], "n_predictions": 4}]
    with pytest.raises(MisconfigurationException, match="write_interval"):
        BasePredictionWriter("step")


# ---------------------------------------------------------------------------------------------- base classes
class _BarMixin:
    """A user progress bar that overrides a few hooks and records what the base API reports."""

    def __init__(self):
        super().__init__()
        self.enabled = True
        self.rows: list[tuple] = []

    def disable(self):
        self.enabled = False

    def enable(self):
        self.enabled = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = self.get_metrics(trainer, pl_module)
        self.rows.append((self.total_train_batches, self.total_val_batches, sorted(metrics), self.train_description))


def test_custom_progress_bar_like_lightning(L, tmp_path):
    rows = []
    for lib, make in ((rt, Reg), (L, _lit(L, RegMixin))):
        bar = type("Bar", (_BarMixin, lib.callbacks.ProgressBar), {})()
        kw = (_kw if lib is rt else _lkw)(tmp_path, enable_progress_bar=True)
        trainer = lib.Trainer(max_epochs=1, callbacks=[bar], **kw)
        assert trainer.progress_bar_callback is bar
        assert not any(type(c).__name__ == "TQDMProgressBar" for c in trainer.callbacks)
        trainer.fit(make(), loader(), loader())
        assert bar.enabled and bar.trainer is trainer
        rows.append(bar.rows)
    assert rows[0] == rows[1] and rows[0][0] == (8, 0, ["loss"], "Training")  # no validation_step: 0
    assert isinstance(TQDMProgressBar(), ProgressBar)
    with pytest.raises(MisconfigurationException, match="enable_progress_bar=False"):
        rt.Trainer(callbacks=[type("Bar", (_BarMixin, ProgressBar), {})()], enable_progress_bar=False)


def test_checkpoint_base_class(tmp_path):
    class Mine(Checkpoint):
        pass

    mine, exc = Mine(), OnExceptionCheckpoint(tmp_path)
    trainer = rt.Trainer(callbacks=[mine, exc], enable_checkpointing=True, logger=False)
    assert isinstance(trainer.checkpoint_callback, ModelCheckpoint) and isinstance(ModelCheckpoint(), Checkpoint)
    assert set(map(id, trainer.checkpoint_callbacks)) == {id(mine), id(exc), id(trainer.checkpoint_callback)}
