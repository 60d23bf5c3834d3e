"""A world that cannot fit this machine is refused before Ray or any rank starts, with the numbers (issue 20, item
11); a normal world still runs, and rank actors that do not start in time get an error naming the likely cause."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import psutil
import pytest
import ray
import torch
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as rt
from raytrainer.core.events import read_events
from raytrainer.io import storage
from raytrainer.launchers.ray.group import RANK_MEMORY_ENV, GroupTimeoutError, WorkerGroup, WorldTooLargeError

pytestmark = pytest.mark.timeout(180)

_TOO_LARGE = r"""
import json, sys, time
t0 = time.monotonic()
import ray, torch
import raytrainer as rt
from torch.utils.data import DataLoader, TensorDataset

class Tiny(rt.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

t1 = time.monotonic()
trainer = rt.Trainer(num_processes=int(sys.argv[1]), ray_address="local", max_steps=1, logger=False,
                     enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
try:
    trainer.fit(Tiny(), DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4))
    out = {"error": None}
except Exception as exc:
    out = {"error": type(exc).__name__, "message": str(exc)}
out.update(fit_s=time.monotonic() - t1, ray=ray.is_initialized())
print("RESULT " + json.dumps(out), flush=True)
"""


class Tiny(rt.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture(scope="module", autouse=True)
def no_ray_session() -> Iterator[None]:
    """These tests start from a process without a Ray session (the check runs only before a local instance
    starts), and leave none behind."""
    if ray.is_initialized():
        ray.shutdown()
    yield
    if ray.is_initialized():
        ray.shutdown()


def test_a_world_far_too_large_is_refused_fast_before_ray_starts(tmp_path):
    """num_processes=512 on this machine: refused in seconds, naming the ranks, the per-rank estimate and the
    available memory, and how to run it anyway or on a cluster; Ray was never started."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", RANK_MEMORY_ENV)}
    # should the check ever regress, Ray must not start 512 workers at once on a shared machine
    env.update(RAY_worker_maximum_startup_concurrency="2", RAY_prestart_worker_first_driver="0")
    proc = subprocess.Popen([sys.executable, "-c", _TOO_LARGE, "512"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and any Ray processes it started
        proc.communicate()
        pytest.fail("a 512-rank world was not refused within 60 s: it tried to start")
    line = next((ln for ln in stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, stderr[-3000:]
    result = json.loads(line[len("RESULT "):])
    assert result["error"] == "WorldTooLargeError", result
    assert result["ray"] is False  # refused before ray.init
    assert result["fit_s"] < 15, result
    message = result["message"]
    assert "512 rank process(es)" in message and "512 x 512 MiB per rank" in message
    assert "GiB of memory available" in message and "CPU core(s)" in message
    assert "ray_address=" in message and "raytrainer fit --address" in message
    assert f"{RANK_MEMORY_ENV}" in message


def test_the_estimate_decides_and_a_normal_two_rank_world_runs(tmp_path, monkeypatch):
    """A 2-rank world whose ranks are said to need more than half the available memory is refused before Ray
    starts; with the default estimate the same world starts Ray, trains, and its checkpoint events (forwarded by
    rank 0) name exactly the files on disk."""
    available_mb = psutil.virtual_memory().available / 2**20
    monkeypatch.setenv(RANK_MEMORY_ENV, str(int(available_mb / 2) + 1))
    data = DataLoader(TensorDataset(torch.randn(16, 2)), batch_size=4)

    def trainer() -> rt.Trainer:
        return rt.Trainer(num_processes=2, ray_address="local", max_steps=4, default_root_dir=str(tmp_path),
                          logger=rt.loggers.CSVLogger(str(tmp_path)), enable_progress_bar=False,
                          enable_model_summary=False,
                          callbacks=[rt.ModelCheckpoint(every_n_train_steps=2, save_top_k=-1, save_last=True)])

    with pytest.raises(WorldTooLargeError, match=r"2 rank process\(es\)"):
        trainer().fit(Tiny(), data)
    assert not ray.is_initialized()

    monkeypatch.setenv(RANK_MEMORY_ENV, "abc")
    with pytest.raises(ValueError, match=rf"{RANK_MEMORY_ENV}='abc' is not a memory size"):
        trainer().fit(Tiny(), data)
    assert not ray.is_initialized()

    monkeypatch.delenv(RANK_MEMORY_ENV)
    t = trainer()
    t.fit(Tiny(), data)
    assert ray.is_initialized() and t.global_step == 4
    events = [e for e in read_events(t.log_dir) if e["event"] == "checkpoint"]
    on_disk = {p for p in storage.listdir(t.checkpoint_callback.dirpath) if p.endswith(".ckpt")}
    assert {e["path"] for e in events} == on_disk and len(on_disk) == 3
    for path in on_disk:
        assert [e for e in events if e["path"] == path][-1]["step"] == storage.load(path)["global_step"]


def test_rank_actors_that_do_not_start_in_time_name_the_likely_cause():
    """On a local instance raytrainer started, a start timeout says: too many ranks for this machine (its CPU cores
    and available memory), and how to run elsewhere."""
    if ray.is_initialized():
        ray.shutdown()  # a fresh instance with its CPUs free (an earlier run may keep its ranks warm)
    group = WorkerGroup("start-timeout", ranks_per_node=1, start_timeout_s=0.001, poll_interval_s=0.01,
                        ray_address="local")
    t0 = time.monotonic()
    with pytest.raises(GroupTimeoutError) as info:
        group.start()
    message = str(info.value)
    assert "starting the rank actors" in message
    assert "Likely cause: too many ranks for this machine: 1 rank process(es)" in message
    assert f"on {os.cpu_count()} CPU core(s)" in message and "GiB of memory available now" in message
    assert "ray_address=" in message and "raytrainer fit --address" in message
    assert time.monotonic() - t0 < 60
