"""Profilers: SimpleProfiler, AdvancedProfiler, PyTorchProfiler and Trainer(profiler=...), with the report
files and action names compared against pytorch_lightning's."""
from __future__ import annotations

import json
import os
import pickle
import re
import time

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as pl
from raytrainer.core.hooks import Hooks
from raytrainer.profilers import AdvancedProfiler, PassThroughProfiler, PyTorchProfiler, SimpleProfiler
from raytrainer.utilities.exceptions import MisconfigurationException

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")


def build(base):
    class Model(base.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

        def validation_step(self, batch, batch_idx):
            self.log("val", self.layer(batch[0]).sum())

        def test_step(self, batch, batch_idx):
            pass

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class CB(base.Callback):
        def on_train_batch_end(self, *args):
            pass

    return Model, CB


CB_KEY = "build.<locals>.CB"  # a callback's state_key: its qualified name, in both frameworks


def loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4)


def fit_and_test(base, profiler, root) -> object:
    Model, CB = build(base)
    trainer = base.Trainer(max_epochs=1, profiler=profiler, logger=False, enable_checkpointing=False,
                           enable_progress_bar=False, enable_model_summary=False, callbacks=[CB()],
                           default_root_dir=str(root))
    trainer.fit(Model(), loader(), loader())
    trainer.test(trainer.lightning_module, loader(), verbose=False)
    return trainer


def actions(path) -> set[str]:
    """The action names of a SimpleProfiler report file."""
    return {m.group(1) for line in open(path) if (m := re.match(r"\|  (\S+)\s*\t\|", line))} - {"Action", "Total"}


def test_simple_profiler_reports_lightnings_action_names_in_the_same_files(L, tmp_path):
    ours_dir, theirs_dir = tmp_path / "rt", tmp_path / "pl"
    fit_and_test(pl, SimpleProfiler(dirpath=ours_dir, filename="perf"), tmp_path)
    fit_and_test(L, L.profilers.SimpleProfiler(dirpath=theirs_dir, filename="perf"), tmp_path)
    assert sorted(os.listdir(ours_dir)) == sorted(os.listdir(theirs_dir)) == ["fit-perf.txt", "test-perf.txt"]
    ours, theirs = actions(ours_dir / "fit-perf.txt"), actions(theirs_dir / "fit-perf.txt")
    assert ours <= theirs, f"names Lightning does not use: {sorted(ours - theirs)}"
    assert {"run_training_epoch", "run_training_batch", "[_TrainingEpochLoop].train_dataloader_next",
            "[_EvaluationLoop].val_next", "[Strategy]SingleDeviceStrategy.training_step",
            "[Strategy]SingleDeviceStrategy.validation_step", "[Strategy]SingleDeviceStrategy.backward",
            "[LightningModule]Model.optimizer_step", "[LightningModule]Model.optimizer_zero_grad",
            f"[Callback]{CB_KEY}.on_train_batch_end", f"[Callback]{CB_KEY}.on_before_backward",
            f"[Callback]{CB_KEY}.setup",
            "[LightningModule]Model.on_train_batch_end", "[LightningModule]Model.on_validation_epoch_end",
            "[LightningModule]Model.on_fit_start"} <= ours
    test_ours = actions(ours_dir / "test-perf.txt")
    assert {"[Strategy]SingleDeviceStrategy.test_step", "[_EvaluationLoop].test_next"} <= test_ours
    text = (ours_dir / "fit-perf.txt").read_text()
    assert text.startswith("FIT Profiler Report") and "Mean duration (s)" in text and "Percentage %" in text
    # the counts are the calls: 2 training batches, 1 epoch
    row = next(line for line in text.splitlines() if line.startswith("|  run_training_batch"))
    assert row.split("|")[3].strip() == "2"


def test_simple_profiler_records_durations_and_refuses_unbalanced_calls():
    profiler = SimpleProfiler(extended=False)
    for _ in range(3):
        with profiler.profile("sleep"):
            time.sleep(0.01)
    assert len(profiler.recorded_durations["sleep"]) == 3
    assert all(d >= 0.009 for d in profiler.recorded_durations["sleep"])
    profiler.start("a")
    with pytest.raises(ValueError, match="already started"):
        profiler.start("a")
    profiler.stop("a")
    with pytest.raises(ValueError, match="never started"):
        profiler.stop("b")
    summary = profiler.summary()
    assert "Total time (s)" in summary and "Num calls" not in summary and "|  sleep" in summary
    assert pickle.loads(pickle.dumps(profiler)).recorded_durations["sleep"] == profiler.recorded_durations["sleep"]


