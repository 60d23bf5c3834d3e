"""Startup cost of a trivial 2-rank job: raytrainer vs Ray Train's TorchTrainer, in one command.

Job (both sides): MLP Linear(32,64)-ReLU-Linear(64,1), 2 ranks on CPU, 50 SGD steps of batch 32 per
rank, DDP over gloo, torch.set_num_threads(1) per rank, no checkpoints, no logger, no progress bar.
- raytrainer: ``Trainer(num_processes=2, max_steps=50)``.
- Ray Train 2.60 (V2): ``TorchTrainer(train_loop_per_worker, ScalingConfig(num_workers=2))``; the loop
  uses ``prepare_model`` (DDP) and ``prepare_data_loader`` (DistributedSampler), does the same 50 steps
  and reports one final metric.
- bare (the floor, for reference): two plain Ray actors that form a gloo process group and run the
  same DDP loop; no framework at all.

Two numbers per run, both measured from the ``fit`` call on the driver:
- time to first step: until rank 0 finished its first optimizer step (every rank is up, the
  process group is formed and one gradient all-reduce happened); rank 0 writes ``time.time()``
  to a file and the driver subtracts (same host, same clock);
- total: until ``fit`` returned.

Ray start-up is not the frameworks' work, so the main ("warm") numbers start one local Ray instance
before all of them and time ``fit`` only, interleaving the contenders (rotating which goes first)
after one untimed warm-up each, and taking medians. The "cold" numbers run each framework in a fresh
Python process and include ``ray.init`` (the same explicit call for both), as a user's first run on a
laptop would.

Warm ranks (``--warm``): after one fit, a new Trainer's fit of the same shape runs on the rank processes the
finished call kept (raytrainer/launchers/ray/pool.py): its call-to-first-step time, then ``validate`` of one batch
per rank after it (whole call). The comparison runs above release raytrainer's ranks after each fit, so every
contender starts new worker processes there.

    python benchmarks/startup.py [--cold | --warm] [--repeats 5] [--cold-repeats 2] [--profile]
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
def _raytrainer_job(stamp_path: str) -> tuple[Any, Any, Any]:
    """(trainer, model, loader) of the shared job, with a callback that stamps rank 0's first step."""
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

        def validation_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    torch.manual_seed(0)
    model, data = Model(), DataLoader(make_dataset(), batch_size=BATCH)
    trainer = rt.Trainer(num_processes=WORLD, max_steps=STEPS, enable_progress_bar=False, logger=False,
                         enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[FirstStep(stamp_path)])
    return trainer, model, data


def run_raytrainer(stamp_path: str, keep_warm: bool = False) -> dict[str, float]:
    """One fit; without ``keep_warm`` its rank processes are released afterwards, so the next fit starts a new
    group as Ray Train's does (the comparison); with it they serve the next call (warm ranks)."""
    import raytrainer as rt

    trainer, model, data = _raytrainer_job(stamp_path)
    start = time.time()
    trainer.fit(model, data)
    end = time.time()
    assert trainer.global_step == STEPS, trainer.global_step
    out = {"first_step_s": float(Path(stamp_path).read_text()) - start, "total_s": end - start}
    group = trainer.session.worker_group
    if group is not None and getattr(group, "timings", None):
        out.update({f"group_{k}": v for k, v in group.timings.items()})
    if keep_warm:  # then validate one batch per rank on the same (warm) ranks: the whole call
        from torch.utils.data import DataLoader, Subset

        one_batch = DataLoader(Subset(make_dataset(), range(WORLD * BATCH)), batch_size=BATCH)
        start = time.time()
        trainer.validate(model, one_batch, verbose=False)
        out["validate_s"] = time.time() - start
    else:
        rt.shutdown()
    return out


# ------------------------------------------------------------------------------------------------
# Ray Train
# ------------------------------------------------------------------------------------------------
def _ray_train_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

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
# the floor: two bare Ray actors with a gloo process group and DDP, no framework
# ------------------------------------------------------------------------------------------------
def run_bare(stamp_path: str) -> dict[str, float]:
    import socket
    from datetime import timedelta

    import ray

    @ray.remote(num_cpus=1)
    class Rank:
        def train(self, rank: int, addr: str, port: int) -> int:
            import torch
            import torch.distributed as dist
            from torch import nn
            from torch.utils.data import DataLoader, DistributedSampler

            torch.set_num_threads(1)
            torch.manual_seed(0)
            dist.init_process_group("gloo", init_method=f"tcp://{addr}:{port}", rank=rank, world_size=WORLD,
                                    timeout=timedelta(seconds=120))
            model = nn.parallel.DistributedDataParallel(make_mlp())
            data = make_dataset()
            loader = DataLoader(data, batch_size=BATCH, sampler=DistributedSampler(data, WORLD, rank, shuffle=False))
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            steps = 0
            for x, y in loader:
                loss = nn.functional.mse_loss(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
                if steps == 1 and rank == 0:
                    stamp(stamp_path)
            dist.destroy_process_group()
            return steps

    with socket.socket() as sock:  # one machine: the driver can pick rank 0's port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.time()
    actors = [Rank.remote() for _ in range(WORLD)]
    steps = ray.get([a.train.remote(r, "127.0.0.1", port) for r, a in enumerate(actors)], timeout=300)
    for a in actors:
        ray.kill(a)
    end = time.time()
    assert steps == [STEPS] * WORLD, steps
    return {"first_step_s": float(Path(stamp_path).read_text()) - start, "total_s": end - start}


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------
KINDS = ("raytrainer", "ray_train", "bare")
def init_ray() -> None:
    import logging

    import ray

    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 2 * WORLD), include_dashboard=False,
             logging_level=logging.ERROR, log_to_driver=False)


