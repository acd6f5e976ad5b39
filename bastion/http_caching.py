"""How long an answer from another party may be reused, as its headers say (RFC 9111 §4.2.1:
``Cache-Control`` max-age, else ``Expires`` less ``Date``; §4.2.3: less its ``Age``), and the
bounds bastion keeps every remote document within whatever they say (`kept_seconds`).

Read for the documents bastion fetches and keeps: client ID metadata documents, key sets. The
headers are the document host's choice: a lifetime is never longer than the operator's
``cache_seconds`` nor shorter than a least time, so ``no-store`` cannot turn every request into
a fetch. Whatever cannot be read is stale (the least time), never the longer configured one.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime

import httpx

# RFC 9111 §1.2.2: a delta-seconds (max-age, Age) past 2^31 is read as 2^31. A longer run of
# digits is not handed to int() at all (Python refuses past 4,300 of them, with a ValueError).
MAX_DELTA_SECONDS = 2**31
_DIGITS = len(str(MAX_DELTA_SECONDS))


def _delta_seconds(value: str) -> int | None:
    """A delta-seconds (§1.2.2; a quoted one too, §5.2), or None when ``value`` is none."""
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    if not value or not value.isascii() or not value.isdigit():
        return None
    return MAX_DELTA_SECONDS if len(value) > _DIGITS else min(int(value), MAX_DELTA_SECONDS)


def _directives(headers: httpx.Headers) -> list[tuple[str, str | None]]:
    """The ``Cache-Control`` directives of every field line, names lowercased (§5.2)."""
    found = []
    for item in headers.get_list("cache-control", split_commas=True):
        name, equals, argument = item.strip().partition("=")
        if name:
            found.append((name.strip().lower(), argument if equals else None))
    return found


def freshness_lifetime(headers: httpx.Headers | Mapping[str, str], now: float) -> float | None:
    """The seconds from ``now`` an answer with ``headers`` may be reused (0: not at all), or
    None when its headers say nothing of it. ``no-store`` and ``no-cache`` are 0 (bastion does
    not revalidate: a document is fetched whole again); of several max-ages or an unreadable
    one, the shortest, an unreadable one being 0; ``s-maxage`` is for shared caches, not read;
    an ``Expires`` that is no date, or given twice, is in the past (§5.3)."""
    headers = httpx.Headers(headers)
    directives = _directives(headers)
    if any(name in ("no-store", "no-cache") for name, _ in directives):
        return 0
    ages = [_delta_seconds(arg or "") for name, arg in directives if name == "max-age"]
    if ages:
        lifetime: float = min(0 if age is None else age for age in ages)
    else:
        expires = headers.get_list("expires")
        if not expires:
            return None
        start = _date(headers.get_list("date")) or now
        end = _date(expires) if len(expires) == 1 else None
        lifetime = 0 if end is None else end - start
    age = _delta_seconds(headers.get("age", ""))
    return max(0.0, lifetime - (age or 0))


def _date(values: list[str]) -> float | None:
    """The one HTTP-date among ``values`` (§5.6.7 of RFC 9110), as a POSIX time, or None."""
    if len(values) != 1:
        return None
    try:
        date = parsedate_to_datetime(values[0])
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    # An HTTP-date is GMT; a "-0000" zone reads as none (naive), which is not local time.
    return (date if date.tzinfo else date.replace(tzinfo=UTC)).timestamp()


def kept_seconds(lifetime: float | None, least: float, most: float) -> float:
    """How long to keep a document whose headers gave ``lifetime`` (`freshness_lifetime`):
    that, but at least ``least`` and at most ``most``; ``most`` when they gave none. ``most``
    (the operator's ``cache_seconds``) wins over ``least``: 0 keeps nothing, as it always did."""
    said = most if lifetime is None else lifetime
    return min(most, max(least, said))
