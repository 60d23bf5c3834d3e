"""ModelCheckpoint's arguments, paths and rotation, with real files and the asynchronous writer."""
from __future__ import annotations

import os
import time
from datetime import timedelta

import pytest
import torch
from ckpt_models import Regressor, assert_bitwise_equal, loaders, params, trainer

import raytrainer as rt
from raytrainer.io import storage


def _fit(root, callbacks=None, seed: int = 3, **kwargs):
    rt.seed_everything(seed)
    model = Regressor()
    t = trainer(root, callbacks=callbacks, max_epochs=kwargs.pop("max_epochs", 3), **kwargs)
    t.fit(model, *loaders())
    return t, model


def _ckpts(directory) -> list[str]:
    """Checkpoint file names in a directory (no manifests), sorted."""
    return sorted(n for n in os.listdir(directory)
                  if n.endswith(".ckpt") and os.path.isfile(os.path.join(directory, n)))


def _assert_no_leftovers(directory) -> None:
    """Every checkpoint has its manifest, and no temporary file is left."""
    names = os.listdir(directory)
    assert not [n for n in names if n.startswith(".")], names
    for n in names:
        if n.endswith(".ckpt"):
            assert n + storage.MANIFEST_SUFFIX in names


def test_default_checkpoint_goes_to_the_logger_version_dir(tmp_path):
    t, model = _fit(tmp_path)
    cb = t.checkpoint_callback
    expected_dir = os.path.join(tmp_path, "lightning_logs", "version_0", "checkpoints")
    assert cb.dirpath == expected_dir
    assert _ckpts(expected_dir) == ["epoch=2-step=30.ckpt"]  # save_top_k=1 keeps the newest
    assert cb.best_model_path == os.path.join(expected_dir, "epoch=2-step=30.ckpt")
    assert cb.last_model_path == ""
    assert cb._writer is None  # fit waited for the writes and stopped the writer thread
    _assert_no_leftovers(expected_dir)
    assert_bitwise_equal(params(Regressor.load_from_checkpoint(cb.best_model_path)), params(model))


def test_filename_template_monitor_top_k_and_best_path(tmp_path):
    scores = {}

    class Record(rt.Callback):
        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                scores[trainer.current_epoch] = float(trainer.callback_metrics["val_loss"])

    cb = rt.ModelCheckpoint(dirpath=str(tmp_path / "ck"), filename="{epoch:02d}-{val_loss:.4f}",
                            monitor="val_loss", mode="max", save_top_k=2)
    t, _ = _fit(tmp_path, callbacks=[Record(), cb], max_epochs=4)
    worst_two = sorted(scores, key=scores.get)[-2:]  # mode="max" keeps the two largest losses
    expected = sorted(f"epoch={e:02d}-val_loss={scores[e]:.4f}.ckpt" for e in worst_two)
    assert _ckpts(tmp_path / "ck") == expected
    top = max(scores, key=scores.get)
    assert cb.best_model_path == str(tmp_path / "ck" / f"epoch={top:02d}-val_loss={scores[top]:.4f}.ckpt")
    assert float(cb.best_model_score) == pytest.approx(scores[top])
    assert set(cb.best_k_models) == {str(tmp_path / "ck" / n) for n in expected}
    _assert_no_leftovers(tmp_path / "ck")
    # the state in the best file already names itself as the best
    state = torch.load(cb.best_model_path)["callbacks"][cb.state_key]
    assert state["best_model_path"] == cb.best_model_path


def test_min_mode_top_1_keeps_the_lowest_and_validate_best(tmp_path):
    cb = rt.ModelCheckpoint(monitor="val_loss", filename="best-{epoch}")
    t, model = _fit(tmp_path, callbacks=[cb], max_epochs=4)
    assert len(_ckpts(cb.dirpath)) == 1
    out = t.validate(model, loaders()[1], ckpt_path="best", verbose=False)
    assert out[0]["val_loss"] == pytest.approx(float(cb.best_model_score), rel=1e-6)


