"""The plain-PyTorch side of ddp_throughput.py: the same model, data and steps under torchrun.

    torchrun --nproc_per_node 2 benchmarks/_torchrun_ddp.py --warmup 20 --steps 200

torchrun sets RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT; this joins a gloo process group, wraps the
model in DistributedDataParallel, shards the data with a DistributedSampler and trains. Rank 0
times the steps after the warm-up and prints one ``RESULT {...}`` line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ddp_throughput import BATCH, LR, make_dataset, make_model  # noqa: E402 - the shared definitions


def join() -> tuple[argparse.Namespace, int, int]:
    """Parse --warmup/--steps, use one thread, join torchrun's gloo group; (args, rank, world size)."""
    p = argparse.ArgumentParser()
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    return args, dist.get_rank(), dist.get_world_size()


def main() -> None:
    args, rank, world = join()
    total = args.warmup + args.steps
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(make_model())
    data = make_dataset(total * BATCH * world)
    loader = DataLoader(data, batch_size=BATCH, sampler=DistributedSampler(data, world, rank, shuffle=False))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    marks: dict[int, tuple[float, float]] = {}
    model.train()
    for step, (x, y) in enumerate(loader):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step + 1 in (args.warmup, total):
            marks[step + 1] = (time.perf_counter(), time.process_time())
        if step + 1 == total:
            break
    seconds = marks[total][0] - marks[args.warmup][0]
    cpu_seconds = marks[total][1] - marks[args.warmup][1]
    if rank == 0:
        print("RESULT " + json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds,
                                      "samples": args.steps * BATCH * world,
                                      "samples_per_s": args.steps * BATCH * world / seconds,
                                      "loss": float(loss)}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
