"""LightningCLI: configs, overrides, printing and saving the config, subclass mode, optimizers from the config,
bad input, Lightning's own LightningCLI on the same arguments, and the example script in-process and on Ray."""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

import raytrainer
from raytrainer.cli import LightningCLI, SaveConfigCallback
from raytrainer.cli.common import CLIError
from raytrainer.cli.fit import _translate_flags

REPO = Path(__file__).resolve().parents[2]
EXAMPLE, EXAMPLE_YAML = REPO / "examples" / "lightning_cli.py", REPO / "examples" / "lightning_cli.yaml"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def _classes(pl: Any, prefix: str = "") -> tuple[type, type, type]:
    """A small model, a subclass of it and a datamodule on ``pl`` (raytrainer or pytorch_lightning): the same
    signatures under both, so both CLIs can parse the same arguments."""

    class TinyModel(pl.LightningModule):
        """A linear layer trained to output zeros."""

        def __init__(self, width: int = 4, lr: float = 0.05, activation: str = "relu") -> None:
            super().__init__()
            self.save_hyperparameters()
            self.layer = torch.nn.Linear(3, width)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = self.layer(batch[0]).pow(2).mean()
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("val_loss", self.layer(batch[0]).pow(2).mean())

        def test_step(self, batch: Any, batch_idx: int) -> None:
            self.log("test_loss", self.layer(batch[0]).pow(2).mean())

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    class WideModel(TinyModel):
        """TinyModel with one more argument, for subclass mode."""

        def __init__(self, extra: int = 2, width: int = 4, lr: float = 0.05) -> None:
            super().__init__(width=width + extra, lr=lr)
            self.extra = extra

    class TinyData(pl.LightningDataModule):
        """Fixed random inputs."""

        def __init__(self, batch_size: int = 4, n: int = 32) -> None:
            super().__init__()
            self.save_hyperparameters()

        def setup(self, stage: str) -> None:
            self.x = torch.randn(self.hparams.n, 3, generator=torch.Generator().manual_seed(0))

        def train_dataloader(self) -> DataLoader:
            return DataLoader(TensorDataset(self.x), batch_size=self.hparams.batch_size)

        def val_dataloader(self) -> DataLoader:
            return DataLoader(TensorDataset(self.x[:8]), batch_size=4)

        def test_dataloader(self) -> DataLoader:
            return DataLoader(TensorDataset(self.x[:8]), batch_size=4)

    for cls in (TinyModel, WideModel, TinyData):  # importable as test_lightning_cli.<prefix><name> (a class_path)
        cls.__name__ = cls.__qualname__ = prefix + cls.__name__
        cls.__module__ = __name__
        globals()[cls.__name__] = cls
    return TinyModel, WideModel, TinyData


TinyModel, WideModel, TinyData = _classes(raytrainer)


def _cli(*args: str, **kwargs: Any) -> LightningCLI:
    return LightningCLI(TinyModel, TinyData, args=list(args), **kwargs)


