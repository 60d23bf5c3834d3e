"""Exact resume: stop a shuffled, dropout-using run after step k, rerun the same command, get the same run."""
from __future__ import annotations

import logging
import os

import pytest
import torch
from ckpt_models import Regressor, assert_bitwise_equal, loaders, metric_rows, params, trainer

import raytrainer as rt
from raytrainer.io import storage

EPOCHS = 3  # 10 batches each: 30 optimizer steps


@pytest.fixture
def rt_log(caplog):
    """caplog that also sees the 'raytrainer' logger (which does not propagate to the root logger)."""
    logger = logging.getLogger("raytrainer")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO)
    yield caplog
    logger.removeHandler(caplog.handler)


def _run(root, seed: int = 7, ckpt_path=None, scheduler: str = "step", callbacks=None, **kwargs):
    """One fit of the shared model; returns (trainer, model)."""
    rt.seed_everything(seed)
    model = Regressor(scheduler=scheduler)
    t = trainer(root, max_epochs=kwargs.pop("max_epochs", EPOCHS), callbacks=callbacks, **kwargs)
    t.fit(model, *loaders(), ckpt_path=ckpt_path)
    return t, model


_REFERENCE: dict[str, tuple] = {}


def _reference(tmp_path_factory, scheduler: str) -> tuple[dict, list]:
    """Parameters and logged rows of the uninterrupted run (computed once per scheduler)."""
    if scheduler not in _REFERENCE:
        root = tmp_path_factory.mktemp(f"ref-{scheduler}")
        t, model = _run(root, scheduler=scheduler)
        assert t.global_step == 30 and t.current_epoch == EPOCHS
        _REFERENCE[scheduler] = (params(model), metric_rows(t.log_dir))
    return _REFERENCE[scheduler]


def _interrupted(root, k: int, scheduler: str) -> tuple[dict, list, rt.Trainer]:
    """Run until step k, then rerun the same command with ckpt_path="last" from a different RNG state."""
    first, _ = _run(root, max_steps=k, scheduler=scheduler)
    assert first.global_step == k
    rows = metric_rows(first.log_dir)
    if k % 10:
        # a mid-epoch stop logs the partial epoch's means; the uninterrupted run has no such row
        rows = [r for r in rows if not (r["step"] == str(k - 1) and "train_loss_epoch" in r)]
    torch.manual_seed(12345)  # resume must not depend on the RNG state it starts from
    second, model = _run(root, seed=999, ckpt_path="last", scheduler=scheduler)
    assert second.log_dir != first.log_dir
    assert (second.global_step, second.current_epoch) == (30, EPOCHS)
    return params(model), rows + metric_rows(second.log_dir), second


@pytest.mark.parametrize("k", [3, 13, 26])
def test_mid_epoch_resume_is_bitwise_exact(tmp_path, tmp_path_factory, k):
    ref_params, ref_rows = _reference(tmp_path_factory, "step")
    got_params, got_rows, _ = _interrupted(tmp_path, k, "step")
    assert_bitwise_equal(got_params, ref_params)
    assert got_rows == ref_rows  # every logged train loss (step and epoch means) and val loss, same steps


@pytest.mark.parametrize("k", [10, 20])
def test_epoch_boundary_resume_is_bitwise_exact(tmp_path, tmp_path_factory, k):
    ref_params, ref_rows = _reference(tmp_path_factory, "step")
    got_params, got_rows, _ = _interrupted(tmp_path, k, "step")
    assert_bitwise_equal(got_params, ref_params)
    assert got_rows == ref_rows


@pytest.mark.parametrize("scheduler, k", [("plateau", 10), ("plateau", 17), ("step_interval", 12)])
def test_resume_restores_schedulers_exactly(tmp_path, tmp_path_factory, scheduler, k):
    ref_params, ref_rows = _reference(tmp_path_factory, scheduler)
    got_params, got_rows, second = _interrupted(tmp_path, k, scheduler)
    assert_bitwise_equal(got_params, ref_params)
    assert got_rows == ref_rows


def test_checkpoint_records_position_rng_and_world_size(tmp_path):
    t, _ = _run(tmp_path, max_steps=13)
    ckpt = torch.load(t.checkpoint_callback.last_model_path)
    ours = ckpt["raytrainer"]
    assert ours["position"]["epoch"] == 1 and ours["position"]["batch_idx"] == 3
    assert ours["position"]["epoch_start_rng"].dtype == torch.uint8
    assert set(ours["rng"]) >= {"python", "numpy", "torch"}
    assert ours["world_size"] == 1
    assert "train_loss" in ours["results"]  # the epoch mean so far, continued on resume
    assert (ckpt["epoch"], ckpt["global_step"]) == (1, 13)


def test_last_with_nothing_saved_starts_fresh_and_says_so(tmp_path, rt_log):
    t, model = _run(tmp_path, ckpt_path="last", max_epochs=1)
    lines = [r.getMessage() for r in rt_log.records if "ckpt_path=\"last\"" in r.getMessage()]
    assert lines == ['ckpt_path="last": no checkpoint found, starting from scratch.']
    assert t.global_step == 10


