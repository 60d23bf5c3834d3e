"""What checkpointing costs training: asynchronous ModelCheckpoint against synchronous torch.save.

Why: issue 4 asks that training be blocked only while state is copied to host memory (target: at
most 10% of a synchronous save) and that throughput with periodic checkpoints stays within 3.5% of
training without them (CheckFreq's reported overhead).

Model: an MLP of `--depth` Linear(`--width`, `--width`) layers (default 6 x 2048: 25.2M float32
parameters, 100.7 MB), trained with plain SGD (`--optimizer sgd`: no optimizer state, so a
checkpoint is ~100 MB; `adam` triples it) on random data, batch `--batch`, through raytrainer's
Trainer on CPU. ModelCheckpoint saves every `--every` steps into a temporary local directory
(save_top_k=1, so every save also rotates the previous file out).

Method, all in one process and one command:
1. Synchronous save: the checkpoint dict of the trained model is written with plain
   `torch.save(ckpt, path)` (a blocking save; what Lightning does by default) and with raytrainer's
   durable `storage.save` (temporary file, fsync, rename, manifest with sha256).
2. Blocked time per checkpoint, inside real training: for async saves, the time ModelCheckpoint
   holds the training thread (building the dict and copying what the next forward could change:
   buffers, RNG states) plus any wait at the next optimizer step for the helper thread that copies
   parameters and optimizer state while that step computes; for `async_save=False`, the whole save.
3. Throughput loss, two ways:
   a. windowed, inside each async run: the `--every` steps after a checkpoint are split into the
      half right after it (staging, then serialising, hashing and writing in the background) and the
      quiet half before the next one. loss = (T_after - T_quiet) / (2 * T_quiet): the extra time one
      checkpoint costs over one checkpoint interval. Adjacent windows see the same machine load, so
      this holds up on a busy machine. The writer must be idle by the quiet half (checked).
   b. end to end: runs without checkpoints and with async ones take turns `--repeats` times (order
      rotating); steps/s from on_train_start until fit returns (the final wait for writes counts);
      loss = 1 - async/none within each repeat. This is the direct number, but it needs an otherwise
      idle machine: load that changes between runs moves it by more than the effect.
   c. CPU budget: the CPU seconds of one checkpoint's background work (copy, serialise, hash, write;
      measured alone) against the training CPU seconds of one checkpoint interval: the loss if every
      background cycle came out of training's cores (no idle core), whatever else loads the machine.
   Process CPU seconds per step (all threads) are shown as well.
Medians are reported, with the spread (min..max).

Run: python benchmarks/checkpoint.py [--repeats 3] [--steps 310] [--every 100] [--batch 32] [--sync]
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import raytrainer as rt  # noqa: E402
from raytrainer.checkpoint.bridge import capture  # noqa: E402
from raytrainer.io import storage  # noqa: E402


class BigMLP(rt.LightningModule):
    """depth x Linear(width, width) with ReLU, regressing random targets."""

    def __init__(self, width: int, depth: int, optimizer: str) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[torch.nn.Module] = []
        for _ in range(depth):
            layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
        self.net = torch.nn.Sequential(*layers[:-1])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=1e-4)
        return torch.optim.SGD(self.parameters(), lr=1e-4)


class TimedCheckpoint(rt.ModelCheckpoint):
    """ModelCheckpoint that records how long each save holds the training thread."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.blocked: list[float] = []  # one entry per checkpoint: in-loop save + fence waits that followed

    def _write(self, trainer: Any, paths: list[str]) -> None:
        start = time.perf_counter()
        super()._write(trainer, paths)
        self.blocked.append(time.perf_counter() - start)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self._snapshot is None:
            return
        start = time.perf_counter()
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self.blocked[-1] += time.perf_counter() - start


