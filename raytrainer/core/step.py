"""One training step: automatic optimization (closure, backward, clipping, optimizer and scheduler steps)
and the LightningOptimizer that manual optimization steps through. Reads only the RankSession.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from raytrainer.utilities import clip_gradients, log

if TYPE_CHECKING:
    from raytrainer.core.session import RankSession


class StepError(RuntimeError):
    """A user step returned something the loop cannot use; the message names epoch and batch."""


# ----------------------------------------------------------------------------- backward / zero_grad
def backward(session: RankSession, loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> None:
    """on_before_backward, the (module's or precision's) backward, on_after_backward."""
    for fn in session.hooks.hot["on_before_backward"]:
        fn(loss)
    if optimizer is None and session.strategy.wraps_model:  # manual_backward under DDP
        session.strategy.pre_backward(loss)
    module_backward = session.hooks.module_overrides["backward"]
    if module_backward is not None:
        module_backward(loss, *args, **kwargs)
    else:
        session.precision.backward(loss, *args, **kwargs)
    for fn in session.hooks.hot["on_after_backward"]:
        fn()


def zero_grad(session: RankSession, optimizer: torch.optim.Optimizer, epoch: int, batch_idx: int) -> None:
    for fn in session.hooks.hot["on_before_zero_grad"]:
        fn(optimizer)
    module_zero_grad = session.hooks.module_overrides["optimizer_zero_grad"]
    if module_zero_grad is not None:
        module_zero_grad(epoch, batch_idx, optimizer)
    else:
        optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- optimizer step
def after_closure(session: RankSession, optimizer: torch.optim.Optimizer) -> None:
    """Between backward and the optimizer step: unscale, on_before_optimizer_step, gradient clipping."""
    session.precision.unscale_gradients(optimizer)
    for fn in session.hooks.hot["on_before_optimizer_step"]:
        fn(optimizer)
    config = session.config
    module_clip = session.hooks.module_overrides["configure_gradient_clipping"]
    if module_clip is not None:
        module_clip(optimizer, config.gradient_clip_val, config.gradient_clip_algorithm)
    elif config.gradient_clip_val:
        clip_gradients(optimizer, config.gradient_clip_val, config.gradient_clip_algorithm, session.precision)


def optimizer_step(session: RankSession, optimizer: torch.optim.Optimizer,
                   closure: Callable[[], Any] | None) -> None:
    """Automatic optimization: unscale, on_before_optimizer_step, clipping, step, counters, schedulers.

    With a closure (LBFGS, or a module that overrides ``optimizer_step``) the hooks and clipping run
    after each closure evaluation, as Lightning's precision plugin does.
    """
    step_closure: Callable[[], Any] | None
    if closure is None:
        after_closure(session, optimizer)
        step_closure = None
    else:
        def step_closure() -> Any:
            loss = closure()
            after_closure(session, optimizer)
            return loss
    state = session.state
    module_step = session.hooks.module_overrides["optimizer_step"]
    if module_step is not None:
        module_step(state.current_epoch, state.batch_idx, AutomaticStepOptimizer(optimizer, session), step_closure)
    else:
        session.precision.optimizer_step(optimizer, step_closure)
    state.global_step += 1  # as Lightning: counts optimizer_step calls, even an override that skips the step
    state.batches_that_stepped += 1
    state.stepped_since_log = True
    if session.lr_scheduler_configs:
        step_schedulers(session, "step", plateau=False)


def step_schedulers(session: RankSession, interval: str, plateau: bool | None = None) -> None:
    """Step the schedulers of ``interval``; plateau=True/False picks only (non-)ReduceLROnPlateau ones."""
    if not session.lr_scheduler_configs or not session.module.automatic_optimization:
        return
    state = session.state
    module_step = session.hooks.module_overrides["lr_scheduler_step"]
    for cfg in session.lr_scheduler_configs:
        if cfg.interval != interval or (plateau is not None and bool(cfg.reduce_on_plateau) != plateau):
            continue
        # as Lightning: step intervals count this epoch's batches (batch_idx + 1), not global_step
        idx = state.batch_idx + 1 if interval == "step" else state.current_epoch + 1
        if idx % cfg.frequency != 0:
            continue
        if cfg.reduce_on_plateau:
            metrics = session.callback_metrics
            if cfg.monitor not in metrics:
                if cfg.strict:
                    raise RuntimeError(
                        f"ReduceLROnPlateau monitors {cfg.monitor!r}, which was not logged at epoch "
                        f"{state.current_epoch}. Logged: {sorted(metrics)}. Log it with self.log or set "
                        "'strict': False in the lr_scheduler dict.")
                log.warning("ReduceLROnPlateau: %r not found; scheduler not stepped (strict=False).", cfg.monitor)
                continue
            if module_step is not None:
                module_step(cfg.scheduler, metrics[cfg.monitor])
            else:
                cfg.scheduler.step(float(metrics[cfg.monitor]))
        elif module_step is not None:
            module_step(cfg.scheduler, None)
        else:
            cfg.scheduler.step()


# ----------------------------------------------------------------------------- the automatic step
def automatic_step(session: RankSession, step_fn: Any, batch: Any, batch_idx: int, epoch: int,
                   window_end: bool, accumulate: int, detect: bool) -> Any:
    """training_step -> backward -> (on window end) hooks, clipping, optimizer step, schedulers."""
    optimizer = session.optimizers[0]
    first_in_window = batch_idx % accumulate == 0
    closure_used = session.closure_optimizer

    def run_step() -> Any:
        with session.strategy.no_backward_sync(not window_end):
            with session.precision.forward_context():
                out = step_fn(batch, batch_idx)
            loss = training_loss(out, epoch, batch_idx, detect)
            # As in Lightning: gradients are cleared at a window's first batch even when the step returned
            # None, so the optimizer step that still follows at the window's end never reuses stale gradients.
            if first_in_window and not closure_used:
                zero_grad(session, optimizer, epoch, batch_idx)
            if loss is not None:
                backward(session, loss / accumulate if accumulate > 1 else loss, optimizer)
        return out, loss

    if window_end and (closure_used or session.hooks.module_overrides["optimizer_step"] is not None):
        # Optimizers like LBFGS re-evaluate the loss, and an overridden optimizer_step decides when the step
        # runs: hand them a closure that runs the whole step.
        box: list[Any] = []

        def closure() -> Any:
            if closure_used:
                zero_grad(session, optimizer, epoch, batch_idx)
            out, loss = run_step()
            box.append(out)
            return loss

        optimizer_step(session, optimizer, closure)
        return step_output(box[-1] if box else None)

    out, _ = run_step()
    if window_end:
        # Lightning steps (and counts the step) at every window end, also when training_step returned None.
        optimizer_step(session, optimizer, None)
    return step_output(out)


def step_output(out: Any) -> Any:
    """training_step's output as on_train_batch_end receives it (the loss detached)."""
    if out is None:
        return {}
    if isinstance(out, torch.Tensor):
        return {"loss": out.detach()}
    if isinstance(out, dict) and isinstance(out.get("loss"), torch.Tensor):
        return {**out, "loss": out["loss"].detach()}
    return out


