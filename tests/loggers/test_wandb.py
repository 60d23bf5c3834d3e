"""WandbLogger in offline mode: the run's .wandb file is read back (history rows, config, steps); in-process against
pytorch_lightning's WandbLogger, a replacement copy resuming the run, and on 2 Ray ranks."""
from __future__ import annotations

import pickle
from collections.abc import Iterator

import pytest
from tracking_models import Tracked, lightning_twin, loader

import raytrainer as pl
from raytrainer.loggers.wandb import STEP_KEY, WandbLogger, offline_config, offline_history, offline_run_files
from raytrainer.utilities.exceptions import MisconfigurationException

wandb = pytest.importorskip("wandb")

QUIET = dict(enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=2, deterministic=True)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No network, no login, no console chatter; no run left open for the next test."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    yield
    if wandb.run is not None:
        wandb.finish()


def metric_rows(rows: list[dict]) -> list[dict]:
    """History rows without wandb's own keys (_step, _runtime, _timestamp)."""
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]


def test_offline_run_matches_lightning(tmp_path, L, monkeypatch):
    opt = {"name": "sgd", "momentum": 0.9}
    pl.seed_everything(0)
    ours = WandbLogger(save_dir=str(tmp_path / "ours"), project="cmp", name="mine", prefix="p")
    trainer = pl.Trainer(max_epochs=2, logger=ours, default_root_dir=str(tmp_path / "r"), **QUIET)
    trainer.fit(Tracked(opt=opt), loader(), loader(16))
    run_id = trainer.logger.version
    assert ours.name == "cmp" and ours.experiment.name == "mine" and ours.save_dir == str(tmp_path / "ours")
    ours.experiment.finish()

    L.seed_everything(0)
    theirs = L.loggers.WandbLogger(save_dir=str(tmp_path / "theirs"), project="cmp", prefix="p")
    L.Trainer(max_epochs=2, logger=theirs, default_root_dir=str(tmp_path / "l"), **QUIET).fit(
        lightning_twin(L)(opt=opt), loader(), loader(16))
    their_id = theirs.version
    theirs.experiment.finish()

    got = metric_rows(offline_history(str(tmp_path / "ours"), run_id))
    want = metric_rows(offline_history(str(tmp_path / "theirs"), their_id))
    assert [sorted(r) for r in got] == [sorted(r) for r in want]
    assert [r[STEP_KEY] for r in got] == [r[STEP_KEY] for r in want]
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=1e-5)
    assert [r[STEP_KEY] for r in got if "p-train_loss_step" in r] == [1, 3, 5, 7, 9, 11, 13, 15]
    config, their_config = offline_config(str(tmp_path / "ours"), run_id), offline_config(str(tmp_path / "theirs"),
                                                                                           their_id)
    assert {k: v for k, v in config.items() if k != "_wandb"} == {"lr": 0.05, "hidden": 8, "opt": opt}
    assert {k: v for k, v in their_config.items() if k != "_wandb"} == {"lr": 0.05, "hidden": 8, "opt": opt}


def test_bad_arguments_are_clear(tmp_path):
    with pytest.raises(MisconfigurationException, match="offline"):
        WandbLogger(offline=True, log_model=True)
    with pytest.raises(ValueError, match="log_model"):
        WandbLogger(log_model="sometimes")


