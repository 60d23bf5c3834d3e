"""BaseFinetuning and BackboneFinetuning: train some layers frozen first, then unfreeze them into the optimizer."""
from __future__ import annotations

from collections.abc import Callable, Generator, Iterable
from typing import Any

import torch
from torch.nn import Module, ModuleDict
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer

from raytrainer.callbacks.callback import Callback
from raytrainer.utilities import log
from raytrainer.utilities.exceptions import MisconfigurationException

Modules = Module | Iterable[Any]


def multiplicative(epoch: int) -> float:
    """BackboneFinetuning's default lambda_func: grow the backbone lr by 1.5x per epoch."""
    return 1.5


class BaseFinetuning(Callback):
    """Subclass and implement ``freeze_before_training`` (called in setup) and ``finetune_function`` (called at each
    training epoch start, once per optimizer). The param groups it adds are in the state_dict, so a resumed fit
    gets them back before the optimizer state is loaded."""

    def __init__(self) -> None:
        # per optimizer index: its param groups, parameters named (not tensors), so they survive a checkpoint
        self._internal_optimizer_metadata: dict[int, list[dict[str, Any]]] = {}
        self._restarting = False
        self._restored_in_load = False  # on_load_checkpoint already gave the groups back

    # ------------------------------------------------------------------ module helpers (Lightning's API)
    @staticmethod
    def flatten_modules(modules: Modules) -> list[Module]:
        """Leaf modules, plus any parent holding parameters of its own, of a module or (nested) iterable of them."""
        if isinstance(modules, ModuleDict):
            modules = modules.values()
        if isinstance(modules, Module):
            found: Iterable[Module] = modules.modules()
        else:
            found = [m for item in modules for m in BaseFinetuning.flatten_modules(item)]
        return [m for m in found if not list(m.children()) or m._parameters]

    @staticmethod
    def filter_params(modules: Modules, train_bn: bool = True,
                      requires_grad: bool = True) -> Generator[torch.nn.Parameter, None, None]:
        """Parameters of ``modules`` whose requires_grad equals ``requires_grad`` (BatchNorm's left out unless
        ``train_bn``)."""
        for mod in BaseFinetuning.flatten_modules(modules):
            if isinstance(mod, _BatchNorm) and not train_bn:
                continue
            for param in mod.parameters(recurse=False):
                if param.requires_grad == requires_grad:
                    yield param

    @staticmethod
    def make_trainable(modules: Modules) -> None:
        """requires_grad=True on every parameter of ``modules``; BatchNorm layers track running stats again."""
        for mod in BaseFinetuning.flatten_modules(modules):
            if isinstance(mod, _BatchNorm):
                mod.track_running_stats = True
            for param in mod.parameters(recurse=False):
                param.requires_grad = True

    @staticmethod
    def freeze_module(module: Module) -> None:
        """requires_grad=False on ``module``'s own parameters; a BatchNorm stops tracking running stats."""
        if isinstance(module, _BatchNorm):
            module.track_running_stats = False
        for param in module.parameters(recurse=False):
            param.requires_grad = False

    @staticmethod
    def freeze(modules: Modules, train_bn: bool = True) -> None:
        """Freeze ``modules``; with ``train_bn`` their BatchNorm layers stay trainable."""
        for mod in BaseFinetuning.flatten_modules(modules):
            if isinstance(mod, _BatchNorm) and train_bn:
                BaseFinetuning.make_trainable(mod)
            else:
                BaseFinetuning.freeze_module(mod)

    @staticmethod
    def filter_on_optimizer(optimizer: Optimizer, params: Iterable[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
        """``params`` minus those already in one of ``optimizer``'s param groups (warns about those)."""
        present = {id(p) for group in optimizer.param_groups for p in group["params"]}
        kept, dropped = [], 0
        for param in params:
            if id(param) in present:
                dropped += 1
            else:
                kept.append(param)
        if dropped:
            log.warning("BaseFinetuning: %d parameter(s) to unfreeze are already in the optimizer and were skipped. "
                        "Build the optimizer from the trainable parameters only, e.g. "
                        "%s(filter(lambda p: p.requires_grad, self.parameters()), ...).",
                        dropped, type(optimizer).__name__)
        return kept

    @staticmethod
    def unfreeze_and_add_param_group(modules: Modules, optimizer: Optimizer, lr: float | None = None,
                                     initial_denom_lr: float = 10.0, train_bn: bool = True) -> None:
        """Unfreeze ``modules`` and add their parameters to ``optimizer`` as a new group, with ``lr`` (default: the
        first group's lr divided by ``initial_denom_lr``)."""
        BaseFinetuning.make_trainable(modules)
        group_lr = optimizer.param_groups[0]["lr"] / initial_denom_lr if lr is None else float(lr)
        params = BaseFinetuning.filter_on_optimizer(
            optimizer, BaseFinetuning.filter_params(modules, train_bn=train_bn, requires_grad=True))
        if params:
            optimizer.add_param_group({"params": params, "lr": group_lr})

    # ------------------------------------------------------------------ what a subclass implements
    def freeze_before_training(self, pl_module: Any) -> None:
        """Freeze what must not train at first."""
        raise NotImplementedError(f"{type(self).__name__} must implement freeze_before_training(pl_module).")

    def finetune_function(self, pl_module: Any, epoch: int, optimizer: Optimizer) -> None:
        """Unfreeze (and add to ``optimizer``) what trains from ``epoch`` on."""
        raise NotImplementedError(f"{type(self).__name__} must implement finetune_function(pl_module, epoch, "
                                  "optimizer).")

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.freeze_before_training(pl_module)

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Before the optimizer state is loaded: give the optimizers back the groups this callback had added."""
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state:
            self.load_state_dict(state)
            self._restore_param_groups(trainer, pl_module)
            self._restored_in_load = True  # the Trainer's load_state_dict call that follows changes nothing more

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._restore_param_groups(trainer, pl_module)

    def _restore_param_groups(self, trainer: Any, pl_module: Any) -> None:
        if not self._restarting:
            return
        self._restarting = False
        named = dict(pl_module.named_parameters())
        restored: set[int] = set()
        for idx, optimizer in enumerate(trainer.optimizers):
            groups = self._internal_optimizer_metadata.get(idx)
            if not groups:
                continue
            missing = sorted({n for g in groups for n in g["params"] if n not in named})
            if missing:
                raise RuntimeError(f"{type(self).__name__}: the checkpoint's param groups name parameters this "
                                   f"module lacks: {missing[:5]}. Resume with the same model.")
            optimizer.param_groups = [{**{k: v for k, v in g.items() if k != "params"},
                                       "params": [named[n] for n in g["params"]]} for g in groups]
            restored.update(id(named[n]) for g in groups for n in g["params"])
        # Unlike Lightning, what was unfrozen trains again after the resume (setup froze it anew).
        for mod in self.flatten_modules(pl_module):
            own = list(mod.parameters(recurse=False))
            if own and all(id(p) in restored for p in own):
                self.make_trainable(mod)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        names = {id(p): n for n, p in pl_module.named_parameters()}
        for idx, optimizer in enumerate(trainer.optimizers):
            before = len(optimizer.param_groups)
            self.finetune_function(pl_module, trainer.current_epoch, optimizer)
            groups = optimizer.param_groups
            stored = self._internal_optimizer_metadata.get(idx)
            if stored is None:
                self._internal_optimizer_metadata[idx] = self._named_groups(groups, names)
            elif len(groups) != before:
                stored.extend(self._named_groups(groups[before:], names))

    @staticmethod
    def _named_groups(groups: list[dict[str, Any]], names: dict[int, str]) -> list[dict[str, Any]]:
        return [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
                for g in groups]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"internal_optimizer_metadata": self._internal_optimizer_metadata}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._restored_in_load:
            self._restored_in_load = False
            return
        self._restarting = True  # on_fit_start gives the optimizers their groups back
        self._internal_optimizer_metadata = dict(state_dict.get("internal_optimizer_metadata", {}))


class BackboneFinetuning(BaseFinetuning):
    """Freeze ``pl_module.backbone`` until ``unfreeze_backbone_at_epoch``, then train it in its own param group whose
    lr starts at ``backbone_initial_lr`` (or ``backbone_initial_ratio_lr`` x the first group's lr) and is multiplied
    by ``lambda_func(epoch + 1)`` each later epoch, capped at the first group's lr when ``should_align``."""

    def __init__(self, unfreeze_backbone_at_epoch: int = 10, lambda_func: Callable[[int], float] = multiplicative,
                 backbone_initial_ratio_lr: float = 10e-2, backbone_initial_lr: float | None = None,
                 should_align: bool = True, initial_denom_lr: float = 10.0, train_bn: bool = True,
                 verbose: bool = False, rounding: int = 12) -> None:
        super().__init__()
        self.unfreeze_backbone_at_epoch = unfreeze_backbone_at_epoch
        self.lambda_func = lambda_func
        self.backbone_initial_ratio_lr = backbone_initial_ratio_lr
        self.backbone_initial_lr = backbone_initial_lr
        self.should_align = should_align
        self.initial_denom_lr = initial_denom_lr
        self.train_bn = train_bn
        self.verbose = verbose
        self.rounding = rounding
        self.previous_backbone_lr: float | None = None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "previous_backbone_lr": self.previous_backbone_lr}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.previous_backbone_lr = state_dict.get("previous_backbone_lr")
        super().load_state_dict(state_dict)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._check_backbone(pl_module)
        super().setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._check_backbone(pl_module)
        super().on_fit_start(trainer, pl_module)

    @staticmethod
    def _check_backbone(pl_module: Any) -> None:
        if not isinstance(getattr(pl_module, "backbone", None), Module):
            raise MisconfigurationException(
                f"BackboneFinetuning needs the LightningModule to have an nn.Module attribute `backbone`; "
                f"{type(pl_module).__name__} has none. Name the part to fine-tune self.backbone, or subclass "
                "BaseFinetuning.")

    def freeze_before_training(self, pl_module: Any) -> None:
        self.freeze(pl_module.backbone)

    def finetune_function(self, pl_module: Any, epoch: int, optimizer: Optimizer) -> None:
        current_lr = optimizer.param_groups[0]["lr"]
        if epoch == self.unfreeze_backbone_at_epoch:
            backbone_lr = self.backbone_initial_lr if self.backbone_initial_lr is not None \
                else current_lr * self.backbone_initial_ratio_lr
            self.previous_backbone_lr = backbone_lr
            self.unfreeze_and_add_param_group(pl_module.backbone, optimizer, backbone_lr, train_bn=self.train_bn,
                                              initial_denom_lr=self.initial_denom_lr)
        elif epoch > self.unfreeze_backbone_at_epoch and self.previous_backbone_lr is not None:
            backbone_lr = self.lambda_func(epoch + 1) * self.previous_backbone_lr
            if self.should_align and backbone_lr > current_lr:
                backbone_lr = current_lr
            optimizer.param_groups[-1]["lr"] = backbone_lr
            self.previous_backbone_lr = backbone_lr
        else:
            return
        if self.verbose:
            log.info("Current lr: %s, Backbone lr: %s", round(current_lr, self.rounding),
                     round(backbone_lr, self.rounding))
