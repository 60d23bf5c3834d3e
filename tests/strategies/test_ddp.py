"""DDPStrategy across two real gloo ranks (Ray actors), checked against one process."""
from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import ray
import torch
import torch.distributed as dist
from torch import nn

from raytrainer.launchers.ray.group import WorkerGroup, ensure_ray
from raytrainer.launchers.ray.worker import RankInfo
from raytrainer.strategies.base import RankContext
from raytrainer.strategies.ddp import DDPStrategy

pytestmark = pytest.mark.timeout(120)

LR = 0.1
STEPS = 5


@pytest.fixture(scope="module")
def pair() -> Iterator[WorkerGroup]:
    """Two started ranks shared by the tests in this module."""
    if ray.is_initialized():
        ray.shutdown()
    started = ensure_ray(2, address="local")
    group = WorkerGroup("ddp-tests", ranks_per_node=2)
    group.start()
    yield group
    group.shutdown()
    if started:
        ray.shutdown()


# -- what the ranks run --------------------------------------------------------------------------
def collectives(ctx: RankInfo) -> dict:
    s = DDPStrategy(device="cpu", ctx=ctx)
    s.setup_environment()
    r = ctx.global_rank
    x = torch.tensor([1.0, 2.0]) * (r + 1)  # rank 0: [1, 2], rank 1: [2, 4]
    before = x.clone()
    out = {
        "mean": s.reduce(x, "mean").tolist(),
        "sum": s.reduce(x, "sum").tolist(),
        "max": s.reduce(x, "max").tolist(),
        "min": s.reduce(x, "min").tolist(),
        "int_mean": s.reduce(torch.tensor(r + 1), "mean").item(),  # ints average as floats
        "number": s.reduce(3.0 * r, "sum").item(),
        "input_untouched": torch.equal(x, before),
        "broadcast": s.broadcast({"from": r, "data": [r] * 3}, src=1),
        "gathered": s.all_gather_object(("rank", r)),
        "all_yes": s.reduce_boolean_decision(True, all=True),
        "all_mixed": s.reduce_boolean_decision(r == 0, all=True),
        "any_mixed": s.reduce_boolean_decision(r == 0, all=False),
        "any_no": s.reduce_boolean_decision(False, all=False),
    }
    s.barrier("end")
    try:
        s.reduce(x, "median")
    except ValueError as err:
        out["bad_op"] = str(err)
    return out


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 4, generator=g)
    return x, x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(32, 1, generator=g)


def train_ddp(ctx: RankInfo, micro_batches: int) -> dict[str, torch.Tensor]:
    """Each rank trains on its half of the batch; gradients are averaged by DDP."""
    s = DDPStrategy(device="cpu", ctx=ctx)
    s.setup_environment()
    model = s.setup_module(make_model())
    assert isinstance(model, nn.parallel.DistributedDataParallel)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = make_data()
    half = x.shape[0] // ctx.world_size
    xs, ys = x[ctx.global_rank * half:(ctx.global_rank + 1) * half], \
        y[ctx.global_rank * half:(ctx.global_rank + 1) * half]
    for _ in range(STEPS):
        opt.zero_grad()
        for i, (xb, yb) in enumerate(zip(xs.chunk(micro_batches), ys.chunk(micro_batches))):
            last = i == micro_batches - 1
            with s.no_backward_sync(enabled=not last):
                loss = nn.functional.mse_loss(model(xb), yb) / micro_batches
                loss.backward()
        opt.step()
    s.teardown()
    assert not isinstance(s.model, nn.parallel.DistributedDataParallel)
    assert dist.is_initialized()  # the worker owns the process group, not the strategy
    return {k: v.detach().clone() for k, v in s.model.state_dict().items()}


def reference_params() -> dict[str, torch.Tensor]:
    """The same training in one process on the whole batch of 32."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = make_data()
    for _ in range(STEPS):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model.state_dict()


# -- tests ---------------------------------------------------------------------------------------
def test_collectives_across_two_ranks(pair):
    r0, r1 = pair.run(collectives)
    for out in (r0, r1):
        assert out["mean"] == [1.5, 3.0]
        assert out["sum"] == [3.0, 6.0]
        assert out["max"] == [2.0, 4.0]
        assert out["min"] == [1.0, 2.0]
        assert out["int_mean"] == 1.5
        assert out["number"] == 3.0
        assert out["input_untouched"]
        assert out["broadcast"] == {"from": 1, "data": [1, 1, 1]}
        assert out["gathered"] == [("rank", 0), ("rank", 1)]
        assert out["all_yes"] is True
        assert out["all_mixed"] is False
        assert out["any_mixed"] is True
        assert out["any_no"] is False
        assert "median" in out["bad_op"]


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_ddp_two_ranks_match_one_process(pair, micro_batches):
    """2 ranks x 16 samples == 1 process x 32 samples, also with gradient accumulation."""
    expected = reference_params()
    for params in pair.run(train_ddp, micro_batches):
        assert params.keys() == expected.keys()
        for name, value in params.items():
            torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6, msg=name)
    # The training really moved the weights (so the comparison is not trivially equal).
    assert not torch.allclose(expected["0.weight"], make_model().state_dict()["0.weight"])


def _torchrun_env_of_one(monkeypatch) -> None:
    """torchrun's variables for a world of one process on a free local port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
                       "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)


def test_joins_from_torchrun_variables_and_owns_that_group(monkeypatch):
    _torchrun_env_of_one(monkeypatch)
    assert not dist.is_initialized()
    s = DDPStrategy(device="cpu", ctx=RankContext(), timeout_s=30)
    s.setup_environment()
    try:
        assert dist.is_initialized() and dist.get_world_size() == 1
        assert s.reduce(torch.tensor([2.0]), "mean").item() == 2.0
    finally:
        s.teardown()
    assert not dist.is_initialized()


def test_missing_process_group_is_explained(monkeypatch):
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match="torchrun variables"):
        DDPStrategy(device="cpu", ctx=RankContext(world_size=2)).setup_environment()


def test_rejects_bad_timeout():
    with pytest.raises(ValueError, match="timeout_s"):
        DDPStrategy(device="cpu", ctx=RankContext(), timeout_s=0)


def test_sync_batchnorm_converts_batchnorm_layers_before_wrapping(monkeypatch):
    """Trainer(sync_batchnorm=True) on GPUs: every BatchNorm becomes SyncBatchNorm, with the same parameters,
    before DDP wraps the module. (On CPU, DDP then refuses the SyncBatchNorm module, which the Trainer never
    lets happen: it refuses sync_batchnorm off CUDA before any work.)"""
    _torchrun_env_of_one(monkeypatch)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU())
    weight = model[1].weight
    s = DDPStrategy(device="cpu", ctx=RankContext(), timeout_s=30, sync_batchnorm=True)
    s.setup_environment()
    try:
        # DDP itself refuses SyncBatchNorm on CPU modules: that it sees one proves the conversion came first
        with pytest.raises(ValueError, match="SyncBatchNorm layers only work with GPU modules"):
            s.setup_module(model)
        assert isinstance(model[1], torch.nn.SyncBatchNorm) and model[1].weight is weight
    finally:
        s.teardown()
