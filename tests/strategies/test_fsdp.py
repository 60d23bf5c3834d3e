"""FSDPStrategy in one process: its arguments and refusals, the names the Plan accepts, the settings it carries to
the ranks, and (world of one over gloo) sharding a meta-built module and the full <-> sharded state conversion that
single-file checkpoints use. Runs on 2 and 4 ranks: tests/launchers/ray/test_fsdp_ray.py."""
from __future__ import annotations

import pickle
import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

import raytrainer as pl
from raytrainer.plan import Env, Plan
from raytrainer.strategies import FSDPStrategy
from raytrainer.strategies.base import RankContext
from raytrainer.strategies.registry import strategy_for

QUIET = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)


@pytest.mark.parametrize("name", ["fsdp", "fsdp_cpu_offload"])
@pytest.mark.parametrize("devices", [1, 2])
def test_fsdp_names_run_on_ray_ranks(name, devices):
    p = Plan.from_args(env=Env(), strategy=name, devices=devices, accelerator="cpu")
    assert (p.strategy, p.launcher, p.world_size) == (name, "ray", devices)
    s = strategy_for(p)
    assert isinstance(s, FSDPStrategy) and s.cpu_offload == (name == "fsdp_cpu_offload")


class Block(nn.Module):
    pass


def test_fsdp_object_is_carried_to_the_ranks_with_its_settings():
    s = FSDPStrategy(auto_wrap_policy={Block}, sharding_strategy="SHARD_GRAD_OP", state_dict_type="full",
                     activation_checkpointing_policy={Block}, timeout=12)
    trainer = pl.Trainer(strategy=s, devices=2, accelerator="cpu", **QUIET)
    assert trainer.strategy is s and trainer.plan.strategy == "fsdp" and trainer.plan.launcher == "ray"
    copy = pickle.loads(pickle.dumps(trainer.config)).plan.strategy_object
    assert isinstance(copy, FSDPStrategy) and copy.reshard_after_forward is False
    assert copy.state_dict_type == "full" and copy.timeout_s == 12 and copy.auto_wrap_policy == {Block}


@pytest.mark.parametrize("kwargs, message", [
    (dict(device_mesh=(2, 2)), "with sharding_strategy='HYBRID_SHARD'"),
    (dict(sharding_strategy="HYBRID_SHARD", device_mesh=(2, 0)), "two ints >= 1"),
    (dict(sharding_strategy="NO_SHARD"), "use strategy='ddp'"),
    (dict(sharding_strategy="HALF"), "use one of"),
    (dict(state_dict_type="local"), "state_dict_type='local'"),
    (dict(auto_wrap_policy={int}), "nn.Module class"),
    (dict(auto_wrap_policy=3), "set of nn.Module classes or a callable"),
    (dict(mixed_precision="bf16"), "MixedPrecisionPolicy"),
    (dict(checkpoint_io=object()), "checkpoint_io"),
])
def test_bad_fsdp_arguments_are_refused_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FSDPStrategy(**kwargs)


def test_unknown_fsdp_argument_is_a_type_error():
    with pytest.raises(TypeError, match="unknown argument"):
        FSDPStrategy(limit_all_gathers=True)


def test_fsdp_on_tpu_is_refused():
    with pytest.raises(ValueError, match="TPUs run strategy='xla'"):
        Plan.from_args(env=Env(xla_installed=True), strategy="fsdp", accelerator="tpu", devices=1)


@pytest.fixture
def world_of_one(monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    s = FSDPStrategy(auto_wrap_policy={nn.Linear}, timeout=30).bind("cpu", RankContext())
    s.setup_environment()
    yield s
    s.teardown()
    assert not dist.is_initialized()


def test_meta_module_is_materialised_sharded_and_state_round_trips(world_of_one):
    from torch.distributed.tensor import DTensor

    s = world_of_one
    with s.tensor_init_context(empty_init=True):
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    assert all(p.is_meta for p in model.parameters())
    root = s.setup_module(model)
    assert all(isinstance(p, DTensor) and not p.is_meta for p in model.parameters())
    assert all(p.abs().sum() > 0 for p in model.parameters())  # reset_parameters ran on the shards
    with s.no_backward_sync(True):
        root(torch.ones(2, 4)).sum().backward()
    full = {k: v.clone() for k, v in s.full_state(model.state_dict()).items()}  # one rank: views of the shards
    assert all(type(v) is torch.Tensor and v.device.type == "cpu" for v in full.values())
    opt = torch.optim.Adam(model.parameters())
    opt.step()
    opt_full = s.full_state(opt.state_dict())
    assert all(type(v) is torch.Tensor for st in opt_full["state"].values() for v in st.values())
    back = s.shard_module_state(model, {k: v + 1 for k, v in full.items()})
    model.load_state_dict(back)
    for k, v in s.full_state(model.state_dict()).items():
        torch.testing.assert_close(v, full[k] + 1)
    opt.load_state_dict(s.shard_optimizer_state(opt, opt_full))
    assert all(isinstance(v, DTensor) for st in opt.state.values() for k, v in st.items() if k != "step")


def test_fsdp_with_16_mixed_is_refused_before_any_work():
    with pytest.raises(ValueError, match="16-mixed' with FSDP is not supported.*bf16-mixed"):
        Plan.from_args(env=Env(cuda_device_count=2), strategy="fsdp", accelerator="gpu", devices=2, precision=16)
