"""WorkerGroup across nodes: a real three-node Ray cluster (ray.cluster_utils) on this machine.

Kept apart from test_group.py because a process cannot hold this cluster and a plain local Ray
instance at the same time.
"""
from __future__ import annotations

import time

import pytest
import ray
import torch
import torch.distributed as dist

from raytrainer.launchers.ray.group import PlacementError, WorkerGroup
from raytrainer.launchers.ray.worker import RankInfo

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


def where_am_i(ctx: RankInfo) -> dict:
    t = torch.tensor([ctx.global_rank])
    dist.all_reduce(t)
    return {"node_id": ray.get_runtime_context().get_node_id(), "sum": int(t.item()),
            "layout": (ctx.global_rank, ctx.node_rank, ctx.local_rank, ctx.local_world_size)}


def test_two_nodes_two_ranks_each_are_grouped_by_node(ray_cluster, alive_actors):
    group = WorkerGroup("nodes", num_nodes=2, ranks_per_node=2)
    try:
        results = group.run(where_am_i)
    finally:
        group.shutdown()
    assert [r["sum"] for r in results] == [6] * 4
    assert [r["layout"] for r in results] == [(0, 0, 0, 2), (1, 0, 1, 2), (2, 1, 0, 2),
                                              (3, 1, 1, 2)]
    nodes = [r["node_id"] for r in results]
    assert nodes[0] == nodes[1] != nodes[2] == nodes[3]
    assert nodes == [info.node_id for info in group.ranks]
    head = ray_cluster.head_node.node_id
    assert head not in nodes  # the head offers no CPUs
    assert alive_actors("raytrainer-nodes-") == []


def test_one_rank_per_node_lands_on_distinct_nodes(ray_cluster):
    group = WorkerGroup("spread", num_nodes=2, ranks_per_node=1)
    try:
        results = group.run(where_am_i)
    finally:
        group.shutdown()
    assert results[0]["node_id"] != results[1]["node_id"]
    assert [r["layout"] for r in results] == [(0, 0, 0, 1), (1, 1, 0, 1)]


def test_packed_ranks_overflowing_a_node_get_real_node_ranks(ray_cluster):
    """num_nodes=1 packs, but 3 one-CPU ranks cannot fit a 2-CPU node: the layout says so."""
    group = WorkerGroup("packed", ranks_per_node=3)
    try:
        results = group.run(where_am_i)
    finally:
        group.shutdown()
    assert [r["sum"] for r in results] == [3] * 3
    nodes = [r["node_id"] for r in results]
    layout = [r["layout"] for r in results]
    assert len(set(nodes)) == 2 and nodes == [info.node_id for info in group.ranks]
    # Node-major: each node's ranks are one block, numbered from 0 within the node.
    blocks = [nodes[:1 + (nodes[1] == nodes[0])], nodes[1 + (nodes[1] == nodes[0]):]]
    assert sorted(len(b) for b in blocks) == [1, 2] and all(len(set(b)) == 1 for b in blocks)
    expected, rank = [], 0
    for node_rank, block in enumerate(blocks):
        for local in range(len(block)):
            expected.append((rank, node_rank, local, len(block)))
            rank += 1
    assert layout == expected


def test_more_nodes_than_the_cluster_has_fails_within_the_timeout(ray_cluster):
    group = WorkerGroup("toomany", num_nodes=3, ranks_per_node=1, placement_timeout_s=3)
    start = time.monotonic()
    with pytest.raises(PlacementError) as info:
        group.start()
    assert time.monotonic() - start < 10
    text = str(info.value)
    assert "requested: 3 distinct nodes, each with {CPU: 1}" in text
    assert "3 alive node(s), 2 of which can hold {CPU: 1}" in text
    assert not group.started
    # Nothing is left reserved: the whole cluster is free again.
    deadline = time.monotonic() + 5
    while ray.available_resources().get("CPU", 0) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.available_resources().get("CPU", 0) == 4
