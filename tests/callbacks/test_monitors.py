"""DeviceStatsMonitor and ThroughputMonitor against pytorch_lightning: the same metric names on the same logger
steps, with values consistent with the run."""
from __future__ import annotations

import csv

import pytest
from monitor_models import Tiny, TinyMixin, loader

import raytrainer as rt
from raytrainer.callbacks import DeviceStatsMonitor, ThroughputMonitor
from raytrainer.loggers import CSVLogger
from raytrainer.utilities.exceptions import MisconfigurationException


def _kw(root, **kw):
    base = dict(max_epochs=2, limit_val_batches=2, log_every_n_steps=1, enable_progress_bar=False,
                enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(root))
    base.update(kw)
    return base


def _rows(path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _run_both(L, tmp_path, make_cb, **kw):
    """Fit the same tiny run with raytrainer and with Lightning, each with a CSVLogger; both metrics.csv rows."""
    rt_dir, pl_dir = tmp_path / "rt", tmp_path / "pl"
    rt.seed_everything(0)
    trainer = rt.Trainer(logger=CSVLogger(str(rt_dir)), callbacks=[make_cb(rt)], **_kw(rt_dir, **kw))
    trainer.fit(Tiny(), loader(), loader(n=8))

    class PLTiny(TinyMixin, L.LightningModule):
        pass

    L.seed_everything(0)
    cb_pl = make_cb(L)
    pl_trainer = L.Trainer(logger=L.loggers.CSVLogger(str(pl_dir)), callbacks=[cb_pl], accelerator="cpu",
                           **_kw(pl_dir, **kw))
    pl_trainer.fit(PLTiny(), loader(), loader(n=8))
    return (trainer, _rows(rt_dir / "lightning_logs" / "version_0" / "metrics.csv"),
            _rows(pl_dir / "lightning_logs" / "version_0" / "metrics.csv"))


def _picked(rows, prefix):
    """(step, sorted non-empty keys starting with prefix) of every row holding such a key."""
    out = []
    for r in rows:
        keys = sorted(k for k, v in r.items() if k.startswith(prefix) and v != "")
        if keys:
            out.append((int(r["step"]), keys))
    return out


def test_device_stats_monitor_matches_lightning(L, tmp_path):
    trainer, ours, theirs = _run_both(
        L, tmp_path, lambda m: m.callbacks.DeviceStatsMonitor() if m is not rt else DeviceStatsMonitor())
    mine, ref = _picked(ours, "DeviceStatsMonitor"), _picked(theirs, "DeviceStatsMonitor")
    assert mine == ref
    hooks = {k.split("/")[0] for _, keys in mine for k in keys}
    assert hooks == {f"DeviceStatsMonitor.on_{s}_batch_{w}" for s in ("train", "validation") for w in ("start", "end")}
    names = {k.split("/", 1)[1] for _, keys in mine for k in keys}
    assert names == {"cpu_percent", "cpu_vm_percent", "cpu_swap_percent"}
    # one row per hook call: 8 training batches x 2 hooks at steps 0..7, plus validation rows
    train = [s for s, keys in mine if keys[0].startswith("DeviceStatsMonitor.on_train")]
    assert train == sorted([s for s in range(trainer.global_step) for _ in (0, 1)])
    for r in ours:
        for k, v in r.items():
            if k.startswith("DeviceStatsMonitor") and v != "":
                assert 0.0 <= float(v) <= 100.0, (k, v)
                if k.endswith("cpu_vm_percent"):
                    assert float(v) > 0.0, (k, v)  # some memory is always in use


def test_device_stats_monitor_log_every_n_steps_and_cpu_stats_false(tmp_path):
    trainer = rt.Trainer(logger=CSVLogger(str(tmp_path)), callbacks=[DeviceStatsMonitor()],
                         **_kw(tmp_path, log_every_n_steps=3, limit_val_batches=0))
    trainer.fit(Tiny(), loader())
    rows = _picked(_rows(tmp_path / "lightning_logs" / "version_0" / "metrics.csv"), "DeviceStatsMonitor")
    # Lightning logs when (step + 1) % 3 == 0, at the batch's start and end
    assert [s for s, _ in rows] == [s for s in range(trainer.global_step) if (s + 1) % 3 == 0 for _ in (0, 1)]
    assert trainer.global_step == 16
    off = rt.Trainer(logger=CSVLogger(str(tmp_path / "off")), callbacks=[DeviceStatsMonitor(cpu_stats=False)],
                     **_kw(tmp_path / "off", limit_val_batches=0))
    off.fit(Tiny(), loader())
    assert _picked(_rows(tmp_path / "off" / "lightning_logs" / "version_0" / "metrics.csv"),
                   "DeviceStatsMonitor") == []


def test_device_stats_monitor_needs_a_logger(tmp_path):
    trainer = rt.Trainer(logger=False, callbacks=[DeviceStatsMonitor()], **_kw(tmp_path))
    with pytest.raises(MisconfigurationException, match="logger"):
        trainer.fit(Tiny(), loader())


def _bs(batch) -> int:
    return int(batch[0].size(0))


def _items(batch) -> int:
    return int(batch[0].numel())  # 4 features per sample: "items"


def test_throughput_monitor_matches_lightning_names_and_is_consistent(L, tmp_path):
    def make(m):
        cls = ThroughputMonitor if m is rt else m.callbacks.ThroughputMonitor
        return cls(batch_size_fn=_bs, length_fn=_items, window_size=3)

    with pytest.warns(UserWarning, match="flops_per_batch"):
        trainer, ours, theirs = _run_both(L, tmp_path, make)
    names = {k for r in ours for k, v in r.items() if v != "" and "/" in k and k.split("/")[0] in ("train", "validate")}
    ref = {k for r in theirs for k, v in r.items() if v != "" and "/" in k and k.split("/")[0] in ("train", "validate")}
    assert names == ref
    assert "train/device/samples_per_sec" in names and "validate/time" in names
    assert _picked(ours, "train/") == _picked(theirs, "train/")         # same steps, same keys per row
    assert _picked(ours, "validate/") == _picked(theirs, "validate/")
    train = [r for r in ours if r.get("train/time", "") != ""]
    assert len(train) == trainer.global_step == 16
    batches = [int(float(r["train/batches"])) for r in train]
    assert batches == list(range(1, 17))                                # counted over the whole fit
    counters = ("train/batches", "train/samples", "train/lengths", "validate/batches", "validate/samples")
    assert [[r[k] for k in counters] for r in ours if r.get("train/time", "") + r.get("validate/time", "")] == \
        [[r[k] for k in counters] for r in theirs if r.get("train/time", "") + r.get("validate/time", "")]
    samples = [int(float(r["train/samples"])) for r in train]
    assert samples == [4 * b for b in batches]
    assert [int(float(r["train/lengths"])) for r in train] == [4 * s for s in samples]
    times = [float(r["train/time"]) for r in train]
    for i, r in enumerate(train):
        assert times[i] > 0 and (i == 0 or times[i] > times[i - 1])
        if r["train/device/samples_per_sec"] == "":
            assert batches[i] < 3                                       # the window (3 updates) is not full yet
            continue
        j = i - 2                                                       # the window's first update
        span = times[i] - times[j]
        assert float(r["train/device/samples_per_sec"]) == pytest.approx((samples[i] - samples[j]) / span, rel=1e-5)
        assert float(r["train/device/batches_per_sec"]) == pytest.approx(2 / span, rel=1e-5)
        assert float(r["train/device/items_per_sec"]) == pytest.approx(4 * (samples[i] - samples[j]) / span,
                                                                       rel=1e-5)


def test_throughput_monitor_test_stage_and_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="window_size"):
        ThroughputMonitor(_bs, window_size=1)
    with pytest.raises(TypeError, match="batch_size_fn"):
        ThroughputMonitor(batch_size_fn=4)
    trainer = rt.Trainer(logger=CSVLogger(str(tmp_path)), callbacks=[ThroughputMonitor(_bs, window_size=2)],
                         **_kw(tmp_path))
    with pytest.warns(UserWarning, match="flops_per_batch"):
        trainer.test(Tiny(), loader(n=12))
    rows = [r for r in _rows(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") if r.get("test/batches")]
    assert [(int(r["step"]), int(r["test/batches"]), int(r["test/samples"])) for r in rows] == \
        [(1, 1, 4), (2, 2, 8), (3, 3, 12)]
    assert all(r["test/device/batches_per_sec"] != "" for r in rows[1:])


def test_throughput_monitor_reports_flops(tmp_path):
    model = Tiny()
    model.flops_per_batch = 1000
    trainer = rt.Trainer(logger=CSVLogger(str(tmp_path)), callbacks=[ThroughputMonitor(_bs, window_size=2)],
                         **_kw(tmp_path, max_epochs=1, limit_val_batches=0))
    trainer.fit(model, loader(n=12))
    logged = [r for r in _rows(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") if r.get("train/time")]
    assert len(logged) == 3
    times = [float(r["train/time"]) for r in logged]
    assert logged[0]["train/device/flops_per_sec"] == ""  # the window (2 updates) is not full yet
    for i in (1, 2):  # one batch's FLOPs over the time between the window's two updates
        assert float(logged[i]["train/device/flops_per_sec"]) == pytest.approx(1000 / (times[i] - times[i - 1]),
                                                                               rel=1e-5)
