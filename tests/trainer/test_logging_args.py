"""self.log's sync_dist_group, rank_zero_only and metric_attribute arguments, and the MisconfigurationExceptions
Lightning raises for a wrong self.log call: the same values and the same exception type as pytorch_lightning 2.x."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as pl
from raytrainer.core.results import Results
from raytrainer.utilities.exceptions import MisconfigurationException

torchmetrics = pytest.importorskip("torchmetrics")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::RuntimeWarning")


def data(n: int = 12, batch_size: int = 4, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return DataLoader(TensorDataset(x, (x.sum(1) > 0).long()), batch_size=batch_size)


def module(base, where: str, log):
    """A small classifier on ``base`` whose hook ``where`` calls ``log(self, loss)``."""

    class M(base.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(4, 2)
            self.acc = torchmetrics.classification.MulticlassAccuracy(num_classes=2)
            # not a submodule: Lightning cannot find this Metric by itself
            self.hidden = {"acc": torchmetrics.classification.MulticlassAccuracy(num_classes=2)}
            self.last_loss = None

        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self.net(x)
            loss = nn.functional.cross_entropy(logits, y)
            self.acc(logits, y)
            self.hidden["acc"](logits, y)
            self.last_loss = loss.detach()
            if where == "training_step":
                log(self, loss)
            return loss

        def on_train_epoch_end(self):
            if where == "on_train_epoch_end":
                log(self, self.last_loss)

        def on_train_end(self):
            if where == "on_train_end":
                log(self, self.last_loss)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self.net(x), y)
            if where == "validation_step":
                log(self, loss)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return M()


def fit(base, tmp_path, where, log, val: bool = False):
    torch.manual_seed(0)
    model = module(base, where, log)
    trainer = base.Trainer(max_epochs=2, log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                           enable_checkpointing=False, logger=False, num_sanity_val_steps=0,
                           default_root_dir=str(tmp_path / base.__name__))
    trainer.fit(model, data(), data(8, seed=1) if val else None)
    return {k: round(float(v), 5) for k, v in sorted(trainer.callback_metrics.items())}


def both(L, tmp_path, where, log, val: bool = False):
    return fit(L, tmp_path, where, log, val), fit(pl, tmp_path, where, log, val)


def test_the_three_arguments_on_one_process_match_lightning(L, tmp_path):
    """One process: sync_dist_group names a group that is not used (nothing to reduce), rank_zero_only values are
    this rank's, metric_attribute lets a Metric that is no attribute be logged."""
    group = object()  # never touched on one process, as in Lightning

    def log(self, loss):
        self.log("loss", loss, sync_dist=True, sync_dist_group=group, on_step=True, on_epoch=True)
        self.log("loss_r0", loss, rank_zero_only=True, on_epoch=True)
        self.log("acc", self.acc, metric_attribute="acc", on_epoch=True)
        self.log("hidden_acc", self.hidden["acc"], metric_attribute="hidden_acc", on_epoch=True)
        self.log_dict({"d_loss": loss}, sync_dist=True, sync_dist_group=group, rank_zero_only=True)

    lightning, ours = both(L, tmp_path, "training_step", log)
    assert ours == lightning
    assert {"loss_epoch", "loss_r0", "acc", "hidden_acc", "d_loss"} <= set(ours)


def test_validation_values_with_the_arguments_match_lightning(L, tmp_path):
    def log(self, loss):
        self.log("v", loss, sync_dist=True, sync_dist_group=None, rank_zero_only=True, reduce_fx="max")

    lightning, ours = both(L, tmp_path, "validation_step", log, val=True)
    assert ours == lightning


def test_a_metric_that_is_no_attribute_needs_metric_attribute(L, tmp_path):
    def log(self, loss):
        self.log("hidden_acc", self.hidden["acc"])

    with pytest.raises(L.utilities.exceptions.MisconfigurationException, match="metric_attribute=name"):
        fit(L, tmp_path, "training_step", log)
    with pytest.raises(MisconfigurationException, match=r"metric_attribute=name\) with name one of \['acc'\]"):
        fit(pl, tmp_path, "training_step", log)


def test_a_module_without_any_metric_attribute_is_refused(L, tmp_path):
    def log(self, loss):
        del self.acc  # now the module holds no Metric at all
        self.log("hidden_acc", self.hidden["acc"])

    with pytest.raises(L.utilities.exceptions.MisconfigurationException, match="Could not find"):
        fit(L, tmp_path, "training_step", log)
    with pytest.raises(MisconfigurationException, match="holds no Metric at all"):
        fit(pl, tmp_path, "training_step", log)


def _same_name_two_ways(self, loss):
    self.log("x", loss, prog_bar=self.global_step % 2 == 1)


def _metric_attribute_changes(self, loss):
    self.log("acc", self.acc, metric_attribute="acc" if self.global_step == 0 else "other")


def _group_changes(self, loss):
    self.log("x", loss, sync_dist_group=None if self.global_step == 0 else "g")


