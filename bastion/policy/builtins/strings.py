"""String builtins: ``starts_with``, ``ends_with``, ``contains`` and ``lower``.

``starts_with(text, prefix)``, ``ends_with(text, suffix)`` and ``contains(text, part)`` hold when
both are strings and ``text`` begins with, ends with or includes the other (case-sensitive).
``lower(text, lowered)`` holds when ``lowered`` is ``text`` in lower case; with ``lowered`` an
unbound variable it binds it, so ``lower(context.arguments.to, to) and ends_with(to, "@acme.example")``
compares without regard to case. Lower case is Unicode's, each character on its own (É is é,
Σ is σ wherever it stands), but no character becomes ASCII that was not: the Kelvin sign and İ,
which ``str.lower`` makes "k" and "i" with a dot above, stay as they are, as a mail system or
DNS (which fold ASCII only) keep them apart from "k" and "i". A value that is not a string makes each of them false (a
literal of another type is refused when the policy loads). Each says how many characters it
reads (`text_read`, `affix_read`): the evaluation budget is spent on them.
"""

from __future__ import annotations

# The characters, not ASCII, whose lower case holds ASCII (tests/policy/test_string_case.py
# checks every code point): U+0130 (İ, "i" and U+0307) and U+212A (the Kelvin sign, "k").
_KEPT = frozenset("\u0130\u212a")


def starts_with(text: object, prefix: object) -> bool:
    """True when the string ``text`` begins with the string ``prefix``."""
    return text.__class__ is str and prefix.__class__ is str and text.startswith(prefix)  # type: ignore[attr-defined]


def ends_with(text: object, suffix: object) -> bool:
    """True when the string ``text`` ends with the string ``suffix``."""
    return text.__class__ is str and suffix.__class__ is str and text.endswith(suffix)  # type: ignore[attr-defined]


def contains(text: object, part: object) -> bool:
    """True when the string ``part`` occurs in the string ``text``."""
    return text.__class__ is str and part.__class__ is str and part in text  # type: ignore[operator]


def lower_case(text: str) -> str:
    """``text`` in lower case as ``lower`` reads it: each character on its own, those of
    `_KEPT` as they are."""
    if text.isascii():
        return text.lower()
    return "".join(c if c in _KEPT else c.lower() for c in text)


def lower(text: object, lowered: object) -> bool:
    """True when ``lowered`` is the string ``text`` in lower case (`lower_case`)."""
    return text.__class__ is str and lowered.__class__ is str and lower_case(text) == lowered  # type: ignore[arg-type]


def lowered(text: object) -> tuple[str, ...]:
    """``lower`` with its last argument unbound: the one value it binds, or none."""
    return (lower_case(text),) if text.__class__ is str else ()  # type: ignore[arg-type]


def texts(*values: object) -> bool:
    """Whether a string builtin can be decided of ``values``: all of them strings."""
    return all(value.__class__ is str for value in values)


def text_read(*values: object) -> int:
    """Characters ``contains`` and ``lower`` read: every string given, whole."""
    return sum(len(value) for value in values if value.__class__ is str)  # type: ignore[arg-type]


def affix_read(text: object, affix: object) -> int:
    """Characters ``starts_with`` and ``ends_with`` read: the prefix or suffix, compared with as
    much of the text (none when it is the longer)."""
    if text.__class__ is str and affix.__class__ is str and len(affix) <= len(text):  # type: ignore[arg-type]
        return len(affix)  # type: ignore[arg-type]
    return 0
