"""RichProgressBar and RichModelSummary: what they draw (read back from rich's recording console), in-process and,
for the bar, on Ray where the driver draws rank 0's events."""
from __future__ import annotations

import re

import pytest
from monitor_models import Tiny, loader

import raytrainer as rt
from raytrainer.callbacks import ModelSummary, RichModelSummary, RichProgressBar
from raytrainer.callbacks.model_summary import summarize


def _kw(root, **kw):
    base = dict(max_epochs=2, limit_val_batches=2, enable_model_summary=False, enable_checkpointing=False,
                default_root_dir=str(root))
    base.update(kw)
    return base


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines() if line.strip()]


def test_rich_bar_final_line_shows_batches_and_metrics(tmp_path):
    bar = RichProgressBar(console_kwargs={"record": True, "width": 200})
    trainer = rt.Trainer(callbacks=[bar], logger=rt.loggers.CSVLogger(str(tmp_path)), **_kw(tmp_path))
    assert trainer.progress_bar_callback is bar                   # the Trainer adds no TQDM bar beside it
    trainer.fit(Tiny(), loader(), loader(n=8))
    lines = _lines(bar._console.export_text())
    assert len(lines) == 1, lines                                 # leave=False: one bar, redrawn each epoch
    last = lines[-1]
    assert last.startswith("Epoch 1/1") and " 8/8 " in last       # the last epoch, all of its 8 batches
    shown = dict(re.findall(r"(\w+): ([-\d.]+)", last))
    assert set(shown) == {"v_num", "loss", "val_loss"}
    assert float(shown["loss"]) == pytest.approx(float(trainer.progress_bar_metrics["loss"]), abs=5e-4)
    assert float(shown["val_loss"]) == pytest.approx(float(trainer.progress_bar_metrics["val_loss"]), abs=5e-4)
    # a test call draws its own bar and stops
    trainer.test(Tiny(), loader(n=8))
    test_lines = _lines(bar._console.export_text())
    assert len(test_lines) == 1 and test_lines[0].startswith("Testing") and " 2/2 " in test_lines[0]


def test_rich_bar_leave_keeps_every_epoch(tmp_path):
    bar = RichProgressBar(leave=True, console_kwargs={"record": True, "width": 200})
    trainer = rt.Trainer(callbacks=[bar], logger=False, **_kw(tmp_path, max_epochs=3, limit_val_batches=0))
    trainer.fit(Tiny(), loader(n=24))
    lines = _lines(bar._console.export_text())
    assert [line.split()[:2] for line in lines] == [["Epoch", "0/2"], ["Epoch", "1/2"], ["Epoch", "2/2"]]
    assert all(" 6/6 " in line and "loss: " in line for line in lines)


def test_rich_bar_arguments_and_enable_progress_bar(tmp_path):
    with pytest.raises(ValueError, match="refresh_rate"):
        RichProgressBar(refresh_rate=-1)
    with pytest.raises(Exception, match="enable_progress_bar"):
        rt.Trainer(callbacks=[RichProgressBar()], enable_progress_bar=False, **_kw(tmp_path))


def test_rich_model_summary_lists_layers_and_counts(tmp_path, capsys):
    summary = RichModelSummary(max_depth=2, console_kwargs={"record": True, "width": 200})
    trainer = rt.Trainer(callbacks=[summary], logger=False, enable_progress_bar=False,
                         **_kw(tmp_path, max_epochs=1, enable_model_summary=True, limit_val_batches=0))
    assert [c for c in trainer.callbacks if isinstance(c, ModelSummary)] == [summary]   # no second summary
    model = Tiny()
    trainer.fit(model, loader(n=8))
    text = summary.console.export_text()
    assert "Total params" in capsys.readouterr().out                 # printed to the terminal too
    # the same rows as ModelSummary's plain table: index, name, type, params
    plain = summarize(model, 2).splitlines()
    rows = [[c.strip() for c in line.split("|")] for line in plain[2:] if "|" in line]
    for idx, name, kind, params in rows:
        assert re.search(rf"│\s*{idx}\s*│\s*{re.escape(name)}\s*│\s*{kind}\s*│\s*{re.escape(params)}\s*│", text), \
            (name, text)
    assert [r[1] for r in rows] == ["net", "net.0", "net.1", "net.2"]
    assert [r[3] for r in rows] == ["49", "40", "0", "9"]
    for label, value in (("Trainable params:", "49"), ("Non-trainable params:", "0"), ("Total params:", "49")):
        assert re.search(rf"{label}\s+{value}\b", text), (label, text)
    with pytest.raises(TypeError, match="unknown arguments"):
        RichModelSummary(colour="red")


@pytest.fixture(scope="module")
def local_ray():
    """As tests/launchers/ray/conftest.py's fixture: a local Ray instance for this module."""
    import ray

    from raytrainer.launchers.ray.group import ensure_ray

    if ray.is_initialized():
        ray.shutdown()
    started = ensure_ray(10, address="local")
    yield
    if started:
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_rich_bar_and_monitors_on_ray(local_ray, tmp_path):
    """2 ranks: the driver's bar draws rank 0's epochs with exact totals; the monitors log through rank 0."""
    import csv

    from monitor_models import batch_size

    from raytrainer.callbacks import DeviceStatsMonitor, ThroughputMonitor

    bar = RichProgressBar(console_kwargs={"record": True, "width": 200})
    trainer = rt.Trainer(num_processes=2, callbacks=[bar, DeviceStatsMonitor(),
                                                     ThroughputMonitor(batch_size, window_size=2)],
                         logger=rt.loggers.CSVLogger(str(tmp_path)), log_every_n_steps=1,
                         **_kw(tmp_path, limit_val_batches=0))
    trainer.fit(Tiny(), loader(n=32))                             # 16 rows per rank: 4 batches per epoch
    assert trainer.global_step == 8
    lines = _lines(bar._console.export_text())
    assert len(lines) == 1 and lines[0].startswith("Epoch 1/1") and " 4/4 " in lines[0], lines
    assert "loss: " in lines[0] and "v_num: " in lines[0]
    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    keys = {k for r in rows for k, v in r.items() if v != ""}
    assert "DeviceStatsMonitor.on_train_batch_end/cpu_percent" in keys
    # world size 2: the global rates beside the per-device ones, twice the per-device rate
    assert {"train/samples_per_sec", "train/device/samples_per_sec", "train/batches_per_sec"} <= keys
    rates = [(float(r["train/samples_per_sec"]), float(r["train/device/samples_per_sec"]))
             for r in rows if r.get("train/samples_per_sec", "") != ""]
    assert rates and all(g == pytest.approx(2 * d) for g, d in rates)
    assert [int(r["train/samples"]) for r in rows if r.get("train/samples", "") != ""] == [4 * i for i in range(1, 9)]
