"""The examples run as a user runs them: a subprocess on real data, checked through what they print and write."""
from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def test_autoencoder_trains_on_digits_and_writes_logs_and_checkpoint(tmp_path):
    root = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "autoencoder.py"), "--max_epochs", "2", "--default_root_dir",
         str(root), "--ckpt_path", "none", "--no_progress_bar"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout

    # 1400 training images in batches of 64 -> 22 steps per epoch
    assert "world size: 1, epochs: 2, steps: 44" in out
    first, last, test = map(float, re.search(
        r"train loss: first epoch ([\d.]+) -> last epoch ([\d.]+); test loss ([\d.]+)", out).groups())
    assert last < 0.8 * first, f"loss did not fall: {first} -> {last}"
    assert 0 < test < first
    assert "Total params" in out  # the model summary

    log_dir = root / "lightning_logs" / "version_0"
    with open(log_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    epoch_losses = [float(r["train_loss_epoch"]) for r in rows if r.get("train_loss_epoch")]
    val_losses = [float(r["val_loss"]) for r in rows if r.get("val_loss")]
    assert len(epoch_losses) == 2 and epoch_losses[1] < epoch_losses[0]
    assert abs(epoch_losses[0] - first) < 1e-4  # what the script printed is what it logged
    assert len(val_losses) == 2 and val_losses[1] < val_losses[0]
    steps = [int(r["step"]) for r in rows if r.get("train_loss_step")]
    assert steps == list(range(4, 44, 5))  # log_every_n_steps=5
    assert any(r.get("test_loss") for r in rows)

    hparams = yaml.safe_load((log_dir / "hparams.yaml").read_text())
    assert {"hidden": 64, "latent": 3, "lr": 0.001, "batch_size": 64, "seed": 0}.items() <= hparams.items()

    ckpt = re.search(r"checkpoint: (\S+)", out).group(1)
    assert Path(ckpt).is_file() and Path(ckpt).parent == log_dir / "checkpoints"
    assert (log_dir / "checkpoints" / "last.ckpt").is_file()  # the README's export command reads it

    # The README's second laptop command without --ckpt_path none resumes this finished run: one clear line.
    again = subprocess.run(
        [sys.executable, str(REPO / "examples" / "autoencoder.py"), "--max_epochs", "2", "--default_root_dir",
         str(root), "--no_progress_bar"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "nothing left to train" in again.stderr and "max_epochs=2 is already reached" in again.stderr


@pytest.mark.slow
def test_parquet_classifier_on_s3_is_preempted_then_resumes_at_its_position(tmp_path, s3_server):
    """The README's cluster example, on 2 Ray ranks with its data on (local) S3: SIGTERM -> exit 75 -> rerun
    resumes at the preemption's step and finishes the epochs."""
    import json

    root, data = tmp_path / "run", f"{s3_server['uri']}/tabular"
    env = {**os.environ, **s3_server["env"], "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RAY_ADDRESS": "local"}
    cmd = [sys.executable, str(REPO / "examples" / "parquet_classifier.py"), "--data", data, "--rows", "20000",
           "--batch_size", "256", "--max_epochs", "2", "--default_root_dir", str(root)]
    first = subprocess.run(cmd + ["--sigterm_at_step", "30"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 75, first.stdout[-3000:] + first.stderr[-3000:]
    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    # 20000 rows over 2 ranks in batches of 256: 40 batches per rank and epoch
    found = re.search(r"world size: 2, epochs: 2, steps: 80, val_acc: ([\d.]+)", second.stdout)
    assert found and float(found.group(1)) > 0.8, second.stdout[-2000:]
    events = [json.loads(line) for p in root.rglob("events.jsonl") for line in p.read_text().splitlines()]
    preempted = [e["step"] for e in events if e["event"] == "preemption"]
    starts = [e["step"] for e in events if e["event"] == "start"]
    assert preempted and preempted[0] >= 30 and starts[-1] == preempted[0], (preempted, starts)
