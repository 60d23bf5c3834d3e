"""LightningCLI: a command line and YAML configs for a LightningModule, a DataModule and the Trainer.

Built on jsonargparse, with Lightning's interface: subcommands ``fit``/``validate``/``test``/``predict``,
``--config`` files (later ones win), dotted overrides (``--model.lr 0.1``, ``--trainer.num_nodes 2:4``),
``--print_config``, ``--optimizer``/``--lr_scheduler`` and a ``config.yaml`` saved into the run's log dir.
Every argument of ``raytrainer.Trainer`` (``max_failures``, ``ray_address``, elastic ``num_nodes`` ranges...)
is read from its signature, so a config can set it.

One difference from Lightning on purpose: values are read as YAML without YAML 1.1's base-60 integers, so
``--trainer.num_nodes 2:4`` (or ``num_nodes: 2:4`` in a file) is the elastic range "2:4", not the number 124.
"""
from __future__ import annotations

import inspect
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Union

import torch
import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace, class_from_function, set_loader
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from raytrainer.callbacks.callback import Callback
from raytrainer.core.hooks import defines
from raytrainer.datamodule import LightningDataModule
from raytrainer.io import storage
from raytrainer.module import LightningModule
from raytrainer.trainer.trainer import Trainer
from raytrainer.utilities import seed_everything
from raytrainer.utilities.exceptions import MisconfigurationException

__all__ = ["LightningArgumentParser", "LightningCLI", "LRSchedulerCallable", "OptimizerCallable",
           "ReduceLROnPlateau", "SaveConfigCallback", "instantiate_class"]

# ---------------------------------------------------------------------------------------------- YAML values
class _Loader(yaml.SafeLoader):
    """YAML as jsonargparse reads it (``1e-3`` is a float, dates stay strings), minus base-60 numbers."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers
            if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[01_]+|[-+]?0x[0-9a-fA-F_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*))$"),
    list("-+0123456789"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
                   |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))

_PARSER_MODE = "raytrainer_yaml"
# jsonargparse 4.49 renamed instantiate_classes -> instantiate and skip_none -> skip_unset; pyproject allows >= 4.27
_NEW_API = hasattr(ArgumentParser, "instantiate")
_KEEP_NONE = {"skip_unset": False} if _NEW_API else {"skip_none": False}


def _load_yaml(text: str) -> Any:
    """One value or a whole config file, read with :class:`_Loader`."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


set_loader(_PARSER_MODE, _load_yaml, exceptions=(yaml.YAMLError,))


# ---------------------------------------------------------------------------------------------- schedulers
class ReduceLROnPlateau(torch.optim.lr_scheduler.ReduceLROnPlateau):
    """torch's ReduceLROnPlateau that also names the metric it watches, so a config can choose it."""

    def __init__(self, optimizer: Optimizer, monitor: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(optimizer, *args, **kwargs)
        self.monitor = monitor


_SCHEDULER_BASES = (LRScheduler, ReduceLROnPlateau)
OptimizerCallable = Callable[[Iterable], Optimizer]
LRSchedulerCallable = Callable[[Optimizer], Union[LRScheduler, ReduceLROnPlateau]]  # noqa: UP007 - a runtime alias


def instantiate_class(args: Any, init: dict[str, Any]) -> Any:
    """``class_path``'s class called with ``args`` (one value or a tuple) and ``init_args``."""
    module_name, _, class_name = init["class_path"].rpartition(".")
    module = __import__(module_name, fromlist=[class_name])
    return getattr(module, class_name)(*(args if isinstance(args, tuple) else (args,)), **init.get("init_args", {}))


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__name__}"


def _with_class_path(cls: type, init_args: Any) -> dict[str, Any]:
    """A ``{"class_path", "init_args"}`` dict for a class added without subclass mode."""
    if isinstance(init_args, Namespace):
        init_args = init_args.as_dict()
    return {"class_path": _class_path(cls), "init_args": init_args or {}}


# ---------------------------------------------------------------------------------------------- parser
def _trainer_types() -> dict[str, Any]:
    """Types for the Trainer arguments its signature leaves open, as Lightning's Trainer declares them."""
    from raytrainer.loggers.base import Logger
    from raytrainer.profilers import Profiler
    from raytrainer.strategies.base import Strategy

    return {"logger": Logger | list[Logger] | bool | None, "profiler": Profiler | str | None,
            "strategy": str | Strategy | None}


