"""Elastic ranges on a simulated multi-node Ray cluster: a node leaves, a node joins."""
from __future__ import annotations

import glob
import json
import threading
import time

import pytest
import torch
from ft_models import Regression, events, kept_ids, loader

import raytrainer as pl
from raytrainer.callbacks import Timer, WeightAveraging

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


@pytest.fixture
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        yield c
    finally:
        for attempt in range(3):  # a fit thread left running by a failed test may have reconnected: cut it off again
            ray.shutdown()
            try:
                c.shutdown()
                break
            except ValueError:
                if attempt == 2:
                    raise


class TimerAtStart(pl.Callback):
    """Rank 0 appends the step and its Timer's training time at every train start (each world's first step)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer, pl_module):
        timer = next(c for c in trainer.callbacks if isinstance(c, Timer))  # this rank's copy
        if trainer.global_rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": trainer.global_step, "elapsed": timer.time_elapsed("train")}) + "\n")


def _connect(cluster) -> None:
    import ray

    cluster.wait_for_nodes(timeout=60)
    ray.init(address=cluster.address, logging_level="warning")


def _fit_in_background(trainer, model, data) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def target() -> None:
        try:
            trainer.fit(model, data)
        except BaseException as exc:  # surfaced by the test
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def _wait_for(predicate, timeout: float) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_node_removed_run_completes_and_every_sample_is_used_once_per_epoch(cluster, tmp_path):
    nodes = [cluster.add_node(num_cpus=1), cluster.add_node(num_cpus=1)]
    _connect(cluster)
    n = 240
    trainer = pl.Trainer(num_nodes="1:2", num_processes=1, max_epochs=4, max_failures=2,
                         default_root_dir=str(tmp_path), enable_progress_bar=False, enable_model_summary=False,
                         scale_check_interval_s=1.0, placement_timeout_s=30, snapshot_every_n_steps=1)
    thread, box = _fit_in_background(trainer, Regression(ids_path=str(tmp_path / "ids"), sleep_s=0.03),
                                     loader(n, batch_size=10))
    assert _wait_for(lambda: any(e["event"] == "checkpoint" for e in events(str(tmp_path))), 120)
    cluster.remove_node(nodes[1])  # the node of one rank disappears mid-run (main thread: Ray needs it)
    thread.join(300)
    assert not thread.is_alive() and "error" not in box, box.get("error")
    ev = events(str(tmp_path))
    kinds = [e["event"] for e in ev]
    assert "failure" in kinds and kinds[-1] == "finish"
    assert ev[-1]["world_size"] == 1, "the run must finish on the one node left"

    kept = kept_ids(str(tmp_path), ev)
    for epoch in range(4):
        ids = sorted(i for r in kept if r["epoch"] == epoch for i in r["ids"])
        assert ids == list(range(n)), f"epoch {epoch}: {len(ids)} ids, {len(set(ids))} distinct"


def test_node_added_world_grows_within_10s(cluster, tmp_path):
    """The world grows within 10 s of a node joining, and the callbacks' state crosses the resize: the weight
    average counts every step of the run, the Timer's training time runs on from before it."""
    cluster.add_node(num_cpus=1)
    _connect(cluster)
    average, timer = WeightAveraging(), Timer()
    starts = TimerAtStart(str(tmp_path / "timer_starts.jsonl"))
    trainer = pl.Trainer(num_nodes="1:2", num_processes=1, max_epochs=30, default_root_dir=str(tmp_path),
                         enable_progress_bar=False, enable_model_summary=False, scale_check_interval_s=1.0,
                         placement_timeout_s=30, callbacks=[average, timer, starts])
    thread, box = _fit_in_background(trainer, Regression(sleep_s=0.03), loader(240, batch_size=10))
    assert _wait_for(lambda: any(e["event"] == "checkpoint" for e in events(str(tmp_path))), 120)
    cluster.add_node(num_cpus=1)  # returns once the node has joined (starting its raylet takes seconds under load)
    added = time.time()
    assert _wait_for(lambda: any(e["event"] == "resize" for e in events(str(tmp_path))), 60)
    ev = events(str(tmp_path))
    resize = next(e for e in ev if e["event"] == "resize")
    assert resize["world_size"] == 2
    # raytrainer's reaction: the ranks stop (and checkpoint) at an agreed step within 10 s of the node joining; the
    # new ranks' start after that is Ray's actor start and torch's import (5-15 s on a loaded 2-core machine)
    stopped = min((e["time"] for e in ev if e["event"] == "checkpoint" and e["step"] == resize["step"]),
                  default=resize["time"])
    assert stopped - added <= 10.0, f"the ranks stopped to grow {stopped - added:.1f} s after the node joined"
    assert resize["time"] - added <= 60.0, f"grew after {resize['time'] - added:.1f} s"
    thread.join(300)
    assert not thread.is_alive() and "error" not in box, box.get("error")
    assert trainer.world_size == 2
    # the last checkpoint's average folded in every optimizer step, before the resize and after it
    ckpts = [torch.load(p, weights_only=True) for p in glob.glob(str(tmp_path / "**" / "*.ckpt"), recursive=True)]
    ckpt = max(ckpts, key=lambda c: c["global_step"])
    assert int(ckpt["averaging_state"]["n_averaged"]) == ckpt["global_step"] == trainer.global_step
    assert average.state_dict() == {"latest_update_step": trainer.global_step}  # rank 0's, on the driver
    # rank 0 of the grown world started its Timer from the training time before the resize (each step sleeps 0.03 s)
    starts = [json.loads(line) for line in open(tmp_path / "timer_starts.jsonl")]
    assert [r["step"] for r in starts] == [0, resize["step"]]
    assert starts[0]["elapsed"] < 1.0 and starts[1]["elapsed"] >= resize["step"] * 0.03
    assert timer.time_elapsed("train") >= trainer.global_step * 0.03  # rank 0 trained (and slept) every step