def measure(kind: str, workdir: str, attempts: int = 2) -> dict[str, float]:
    """One timed run; on this loaded machine Ray Train's worker health check sometimes fails a run,
    which is then retried once (and reported)."""
    for attempt in range(1, attempts + 1):
        try:
            return _measure_once(kind, workdir)
        except Exception as err:  # noqa: BLE001 - report and retry
            print(f"  ({kind} run failed on attempt {attempt}: {type(err).__name__}: {str(err).splitlines()[0]})",
                  flush=True)
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


def _measure_once(kind: str, workdir: str) -> dict[str, float]:
    stamp_path = os.path.join(workdir, f"{kind}-{time.time_ns()}.stamp")
    if kind == "raytrainer":
        return run_raytrainer(stamp_path)
    if kind == "bare":
        return run_bare(stamp_path)
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


WHOLE_KINDS = ("raytrainer", "ray_train")


def whole(kind: str, workdir: str) -> dict[str, float]:
    """One user's script, timed from the interpreter's start to its exit: each framework with its defaults (its
    fit starts Ray itself, and the process stops it at exit)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    start = time.time()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--whole-one", kind, workdir], env=env,
                          capture_output=True, text=True, timeout=600)
    end = time.time()
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None or proc.returncode != 0:
        raise RuntimeError(f"whole-process {kind} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    r = json.loads(line[len("RESULT "):])
    r["whole_s"] = end - start
    return r


def summarize_whole(runs: dict[str, list[dict[str, float]]]) -> dict[str, float]:
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("whole_s", "total_s", "first_step_s")}
           for k, v in runs.items()}
    print(f"\nwhole process (interpreter start to exit; each with its defaults: fit starts Ray): medians of "
          f"{len(runs['raytrainer'])} runs each")
    print(f"  {'':<12}{'process':>10}{'fit()':>9}{'1st step':>10}   runs (process/fit)")
    for k in WHOLE_KINDS:
        runs_text = ", ".join(f"{r['whole_s']:.2f}/{r['total_s']:.2f}" for r in runs[k])
        print(f"  {k:<12}{med[k]['whole_s']:>9.2f}s{med[k]['total_s']:>8.2f}s{med[k]['first_step_s']:>9.2f}s   "
              f"{runs_text}")
    rt, rtrain = med["raytrainer"], med["ray_train"]
    ratio, fit_ratio = rt["whole_s"] / rtrain["whole_s"], rt["total_s"] / rtrain["total_s"]
    print(f"  raytrainer / Ray Train: whole process {ratio:.3f} (target <= 0.25), fit() call to return {fit_ratio:.3f}")
    return {"whole_process_ratio": ratio, "whole_fit_ratio": fit_ratio}


def whole_one(kind: str, workdir: str) -> None:
    """(in the fresh interpreter) the framework's own imports and fit, Ray started by the fit."""
    r = measure(kind, workdir, attempts=1)
    print("RESULT " + json.dumps(r), flush=True)


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


def order(i: int) -> tuple[str, ...]:
    """Rotate which framework goes first, so none always runs right after another's teardown."""
    return KINDS[i % len(KINDS):] + KINDS[:i % len(KINDS)]


def summarize(label: str, runs: dict[str, list[dict[str, float]]]) -> dict[str, float]:
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("first_step_s", "total_s")} for k, v in runs.items()}
    rt, rtrain, bare = med["raytrainer"], med["ray_train"], med["bare"]
    print(f"\n{label}: medians of {len(runs['raytrainer'])} runs each")
    print(f"  {'':<12}{'first step':>12}{'total':>10}   runs (first step/total)")
    for k in KINDS:
        runs_text = ", ".join(f"{r['first_step_s']:.2f}/{r['total_s']:.2f}" for r in runs[k])
        print(f"  {k:<12}{med[k]['first_step_s']:>11.2f}s{med[k]['total_s']:>9.2f}s   {runs_text}")
    ratio_first = rt["first_step_s"] / rtrain["first_step_s"]
    ratio_total = rt["total_s"] / rtrain["total_s"]
    print(f"  raytrainer / Ray Train: first step {ratio_first:.3f}, total {ratio_total:.3f} (target <= 0.25)")
    print(f"  bare actors / Ray Train: first step {bare['first_step_s'] / rtrain['first_step_s']:.3f}, "
          f"total {bare['total_s'] / rtrain['total_s']:.3f} (the floor on this machine now)")
    print(f"  raytrainer - bare actors: first step {rt['first_step_s'] - bare['first_step_s']:+.2f}s, "
          f"total {rt['total_s'] - bare['total_s']:+.2f}s (raytrainer's own cost)")
    return {"first_step_ratio": ratio_first, "total_ratio": ratio_total}