def training_loss(out: Any, epoch: int, batch_idx: int, detect: bool) -> torch.Tensor | None:
    """The loss in training_step's output, checked (scalar, connected to the graph, finite with detect)."""
    if out is None:
        return None
    if isinstance(out, torch.Tensor):
        loss = out
    elif isinstance(out, dict):
        if "loss" not in out:
            raise StepError(f"training_step returned a dict without a 'loss' key (keys: {sorted(out)}) at epoch "
                            f"{epoch}, batch {batch_idx}. Return {{'loss': loss, ...}}, a loss tensor, or None "
                            "to skip the batch.")
        loss = out["loss"]
        if loss is None:
            return None
    else:
        raise StepError(f"training_step returned {type(out).__name__} at epoch {epoch}, batch {batch_idx}. "
                        "Return a scalar loss tensor, a dict with 'loss', or None to skip the batch.")
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0 and loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise StepError(f"training_step must return a scalar loss, got {shape} at epoch {epoch}, batch "
                        f"{batch_idx}. Reduce it first, e.g. loss.mean().")
    if not loss.requires_grad:
        raise StepError(f"the loss returned by training_step at epoch {epoch}, batch {batch_idx} does not "
                        "require grad: it is not connected to any trainable parameter (was it computed under "
                        "torch.no_grad() or from detached tensors?).")
    if detect and not bool(torch.isfinite(loss).all()):
        raise StepError(f"the loss is {loss.item()} at epoch {epoch}, batch {batch_idx} "
                        "(detect_anomaly=True). Lower the learning rate, check the inputs for NaN/inf, "
                        "or use gradient clipping.")
    return loss


