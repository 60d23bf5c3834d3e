"""Pure decisions of the Ray driver and the elastic sampler, without Ray."""
from __future__ import annotations

import time

import pytest

from raytrainer.data.samplers import ElasticBatchSampler
from raytrainer.launchers.ray.policies import Failure, FailurePolicy, FailuresExhausted, ScalingPolicy, free_slots


def _failure(step: int, preempted: bool = False) -> Failure:
    return Failure(time.time(), 1, "10.0.0.2", "process died", step, preempted=preempted)


def test_failure_policy_counts_failures_but_not_preemptions():
    policy = FailurePolicy(max_failures=1)
    assert policy.record(_failure(3, preempted=True)) == "retry"
    assert policy.record(_failure(5)) == "retry"
    assert policy.record(_failure(7)) == "raise"
    msg = str(FailuresExhausted(policy.failures, 1))
    assert "max_failures=1" in msg and "rank 1" in msg and "step 7" in msg and "10.0.0.2" in msg


def test_zero_failures_allowed_raises_at_once():
    assert FailurePolicy(0).record(_failure(1)) == "raise"


def test_scaling_whole_nodes():
    policy = ScalingPolicy(min_ranks=2, max_ranks=8, ranks_per_node=2, nodes_elastic=True)
    assert policy.target([2, 2, 1]) == 4            # the 1-slot node cannot take a whole node's ranks
    assert policy.should_grow(4, [0, 0, 2]) == 6
    assert policy.should_grow(4, [1, 1]) is None
    assert policy.should_grow(8, [2, 2]) is None     # already at MAX
    assert policy.after_failure(6, [2, 2]) == 4
    assert policy.after_failure(6, [2]) == 2         # never below MIN: placement waits for MIN
    assert policy.layout(6) == (3, 2)


def test_scaling_packed_ranks():
    policy = ScalingPolicy(min_ranks=1, max_ranks=4)
    assert policy.target([3, 3]) == 4
    assert policy.should_grow(2, [1]) == 3
    assert policy.layout(3) == (1, 3)


def test_free_slots_from_ray_resources():
    assert free_slots([{"CPU": 3.0}, {"CPU": 0.5}, {}], 1, 0) == [3, 0, 0]
    assert free_slots([{"CPU": 8.0, "GPU": 2.0}, {"CPU": 8.0}], 1, 1) == [2, 0]


@pytest.mark.parametrize("n, shuffle", [(103, True), (240, False), (57, True)])
def test_elastic_sampler_uses_every_sample_once_across_resizes(n, shuffle):
    seen: list[int] = []
    segments: list[tuple[int, int, int]] = []
    for world, steps, batch in ((2, 3, 8), (3, 2, 8), (1, None, 5)):
        samplers = [ElasticBatchSampler(n, r, world, batch, shuffle) for r in range(world)]
        for s in samplers:
            s.set_epoch(4)
            s.resume_from(segments)
        assert len({len(s) for s in samplers}) == 1, "DDP needs the same number of batches on every rank"
        for s in samplers:
            batches = list(s)
            seen += [i for b in (batches[:steps] if steps else batches) for i in b]
        if steps:
            segments.append((world, steps, batch))
    assert sorted(seen) == list(range(n))


def test_elastic_sampler_epochs_differ_and_reset_segments():
    s = ElasticBatchSampler(20, 0, 1, 20, shuffle=True)
    s.set_epoch(0)
    first = list(s)[0]
    s.resume_from([(1, 1, 20)])
    assert list(s) == []
    s.set_epoch(1)
    assert sorted(list(s)[0]) == list(range(20)) and list(s)[0] != first


def test_recovery_decisions():
    from raytrainer.launchers.ray.policies import decide_recovery

    def d(**kw):
        args = dict(retryable=True, budget="retry", survivors_kept=True, world=4, new_world=4)
        args.update(kw)
        return decide_recovery(**args)

    assert d(retryable=False, budget=None).action == "give_up"
    assert d(budget="raise").action == "exhausted"
    assert (d().action, d().world) == ("repair", 4)
    assert (d(survivors_kept=False).action, d(survivors_kept=False).world) == ("restart", 4)
    shrink = d(new_world=2)  # an elastic run lost a node: a smaller new group, not a repair
    assert (shrink.action, shrink.world) == ("restart", 2)