def _write(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_fit_with_configs_and_overrides_writes_config_yaml_into_the_log_dir(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    base = _write(tmp_path / "base.yaml", {"seed_everything": 7, "trainer": {"max_epochs": 1, "max_failures": 3},
                                           "model": {"width": 5, "lr": 0.1}, "data": {"batch_size": 8}})
    later = _write(tmp_path / "later.yaml", {"model": {"lr": 0.2, "activation": "tanh"}})
    cli = _cli("fit", "--config", base, "--config", later, "--model.lr", "0.3", "--data.batch_size", "16",
               "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.limit_train_batches", "2", *QUIET)
    # later files win over earlier ones; flags win over files
    assert dict(cli.model.hparams) == {"width": 5, "lr": 0.3, "activation": "tanh"}
    assert cli.datamodule.hparams.batch_size == 16
    assert cli.trainer.max_failures == 3 and cli.trainer.current_epoch == 1 and cli.trainer.global_step == 2
    saved = yaml.safe_load((Path(cli.trainer.log_dir) / "config.yaml").read_text())
    assert Path(cli.trainer.log_dir) == tmp_path / "run" / "lightning_logs" / "version_0"
    assert saved["seed_everything"] == 7 and saved["model"] == {"width": 5, "lr": 0.3, "activation": "tanh"}
    assert saved["data"] == {"batch_size": 16, "n": 32}
    assert saved["trainer"]["max_failures"] == 3 and saved["trainer"]["limit_train_batches"] == 2
    assert saved["ckpt_path"] is None and "subcommand" not in saved

    # the saved file is a complete config of the subcommand: read back, it resolves to itself
    with pytest.raises(SystemExit):
        _cli("fit", "--config", str(Path(cli.trainer.log_dir) / "config.yaml"), "--print_config")
    assert yaml.safe_load(capsys.readouterr().out) == saved


def test_print_config_is_yaml_that_round_trips(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["--trainer.num_nodes", "2:4", "--trainer.ray_address", "auto", "--model.width", "9", "--print_config"]
    with pytest.raises(SystemExit) as exit_:
        _cli("fit", *args)
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    assert config["trainer"]["num_nodes"] == "2:4"  # an elastic range, not YAML 1.1's base-60 number 124
    assert config["trainer"]["ray_address"] == "auto" and config["model"]["width"] == 9
    assert {"seed_everything", "trainer", "model", "data", "optimizer", "lr_scheduler", "ckpt_path"} <= set(config)
    with pytest.raises(SystemExit):
        _cli("fit", "--config", _write(tmp_path / "printed.yaml", config), "--print_config")
    assert yaml.safe_load(capsys.readouterr().out) == config


def test_run_false_builds_everything_and_runs_nothing(tmp_path: Path) -> None:
    # raytrainer's own Trainer arguments from a file, num_nodes an unquoted range as users write it
    (tmp_path / "c.yaml").write_text(f"trainer:\n  num_nodes: 2:4\n  num_processes: 2\n  max_failures: 5\n"
                                     f"  heartbeat_timeout_s: 30.0\n  default_root_dir: {tmp_path / 'run'}\n"
                                     "model:\n  width: 3\n")
    cli = _cli("--config", str(tmp_path / "c.yaml"), run=False)
    assert cli.subcommand is None
    assert isinstance(cli.model, TinyModel) and cli.model.layer.out_features == 3
    assert isinstance(cli.datamodule, TinyData) and isinstance(cli.trainer, raytrainer.Trainer)
    plan = cli.trainer.plan
    assert (plan.launcher, plan.ranks_per_node, plan.nodes_elastic) == ("ray", 2, True)
    assert (plan.min_ranks, plan.max_ranks) == (4, 8)
    assert cli.trainer.max_failures == 5 and cli.trainer.heartbeat_timeout_s == 30.0
    assert cli.trainer.global_step == 0 and not (tmp_path / "run").exists()
    assert any(isinstance(c, SaveConfigCallback) for c in cli.trainer.callbacks)


def test_subclass_mode_takes_a_class_path_and_its_init_args(tmp_path: Path) -> None:
    cli = LightningCLI(TinyModel, TinyData, subclass_mode_model=True, run=False, args=[
        "--model", f"{__name__}.WideModel", "--model.init_args.extra", "5", "--model.init_args.width", "2"])
    assert type(cli.model) is WideModel and cli.model.extra == 5 and cli.model.layer.out_features == 7
    # subclass_mode_data with a short class name, from a config file
    cfg = _write(tmp_path / "d.yaml", {"data": {"class_path": f"{__name__}.TinyData", "init_args": {"n": 12}}})
    cli = LightningCLI(TinyModel, TinyData, subclass_mode_data=True, run=False, args=["--config", cfg])
    assert type(cli.datamodule) is TinyData and cli.datamodule.hparams.n == 12
    # no model class at all: any LightningModule by class_path
    cli = LightningCLI(run=False, args=["--model", f"{__name__}.TinyModel", "--model.init_args.width", "6"])
    assert type(cli.model) is TinyModel and cli.datamodule is None


def test_optimizer_and_scheduler_from_the_config(tmp_path: Path) -> None:
    common = ["--trainer.default_root_dir", str(tmp_path), "--trainer.max_epochs", "2",
              "--trainer.limit_train_batches", "2", *QUIET]
    with pytest.warns(UserWarning, match="configure_optimizers is replaced"):
        cli = _cli("fit", "--optimizer", "SGD", "--optimizer.lr", "0.5", "--optimizer.momentum", "0.9",
                   "--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "1", "--lr_scheduler.gamma", "0.1", *common)
    (opt,), (sched,) = cli.trainer.optimizers, cli.trainer.lr_scheduler_configs
    assert type(opt) is torch.optim.SGD and opt.defaults["momentum"] == 0.9
    assert type(sched.scheduler) is torch.optim.lr_scheduler.StepLR
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * 0.1 ** 2)  # stepped once per epoch, 2 epochs
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in cli.model.parameters()}

    # ReduceLROnPlateau names its metric; the CLI returns Lightning's dict form with that monitor
    cfg = _write(tmp_path / "opt.yaml", {
        "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.01}},
        "lr_scheduler": {"class_path": "raytrainer.cli.lightning_cli.ReduceLROnPlateau",
                         "init_args": {"monitor": "val_loss", "patience": 0}}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        cli = _cli("fit", "--config", cfg, *common)
    (sched,) = cli.trainer.lr_scheduler_configs
    assert sched.monitor == "val_loss" and sched.reduce_on_plateau
    assert type(cli.trainer.optimizers[0]) is torch.optim.Adam

    # without --optimizer the model's own configure_optimizers runs; auto_configure_optimizers=False drops the groups
    cli = _cli("fit", *common)
    assert type(cli.trainer.optimizers[0]) is torch.optim.Adam and cli.trainer.optimizers[0].defaults["lr"] == 0.05
    with pytest.raises(SystemExit):
        _cli("fit", "--optimizer", "SGD", auto_configure_optimizers=False)


def test_ckpt_path_last_and_the_checkpoints_hyperparameters(tmp_path: Path) -> None:
    root = ["--trainer.default_root_dir", str(tmp_path), "--trainer.limit_train_batches", "2", *QUIET]
    fit = _cli("fit", "--model.width", "6", "--trainer.max_epochs", "1", *root)
    ckpt = fit.trainer.checkpoint_callback.best_model_path
    assert os.path.isfile(ckpt)
    resumed = _cli("fit", "--model.width", "6", "--trainer.max_epochs", "2", "--ckpt_path", "last", *root)
    assert resumed.trainer.current_epoch == 2 and resumed.trainer.global_step == 4
    # a checkpoint file's hyper_parameters fill in the model's arguments (width 6, not the default 4)
    tested = _cli("test", "--ckpt_path", ckpt, *root)
    assert tested.model.hparams.width == 6 and tested.model.layer.out_features == 6
    assert "test_loss" in tested.trainer.callback_metrics


def test_save_config_callback_keeps_another_runs_config(tmp_path: Path) -> None:
    args = ["--trainer.logger", "raytrainer.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path),
            "--trainer.logger.version", "0", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
            "--trainer.default_root_dir", str(tmp_path), *QUIET]
    first = _cli("fit", *args)
    path = Path(first.trainer.log_dir) / "config.yaml"
    assert path == tmp_path / "lightning_logs" / "version_0" / "config.yaml"
    text = path.read_text()
    _cli("fit", *args)  # the same config again (a restarted rank writes it again): left as it is
    assert path.read_text() == text
    with pytest.raises(RuntimeError, match="config.yaml from another run"):
        _cli("fit", "--model.lr", "0.9", *args)
    assert path.read_text() == text
    _cli("fit", "--model.lr", "0.9", *args, save_config_kwargs={"overwrite": True})
    assert yaml.safe_load(path.read_text())["model"]["lr"] == 0.9
    # save_config_callback=None writes nothing; fast_dev_run skips it as in Lightning
    path.unlink()
    _cli("fit", *args, save_config_callback=None)
    _cli("fit", "--trainer.fast_dev_run", "true", *args)
    assert not path.exists()


@pytest.mark.parametrize(("args", "named"), [
    (["--model.widht", "3"], "--model.widht"),
    (["--trainer.max_epohcs", "3"], "--trainer.max_epohcs"),
    (["--trainer.max_epochs", "many"], "trainer.max_epochs"),
])
def test_bad_arguments_exit_with_an_error_naming_them(args: list[str], named: str,
                                                      capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        _cli("fit", *args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err


def test_an_unknown_key_in_a_config_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = _write(tmp_path / "typo.yaml", {"trainer": {"max_epohcs": 3}})
    with pytest.raises(SystemExit) as exit_:
        _cli("fit", "--config", cfg)
    assert exit_.value.code == 2 and "trainer.max_epohcs" in capsys.readouterr().err


def test_lightning_resolves_the_same_model_data_and_optimizer_sections(L: Any, tmp_path: Path) -> None:
    from pytorch_lightning.cli import LightningCLI as LightningsCLI

    LModel, LWide, LData = _classes(L, prefix="Lightnings")
    cfg = _write(tmp_path / "c.yaml", {"model": {"width": 7, "activation": "gelu"}, "data": {"n": 20},
                                       "trainer": {"max_epochs": 3, "default_root_dir": str(tmp_path)}})
    args = ["--config", cfg, "--model.lr", "1e-3", "--data.batch_size", "2", "--optimizer", "AdamW",
            "--optimizer.weight_decay", "0.1", "--lr_scheduler", "CosineAnnealingLR", "--lr_scheduler.T_max", "5"]
    ours = LightningCLI(TinyModel, TinyData, run=False, args=args)
    theirs = LightningsCLI(LModel, LData, run=False, args=args, save_config_callback=None)
    for section in ("model", "data", "optimizer", "lr_scheduler"):
        assert ours.config[section].as_dict() == theirs.config[section].as_dict(), section
    assert ours.config.model.lr == 1e-3 and ours.config.optimizer.class_path == "torch.optim.AdamW"
    # the Trainer arguments both have, resolved to the same values
    our_trainer, their_trainer = ours.config.trainer.as_dict(), theirs.config.trainer.as_dict()
    shared = set(our_trainer) & set(their_trainer) - {"logger", "callbacks", "strategy", "plugins", "profiler"}
    assert {"max_epochs", "num_nodes", "precision", "devices", "accelerator", "max_steps"} <= shared
    assert {k: our_trainer[k] for k in shared} == {k: their_trainer[k] for k in shared}

    sub = ["--model.init_args.extra", "3", "--data.n", "9"]
    ours = LightningCLI(TinyModel, TinyData, subclass_mode_model=True, run=False, args=["--model", "WideModel", *sub])
    theirs = LightningsCLI(LModel, LData, subclass_mode_model=True, run=False, save_config_callback=None,
                           args=["--model", "LightningsWideModel", *sub])
    assert ours.config.model.init_args.as_dict() == theirs.config.model.init_args.as_dict()
    assert ours.config.model.class_path == f"{__name__}.WideModel"
    assert theirs.config.model.class_path == f"{__name__}.LightningsWideModel"
    assert ours.config.data.as_dict() == theirs.config.data.as_dict()


def test_raytrainer_fit_passes_trainer_flags_after_a_lightning_cli_subcommand() -> None:
    ns = argparse.Namespace(num_nodes="2:4", num_processes=2)
    assert _translate_flags(ns, ["fit", "-c", "x.yaml"]) == [
        "fit", "-c", "x.yaml", "--trainer.num_nodes", "2:4", "--trainer.num_processes", "2"]
    assert _translate_flags(ns, ["--max_epochs", "3"]) == [
        "--num_nodes", "2:4", "--num_processes", "2", "--max_epochs", "3"]
    with pytest.raises(CLIError, match="--trainer.num_processes"):
        _translate_flags(ns, ["fit", "--trainer.num_processes", "4"])


def test_example_fits_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    spec = importlib.util.spec_from_file_location("lightning_cli_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    cli = example.main(["fit", "--config", str(EXAMPLE_YAML), "--trainer.max_epochs", "2", "--model.lr", "0.01",
                        "--data.batch_size", "128"])
    # 1400 training images in batches of 128 -> 11 steps per epoch
    assert cli.trainer.global_step == 22 and cli.model.hparams.lr == 0.01
    log_dir = tmp_path / "runs" / "lightning_cli" / "lightning_logs" / "version_0"
    assert Path(cli.trainer.log_dir).resolve() == log_dir
    saved = yaml.safe_load((log_dir / "config.yaml").read_text())
    assert saved["model"]["lr"] == 0.01 and saved["data"]["batch_size"] == 128 and saved["trainer"]["max_epochs"] == 2
    assert (log_dir / "checkpoints" / "last.ckpt").is_file()


def test_example_exits_with_a_clear_error_on_a_typo(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(EXAMPLE), "fit", "--config", str(EXAMPLE_YAML), "--model.hiden", "8"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "--model.hiden" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_example_on_two_ray_ranks_through_raytrainer_fit(tmp_path: Path) -> None:
    """`raytrainer fit SCRIPT --num-processes 2 -- fit --config ...`: the flag reaches the script as
    --trainer.num_processes 2, the run trains on 2 Ray ranks and rank 0 saves config.yaml into its log dir."""
    command = [str(Path(sys.executable).with_name("raytrainer"))]
    if not Path(command[0]).exists():
        command = [sys.executable, "-m", "raytrainer.cli"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RAY_ADDRESS": "local"}
    proc = subprocess.run([*command, "fit", str(EXAMPLE), "--working-dir", str(REPO), "--num-processes", "2", "--",
                           "fit", "--config", str(EXAMPLE_YAML), "--trainer.max_epochs", "2",
                           "--trainer.default_root_dir", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "--trainer.num_processes 2" in proc.stderr
    # 1400 images over 2 ranks in batches of 64 -> 11 steps per epoch
    assert "world size: 2, epochs: 2, steps: 22" in proc.stdout
    log_dir = tmp_path / "lightning_logs" / "version_0"
    saved = yaml.safe_load((log_dir / "config.yaml").read_text())
    assert saved["trainer"]["num_processes"] == 2 and saved["trainer"]["default_root_dir"] == str(tmp_path)
    assert (log_dir / "hparams.yaml").is_file() and (log_dir / "checkpoints" / "last.ckpt").is_file()