def manual_outputs(out: Any, epoch: int, batch_idx: int, detect: bool) -> Any:
    """Manual optimization: training_step's output, checked for non-finite values with detect_anomaly."""
    if detect and isinstance(out, torch.Tensor) and not bool(torch.isfinite(out).all()):
        raise StepError(f"training_step returned a non-finite value at epoch {epoch}, batch {batch_idx} "
                        "(detect_anomaly=True).")
    return step_output(out)


# ----------------------------------------------------------------------------- optimizers users see
class LightningOptimizer:
    """Wraps a torch optimizer for manual optimization: precision-aware step, step counting."""

    def __init__(self, optimizer: torch.optim.Optimizer, session: RankSession) -> None:
        self._optimizer = optimizer
        self._session = session
        self._on_before_step: Callable[[], None] = lambda: None
        self._on_after_step: Callable[[], None] = lambda: None

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self._optimizer.param_groups

    @property
    def state(self) -> Any:
        return self._optimizer.state

    def state_dict(self) -> dict[str, Any]:
        return self._optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._optimizer.load_state_dict(state)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        """Precision/strategy-aware step; counts one global_step, as Lightning does.

        The closure (usually forward + ``manual_backward``) runs first, then gradients are unscaled
        (16-mixed) and ``on_before_optimizer_step`` runs, so the hook sees real-sized gradients.
        """
        if closure is not None and not callable(closure):
            raise TypeError(f"optimizer.step(closure=...) needs a callable closure, got {type(closure).__name__}.")
        if kwargs:
            raise TypeError(f"optimizer.step() got extra arguments {sorted(kwargs)}; raytrainer passes only "
                            "`closure` to the optimizer. Set such options on the optimizer's param_groups instead.")
        session = self._session
        optimizer = self._optimizer

        def closure_then_hook() -> Any:
            out = closure() if closure is not None else None
            session.precision.unscale_gradients(optimizer)
            for fn in session.hooks.hot.get("on_before_optimizer_step", ()):
                fn(optimizer)
            return out

        self._on_before_step()
        out = session.precision.optimizer_step(optimizer, closure_then_hook)
        self._on_after_step()
        session.state.global_step += 1
        return out

    def __getattr__(self, name: str) -> Any:
        # Everything else (defaults, add_param_group, ...) is the wrapped optimizer's, as in Lightning.
        if name == "_optimizer":
            raise AttributeError(name)
        return getattr(self._optimizer, name)

    def __repr__(self) -> str:
        return f"LightningOptimizer({self._optimizer!r})"


class AutomaticStepOptimizer(LightningOptimizer):
    """What an overridden ``LightningModule.optimizer_step`` receives under automatic optimization.

    ``step(closure=optimizer_closure)`` runs training_step, backward and the pre-step hooks inside the
    closure (the loop built it), then the precision-aware step. The loop counts the global step.
    """

    def step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        return self._session.precision.optimizer_step(self._optimizer, closure)