class LightningArgumentParser(ArgumentParser):
    """jsonargparse's ArgumentParser with Lightning's helpers to add classes, optimizers and schedulers."""

    def __init__(self, *args: Any, description: str = "raytrainer Trainer command line tool", env_prefix: str = "PL",
                 default_env: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("parser_mode", _PARSER_MODE)
        super().__init__(*args, description=description, env_prefix=env_prefix, default_env=default_env, **kwargs)
        self.callback_keys: list[str] = []
        self._optimizers: dict[str, tuple[type | tuple[type, ...], str]] = {}
        self._lr_schedulers: dict[str, tuple[type | tuple[type, ...], str]] = {}

    def add_lightning_class_args(self, lightning_class: Any, nested_key: str, subclass_mode: bool = False,
                                 required: bool = True) -> list[str]:
        """Add the ``__init__`` arguments of a Trainer, LightningModule, DataModule or Callback under ``nested_key``."""
        if callable(lightning_class) and not isinstance(lightning_class, type):
            lightning_class = class_from_function(lightning_class)
        if not (isinstance(lightning_class, type)
                and issubclass(lightning_class, (Trainer, LightningModule, LightningDataModule, Callback))):
            raise MisconfigurationException(
                f"Cannot add arguments from {lightning_class!r}: give a subclass of raytrainer's Trainer, "
                "LightningModule, LightningDataModule or Callback, or a function that returns one.")
        if issubclass(lightning_class, Callback):
            self.callback_keys.append(nested_key)
        if subclass_mode:
            return self.add_subclass_arguments(lightning_class, nested_key, fail_untyped=False, required=required)
        if not issubclass(lightning_class, Trainer):
            return self.add_class_arguments(lightning_class, nested_key, fail_untyped=False, sub_configs=True)
        # Trainer arguments typed loosely (Any) get Lightning's types, so a config can name a class for them
        params = inspect.signature(lightning_class.__init__).parameters
        retyped = {name: hint for name, hint in _trainer_types().items()
                   if name in params and params[name].annotation in (Any, "Any", "str | None")}
        added = self.add_class_arguments(lightning_class, nested_key, fail_untyped=False, sub_configs=True,
                                         instantiate=False, skip=set(retyped))
        for name, hint in retyped.items():
            self.add_argument(f"--{nested_key}.{name}", type=hint, default=params[name].default)
            added.append(f"{nested_key}.{name}")
        return added

    def add_optimizer_args(self, optimizer_class: type[Optimizer] | tuple[type[Optimizer], ...] = (Optimizer,),
                           nested_key: str = "optimizer", link_to: str = "AUTOMATIC") -> None:
        """Add an optimizer's arguments (all but ``params``) under ``nested_key``; a tuple allows any subclass."""
        classes = optimizer_class if isinstance(optimizer_class, tuple) else (optimizer_class,)
        if not all(isinstance(c, type) and issubclass(c, Optimizer) for c in classes):
            raise MisconfigurationException(f"add_optimizer_args takes torch.optim.Optimizer subclasses, got "
                                            f"{optimizer_class!r}.")
        self._add_uninstantiated(optimizer_class, nested_key, skip={"params"})
        self._optimizers[nested_key] = (optimizer_class, link_to)

    def add_lr_scheduler_args(self, lr_scheduler_class: type | tuple[type, ...] = _SCHEDULER_BASES,
                              nested_key: str = "lr_scheduler", link_to: str = "AUTOMATIC") -> None:
        """Add a learning-rate scheduler's arguments (all but ``optimizer``) under ``nested_key``."""
        classes = lr_scheduler_class if isinstance(lr_scheduler_class, tuple) else (lr_scheduler_class,)
        if not all(isinstance(c, type) and issubclass(c, _SCHEDULER_BASES) for c in classes):
            raise MisconfigurationException(f"add_lr_scheduler_args takes LRScheduler subclasses (or "
                                            f"raytrainer.cli.ReduceLROnPlateau), got {lr_scheduler_class!r}.")
        self._add_uninstantiated(lr_scheduler_class, nested_key, skip={"optimizer"})
        self._lr_schedulers[nested_key] = (lr_scheduler_class, link_to)

    def _add_uninstantiated(self, cls: type | tuple[type, ...], key: str, skip: set[str]) -> None:
        kwargs: dict[str, Any] = {"instantiate": False, "fail_untyped": False, "skip": skip}
        if isinstance(cls, tuple):
            self.add_subclass_arguments(cls, key, **kwargs)
        else:
            self.add_class_arguments(cls, key, sub_configs=True, **kwargs)


# ---------------------------------------------------------------------------------------------- config callback
class SaveConfigCallback(Callback):
    """Writes the CLI's resolved config as ``config.yaml`` into the run's log dir when a run sets up.

    Rank 0 writes it (in-process: this process; on Ray: rank 0's actor, into the log dir its logger writes), so it
    sits next to the logger's files and ``hparams.yaml``. An existing file with other contents stops the run unless
    ``overwrite=True``; one with the same contents (a rank restarted after a failure) is left as it is.
    """

    def __init__(self, parser: LightningArgumentParser, config: Namespace, config_filename: str = "config.yaml",
                 overwrite: bool = False, multifile: bool = False, save_to_log_dir: bool = True) -> None:
        self.parser = parser
        self.config = config
        self.config_filename = config_filename
        self.overwrite = overwrite
        self.multifile = multifile
        self.save_to_log_dir = save_to_log_dir
        self.already_saved = False
        # dumped now, on the driver: the text travels to Ray ranks even where the parser does not
        self.config_text = parser.dump(config, **_KEEP_NONE)
        if not save_to_log_dir and type(self).save_config is SaveConfigCallback.save_config:
            raise ValueError("SaveConfigCallback(save_to_log_dir=False) writes nothing: subclass it and implement "
                             "save_config(trainer, pl_module, stage) to store the config elsewhere.")

    def __getstate__(self) -> dict[str, Any]:
        """Pickles without the parser when it does not pickle (its classes may live in a script's __main__)."""
        state = dict(self.__dict__)
        try:
            from ray import cloudpickle

            cloudpickle.dumps(state["parser"])
        except Exception:  # noqa: BLE001 - any pickling failure: ranks write config_text instead
            state["parser"] = None
        return state

    def setup(self, trainer: Any, pl_module: LightningModule, stage: str) -> None:
        """Rank 0 writes config.yaml into ``trainer.log_dir`` once, then calls :meth:`save_config`."""
        if self.already_saved:
            return
        if self.save_to_log_dir and trainer.is_global_zero:
            self._write(storage.join(trainer.log_dir, self.config_filename), trainer.log_dir)
        if trainer.is_global_zero:
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True

    def _write(self, path: str, log_dir: str) -> None:
        if storage.exists(path) and not self.overwrite:
            fs, resolved = storage.resolve(path)
            with fs.open_input_stream(resolved) as f:
                if f.read().decode("utf-8", "replace") == self.config_text:
                    return
            raise RuntimeError(
                f"{type(self).__name__} found {path} from another run and will not overwrite it. Delete it, write "
                "into a new log dir, set LightningCLI(save_config_callback=None) to save no config, or "
                "LightningCLI(save_config_kwargs={'overwrite': True}) to replace it.")
        storage.makedirs(log_dir)
        if self.multifile and self.parser is not None and "://" not in path:
            self.parser.save(self.config, path, overwrite=True, multifile=True, **_KEEP_NONE)
        else:
            storage.write_bytes_atomic(path, self.config_text.encode("utf-8"), manifest=False)

    def save_config(self, trainer: Any, pl_module: LightningModule, stage: str) -> None:
        """Override to store the config somewhere else too (runs on rank 0 only: no collectives here)."""


# ---------------------------------------------------------------------------------------------- the CLI
class LightningCLI:
    """Builds a model, a datamodule and a Trainer from the command line and config files, then runs a subcommand."""

    def __init__(
        self,
        model_class: type[LightningModule] | Callable[..., LightningModule] | None = None,
        datamodule_class: type[LightningDataModule] | Callable[..., LightningDataModule] | None = None,
        save_config_callback: type[SaveConfigCallback] | None = SaveConfigCallback,
        save_config_kwargs: dict[str, Any] | None = None,
        trainer_class: type[Trainer] | Callable[..., Trainer] = Trainer,
        trainer_defaults: dict[str, Any] | None = None,
        seed_everything_default: bool | int = True,
        parser_kwargs: dict[str, Any] | None = None,
        parser_class: type[LightningArgumentParser] = LightningArgumentParser,
        subclass_mode_model: bool = False,
        subclass_mode_data: bool = False,
        args: list[str] | dict[str, Any] | Namespace | None = None,
        run: bool = True,
        auto_configure_optimizers: bool = True,
    ) -> None:
        self.save_config_callback = save_config_callback
        self.save_config_kwargs = save_config_kwargs or {}
        self.trainer_class = trainer_class
        self.trainer_defaults = trainer_defaults or {}
        self.seed_everything_default = seed_everything_default
        self.parser_kwargs = parser_kwargs or {}
        self.parser_class = parser_class
        self.auto_configure_optimizers = auto_configure_optimizers
        self.model_class = model_class
        self._model_class = model_class or LightningModule
        self.subclass_mode_model = model_class is None or subclass_mode_model
        self.datamodule_class = datamodule_class
        self._datamodule_class = datamodule_class or LightningDataModule
        self.subclass_mode_data = datamodule_class is None or subclass_mode_data

        names = self.subcommands()
        main_kwargs = {k: v for k, v in self.parser_kwargs.items() if k not in names}
        sub_kwargs = {k: v for k, v in self.parser_kwargs.items() if k in names}
        self.setup_parser(run, main_kwargs, sub_kwargs)
        self.parse_arguments(self.parser, args)
        self._parse_ckpt_path()
        self.subcommand: str | None = self.config["subcommand"] if run else None
        self._set_seed()
        self.before_instantiate_classes()
        self.instantiate_classes()
        self.after_instantiate_classes()
        if self.subcommand is not None:
            self._run_subcommand(self.subcommand)

    # -------------------------------------------------------------------------- parser
    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """A parser with ``-c/--config`` (which also brings ``--print_config``)."""
        from raytrainer import __version__

        kwargs.setdefault("dump_header", [f"raytrainer=={__version__}"])
        parser = self.parser_class(**kwargs)
        parser.add_argument("-c", "--config", action=ActionConfigFile,
                            help="A YAML or JSON config file; give several and later ones win.")
        return parser

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any],
                     subparser_kwargs: dict[str, Any]) -> None:
        """The main parser; with subcommands, one sub-parser per Trainer entry point."""
        self.parser = self.init_parser(**main_kwargs)
        if add_subcommands:
            self._subcommand_method_arguments: dict[str, list[str]] = {}
            self._add_subcommands(self.parser, **subparser_kwargs)
        else:
            self._add_arguments(self.parser)

    def add_default_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """``--seed_everything``: an int seeds everything, True picks a seed, False seeds nothing."""
        parser.add_argument("--seed_everything", type=bool | int,
                            default=self.seed_everything_default,
                            help="An int seeds everything before the classes are built; True picks a random seed "
                                 "(and records it); False seeds nothing.")

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """``trainer``, ``model`` and ``data`` groups from the classes' signatures."""
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({f"trainer.{k}": v for k, v in self.trainer_defaults.items() if k != "callbacks"})
        parser.add_lightning_class_args(self._model_class, "model", subclass_mode=self.subclass_mode_model)
        parser.add_lightning_class_args(self._datamodule_class, "data", subclass_mode=self.subclass_mode_data,
                                        required=self.datamodule_class is not None)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Override to add arguments or links (``parser.link_arguments``)."""

    def _add_arguments(self, parser: LightningArgumentParser) -> None:
        self.add_default_arguments_to_parser(parser)
        self.add_core_arguments_to_parser(parser)
        self.add_arguments_to_parser(parser)
        if self.auto_configure_optimizers:
            if not parser._optimizers:
                parser.add_optimizer_args((Optimizer,))
            if not parser._lr_schedulers:
                parser.add_lr_scheduler_args(_SCHEDULER_BASES)
        self.link_optimizers_and_lr_schedulers(parser)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """The subcommands (Trainer methods) and the method arguments the CLI fills in itself."""
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
                "validate": {"model", "dataloaders", "datamodule"},
                "test": {"model", "dataloaders", "datamodule"},
                "predict": {"model", "dataloaders", "datamodule"}}

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        self._subcommand_parsers: dict[str, LightningArgumentParser] = {}
        subcommands = parser.add_subcommands()
        klass = self.trainer_class if isinstance(self.trainer_class, type) else class_from_function(self.trainer_class)
        for name, skip in self.subcommands().items():
            doc = inspect.getdoc(getattr(klass, name)) or ""
            summary = doc.split("\n\n")[0].replace("\n", " ") or None
            sub_kwargs = dict(kwargs.get(name, {}))
            sub_kwargs.setdefault("description", summary)
            sub = self.init_parser(**sub_kwargs)
            self._add_arguments(sub)
            self._subcommand_method_arguments[name] = sub.add_method_arguments(klass, name, skip=set(skip))
            self._subcommand_parsers[name] = sub
            subcommands.add_subcommand(name, sub, help=summary)

    @staticmethod
    def link_optimizers_and_lr_schedulers(parser: LightningArgumentParser) -> None:
        """Link optimizer/scheduler groups added with a ``link_to`` target to that argument."""
        for key, (cls, link_to) in {**parser._optimizers, **parser._lr_schedulers}.items():
            if link_to == "AUTOMATIC":
                continue
            if isinstance(cls, tuple):
                parser.link_arguments(key, link_to)
            else:
                parser.link_arguments(key, link_to, compute_fn=lambda init, cls=cls: _with_class_path(cls, init))

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse ``args`` (a list like sys.argv[1:], a dict or a Namespace; None: sys.argv) into ``self.config``."""
        if isinstance(args, (dict, Namespace)):
            self.config = parser.parse_object(args)
        else:
            self.config = parser.parse_args(args)

    def _parse_ckpt_path(self) -> None:
        """``--ckpt_path FILE``: the checkpoint's hyper_parameters become the model's config (flags still win)."""
        sub = self.config.get("subcommand")
        if not sub:
            return
        ckpt_path = self.config[sub].get("ckpt_path")
        if not ckpt_path or not os.path.isfile(ckpt_path):
            return
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
        hparams = dict(ckpt.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        try:
            self.config = self.parser.parse_object({sub: {"model": hparams}}, self.config)
        except SystemExit:
            sys.stderr.write(f"The hyper_parameters saved in {ckpt_path} do not fit the model's arguments.\n")
            raise

    # -------------------------------------------------------------------------- building
    def _get(self, config: Namespace, key: str, default: Any = None) -> Any:
        """A config value, inside the subcommand's section when there is one."""
        return config.get(str(self.subcommand), config).get(key, default)

    def _parser(self, subcommand: str | None) -> LightningArgumentParser:
        return self.parser if subcommand is None else self._subcommand_parsers[subcommand]

    def _set_seed(self) -> None:
        seed = self._get(self.config, "seed_everything")
        if seed is False:
            return
        seed = seed_everything(None if seed is True else seed, workers=True)
        (self.config[self.subcommand] if self.subcommand else self.config)["seed_everything"] = seed

    def before_instantiate_classes(self) -> None:
        """Override to run code before the classes are built."""

    def instantiate_classes(self) -> None:
        """Build the datamodule, the model (with the config's optimizer) and the Trainer."""
        self.config_init = (self.parser.instantiate if _NEW_API else self.parser.instantiate_classes)(self.config)
        self.datamodule = self._get(self.config_init, "data")
        self.model = self._get(self.config_init, "model")
        self._add_configure_optimizers_method_to_model(self.subcommand)
        self.trainer = self.instantiate_trainer()

    def after_instantiate_classes(self) -> None:
        """Override to run code after the classes are built."""

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer from the ``trainer`` section, ``trainer_defaults``' callbacks and the config callback."""
        extra = [self._get(self.config_init, key) for key in self._parser(self.subcommand).callback_keys]
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        return self._instantiate_trainer(config, extra)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        config = dict(config)
        given = config.get("callbacks")
        config["callbacks"] = [] if given is None else list(given) if isinstance(given, (list, tuple)) else [given]
        config["callbacks"].extend(callbacks)
        if "callbacks" in self.trainer_defaults:
            default = self.trainer_defaults["callbacks"]
            config["callbacks"] += list(default) if isinstance(default, (list, tuple)) else [default]
        if self.save_config_callback is not None and not config.get("fast_dev_run", False):
            section = self.config.get(str(self.subcommand), self.config)
            config["callbacks"].append(self.save_config_callback(self._parser(self.subcommand), section,
                                                                 **self.save_config_kwargs))
        return self.trainer_class(**config)

    @staticmethod
    def configure_optimizers(lightning_module: LightningModule, optimizer: Optimizer,
                             lr_scheduler: Any = None) -> Any:
        """What the model's configure_optimizers returns when the config names the optimizer (override to change)."""
        if lr_scheduler is None:
            return optimizer
        if isinstance(lr_scheduler, ReduceLROnPlateau):
            return {"optimizer": optimizer,
                    "lr_scheduler": {"scheduler": lr_scheduler, "monitor": lr_scheduler.monitor}}
        return [optimizer], [lr_scheduler]

    def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
        """With ``--optimizer`` (and ``--lr_scheduler``) given, the model's configure_optimizers builds them."""
        if not self.auto_configure_optimizers:
            return
        parser = self._parser(subcommand)

        def automatic(base: type | tuple[type, ...], registry: dict[str, tuple[Any, str]]) -> list[str]:
            return [key for key, (cls, link_to) in registry.items()
                    if link_to == "AUTOMATIC" and any(issubclass(c, base) for c in (
                        cls if isinstance(cls, tuple) else (cls,)))]

        optimizers = automatic(Optimizer, parser._optimizers)
        schedulers = automatic(_SCHEDULER_BASES, parser._lr_schedulers)
        if not optimizers:
            return
        if len(optimizers) > 1 or len(schedulers) > 1:
            raise MisconfigurationException(
                f"{type(self).__name__} builds configure_optimizers from at most one optimizer and one lr_scheduler "
                f"group left 'AUTOMATIC', found {optimizers + schedulers}. Link the groups to model arguments "
                "(add_optimizer_args(..., link_to='model.optimizer')) and write configure_optimizers yourself.")
        opt_cls = parser._optimizers[optimizers[0]][0]
        opt_init = self._get(self.config_init, optimizers[0])
        if not isinstance(opt_cls, tuple):
            opt_init = _with_class_path(opt_cls, opt_init)
        if not opt_init:
            return  # the group exists, but no optimizer was given: the model's own configure_optimizers runs
        sched_init = None
        if schedulers:
            sched_cls = parser._lr_schedulers[schedulers[0]][0]
            sched_init = self._get(self.config_init, schedulers[0])
            if not isinstance(sched_cls, tuple):
                sched_init = _with_class_path(sched_cls, sched_init)
        if defines(self.model, "configure_optimizers"):
            warnings.warn(f"{type(self.model).__name__}.configure_optimizers is replaced by "
                          f"{type(self).__name__}.configure_optimizers: the config names the optimizer.", stacklevel=2)
        self.model.configure_optimizers = _ConfiguredOptimizers(  # type: ignore[method-assign]
            self.model, _plain(opt_init), _plain(sched_init) if sched_init else None, self.configure_optimizers)

    # -------------------------------------------------------------------------- running
    def _run_subcommand(self, subcommand: str) -> None:
        before = getattr(self, f"before_{subcommand}", None)
        if callable(before):
            before()
        fn = getattr(self, subcommand, getattr(self.trainer, subcommand))
        fn(**self._prepare_subcommand_kwargs(subcommand))
        after = getattr(self, f"after_{subcommand}", None)
        if callable(after):
            after()

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        """The Trainer method's arguments: the config's (``ckpt_path``...), the model and the datamodule."""
        kwargs = {k: v for k, v in self.config_init[subcommand].items()
                  if k in self._subcommand_method_arguments[subcommand]}
        kwargs["model"] = self.model
        if self.datamodule is not None:
            kwargs["datamodule"] = self.datamodule
        return kwargs


def _plain(init: Any) -> dict[str, Any]:
    """A class_path/init_args config as plain dicts (Namespaces inside become dicts), so it pickles anywhere."""
    return init.as_dict() if isinstance(init, Namespace) else {
        k: (v.as_dict() if isinstance(v, Namespace) else v) for k, v in dict(init).items()}


class _ConfiguredOptimizers:
    """The model's configure_optimizers when the config names them: builds them, where the run calls it
    (a Ray rank included), from the model's own parameters there."""

    def __init__(self, module: LightningModule, optimizer: dict[str, Any], lr_scheduler: dict[str, Any] | None,
                 combine: Callable[..., Any]) -> None:
        self.module, self.optimizer, self.lr_scheduler, self.combine = module, optimizer, lr_scheduler, combine

    def __call__(self) -> Any:
        optimizer = instantiate_class(self.module.parameters(), self.optimizer)
        scheduler = instantiate_class(optimizer, self.lr_scheduler) if self.lr_scheduler else None
        return self.combine(self.module, optimizer, scheduler)
