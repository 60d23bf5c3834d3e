"""LambdaCallback: a callback made of plain functions, one per hook, for quick experiments."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from raytrainer.callbacks.callback import Callback
from raytrainer.utilities import closest

_NOT_HOOKS = {"state_key", "state_dict", "load_state_dict"}


def hook_names() -> list[str]:
    """Every hook a Callback can override (setup, teardown and the on_* hooks)."""
    return sorted(name for name, value in vars(Callback).items()
                  if callable(value) and not name.startswith("_") and name not in _NOT_HOOKS)


class LambdaCallback(Callback):
    """``LambdaCallback(on_train_epoch_end=lambda trainer, pl_module: ...)``: each keyword names a hook and gives the
    function called for it, with the hook's arguments."""

    def __init__(self, **hooks: Callable[..., Any] | None) -> None:
        known = hook_names()
        for name, fn in hooks.items():
            if name not in known:
                hint = closest(name, known)
                raise TypeError(f"LambdaCallback got an unknown hook {name!r}"
                                + (f"; did you mean {hint!r}?" if hint else ".")
                                + f" Hooks it accepts: {', '.join(known)}.")
            if fn is None:
                continue
            if not callable(fn):
                raise TypeError(f"LambdaCallback({name}=...) must be a function taking the hook's arguments "
                                f"(trainer, pl_module, ...); got {type(fn).__name__}.")
            setattr(self, name, fn)