def test_auto_insert_metric_name_false_and_slash_in_metric_names(tmp_path):
    class SlashName(Regressor):
        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val/loss", torch.nn.functional.mse_loss(self(x), y))

    cb = rt.ModelCheckpoint(dirpath=str(tmp_path / "a"), filename="m-{epoch}-{val/loss:.2f}",
                            auto_insert_metric_name=False, monitor="val/loss")
    rt.seed_everything(0)
    t = trainer(tmp_path, callbacks=[cb], max_epochs=1)
    t.fit(SlashName(), *loaders())
    [name] = _ckpts(tmp_path / "a")
    assert name == f"m-0-{float(t.callback_metrics['val/loss']):.2f}.ckpt"
    cb2 = rt.ModelCheckpoint(dirpath=str(tmp_path / "b"), filename="{val/loss:.2f}", monitor="val/loss")
    rt.seed_everything(0)
    trainer(tmp_path, callbacks=[cb2], max_epochs=1).fit(SlashName(), *loaders())
    [name] = _ckpts(tmp_path / "b")
    assert name.startswith("val_loss=")  # a metric's "/" never creates folders


def test_save_last_and_last_model_path(tmp_path):
    cb = rt.ModelCheckpoint(save_last=True, monitor="val_loss")
    t, model = _fit(tmp_path, callbacks=[cb])
    assert cb.last_model_path == os.path.join(cb.dirpath, "last.ckpt")
    assert "last.ckpt" in _ckpts(cb.dirpath) and len(_ckpts(cb.dirpath)) == 2
    last = torch.load(cb.last_model_path)
    assert (last["epoch"], last["global_step"]) == (2, 30)
    assert_bitwise_equal(params(Regressor.load_from_checkpoint(cb.last_model_path)), params(model))
    # both files of the final save come from one state: each already names the other
    state = last["callbacks"][cb.state_key]
    assert (state["last_model_path"], state["best_model_path"]) == (cb.last_model_path, cb.best_model_path)
    if cb.best_model_path.endswith("step=30.ckpt"):
        assert_bitwise_equal(torch.load(cb.best_model_path)["state_dict"], last["state_dict"])


def test_every_n_train_steps(tmp_path):
    cb = rt.ModelCheckpoint(every_n_train_steps=4, save_top_k=-1)
    _fit(tmp_path, callbacks=[cb])
    steps = sorted(int(n.split("step=")[1].split(".")[0]) for n in _ckpts(cb.dirpath))
    assert steps == [4, 8, 12, 16, 20, 24, 28]
    mid = torch.load(os.path.join(cb.dirpath, "epoch=1-step=12.ckpt"))
    assert mid["raytrainer"]["position"] == {**mid["raytrainer"]["position"], "epoch": 1, "batch_idx": 2}


def test_every_n_epochs(tmp_path):
    cb = rt.ModelCheckpoint(every_n_epochs=2, save_top_k=-1)
    _fit(tmp_path, callbacks=[cb], max_epochs=5)
    assert _ckpts(cb.dirpath) == ["epoch=1-step=20.ckpt", "epoch=3-step=40.ckpt"]


