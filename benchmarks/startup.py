"""Startup cost of a trivial 2-rank job: raytrainer vs Ray Train's TorchTrainer, in one command.

Job (both sides): MLP Linear(32,64)-ReLU-Linear(64,1), 2 ranks on CPU, 50 SGD steps of batch 32 per
rank, DDP over gloo, torch.set_num_threads(1) per rank, no checkpoints, no logger, no progress bar.
- raytrainer: ``Trainer(num_processes=2, max_steps=50)``.
- Ray Train 2.60 (V2): ``TorchTrainer(train_loop_per_worker, ScalingConfig(num_workers=2))``; the loop
  uses ``prepare_model`` (DDP) and ``prepare_data_loader`` (DistributedSampler), does the same 50 steps
  and reports one final metric.

Two numbers per run, both measured from the ``fit`` call on the driver:
- time to first step: until rank 0 finished its first optimizer step (every rank is up, the
  process group is formed and one gradient all-reduce happened); rank 0 writes ``time.time()``
  to a file and the driver subtracts (same host, same clock);
- total: until ``fit`` returned.

Ray start-up is not the frameworks' work, so the main ("warm") numbers start one local Ray instance
before both and time ``fit`` only, interleaving the frameworks (alternating which goes first) and
taking medians. The "cold" numbers run each framework in a fresh Python process and include
``ray.init`` (the same explicit call for both), as a user's first run on a laptop would.

    python benchmarks/startup.py [--repeats 5] [--cold-repeats 2] [--profile]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STEPS, BATCH, WORLD, DIM = 50, 32, 2, 32


# ------------------------------------------------------------------------------------------------
# the shared job
# ------------------------------------------------------------------------------------------------
def make_dataset() -> Any:
    """STEPS batches per rank: WORLD * STEPS * BATCH samples."""
    import torch
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(WORLD * STEPS * BATCH, DIM, generator=g)
    return TensorDataset(x, x[:, :1] * 2.0)


def make_mlp() -> Any:
    from torch import nn

    return nn.Sequential(nn.Linear(DIM, 64), nn.ReLU(), nn.Linear(64, 1))


def stamp(path: str) -> None:
    """Record 'now' once, for the driver to read (write-then-rename so it never reads half a file)."""
    if not os.path.exists(path):
        with open(path + ".tmp", "w") as f:
            f.write(repr(time.time()))
        os.replace(path + ".tmp", path)


# ------------------------------------------------------------------------------------------------
# raytrainer
# ------------------------------------------------------------------------------------------------
def run_raytrainer(stamp_path: str) -> dict[str, float]:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    import raytrainer as rt

    class FirstStep(rt.Callback):
        def __init__(self, path: str) -> None:
            self.path = path

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if trainer.global_rank == 0 and batch_idx == 0:
                stamp(self.path)

    class Model(rt.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_mlp()

        def setup(self, stage: str) -> None:
            torch.set_num_threads(1)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    torch.manual_seed(0)
    model, data = Model(), DataLoader(make_dataset(), batch_size=BATCH)
    trainer = rt.Trainer(num_processes=WORLD, max_steps=STEPS, enable_progress_bar=False, logger=False,
                         enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[FirstStep(stamp_path)])
    start = time.time()
    trainer.fit(model, data)
    end = time.time()
    assert trainer.global_step == STEPS, trainer.global_step
    out = {"first_step_s": float(Path(stamp_path).read_text()) - start, "total_s": end - start}
    group = trainer.__dict__.get("_worker_group")
    if group is not None and getattr(group, "timings", None):
        out.update({f"group_{k}": v for k, v in group.timings.items()})
    return out


# ------------------------------------------------------------------------------------------------
# Ray Train
# ------------------------------------------------------------------------------------------------
def _ray_train_loop(config: dict[str, Any]) -> None:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    import ray.train
    import ray.train.torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(make_mlp())
    loader = ray.train.torch.prepare_data_loader(DataLoader(make_dataset(), batch_size=BATCH))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rank = ray.train.get_context().get_world_rank()
    loss = torch.tensor(0.0)
    for step, (x, y) in enumerate(loader):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step == 0 and rank == 0:
            stamp(config["stamp"])
        if step + 1 >= STEPS:
            break
    if rank == 0:
        Path(config["stamp"] + ".steps").write_text(str(step + 1))
    ray.train.report({"loss": float(loss), "steps": step + 1})


def run_ray_train(stamp_path: str, storage: str) -> dict[str, float]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(_ray_train_loop, train_loop_config={"stamp": stamp_path},
                           scaling_config=ScalingConfig(num_workers=WORLD, use_gpu=False),
                           run_config=RunConfig(storage_path=storage, name=f"startup-{time.time_ns()}"))
    start = time.time()
    result = trainer.fit()
    end = time.time()
    if result.error is not None:
        raise RuntimeError(f"Ray Train run failed: {result.error}")
    # V2 keeps metrics only with a checkpoint; rank 0 leaves the step count in a file instead
    assert int(Path(stamp_path + ".steps").read_text()) == STEPS
    return {"first_step_s": float(Path(stamp_path).read_text()) - start, "total_s": end - start}


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------
def init_ray() -> None:
    import logging

    import ray

    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 2 * WORLD), include_dashboard=False,
             logging_level=logging.ERROR, log_to_driver=False)


def measure(kind: str, workdir: str) -> dict[str, float]:
    stamp_path = os.path.join(workdir, f"{kind}-{time.time_ns()}.stamp")
    if kind == "raytrainer":
        return run_raytrainer(stamp_path)
    return run_ray_train(stamp_path, os.path.join(workdir, "ray_results"))


def cold(kind: str, workdir: str) -> dict[str, float]:
    """One run in a fresh interpreter (this script with --cold-one), Ray not started yet."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--cold-one", kind, workdir], env=env,
                          capture_output=True, text=True, timeout=600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"cold {kind} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def cold_one(kind: str, workdir: str) -> None:
    """(in the fresh interpreter) ray.init + fit, both timed: the first run of a session."""
    t0 = time.time()
    init_ray()
    t1 = time.time()
    r = measure(kind, workdir)
    r["ray_init_s"] = t1 - t0
    r["first_step_s"] += t1 - t0
    r["total_s"] += t1 - t0
    print("RESULT " + json.dumps(r), flush=True)


