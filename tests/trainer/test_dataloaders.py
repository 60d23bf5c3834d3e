"""Data loading and loop scheduling, compared with pytorch_lightning where it can run the same code: several
training loaders and CombinedLoader's modes, overfit_batches, reload_dataloaders_every_n_epochs, the validation
schedule (int, float, time-based, check_val_every_n_epoch), the num_*_batches / *_dataloaders attributes and
on_validation_model_zero_grad."""
from __future__ import annotations

import logging
import time
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as pl
from raytrainer.utilities import CombinedLoader
from raytrainer.utilities.exceptions import MisconfigurationException

QUIET = dict(enable_progress_bar=False, enable_model_summary=False, logger=False, enable_checkpointing=False)


def ids(n: int, start: int = 0) -> TensorDataset:
    return TensorDataset(torch.arange(start, start + n, dtype=torch.float32))


def dl(n: int, batch_size: int = 2, start: int = 0, shuffle: bool = False) -> DataLoader:
    return DataLoader(ids(n, start), batch_size=batch_size, shuffle=shuffle)


def plain(value):
    """Batches as plain python (tensors -> lists), so both frameworks' records compare with ==."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def shape(value):
    """The container structure of what a Trainer attribute shows (types by name, loaders as 'loader')."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [type(value).__name__] + [shape(v) for v in value]
    return None if value is None else "loader"


