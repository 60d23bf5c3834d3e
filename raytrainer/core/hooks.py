"""Hook dispatch: callbacks first, then the module, in Lightning's order.

Per-batch ("hot") hooks are looked up once per run: only overridden callback and module methods
are called, so an empty hook costs nothing in the training step.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from raytrainer.callbacks.callback import Callback, overrides
from raytrainer.datamodule import LightningDataModule
from raytrainer.module import LightningModule
from raytrainer.profilers import Profiler, profiled
from raytrainer.utilities import log

HOT_HOOKS = ("on_train_batch_start", "on_train_batch_end", "on_before_backward", "on_after_backward",
             "on_before_optimizer_step", "on_before_zero_grad")
MONITORING = ("ModelCheckpoint", "EarlyStopping")
# Module methods a user may override to change how the loop trains; None when not overridden.
MODULE_OVERRIDES = ("backward", "optimizer_zero_grad", "configure_gradient_clipping", "optimizer_step",
                    "lr_scheduler_step")


BATCH_TRANSFER_HOOKS = ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer")


def batch_transfer(module: LightningModule, datamodule: LightningDataModule | None,
                   strategy: Any) -> Callable[[Any, int], Any] | None:
    """``(batch, dataloader_idx) -> batch``: on_before_batch_transfer, transfer_batch_to_device (default: the
    strategy's), on_after_batch_transfer, each the datamodule's when it overrides it, else the module's
    (Lightning's rule).

    None when nothing is overridden and the device is the CPU: the loader's batch is used as it is.
    """
    device = strategy.root_device
    chosen: dict[str, Callable[..., Any]] = {}
    for name in BATCH_TRANSFER_HOOKS:
        module_has = overrides(module, LightningModule, name)
        if datamodule is not None and overrides(datamodule, LightningDataModule, name):
            if module_has:
                log.warning("%s is overridden in both the LightningModule and the LightningDataModule; the "
                            "datamodule's runs, as in Lightning.", name)
            chosen[name] = getattr(datamodule, name)
        elif module_has:
            chosen[name] = getattr(module, name)
    if not chosen and device.type == "cpu":
        return None
    before = chosen.get("on_before_batch_transfer")
    transfer = chosen.get("transfer_batch_to_device")
    after = chosen.get("on_after_batch_transfer")
    start = strategy.start_batch

    def apply(batch: Any, dataloader_idx: int) -> Any:
        start()
        if before is not None:
            batch = before(batch, dataloader_idx)
        batch = transfer(batch, device, dataloader_idx) if transfer is not None else strategy.batch_to_device(batch)
        if after is not None:
            batch = after(batch, dataloader_idx)
        return batch

    return apply


def callback_order(cb: Any) -> tuple[bool, bool]:
    """Sort key: monitoring callbacks after the others, and ModelCheckpoint last of all (as in Lightning), so a
    checkpoint holds the state other callbacks reached in the same hook (e.g. EarlyStopping's wait count)."""
    names = {k.__name__ for k in type(cb).__mro__}
    return bool(names & set(MONITORING)), "ModelCheckpoint" in names


def defines(obj: Any, name: str) -> bool:
    """Whether the user defined ``name`` (not just inherited an empty base hook)."""
    if obj is None:
        return False
    for klass in type(obj).__mro__:
        if klass.__module__.startswith("raytrainer."):
            break
        if name in klass.__dict__:
            return True
    own = getattr(obj, "__dict__", {}).get(name)  # set on the instance (LightningDataModule.from_datasets' loaders)
    if own is None:
        return False
    # ... but a base method that torch.compile wrapped (from_compiled) is still the empty base hook
    inner = getattr(inspect.unwrap(own), "__func__", None)
    return inner is None or not inner.__module__.startswith("raytrainer.")


class Hooks:
    """Calls the hooks of one run: ``trainer`` is what callbacks receive, ``module`` the LightningModule."""

    def __init__(self, trainer: Any, module: LightningModule, callbacks: list[Callback],
                 set_fx: Callable[[str], None], before_monitors: Callable[[], None],
                 profiler: Profiler | None = None) -> None:
        self.trainer, self.module, self.callbacks = trainer, module, callbacks
        self._set_fx = set_fx                  # tells the running Results which hook logs
        self._before_monitors = before_monitors  # publishes what on_train_epoch_end logged, for monitors
        self.hot: dict[str, list[Callable[..., Any]]] = {}           # filled by collect()
        self.module_overrides: dict[str, Callable[..., Any] | None] = {}
        self.profiler = profiler
        if profiler is not None:
            # Only a profiled run pays for recording: its dispatch methods replace the plain ones on this instance.
            self._run_callback = self._profiled_run_callback  # type: ignore[method-assign]
            self._run_module = self._profiled_run_module  # type: ignore[method-assign]

    def collect(self) -> None:
        """Look up the hot hooks and module overrides once (callbacks may change between runs)."""
        model, trainer, profiler = self.module, self.trainer, self.profiler
        if profiler is not None:
            self._collect_profiled(profiler)
            return
        for name in HOT_HOOKS:
            fns: list[Callable[..., Any]] = [functools.partial(getattr(cb, name), trainer, model)
                                             for cb in self.callbacks if overrides(cb, Callback, name)]
            if overrides(model, LightningModule, name):
                fns.append(getattr(model, name))
            self.hot[name] = fns
        self.module_overrides = {name: getattr(model, name) if overrides(model, LightningModule, name) else None
                                 for name in MODULE_OVERRIDES}

    # ------------------------------------------------------------------ profiled dispatch (Trainer(profiler=...))
    def _callback_fn(self, cb: Callback, name: str) -> Callable[..., Any]:
        """A callback's hook, recorded as ``[Callback]<state_key>.<hook>`` (Lightning's action name)."""
        return profiled(self.profiler, f"[Callback]{cb.state_key}.{name}",
                        functools.partial(getattr(cb, name), self.trainer, self.module))

    def _module_fn(self, name: str) -> Callable[..., Any]:
        """A module hook, recorded as ``[LightningModule]<class>.<hook>``."""
        return profiled(self.profiler, f"[LightningModule]{type(self.module).__name__}.{name}",
                        getattr(self.module, name))

    def _collect_profiled(self, profiler: Profiler) -> None:
        """As collect, but every callback and the module are called (as Lightning does when profiling, so each
        hook shows in the report), each recorded under its action name."""
        model = self.module
        for name in HOT_HOOKS:
            self.hot[name] = [self._callback_fn(cb, name) for cb in self.callbacks] + [self._module_fn(name)]
        self.module_overrides = {name: self._module_fn(name) if overrides(model, LightningModule, name) else None
                                 for name in MODULE_OVERRIDES}
        # the module's optimizer_zero_grad and configure_gradient_clipping do what the loop does without an
        # override; call them so they are recorded, as in Lightning's report
        for name in ("optimizer_zero_grad", "configure_gradient_clipping"):
            self.module_overrides[name] = self._module_fn(name)

    def _run_callback(self, cb: Callback, name: str, *args: Any) -> Any:
        return getattr(cb, name)(self.trainer, self.module, *args)

    def _run_module(self, name: str, *args: Any) -> Any:
        return getattr(self.module, name)(*args)

    def _profiled_run_callback(self, cb: Callback, name: str, *args: Any) -> Any:
        return self._callback_fn(cb, name)(*args)

    def _profiled_run_module(self, name: str, *args: Any) -> Any:
        return self._module_fn(name)(*args)

    def callbacks_only(self, name: str, *args: Any) -> None:
        """A hook only callbacks have (setup, teardown, on_sanity_check_start, ...)."""
        for cb in self.callbacks:
            self._run_callback(cb, name, *args)

    def call(self, name: str, *args: Any, monitoring_last: bool = False) -> Any:
        """Callbacks first, then the module (monitoring callbacks after the module when asked)."""
        self._set_fx(name)
        late = []
        for cb in self.callbacks:
            if monitoring_last and type(cb).__name__ in MONITORING:
                late.append(cb)
                continue
            self._run_callback(cb, name, *args)
        out = self._run_module(name, *args) if hasattr(self.module, name) else None
        if late and name == "on_train_epoch_end":
            self._before_monitors()
        for cb in late:
            self._run_callback(cb, name, *args)
        return out

    def on_exception(self, exc: BaseException) -> None:
        for cb in self.callbacks:
            if overrides(cb, Callback, "on_exception"):
                cb.on_exception(self.trainer, self.module, exc)
