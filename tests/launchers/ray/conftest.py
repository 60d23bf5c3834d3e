"""Ray sessions for the launcher tests: a multi-node cluster (the local instance, `local_ray`, is in tests/conftest.py).

A process can hold one Ray session at a time, so each fixture shuts down whatever session was
left before it starts its own, and the multi-node cluster tests live in their own module.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import ray

from raytrainer.launchers.ray.group import ACTOR_NAME_PREFIX


def alive_rank_actors(prefix: str = ACTOR_NAME_PREFIX) -> list[str]:
    """Names of live actors whose name starts with ``prefix``, read from the GCS.

    ``ray.util.state.list_actors`` needs the dashboard, which local test instances skip.
    """
    actors = ray._private.state.actors()
    return sorted(a["Name"] for a in actors.values()
                  if a.get("State") == "ALIVE" and str(a.get("Name", "")).startswith(prefix))


def assert_only_the_warm_group_left() -> None:
    """After a call that ended cleanly: the rank actors still alive are exactly the warm group's (kept for the
    next call, launchers/ray/pool.py), and raytrainer.shutdown() ends them and frees what they held."""
    import raytrainer
    from raytrainer.launchers.ray import pool

    group = pool.held()
    assert group is not None, "a clean call keeps its group warm"
    states = ray._private.state.actors()
    ranks = {states[a._actor_id.hex()]["Name"] for a in group._actors}  # a repaired rank is a former spare
    alive = set(alive_rank_actors())
    assert len(ranks) == group.world_size and ranks <= alive
    assert all("-spare-" in name for name in alive - ranks), alive - ranks  # and its unused spares
    raytrainer.shutdown()
    assert alive_rank_actors() == []


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[ray.cluster_utils.Cluster]:
    """Three Ray nodes in this machine: a head with no CPUs and two 2-CPU workers."""
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=2)
    try:
        ray.init(address=cluster.address, log_to_driver=True,
                 logging_level="warning")
        cluster.wait_for_nodes(timeout=60)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture
def alive_actors() -> Callable[[str], list[str]]:
    """``alive_actors(prefix)`` -> names of live raytrainer rank actors."""
    return alive_rank_actors
