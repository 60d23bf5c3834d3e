"""ModelPruning: prune the module's weights with torch.nn.utils.prune at epoch ends (Lightning's callback)."""
from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

from raytrainer.callbacks.callback import Callback
from raytrainer.module import LightningModule
from raytrainer.utilities import log
from raytrainer.utilities.exceptions import MisconfigurationException

_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "ln_structured": torch_prune.ln_structured, "l1_unstructured": torch_prune.l1_unstructured,
    "random_structured": torch_prune.random_structured, "random_unstructured": torch_prune.random_unstructured}
_METHODS: dict[str, type[torch_prune.BasePruningMethod]] = {
    "ln_structured": torch_prune.LnStructured, "l1_unstructured": torch_prune.L1Unstructured,
    "random_structured": torch_prune.RandomStructured, "random_unstructured": torch_prune.RandomUnstructured}
_CONTAINERS = (LightningModule, nn.Sequential, nn.ModuleList, nn.ModuleDict)
ParamList = Sequence[tuple[nn.Module, str]]


def _is_method_class(obj: Any) -> bool:
    return inspect.isclass(obj) and issubclass(obj, torch_prune.BasePruningMethod)


class ModelPruning(Callback):
    """Prunes ``amount`` of the chosen parameters (all weights and biases by default) at the end of every training
    epoch (or validation epoch), optionally resetting the survivors to their initial values (lottery ticket);
    checkpoints and the trained module hold the pruned weights as plain tensors."""

    PARAMETER_NAMES = ("weight", "bias")

    def __init__(self, pruning_fn: Callable[..., Any] | str = "l1_unstructured",
                 parameters_to_prune: ParamList | None = None, parameter_names: list[str] | None = None,
                 use_global_unstructured: bool = True, amount: int | float | Callable[[int], int | float] = 0.5,
                 apply_pruning: bool | Callable[[int], bool] = True, make_pruning_permanent: bool = True,
                 use_lottery_ticket_hypothesis: bool | Callable[[int], bool] = True,
                 resample_parameters: bool = False, pruning_dim: int | None = None,
                 pruning_norm: int | None = None, verbose: int = 0, prune_on_train_epoch_end: bool = True) -> None:
        self._use_global_unstructured = use_global_unstructured
        self._parameters_to_prune: ParamList = list(parameters_to_prune or ())
        self._use_lottery_ticket_hypothesis = use_lottery_ticket_hypothesis
        self._resample_parameters = resample_parameters
        self._prune_on_train_epoch_end = prune_on_train_epoch_end
        self._parameter_names = list(parameter_names or self.PARAMETER_NAMES)
        self._global_kwargs: dict[str, Any] = {}
        self._original_layers: dict[int, tuple[nn.Module, list[tuple[int, str]]]] | None = None
        self._method_name: str | None = None
        for name in self._parameter_names:
            if name not in self.PARAMETER_NAMES:
                raise MisconfigurationException(f"ModelPruning(parameter_names=[{name!r}, ...]): only "
                                                f"{list(self.PARAMETER_NAMES)} can be pruned.")
        if isinstance(pruning_fn, str):
            pruning_fn = self._named_fn(pruning_fn.lower(), pruning_dim, pruning_norm)
        elif _is_method_class(pruning_fn):
            if not use_global_unstructured:
                raise MisconfigurationException("ModelPruning: a BasePruningMethod class works only with "
                                                "use_global_unstructured=True; pass a name such as "
                                                "'l1_unstructured' for per-layer pruning.")
        else:
            raise MisconfigurationException(f"ModelPruning(pruning_fn={pruning_fn!r}): give one of {list(_FUNCTIONS)} "
                                            "or a torch.nn.utils.prune.BasePruningMethod subclass (the class, not "
                                            "an instance).")
        if use_global_unstructured and getattr(pruning_fn, "PRUNING_TYPE", None) != "unstructured":
            raise MisconfigurationException(f"ModelPruning: use_global_unstructured=True needs an unstructured method; "
                                            f"{getattr(pruning_fn, '__name__', pruning_fn)} is "
                                            f"{getattr(pruning_fn, 'PRUNING_TYPE', 'unknown')}. Set "
                                            "use_global_unstructured=False for structured pruning.")
        self.pruning_fn = pruning_fn
        self._apply_pruning = apply_pruning
        self._make_pruning_permanent = make_pruning_permanent
        if isinstance(amount, bool) or not (isinstance(amount, (int, float)) or callable(amount)):
            raise MisconfigurationException(f"ModelPruning(amount={amount!r}): give a float fraction, an int count, "
                                            "or a function epoch -> amount.")
        self.amount = amount
        if verbose not in (0, 1, 2):
            raise MisconfigurationException(f"ModelPruning(verbose={verbose!r}): use 0, 1 or 2.")
        self._verbose = verbose

    def _named_fn(self, name: str, dim: int | None, norm: int | None) -> Any:
        """The torch pruning method class (global) or function (per layer) that ``name`` names."""
        if name not in _FUNCTIONS:
            raise MisconfigurationException(f"ModelPruning(pruning_fn={name!r}): torch has {list(_FUNCTIONS)}.")
        kwargs: dict[str, Any] = {}
        if name.endswith("_structured"):
            if dim is None:
                raise MisconfigurationException(f"ModelPruning(pruning_fn={name!r}) needs pruning_dim (the dimension "
                                                "whose slices are pruned).")
            if name == "ln_structured":
                if norm is None:
                    raise MisconfigurationException("ModelPruning(pruning_fn='ln_structured') needs pruning_norm "
                                                    "(e.g. 1 or 2).")
                kwargs["n"] = norm
            kwargs["dim"] = dim
        if self._use_global_unstructured:
            self._global_kwargs = kwargs
            self._method_name = _METHODS[name].__name__
            return _METHODS[name]
        self._method_name = _FUNCTIONS[name].__name__
        return functools.partial(_FUNCTIONS[name], **kwargs)

    def filter_parameters_to_prune(self, parameters_to_prune: ParamList = ()) -> ParamList:
        """Override to narrow the (module, name) pairs chosen at setup."""
        return parameters_to_prune

    @staticmethod
    def sanitize_parameters_to_prune(pl_module: nn.Module, parameters_to_prune: ParamList = (),
                                     parameter_names: Sequence[str] = ()) -> ParamList:
        """The (module, name) pairs to prune: the given ones, checked against the module, or every leaf layer's
        parameters named in ``parameter_names``."""
        names = list(parameter_names or ModelPruning.PARAMETER_NAMES)
        leaves = [m for m in pl_module.modules() if not isinstance(m, _CONTAINERS)]
        if not parameters_to_prune:
            return [(m, n) for n in names for m in leaves if isinstance(getattr(m, n, None), nn.Parameter)]
        if not all(isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[0], nn.Module)
                   and isinstance(p[1], str) for p in parameters_to_prune):
            raise MisconfigurationException("ModelPruning(parameters_to_prune=...) must be a list of "
                                            "(nn.Module, parameter_name) pairs, or None for every layer.")
        ids = {id(m) for m in leaves}
        missing_modules = [m for m, _ in parameters_to_prune if id(m) not in ids]
        missing_names = [n for m, n in parameters_to_prune if id(m) in ids and not hasattr(m, n)]
        if missing_modules or missing_names:
            raise MisconfigurationException(f"ModelPruning: parameters_to_prune names what the model lacks: modules "
                                            f"{missing_modules}, parameters {missing_names}. Pass layers of the "
                                            "module being trained (on Ray, use parameters_to_prune=None or "
                                            "filter_parameters_to_prune, since ranks hold copies).")
        return list(parameters_to_prune)

    # ------------------------------------------------------------------ pruning
    @staticmethod
    def _pruned_stats(module: nn.Module, name: str) -> tuple[int, int]:
        mask = getattr(module, f"{name}_mask", None)
        return (0, 1) if mask is None else (int((mask == 0).sum().item()), mask.numel())

    def apply_pruning(self, amount: int | float) -> None:
        """Prune ``amount`` now (globally over all chosen parameters, or per parameter)."""
        before = [self._pruned_stats(m, n) for m, n in self._parameters_to_prune] if self._verbose else []
        if self._use_global_unstructured:
            self._global_kwargs["amount"] = amount
            accepted = set(inspect.signature(self.pruning_fn).parameters) - {"self"}
            torch_prune.global_unstructured(self._parameters_to_prune, pruning_method=self.pruning_fn,
                                            **{k: v for k, v in self._global_kwargs.items() if k in accepted})
        else:
            for module, name in self._parameters_to_prune:
                self.pruning_fn(module, name=name, amount=amount)
        if self._verbose:
            self._log_stats(before, [self._pruned_stats(m, n) for m, n in self._parameters_to_prune], amount)

    def _log_stats(self, before: list[tuple[int, int]], after: list[tuple[int, int]], amount: int | float) -> None:
        total = sum(t for _, t in after)
        was, now = sum(z for z, _ in before), sum(z for z, _ in after)
        log.info("ModelPruning (%s): %d/%d zeros (%.2f%%) -> %d/%d (%.2f%%)", self._method_name, was, total,
                 100 * was / total, now, total, 100 * now / total)
        if self._verbose == 2:
            for (module, name), (z0, t0), (z1, t1) in zip(self._parameters_to_prune, before, after):
                log.info("  %r.%s (amount=%s): %.2f%% -> %.2f%% zeros", module, name, amount, 100 * z0 / t0,
                         100 * z1 / t1)

    def apply_lottery_ticket_hypothesis(self) -> None:
        """Put the weights that survived pruning back to their values at setup (or freshly drawn ones with
        ``resample_parameters=True``)."""
        assert self._original_layers is not None
        for original, names in self._original_layers.values():
            source = original
            if self._resample_parameters and callable(getattr(original, "reset_parameters", None)):
                source = copy.deepcopy(original)
                source.reset_parameters()
            for i, name in names:
                target = self._parameters_to_prune[i][0]
                dst = getattr(target, name + "_orig", None)
                if dst is None:
                    dst = getattr(target, name)
                src = getattr(source, name)
                if isinstance(dst, torch.Tensor) and isinstance(src, torch.Tensor):
                    dst.data = src.data.to(dst.device)

    def make_pruning_permanent(self, module: nn.Module) -> None:
        """Fold every pruning mask into its parameter and remove the pruning hooks."""
        for sub in module.modules():
            for key, hook in list(sub._forward_pre_hooks.items()):
                if isinstance(hook, torch_prune.BasePruningMethod):
                    hook.remove(sub)
                    del sub._forward_pre_hooks[key]

    def _run_pruning(self, epoch: int) -> None:
        prune = self._apply_pruning(epoch) if callable(self._apply_pruning) else self._apply_pruning
        amount = self.amount(epoch) if callable(self.amount) else self.amount
        if not prune or not amount:
            return
        self.apply_pruning(amount)
        lottery = self._use_lottery_ticket_hypothesis
        if lottery(epoch) if callable(lottery) else lottery:
            self.apply_lottery_ticket_hypothesis()

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        chosen = self.sanitize_parameters_to_prune(pl_module, self._parameters_to_prune, self._parameter_names)
        self._parameters_to_prune = self.filter_parameters_to_prune(chosen)
        if self._use_lottery_ticket_hypothesis:
            self._original_layers = {}
            for i, (module, name) in enumerate(self._parameters_to_prune):
                entry = self._original_layers.setdefault(id(module), (copy.deepcopy(module), []))
                entry[1].append((i, name))

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._prune_on_train_epoch_end:
            self._run_pruning(pl_module.current_epoch)

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking and not self._prune_on_train_epoch_end:
            self._run_pruning(pl_module.current_epoch)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._make_pruning_permanent:
            self.make_pruning_permanent(pl_module)

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        if not self._make_pruning_permanent:
            return
        state = dict(pl_module.state_dict())
        for base in {k[:-len("_mask")] for k in state if k.endswith("_mask")}:
            orig, mask = state.pop(base + "_orig"), state.pop(base + "_mask")
            state[base] = mask.to(dtype=orig.dtype) * orig
        checkpoint["state_dict"] = {k: v.cpu() for k, v in state.items()}
