"""The Trainer on a real multi-node Ray cluster (ray.cluster_utils: a CPU-less head and two 2-CPU nodes).

Kept apart from test_ray_trainer.py because a process cannot hold this cluster and a plain local
instance at the same time. The Trainer joins the session the fixture connected, as a script run
under ``ray job submit`` would.
"""
from __future__ import annotations

import time

import pytest
import ray
from conftest import alive_rank_actors, assert_only_the_warm_group_left
from trainer_models import RankProbe, Regression, loader, read_probes, regression_data

import raytrainer as pl
from raytrainer.launchers.ray.group import PlacementError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180),
              pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")]


def quiet(**kwargs):
    base = dict(enable_progress_bar=False, enable_model_summary=False, logger=False, enable_checkpointing=False,
                num_sanity_val_steps=0)
    base.update(kwargs)
    return base


def test_two_nodes_one_rank_each(ray_cluster, tmp_path):
    t = pl.Trainer(**quiet(num_nodes=2, num_processes=1, max_epochs=1, callbacks=[RankProbe(tmp_path)]))
    t.fit(Regression(), loader(regression_data(64), 8))

    probes = read_probes(tmp_path, "fit")
    assert [p["rank"] for p in probes] == [0, 1]
    nodes = [p["node_id"] for p in probes]
    workers = {n.node_id for n in ray_cluster.worker_nodes}
    assert nodes[0] != nodes[1] and set(nodes) == workers  # one rank on each worker node, none on the head
    assert [(p["node_rank"], p["local_rank"]) for p in probes] == [(0, 0), (1, 0)]
    assert [p["env"]["NODE_RANK"] for p in probes] == ["0", "1"]
    assert t.world_size == 2 and t.num_nodes == 2 and t.global_step == 64 // (2 * 8)
    assert_only_the_warm_group_left()


def test_three_nodes_on_a_two_node_cluster_fail_within_the_bounded_wait(ray_cluster):
    t = pl.Trainer(**quiet(num_nodes=3, num_processes=1, max_epochs=1, placement_timeout_s=3))
    start = time.monotonic()
    with pytest.raises(PlacementError) as info:
        t.fit(Regression(), loader(regression_data(32), 8))
    elapsed = time.monotonic() - start
    assert elapsed < 3 + 15, f"took {elapsed:.1f}s for a 3s placement timeout"
    text = str(info.value)
    assert "requested: 3 distinct nodes" in text
    assert "available: 3 alive node(s), 2 of which can hold {CPU: 1}" in text  # the head has no CPUs
    assert "within 3s" in text
    # nothing stays reserved: both worker nodes are free again
    deadline = time.monotonic() + 10
    while ray.available_resources().get("CPU", 0) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.available_resources().get("CPU", 0) == 4
    assert alive_rank_actors() == []
