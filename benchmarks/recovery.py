"""Recovery after a killed rank: raytrainer vs Ray Train's TorchTrainer, in one command.

For each framework a 2-rank CPU job trains an MLP; rank 1 SIGKILLs itself at step KILL_STEP of the
first attempt. Measured from the files every rank appends (step, wall time) to:
- recovery time: from the kill to the next completed training step;
- steps lost: the step reached at the kill minus the step training resumed from.
Ray Train restarts the whole group from its last reported checkpoint (reported every
REPORT_EVERY steps, FailureConfig(max_failures=1)); raytrainer resumes from its newest in-memory
snapshot. Also measured: raytrainer's steady-state throughput with snapshots (default, automatic
interval) against snapshot_every_n_steps=0 (no snapshots).

    python benchmarks/recovery.py [--repeats 3] [--no-throughput | --only-throughput]

For raytrainer it also prints where the recovery time goes, stage by stage: the driver marks its phases
(controller.marks: death noticed, survivors settled, rank replaced, old group left, new group formed, ranks
called) and rank 0 records when training starts again (after the snapshot is restored) and its first step.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KILL_STEP, STEPS, BATCH, REPORT_EVERY, HIDDEN = 60, 160, 64, 20, 512
TPUT_STEPS, TPUT_SKIP = 600, 100  # throughput runs: long enough that start-up (and a spare's imports) is skipped


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(TPUT_STEPS * BATCH, 64, generator=g)
    return TensorDataset(x, x[:, :1] * 3)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))


def _record(out: str, rank: int, step: int, attempt: str) -> None:
    with open(os.path.join(out, f"steps.{rank}"), "a") as f:
        f.write(json.dumps({"step": step, "t": time.time(), "attempt": attempt}) + "\n")


def _maybe_kill(out: str, rank: int, step: int, kill_step: int = KILL_STEP) -> None:
    marker = os.path.join(out, "killed")
    if rank == 1 and step == kill_step and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(json.dumps({"t": time.time(), "step": step}))
        os.kill(os.getpid(), signal.SIGKILL)


def write_snapshot_stats(out: str, trainer) -> None:
    """(rank 0, at the end of training) The snapshotter's interval, cost and step time, to ``out/snapshots.json``."""
    snap = trainer.session.snapshotter
    if trainer.global_rank == 0 and snap is not None and snap.enabled:
        with open(os.path.join(out, "snapshots.json"), "w") as f:
            json.dump({"every": snap.every, "cost_s": snap.cost_s, "step_s": snap._step_time}, f)


def analyse(out: str) -> dict[str, float]:
    kill = json.load(open(os.path.join(out, "killed")))
    rows = [json.loads(line) for line in open(os.path.join(out, "steps.0"))]
    # Rank 0 may keep its process across the recovery: the attempt id (new for each run of the training
    # function) tells the resumed run's steps from steps the first run finished just after the kill.
    after = [r for r in rows if r["t"] > kill["t"] and r["attempt"] != rows[0]["attempt"]]
    first_after = min(after, key=lambda r: r["t"])
    resumed_from = first_after["step"] - 1
    result = {"recovery_s": first_after["t"] - kill["t"], "steps_lost": kill["step"] - resumed_from}
    if os.path.exists(os.path.join(out, "marks.json")):  # raytrainer: where the time went
        result["breakdown"] = breakdown(out, kill["t"], first_after["t"])
    return result


# The steps of a recovery in place, as the driver marks them (controller.marks) and rank 0 records them.
STAGES = (("recovering", "death noticed by the driver"), ("settled", "survivors settled"),
          ("starting", "(no repair in place) new group started"),
          ("replaced", "spare activated / rank replaced"), ("left the old group", "old process group left"),
          ("rendezvous", "new process group formed"), ("running", "ranks called"),
          ("train start", "snapshot handed out and restored"), ("first step", "first step done"))


