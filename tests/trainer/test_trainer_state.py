"""trainer.state (fn, stage, status) and the stage flags, recorded at every hook under raytrainer and
pytorch_lightning; and the cheap Trainer attributes that go with them (model, print, is_last_batch, ...)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as pl
from raytrainer.utilities.exceptions import MisconfigurationException

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")

HOOKS = ["setup", "on_fit_start", "on_sanity_check_start", "on_sanity_check_end", "on_train_start",
         "on_train_epoch_start", "on_train_batch_start", "on_train_batch_end", "on_validation_start",
         "on_validation_batch_start", "on_validation_end", "on_train_epoch_end", "on_train_end", "on_fit_end",
         "on_test_start", "on_test_batch_end", "on_predict_start", "on_predict_batch_end", "on_exception"]


def snapshot(trainer, where: str) -> tuple:
    """What Lightning users read: trainer.state and the stage flags (plain values, comparable across frameworks)."""
    s = trainer.state
    return (where, getattr(s.fn, "value", None), getattr(s.stage, "value", None), s.status.value, trainer.training,
            trainer.validating, trainer.testing, trainer.predicting, trainer.sanity_checking, trainer.evaluating,
            trainer.interrupted, trainer.is_last_batch if s.fn == "fit" else None)


def framework(base, records: list):
    """A recording callback and a small module on ``base`` (raytrainer or pytorch_lightning)."""

    class Rec(base.Callback):
        pass

    def hook(name):
        def record(self, trainer, *args, **kwargs):
            records.append(snapshot(trainer, name))
        return record

    for name in HOOKS:
        setattr(Rec, name, hook(name))

    class Model(base.LightningModule):
        def __init__(self, fail: type[BaseException] | None = None):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)
            self.fail = fail

        def training_step(self, batch, batch_idx):
            if self.fail is not None:
                raise self.fail("stop here")
            records.append(snapshot(self.trainer, "training_step"))
            return self.layer(batch[0]).sum()

        def validation_step(self, batch, batch_idx):
            records.append(snapshot(self.trainer, "validation_step"))

        def test_step(self, batch, batch_idx):
            records.append(snapshot(self.trainer, "test_step"))

        def predict_step(self, batch, batch_idx):
            return self.layer(batch[0])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Rec, Model


def loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4)


def run_all_entry_points(base, tmp_path) -> list:
    records: list = []
    Rec, Model = framework(base, records)
    trainer = base.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                           enable_model_summary=False, callbacks=[Rec()], num_sanity_val_steps=1,
                           limit_val_batches=1, default_root_dir=str(tmp_path))
    records.append(snapshot(trainer, "init"))
    model = Model()
    trainer.fit(model, loader(), loader())
    records.append(snapshot(trainer, "after fit"))
    trainer.validate(model, loader(), verbose=False)
    records.append(snapshot(trainer, "after validate"))
    trainer.test(model, loader(), verbose=False)
    records.append(snapshot(trainer, "after test"))
    trainer.predict(model, loader())
    records.append(snapshot(trainer, "after predict"))
    return records


def test_state_and_stage_flags_at_every_hook_match_lightning(L, tmp_path):
    ours = run_all_entry_points(pl, tmp_path / "rt")
    theirs = run_all_entry_points(L, tmp_path / "pl")
    assert ours == theirs
    # spot checks of what the comparison covers
    assert ("on_sanity_check_start", "fit", "sanity_check", "running") == ours[[r[0] for r in ours].index(
        "on_sanity_check_start")][:4]
    assert ours[-1][:4] == ("after predict", "predict", None, "finished")


def test_state_is_interrupted_after_an_exception_as_in_lightning(L, tmp_path):
    def failing_fit(base):
        records: list = []
        Rec, Model = framework(base, records)
        trainer = base.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                               enable_model_summary=False, callbacks=[Rec()], default_root_dir=str(tmp_path))
        with pytest.raises(RuntimeError, match="stop here"):
            trainer.fit(Model(fail=RuntimeError), loader())
        return trainer, [r for r in records if r[0] == "on_exception"]

    ours, ours_seen = failing_fit(pl)
    theirs, theirs_seen = failing_fit(L)
    assert snapshot(ours, "after") == snapshot(theirs, "after")
    assert ours.state.status == "interrupted" and ours.interrupted and ours.state.stage is None
    # on_exception sees the status already interrupted (Lightning sets it first)
    assert ours_seen == theirs_seen and ours_seen[0][3] == "interrupted"


def test_keyboard_interrupt_leaves_the_state_interrupted(tmp_path):
    """Lightning turns Ctrl+C into sys.exit(1) after its graceful shutdown; raytrainer re-raises the
    KeyboardInterrupt instead (a notebook keeps running), with the same state."""
    records: list = []
    Rec, Model = framework(pl, records)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[Rec()], default_root_dir=str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(Model(fail=KeyboardInterrupt), loader())
    assert trainer.state.status == pl.trainer.states.TrainerStatus.INTERRUPTED and trainer.interrupted
    assert [r[3] for r in records if r[0] == "on_exception"] == ["interrupted"]


def test_enums_have_lightnings_values_and_compare_with_strings(L):
    from pytorch_lightning.trainer import states as theirs

    from raytrainer.trainer import states as ours

    for name in ("TrainerFn", "RunningStage", "TrainerStatus"):
        assert {m.name: m.value for m in getattr(ours, name)} == {m.name: m.value for m in getattr(theirs, name)}
    assert ours.TrainerFn.FITTING == "fit" == ours.TrainerFn.from_str("FIT") and ours.TrainerFn.FITTING == "FIT"
    assert ours.RunningStage.SANITY_CHECKING.evaluating and not ours.RunningStage.TRAINING.evaluating
    assert ours.RunningStage.SANITY_CHECKING.dataloader_prefix == "val"
    assert {ours.TrainerFn.TESTING, "test"} == {"test"}  # hashes as its value
    assert ours.TrainerState() == ours.TrainerState(ours.TrainerStatus.INITIALIZING, None, None)
    with pytest.raises(ValueError, match="not a TrainerFn"):
        ours.TrainerFn.from_str("train")


def test_stage_flag_setters_follow_lightnings_rules(L, tmp_path):
    def flags(base):
        t = base.Trainer(logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path))
        out = []
        for name, value in (("training", True), ("validating", False), ("testing", True), ("training", False),
                            ("testing", False), ("predicting", True), ("sanity_checking", True)):
            setattr(t, name, value)  # True enters a stage; False leaves it only when it is the current one
            out.append(getattr(t.state.stage, "value", None))
        return out

    assert flags(pl) == flags(L) == ["train", "train", "test", "test", None, "predict", "sanity_check"]


def test_model_print_early_stopping_callbacks_and_scaler(tmp_path, capsys):
    seen = {}

    class Model(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            seen["model"] = self.trainer.model
            self.trainer.print("from rank", self.trainer.global_rank)
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    stops = [pl.callbacks.EarlyStopping("a", strict=False), pl.callbacks.EarlyStopping("b", strict=False)]
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=stops,
                         default_root_dir=str(tmp_path))
    assert trainer.early_stopping_callbacks == stops and trainer.early_stopping_callback is stops[0]
    assert isinstance(trainer.profiler, pl.profilers.PassThroughProfiler) and trainer.profiler is trainer.profiler
    model = Model()
    trainer.fit(model, loader())
    assert seen["model"] is model and trainer.model is model  # one device: the module itself, as Lightning
    assert "from rank 0" in capsys.readouterr().out
    assert trainer.scaler is None and not trainer.received_sigterm


def test_model_registry_is_refused_with_what_to_do_instead():
    with pytest.raises(MisconfigurationException, match="model registry.*ModelCheckpoint"):
        pl.Trainer(model_registry="my-org/my-model")


def test_enable_autolog_hparams_false_leaves_the_hyperparameters_unlogged(L, tmp_path):
    def logged(base, autolog: bool) -> list:
        calls: list = []

        class Recorder(base.loggers.Logger):
            name, version = "rec", 0

            def log_hyperparams(self, params, *args, **kwargs):
                calls.append(dict(params))

            def log_metrics(self, metrics, step=None):
                pass

        class Model(base.LightningModule):
            def __init__(self, lr: float = 0.1):
                super().__init__()
                self.save_hyperparameters()
                self.layer = torch.nn.Linear(4, 1)

            def training_step(self, batch, batch_idx):
                return self.layer(batch[0]).sum()

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

        trainer = base.Trainer(max_epochs=1, logger=Recorder(), enable_checkpointing=False, enable_progress_bar=False,
                               enable_model_summary=False, enable_autolog_hparams=autolog,
                               default_root_dir=str(tmp_path))
        trainer.fit(Model(), loader())
        return calls

    assert logged(pl, True) == logged(L, True) == [{"lr": 0.1}]
    assert logged(pl, False) == logged(L, False) == []