def test_pickled_copy_resumes_the_run_and_skips_rows_it_holds(tmp_path):
    first = WandbLogger(save_dir=str(tmp_path), offline=True)
    copy = pickle.loads(pickle.dumps(first))  # what a Ray rank receives: the run id is fixed before it travels
    assert copy.version == first.version and copy.version is not None
    for step in range(6):
        copy.log_metrics({"loss": float(step)}, step)
    copy.log_metrics({"loss_epoch": 1.0}, 5)
    copy.finalize("failed")  # a shipped copy finishes its run (its process may be reused or killed)
    again = pickle.loads(pickle.dumps(first))  # a replacement rank 0, resumed from step 3's snapshot
    again.resume_from_step(3)
    for step in range(3, 8):
        again.log_metrics({"loss": step + 0.5}, step)
    again.log_metrics({"loss_epoch": 2.0}, 5)  # past what the run held at step 5: logged
    again.finalize("success")
    rows = metric_rows(offline_history(str(tmp_path), first.version))
    assert [(r[STEP_KEY], r["loss"]) for r in rows if "loss" in r] == \
        [(s, float(s)) for s in range(6)] + [(6, 6.5), (7, 7.5)]
    assert [(r[STEP_KEY], r["loss_epoch"]) for r in rows if "loss_epoch" in r] == [(5, 1.0)]
    assert len(offline_run_files(str(tmp_path), first.version)) == 2  # one folder per segment of the run


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ray_run_logs_one_offline_run_like_in_process(local_ray, tmp_path):
    pl.seed_everything(0)
    ref = WandbLogger(save_dir=str(tmp_path / "ref"), offline=True)
    # in-process with batches twice as big: the same steps as 2 ranks that split each epoch
    pl.Trainer(max_epochs=2, logger=ref, default_root_dir=str(tmp_path / "r"), **QUIET).fit(
        Tracked(), loader(batch_size=16), loader(16))
    ref.experiment.finish()

    lg = WandbLogger(save_dir=str(tmp_path / "ray"), offline=True, project="ray")
    trainer = pl.Trainer(max_epochs=2, logger=lg, num_processes=2, default_root_dir=str(tmp_path / "ray"), **QUIET)
    trainer.fit(Tracked(), loader(), loader(16))
    run_id = trainer.logger.version
    assert run_id and trainer.logger.name == "ray"
    assert len(offline_run_files(str(tmp_path / "ray"), run_id)) == 1  # rank 0 wrote it and finished it
    got = [(r[STEP_KEY], sorted(r)) for r in metric_rows(offline_history(str(tmp_path / "ray"), run_id))]
    want = [(r[STEP_KEY], sorted(r)) for r in metric_rows(offline_history(str(tmp_path / "ref"), ref.version))]
    assert got == want
    assert offline_config(str(tmp_path / "ray"), run_id)["lr"] == 0.05


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ray_killed_rank0_resumes_the_same_run_with_steps_that_never_go_back(local_ray, tmp_path):
    """Rank 0 is SIGKILLed at step 7 and the run restarts from the step-4 snapshot: the restarted rank 0 logs to the
    same run id (a second offline segment), and across both segments each metric's steps only go forward, each
    step once. Rows the killed process had logged but wandb had not yet written out are lost (wandb buffers)."""
    import os

    from signal_at import SignalAt

    save_dir = str(tmp_path / "ray")
    pl.seed_everything(0)
    lg = WandbLogger(save_dir=save_dir, offline=True, project="ft")
    trainer = pl.Trainer(max_epochs=2, logger=lg, num_processes=2, max_failures=2, snapshot_every_n_steps=4,
                         default_root_dir=save_dir, callbacks=[SignalAt(7, str(tmp_path / "marker"), rank=0)],
                         **QUIET)
    trainer.fit(Tracked(), loader(), loader(16))
    assert os.path.exists(tmp_path / "marker"), "rank 0 was not killed"
    run_id = trainer.logger.version
    assert len(offline_run_files(save_dir, run_id)) == 2  # the killed segment and the resumed one
    rows = metric_rows(offline_history(save_dir, run_id))
    for key in ("train_loss_step", "val_loss"):
        steps = [r[STEP_KEY] for r in rows if key in r]
        assert steps == sorted(steps) and len(set(steps)) == len(steps), (key, steps)
    steps = [r[STEP_KEY] for r in rows if "train_loss_step" in r]
    assert steps[-1] >= trainer.global_step - 2  # the resumed segment logged up to the end of the run
