"""FSDP on CPU ranks (gloo): memory, throughput, recovery, snapshot cost and sharded saves, in one command.

Model: a small transformer language model (token embedding, DEPTH encoder layers of width WIDTH with 8 heads and a
4x feed-forward, an output head; about 21 M parameters), Adam, BATCH sequences of SEQ tokens per rank, synthetic
tokens, torch.set_num_threads(1) and OMP_NUM_THREADS=1 per rank. Each encoder layer is its own shard group.

- memory: per-rank bytes of parameters + gradients + optimizer state after the first step, and the rank's peak
  RSS, raytrainer DDP vs raytrainer FSDP, at each world size;
- throughput: raytrainer ``strategy=FSDPStrategy(auto_wrap_policy={TransformerEncoderLayer})`` vs a plain
  PyTorch FSDP2 loop (``fully_shard`` per layer and on the root) started with torchrun
  (``benchmarks/_torchrun_fsdp.py``), tokens per second on rank 0 after the warm-up steps, runs alternating, medians;
- snapshot cost: raytrainer FSDP with its default in-memory snapshots (automatic interval) vs
  ``snapshot_every_n_steps=0``;
- recovery: rank 1 SIGKILLs itself at step KILL_STEP; time from the kill to the next completed step and steps lost
  (default snapshot interval);
- sharded checkpoint: how long the training thread is blocked per save, asynchronous (``async_save``: host copy
  only) vs synchronous ``torch.distributed.checkpoint.save``, as ModelCheckpoint calls them.

    python benchmarks/fsdp.py [--worlds 2,4] [--repeats 3] [--steps 12]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from ddp_throughput import run_torchrun  # noqa: E402 - shared helpers
from recovery import _maybe_kill, _record, analyse, wait_quiet, write_snapshot_stats  # noqa: E402

VOCAB, WIDTH, DEPTH, SEQ, BATCH, WARMUP, KILL_STEP = 2048, 512, 6, 32, 4, 5, 8


class LM(nn.Module):
    """The benchmark transformer (shared with _torchrun_fsdp.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.layers = nn.Sequential(*[nn.TransformerEncoderLayer(WIDTH, 8, 4 * WIDTH, dropout=0.0, batch_first=True)
                                      for _ in range(DEPTH)])
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.emb(tokens)))


def lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def make_dataset(n: int) -> TensorDataset:
    """n token sequences, fixed by a seed (shared with _torchrun_fsdp.py)."""
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randint(0, VOCAB, (n, SEQ + 1), generator=g))


