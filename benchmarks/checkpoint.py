"""What checkpointing costs training: asynchronous ModelCheckpoint against synchronous torch.save.

Why: issue 4 asks that training be blocked only while state is copied to host memory (target: at
most 10% of a synchronous save) and that end-to-end throughput with periodic checkpoints stays
within 3.5% of training without them (CheckFreq's reported overhead).

Model: an MLP of `--depth` Linear(`--width`, `--width`) layers (default 6 x 2048: 25.2M float32
parameters, 100.7 MB), trained with plain SGD (`--optimizer sgd`, no optimizer state, so a
checkpoint is ~100 MB; `adam` triples it) on random data, batch `--batch`, through raytrainer's
Trainer on CPU. ModelCheckpoint saves every `--every` steps into a temporary local directory
(save_top_k=1, so a save also rotates the previous file out).

Method, all in one process and one command:
1. Synchronous save time: the checkpoint dict of the trained model is written with plain
   `torch.save(ckpt, path)` (what a blocking save costs; Lightning's default), and with raytrainer's
   durable `storage.save` (atomic rename + manifest + fsync), `--repeats` times each.
2. Blocked time per checkpoint, measured inside real training runs: for async saves the time
   ModelCheckpoint spends on the training thread (building the dict, copying what the next forward
   could change: buffers, RNG states; parameters and optimizer state are copied by a helper thread
   while the next step computes) plus any wait at the next optimizer step for that copy to finish;
   for `async_save=False` the whole in-loop save.
3. Throughput: `--steps` steps without checkpointing, with async checkpoints and with synchronous
   ones, taking turns `--repeats` times (the order rotates every repeat). Time runs from
   on_train_start until fit returns, so the final wait for outstanding writes counts; `--steps` is
   not a multiple of `--every`, so no run ends right after a save and the tail lets the last
   background write finish, as in a long run. The loss is 1 - mode/none within each repeat (pairs
   cancel slow drifts in machine load), then the median over repeats. Process CPU time per step
   (all threads) is shown too: the work checkpointing adds, which other load on the machine does not
   change much.
Medians are reported, with the spread (min..max) over repeats.

Run: python benchmarks/checkpoint.py [--repeats 5] [--steps 50] [--every 20] [--batch 32]
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
from raytrainer.checkpoint import storage  # noqa: E402
from raytrainer.checkpoint.format import dump_checkpoint  # noqa: E402


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
        self.blocked: list[float] = []  # one entry per checkpoint: in-loop save + fence wait that followed

    def _write(self, trainer: Any, path: str) -> None:
        start = time.perf_counter()
        super()._write(trainer, path)
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


class Clock(rt.Callback):
    """Marks when training starts (after setup, before the first batch): wall clock and process CPU time."""

    start = 0.0
    cpu_start = 0.0

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.start = time.perf_counter()
        self.cpu_start = cpu_seconds()


def run(mode: str, args: argparse.Namespace, data: DataLoader, workdir: Path) -> dict[str, Any]:
    """One training run; mode is 'none', 'async' or 'sync'. Returns steps/s and per-save blocked times."""
    torch.manual_seed(0)
    model = BigMLP(args.width, args.depth, args.optimizer)
    clock = Clock()
    callbacks: list[rt.Callback] = [clock]
    ckpt_cb = None
    if mode != "none":
        ckpt_dir = workdir / f"ckpt-{mode}"
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        ckpt_cb = TimedCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=args.every, save_last=False,
                                  async_save=mode == "async")
        callbacks.append(ckpt_cb)
    trainer = rt.Trainer(max_steps=args.steps, max_epochs=-1, logger=False, callbacks=callbacks,
                         enable_checkpointing=mode != "none", enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, data)
    elapsed = time.perf_counter() - clock.start
    cpu = cpu_seconds() - clock.cpu_start
    assert trainer.global_step == args.steps
    out = {"steps_per_s": args.steps / elapsed, "cpu_per_step": cpu / args.steps, "blocked": list(ckpt_cb.blocked) if ckpt_cb else [],
           "trainer": trainer, "model": model}
    if ckpt_cb is not None:
        expected = args.steps // args.every
        assert len(ckpt_cb.blocked) == expected, (len(ckpt_cb.blocked), expected)
        assert storage.load(ckpt_cb.best_model_path)["global_step"] == expected * args.every
    return out


def sync_save_times(trainer: Any, workdir: Path, repeats: int) -> tuple[list[float], list[float], int]:
    """Seconds per plain torch.save and per durable storage.save of the run's checkpoint dict, and its size."""
    ckpt = dump_checkpoint(trainer)
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


