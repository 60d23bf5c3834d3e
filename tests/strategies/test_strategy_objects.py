"""Strategies as objects (Lightning's ``strategy=DDPStrategy(...)``) and Lightning's strategy names, compared with
pytorch_lightning where it can run the same thing on this machine."""
from __future__ import annotations

import pickle
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as pl
from raytrainer import strategies
from raytrainer.plan import DDP_STRATEGIES, Plan
from raytrainer.strategies import DDPStrategy, SingleDeviceStrategy
from raytrainer.strategies.base import RankContext

QUIET = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(8, 3)), batch_size=4)


def test_exports_every_name_lightning_exports(L):
    assert set(L.strategies.__all__) <= set(strategies.__all__)
    for name in ("XLAStrategy", "SingleDeviceXLAStrategy"):
        assert hasattr(strategies, name) and hasattr(L.strategies, name)


@pytest.mark.parametrize("name", ["DeepSpeedStrategy", "ModelParallelStrategy"])
def test_strategies_raytrainer_cannot_run_refuse_to_be_built(name):
    with pytest.raises(ValueError, match=f"{name} is not supported by raytrainer.*DDPStrategy"):
        getattr(strategies, name)()


@pytest.mark.parametrize("name", ["deepspeed", "deepspeed_stage_3_offload", "single_tpu"])
def test_strategy_names_raytrainer_cannot_run_are_refused_clearly(name):
    with pytest.raises(ValueError, match=f"strategy='{name}' is not supported"):
        pl.Trainer(strategy=name, **QUIET)


def test_every_name_in_lightnings_registry_is_accepted_or_refused_with_a_reason(L):
    from raytrainer.plan import STRATEGIES, UNSUPPORTED_STRATEGIES

    for name in L.strategies.StrategyRegistry.available_strategies():
        assert name in STRATEGIES or name in UNSUPPORTED_STRATEGIES, name


@pytest.mark.parametrize("name", sorted(DDP_STRATEGIES))
def test_ddp_aliases_mean_what_lightnings_registry_says(L, name):
    lightning = L.strategies.StrategyRegistry[name]["init_params"].get("find_unused_parameters")
    assert DDP_STRATEGIES[name] == lightning
    trainer = pl.Trainer(strategy=name, num_processes=2, **QUIET)
    assert trainer.plan.launcher == "ray"
    assert isinstance(trainer.strategy, DDPStrategy)
    assert trainer.strategy.find_unused_parameters == bool(lightning)


def test_trainer_strategy_before_fit_is_what_lightning_shows(L):
    ours, theirs = pl.Trainer(**QUIET), L.Trainer(accelerator="cpu", **QUIET)
    assert type(ours.strategy).__name__ == type(theirs.strategy).__name__ == "SingleDeviceStrategy"
    assert ours.strategy.root_device == theirs.strategy.root_device == torch.device("cpu")
    ours = pl.Trainer(strategy="ddp", devices=2, accelerator="cpu", **QUIET)
    theirs = L.Trainer(strategy="ddp", devices=2, accelerator="cpu", **QUIET)
    assert type(ours.strategy).__name__ == type(theirs.strategy).__name__ == "DDPStrategy"
    assert ours.strategy.world_size == theirs.strategy.world_size == 2


def test_the_users_object_is_trainer_strategy_and_keeps_its_arguments():
    s = DDPStrategy(find_unused_parameters=True, static_graph=False, gradient_as_bucket_view=True,
                    timeout=timedelta(seconds=42), process_group_backend="gloo", start_method="spawn")
    trainer = pl.Trainer(strategy=s, num_processes=2, **QUIET)
    assert trainer.strategy is s and trainer.plan.strategy == "ddp" and trainer.plan.launcher == "ray"
    assert s._ddp_kwargs == {"find_unused_parameters": True, "static_graph": False, "gradient_as_bucket_view": True}
    assert s.timeout == timedelta(seconds=42) and s.process_group_backend == "gloo"
    copy = pickle.loads(pickle.dumps(trainer.config))  # what the ranks receive
    assert copy.plan.strategy_object._ddp_kwargs == s._ddp_kwargs and copy.plan.strategy_object.timeout_s == 42


def test_ddp_arguments_reach_the_ddp_wrapper(monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    hooked = []

    def hook(state, bucket):
        hooked.append(state)
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    s = DDPStrategy(find_unused_parameters=True, gradient_as_bucket_view=True, bucket_cap_mb=1,
                    ddp_comm_hook=hook, ddp_comm_state="state", timeout=timedelta(seconds=30))
    s.bind("cpu", RankContext())
    s.setup_environment()
    try:
        wrapped = s.setup_module(nn.Linear(3, 1))
        assert isinstance(wrapped, DistributedDataParallel)
        assert wrapped.find_unused_parameters and wrapped.gradient_as_bucket_view
        wrapped(torch.ones(2, 3)).sum().backward()
        assert hooked == ["state"]
    finally:
        s.teardown()
    assert not dist.is_initialized()


def test_ddp_strategy_refuses_what_it_cannot_do():
    with pytest.raises(TypeError, match="unknown argument.*'find_unused_params'"):
        DDPStrategy(find_unused_params=True)
    with pytest.raises(ValueError, match="process_group_backend='mpi'"):
        DDPStrategy(process_group_backend="mpi")
    with pytest.raises(ValueError, match="model_averaging_period.*not supported"):
        DDPStrategy(model_averaging_period=4)
    with pytest.raises(ValueError, match="parallel_devices.*devices=N"):
        DDPStrategy(parallel_devices=[torch.device("cpu")] * 2)
    with pytest.raises(ValueError, match="cluster_environment.*Ray places the ranks"):
        DDPStrategy(cluster_environment=object())
    with pytest.raises(ValueError, match="'nccl' needs GPUs"):
        from raytrainer.launchers.ray.group import WorkerGroup
        WorkerGroup("x", ranks_per_node=2, backend="nccl")


def test_lightnings_own_strategy_object_is_refused_with_the_fix(L):
    with pytest.raises(ValueError, match="pytorch_lightning's class.*from raytrainer.strategies import DDPStrategy"):
        pl.Trainer(strategy=L.strategies.DDPStrategy(), **QUIET)


def test_single_device_object_picks_the_device_and_runs_in_process(tmp_path):
    s = SingleDeviceStrategy("cpu")
    trainer = pl.Trainer(strategy=s, max_steps=2, default_root_dir=str(tmp_path), **QUIET)
    assert trainer.plan.launcher == "in_process" and trainer.strategy is s
    model = Tiny()
    trainer.fit(model, loader())
    assert trainer.global_step == 2 and trainer.strategy is s and s.model is model
    with pytest.raises(ValueError, match="runs one device"):
        pl.Trainer(strategy=SingleDeviceStrategy("cpu"), devices=2, **QUIET)
    with pytest.raises(ValueError, match="runs on cpu, but accelerator='gpu'"):
        Plan.from_args(strategy=SingleDeviceStrategy("cpu"), accelerator="gpu")


def test_ddp_object_on_one_device_trains_in_process(tmp_path):
    trainer = pl.Trainer(strategy=DDPStrategy(find_unused_parameters=True), max_steps=1,
                         default_root_dir=str(tmp_path), **QUIET)
    assert trainer.plan.launcher == "in_process"
    trainer.fit(Tiny(), loader())
    assert trainer.global_step == 1
