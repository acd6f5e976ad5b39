"""String builtins: ``starts_with``, ``ends_with``, ``contains`` and ``lower``.

``starts_with(text, prefix)``, ``ends_with(text, suffix)`` and ``contains(text, part)`` hold when
both are strings and ``text`` begins with, ends with or includes the other (case-sensitive).
``lower(text, lowered)`` holds when ``lowered`` is ``text`` in lower case; with ``lowered`` an
unbound variable it binds it, so ``lower(context.arguments.to, to) and ends_with(to, "@acme.example")``
compares without regard to case. A value that is not a string makes each of them false (a
literal of another type is refused when the policy loads). Each says how many characters it
reads (`text_read`, `affix_read`): the evaluation budget is spent on them.
"""

from __future__ import annotations


def starts_with(text: object, prefix: object) -> bool:
    """True when the string ``text`` begins with the string ``prefix``."""
    return text.__class__ is str and prefix.__class__ is str and text.startswith(prefix)  # type: ignore[attr-defined]


def ends_with(text: object, suffix: object) -> bool:
    """True when the string ``text`` ends with the string ``suffix``."""
    return text.__class__ is str and suffix.__class__ is str and text.endswith(suffix)  # type: ignore[attr-defined]


def contains(text: object, part: object) -> bool:
    """True when the string ``part`` occurs in the string ``text``."""
    return text.__class__ is str and part.__class__ is str and part in text  # type: ignore[operator]


def lower(text: object, lowered: object) -> bool:
    """True when ``lowered`` is the string ``text`` in lower case."""
    return text.__class__ is str and lowered.__class__ is str and text.lower() == lowered  # type: ignore[attr-defined]


def lowered(text: object) -> tuple[str, ...]:
    """``lower`` with its last argument unbound: the one value it binds, or none."""
    return (text.lower(),) if text.__class__ is str else ()  # type: ignore[attr-defined]


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