def test_the_report_goes_to_the_log_without_a_filename(tmp_path, caplog):
    with caplog.at_level("INFO", logger="raytrainer"):
        fit_and_test(pl, "simple", tmp_path)
    err = caplog.text
    assert "FIT Profiler Report" in err and "TEST Profiler Report" in err
    assert "[Strategy]SingleDeviceStrategy.training_step" in err


def test_profiler_names_and_objects(L):
    assert isinstance(pl.Trainer(profiler="simple").profiler, SimpleProfiler)
    assert isinstance(pl.Trainer(profiler="Advanced").profiler, AdvancedProfiler)
    assert isinstance(pl.Trainer(profiler="pytorch").profiler, PyTorchProfiler)
    mine = SimpleProfiler()
    assert pl.Trainer(profiler=mine).profiler is mine
    with pytest.raises(L.utilities.exceptions.MisconfigurationException):
        L.Trainer(profiler="fast")
    with pytest.raises(MisconfigurationException, match=r"one of \['simple', 'advanced', 'pytorch'\]"):
        pl.Trainer(profiler="fast")
    with pytest.raises(MisconfigurationException, match="XLA profiler"):
        pl.Trainer(profiler="xla")
    with pytest.raises(MisconfigurationException, match="got int"):
        pl.Trainer(profiler=3)
    assert sorted(pl.profilers.__all__) >= sorted(n for n in L.profilers.__all__ if n != "XLAProfiler")


def test_without_a_profiler_nothing_is_wrapped(tmp_path):
    """The hot path stays as it was: no profiled dispatch, the plain step and hook functions."""
    seen = {}

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            hooks = trainer.session.hooks
            seen["profiler"] = trainer.session.profiler
            seen["call"] = "call" in vars(hooks)  # a profiled run replaces call on the instance
            seen["hot"] = hooks.hot["on_train_batch_end"]
            seen["backward"] = "backward" in vars(trainer.session.precision)

    Model, _ = build(pl)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[Probe()], default_root_dir=str(tmp_path))
    trainer.fit(Model(), loader())
    assert isinstance(trainer.profiler, PassThroughProfiler)
    assert seen["profiler"] is None and not seen["call"] and not seen["backward"]
    assert len(seen["hot"]) == 1 and seen["hot"][0].func.__self__.__class__ is Probe  # only the override, unwrapped
    assert Hooks.call is type(trainer.session.hooks).call


def test_advanced_profiler_reports_cprofile_stats_per_action(tmp_path):
    profiler = AdvancedProfiler(dirpath=tmp_path, filename="adv", dump_stats=True, line_count_restriction=5)
    fit_and_test(pl, profiler, tmp_path)
    text = (tmp_path / "fit-adv.txt").read_text()
    assert text.startswith("FIT Profiler Report")
    assert "Profile stats for: [Strategy]SingleDeviceStrategy.training_step" in text and "ncalls" in text
    assert (tmp_path / "fit-adv-run_training_epoch.prof").exists()
    copy = pickle.loads(pickle.dumps(profiler))  # cProfile objects stay behind; settings travel
    assert copy.filename == "adv" and copy.line_count_restriction == 5 and not copy.profiled_actions


def test_pytorch_profiler_writes_the_table_and_a_chrome_trace(tmp_path):
    profiler = PyTorchProfiler(dirpath=tmp_path, filename="torch", row_limit=-1)
    fit_and_test(pl, profiler, tmp_path)
    text = (tmp_path / "fit-torch.txt").read_text()
    assert text.startswith("FIT Profiler Report") and "Profile stats for: records" in text
    assert "[Strategy]SingleDeviceStrategy.training_step" in text  # actions are record_function ranges
    trace = json.loads((tmp_path / "fit-torch.pt.trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert "run_training_batch" in names and any(str(n).startswith("aten::") for n in names)
    assert (tmp_path / "test-torch.pt.trace.json").exists()
    with pytest.raises(TypeError, match="does not take"):
        PyTorchProfiler(not_an_argument=1)
    with pytest.raises(ValueError, match="record_shapes"):
        PyTorchProfiler(group_by_input_shapes=True)