def test_train_time_interval(tmp_path):
    class Slow(rt.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            time.sleep(0.1)

    cb = rt.ModelCheckpoint(train_time_interval=timedelta(seconds=0.25), save_top_k=-1)
    _fit(tmp_path, callbacks=[Slow(), cb], max_epochs=1)
    steps = sorted(int(n.split("step=")[1].split(".")[0]) for n in _ckpts(cb.dirpath))
    gaps = [b - a for a, b in zip([0] + steps, steps)]
    # 0.1 s per batch: due after the 3rd batch since the last save (0.2 s is not yet 0.25 s)
    assert len(steps) >= 2 and all(g in (3, 4) for g in gaps), steps


def test_val_check_interval_saves_after_each_validation(tmp_path):
    cb = rt.ModelCheckpoint(monitor="val_loss", save_top_k=-1)
    _fit(tmp_path, callbacks=[cb], max_epochs=2, val_check_interval=0.5)
    assert _ckpts(cb.dirpath) == ["epoch=0-step=10.ckpt", "epoch=0-step=5.ckpt",
                                  "epoch=1-step=15.ckpt", "epoch=1-step=20.ckpt"]


def test_save_weights_only(tmp_path):
    cb = rt.ModelCheckpoint(save_weights_only=True)
    _, model = _fit(tmp_path, callbacks=[cb], max_epochs=1)
    ckpt = torch.load(cb.best_model_path)
    assert {"optimizer_states", "lr_schedulers", "callbacks", "raytrainer"}.isdisjoint(ckpt)
    assert_bitwise_equal(params(Regressor.load_from_checkpoint(cb.best_model_path)), params(model))


def test_sync_and_async_writes_hold_the_same_checkpoint(tmp_path):
    cbs = [rt.ModelCheckpoint(dirpath=str(tmp_path / d), async_save=a) for d, a in (("sync", False), ("async", True))]
    ckpts = []
    for cb in cbs:
        _fit(tmp_path, callbacks=[cb], max_epochs=2)
        ckpts.append(torch.load(cb.best_model_path))
    a, b = ckpts
    assert_bitwise_equal(a["state_dict"], b["state_dict"])
    assert a["optimizer_states"][0]["state"][0]["exp_avg"].equal(b["optimizer_states"][0]["state"][0]["exp_avg"])
    assert a["raytrainer"]["rng"]["torch"].equal(b["raytrainer"]["rng"]["torch"])


def test_version_counter_for_existing_names(tmp_path):
    first = rt.ModelCheckpoint(dirpath=str(tmp_path / "ck"), filename="model", save_top_k=-1)
    _fit(tmp_path, callbacks=[first], max_epochs=2)
    assert _ckpts(tmp_path / "ck") == ["model-v1.ckpt", "model.ckpt"]
    keep_one = rt.ModelCheckpoint(dirpath=str(tmp_path / "one"), filename="model")
    _fit(tmp_path, callbacks=[keep_one], max_epochs=3)
    assert _ckpts(tmp_path / "one") == ["model.ckpt"]  # top-1 overwrites its own file


def test_rotation_never_deletes_the_only_valid_checkpoint(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "epoch=1-step=20.ckpt").mkdir()  # the next checkpoint's name is taken: its write must fail
    cb = rt.ModelCheckpoint(dirpath=str(ck), enable_version_counter=False)
    with pytest.raises(IsADirectoryError, match="epoch=1-step=20.ckpt"):
        _fit(tmp_path, callbacks=[cb], max_epochs=3)
    assert _ckpts(ck) == ["epoch=0-step=10.ckpt"]  # the previous one was not rotated out
    ckpt = storage.load(str(ck / "epoch=0-step=10.ckpt"))
    assert ckpt["global_step"] == 10


def test_trainer_save_checkpoint(tmp_path):
    saved = []

    class SaveMidEpoch(rt.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 5:
                trainer.save_checkpoint(str(tmp_path / "manual-mid.ckpt"))
                saved.append(params(pl_module))

    t, model = _fit(tmp_path, callbacks=[SaveMidEpoch()], max_epochs=1)
    mid = torch.load(tmp_path / "manual-mid.ckpt")
    assert mid["global_step"] == 5 and mid["raytrainer"]["position"]["batch_idx"] == 5
    assert_bitwise_equal(mid["state_dict"], saved[0])
    t.save_checkpoint(str(tmp_path / "after.ckpt"))
    t.save_checkpoint(str(tmp_path / "weights.ckpt"), weights_only=True)
    after, weights = torch.load(tmp_path / "after.ckpt"), torch.load(tmp_path / "weights.ckpt")
    assert (after["epoch"], after["global_step"]) == (1, 10)
    assert "optimizer_states" in after and "optimizer_states" not in weights
    assert os.path.exists(str(tmp_path / "after.ckpt") + storage.MANIFEST_SUFFIX)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="mutually exclusive"):
        rt.ModelCheckpoint(every_n_train_steps=5, every_n_epochs=2)
    with pytest.raises(ValueError, match="'min' or 'max'"):
        rt.ModelCheckpoint(mode="lowest")
    with pytest.raises(ValueError, match="monitor="):
        rt.ModelCheckpoint(save_top_k=3)
    with pytest.raises(TypeError, match="timedelta"):
        rt.ModelCheckpoint(train_time_interval=30)


def test_missing_monitor_is_an_error_naming_it(tmp_path):
    cb = rt.ModelCheckpoint(monitor="val_acc")
    with pytest.raises(RuntimeError, match="val_acc.*Logged: .*val_loss"):
        _fit(tmp_path, callbacks=[cb], max_epochs=1)


# ------------------------------------------------------------------------------------------
# The pipelined snapshot: optimizer-owned tensors are copied while the next step computes
# ------------------------------------------------------------------------------------------

class Wide(rt.LightningModule):
    """Big enough that copying it to host memory takes a while; automatic or manual optimization."""

    def __init__(self, width: int = 1024, manual: bool = False, lbfgs: bool = False, table: int = 1) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.Linear(width, 1))
        self.norm = torch.nn.BatchNorm1d(width)  # buffers change in forward: copied at save time
        # a big parameter that costs almost nothing in forward/backward: its copy outlasts the next step's compute
        self.table = torch.nn.Parameter(torch.zeros(table))
        self.automatic_optimization = not manual
        self.lbfgs = lbfgs

    def _loss(self, batch):
        return self.body(self.norm(batch[0])).pow(2).mean() + self.table[:1].sum()

    def training_step(self, batch, batch_idx):
        if self.automatic_optimization:
            return self._loss(batch)
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(self._loss(batch))
        opt.step()

    def configure_optimizers(self):
        if self.lbfgs:
            return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=2)
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _wide_data(width: int = 1024):
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(48, width, generator=g)),
                                       batch_size=8, shuffle=True)