def summarize(label: str, runs: dict[str, list[dict[str, float]]]) -> dict[str, float]:
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("first_step_s", "total_s")} for k, v in runs.items()}
    rt, rtrain = med["raytrainer"], med["ray_train"]
    print(f"\n{label}: medians of {len(runs['raytrainer'])} runs each")
    print(f"  {'':<12}{'first step':>12}{'total':>10}")
    for k in ("raytrainer", "ray_train"):
        print(f"  {k:<12}{med[k]['first_step_s']:>11.2f}s{med[k]['total_s']:>9.2f}s")
        print(f"  {'':<12}runs: " + ", ".join(f"{r['first_step_s']:.2f}/{r['total_s']:.2f}" for r in runs[k]))
    ratio_first = rt["first_step_s"] / rtrain["first_step_s"]
    ratio_total = rt["total_s"] / rtrain["total_s"]
    print(f"  ratio raytrainer / Ray Train: first step {ratio_first:.3f}, total {ratio_total:.3f} "
          f"(target <= 0.25)")
    return {"first_step_ratio": ratio_first, "total_ratio": ratio_total}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="warm runs per framework (interleaved)")
    p.add_argument("--cold-repeats", type=int, default=2, help="cold runs per framework (0 to skip)")
    p.add_argument("--profile", action="store_true", help="print raytrainer's start-up breakdown per run")
    p.add_argument("--cold-one", nargs=2, metavar=("KIND", "WORKDIR"), help=argparse.SUPPRESS)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.cold_one:
        cold_one(*args.cold_one)
        return
    print(f"load average before: {os.getloadavg()}  cores: {os.cpu_count()}")

    import ray

    with tempfile.TemporaryDirectory(prefix="rt-startup-") as workdir:
        if args.cold_repeats:
            cold_runs: dict[str, list[dict[str, float]]] = {"raytrainer": [], "ray_train": []}
            for i in range(args.cold_repeats):
                for kind in (("raytrainer", "ray_train") if i % 2 == 0 else ("ray_train", "raytrainer")):
                    cold_runs[kind].append(cold(kind, workdir))
            summarize("cold (fresh process; includes ray.init)", cold_runs)
            print("  ray.init: " + ", ".join(f"{r['ray_init_s']:.2f}s" for v in cold_runs.values() for r in v))

        init_ray()
        runs: dict[str, list[dict[str, float]]] = {"raytrainer": [], "ray_train": []}
        measure("raytrainer", workdir)  # one untimed warm-up each: imports, first worker processes
        measure("ray_train", workdir)
        for i in range(args.repeats):
            for kind in (("raytrainer", "ray_train") if i % 2 == 0 else ("ray_train", "raytrainer")):
                runs[kind].append(measure(kind, workdir))
        ratios = summarize("warm (Ray already running; fit only)", runs)
        if args.profile:
            print("\n  raytrainer start-up breakdown (WorkerGroup.timings, then the rest until rank 0's first step):")
            for r in runs["raytrainer"]:
                start = r.get("group_start_s", float("nan"))
                print(f"    placement {r.get('group_placement_s', float('nan')):.2f}s, actors+imports "
                      f"{r.get('group_actors_s', float('nan')):.2f}s, rendezvous "
                      f"{r.get('group_rendezvous_s', float('nan')):.2f}s, group start {start:.2f}s; "
                      f"then setup+first step {r['first_step_s'] - start:.2f}s; "
                      f"after first step {r['total_s'] - r['first_step_s']:.2f}s")
        ray.shutdown()
    print(f"\nload average after: {os.getloadavg()}")
    print("RATIOS " + json.dumps(ratios))


if __name__ == "__main__":
    main()
