"""How much raytrainer prints: ``RAYTRAINER_LOG`` (debug, info, warning, error; default info) sets the level of the
``raytrainer`` logger, and the filters here drop library messages that do not concern the user, narrowly (one
logger, one message) and only around the raytrainer call that triggers them. ``RAYTRAINER_LOG=debug`` shows all."""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterable, Iterator

LOG_ENV = "RAYTRAINER_LOG"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

log = logging.getLogger("raytrainer")
if not log.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("[raytrainer] %(message)s"))
    log.addHandler(_handler)
    log.propagate = False


def log_level() -> int:
    """The level ``RAYTRAINER_LOG`` asks for: INFO when unset or unknown (an unknown value is named once, at import)."""
    return LEVELS.get(os.environ.get(LOG_ENV, "").strip().lower(), logging.INFO)


def debug_enabled() -> bool:
    """Whether ``RAYTRAINER_LOG=debug``: then nothing is filtered."""
    return log_level() <= logging.DEBUG


def apply_log_level() -> None:
    """Set the ``raytrainer`` logger to ``RAYTRAINER_LOG`` (at import, and on each Ray rank per call)."""
    log.setLevel(log_level())


class _DropMessages(logging.Filter):
    """Drops records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


@contextlib.contextmanager
def without_log_messages(logger: str, *prefixes: str) -> Iterator[None]:
    """While the block runs, drop the records of logger ``logger`` (that exact one) starting with ``prefixes``."""
    if debug_enabled():
        yield
        return
    target, drop = logging.getLogger(logger), _DropMessages(prefixes)
    target.addFilter(drop)
    try:
        yield
    finally:
        target.removeFilter(drop)


@contextlib.contextmanager
def quiet_loggers(names: Iterable[str], level: int = logging.WARNING) -> Iterator[None]:
    """While the block runs, the loggers ``names`` (a library's chatty modules) log only at ``level`` and above."""
    if debug_enabled():
        yield
        return
    loggers = [logging.getLogger(name) for name in names]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(level, lg.getEffectiveLevel()))
    try:
        yield
    finally:
        for lg, old in zip(loggers, before):
            lg.setLevel(old)


@contextlib.contextmanager
def without_warnings(*filters: tuple[str, type[Warning]]) -> Iterator[None]:
    """While the block runs, ignore the warnings given as (message regex, category) pairs, and only those."""
    with warnings.catch_warnings():
        if not debug_enabled():
            for message, category in filters:
                warnings.filterwarnings("ignore", message=message, category=category)
        yield


if os.environ.get(LOG_ENV) or log.level == logging.NOTSET:  # a level the program set before importing us stays
    apply_log_level()
if os.environ.get(LOG_ENV, "").strip().lower() not in ("", *LEVELS):
    log.warning("%s=%r is not a level; using info. Use one of %s (debug also shows what raytrainer and Ray print "
                "about their own machinery).", LOG_ENV, os.environ[LOG_ENV], ", ".join(LEVELS))
