"""A JWT's times (RFC 7519 §2, "NumericDate"; §4.1.4 ``exp``, §4.1.5 ``nbf``, §4.1.6 ``iat``):
a JSON number of seconds since the epoch, the one reading of them for every token bastion takes.

Python reads ``true`` and ``false`` as numbers (a bool is an int: ``nbf: true`` would be 1970)
and joserfc's reader takes ``NaN`` and ``Infinity``, which are not JSON: NaN is neither before
nor after any time, so a token whose ``exp`` or ``nbf`` is NaN would never expire and always be
valid. None of them is a time."""

from __future__ import annotations

import math


def numeric_date(value: object) -> float | None:
    """The time `value` gives in seconds, or None when it is not a NumericDate (missing, not a
    number, a boolean, or not finite): each caller refuses that in its own protocol's words."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value if math.isfinite(value) else None
