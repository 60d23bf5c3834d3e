"""WorkerGroup on a real local Ray instance with real gloo process groups."""
from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch
import torch.distributed as dist
from torch import nn

from raytrainer.launchers.ray.group import (
    GroupTimeoutError,
    PlacementError,
    RankError,
    WorkerGroup,
    check_picklable,
    ensure_ray,
)
from raytrainer.launchers.ray.messages import in_rank_worker, send_to_driver
from raytrainer.launchers.ray.worker import RankInfo

pytestmark = pytest.mark.timeout(90)


# -- functions the ranks run (module level, so the workers import them by name) --------------------
def all_reduce_rank(ctx: RankInfo, scale: float) -> dict:
    t = torch.tensor([float(ctx.global_rank + 1)])
    dist.all_reduce(t)
    return {
        "ctx": (ctx.global_rank, ctx.local_rank, ctx.node_rank, ctx.world_size,
                ctx.local_world_size),
        "env": {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE",
                                               "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR",
                                               "MASTER_PORT", "RAYTRAINER_TEST_VAR")},
        "dist": (dist.get_rank(), dist.get_world_size(), dist.get_backend()),
        "sum": t.item() * scale,
        "node_id": ray.get_runtime_context().get_node_id(),
        "pid": os.getpid(),
        "in_worker": in_rank_worker(),
    }


def raise_on_rank_one(ctx: RankInfo) -> None:
    if ctx.global_rank == 1:
        raise ValueError("boom from rank 1")
    dist.barrier()  # rank 0 waits in a collective that will never complete