def fmt(values: list[float], scale: float = 1.0, unit: str = "") -> str:
    """median (min..max) of values."""
    v = [x * scale for x in values]
    return f"{statistics.median(v):8.1f}{unit} ({min(v):.1f}..{max(v):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    parser.add_argument("--modes", default="none,async,sync", help="comma-separated subset of none,async,sync")
    parser.add_argument("--dir", default=None, help="where checkpoints go (default: a temporary directory)")
    args = parser.parse_args()
    if args.steps % args.every == 0:
        parser.error("--steps must not be a multiple of --every (see Method in the module docstring)")
    modes = args.modes.split(",")

    workdir = Path(args.dir or tempfile.mkdtemp(prefix="rt-ckpt-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch * 16, args.width, generator=g)
    data = DataLoader(TensorDataset(x, torch.randn(x.shape, generator=g)), batch_size=args.batch, shuffle=True)
    n_params = sum(p.numel() for p in BigMLP(args.width, args.depth, args.optimizer).parameters())
    print(f"raytrainer checkpoint benchmark | {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"model: {n_params / 1e6:.1f}M params ({n_params * 4 / 1e6:.1f} MB), optimizer {args.optimizer}, "
          f"batch {args.batch}; {args.steps} steps per run, a checkpoint every {args.every} steps; "
          f"{args.repeats} repeats; checkpoints in {workdir}")

    results: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    run("none", argparse.Namespace(**{**vars(args), "steps": 3, "every": 2}), data, workdir)  # warm-up
    for r in range(args.repeats):
        for mode in modes[r % len(modes):] + modes[:r % len(modes)]:  # rotate the order: no mode always goes first
            out = run(mode, args, data, workdir)
            results[mode].append(out)
            print(f"  repeat {r + 1} {mode:5s}: {out['steps_per_s']:.3f} steps/s, {out['cpu_per_step']:.3f} CPU s/step"
                  + (f", blocked per save {[round(b * 1000) for b in out['blocked']]} ms" if out["blocked"] else ""),
                  flush=True)

    last = next(iter(results.values()))[-1]
    plain, durable, size = sync_save_times(last["trainer"], workdir, args.repeats)
    print(f"\ncheckpoint file: {size / 1e6:.1f} MB")
    print("synchronous save, training blocked for the whole write:")
    print(f"  torch.save(ckpt, path)            {fmt(plain, 1000, ' ms')}")
    print(f"  storage.save (atomic, fsync)      {fmt(durable, 1000, ' ms')}")
    ref = statistics.median(plain)
    print("blocked per checkpoint inside training (median over all saves of all repeats):")
    for mode in ("async", "sync"):
        if mode in results:
            blocked = [b for out in results[mode] for b in out["blocked"]]
            print(f"  ModelCheckpoint {mode:5s}           {fmt(blocked, 1000, ' ms')}  = "
                  f"{100 * statistics.median(blocked) / ref:.1f}% of torch.save")
    if "none" in results:
        print("throughput, steps/s from on_train_start until fit returns; loss = median over repeats of "
              "1 - mode/none within the same repeat (pairs cancel slow drifts in machine load):")
        for mode in modes:
            tput = [o["steps_per_s"] for o in results[mode]]
            line = f"  {mode:5s}  {statistics.median(tput):7.3f} ({min(tput):.3f}..{max(tput):.3f})"
            if mode != "none":
                losses = [100 * (1 - o["steps_per_s"] / n["steps_per_s"]) for o, n in zip(results[mode], results["none"])]
                line += f"  loss {statistics.median(losses):5.1f}% (per repeat: {', '.join(f'{x:.1f}' for x in losses)})"
            print(line)
        print("process CPU seconds per step, all threads (what checkpointing adds in work, whatever else runs):")
        for mode in modes:
            cpu = [o["cpu_per_step"] for o in results[mode]]
            line = f"  {mode:5s}  {statistics.median(cpu):7.3f} ({min(cpu):.3f}..{max(cpu):.3f})"
            if mode != "none":
                extra = [100 * (o["cpu_per_step"] / n["cpu_per_step"] - 1) for o, n in zip(results[mode], results["none"])]
                line += f"  extra {statistics.median(extra):5.1f}%"
            print(line)
    if args.dir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