def module_class(base, seen: list):
    """A module recording (what, step, batch_idx, dataloader_idx, batch) for each step, built on ``base``."""

    class M(base.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.layer = nn.Linear(1, 1)

        def training_step(self, batch, batch_idx):
            seen.append(("train", self.current_epoch, batch_idx, plain(batch)))
            return self.layer(torch.ones(1, 1)).sum()

        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            seen.append(("val", self.global_step, batch_idx, dataloader_idx, plain(batch)))

        def test_step(self, batch, batch_idx, dataloader_idx=0):
            seen.append(("test", batch_idx, dataloader_idx, plain(batch)))

        def predict_step(self, batch, batch_idx, dataloader_idx=0):
            return plain(batch)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return M


# ------------------------------------------------------------------------------------ CombinedLoader
@pytest.mark.parametrize("mode", ["min_size", "max_size_cycle", "max_size", "sequential"])
@pytest.mark.parametrize("structure", ["dict", "list", "nested"])
def test_combined_loader_batches_and_len_match_lightning(L, mode, structure):
    def make(cls, limits=None):
        loaders = {"dict": lambda: {"a": dl(6, 4), "b": dl(15, 5)},
                   "list": lambda: [dl(6, 4), dl(15, 5), dl(3, 1)],
                   "nested": lambda: {"a": [dl(6, 4), dl(4, 2)], "b": (dl(15, 5),)}}[structure]()
        combined = cls(loaders, mode)
        if limits is not None:
            combined.limits = limits
        iter(combined)
        return len(combined), [(plain(b), i, d) for b, i, d in combined], shape(combined.iterables)

    for limits in (None, 1, 2):
        assert make(CombinedLoader, limits) == make(L.utilities.CombinedLoader, limits), (mode, structure, limits)


def test_combined_loader_refuses_an_unknown_mode_and_mismatched_limits():
    with pytest.raises(ValueError, match="Unsupported mode 'longest'"):
        CombinedLoader([dl(2)], "longest")
    combined = CombinedLoader([dl(2), dl(4)], "max_size_cycle")
    with pytest.raises(ValueError, match="Mismatch in number of limits"):
        combined.limits = [1, 2, 3]
    with pytest.raises(ValueError, match="Mismatch in flattened length"):
        combined.flattened = [dl(2)]
    assert len(combined) == 2  # unlike Lightning's, len() works before iter()


# ------------------------------------------------------------------------------- several train loaders
def fit_record(base, train, val=None, **kwargs):
    seen: list = []
    model = module_class(base, seen)()
    trainer = base.Trainer(**{**QUIET, "max_epochs": 1, "num_sanity_val_steps": 0, **kwargs})
    trainer.fit(model, train_dataloaders=train, val_dataloaders=val)
    return seen, trainer.num_training_batches, shape(trainer.train_dataloader), trainer.num_val_batches


@pytest.mark.parametrize("train", ["dict", "list", "one-item list", "min_size", "max_size", "max_size_cycle"])
@pytest.mark.parametrize("limit", [None, 0.5, 2])
def test_fit_with_several_training_loaders_matches_lightning(L, train, limit):
    def loaders(base):
        if train == "dict":
            return {"a": dl(6), "b": dl(10)}
        if train == "list":
            return [dl(6), dl(10, start=100)]
        if train == "one-item list":
            return [dl(6)]
        return base.utilities.CombinedLoader({"a": dl(6), "b": dl(10, 3)}, train)

    ours = fit_record(pl, loaders(pl), limit_train_batches=limit, max_epochs=2)
    assert ours == fit_record(L, loaders(L), limit_train_batches=limit, max_epochs=2)
    assert ours[1] > 0


def test_sequential_mode_is_refused_in_training(L):
    for base in (pl, L):
        with pytest.raises(ValueError, match="sequential"):
            fit_record(base, base.utilities.CombinedLoader([dl(4), dl(2)], "sequential"))


def test_evaluation_takes_collections_and_combined_loaders_like_lightning(L):
    def run(base):
        seen: list = []
        model = module_class(base, seen)()
        trainer = base.Trainer(**QUIET, limit_val_batches=2)
        trainer.validate(model, {"p": dl(6), "q": dl(2, start=50)}, verbose=False)
        report = [shape(trainer.val_dataloaders), trainer.num_val_batches]
        combined = base.utilities.CombinedLoader({"x": dl(4), "y": dl(6, start=10)}, "max_size_cycle")
        trainer.validate(model, combined, verbose=False)
        report += [shape(trainer.val_dataloaders), trainer.num_val_batches]
        trainer.test(model, [dl(4), dl(2, start=7)], verbose=False)
        report += [shape(trainer.test_dataloaders), trainer.num_test_batches]
        preds = trainer.predict(model, {"a": dl(4), "b": dl(2, start=9)})
        report += [shape(trainer.predict_dataloaders), trainer.num_predict_batches, preds]
        return seen, report

    assert run(pl) == run(L)


def test_predict_refuses_a_non_sequential_combined_loader(L):
    for base in (pl, L):
        model = module_class(base, [])()
        trainer = base.Trainer(**QUIET)
        with pytest.raises(ValueError, match="only supports the `CombinedLoader\\(mode=\"sequential\"\\)`"):
            trainer.predict(model, base.utilities.CombinedLoader([dl(4), dl(2)], "min_size"))


def test_resume_mid_epoch_with_a_cycling_combined_loader_continues_the_same_batches(tmp_path):
    """The shorter loader shuffles and restarts during the epoch; a resume in the middle sees what an
    uninterrupted run would have seen next."""
    def loaders():
        return {"short": DataLoader(ids(6), batch_size=2, shuffle=True),
                "long": DataLoader(ids(20, 100), batch_size=2, shuffle=True)}

    def run(max_steps, ckpt=None, enable_checkpointing=False):
        seen: list = []

        class Noisy(module_class(pl, seen)):
            def training_step(self, batch, batch_idx):
                torch.rand(3)  # like dropout: training moves the global RNG between the loaders' restarts
                return super().training_step(batch, batch_idx)

        model = Noisy()
        trainer = pl.Trainer(**{**QUIET, "enable_checkpointing": enable_checkpointing}, max_epochs=2,
                             max_steps=max_steps, default_root_dir=str(tmp_path), num_sanity_val_steps=0)
        torch.manual_seed(2)
        trainer.fit(model, loaders(), ckpt_path=ckpt)
        return seen, trainer

    whole, _ = run(-1)
    first, trainer = run(7)
    path = str(tmp_path / "mid.ckpt")
    trainer.save_checkpoint(path)
    rest, _ = run(-1, ckpt=path)
    assert len(whole) == 20 and len(first) == 7
    assert first + rest == whole


# ------------------------------------------------------------------------------------ overfit_batches
@pytest.mark.parametrize("overfit", [2, 0.25])
def test_overfit_batches_trains_on_the_same_first_batches_like_lightning(L, overfit):
    def run(base):
        seen: list = []
        model = module_class(base, seen)()
        trainer = base.Trainer(**QUIET, max_epochs=2, overfit_batches=overfit, num_sanity_val_steps=0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.manual_seed(3)
            trainer.fit(model, dl(16, shuffle=True), dl(12, start=50, shuffle=True))
        messages = sorted({str(w.message) for w in caught if "overfit" in str(w.message)})
        return seen, trainer.num_training_batches, trainer.num_val_batches, trainer.limit_train_batches, messages

    ours = run(pl)
    assert ours == run(L)
    assert ours[4] == ["You requested to overfit but enabled train dataloader shuffling. We are turning off the "
                       "train dataloader shuffling for you.",
                       "You requested to overfit but enabled val dataloader shuffling. We are turning off the "
                       "val dataloader shuffling for you."]


@pytest.mark.parametrize("value", [-1, 1.5, "2", True])
def test_overfit_batches_refuses_bad_values(value):
    with pytest.raises(MisconfigurationException, match="overfit_batches"):
        pl.Trainer(overfit_batches=value)


# ------------------------------------------------------------------------ reload_dataloaders_every_n_epochs
@pytest.mark.parametrize("kwargs", [dict(reload_dataloaders_every_n_epochs=2),
                                    dict(reload_dataloaders_every_n_epochs=1, check_val_every_n_epoch=2,
                                         num_sanity_val_steps=0),
                                    dict(reload_dataloaders_every_n_epochs=0)])
def test_reload_dataloaders_every_n_epochs_matches_lightning(L, kwargs):
    def run(base):
        seen: list = []
        calls: list = []

        class M(module_class(base, seen)):
            def train_dataloader(self):
                calls.append(("train", self.current_epoch))
                return dl(4, start=10 * self.current_epoch)  # each load gives other data: the loop must use it

            def val_dataloader(self):
                calls.append(("val", self.current_epoch))
                return dl(2, start=100 + 10 * self.current_epoch)

        trainer = base.Trainer(**{**QUIET, "max_epochs": 5, **kwargs})
        trainer.fit(M())
        return seen, sorted(calls)

    (ours, our_calls), (theirs, their_calls) = run(pl), run(L)
    assert ours == theirs  # the same (reloaded) data at the same steps
    # raytrainer loads the validation loaders when fit starts; Lightning at their first use (here epoch 1)
    extra = [("val", 0)] if kwargs.get("check_val_every_n_epoch") == 2 else []
    assert our_calls == sorted(their_calls + extra)


@pytest.mark.parametrize("value", [-1, 1.5, None])
def test_reload_dataloaders_every_n_epochs_refuses_bad_values(value):
    with pytest.raises(MisconfigurationException, match="reload_dataloaders_every_n_epochs"):
        pl.Trainer(reload_dataloaders_every_n_epochs=value)


# ------------------------------------------------------------------------------------ validation schedule
def validation_steps(base, n_train: int = 10, **kwargs):
    seen: list = []
    model = module_class(base, seen)()
    trainer = base.Trainer(**{**QUIET, "max_epochs": 3, "num_sanity_val_steps": 0, "limit_val_batches": 1,
                              **kwargs})
    trainer.fit(model, dl(2 * n_train), dl(2, start=100))
    return [s[1] for s in seen if s[0] == "val"]


@pytest.mark.parametrize("kwargs", [dict(val_check_interval=3), dict(val_check_interval=0.25),
                                    dict(val_check_interval=1.0), dict(val_check_interval=10),
                                    dict(val_check_interval=4, check_val_every_n_epoch=None),
                                    dict(val_check_interval=25, check_val_every_n_epoch=None),
                                    dict(check_val_every_n_epoch=2), dict(val_check_interval=5.0),
                                    dict(val_check_interval=0.5, check_val_every_n_epoch=2)])
def test_validation_schedule_matches_lightning(L, kwargs):
    assert validation_steps(pl, **kwargs) == validation_steps(L, **kwargs)


def test_int_val_check_interval_above_the_epoch_raises_like_lightning(L):
    errors = []
    for base in (pl, L):
        with pytest.raises(ValueError) as info:
            validation_steps(base, val_check_interval=11)
        errors.append(str(info.value).strip())
    assert errors[0] == errors[1]
    assert "must be less than or equal to the number of the training batches (10)" in errors[0]
    # without validation it does not matter, as in Lightning
    assert validation_steps(pl, val_check_interval=11, limit_val_batches=0) == []


@pytest.mark.parametrize("kwargs", [dict(val_check_interval=1.5), dict(val_check_interval=0),
                                    dict(val_check_interval=0.5, check_val_every_n_epoch=None),
                                    dict(check_val_every_n_epoch=0), dict(val_check_interval="1:00"),
                                    dict(val_check_interval="00:00:aa:00"), dict(val_check_interval={"minutes": 0})])
def test_bad_validation_schedules_are_refused(kwargs):
    with pytest.raises(MisconfigurationException):
        pl.Trainer(**kwargs)


class FakeClock:
    """time.monotonic for both frameworks: one second passes per training step."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("kwargs", [dict(val_check_interval="00:00:00:03"),
                                    dict(val_check_interval={"seconds": 4}, check_val_every_n_epoch=2),
                                    dict(val_check_interval=__import__("datetime").timedelta(seconds=5),
                                         check_val_every_n_epoch=None)])
def test_time_based_validation_matches_lightning(L, monkeypatch, kwargs):
    clock = FakeClock()
    monkeypatch.setattr(time, "monotonic", clock)

    def run(base):
        clock.now = 1000.0
        seen: list = []

        class M(module_class(base, seen)):
            def on_train_batch_end(self, outputs, batch, batch_idx):
                clock.now += 1.0

        trainer = base.Trainer(**{**QUIET, "max_epochs": 3, "num_sanity_val_steps": 0, "limit_val_batches": 1,
                                  **kwargs})
        trainer.fit(M(), dl(14), dl(2, start=100))
        return [s[1] for s in seen if s[0] == "val"]

    ours = run(pl)
    assert ours == run(L)
    assert ours  # it validated at all


def test_notes_for_arguments_of_one_match_lightning(L, caplog):
    kwargs = dict(limit_train_batches=1, limit_val_batches=1.0, limit_test_batches=1, val_check_interval=1,
                  overfit_batches=0.0)
    with caplog.at_level(logging.INFO, logger="pytorch_lightning.utilities.rank_zero"), \
            caplog.at_level(logging.INFO, logger="pytorch_lightning"):
        L.Trainer(**QUIET, **kwargs)
    # (Lightning's notes for 1.0 end in "..": the same words, one period)
    theirs = sorted(r.getMessage().replace("..", ".") for r in caplog.records if "was configured so" in r.getMessage())
    caplog.clear()
    logger = logging.getLogger("raytrainer")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="raytrainer"):
            pl.Trainer(**QUIET, **kwargs)
            pl.Trainer(**QUIET, fast_dev_run=2)
    finally:
        logger.removeHandler(caplog.handler)
    ours = [r.getMessage() for r in caplog.records]
    assert sorted(m for m in ours if "was configured so" in m) == theirs
    assert len(theirs) == 4
    assert "Running in `fast_dev_run` mode: will run the requested loop using 2 batch(es). Logging and " \
           "checkpointing is suppressed." in ours


# ------------------------------------------------------------------------------ on_validation_model_zero_grad
@pytest.mark.parametrize("accumulate", [1, 2])
def test_on_validation_model_zero_grad_matches_lightning(L, accumulate):
    def run(base):
        calls: list = []

        class M(module_class(base, [])):
            def on_validation_model_zero_grad(self):
                calls.append(("zero_grad", self.global_step))
                super().on_validation_model_zero_grad()

            def on_validation_start(self):
                calls.append(("grads cleared", all(p.grad is None for p in self.parameters())))

        trainer = base.Trainer(**QUIET, max_epochs=1, val_check_interval=3, accumulate_grad_batches=accumulate,
                               limit_val_batches=1, num_sanity_val_steps=1)
        trainer.fit(M(), dl(14), dl(2))
        return calls

    ours = run(pl)
    assert ours == run(L)
    assert ("zero_grad", 6 // accumulate) in ours and (accumulate == 1) == (("grads cleared", False) not in ours)


# --------------------------------------------------------------------------- attributes for every stage
def test_dataloader_attributes_and_batch_counts_match_lightning(L):
    def run(base):
        model = module_class(base, [])()
        trainer = base.Trainer(**QUIET, max_epochs=1, limit_val_batches=0.5, limit_test_batches=1,
                               limit_predict_batches=2)
        out = [trainer.num_val_batches, shape(trainer.val_dataloaders)]
        trainer.fit(model, dl(8), [dl(8), dl(4)])
        out += [trainer.num_training_batches, trainer.num_val_batches, trainer.num_sanity_val_batches,
                shape(trainer.train_dataloader), shape(trainer.val_dataloaders)]
        trainer.test(model, dl(6), verbose=False)
        out += [trainer.num_test_batches, shape(trainer.test_dataloaders)]
        trainer.predict(model, [dl(6), dl(2)])
        out += [trainer.num_predict_batches, shape(trainer.predict_dataloaders)]
        return out

    assert run(pl) == run(L)