def kill_rank_one(ctx: RankInfo, stamp: str) -> None:
    if ctx.global_rank == 1:
        time.sleep(0.5)
        Path(stamp).write_text(repr(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()


def chatty(ctx: RankInfo) -> int:
    send_to_driver(("hello", ctx.global_rank))
    if ctx.global_rank == 0:
        time.sleep(1.5)  # the driver must see "hello" from rank 0 before this call returns
    send_to_driver(("bye", ctx.global_rank))
    return ctx.global_rank


_RELEASE = threading.Event()  # per rank process: set by a side call, awaited by the main call


def wait_for_release(ctx: RankInfo) -> bool:
    send_to_driver(("waiting", ctx.global_rank))
    released = _RELEASE.wait(timeout=30)
    _RELEASE.clear()
    return released


def release(ctx: RankInfo, tag: str) -> tuple[int, str]:
    _RELEASE.set()
    return ctx.global_rank, tag


def sleep_long(ctx: RankInfo) -> None:
    time.sleep(60)


def sum_ranks(ctx: RankInfo) -> tuple[int, int, int]:
    t = torch.tensor([ctx.global_rank])
    dist.all_reduce(t)
    return int(t.item()), ctx.local_rank, ctx.local_world_size


# -- unpicklable things --------------------------------------------------------------------------
class WithFile(nn.Module):
    def __init__(self, path: Path) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 2)
        self.log_file = open(path, "w")  # noqa: SIM115 - the point of the test


class WithLockedLambda(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        lock = threading.Lock()
        self.encoder = nn.Sequential(nn.Linear(2, 2))
        self.encoder.fn = lambda x: (lock, x)


# -- tests ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair(local_ray) -> Iterator[WorkerGroup]:
    """A started two-rank group shared by the tests that leave it healthy."""
    group = WorkerGroup("pair", ranks_per_node=2, poll_interval_s=0.1,
                        env={"RAYTRAINER_TEST_VAR": "from-driver"})
    group.start()
    yield group
    group.shutdown()


def test_two_ranks_all_reduce_and_torchrun_env(pair):
    group = pair
    results = group.run(all_reduce_rank, 2.0)
    assert [r["sum"] for r in results] == [6.0, 6.0]  # (1 + 2) * 2 on both ranks
    assert [r["ctx"] for r in results] == [(0, 0, 0, 2, 2), (1, 1, 0, 2, 2)]
    assert [r["dist"] for r in results] == [(0, 2, "gloo"), (1, 2, "gloo")]
    env0, env1 = results[0]["env"], results[1]["env"]
    assert (env0["RANK"], env0["LOCAL_RANK"], env1["RANK"], env1["LOCAL_RANK"]) == \
        ("0", "0", "1", "1")
    assert env0["WORLD_SIZE"] == env1["WORLD_SIZE"] == "2"
    assert env0["NODE_RANK"] == "0" and env0["LOCAL_WORLD_SIZE"] == "2"
    assert env0["MASTER_ADDR"] == env1["MASTER_ADDR"] == group.ranks[0].node_ip
    assert env0["MASTER_PORT"] == env1["MASTER_PORT"] == str(group.ranks[0].master_port)
    assert env0["RAYTRAINER_TEST_VAR"] == env1["RAYTRAINER_TEST_VAR"] == "from-driver"
    assert all(r["in_worker"] for r in results)
    # The driver's view of the ranks matches where they really run.
    assert [r["pid"] for r in results] == [info.pid for info in group.ranks] == group.ping()
    assert [r["node_id"] for r in results] == [info.node_id for info in group.ranks]
    # The group is reusable: a second call runs on the same actors and process group.
    assert [r["pid"] for r in group.run(all_reduce_rank, 1.0)] == [i.pid for i in group.ranks]


def test_actor_names_and_name_clash(pair, alive_actors):
    assert alive_actors("raytrainer-pair-") == ["raytrainer-pair-rank-0", "raytrainer-pair-rank-1"]
    clash = WorkerGroup("pair", ranks_per_node=1)
    with pytest.raises(RuntimeError, match="still alive"):
        clash.start()
    assert not clash.started
    clash.shutdown()  # harmless on a group that never started
    assert alive_actors("raytrainer-pair-") == ["raytrainer-pair-rank-0", "raytrainer-pair-rank-1"]


def test_shutdown_is_idempotent_and_leaves_nothing(local_ray, alive_actors):
    group = WorkerGroup("short lived/run", ranks_per_node=1)
    assert group.actor_name(0) == "raytrainer-short-lived-run-rank-0"
    assert group.run(sum_ranks) == [(0, 0, 1)]
    assert alive_actors("raytrainer-short-lived-run-") == ["raytrainer-short-lived-run-rank-0"]
    group.shutdown()
    group.shutdown()
    assert alive_actors("raytrainer-short-lived-run-") == []


def test_exception_in_rank_stops_all_and_names_rank(local_ray, alive_actors):
    group = WorkerGroup("raises", ranks_per_node=2)
    group.start()
    seen: list = []

    def before_shutdown(err: BaseException) -> None:
        # The ranks are still alive here: rank 0 sits in its barrier, rank 1 has returned.
        seen.append((type(err).__name__, group.call(release, "last words")))

    start = time.monotonic()
    with pytest.raises(RankError) as info:
        group.run(raise_on_rank_one, before_shutdown=before_shutdown)
    elapsed = time.monotonic() - start
    err = info.value
    assert seen == [("RankError", [(0, "last words"), (1, "last words")])]
    assert err.rank == 1 and not err.died
    assert err.node_ip == group.ranks[1].node_ip and err.node_ip in str(err)
    assert "rank 1" in str(err)
    assert "ValueError: boom from rank 1" in str(err)
    assert "raise_on_rank_one" in err.traceback and "Traceback" in err.traceback
    assert isinstance(err.exception, ValueError)
    # Rank 0 was stuck in a barrier; it was killed, not waited for (gloo would wait 300 s).
    assert elapsed < 5, elapsed
    assert not group.started
    assert alive_actors("raytrainer-raises-") == []


def test_killed_rank_is_detected_quickly(local_ray, alive_actors, tmp_path):
    group = WorkerGroup("killed", ranks_per_node=2)
    group.start()
    stamp = tmp_path / "killed_at"
    with pytest.raises(RankError) as info:
        group.run(kill_rank_one, str(stamp))
    detected = time.time()
    killed_at = float(stamp.read_text())
    assert detected - killed_at < 2.0, f"took {detected - killed_at:.2f}s to notice"
    # The dead rank is blamed, not rank 0 whose barrier broke because of it.
    assert info.value.rank == 1 and info.value.died
    assert "died" in str(info.value)
    assert alive_actors("raytrainer-killed-") == []


def pid_and_sum(ctx: RankInfo) -> tuple[int, float]:
    t = torch.tensor([float(ctx.global_rank + 1)])
    dist.all_reduce(t)
    return os.getpid(), t.item()


def test_dead_rank_replaced_by_warm_spare_and_survivor_kept(local_ray, alive_actors, tmp_path):
    group = WorkerGroup("repair", ranks_per_node=2, spares_per_node=1)
    try:
        group.start()
        pids = [pid for pid, _ in group.run(pid_and_sum)]
        spare = group._spares[group.ranks[1].node_id][0]
        spare_pid = ray.get(spare.warm.remote(), timeout=60)
        with pytest.raises(RankError) as info:
            group.run(kill_rank_one, str(tmp_path / "stamp"), keep_on_failure=True)
        err = info.value
        # rank 1 died; rank 0 may also be listed, as raising (its barrier broke), never as dead
        assert err.rank == 1 and err.failed[1] and not err.failed.get(0, False)
        assert group.started and "All ranks were stopped" not in str(err)
        assert group.settle(err.failed, timeout_s=10), "rank 0 should leave its broken barrier at once"
        assert group.reform([1])
        after = group.run(pid_and_sum)
        assert [s for _, s in after] == [3.0, 3.0]           # a working 2-rank process group again
        assert after[0][0] == pids[0]                         # the survivor kept its process
        assert after[1][0] == spare_pid != pids[1]            # the spare took over rank 1
        assert group.ranks[1].pid == spare_pid
        assert len(group._spares[group.ranks[1].node_id]) == 1  # and a new spare is on its way
    finally:
        group.shutdown()
    assert alive_actors("raytrainer-repair-") == []


def test_rank_that_raised_leaves_so_its_peer_is_not_stuck(local_ray, alive_actors):
    group = WorkerGroup("raised-kept", ranks_per_node=2)
    try:
        group.start()
        pids = [pid for pid, _ in group.run(pid_and_sum)]
        start = time.monotonic()
        with pytest.raises(RankError) as info:
            group.run(raise_on_rank_one, keep_on_failure=True)
        assert info.value.rank == 1 and info.value.failed[1] is False
        assert group.settle(info.value.failed, timeout_s=10)  # rank 0's barrier breaks when rank 1 leaves
        assert time.monotonic() - start < 10
        assert group.reform([])
        assert group.run(pid_and_sum) == [(pids[0], 3.0), (pids[1], 3.0)]  # same processes, new group
    finally:
        group.shutdown()
    assert alive_actors("raytrainer-raised-kept-") == []


def test_messages_reach_driver_while_running(pair):
    received: list[tuple[float, int, object]] = []
    start = time.monotonic()
    results = pair.run(chatty, on_message=lambda r, m: received.append((time.monotonic(), r, m)))
    end = time.monotonic()
    assert results == [0, 1]
    from_rank0 = [m for _, r, m in received if r == 0]
    assert from_rank0 == [("hello", 0), ("bye", 0)]
    assert sorted(m for _, r, m in received if r == 1) == [("bye", 1), ("hello", 1)]
    hello_at = next(t for t, r, m in received if m == ("hello", 0))
    assert hello_at - start < end - start - 1.0, "rank 0's message only arrived at the end"


def test_ctrl_c_on_the_driver_stops_the_ranks(local_ray, alive_actors):
    group = WorkerGroup("interrupted", ranks_per_node=2, poll_interval_s=0.1)

    def interrupt(rank, msg):  # what Ctrl-C during a progress-bar update looks like
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        group.run(chatty, on_message=interrupt)
    assert not group.started
    assert alive_actors("raytrainer-interrupted-") == []


def test_side_calls_and_ticks_while_running(pair):
    """on_tick drives the run from the driver; call() reaches ranks busy in run()."""
    ticks: list[float] = []
    answers: list[list] = []
    received: list[tuple[int, object]] = []

    def on_tick() -> None:
        ticks.append(time.monotonic())
        if len(ticks) == 3:
            answers.append(pair.call(release, "go"))

    results = pair.run(wait_for_release, on_tick=on_tick,
                       on_message=lambda r, m: received.append((r, m)))
    assert results == [True, True]
    assert answers == [[(0, "go"), (1, "go")]]
    # call() left the queued messages alone: each rank's message still reached the driver once.
    assert sorted(received) == [(0, ("waiting", 0)), (1, ("waiting", 1))]
    assert pair.call(release, "idle") == [(0, "idle"), (1, "idle")]
    assert pair.run(wait_for_release) == [True, True]  # consumes the flags set just above


def test_send_to_driver_outside_a_rank_fails_clearly():
    assert not in_rank_worker()
    with pytest.raises(RuntimeError, match="only works inside"):
        send_to_driver("x")


def test_run_timeout_shuts_down(local_ray, alive_actors):
    group = WorkerGroup("slow", ranks_per_node=2)
    group.start()
    start = time.monotonic()
    with pytest.raises(GroupTimeoutError, match=r"rank\(s\) \[0, 1\] still busy"):
        group.run(sleep_long, timeout_s=1)
    assert time.monotonic() - start < 5
    assert alive_actors("raytrainer-slow-") == []


def test_placement_error_names_what_is_missing(local_ray):
    group = WorkerGroup("toobig", ranks_per_node=2, cpus_per_rank=64, placement_timeout_s=1)
    start = time.monotonic()
    with pytest.raises(PlacementError) as info:
        group.start()
    assert time.monotonic() - start < 10
    text = str(info.value)
    assert "2 rank(s) with {CPU: 64} each" in text and "total {CPU: 128}" in text
    assert "1 alive node(s), 0 of which can hold {CPU: 64}" in text
    assert "cluster total {CPU: 10}" in text
    ours = [t for t in ray.util.placement_group_table().values()
            if t["name"] == "raytrainer-toobig-pg"]
    assert ours and all(t["state"] == "REMOVED" for t in ours)
    assert not group.started


@pytest.mark.slow
def test_eight_ranks_on_a_small_machine(local_ray):
    group = WorkerGroup("eight", ranks_per_node=8)
    try:
        results = group.run(sum_ranks)
    finally:
        group.shutdown()
    assert [r[0] for r in results] == [28] * 8
    assert [r[1] for r in results] == list(range(8))
    assert {r[2] for r in results} == {8}


def test_unpicklable_argument_named_before_any_actor_starts(local_ray, tmp_path, alive_actors):
    model = WithFile(tmp_path / "log.txt")
    group = WorkerGroup("pickle", ranks_per_node=2)
    try:
        with pytest.raises(TypeError, match=r"model\.log_file cannot be pickled.*an open file"):
            group.run(all_reduce_rank, model, arg_names=["model"])
        with pytest.raises(TypeError, match=r"args\[0\]\.log_file"):
            group.run(all_reduce_rank, model)
    finally:
        model.log_file.close()
    assert not group.started
    assert alive_actors("raytrainer-pickle-") == []


def test_unpicklable_lambda_inside_submodule_is_named():
    with pytest.raises(TypeError) as info:
        check_picklable(WithLockedLambda(), "model")
    text = str(info.value)
    assert "model.encoder.fn -> closure variable 'lock' cannot be pickled" in text
    assert "a thread lock" in text
    assert "model.encoder.fn is a lambda defined at" in text and "test_group.py" in text


def test_unpicklable_function_is_named():
    lock = threading.Lock()

    def step(ctx):
        return lock

    with pytest.raises(TypeError, match=r"step -> closure variable 'lock'"):
        WorkerGroup("fn", ranks_per_node=1).run(step)
    check_picklable(lambda ctx: ctx, "fn")  # cloudpickle ships plain lambdas by value


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="run_name"):
        WorkerGroup("")
    with pytest.raises(ValueError, match="num_nodes"):
        WorkerGroup("x", num_nodes=0)
    with pytest.raises(ValueError, match="reserve something"):
        WorkerGroup("x", cpus_per_rank=0)
    with pytest.raises(ValueError, match="placement_timeout_s"):
        WorkerGroup("x", placement_timeout_s=0)


def test_ensure_ray_reuses_the_running_session(local_ray):
    assert ensure_ray(1) is False
    assert ray.is_initialized()


_EXIT_SCRIPT = """
import json, os, sys
import ray
from raytrainer.launchers.ray.group import ensure_ray, node_processes, stop_own_local_instance

if sys.argv[1] == "own":
    assert ensure_ray(1, address="local") is True
else:
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="warning")

@ray.remote(num_cpus=1)
class Worker:
    def pid(self):
        return os.getpid()

actor = Worker.remote()
node = ray._private.worker._global_node
actor_pid = ray.get(actor.pid.remote())
pids = [proc.pid for proc in node_processes(node)] + [actor_pid]
import psutil
# the raylet's own children too: its dashboard and runtime-env agents (they once outlived the script by a minute)
pids += [c.pid for p in list(pids) for c in psutil.Process(p).children(recursive=True) if c.pid not in pids]
if sys.argv[1] == "other":
    stop_own_local_instance()  # not raytrainer's instance: left alone, still usable
    assert ray.is_initialized() and ray.get(actor.pid.remote()) == actor_pid
print(json.dumps(pids), flush=True)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("whose", ["own", "other"])
def test_a_script_exit_stops_every_process_of_its_local_instance(tmp_path, whose):
    """At exit, the local instance ensure_ray started is stopped all at once (stop_own_local_instance), its raylet's
    agents included; an instance the script started itself is left to Ray's own exit hook. Either way nothing of it
    outlives the script by more than a few seconds."""
    import json
    import subprocess
    import sys

    script = tmp_path / "exit.py"
    script.write_text(_EXIT_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, str(script), whose], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pids = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(pids) >= 6  # gcs, raylet, ..., the raylet's two agents, the actor's worker
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if _alive(p)]