@pytest.mark.parametrize("where,log,match", [
    ("training_step", lambda self, loss: self.log("x", loss, on_step=False, on_epoch=False), "not useful"),
    ("training_step", lambda self, loss: self.log("x", loss, reduce_fx="median"), "reduce_fx"),
    ("training_step", lambda self, loss: self.log("x/dataloader_idx_0", loss), "dataloader_idx"),
    ("on_train_epoch_end", lambda self, loss: self.log("x", loss, on_step=True), "on_step=True"),
    ("on_train_epoch_end", lambda self, loss: self.log("x", loss, on_epoch=False), "on_epoch=False"),
    ("on_train_end", lambda self, loss: self.log("x", loss), "on_train_end"),
    ("training_step", _same_name_two_ways, "twice"),
    ("training_step", _metric_attribute_changes, "twice"),
    ("training_step", _group_changes, "twice"),
])
def test_wrong_log_calls_raise_misconfiguration_like_lightning(L, tmp_path, where, log, match):
    with pytest.raises(L.utilities.exceptions.MisconfigurationException):
        fit(L, tmp_path, where, log)
    with pytest.raises(MisconfigurationException, match=match):
        fit(pl, tmp_path, where, log)


def test_the_same_call_spelled_two_ways_is_accepted(L, tmp_path):
    def log(self, loss):
        self.log("x", loss, reduce_fx="mean" if self.global_step % 2 else torch.mean, on_epoch=True)

    lightning, ours = both(L, tmp_path, "training_step", log)
    assert ours == lightning


def test_logging_where_lightning_forbids_it_is_still_a_runtime_error(tmp_path):
    """Code that caught RuntimeError from raytrainer before keeps working."""
    with pytest.raises(RuntimeError, match="on_train_end"):
        fit(pl, tmp_path, "on_train_end", lambda self, loss: self.log("x", loss))


class _RecordingReduce:
    """Stands in for the strategy's collective: records (op, group) and reduces as two equal ranks would,
    except over a group of one rank."""

    def __init__(self, other_rank: dict[str, torch.Tensor]) -> None:
        self.calls: list[tuple[str, object]] = []
        self.other = other_rank

    def __call__(self, value: torch.Tensor, op: str, group: object) -> torch.Tensor:
        self.calls.append((op, group))
        if group == "solo":
            return value
        other = self.other["value"]
        if op == "sum":
            return value + other
        return torch.maximum(value, other) if op == "max" else (value + other) / 2


def test_results_reduce_over_the_given_group_and_never_rank_zero_only():
    results = Results("validate")
    results.fx = "validation_step"
    args = dict(prog_bar=False, logger=True, on_step=None, on_epoch=None, sync_dist=True, batch=None)
    results.log("validation_step", "grouped", torch.tensor(2.0), reduce_fx="mean", batch_size=3,
                sync_dist_group="solo", **args)
    results.log("validation_step", "world", torch.tensor(2.0), reduce_fx="max", batch_size=3, **args)
    results.log("validation_step", "mine", torch.tensor(5.0), reduce_fx="mean", batch_size=3, rank_zero_only=True,
                **args)
    # the other rank saw 1 sample of value 8 for "world": max(2, 8); "grouped" is reduced over rank 0 alone
    reduce = _RecordingReduce({"value": torch.tensor(8.0)})
    out = results.epoch_metrics(reduce, sync_all=True)
    assert float(out["grouped"][1]) == 2.0
    assert float(out["world"][1]) == 8.0
    assert float(out["mine"][1]) == 5.0  # rank_zero_only: no collective even though eval syncs every value
    assert reduce.calls == [("sum", "solo"), ("max", None)]


def test_a_mean_across_ranks_is_weighted_by_batch_size():
    """Lightning reduces the weighted sums and the batch counts: 3 samples of 2.0 and 1 of 6.0 give 3.0."""
    results = Results("train")
    results.log("training_step", "m", torch.tensor(2.0), False, True, False, True, "mean", True, 3, None)
    other = {"value": torch.tensor([6.0, 1.0])}  # the other rank's (sum of value * batch size, batch size)
    out = results.epoch_metrics(_RecordingReduce(other), sync_all=False)
    assert float(out["m"][1]) == pytest.approx(3.0)


def test_a_saved_epoch_state_leaves_the_group_out_and_a_resumed_run_adopts_it_again():
    """Checkpoints and snapshots hold the epoch accumulators; a process group cannot be saved, so the resumed
    run's first call brings it back (and is not mistaken for a changed call)."""
    group = object()
    results = Results("train")
    call = ("training_step", "m", torch.tensor(2.0), False, True, False, True, "sum", True, 1, None)
    results.log(*call, sync_dist_group=group, rank_zero_only=True)
    state = results.accum_state_dict()
    assert "group" not in state["m"]["meta"] and state["m"]["meta"]["rank_zero_only"] is True
    resumed = Results("train")
    resumed.load_accum_state_dict(state)
    resumed.log(*call, sync_dist_group=group, rank_zero_only=True)
    assert resumed.meta["m"].group is group
    assert float(resumed.epoch_metrics(None, sync_all=False)["m"][1]) == 4.0


def test_logging_in_on_train_batch_start_uses_its_own_levels(L, tmp_path):
    """The first batch's on_train_batch_start follows on_train_epoch_start: its self.log is still step-level."""
    def make(base):
        class M(base.LightningModule):
            def __init__(self):
                super().__init__()
                self.net = nn.Linear(4, 2)

            def on_train_batch_start(self, batch, batch_idx):
                self.log("b", float(batch_idx), on_step=True, on_epoch=True)

            def training_step(self, batch, batch_idx):
                return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        return M()

    got = []
    for base in (L, pl):
        trainer = base.Trainer(max_epochs=1, enable_progress_bar=False, enable_model_summary=False, logger=False,
                               enable_checkpointing=False, default_root_dir=str(tmp_path / base.__name__))
        trainer.fit(make(base), data())
        got.append({k: round(float(v), 5) for k, v in sorted(trainer.callback_metrics.items())})
    assert got[1] == got[0]
