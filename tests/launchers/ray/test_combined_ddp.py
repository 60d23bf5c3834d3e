"""Several loaders under DDP on Ray ranks: every loader inside a dict of training loaders (a max_size_cycle
CombinedLoader) and inside a list of validation loaders gets its own DistributedSampler, so each rank sees its
own shard of each one and the ranks together see every sample."""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as pl


def ids(n: int, start: int) -> TensorDataset:
    return TensorDataset(torch.arange(start, start + n, dtype=torch.float32))


class Recorder(pl.LightningModule):
    """Writes, per rank, the sample ids each step received (the ranks run in other processes)."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.layer = nn.Linear(1, 1)

    def _write(self, record: dict) -> None:
        with open(os.path.join(self.out_dir, f"rank{self.global_rank}.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")

    def training_step(self, batch, batch_idx):
        self._write({"stage": "train", "epoch": self.current_epoch, "batch_idx": batch_idx,
                     "a": batch["a"][0].tolist(), "b": batch["b"][0].tolist()})
        return self.layer(batch["b"][0].unsqueeze(1)).sum()

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self._write({"stage": "val", "loader": dataloader_idx, "ids": batch[0].tolist()})

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.slow
def test_each_rank_gets_its_own_shard_of_every_loader(local_ray, tmp_path):
    out = tmp_path / "seen"
    out.mkdir()
    train = {"a": DataLoader(ids(8, 0), batch_size=2, shuffle=True),      # 2 batches per rank: cycles
             "b": DataLoader(ids(16, 100), batch_size=2, shuffle=True)}   # 4 batches per rank
    val = [DataLoader(ids(4, 200), batch_size=2), DataLoader(ids(8, 300), batch_size=2)]
    trainer = pl.Trainer(num_processes=2, max_epochs=1, num_sanity_val_steps=0, enable_progress_bar=False,
                         enable_model_summary=False, logger=False, enable_checkpointing=False,
                         default_root_dir=str(tmp_path))
    trainer.fit(Recorder(str(out)), train, val)

    records = {r: [json.loads(line) for line in (out / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)}
    per_rank = {}
    for rank, recs in records.items():
        steps = [r for r in recs if r["stage"] == "train"]
        assert [r["batch_idx"] for r in steps] == [0, 1, 2, 3]  # max_size_cycle over each rank's shard
        a_first = [i for r in steps[:2] for i in r["a"]]
        a_cycled = [i for r in steps[2:] for i in r["a"]]
        assert sorted(a_first) == sorted(a_cycled)  # the short loader restarted over the same shard
        per_rank[rank] = {"a": set(a_first), "b": {i for r in steps for i in r["b"]},
                          0: {i for r in recs if r["stage"] == "val" and r["loader"] == 0 for i in r["ids"]},
                          1: {i for r in recs if r["stage"] == "val" and r["loader"] == 1 for i in r["ids"]}}
    expected = {"a": set(range(0, 8)), "b": set(range(100, 116)), 0: set(range(200, 204)), 1: set(range(300, 308))}
    for key, everything in expected.items():
        mine, theirs = per_rank[0][key], per_rank[1][key]
        assert mine and theirs and not mine & theirs, key  # disjoint shards ...
        assert {float(i) for i in everything} == mine | theirs, key  # ... that cover the loader together
    assert trainer.global_step == 4
