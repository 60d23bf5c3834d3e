"""Steady-state DDP training throughput, 2 ranks on CPU: raytrainer vs torchrun + plain DDP, in one command.

Model: MLP 512-1024-1024-10 (1.6 M parameters), cross-entropy, SGD, batch 128 per rank, synthetic
data in memory, DataLoader without workers, torch.set_num_threads(1) and OMP_NUM_THREADS=1 per rank,
gloo. A step is roughly 20-50 ms on one core of this machine.
- raytrainer: ``Trainer(num_processes=2, max_steps=warmup+steps)`` on a local Ray instance started
  once; progress bar, logger, checkpointing and model summary off (the torchrun script has none).
- torchrun: ``torchrun --nproc_per_node 2 benchmarks/_torchrun_ddp.py``, the same model, data order
  (DistributedSampler, shuffle off) and optimizer (it imports the definitions below).

Throughput is measured on rank 0 between the end of step ``warmup`` and the end of step
``warmup+steps``: samples (both ranks) per second. Rank 0's process CPU time over the same window
(all its threads: gloo, Ray's) is printed too; unlike wall time it hardly moves with the load
other programs put on the machine, so it shows a framework's own per-step cost. Start-up is excluded on both sides (see
startup.py for that). Runs alternate between the two, and the medians are compared.

    python benchmarks/ddp_throughput.py [--repeats 7] [--warmup 20] [--steps 200]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

REPO = Path(__file__).resolve().parents[1]
WORLD, BATCH, LR, DIM_IN, HIDDEN, CLASSES = 2, 128, 0.01, 512, 1024, 10


def make_model() -> nn.Module:
    """The benchmark MLP (shared with _torchrun_ddp.py)."""
    return nn.Sequential(nn.Linear(DIM_IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                         nn.Linear(HIDDEN, CLASSES))


def make_dataset(n: int) -> TensorDataset:
    """n synthetic samples, fixed by a seed (shared with _torchrun_ddp.py)."""
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, DIM_IN, generator=g), torch.randint(0, CLASSES, (n,), generator=g))


def run_raytrainer(warmup: int, steps: int, out_dir: str, **trainer_kwargs: Any) -> dict[str, float]:
    from torch.utils.data import DataLoader

    sys.path.insert(0, str(REPO))
    import raytrainer as rt

    total = warmup + steps

    class Window(rt.Callback):
        """Rank 0: wall and process CPU time at the end of step ``warmup`` and of the last step."""

        def __init__(self, path: str) -> None:
            self.path = path
            self.marks: dict[int, tuple[float, float]] = {}

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if trainer.global_rank == 0 and trainer.global_step in (warmup, total):
                self.marks[trainer.global_step] = (time.perf_counter(), time.process_time())
                if trainer.global_step == total:
                    (w0, c0), (w1, c1) = self.marks[warmup], self.marks[total]
                    Path(self.path).write_text(json.dumps({"seconds": w1 - w0, "cpu_seconds": c1 - c0}))

    class Model(rt.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model()

        def setup(self, stage: str) -> None:
            torch.set_num_threads(1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=LR)

    path = os.path.join(out_dir, f"window-{time.time_ns()}.json")
    torch.manual_seed(0)
    loader = DataLoader(make_dataset(total * BATCH * WORLD), batch_size=BATCH)
    trainer = rt.Trainer(num_processes=WORLD, max_steps=total, enable_progress_bar=False, logger=False,
                         enable_checkpointing=False, enable_model_summary=False, callbacks=[Window(path)],
                         **trainer_kwargs)
    trainer.fit(Model(), loader)
    assert trainer.global_step == total, trainer.global_step
    window = json.loads(Path(path).read_text())
    return {**window, "samples_per_s": steps * BATCH * WORLD / window["seconds"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(warmup: int, steps: int, script: str = "_torchrun_ddp.py", world: int = WORLD) -> dict[str, float]:
    """Run ``benchmarks/<script>`` under torchrun with ``world`` processes; its rank 0's ``RESULT {...}`` line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(REPO / "benchmarks" / script),
           "--warmup", str(warmup), "--steps", str(steps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by Ray's worker processes and by torchrun's
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    print(f"load average before: {os.getloadavg()}  cores: {os.cpu_count()}")

    import logging

    import ray

    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, WORLD), include_dashboard=False,
             logging_level=logging.ERROR, log_to_driver=False)
    runs: dict[str, list[dict[str, float]]] = {"raytrainer": [], "torchrun": []}
    with tempfile.TemporaryDirectory(prefix="rt-ddp-") as out_dir:
        for i in range(args.repeats):
            for kind in (("raytrainer", "torchrun") if i % 2 == 0 else ("torchrun", "raytrainer")):
                r = run_raytrainer(args.warmup, args.steps, out_dir) if kind == "raytrainer" else \
                    run_torchrun(args.warmup, args.steps)
                runs[kind].append(r)
                print(f"  run {i + 1} {kind:<10} {r['samples_per_s']:8.0f} samples/s "
                      f"({r['seconds'] * 1000 / args.steps:.1f} ms/step, rank 0 CPU "
                      f"{r['cpu_seconds'] * 1000 / args.steps:.1f} ms/step)  load {os.getloadavg()[0]:.1f}",
                      flush=True)
    ray.shutdown()
    med = {k: statistics.median(r["samples_per_s"] for r in v) for k, v in runs.items()}
    ratio = med["raytrainer"] / med["torchrun"]
    cpu_med = {k: statistics.median(r["cpu_seconds"] for r in v) for k, v in runs.items()}
    print(f"\nmedian of {args.repeats} runs, {args.steps} steps after {args.warmup} warm-up steps, "
          f"{WORLD} ranks x batch {BATCH}:")
    for k in runs:
        cpu = cpu_med[k] * 1000 / args.steps
        best = max(r["samples_per_s"] for r in runs[k])
        print(f"  {k:<10} {med[k]:8.0f} samples/s ({BATCH * WORLD / med[k] * 1000:.1f} ms/step; best run "
              f"{best:.0f} samples/s; rank 0 process CPU {cpu:.1f} ms/step, all threads)")
    print(f"  raytrainer / torchrun: {ratio:.3f} (target >= 0.95)")
    print(f"  per-step CPU cost, torchrun / raytrainer: {cpu_med['torchrun'] / cpu_med['raytrainer']:.3f} "
          "(the load-insensitive view of the same ratio)")
    print(f"load average after: {os.getloadavg()}")
    print("RATIO " + json.dumps({"throughput_ratio": ratio, "cpu_ratio": cpu_med["torchrun"] / cpu_med["raytrainer"]}))


if __name__ == "__main__":
    main()
