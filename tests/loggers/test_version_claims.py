"""Issue 20 item 1: runs started at the same moment into one root never share ``version_N`` (claimed exclusively, on
local disks and on an object store). Several loggers of one Trainer under one root each take their own version,
as in Lightning (tests/loggers/test_tensorboard.py)."""
from __future__ import annotations

import multiprocessing as mp
import os
import threading
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as rt
from raytrainer.io import storage
from raytrainer.loggers import CSVLogger, TensorBoardLogger
from raytrainer.loggers.csv import claim_version


def _race(target, n: int) -> list:
    """Run ``target(i)`` in ``n`` threads released together; their results in thread order."""
    gate, out = threading.Barrier(n), [None] * n

    def run(i: int) -> None:
        gate.wait()
        out[i] = target(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return out


def test_racing_local_claims_get_distinct_versions(tmp_path):
    for trial in range(5):
        root = str(tmp_path / f"t{trial}")
        got = _race(lambda i: CSVLogger(root).version if i % 2 else TensorBoardLogger(root).version, 6)
        assert sorted(got) == list(range(6)), got
        assert sorted(os.listdir(os.path.join(root, "lightning_logs"))) == [f"version_{v}" for v in range(6)]


def test_object_store_claims_are_exclusive(s3_server):
    base = f"{s3_server['uri']}/claims"
    for trial in range(5):  # the same name claimed by 4 writers at once: at most one wins
        won = _race(lambda i: storage.claim_dir(f"{base}/same{trial}"), 4)
        assert sum(won) <= 1, won
    got = _race(lambda i: claim_version(f"{base}/runs"), 4)
    assert len(set(got)) == 4, got  # every writer ends with its own version
    assert not storage.claim_dir(f"{base}/runs/version_{got[0]}")  # a claimed version stays taken


class _Tiny(rt.LightningModule):
    def __init__(self, run: int) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        self.log("loss", self.net(batch[0]).pow(2).mean())
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=2)


def _fit_at_once(root: str, run: int, gate) -> None:
    gate.wait(60)
    rt.Trainer(max_steps=4, enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
               logger=CSVLogger(root), log_every_n_steps=1).fit(_Tiny(run), _loader())


def test_two_fits_started_together_keep_their_own_versions(tmp_path):
    """The issue's scenario: two processes fit into one default_root_dir at the same moment; each run's
    hparams, metrics and checkpoints stay in its own version."""
    ctx = mp.get_context("spawn")
    gate = ctx.Barrier(2)
    procs = [ctx.Process(target=_fit_at_once, args=(str(tmp_path), run, gate)) for run in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
        assert p.exitcode == 0
    versions = sorted((tmp_path / "lightning_logs").iterdir())
    assert [v.name for v in versions] == ["version_0", "version_1"]
    runs = {yaml.safe_load(Path(v, "hparams.yaml").read_text())["run"] for v in versions}
    assert runs == {1, 2}
    for v in versions:
        assert sorted(c.name for c in (v / "checkpoints").glob("*.ckpt")) == ["epoch=0-step=4.ckpt"]
        assert len((v / "metrics.csv").read_text().splitlines()) > 1