def cpu_seconds() -> float:
    """CPU time this process has used (all threads), user + system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class StepClock(rt.Callback):
    """Wall time at the start of training and at every step end (before ModelCheckpoint's hook runs).

    Also notes, at each step end, whether the checkpoint writer still has work in flight.
    """

    def __init__(self, ckpt_cb: TimedCheckpoint | None) -> None:
        self.ckpt_cb = ckpt_cb
        self.start = self.cpu_start = 0.0
        self.ends: list[float] = []
        self.busy: list[bool] = []

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.start = time.perf_counter()
        self.cpu_start = cpu_seconds()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.ends.append(time.perf_counter())
        cb = self.ckpt_cb
        self.busy.append(cb is not None and ((cb._writer is not None and cb._writer.pending > 0)
                                             or (cb._snapshot is not None and cb._snapshot._thread.is_alive())))


def windowed_losses(clock: StepClock, every: int, steps: int) -> tuple[list[float], int]:
    """Per checkpoint: (T_after - T_quiet) / (2 T_quiet), and how many quiet windows still had a write running."""
    times = [clock.start] + clock.ends  # times[s] = end of step s
    half = every // 2
    losses, spilled = [], 0
    for s in range(every, steps - every + 1, every):
        after = times[s + half] - times[s]
        quiet = times[s + every] - times[s + half]
        losses.append(100 * (after - quiet) / (2 * quiet))
        spilled += any(clock.busy[s + half - 1:s + every - 1])  # busy[i]: at the end of step i + 1
    return losses, spilled


def run(mode: str, args: argparse.Namespace, data: DataLoader, workdir: Path) -> dict[str, Any]:
    """One training run; mode is 'none', 'async' or 'sync'."""
    torch.manual_seed(0)
    model = BigMLP(args.width, args.depth, args.optimizer)
    ckpt_cb = None
    if mode != "none":
        ckpt_dir = workdir / f"ckpt-{mode}"
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        ckpt_cb = TimedCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=args.every, save_last=False,
                                  async_save=mode == "async")
    clock = StepClock(ckpt_cb)
    trainer = rt.Trainer(max_steps=args.steps, max_epochs=-1, logger=False,
                         callbacks=[clock] + ([ckpt_cb] if ckpt_cb else []), enable_checkpointing=ckpt_cb is not None,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, data)
    elapsed = time.perf_counter() - clock.start
    cpu = cpu_seconds() - clock.cpu_start
    assert trainer.global_step == args.steps
    out: dict[str, Any] = {"steps_per_s": args.steps / elapsed, "cpu_per_step": cpu / args.steps, "blocked": [],
                           "trainer": trainer}
    if ckpt_cb is not None:
        expected = args.steps // args.every
        assert len(ckpt_cb.blocked) == expected, (len(ckpt_cb.blocked), expected)
        assert storage.load(ckpt_cb.best_model_path)["global_step"] == expected * args.every
        out["blocked"] = list(ckpt_cb.blocked)
        out["windowed"], out["spilled"] = windowed_losses(clock, args.every, args.steps)
    return out


def background_cpu(trainer: Any, workdir: Path, repeats: int) -> list[float]:
    """CPU seconds the background part of one async checkpoint costs (host copy, serialise, hash, write).

    Measured alone, with the training thread idle in ``wait_for_writes``, so the process CPU time that
    passes is the helper and writer threads' work.
    """
    costs = []
    cb = rt.ModelCheckpoint(dirpath=str(workdir / "bg"), save_top_k=-1)
    cb.setup(trainer, trainer.lightning_module, "fit")
    for i in range(repeats):
        cb._write(trainer, [str(workdir / "bg" / f"warm{i}.ckpt")])  # allocates the reusable host buffers
        cb.wait_for_writes()
        start = cpu_seconds()
        cb._write(trainer, [str(workdir / "bg" / f"x{i}.ckpt")])
        cb.wait_for_writes()
        costs.append(cpu_seconds() - start)
    cb.teardown(trainer, trainer.lightning_module, "fit")
    shutil.rmtree(workdir / "bg", ignore_errors=True)
    return costs


def sync_save_times(trainer: Any, workdir: Path, repeats: int) -> tuple[list[float], list[float], int]:
    """Seconds per plain torch.save and per durable storage.save of the run's checkpoint dict, and its size."""
    ckpt = capture(trainer.session)
    plain, durable = [], []
    path = workdir / "sync.ckpt"
    for _ in range(repeats):
        start = time.perf_counter()
        torch.save(ckpt, path)
        plain.append(time.perf_counter() - start)
        os.remove(path)
        start = time.perf_counter()
        storage.save(ckpt, str(path))
        durable.append(time.perf_counter() - start)
        storage.remove(str(path))
    torch.save(ckpt, path)
    size = path.stat().st_size
    os.remove(path)
    return plain, durable, size


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    """'median (min..max)' of values."""
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}..{fmt.format(max(values))})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=310)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    parser.add_argument("--sync", action="store_true", help="also time in-loop synchronous saves (async_save=False)")
    parser.add_argument("--dir", default=None, help="where checkpoints go (default: a temporary directory)")
    args = parser.parse_args()
    if args.every < 2 or args.every % 2:
        parser.error("--every must be an even number >= 2 (it is split into two windows)")
    if args.steps % args.every == 0 or args.steps < 2 * args.every:
        parser.error("--steps must be at least 2 * --every and not a multiple of it (see Method in the docstring)")
    modes = ["none", "async"] + (["sync"] if args.sync else [])

    workdir = Path(args.dir or tempfile.mkdtemp(prefix="rt-ckpt-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch * 16, args.width, generator=g)
    data = DataLoader(TensorDataset(x, torch.randn(x.shape, generator=g)), batch_size=args.batch, shuffle=True)
    n_params = sum(p.numel() for p in BigMLP(args.width, args.depth, args.optimizer).parameters())
    print(f"raytrainer checkpoint benchmark | {platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print(f"model: {n_params / 1e6:.1f}M params ({n_params * 4 / 1e6:.1f} MB), optimizer {args.optimizer}, "
          f"batch {args.batch}; {args.steps} steps per run, a checkpoint every {args.every} steps; "
          f"{args.repeats} repeats; checkpoints in {workdir}")

    results: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    run("none", argparse.Namespace(**{**vars(args), "steps": 3}), data, workdir)  # warm-up
    for r in range(args.repeats):
        for mode in modes[r % len(modes):] + modes[:r % len(modes)]:  # rotate: no mode always goes first
            out = run(mode, args, data, workdir)
            results[mode].append(out)
            line = f"  repeat {r + 1} {mode:5s}: {out['steps_per_s']:.3f} steps/s, {out['cpu_per_step']:.3f} CPU s/step"
            if out["blocked"]:
                line += f", blocked per save {[round(b * 1000) for b in out['blocked']]} ms"
            if mode == "async":
                line += f", windowed loss per save {[round(w, 1) for w in out['windowed']]}%"
            print(line, flush=True)

    plain, durable, size = sync_save_times(results["none"][-1]["trainer"], workdir, args.repeats)
    bg = background_cpu(results["async"][-1]["trainer"], workdir, args.repeats)
    print(f"\ncheckpoint file: {size / 1e6:.1f} MB, every {args.every} steps "
          f"(~{args.every / statistics.median(o['steps_per_s'] for o in results['none']):.0f} s of training here)")
    print("synchronous save, training blocked for the whole write (ms):")
    print(f"  torch.save(ckpt, path)                {spread([p * 1000 for p in plain])}")
    print(f"  storage.save (atomic, fsync, sha256)  {spread([d * 1000 for d in durable])}")
    ref = statistics.median(plain) * 1000  # ms
    print("blocked per checkpoint inside training (ms; all saves of all repeats):")
    for mode in ("async", "sync"):
        if mode in results:
            blocked = [b * 1000 for out in results[mode] for b in out["blocked"]]
            print(f"  ModelCheckpoint {mode:5s}               {spread(blocked)}  = "
                  f"{statistics.median(blocked) / ref:.1%} of torch.save (target <= 10%)")
    windowed = [w for out in results["async"] for w in out["windowed"]]
    spilled = sum(out["spilled"] for out in results["async"])
    print("throughput loss with async checkpoints (target <= 3.5%):")
    print(f"  a. windowed, per checkpoint ({len(windowed)} checkpoints)    {spread(windowed)} %"
          + (f"  [{spilled} quiet window(s) still had a write running: underestimated]" if spilled else ""))
    for mode in modes[1:]:
        losses = [100 * (1 - o["steps_per_s"] / n["steps_per_s"]) for o, n in zip(results[mode], results["none"])]
        print(f"  b. end to end, {mode:5s} vs none, per repeat  {spread(losses)} %  "
              f"(steps/s: none {spread([o['steps_per_s'] for o in results['none']], '{:.3f}')}, "
              f"{mode} {spread([o['steps_per_s'] for o in results[mode]], '{:.3f}')})")
    cpu_step = statistics.median(o["cpu_per_step"] for o in results["none"])
    print(f"  c. CPU budget: background work per checkpoint {spread(bg, '{:.3f}')} CPU s, against "
          f"{cpu_step * args.every:.2f} CPU s of training per interval ({cpu_step:.3f} per step x {args.every}): "
          f"{statistics.median(bg) / (cpu_step * args.every):.1%} if it all came out of training's cores")
    print("process CPU seconds per step (all threads):")
    for mode in modes:
        cpu = [o["cpu_per_step"] for o in results[mode]]
        print(f"  {mode:5s}  {spread(cpu, '{:.3f}')}")
    if args.dir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
