"""Time builtins: a weekly window in a time zone (business hours), and before/after an instant.

A time is an ISO 8601 string with an offset (``2026-11-30T10:00:00Z``), a naive ISO string (read
as UTC), or epoch seconds. ``context.time`` is always present: the decision fills it with the
current time when the caller does not. A time is within the calendar of years 1 to 9999 (seen in
UTC and in the zone of a window) and written in at most `MAX_TIME_CHARS` characters; anything else
is not a time, and a builtin given it is false, as for any value of the wrong kind. So are a
window's days, times of day and zone: each at most `MAX_TIME_CHARS` characters.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
# The longest text read as a time: ``2026-11-30T10:00:00.123456+05:30`` is 32. Parsed texts are
# remembered, so a longer one (a request's, of any size) is not a time rather than a cache entry.
MAX_TIME_CHARS = 64


def to_datetime(value: object) -> datetime | None:
    """``value`` as an aware instant; None when it is not a time (see the module's docstring)."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError):  # past year 9999, or NaN
            return None
    if isinstance(value, str) and len(value) <= MAX_TIME_CHARS:
        return _parse_iso(value)
    return None


@lru_cache(maxsize=4096)
def _parse_iso(text: str) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@lru_cache(maxsize=256)
def _days(spec: str) -> frozenset[int] | None:
    """``"Mon-Fri"``, ``"Sat,Sun"``, ``"Mon-Wed,Fri"`` or ``"*"`` to weekday numbers (Mon = 0)."""
    if spec.strip() == "*":
        return frozenset(range(7))
    days: set[int] = set()
    for part in spec.lower().split(","):
        first, _, last = part.strip().partition("-")
        if first[:3] not in _DAYS or (last and last[:3] not in _DAYS):
            return None
        a = _DAYS.index(first[:3])
        b = _DAYS.index(last[:3]) if last else a
        days.update(range(a, b + 1) if a <= b else [*range(a, 7), *range(0, b + 1)])
    return frozenset(days)


@lru_cache(maxsize=256)
def _minutes(hhmm: str) -> int | None:
    hours, _, minutes = hhmm.partition(":")
    if not (hhmm.isascii() and hours.isdigit() and minutes.isdigit()):
        return None
    h, m = int(hours), int(minutes)
    if h > 24 or m > 59 or (h == 24 and m):
        return None
    return h * 60 + m


@lru_cache(maxsize=64)
def _zone(name: str) -> ZoneInfo | None:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None


def _window(
    days: object, start: object, end: object, zone: object
) -> tuple[frozenset[int], int, int, ZoneInfo] | None:
    """The window the four texts name, or None when one is not a text of at most
    `MAX_TIME_CHARS` characters that parses (parsed texts are remembered: a longer one is not
    kept)."""
    for text in (days, start, end, zone):
        if text.__class__ is not str or len(text) > MAX_TIME_CHARS:  # type: ignore[arg-type]
            return None
    weekdays, lo, hi, tz = _days(days), _minutes(start), _minutes(end), _zone(zone)  # type: ignore[arg-type]
    if weekdays is None or lo is None or hi is None or tz is None:
        return None
    return weekdays, lo, hi, tz


def in_time_window(time: object, days: object, start: object, end: object, zone: object) -> bool:
    """True when ``time``, seen in ``zone``, falls on one of ``days`` within [start, end)."""
    window, moment = _window(days, start, end, zone), to_datetime(time)
    if window is None or moment is None:
        return False
    weekdays, lo, hi, tz = window
    try:
        local = moment.astimezone(tz)
    except (OverflowError, ValueError):  # an instant the zone moves past year 1 or 9999
        return False
    minute = local.hour * 60 + local.minute
    if lo <= hi:
        return local.weekday() in weekdays and lo <= minute < hi
    # A window across midnight ("22:00" to "06:00") belongs to the day it starts on.
    if minute >= lo:
        return local.weekday() in weekdays
    return minute < hi and (local.weekday() - 1) % 7 in weekdays


def window_literal(position: int, value: object) -> str | None:
    """What is wrong with ``value``, written in a policy as argument ``position`` (from 0) of
    `in_time_window`; None when it can be read. Checked when the policy loads: a window that
    cannot be read makes the builtin false on every request, so a guardrail over it never fires."""
    if position == 0:
        return instant_literal(position, value)
    if position == 1 and _window(value, "00:00", "24:00", "UTC") is None:
        return f'{value!r} is not a set of days ("Mon-Fri", "Sat,Sun", "Mon-Wed,Fri" or "*")'
    if position in (2, 3) and _window("*", value, "24:00", "UTC") is None:
        return f'{value!r} is not a time of day ("HH:MM", from "00:00" to "24:00")'
    if position == 4 and _window("*", "00:00", "24:00", value) is None:
        return f'{value!r} is not an IANA time zone ("Europe/Paris", "America/New_York", "UTC")'
    return None


def instant_literal(_position: int, value: object) -> str | None:
    """What is wrong with ``value`` written in a policy as a time (`window_literal`)."""
    if to_datetime(value) is None:
        return (
            f'{value!r} is not a time (ISO 8601 such as "2027-01-01T00:00:00Z", or epoch seconds)'
        )
    return None


def time_before(time: object, limit: object) -> bool:
    a, b = to_datetime(time), to_datetime(limit)
    return a is not None and b is not None and a < b


def time_after(time: object, limit: object) -> bool:
    a, b = to_datetime(time), to_datetime(limit)
    return a is not None and b is not None and a > b


def times(*values: object) -> bool:
    """Whether `time_before` or `time_after` can be decided of ``values``: all of them times."""
    return all(to_datetime(value) is not None for value in values)


def window_decidable(time: object, days: object, start: object, end: object, zone: object) -> bool:
    """Whether `in_time_window` can be decided: a time, and a window that parses."""
    return to_datetime(time) is not None and _window(days, start, end, zone) is not None