def warm_ranks(workdir: str, repeats: int) -> dict[str, float]:
    """Warm ranks: after one fit, each new Trainer's fit runs on the kept rank processes; its call-to-first-step
    time, then ``validate`` of one batch per rank (whole call), medians of ``repeats``."""
    stamp_at = lambda: os.path.join(workdir, f"warm-{time.time_ns()}.stamp")  # noqa: E731
    first = run_raytrainer(stamp_at(), keep_warm=True)  # starts the group that the repeats reuse
    runs = [run_raytrainer(stamp_at(), keep_warm=True) for _ in range(repeats)]
    med = {m: statistics.median(r[m] for r in runs) for m in ("first_step_s", "total_s", "validate_s")}
    print(f"\nwarm ranks (a new Trainer's fit on the rank processes a finished call kept): medians of {repeats}")
    print(f"  first fit (new group): first step {first['first_step_s']:.2f}s, total {first['total_s']:.2f}s")
    print(f"  next fit: call to first step {med['first_step_s']:.3f}s (target <= 0.3), whole call "
          f"{med['total_s']:.3f}s; runs: " + ", ".join(f"{r['first_step_s']:.3f}" for r in runs))
    print(f"  validate of one batch per rank after fit, whole call: {med['validate_s']:.3f}s (target <= 1.0); "
          "runs: " + ", ".join(f"{r['validate_s']:.3f}" for r in runs))
    import raytrainer as rt

    rt.shutdown()
    return {"warm_first_step_s": med["first_step_s"], "warm_validate_s": med["validate_s"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="runs per framework (interleaved) with Ray running")
    p.add_argument("--cold-repeats", type=int, default=2, help="cold runs per framework (0 to skip)")
    p.add_argument("--cold", action="store_true", help="only the cold comparison (fresh processes)")
    p.add_argument("--warm", action="store_true", help="only warm ranks (raytrainer's reuse of a finished call's "
                                                         "rank processes)")
    p.add_argument("--profile", action="store_true", help="print raytrainer's start-up breakdown per run")
    p.add_argument("--cold-one", nargs=2, metavar=("KIND", "WORKDIR"), help=argparse.SUPPRESS)
    p.add_argument("--whole-one", nargs=2, metavar=("KIND", "WORKDIR"), help=argparse.SUPPRESS)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.cold_one:
        cold_one(*args.cold_one)
        return
    if args.whole_one:
        whole_one(*args.whole_one)
        return
    print(f"load average before: {os.getloadavg()}  cores: {os.cpu_count()}")

    import ray

    ratios: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="rt-startup-") as workdir:
        if args.cold_repeats and not args.warm:
            cold_runs: dict[str, list[dict[str, float]]] = {k: [] for k in KINDS}
            for i in range(args.cold_repeats):
                for kind in order(i):
                    cold_runs[kind].append(cold(kind, workdir))
            ratios.update({f"cold_{k}": v for k, v in
                           summarize("cold (fresh process; includes ray.init)", cold_runs).items()})
            print("  ray.init: " + ", ".join(f"{k} {r['ray_init_s']:.2f}s" for k, v in cold_runs.items() for r in v))
            whole_runs: dict[str, list[dict[str, float]]] = {k: [] for k in WHOLE_KINDS}
            for i in range(args.cold_repeats):
                for kind in (WHOLE_KINDS if i % 2 == 0 else WHOLE_KINDS[::-1]):
                    whole_runs[kind].append(whole(kind, workdir))
            ratios.update(summarize_whole(whole_runs))
        if not args.cold:
            init_ray()
        if not args.cold and not args.warm:
            runs: dict[str, list[dict[str, float]]] = {k: [] for k in KINDS}
            for kind in KINDS:  # one untimed warm-up each: driver-side imports, Ray's first worker processes
                measure(kind, workdir)
            for i in range(args.repeats):
                for kind in order(i):
                    runs[kind].append(measure(kind, workdir))
            ratios.update(summarize("Ray already running; fit only, a new group each time", runs))
            if args.profile:
                print("\n  raytrainer start-up breakdown (WorkerGroup.timings, then the rest until rank 0's first "
                      "step):")
                for r in runs["raytrainer"]:
                    start = r.get("group_start_s", float("nan"))
                    print(f"    placement {r.get('group_placement_s', float('nan')):.2f}s, actors+imports "
                          f"{r.get('group_actors_s', float('nan')):.2f}s, rendezvous "
                          f"{r.get('group_rendezvous_s', float('nan')):.2f}s, group start {start:.2f}s; "
                          f"then setup+first step {r['first_step_s'] - start:.2f}s; "
                          f"after first step {r['total_s'] - r['first_step_s']:.2f}s")
        if not args.cold:
            ratios.update(warm_ranks(workdir, args.repeats))
            ray.shutdown()
    print(f"\nload average after: {os.getloadavg()}")
    print("RATIOS " + json.dumps(ratios))


if __name__ == "__main__":
    main()
