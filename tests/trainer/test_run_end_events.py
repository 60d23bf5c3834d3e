"""Issue 20 items 6 and 7: a fit that raises records its end (step, cause) in events.jsonl, and `raytrainer status`
says it failed instead of "running"."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as pl
from raytrainer.cli.common import summarize_run


class FailsAt(pl.LightningModule):
    def __init__(self, step: int) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.step = step

    def training_step(self, batch, batch_idx):
        if self.global_step == self.step:
            raise RuntimeError(f"boom at step {self.step}")
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_fit_that_raises_records_a_failed_finish_at_its_step(tmp_path: Path) -> None:
    trainer = pl.Trainer(max_steps=10, default_root_dir=str(tmp_path), enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    with pytest.raises(RuntimeError, match="boom at step 5"):
        trainer.fit(FailsAt(5), DataLoader(TensorDataset(torch.ones(40, 2)), batch_size=2))
    log = next(tmp_path.rglob("events.jsonl"))
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "finish"]
    finish = events[-1]
    assert finish["step"] == 5 and finish["cause"] == "failed: RuntimeError: boom at step 5"
    summary = summarize_run(str(log.parent))
    assert summary.state == "failed" and "boom at step 5" in summary.state_detail


class Payload:
    """Not something a weights_only load accepts."""


def test_status_and_last_skip_a_checkpoint_whose_pickle_weights_only_refuses(tmp_path: Path) -> None:
    """Issue 20 item 5: a newer last.ckpt without a manifest that pickles an arbitrary object is skipped by
    `raytrainer status` and by ckpt_path="last" alike, for the older valid checkpoint."""
    from raytrainer.callbacks import ModelCheckpoint

    ckpt_dir = tmp_path / "ckpt"
    loader = DataLoader(TensorDataset(torch.ones(8, 2)), batch_size=2)
    quiet = dict(default_root_dir=str(tmp_path), enable_progress_bar=False, enable_model_summary=False)
    trainer = pl.Trainer(max_steps=4, callbacks=[ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True)], **quiet)
    trainer.fit(FailsAt(-1), loader)
    good = str(ckpt_dir / "epoch=0-step=4.ckpt")
    last = ckpt_dir / "last.ckpt"
    ckpt = torch.load(good, weights_only=False)
    ckpt["hyper_parameters"] = {"payload": Payload()}
    torch.save(ckpt, last)  # replaced by another tool: no manifest, newer than the good one
    os.remove(f"{last}.manifest.json")
    os.utime(last, (os.path.getmtime(good) + 5,) * 2)
    summary = summarize_run(str(next(tmp_path.rglob("events.jsonl")).parent))
    assert summary.checkpoint == good
    assert any(path == str(last) and "weights_only" in why for path, why in summary.skipped_checkpoints), \
        summary.skipped_checkpoints
    resumed = pl.Trainer(max_steps=6, callbacks=[ModelCheckpoint(dirpath=str(ckpt_dir))], **quiet)
    resumed.fit(FailsAt(-1), loader, ckpt_path="last")
    assert resumed.ckpt_path == good and resumed.global_step == 6


def test_resuming_removes_temporaries_of_dead_writers_only(tmp_path: Path) -> None:
    """Issue 20 item 3: a crashed run's half-written files in version_0 are removed when a rerun resumes with
    ckpt_path="last" (into version_1), but not a file whose writer is alive."""
    import socket
    import subprocess
    import sys

    from raytrainer.callbacks import ModelCheckpoint

    loader = DataLoader(TensorDataset(torch.ones(8, 2)), batch_size=2)
    quiet = dict(default_root_dir=str(tmp_path), enable_progress_bar=False, enable_model_summary=False)
    pl.Trainer(max_steps=2, callbacks=[ModelCheckpoint(save_last=True)], **quiet).fit(FailsAt(-1), loader)
    ckpt_dir = next(tmp_path.rglob("checkpoints"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    crashed = ckpt_dir / f".epoch=0-step=6.ckpt.tmp-{host}~{int(dead.stdout)}~0123456789ab"
    live = ckpt_dir / f".last.ckpt.tmp-{host}~{os.getpid()}~0123456789ab"
    for f in (crashed, live):
        f.write_bytes(b"x" * 1024)
    pl.Trainer(max_steps=4, callbacks=[ModelCheckpoint(save_last=True)], **quiet).fit(FailsAt(-1), loader,
                                                                                       ckpt_path="last")
    assert not crashed.exists() and live.exists()