def test_last_falls_back_past_a_corrupted_newest_checkpoint(tmp_path, rt_log):
    mc = rt.ModelCheckpoint(every_n_train_steps=4, save_top_k=-1)
    first, _ = _run(tmp_path, max_steps=13, callbacks=[mc])
    ckpt_dir = mc.dirpath
    names = sorted(os.listdir(ckpt_dir))
    assert "last.ckpt" in names and "epoch=1-step=12.ckpt" in names
    last = os.path.join(ckpt_dir, "last.ckpt")
    with open(last, "r+b") as f:  # flip one byte in the middle
        f.seek(os.path.getsize(last) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    starts = []

    class Spy(rt.Callback):
        def on_train_start(self, trainer, pl_module):
            starts.append(trainer.global_step)

    rt_log.clear()
    second, _ = _run(tmp_path, ckpt_path="last", callbacks=[Spy()])
    assert starts == [12]  # resumed from the newest valid one
    warnings = [r.getMessage() for r in rt_log.records if r.levelno == logging.WARNING]
    assert any(last in w and "sha256" in w for w in warnings), warnings
    assert second.global_step == 30


def test_last_with_only_corrupt_checkpoints_starts_fresh(tmp_path, rt_log):
    first, _ = _run(tmp_path, max_steps=3)
    last = first.checkpoint_callback.last_model_path
    with open(last, "r+b") as f:
        f.truncate(os.path.getsize(last) // 3)
    rt_log.clear()
    second, _ = _run(tmp_path, ckpt_path="last", max_epochs=1)
    messages = [r.getMessage() for r in rt_log.records]
    assert any(last in m and "truncated" in m for m in messages), messages
    assert 'ckpt_path="last": no checkpoint found, starting from scratch.' in messages
    assert second.global_step == 10


def test_explicit_path_resume_and_missing_path(tmp_path):
    first, _ = _run(tmp_path / "a", max_steps=13)
    second, _ = _run(tmp_path / "b", ckpt_path=first.checkpoint_callback.last_model_path, max_epochs=2)
    assert second.global_step == 20
    missing = str(tmp_path / "nope.ckpt")
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        _run(tmp_path / "c", ckpt_path=missing)


def test_weights_only_checkpoint_cannot_resume_fit(tmp_path):
    mc = rt.ModelCheckpoint(save_weights_only=True)
    first, _ = _run(tmp_path, max_epochs=1, callbacks=[mc])
    ckpt = torch.load(mc.best_model_path)
    assert "optimizer_states" not in ckpt and "state_dict" in ckpt
    with pytest.raises(ValueError, match="save_weights_only=True"):
        _run(tmp_path, ckpt_path=mc.best_model_path)


def test_early_stopping_wait_count_survives_resume(tmp_path):
    def es():  # with min_delta=10 only the first check improves: stop at the 4th check (epoch 3)
        return rt.EarlyStopping(monitor="val_loss", patience=3, min_delta=10.0)

    full_es = es()
    full, _ = _run(tmp_path / "full", max_epochs=10, callbacks=[full_es])
    assert (full_es.stopped_epoch, full_es.wait_count, full.global_step) == (3, 3, 40)

    part_es = es()
    _run(tmp_path / "part", max_epochs=10, max_steps=25, callbacks=[part_es])
    assert part_es.wait_count == 1
    saved = torch.load(os.path.join(tmp_path, "part", "lightning_logs", "version_0", "checkpoints", "last.ckpt"))
    state = saved["callbacks"]["EarlyStopping{'monitor': 'val_loss', 'mode': 'min'}"]
    assert state["wait_count"] == 1 and torch.isfinite(state["best_score"])

    resumed_es = es()
    resumed, _ = _run(tmp_path / "part", max_epochs=10, ckpt_path="last", callbacks=[resumed_es])
    assert (resumed_es.stopped_epoch, resumed_es.wait_count, resumed.global_step) == (3, 3, 40)


def test_model_checkpoint_best_scores_survive_resume_in_same_dirpath(tmp_path):
    def mc():
        return rt.ModelCheckpoint(dirpath=str(tmp_path / "ckpts"), monitor="val_loss", save_top_k=2)

    first_cb = mc()
    _run(tmp_path, max_epochs=2, callbacks=[first_cb])
    assert len(first_cb.best_k_models) == 2
    second_cb = mc()
    _run(tmp_path, max_epochs=3, ckpt_path="last", callbacks=[second_cb])
    # the resumed run knew the two earlier scores, so top-2 spans all three epochs and nothing extra is left
    assert len(second_cb.best_k_models) == 2
    assert sorted(os.listdir(tmp_path / "ckpts")) == sorted(
        [os.path.basename(p) for p in second_cb.best_k_models]
        + [os.path.basename(p) + storage.MANIFEST_SUFFIX for p in second_cb.best_k_models])


def test_s3_root_dir_fit_logs_checkpoints_and_resumes_exactly(s3_server, tmp_path_factory):
    ref_params, ref_rows = _reference(tmp_path_factory, "step")
    root = f"{s3_server['uri']}/run"
    first, _ = _run(root, max_steps=13)
    assert first.log_dir == f"{root}/lightning_logs/version_0"
    files = storage.listdir(f"{first.log_dir}/checkpoints")
    assert f"{first.log_dir}/checkpoints/last.ckpt" in files
    assert storage.exists(f"{first.log_dir}/checkpoints/last.ckpt{storage.MANIFEST_SUFFIX}")
    rows = [r for r in metric_rows(first.log_dir) if not (r["step"] == "12" and "train_loss_epoch" in r)]

    second, model = _run(root, seed=1, ckpt_path="last")
    assert second.log_dir == f"{root}/lightning_logs/version_1"
    assert second.global_step == 30
    assert_bitwise_equal(params(model), ref_params)
    assert rows + metric_rows(second.log_dir) == ref_rows
    loaded = Regressor.load_from_checkpoint(second.checkpoint_callback.best_model_path)
    assert_bitwise_equal(params(loaded), ref_params)