class _Record(rt.Callback):
    """Copies the full training state at every step end (runs before ModelCheckpoint in the same hook)."""

    def __init__(self):
        self.states = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        opt_state = trainer.optimizers[0].state_dict()["state"]
        self.states[trainer.global_step] = (
            params(pl_module),
            {i: {k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)} for i, s in opt_state.items()})


@pytest.mark.parametrize("manual, lbfgs", [(False, False), (True, False), (False, True)])
def test_async_checkpoints_hold_exactly_the_state_of_their_step(tmp_path, manual, lbfgs):
    record = _Record()
    cb = rt.ModelCheckpoint(every_n_train_steps=1, save_top_k=-1, filename="{step}")
    rt.seed_everything(0)
    t = trainer(tmp_path, callbacks=[record, cb], max_steps=4, max_epochs=-1)
    t.fit(Wide(manual=manual, lbfgs=lbfgs, table=2_000_000), _wide_data())
    assert sorted(record.states) == [1, 2, 3, 4]
    for step, (weights, opt_state) in record.states.items():
        ckpt = torch.load(os.path.join(cb.dirpath, f"step={step}.ckpt"))
        assert_bitwise_equal(ckpt["state_dict"], weights)
        saved_opt = ckpt["optimizer_states"][0]["state"]
        for i, tensors in opt_state.items():
            for k, v in tensors.items():
                assert torch.equal(saved_opt[i][k], v), (step, i, k)


def test_in_place_change_during_the_background_copy_is_never_written_silently(tmp_path):
    class Mutating(Wide):
        def on_train_batch_end(self, outputs, batch, batch_idx):  # runs right after ModelCheckpoint's hook
            with torch.no_grad():
                self.body[0].weight.add_(1.0)

    record = _Record()
    cb = rt.ModelCheckpoint(every_n_train_steps=2, save_top_k=-1, filename="{step}")
    rt.seed_everything(0)
    t = trainer(tmp_path, callbacks=[record, cb], max_steps=4, max_epochs=-1)
    try:
        t.fit(Mutating(width=2048), _wide_data(2048))
    except RuntimeError as exc:  # the usual outcome: the change raced the copy and was detected
        assert "changed in place" in str(exc) and "body.0.weight" in str(exc)
        return
    for step in (2, 4):  # the copy won the race: then the files must hold the state of their step
        assert_bitwise_equal(torch.load(os.path.join(cb.dirpath, f"step={step}.ckpt"))["state_dict"],
                             record.states[step][0])