def breakdown(out: str, kill_t: float, first_step_t: float) -> dict[str, float]:
    """Seconds each stage of the recovery took, from the kill to the next completed step."""
    marks = [(what, t) for what, t in json.load(open(os.path.join(out, "marks.json"))) if t > kill_t]
    starts = [json.loads(line)["t"] for line in open(os.path.join(out, "train_start.0"))]
    times = {}
    for what, t in marks:
        times.setdefault(what, t)  # the first of each after the kill
    times["train start"] = min((t for t in starts if t > kill_t), default=float("nan"))
    times["first step"] = first_step_t
    stages, last = {}, kill_t
    for key, label in STAGES:
        if key in times:
            stages[label] = times[key] - last
            last = times[key]
    return stages


def wait_quiet(timeout_s: float = 30.0) -> None:
    """Wait (bounded) until no actor of an earlier run is alive, then a moment for its processes to exit:
    Ray Train's controller and workers wind down after fit() returns, and would slow the next run."""
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(
            a.get("State") == "ALIVE" for a in ray._private.state.actors().values()):
        time.sleep(0.2)
    time.sleep(2.0)


def throughput(out: str, skip: int = TPUT_SKIP) -> float:
    rows = [json.loads(line) for line in open(os.path.join(out, "steps.0"))][skip:]
    return (rows[-1]["step"] - rows[0]["step"]) / (rows[-1]["t"] - rows[0]["t"])


