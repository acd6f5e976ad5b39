"""Whole numbers read from text that a request, a header, a stream or a command line brings.

`int` takes other scripts' digits, ``_``, a sign and whitespace, and refuses (ValueError) text
of more than 4,300 digits: a ``str.isdigit()`` check before it lets both through, and the second
made a 500 of a long number wherever one was read so. Every such number is read here.
"""

from __future__ import annotations


def _digits(text: str) -> str | None:
    """``text``'s significant digits if it is plain ASCII digits (leading zeros dropped)."""
    if not (text.isascii() and text.isdigit()):
        return None
    return text.lstrip("0") or "0"


def count_in(text: str, most: int, least: int = 1) -> int | None:
    """``text`` as a whole number from ``least`` to ``most`` in plain digits (no sign, space,
    ``_`` or other script's digits, which `int` takes), or None."""
    digits = _digits(text)
    if digits is None or len(digits) > len(str(most)):
        return None
    value = int(digits)
    return value if least <= value <= most else None


def capped(text: str, ceiling: int) -> int | None:
    """``text`` in plain digits as a whole number, read as ``ceiling + 1`` when it is more than
    ``ceiling``, however long (a declared size compared with a limit); None if it is not plain
    digits."""
    digits = _digits(text)
    if digits is None:
        return None
    if len(digits) > len(str(ceiling)):
        return ceiling + 1
    return min(int(digits), ceiling + 1)
