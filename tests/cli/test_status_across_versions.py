"""Issue 19 item 2: a run resumed with ckpt_path="last" into a new log version is one run for `raytrainer status` and
`raytrainer report`: one timeline across the versions, the preemption where it happened, continuous steps, and the
checkpoint that "last" really picks (which may lie in an earlier version).

Real in-process fits write the versions (SIGTERM to this process preempts the first); the commands run as the
console script, as users run them.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from signal_at import SignalAt
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as rt
from raytrainer import cli
from raytrainer.core.control import Preempted

SCRIPT = Path(sys.executable).with_name("raytrainer")
STEPS_PER_EPOCH = 8
PREEMPTION_RGB = tuple(int(cli._EVENT_STYLE["preemption"][1][i:i + 2], 16) for i in (1, 3, 5))


class Regression(rt.LightningModule):
    """A linear fit that logs its loss every step."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.layer(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def raytrainer(*args: str) -> subprocess.CompletedProcess:
    """`raytrainer ARGS` as the console script, in a subprocess."""
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=120, env=dict(os.environ))


def _fit(root: Path, max_epochs: int, ckpt_path: str | None = "last", callbacks: tuple = ()) -> rt.Trainer:
    """One fit of the example shape: a CSV logger under root, last.ckpt kept, resumed with ckpt_path="last"."""
    rt.seed_everything(0)
    x = torch.randn(STEPS_PER_EPOCH * 4, 4)
    loader = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)
    trainer = rt.Trainer(max_epochs=max_epochs, default_root_dir=str(root), logger=rt.loggers.CSVLogger(str(root)),
                         callbacks=[rt.ModelCheckpoint(save_last=True), *callbacks], log_every_n_steps=1,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Regression(), loader, ckpt_path=ckpt_path)
    return trainer


def _status(root: Path) -> dict:
    result = raytrainer("status", str(root), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _versions(root: Path) -> Path:
    return root / "lightning_logs"


def _train_steps(summary: cli.RunSummary) -> list[int]:
    return [int(row["step"]) for row in summary.metrics if "train_loss_step" in row]


@pytest.mark.slow
def test_a_run_preempted_in_one_version_and_finished_in_the_next_is_one_run(tmp_path: Path) -> None:
    root = tmp_path / "run"
    with pytest.raises(Preempted):
        _fit(root, max_epochs=3, callbacks=(SignalAt(11, str(tmp_path / "marker"), rank=0, sig=signal.SIGTERM),))
    v0, v1 = _versions(root) / "version_0", _versions(root) / "version_1"
    preempted_at = torch.load(v0 / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 11 <= preempted_at < 3 * STEPS_PER_EPOCH
    _fit(root, max_epochs=3)
    final = 3 * STEPS_PER_EPOCH

    s = _status(root)  # the default_root_dir: its newest version, followed back to where the run began
    assert s["run_dir"] == str(v1)
    assert s["state"] == "finished" and (s["step"], s["epoch"]) == (final, 3)
    assert [(Path(v["run_dir"]).name, v["first_step"], v["last_step"], v["state"]) for v in s["versions"]] == \
        [("version_0", 0, preempted_at, "preempted"), ("version_1", preempted_at, final, "finished")]
    assert s["versions"][1]["resumed_from"] == str(v0 / "checkpoints" / "last.ckpt")
    kinds = [e["event"] for e in s["events"] if e["event"] != "checkpoint"]
    assert kinds == ["start", "preemption", "start", "finish"]  # one timeline, in order
    assert [p["step"] for p in s["preemptions"]] == [preempted_at]
    assert s["checkpoint"] == str(v1 / "checkpoints" / "last.ckpt") and s["checkpoint_step"] == final

    text = raytrainer("status", str(root)).stdout
    assert "state       finished" in text
    assert "versions    2 log versions of one run" in text
    assert f"  - version_0: step 0 -> {preempted_at}, preempted" in text
    assert f"  - version_1: step {preempted_at} -> {final}, finished; resumed from version_0/checkpoints/last.ckpt" \
        in text
    assert "preemptions 1" in text and f"step {preempted_at}: SIGTERM" in text

    # report: the steps run on from version_0 into version_1 (nothing trained twice, nothing missing), and the
    # preemption is drawn on the loss curves at its step
    summary = cli.summarize_run(str(root))
    steps = _train_steps(summary)
    assert steps == list(range(final)), steps
    png = tmp_path / "report.png"
    result = raytrainer("report", str(root), "--output", str(png))
    assert result.returncode == 0, result.stderr
    assert "2 log versions of one run" in result.stdout
    import matplotlib.image

    pixels = (matplotlib.image.imread(str(png))[..., :3] * 255).round().astype(int)
    loss_panel = pixels[: int(pixels.shape[0] * 0.55)]
    is_preemption = (abs(loss_panel - PREEMPTION_RGB).sum(axis=-1) < 60)  # anti-aliased edges blend a little
    assert is_preemption.sum(axis=0).max() > 50, "no dashed preemption line across the loss panel"


@pytest.mark.slow
def test_a_finished_run_resumed_to_train_more_keeps_its_checkpoint_and_timeline(tmp_path: Path) -> None:
    """The README's laptop flow: the demo finishes in version_0; the same command again (ckpt_path="last") has no
    epoch left and writes no checkpoint in version_1 (status used to say no checkpoint would resume it); more epochs
    go on in version_2."""
    root = tmp_path / "run"
    _fit(root, max_epochs=2, ckpt_path=None)
    v0 = _versions(root) / "version_0"
    _fit(root, max_epochs=2)  # nothing left to train
    assert not list((_versions(root) / "version_1" / "checkpoints").glob("*.ckpt"))

    s = _status(root)
    assert s["run_dir"] == str(_versions(root) / "version_1") and s["state"] == "finished"
    assert s["checkpoint"] == str(v0 / "checkpoints" / "last.ckpt") and s["checkpoint_step"] == 2 * STEPS_PER_EPOCH
    assert [(v["first_step"], v["last_step"]) for v in s["versions"]] == [(0, 16), (16, 16)]

    trainer = _fit(root, max_epochs=3)
    v2 = _versions(root) / "version_2"
    starts = [json.loads(line) for line in (v2 / "events.jsonl").read_text().splitlines()]
    assert starts[0]["event"] == "start" and starts[0]["resumed_from"] == s["checkpoint"], \
        "status named the checkpoint ckpt_path='last' resumed from"
    assert trainer.global_step == 3 * STEPS_PER_EPOCH

    s = _status(root)
    assert s["run_dir"] == str(v2) and s["state"] == "finished" and s["step"] == 3 * STEPS_PER_EPOCH
    # version_2 resumed from version_0's checkpoint, as version_1 did: version_1 trained nothing and is no part of it
    assert [Path(v["run_dir"]).name for v in s["versions"]] == ["version_0", "version_2"]
    assert s["checkpoint"] == str(v2 / "checkpoints" / "last.ckpt") and s["checkpoint_step"] == 3 * STEPS_PER_EPOCH
    assert [e["event"] for e in s["events"] if e["event"] != "checkpoint"] == ["start", "finish"] * 2
    assert _train_steps(cli.summarize_run(str(root))) == list(range(3 * STEPS_PER_EPOCH))
