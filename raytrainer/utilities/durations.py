"""Durations as Lightning takes them (max_time, val_check_interval, Timer): 'DD:HH:MM:SS', a timedelta or a dict."""
from __future__ import annotations

from datetime import timedelta
from typing import Any

from raytrainer.utilities.exceptions import MisconfigurationException


def parse_duration(name: str, value: Any) -> float | None:
    """Seconds of ``value``: a 'DD:HH:MM:SS' string, a datetime.timedelta or a dict of timedelta arguments (None
    stays None); anything else is a MisconfigurationException that names ``name`` and the accepted forms."""
    if value is None:
        return None
    usage = f"{name}={value!r}: use 'DD:HH:MM:SS', a timedelta or a dict of timedelta arguments like {{'hours': 1}}."
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, dict):
        try:
            return timedelta(**value).total_seconds()
        except TypeError as err:
            raise MisconfigurationException(f"{usage} ({err})") from None
    if isinstance(value, str):
        parts = value.strip().split(":")
        if len(parts) != 4 or not all(p.isdigit() for p in parts):
            raise MisconfigurationException(usage)
        d, h, m, s = map(int, parts)
        return timedelta(days=d, hours=h, minutes=m, seconds=s).total_seconds()
    raise MisconfigurationException(usage)
