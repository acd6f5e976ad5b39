"""Polar's built-in constants (``@current_unix_time``), evaluated when a question is asked.

A constant is read like a context field (the parser makes ``@name`` the context path
``("@name",)``), so the request's ``context.time``, when given, is the time it reads: a test or
a replayed decision sees the time it was asked at, not the time it is evaluated.
"""

from __future__ import annotations

import math
import time
from datetime import datetime
from typing import Any

from bastion.policy.builtins.time_window import MAX_TIME_CHARS

CONSTANTS = frozenset({"current_unix_time"})


def current_unix_time(context: dict | None) -> Any:
    """Seconds since 1970-01-01T00:00:00Z, as an Integer: of ``context.time`` when the request
    gives one (ISO 8601 text, epoch seconds or a datetime), else of now. None (so every
    condition on it is false) for a ``context.time`` that is not a time."""
    given = context.get("time") if isinstance(context, dict) else None
    if given is None:
        return math.floor(time.time())
    if isinstance(given, datetime):
        return math.floor(given.timestamp()) if given.tzinfo is not None else None
    if isinstance(given, (int, float)) and not isinstance(given, bool):
        return math.floor(given) if math.isfinite(given) else None
    if isinstance(given, str) and len(given) <= MAX_TIME_CHARS:
        try:
            parsed = datetime.fromisoformat(given.replace("Z", "+00:00"))
        except ValueError:
            return None
        return math.floor(parsed.timestamp()) if parsed.tzinfo is not None else None
    return None


def constant_value(name: str, context: dict | None) -> Any:
    """The value of ``@name`` for a request with ``context``."""
    if name == "@current_unix_time":
        return current_unix_time(context)
    return None