def state_bytes(module: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """This rank's bytes of parameters, gradients and optimizer state (a DTensor counts its local shard)."""
    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    ts = [local(p) for p in module.parameters()] + [local(p.grad) for p in module.parameters() if p.grad is not None]
    ts += [local(v) for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in ts)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------------------------------- raytrainer
def run_raytrainer(out: str, world: int, steps: int, strategy: str = "fsdp", snapshot_every: int | None = None,
                   kill: bool = False, saves: int = 0, **extra: Any) -> dict[str, Any]:
    """One raytrainer fit; returns rank 0's window (seconds, tokens/s), every rank's memory, and save timings."""
    sys.path.insert(0, str(REPO))
    import raytrainer as rt
    from raytrainer.strategies import FSDPStrategy

    total = WARMUP + steps

    class Probe(rt.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.attempt = uuid.uuid4().hex

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
            rank, step = trainer.global_rank, trainer.global_step
            _record(out, rank, step, self.attempt)
            if step == 1:
                with open(os.path.join(out, f"memory.{rank}"), "w") as f:
                    json.dump({"state_bytes": state_bytes(pl_module, trainer.optimizers[0]), "peak_rss": peak_rss()},
                              f)
            if kill:
                _maybe_kill(out, rank, step, KILL_STEP)
            if saves and step > WARMUP and step % 2 == 0 and step <= WARMUP + 4 * saves:
                self._time_save(trainer, asynchronous=(step // 2) % 2 == 0)

        def _time_save(self, trainer: Any, asynchronous: bool) -> None:
            from raytrainer.checkpoint.bridge import save_sharded

            path = os.path.join(out, "ckpt", f"step={trainer.global_step}.ckpt")
            started = time.perf_counter()
            _, pending = save_sharded(trainer.session, [path], asynchronous=asynchronous)
            blocked = time.perf_counter() - started
            for p in pending:
                p.wait()
            with open(os.path.join(out, f"saves.{trainer.global_rank}"), "a") as f:
                f.write(json.dumps({"async": asynchronous, "blocked_s": blocked}) + "\n")

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            write_snapshot_stats(out, trainer)

    class Model(rt.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.lm = LM()

        def setup(self, stage: str) -> None:
            torch.set_num_threads(1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            (tokens,) = batch
            return lm_loss(self.lm, tokens)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-4)

    chosen = FSDPStrategy(auto_wrap_policy={nn.TransformerEncoderLayer}) if strategy == "fsdp" else "ddp"
    trainer = rt.Trainer(strategy=chosen, devices=world, accelerator="cpu", max_steps=total, max_failures=1,
                         callbacks=[Probe()], default_root_dir=out, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, logger=False,
                         snapshot_every_n_steps=snapshot_every, **extra)
    trainer.fit(Model(), DataLoader(make_dataset(total * BATCH * world), batch_size=BATCH))
    rows = [json.loads(line) for line in open(os.path.join(out, "steps.0"))]
    start = next(r for r in rows if r["step"] == WARMUP)
    end = [r for r in rows if r["step"] == total][-1]
    result: dict[str, Any] = {"seconds": end["t"] - start["t"]}
    result["tokens_per_s"] = steps * BATCH * SEQ * world / result["seconds"]
    result["memory"] = [json.load(open(os.path.join(out, f"memory.{r}"))) for r in range(world)]
    if saves:
        result["saves"] = [json.loads(line) for line in open(os.path.join(out, "saves.0"))]
    if os.path.exists(os.path.join(out, "snapshots.json")):
        result["snapshots"] = json.load(open(os.path.join(out, "snapshots.json")))
    return result


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", default="2,4")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=12)
    args = p.parse_args()
    worlds = [int(w) for w in args.worlds.split(",")]
    warnings.filterwarnings("ignore")
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    print(f"model: {sum(p.numel() for p in LM().parameters()) / 1e6:.1f} M parameters; cores: {os.cpu_count()}; "
          f"load average before: {os.getloadavg()}", flush=True)
    import logging

    import ray

    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, max(worlds)), include_dashboard=False,
             logging_level=logging.ERROR, log_to_driver=False)
    summary: dict[str, Any] = {}

    def fresh() -> str:
        wait_quiet(10)
        return tempfile.mkdtemp(prefix="rt-fsdp-")

    for world in worlds:
        runs: dict[str, list[dict[str, Any]]] = {"raytrainer": [], "torchrun": [], "no-snapshots": []}
        for i in range(args.repeats):
            order = ("raytrainer", "torchrun", "no-snapshots") if i % 2 == 0 else ("no-snapshots", "torchrun",
                                                                                     "raytrainer")
            for kind in order:
                if kind == "torchrun":
                    r = run_torchrun(WARMUP, args.steps, script="_torchrun_fsdp.py", world=world)
                else:
                    r = run_raytrainer(fresh(), world, args.steps, snapshot_every=0 if kind == "no-snapshots" else None)
                runs[kind].append(r)
                print(f"  world {world} run {i + 1} {kind:<12} {r['tokens_per_s']:8.0f} tokens/s", flush=True)
        ddp = run_raytrainer(fresh(), world, 2, strategy="ddp", snapshot_every=0)
        med = {k: statistics.median(r["tokens_per_s"] for r in v) for k, v in runs.items()}
        fsdp_mem, ddp_mem = runs["raytrainer"][0]["memory"], ddp["memory"]
        row = {
            "fsdp_state_bytes": max(m["state_bytes"] for m in fsdp_mem),
            "ddp_state_bytes": max(m["state_bytes"] for m in ddp_mem),
            "fsdp_peak_rss": max(m["peak_rss"] for m in fsdp_mem), "ddp_peak_rss": max(m["peak_rss"] for m in ddp_mem),
            "throughput_ratio": med["raytrainer"] / med["torchrun"],
            "snapshot_ratio": med["raytrainer"] / med["no-snapshots"], "tokens_per_s": med,
            "snapshot_every": runs["raytrainer"][0].get("snapshots", {}).get("every"),
        }
        row["state_ratio"] = row["fsdp_state_bytes"] / row["ddp_state_bytes"]
        summary[f"world{world}"] = row

    kill_world = worlds[0]
    rec = []
    for _ in range(args.repeats):
        out = fresh()
        run_raytrainer(out, kill_world, KILL_STEP + 6 - WARMUP, kill=True)
        rec.append(analyse(out))
    saves = run_raytrainer(fresh(), kill_world, 4 * 2 + 2, snapshot_every=0, saves=2)["saves"]
    ray.shutdown()

    print(f"\n{'':<34}" + "".join(f"{'world ' + str(w):>22}" for w in worlds))
    lines = [
        ("per-rank params+grads+Adam, DDP", lambda r: mib(r["ddp_state_bytes"])),
        ("per-rank params+grads+Adam, FSDP", lambda r: mib(r["fsdp_state_bytes"])),
        ("  FSDP / DDP (target <= 1/N + 10%)", lambda r: f"{r['state_ratio']:.3f}"),
        ("peak RSS per rank, DDP", lambda r: mib(r["ddp_peak_rss"])),
        ("peak RSS per rank, FSDP", lambda r: mib(r["fsdp_peak_rss"])),
        ("tokens/s raytrainer FSDP (median)", lambda r: f"{r['tokens_per_s']['raytrainer']:.0f}"),
        ("tokens/s torchrun FSDP2 (median)", lambda r: f"{r['tokens_per_s']['torchrun']:.0f}"),
        ("  raytrainer / torchrun (>= 0.95)", lambda r: f"{r['throughput_ratio']:.3f}"),
        ("tokens/s snapshots off (median)", lambda r: f"{r['tokens_per_s']['no-snapshots']:.0f}"),
        ("  with / without snapshots (>= 0.95)", lambda r: f"{r['snapshot_ratio']:.3f}"),
        ("  automatic snapshot interval", lambda r: f"every {r['snapshot_every']} steps"),
    ]
    for label, fn in lines:
        print(f"{label:<34}" + "".join(f"{fn(summary[f'world{w}']):>22}" for w in worlds))
    rec_s = statistics.median(r["recovery_s"] for r in rec)
    lost = statistics.median(r["steps_lost"] for r in rec)
    print(f"\nrecovery, world {kill_world}, rank 1 killed at step {KILL_STEP} (median of {len(rec)}): "
          f"{rec_s:.2f} s to the next step (target <= 5 s), {lost:.0f} step(s) lost (target <= 1); runs: "
          + ", ".join(f"{r['recovery_s']:.2f} s/{r['steps_lost']:.0f}" for r in rec))
    blocked = {a: [s["blocked_s"] for s in saves if s["async"] == a] for a in (True, False)}
    print(f"sharded save, world {kill_world}, training thread blocked per save: async "
          f"{statistics.median(blocked[True]) * 1000:.0f} ms vs synchronous dcp.save "
          f"{statistics.median(blocked[False]) * 1000:.0f} ms")
    print("RESULT " + json.dumps({"worlds": summary, "recovery": rec, "saves": saves}))


if __name__ == "__main__":
    main()
