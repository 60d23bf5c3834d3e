"""TensorBoardLogger: event files read back with tensorboard's own reader, against pytorch_lightning 2.x; the
default logger; several loggers at once; CSVLogger(prefix); URIs; and on Ray (rank 0 writes, restarts keep
logging into the same version with steps that never go backwards)."""
from __future__ import annotations

import csv
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from tb_models import data, kill_at, make_module, rank_touch_callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import raytrainer as rt
from raytrainer.io import storage
from raytrainer.loggers import TensorBoardLogger

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                        "ignore::FutureWarning", "ignore::RuntimeWarning")
QUIET = dict(enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)


def scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in ``log_dir`` as (step, value) pairs, as TensorBoard shows them (purges applied)."""
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {t: [(e.step, round(e.value, 5)) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def event_files(log_dir: str | Path) -> list[str]:
    return sorted(n for n in os.listdir(log_dir) if n.startswith("events.out.tfevents."))


def fit_both(L, tmp_path, logger=None, hparams=True, **kwargs):
    """Fit the same module under Lightning and raytrainer; returns {name: trainer}."""
    out = {}
    for base in (L, rt):
        root = str(tmp_path / base.__name__)
        torch.manual_seed(0)
        args = {**QUIET, "max_epochs": 2, "default_root_dir": root, "enable_checkpointing": False, **kwargs}
        if logger is not None:
            args["logger"] = logger(base, root)
        trainer = base.Trainer(**args)
        trainer.fit(make_module(base, hparams=hparams), data(), data(seed=1))
        out[base.__name__] = trainer
    return out


# -------------------------------------------------------------------------------------- in-process, vs Lightning
def test_default_logger_writes_what_lightning_writes(L, tmp_path):
    runs = fit_both(L, tmp_path)
    ours, theirs = runs["raytrainer"], runs["pytorch_lightning"]
    assert type(ours.logger).__name__ == type(theirs.logger).__name__ == "TensorBoardLogger"
    assert ours.log_dir == str(tmp_path / "raytrainer" / "lightning_logs" / "version_0")
    assert ours.logger.version == theirs.logger.version == 0
    got, want = scalars(ours.log_dir), scalars(theirs.log_dir)
    assert set(got) == {"hp_metric", "train_loss_step", "train_loss_epoch", "val_loss", "epoch"}
    assert got == want  # the same tags, steps and values
    assert len(event_files(ours.log_dir)) == 1
    mine, lightning = (Path(t.log_dir, "hparams.yaml").read_text() for t in (ours, theirs))
    assert mine == lightning and yaml.safe_load(mine) == {"hidden": 8, "lr": 0.05}


def test_prefix_sub_dir_graph_and_no_hparams_as_lightning(L, tmp_path):
    def logger(base, root):
        return base.loggers.TensorBoardLogger(root, name="exp", log_graph=True, prefix="p", sub_dir="tb")

    runs = fit_both(L, tmp_path, logger=logger, hparams=False, enable_checkpointing=True)
    ours, theirs = runs["raytrainer"], runs["pytorch_lightning"]
    assert ours.log_dir == str(tmp_path / "raytrainer" / "exp" / "version_0" / "tb")
    got, want = scalars(ours.log_dir), scalars(theirs.log_dir)
    assert got == want and "p-train_loss_step" in got and not any(t.endswith("hp_metric") for t in got)
    for t in (ours, theirs):
        acc = EventAccumulator(t.log_dir)
        acc.Reload()
        assert acc.Tags()["graph"], "log_graph=True traced example_input_array"
        assert Path(t.log_dir, "hparams.yaml").read_text() == "{}\n"
        # checkpoints go to <version>/checkpoints, not into the sub_dir
        assert Path(t.checkpoint_callback.best_model_path).parent == Path(t.log_dir).parent / "checkpoints"


def test_versions_and_string_version(tmp_path):
    first = TensorBoardLogger(str(tmp_path))
    first.log_metrics({"a": 1.0}, 0)
    first.finalize("success")
    assert first.version == 0 and os.path.isdir(first.log_dir)
    assert TensorBoardLogger(str(tmp_path)).version == 1
    named = TensorBoardLogger(str(tmp_path), name="", version="run7")
    assert named.log_dir == str(tmp_path / "run7")


def test_log_hyperparams_with_metrics_as_lightning(L, tmp_path):
    params = {"lr": 0.1, "opt": {"name": "sgd", "momentum": 0.9}, "layers": [1, 2], "flag": True}
    contents = {}
    for base in (L, rt):
        lg = base.loggers.TensorBoardLogger(str(tmp_path / base.__name__), default_hp_metric=False)
        lg.log_hyperparams(params)  # no metric and no default: nothing reaches the HParams tab
        lg.log_hyperparams(params, {"acc": 0.5}, step=3)
        lg.log_metrics({"acc": torch.tensor(0.75), "pair": {"x": 1.0, "y": 2.0}}, step=4)
        lg.finalize("success")
        acc = EventAccumulator(lg.log_dir)
        acc.Reload()
        contents[base.__name__] = (scalars(lg.log_dir), sorted(acc.PluginTagToContent("hparams")),
                                   sorted(n for n in os.listdir(lg.log_dir) if not n.startswith("events.")),
                                   yaml.safe_load(Path(lg.log_dir, "hparams.yaml").read_text()))
    ours, theirs = contents["raytrainer"], contents["pytorch_lightning"]
    assert ours[0] == theirs[0] == {"acc": [(3, 0.5), (4, 0.75)]}
    assert ours[1] == theirs[1] and ours[1]  # the hparams plugin's experiment/session summaries
    assert ours[2] == theirs[2]  # hparams.yaml and add_scalars' sub-folders (pair_x, pair_y)
    assert ours[3] == theirs[3] == params


def test_tensorboard_and_csv_together_and_csv_prefix(L, tmp_path):
    def both(base, root):
        return [base.loggers.TensorBoardLogger(root), base.loggers.CSVLogger(root, prefix="run")]

    runs = fit_both(L, tmp_path, logger=both)
    ours, theirs = runs["raytrainer"], runs["pytorch_lightning"]
    assert ours.logger is ours.loggers[0] and len(ours.loggers) == 2
    # as in Lightning, each resolves its own next free version: TensorBoard version_0, then CSV version_1
    assert [Path(lg.log_dir).name for lg in ours.loggers] == [Path(lg.log_dir).name for lg in theirs.loggers] \
        == ["version_0", "version_1"]
    assert ours.log_dir == ours.loggers[0].log_dir
    headers, step_rows = [], []
    for t in (ours, theirs):
        with open(os.path.join(t.loggers[1].log_dir, "metrics.csv"), newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
        headers.append(reader.fieldnames)
        step_rows.append([(int(r["step"]), round(float(r["run-train_loss_step"]), 5))
                          for r in rows if r["run-train_loss_step"]])
    assert headers[0] == headers[1] and "run-epoch" in headers[0] and "step" in headers[0]
    assert step_rows[0] == step_rows[1] == scalars(ours.log_dir)["train_loss_step"]  # the same values in both files


def test_finalize_gets_failed_then_success(tmp_path):
    statuses = []

    class Recording(TensorBoardLogger):
        def finalize(self, status: str) -> None:
            statuses.append(status)
            super().finalize(status)

    lg = Recording(str(tmp_path))
    trainer = rt.Trainer(**QUIET, max_epochs=1, logger=lg, enable_checkpointing=False)
    with pytest.raises(RuntimeError, match="injected failure at step 3"):
        trainer.fit(make_module(rt, fail_at=3), data())
    assert statuses == ["failed"]
    assert [s for s, _ in scalars(lg.log_dir)["train_loss_step"]] == [0, 1, 2]  # flushed before the failure
    rt.Trainer(**QUIET, max_epochs=1, logger=lg, enable_checkpointing=False).fit(make_module(rt), data())
    assert statuses == ["failed", "success"]
    assert len(event_files(lg.log_dir)) == 2  # the second fit opened a new file in the same version


def test_bad_arguments_are_refused_up_front(tmp_path):
    with pytest.raises(TypeError, match="log_dir"):
        TensorBoardLogger(str(tmp_path), log_dir="elsewhere")
    with pytest.raises(ValueError, match="local path"):
        TensorBoardLogger("nosuchscheme://bucket/logs")


def test_uri_save_dir_on_s3(s3_server, tmp_path):
    root = f"{s3_server['uri']}/runs"
    trainer = rt.Trainer(**QUIET, max_epochs=1, default_root_dir=root, enable_checkpointing=False)
    trainer.fit(make_module(rt), data())
    assert isinstance(trainer.logger, TensorBoardLogger)
    assert trainer.log_dir == f"{root}/lightning_logs/version_0"
    local = tmp_path / "copy"
    local.mkdir()
    names = [os.path.basename(p) for p in storage.listdir(trainer.log_dir)]
    assert "hparams.yaml" in names and any(n.startswith("events.out.tfevents.") for n in names)
    for name in names:
        if name.startswith("events.out.tfevents."):
            (local / name).write_bytes(storage.read_verified(storage.join(trainer.log_dir, name)))
    assert [s for s, _ in scalars(local)["train_loss_step"]] == list(range(16))
    assert TensorBoardLogger(root).version == 1  # versions are counted on the URI


# ------------------------------------------------------------------------------------------------ on Ray
def ray_trainer(root, **kwargs) -> rt.Trainer:
    args = dict(QUIET, num_processes=2, max_epochs=2, deterministic=True, default_root_dir=str(root),
                ray_address="local", num_sanity_val_steps=0)
    args.update(kwargs)
    return rt.Trainer(**args)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_rank0_writes_and_driver_logger_reflects_the_run(local_ray, tmp_path):
    trainer = ray_trainer(tmp_path, callbacks=[rank_touch_callback(rt)])
    model = make_module(rt)
    trainer.fit(model, data(), data(seed=1))
    lg = trainer.logger
    assert isinstance(lg, TensorBoardLogger)
    assert lg.version == 0 and trainer.log_dir == lg.log_dir == str(tmp_path / "lightning_logs" / "version_0")
    assert lg.hparams == {"lr": 0.05, "hidden": 8}
    files = event_files(lg.log_dir)
    assert len(files) == 1 and f".{os.getpid()}." not in files[0]  # one writer, and not the driver
    got = scalars(lg.log_dir)
    assert {v for _, v in got["rank_touch"]} == {0.0}  # rank 1's logger.experiment wrote nothing
    assert [s for s, _ in got["train_loss_step"]] == list(range(trainer.global_step))
    assert yaml.safe_load(Path(lg.log_dir, "hparams.yaml").read_text()) == {"hidden": 8, "lr": 0.05}
    # the next run on the driver's logger object appends to the same version
    trainer2 = ray_trainer(tmp_path, logger=lg, max_epochs=1)
    trainer2.fit(make_module(rt), data())
    assert trainer2.logger.version == 0 and len(event_files(lg.log_dir)) == 2


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("resume_from", ["snapshot", "checkpoint"])
def test_ray_restart_keeps_logging_to_the_same_version_with_steps_that_never_go_back(local_ray, tmp_path,
                                                                                     resume_from):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    # rank 0 dies at step 11 after logging rows up to step 10; the run resumes from the step-8 snapshot (snapshots
    # every 4 steps), or with snapshots off from the step-8 checkpoint, so steps 8-10 are written twice and
    # TensorBoard must show each step once
    kill = kill_at(rt, 11, str(tmp_path / "marker"), rank=0)
    if resume_from == "snapshot":
        trainer = ray_trainer(tmp_path, enable_checkpointing=False, max_failures=2, snapshot_every_n_steps=4,
                              callbacks=[kill])
    else:
        every4 = rt.callbacks.ModelCheckpoint(every_n_train_steps=4, save_last=True)
        trainer = ray_trainer(tmp_path, max_failures=2, snapshot_every_n_steps=0, callbacks=[kill, every4])
    trainer.fit(make_module(rt), data())
    assert os.path.exists(tmp_path / "marker"), "rank 0 was not killed"
    log_dir = Path(trainer.log_dir)
    assert trainer.logger.version == 0 and log_dir == tmp_path / "lightning_logs" / "version_0"
    assert sorted(p.name for p in log_dir.parent.iterdir()) == ["version_0"]
    events_ = list(map(json.loads, (log_dir / "events.jsonl").read_text().splitlines()))
    if resume_from == "checkpoint":  # (under load a snapshot can be lost too: then the fallback starts at 0)
        assert any(e["event"] == "snapshot_fallback" for e in events_)
    restart = [e for e in events_ if e["event"] == "restart"]
    assert len(restart) == 1 and restart[0]["step"] < 11, restart
    resumed = restart[0]["step"]
    files = event_files(log_dir)
    assert len(files) == 2  # the killed rank 0's file and the restarted one's
    raw = []  # train_loss_step as written to each file, in file order
    for name in files:
        events = EventFileLoader(str(log_dir / name)).Load()
        raw.append({e.step: round(v.tensor.float_val[0] if v.HasField("tensor") else v.simple_value, 5)
                    for e in events for v in e.summary.value if v.tag == "train_loss_step"})
    assert max(raw[0]) >= resumed and min(raw[1]) == resumed  # the old file ran past the resume point
    got = scalars(log_dir)
    for tag in ("train_loss_step", "epoch", "train_loss_epoch"):
        steps = [s for s, _ in got[tag]]
        assert steps == sorted(steps), f"{tag} steps went backwards: {steps}"
    assert [s for s, _ in got["train_loss_step"]] == list(range(trainer.global_step))  # each step once
    shown = dict(got["train_loss_step"])
    assert all(shown[s] == raw[0][s] for s in range(resumed)) and all(shown[s] == raw[1][s] for s in raw[1])


def test_tmp_staging_is_removed_after_finalize(s3_server):
    lg = TensorBoardLogger(f"{s3_server['uri']}/x")
    lg.log_metrics({"a": 1.0}, 0)
    staging = lg._staging
    assert staging is not None and staging.startswith(tempfile.gettempdir())
    lg.finalize("success")
    assert not os.path.exists(staging)
    assert any("events.out.tfevents." in p for p in storage.listdir(lg.log_dir))


def test_report_reads_tensorboard_runs(tmp_path):
    from raytrainer.cli.common import read_metrics, resolve_run_dir

    trainer = rt.Trainer(**QUIET, max_epochs=1, default_root_dir=str(tmp_path), enable_checkpointing=False)
    trainer.fit(make_module(rt), data(), data(seed=1))
    run = resolve_run_dir(str(tmp_path))
    assert run == trainer.log_dir
    rows = read_metrics(run)
    assert [int(r["step"]) for r in rows if "train_loss_step" in r] == list(range(16))
    assert [round(r["train_loss_step"], 5) for r in rows if "train_loss_step" in r] == \
        [v for _, v in scalars(run)["train_loss_step"]]
    assert "val_loss" in rows[-1] and "train_loss_epoch" in rows[-1]  # the epoch-end values share the last step
