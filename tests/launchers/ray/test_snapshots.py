"""In-memory snapshots in one process: a snapshot is the boundary's state, and never a later one."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as pl
from raytrainer.launchers.ray import snapshots


class _Model(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


class _Snap(pl.Callback):
    """Attaches a Snapshotter as the Ray rank does, and records what the model held at each boundary."""

    def __init__(self) -> None:
        self.snapshotter = snapshots.Snapshotter(1)
        self.at_boundary: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_start(self, trainer, pl_module):
        trainer.session.snapshotter = self.snapshotter

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # runs just before the loop's snapshot of this step
        self.at_boundary[trainer.global_step] = {k: v.clone() for k, v in pl_module.state_dict().items()}


def _fit(steps: int) -> tuple[_Model, _Snap, pl.Trainer]:
    snapshots.clear()
    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    model, cb = _Model(), _Snap()
    trainer = pl.Trainer(max_steps=steps, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8, shuffle=True))
    return model, cb, trainer


def test_snapshot_holds_the_boundary_state_and_is_detached():
    model, cb, trainer = _fit(5)
    step, state = snapshots.latest()
    assert step == 5 and cb.snapshotter.taken == 5
    for k, v in cb.at_boundary[5].items():
        assert torch.equal(state["state_dict"][k], v), k
    adam = state["optimizer_states"][0]["state"]
    assert set(adam[0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert state["raytrainer"]["position"]["batch_idx"] == 5 and state["global_step"] == 5
    live = next(model.parameters())
    assert state["state_dict"]["net.0.weight"].data_ptr() != live.data_ptr()  # a copy, not the live tensor


def test_training_past_the_boundary_makes_the_snapshot_fall_back():
    model, cb, trainer = _fit(5)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # an in-place write after the boundary (as an optimizer step)
    assert snapshots.latest() is None  # no full copy was made (no publisher), and the light one is stale

    model, cb, trainer = _fit(5)
    full = cb.snapshotter.take(trainer.session)  # a full copy at step 5
    opt = trainer.optimizers[0]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # a completed optimizer step: the step counter, not only version counters, says so
    step, state = snapshots.latest()
    assert step == 5 and state is not None
    assert all(torch.equal(state["state_dict"][k], v) for k, v in full["state_dict"].items())
    assert not torch.equal(state["state_dict"]["net.0.weight"], next(model.parameters()))


class _DataSGD(torch.optim.Optimizer):
    """An old-style optimizer that writes through ``.data``, which does not bump version counters."""

    def __init__(self, params) -> None:
        super().__init__(params, {"lr": 0.1})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data.add_(p.grad, alpha=-group["lr"])
        return loss


def test_data_writes_that_bypass_version_counters_are_still_caught(monkeypatch):
    monkeypatch.setattr(_Model, "configure_optimizers", lambda self: _DataSGD(self.parameters()))
    model, cb, trainer = _fit(3)
    assert snapshots.latest()[0] == 3
    versions = [p._version for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    trainer.optimizers[0].step()
    assert [p._version for p in model.parameters()] == versions  # invisible to version counters ...
    assert snapshots.latest() is None                             # ... but the optimizer-step count saw it


# ------------------------------------------------------------------------------------------------ sharded runs
def test_holders_prefer_another_node_and_cover_every_rank():
    # two nodes of two ranks: each rank's copy lives on the other node, one copy per rank
    assert snapshots.holders(["a", "a", "b", "b"]) == [2, 3, 0, 1]
    # one node: the next rank, cyclically
    assert snapshots.holders(["a", "a", "a"]) == [1, 2, 0]
    # uneven nodes: still never the same node when another exists
    nodes = ["a", "a", "a", "b"]
    assert all(nodes[h] != nodes[r] for r, h in enumerate(snapshots.holders(nodes)))


def test_choose_pieces_takes_the_newest_complete_step():
    # rank 1 died; rank 2 holds 1's copy. Step 6's exchange was cut short (rank 2 never got 1's piece of step 6)
    held = [{0: [4, 6], 3: [4, 6]}, None, {2: [4, 6], 1: [4]}, {3: [4, 6], 2: [4, 6]}]
    step, assignment = snapshots.choose_pieces(held, 4)
    assert step == 4
    assert sorted(o for owners in assignment.values() for o in owners) == [0, 1, 2, 3]
    assert 1 in assignment[2]
    # a rank and its holder lost: nothing complete
    assert snapshots.choose_pieces([{0: [4]}, None, None, {3: [4]}], 4) is None


def test_sharded_snapshot_needs_one_piece_per_rank_of_one_step():
    import pytest

    from raytrainer.checkpoint.shard_snapshot import Piece, ShardedSnapshot

    with pytest.raises(ValueError, match="one piece per rank"):
        ShardedSnapshot([Piece(0, 4, 0, b""), Piece(1, 6, 0, b"")])
    with pytest.raises(ValueError, match="one piece per rank"):
        ShardedSnapshot([Piece(0, 4, 0, b""), Piece(2, 4, 0, b"")])