# ------------------------------------------------------------------------------------------- raytrainer
def run_raytrainer(out: str, kill: bool, snapshot_every: int | None = None, steps: int = STEPS) -> None:
    import raytrainer as rt

    class Recorder(rt.Callback):
        def on_train_start(self, trainer, pl_module):  # after the restore: the snapshot was handed out and loaded
            self.attempt = uuid.uuid4().hex
            if trainer.global_rank == 0:
                with open(os.path.join(out, "train_start.0"), "a") as f:
                    f.write(json.dumps({"t": time.time()}) + "\n")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            _record(out, trainer.global_rank, trainer.global_step, self.attempt)
            if kill:
                _maybe_kill(out, trainer.global_rank, trainer.global_step)

        def on_train_end(self, trainer, pl_module):
            write_snapshot_stats(out, trainer)

    class Model(rt.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()

        def training_step(self, batch, batch_idx):
            torch.set_num_threads(1)
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    trainer = rt.Trainer(num_processes=2, max_steps=steps, max_failures=1, callbacks=[Recorder()],
                         default_root_dir=out, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, logger=False, snapshot_every_n_steps=snapshot_every)
    trainer.fit(Model(), DataLoader(data(), batch_size=BATCH, shuffle=True))
    with open(os.path.join(out, "marks.json"), "w") as f:  # the driver's phase marks (controller.marks)
        json.dump(trainer.last_run.marks, f)


# ------------------------------------------------------------------------------------------- Ray Train
def run_ray_train(out: str) -> None:
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint, FailureConfig, RunConfig, ScalingConfig

    def loop(config: dict) -> None:
        torch.set_num_threads(1)
        rank = ray.train.get_context().get_world_rank()
        attempt = uuid.uuid4().hex
        model = ray.train.torch.prepare_model(mlp())
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        start = 0
        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                state = torch.load(os.path.join(d, "state.pt"))
            model.module.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            start = state["step"]
        loader = ray.train.torch.prepare_data_loader(DataLoader(data(), batch_size=BATCH, shuffle=True))
        step = start
        while step < STEPS:
            for x, y in loader:
                loss = nn.functional.mse_loss(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                _record(config["out"], rank, step, attempt)
                if step % REPORT_EVERY == 0:
                    with tempfile.TemporaryDirectory() as d:
                        if rank == 0:
                            torch.save({"model": model.module.state_dict(), "opt": opt.state_dict(), "step": step},
                                       os.path.join(d, "state.pt"))
                        ray.train.report({"step": step}, checkpoint=Checkpoint.from_directory(d) if rank == 0 else None)
                _maybe_kill(config["out"], rank, step)
                if step >= STEPS:
                    break

    trainer = ray.train.torch.TorchTrainer(
        loop, train_loop_config={"out": out}, scaling_config=ScalingConfig(num_workers=2),
        run_config=RunConfig(storage_path=os.path.join(out, "ray_results"), name="recovery",
                             failure_config=FailureConfig(max_failures=1)))
    trainer.fit()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only-throughput", action="store_true", help="skip the recovery runs")
    p.add_argument("--no-throughput", action="store_true", help="skip the throughput runs")
    args = p.parse_args()
    import logging
    import warnings

    import ray

    warnings.filterwarnings("ignore")
    logging.getLogger("ray").setLevel(logging.ERROR)
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="error")
    results: dict[str, list[dict[str, float]]] = {"raytrainer": [], "ray_train": []}
    tput: dict[str, list[float]] = {"snapshots on": [], "snapshots off": []}
    root = tempfile.mkdtemp(prefix="recovery-")
    try:
        for i in range(args.repeats):
            for name, fn in () if args.only_throughput else (
                    ("raytrainer", lambda o: run_raytrainer(o, kill=True)), ("ray_train", run_ray_train)):
                out = os.path.join(root, f"{name}-{i}")
                os.makedirs(out)
                fn(out)
                r = analyse(out)
                results[name].append(r)
                print(f"run {i + 1} {name:<10} recovery {r['recovery_s']:.2f} s, steps lost {r['steps_lost']}",
                      flush=True)
            pairs = (("snapshots on", None), ("snapshots off", 0))
            pairs = () if args.no_throughput else pairs if i % 2 == 0 else pairs[::-1]  # alternate against drift
            for label, every in pairs:
                out = os.path.join(root, f"tput-{label.replace(' ', '')}-{i}")
                os.makedirs(out)
                wait_quiet()
                run_raytrainer(out, kill=False, snapshot_every=every, steps=TPUT_STEPS)
                tput[label].append(throughput(out))
                extra = ""
                if os.path.exists(os.path.join(out, "snapshots.json")):
                    snap = json.load(open(os.path.join(out, "snapshots.json")))
                    extra = (f" (automatic interval {snap['every']} step(s); "
                             f"a snapshot costs {snap['cost_s'] * 1e3:.2f} ms"
                             f" = {snap['cost_s'] / snap['step_s']:.1%} of a {snap['step_s'] * 1e3:.1f} ms step)")
                print(f"run {i + 1} throughput {label}: {tput[label][-1]:.1f} steps/s{extra}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        ray.shutdown()
    line = ""
    if not args.no_throughput:
        on, off = statistics.median(tput["snapshots on"]), statistics.median(tput["snapshots off"])
        paired = statistics.median(a / b for a, b in zip(tput["snapshots on"], tput["snapshots off"]))
        line = (f"\nsteady-state throughput: snapshots on {on:.1f} steps/s, off {off:.1f} steps/s; median of the "
                f"per-repeat ratios on/off {paired:.3f}")
    if args.only_throughput:
        print(line)
        return
    rt_rec = statistics.median(r["recovery_s"] for r in results["raytrainer"])
    rt_lost = statistics.median(r["steps_lost"] for r in results["raytrainer"])
    ray_rec = statistics.median(r["recovery_s"] for r in results["ray_train"])
    ray_lost = statistics.median(r["steps_lost"] for r in results["ray_train"])
    print(f"\n2 ranks, CPU, kill at step {KILL_STEP}; Ray Train reports a checkpoint every {REPORT_EVERY} steps; "
          f"medians of {args.repeats}; load average {os.getloadavg()[0]:.1f}")
    print("| | recovery (s) | optimizer steps lost |")
    print("|---|---|---|")
    print(f"| raytrainer | {rt_rec:.2f} | {rt_lost:g} |")
    print(f"| Ray Train TorchTrainer | {ray_rec:.2f} | {ray_lost:g} |")
    print(f"| ratio raytrainer / Ray Train | {rt_rec / ray_rec:.3f} | |")
    stages = [r["breakdown"] for r in results["raytrainer"] if "breakdown" in r]
    if stages:
        print("\nraytrainer's recovery, stage by stage (median seconds from the previous stage's end):")
        for _, label in STAGES:
            vals = [b[label] for b in stages if label in b]
            if vals:
                print(f"  {label:<34} {statistics.median(vals):.3f}   runs: " + ", ".join(f"{v:.3f}" for v in vals))
    print(line)


if __name__ == "__main__":
    main()
