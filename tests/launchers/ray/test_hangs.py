"""A hung rank is named (issue 20, item 8): the error says which rank stopped, at which step, in which function,
with its stack, not the rank that waited for it in a collective; restart causes read as words."""
from __future__ import annotations

import os
import time

import pytest
from ft_models import HangOnRank1, events, loader

import raytrainer as pl
from raytrainer.launchers.ray.hangs import RankProgress, find_hung
from raytrainer.launchers.ray.policies import FailuresExhausted

TORCH = os.path.dirname(pl.__file__).replace("raytrainer", "site-packages/torch")
_USER = ("/home/u/model.py", 30, "training_step", "time.sleep(3600)")
_LOOP = ("/x/raytrainer/core/loops.py", 200, "run_batch", "out = step(batch)")
_BACKWARD = ("/x/site-packages/torch/autograd/graph.py", 800, "_engine_run_backward", "return run_backward()")
_ALLREDUCE = ("/x/site-packages/torch/distributed/distributed_c10d.py", 2500, "all_reduce", "work.wait()")


def _rank(rank: int, *frames: tuple[str, int, str, str], step: int = 5, batch: int = 5) -> RankProgress:
    return RankProgress(rank=rank, node_ip="10.0.0.1", pid=100 + rank, step=step, epoch=0, batch=batch,
                        idle_s=20.0, stack=list(frames))


def test_the_rank_in_its_own_code_is_named_not_the_one_waiting_in_backward():
    found = find_hung([_rank(0, _LOOP, _BACKWARD), _rank(1, _LOOP, _USER)], "rank 0 sent no heartbeat for 20 s")
    assert found.hung == [1] and found.waiting == [0]
    assert found.summary.startswith("rank 1 hung at step 5 (epoch 0, batch 5) in training_step (model.py:30)")
    assert "rank(s) [0] wait for it in a collective" in found.summary
    assert "time.sleep(3600)" in found.details and "pid 101" in found.details


def test_a_rank_that_does_not_answer_is_named_first():
    found = find_hung([_rank(0, _LOOP, _ALLREDUCE), None], "trigger")
    assert found.hung == [1] and found.silent == [1]
    assert found.summary.startswith("rank 1 did not answer") and "GIL" in found.details


def test_when_every_rank_waits_the_ones_behind_are_named():
    behind = find_hung([_rank(0, _ALLREDUCE, step=7), _rank(1, _ALLREDUCE, step=6)], "t")
    assert behind.hung == [1]
    level = find_hung([_rank(0, _ALLREDUCE), _rank(1, _ALLREDUCE)], "t")
    assert level.hung == [] and "called different collectives" in level.summary


def test_a_users_own_backward_is_not_waiting():
    custom = ("/home/u/model.py", 12, "backward", "time.sleep(9)")
    assert not _rank(0, _BACKWARD, custom).waiting and _rank(0, _LOOP, _BACKWARD).waiting


def _trainer(tmp_path, **kw) -> pl.Trainer:
    return pl.Trainer(num_processes=2, max_epochs=2, default_root_dir=str(tmp_path), logger=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, **kw)


def _check_names_rank1(message: str) -> None:
    first = message.splitlines()
    assert any("rank 1 hung at step 3" in line and "in training_step (ft_models.py:" in line for line in first), message
    assert "rank(s) [0] wait for it in a collective" in message, message
    assert "time.sleep(3600)" in message, "the hung rank's stack is shown"
    assert "_Hung" not in message and "rank None" not in message and "node ?" not in message


@pytest.mark.slow
def test_a_rank_hung_in_training_step_is_named_with_its_stack(local_ray, tmp_path):
    """Rank 1 sleeps in training_step; rank 0 waits in DDP's all-reduce. The heartbeat timeout ends the run and the
    error names rank 1, its step, the function and the stack (before: "rank None on node ? ... rank 0")."""
    started = time.monotonic()
    with pytest.raises(FailuresExhausted) as info:
        _trainer(tmp_path, heartbeat_timeout_s=8).fit(HangOnRank1(3, str(tmp_path / "hung")), loader())
    assert time.monotonic() - started < 90
    _check_names_rank1(f"{info.value}\n{info.value.__cause__}")
    assert "rank 1 on node" in str(info.value), "the failure list names the hung rank and its node"
    failure = [e for e in events(str(tmp_path)) if e["event"] == "failure"][-1]
    assert failure["rank"] == 1 and failure["step"] == 3 and failure["cause"].startswith("rank 1 hung"), failure


@pytest.mark.slow
def test_a_collective_timeout_names_the_rank_that_stopped_not_the_one_that_waited(local_ray, tmp_path):
    """With the heartbeat timeout longer than the collective's, rank 0's gloo timeout ends the run first. The error
    is still about rank 1; and with a failure allowed, the restart's cause reads as words and the run finishes."""
    trainer = _trainer(tmp_path, heartbeat_timeout_s=300, collective_timeout_s=8, max_failures=1)
    started = time.monotonic()
    trainer.fit(HangOnRank1(3, str(tmp_path / "hung")), loader())
    assert time.monotonic() - started < 120
    ev = events(str(tmp_path))
    failure = next(e for e in ev if e["event"] == "failure")
    assert failure["rank"] == 1 and failure["step"] == 3 and failure["cause"].startswith("rank 1 hung at step 3")
    restart = next(e for e in ev if e["event"] == "restart")
    assert restart["cause"] == "rank 1 hung", restart
    assert ev[-1]["event"] == "finish" and trainer.global_step == 16
