"""The plain-PyTorch side of fsdp.py: the same transformer, data and steps, sharded with FSDP2 under torchrun.

    torchrun --nproc_per_node 2 benchmarks/_torchrun_fsdp.py --warmup 3 --steps 12

Joins a gloo process group, applies ``fully_shard`` to every encoder layer and to the root, shards the data with a
DistributedSampler and trains with Adam. Rank 0 times the steps after the warm-up and prints one ``RESULT {...}``.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _torchrun_ddp import join  # noqa: E402 - the shared definitions
from fsdp import BATCH, LM, SEQ, lm_loss, make_dataset  # noqa: E402


def main() -> None:
    args, rank, world = join()
    total = args.warmup + args.steps
    torch.manual_seed(0)
    model = LM()
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    data = make_dataset(total * BATCH * world)
    loader = DataLoader(data, batch_size=BATCH, sampler=DistributedSampler(data, world, rank, shuffle=False))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    marks: dict[int, float] = {}
    for step, (tokens,) in enumerate(loader):
        loss = lm_loss(model, tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step + 1 in (args.warmup, total):
            marks[step + 1] = time.perf_counter()
        if step + 1 == total:
            break
    seconds = marks[total] - marks[args.warmup]
    if rank == 0:
        print("RESULT " + json.dumps({"seconds": seconds, "tokens_per_s": args.steps * BATCH * SEQ * world / seconds,
                                      "loss": float(loss)}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
