"""Decisions of the Ray driver as pure functions: when to retry, what world size to run at.

They take plain values (failure records, counts of free resources) and return decisions, so they
are unit-tested without Ray.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Failure:
    """One failure of a run: when, which rank on which node, why, and at which step."""

    time: float
    rank: int | None
    node: str | None
    cause: str
    step: int
    preempted: bool = False

    def describe(self) -> str:
        when = time.strftime("%H:%M:%S", time.localtime(self.time))
        return f"{when} rank {self.rank} on node {self.node or '?'} at step {self.step}: {self.cause}"


class FailuresExhausted(RuntimeError):
    """Raised when more failures happened than max_failures allows; lists each failure."""

    def __init__(self, failures: list[Failure], max_failures: int) -> None:
        self.failures = failures
        counted = [f for f in failures if not f.preempted]
        lines = "\n".join(f"  {i + 1}. {f.describe()}" for i, f in enumerate(failures))
        super().__init__(f"training failed {len(counted)} time(s), more than max_failures={max_failures} allows. "
                         f"Failures:\n{lines}\nRaise Trainer(max_failures=...) to retry more, or fix the cause "
                         "shown for the last failure.")


@dataclass
class FailurePolicy:
    """Ray's FailureConfig semantics: up to ``max_failures`` retries; preemptions are free."""

    max_failures: int = 0
    failures: list[Failure] = field(default_factory=list)

    def record(self, failure: Failure) -> str:
        """Add a failure and decide: "retry" or "raise"."""
        self.failures.append(failure)
        counted = sum(1 for f in self.failures if not f.preempted)
        return "retry" if counted <= self.max_failures else "raise"


@dataclass(frozen=True)
class RecoveryDecision:
    """What the driver does after a failure.

    ``action``: "give_up" (an error retrying would repeat), "exhausted" (max_failures spent), "repair"
    (keep the survivors' processes, replace the dead ranks, same world) or "restart" (a new group of
    ``world`` ranks from the newest snapshot).
    """

    action: str
    world: int


def decide_recovery(*, retryable: bool, budget: str | None, survivors_kept: bool, world: int,
                    new_world: int) -> RecoveryDecision:
    """After a failure: ``budget`` is FailurePolicy.record's answer ("retry"/"raise"; None when not
    recorded), ``survivors_kept`` whether the survivors left their collectives in time, ``new_world``
    the size the scaling policy picked (an elastic run may shrink)."""
    if not retryable:
        return RecoveryDecision("give_up", world)
    if budget != "retry":
        return RecoveryDecision("exhausted", world)
    if survivors_kept and new_world == world:
        return RecoveryDecision("repair", world)
    return RecoveryDecision("restart", new_world)


@dataclass(frozen=True)
class ScalingPolicy:
    """Chooses how many ranks to run between ``min_ranks`` and ``max_ranks``.

    With ``nodes_elastic`` the unit is a whole node of ``ranks_per_node`` ranks (torchrun's
    convention); otherwise ranks are packed wherever resources exist.
    """

    min_ranks: int
    max_ranks: int
    ranks_per_node: int = 1
    nodes_elastic: bool = False

    def target(self, free_slots_per_node: list[int], current: int = 0) -> int:
        """Largest world that fits the free resources (plus what ``current`` already holds), within bounds.

        ``free_slots_per_node``: how many more ranks each alive node can host right now.
        """
        if self.nodes_elastic:
            units = sum(1 for s in free_slots_per_node if s >= self.ranks_per_node)
            fit = current + units * self.ranks_per_node
        else:
            fit = current + sum(max(s, 0) for s in free_slots_per_node)
        return max(min(fit, self.max_ranks), 0)

    def should_grow(self, world: int, free_slots_per_node: list[int]) -> int | None:
        """New world size if more ranks fit than run now, else None."""
        if world >= self.max_ranks:
            return None
        target = self.target(free_slots_per_node, current=world)
        step = self.ranks_per_node if self.nodes_elastic else 1
        return target if target >= world + step else None

    def after_failure(self, world: int, capacity_slots_per_node: list[int]) -> int:
        """World size to restart at, from what the alive nodes can hold: within [min, max]. Below MIN the
        placement waits (bounded by placement_timeout_s) for nodes to come back."""
        target = self.target(capacity_slots_per_node, current=0)
        if self.nodes_elastic:
            target -= target % self.ranks_per_node
        return max(self.min_ranks, min(target, self.max_ranks))

    def layout(self, world: int) -> tuple[int, int]:
        """(num_nodes, ranks_per_node) for a world size."""
        if self.nodes_elastic:
            return world // self.ranks_per_node, self.ranks_per_node
        return 1, world


def free_slots(per_node_available: list[dict[str, Any]], cpus_per_rank: float, gpus_per_rank: float) -> list[int]:
    """How many ranks each node could host, from Ray's per-node available resources."""
    slots = []
    for res in per_node_available:
        n = int(res.get("CPU", 0) // cpus_per_rank) if cpus_per_rank else 10**6
        if gpus_per_rank:
            n = min(n, int(res.get("GPU", 0) // gpus_per_rank))
        slots.append(max(n, 0))
    return slots
