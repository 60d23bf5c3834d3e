"""Exceptions that Lightning code catches by name, raised where Lightning raises them."""
from __future__ import annotations


class MisconfigurationException(ValueError, TypeError):
    """A Trainer, module or callback was configured in a way that cannot run.

    Lightning users catch it by this name; it is also a ValueError and a TypeError, the types raytrainer
    raised for the same mistakes before, so ``except ValueError`` / ``except TypeError`` code keeps working."""


class MisconfigurationRuntimeError(MisconfigurationException, RuntimeError):
    """A MisconfigurationException where raytrainer raised RuntimeError before (logging from a hook that cannot log,
    a monitored metric that was never logged), so ``except RuntimeError`` code keeps working as well."""
