"""tpu_cores=N: ranks started by torch_xla.launch (on XLA's CPU backend: one process, a thread per device).

XLA's collectives do not work on its CPU backend with several devices (pytorch/xla#5005, #9089: the
ranks' all-reduces never meet and XLA aborts the process after 10 s), so a full multi-device fit can
only run on a TPU. Here the launcher's own work is tested: starting the ranks, each rank's context,
device and data shard, rank-0-only writes, results coming back in rank order, and failures (an
exception, a crash, a stall) reaching the caller as errors that say which rank and why.
"""
from __future__ import annotations

import os
import pickle
import sys
import time

import pytest

pytest.importorskip("torch_xla", reason="torch_xla is not installed here: run these tests with `make test-xla`")

import rankfns  # noqa: E402
import torch  # noqa: E402

from raytrainer.launchers.base import merge_predictions  # noqa: E402
from raytrainer.launchers.xla import run_on_devices  # noqa: E402

pytestmark = [pytest.mark.xla_launch, pytest.mark.usefixtures("fresh_runtime")]
CPU_BACKEND = os.environ.get("PJRT_DEVICE", "CPU").upper() == "CPU"


@pytest.fixture
def two_cpu_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    if CPU_BACKEND:
        monkeypatch.setenv("CPU_NUM_DEVICES", "2")  # read by the rank process when its runtime starts


@pytest.mark.timeout(120)
def test_two_ranks_get_their_own_device_context_and_data_shard(tmp_path, two_cpu_devices):
    results = run_on_devices(rankfns.plumbing, (pickle.dumps(["parent"]), str(tmp_path)), heartbeat_timeout_s=60)

    assert [r["rank"] for r in results] == [0, 1]
    assert [r["world"] for r in results] == [2, 2]
    assert {r["device"] for r in results} == {"xla:0", "xla:1"}
    # ranks share no Python objects: each unpickled its own copy of what the launcher sent
    assert [r["payload"] for r in results] == [["parent", 0], ["parent", 1]]
    # only rank 0 wrote, and the file says so
    assert sorted(os.listdir(tmp_path)) == ["written-by-rank0.txt"]
    assert (tmp_path / "written-by-rank0.txt").read_text() == "0"
    # ordered sharding: rank 0 has the first half of the data, rank 1 the second; merged in rank order
    assert results[0]["rows"].tolist() == [0, 1, 2, 3, 4] and results[1]["rows"].tolist() == [5, 6, 7, 8, 9]
    merged = merge_predictions([(1, [r["out"]]) for r in results])
    reference = rankfns.fixed_layer()(torch.arange(10, dtype=torch.float32).repeat(4, 1).T).detach()
    torch.testing.assert_close(torch.cat(merged), reference, rtol=1e-5, atol=1e-5)
    if CPU_BACKEND:  # the CPU backend runs every device as a thread of one process
        assert results[0]["pid"] == results[1]["pid"] != os.getpid()


@pytest.mark.timeout(120)
def test_exception_in_a_rank_is_raised_with_its_rank_and_traceback(two_cpu_devices):
    with pytest.raises(rankfns.RankFailed, match="rank 1 failed on purpose") as info:
        run_on_devices(rankfns.fail_on_rank1, heartbeat_timeout_s=60)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "raised on XLA rank 1" in notes and "fail_on_rank1" in notes


@pytest.mark.timeout(120)
def test_a_crashed_rank_process_is_an_error_not_a_hang(two_cpu_devices):
    with pytest.raises(RuntimeError, match="died without a Python error"):
        run_on_devices(rankfns.abort_on_rank1, heartbeat_timeout_s=60)


@pytest.mark.timeout(120)
def test_a_stalled_run_is_stopped_after_the_heartbeat_timeout(two_cpu_devices):
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="no progress from XLA rank 0 for 3 s"):
        run_on_devices(rankfns.stall, (600,), heartbeat_timeout_s=3)
    assert time.monotonic() - start < 60


@pytest.mark.timeout(300)
@pytest.mark.skipif(CPU_BACKEND, reason="XLA collectives hang with several devices on XLA's CPU backend "
                    "(pytorch/xla#5005, #9089); a tpu_cores=2 fit needs a TPU")
def test_tpu_cores_2_fit_and_predict(tmp_path):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "examples"))
    from autoencoder import DigitsDataModule, LitAutoEncoder

    import raytrainer as pl

    pl.seed_everything(0)
    trainer = pl.Trainer(tpu_cores=2, max_epochs=2, default_root_dir=str(tmp_path), enable_progress_bar=False)
    model, dm = LitAutoEncoder(), DigitsDataModule()
    before = trainer.validate(model, datamodule=dm, verbose=False)[0]["val_loss"]
    trainer.fit(model, datamodule=dm)
    after = trainer.validate(model, datamodule=dm, verbose=False)[0]["val_loss"]
    assert trainer.world_size == 2 and trainer.global_step == 2 * 11  # 1400 images / (64 per rank x 2 ranks)
    assert after < 0.8 * before
    preds = trainer.predict(model, datamodule=dm)
    assert sum(len(p) for p in preds) == 197 and preds[0].device.type == "cpu"
