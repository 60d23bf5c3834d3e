"""Rank functions for the launch tests: torch_xla.launch pickles them by name, so they live in a module."""
from __future__ import annotations

import faulthandler
import os
import pickle
import time
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from raytrainer.data.samplers import distributed_loader
from raytrainer.launchers.xla import _rank_context
from raytrainer.strategies.xla import XLAStrategy


def plumbing(payload: bytes, outdir: str, workdir: str) -> dict[str, Any]:
    """What a rank of a tpu_cores=2 run does before its first collective: context, strategy, device, data shard."""
    ctx = _rank_context(2)
    strategy = XLAStrategy(ctx=ctx)
    strategy.setup_environment()
    mine = pickle.loads(payload)  # each rank unpacks its own copy, as the launcher's rank entry does
    mine.append(ctx.global_rank)
    layer = strategy.setup_module(fixed_layer())
    data = TensorDataset(torch.arange(10, dtype=torch.float32).repeat(4, 1).T)
    loader = distributed_loader(DataLoader(data, batch_size=3), ctx, ordered=True)
    outputs, rows = [], []
    with torch.no_grad():
        for batch in loader:
            (x,) = strategy.batch_to_device(batch)
            outputs.append(layer(x).cpu())
            rows.append(x[:, 0].cpu())
    if strategy.is_global_zero:
        with open(os.path.join(outdir, "written-by-rank0.txt"), "w") as f:
            f.write(str(ctx.global_rank))
    return {"rank": ctx.global_rank, "local_rank": ctx.local_rank, "world": ctx.world_size,
            "device": str(strategy.root_device), "payload": mine, "rows": torch.cat(rows),
            "out": torch.cat(outputs), "pid": os.getpid()}


def fixed_layer() -> torch.nn.Linear:
    """Weights set by hand: rank threads share one CPU RNG, so seeding inside a rank would race."""
    layer = torch.nn.Linear(4, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.1, -0.2, 0.3, 0.4]]))
        layer.bias.fill_(0.5)
    return layer


class RankFailed(RuntimeError):
    """Raised on purpose by a rank."""


def fail_on_rank1(workdir: str) -> int:
    rank = _rank_context(2).global_rank
    if rank == 1:
        raise RankFailed("rank 1 failed on purpose")
    return rank


def abort_on_rank1(workdir: str) -> int:
    rank = _rank_context(2).global_rank
    if rank == 1:
        time.sleep(0.5)
        faulthandler.disable()  # pytest's fault handler would print this process's stacks; the crash is the point
        os.abort()  # a hard crash, as when XLA aborts a hung collective: no Python error reaches the pool
    return rank


def stall(seconds: float, workdir: str) -> None:
    """Never beats the heartbeat: stands for a rank stuck in a collective."""
    time.sleep(seconds)