def test_fsdp_grows_3_to_4_and_shrinks_4_to_3_resharding_its_snapshots(cluster, tmp_path):
    """A sharded (FSDP) run on one-CPU nodes: a fourth node joins (3 -> 4 ranks, the shards of the stop step are
    resharded 3 -> 4), then one leaves (4 -> 3: the lost rank's shards come from the copy on its holder's node and
    are resharded 4 -> 3). No checkpoint is read, and every sample is used exactly once per epoch."""
    nodes = [cluster.add_node(num_cpus=1) for _ in range(3)]
    _connect(cluster)
    n, epochs = 240, 6
    trainer = pl.Trainer(strategy="fsdp", num_nodes="3:4", num_processes=1, max_epochs=epochs, max_failures=2,
                         default_root_dir=str(tmp_path), enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, scale_check_interval_s=1.0, placement_timeout_s=30,
                         snapshot_every_n_steps=1)
    thread, box = _fit_in_background(trainer, Regression(ids_path=str(tmp_path / "ids"), sleep_s=0.05),
                                     loader(n, batch_size=10))
    assert _wait_for(lambda: len(glob.glob(str(tmp_path / "ids.*"))) >= 3, 120)
    nodes.append(cluster.add_node(num_cpus=1))
    assert _wait_for(lambda: any(e["event"] == "resize" for e in events(str(tmp_path))), 60)
    resized = next(e for e in events(str(tmp_path)) if e["event"] == "resize")
    assert _wait_for(lambda: any(r.get("world") == 4 for path in glob.glob(str(tmp_path / "ids.*"))
                                 for r in map(json.loads, open(path)) if r["time"] > resized["time"]), 60)
    cluster.remove_node(nodes[1])  # a rank's node disappears (main thread: Ray needs it)
    thread.join(300)
    assert not thread.is_alive() and "error" not in box, box.get("error")
    ev = events(str(tmp_path))
    kinds = [e["event"] for e in ev]
    assert resized["world_size"] == 4 and "failure" in kinds and kinds[-1] == "finish", kinds
    assert "snapshot_fallback" not in kinds, "the lost rank's shards should have come from its holder's copy"
    assert ev[-1]["world_size"] == 3
    kept = kept_ids(str(tmp_path), ev)
    for epoch in range(epochs):
        ids = sorted(i for r in kept if r["epoch"] == epoch for i in r["ids"])
        assert ids == list(range(n)), f"epoch {epoch}: {len(ids)} ids, {len(set(ids))} distinct"


def test_parquet_shrink_then_grow_trains_every_row_once_per_epoch(cluster, tmp_path, parquet_writer):
    """A ParquetDataset on an elastic run: 2 ranks -> a node leaves (1) -> a node joins (2); each epoch still
    trains every row exactly once, the rows left in an epoch re-split over the new world each time."""
    from raytrainer.data import ParquetDataset

    n = parquet_writer(tmp_path / "data", n=1200, files=3, row_group=100)
    nodes = [cluster.add_node(num_cpus=1), cluster.add_node(num_cpus=1)]
    _connect(cluster)
    epochs = 10  # long enough at world 1 for the joining node's ranks to start (5-15 s on a loaded 2-core machine)
    trainer = pl.Trainer(num_nodes="1:2", num_processes=1, max_epochs=epochs, max_failures=2,
                         default_root_dir=str(tmp_path), enable_progress_bar=False, enable_model_summary=False,
                         scale_check_interval_s=1.0, placement_timeout_s=30, snapshot_every_n_steps=1)
    data = ParquetDataset(str(tmp_path / "data"), batch_size=20, shuffle=True, shuffle_buffer_size=150,
                          columns=["id", "x", "y"])
    thread, box = _fit_in_background(trainer, Regression(ids_path=str(tmp_path / "ids"), sleep_s=0.05), data)
    assert _wait_for(lambda: any(e["event"] == "checkpoint" for e in events(str(tmp_path))), 120)
    cluster.remove_node(nodes[1])
    assert _wait_for(lambda: any(e["event"] == "restart" for e in events(str(tmp_path))), 120)
    cluster.add_node(num_cpus=1)
    thread.join(300)
    assert not thread.is_alive() and "error" not in box, box.get("error")
    ev = events(str(tmp_path))
    kinds = [e["event"] for e in ev]
    assert "failure" in kinds and "resize" in kinds and kinds[-1] == "finish", kinds
    worlds = [e["world_size"] for e in ev if e["event"] in ("start", "restart", "resize")]
    assert worlds[:1] == [2] and 1 in worlds and worlds[-1] == 2, worlds
    kept = kept_ids(str(tmp_path), ev)
    for epoch in range(epochs):
        ids = sorted(i for r in kept if r["epoch"] == epoch for i in r["ids"])
        assert ids == list(range(n)), f"epoch {epoch}: {len(ids)} ids, {len(set(ids))} distinct"
