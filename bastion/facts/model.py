"""The fact model: entities, values, facts and fact patterns, and their JSON form.

A fact is a ground predicate: a tuple ``(predicate, *args)`` whose args are `Entity` or plain
values (str, int, bool). A pattern is the same shape where ``None`` stands for "any value".
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from bastion.untrusted_json import MAX_INTEGER, MIN_INTEGER, quoted


class Entity(NamedTuple):
    """A typed entity such as ``User{"alice"}``. A tuple, so hashing and equality are fast."""

    type: str
    id: str

    def __repr__(self) -> str:
        # `_quote`, inline: every decision record spells its principals and target this way.
        text = self.id
        if "\\" in text or '"' in text:
            text = text.replace("\\", "\\\\").replace('"', '\\"')
        return f'{self.type}{{"{text}"}}'

    @classmethod
    def parse(cls, text: str) -> Entity:
        """Parse ``Type:id`` (the CLI form) or ``Type{"id"}`` (the Polar form, as `repr` writes
        it: ``\\\\`` and ``\\"`` in the id are a backslash and a quote). ``parse(repr(e)) == e``
        for every entity: a target kept as text (an approval request's) is read back as the
        entity it was, never as one whose id holds the escapes."""
        text = text.strip()
        if text.endswith("}") and "{" in text:
            type_, _, rest = text.partition("{")
            inner = rest[:-1].strip()
            if len(inner) >= 2 and inner[0] == inner[-1] == '"':
                return cls(type_.strip(), _unquote(inner[1:-1]))
        elif ":" in text:
            type_, _, id_ = text.partition(":")
            if type_ and id_:
                return cls(type_, id_)
        raise ValueError(f'not an entity: {text!r} (expected Type:id or Type{{"id"}})')


class FactError(ValueError):
    """A fact that is malformed or that the policy in force cannot use."""


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


_ESCAPED = re.compile(r'\\([\\"])')


def _unquote(s: str) -> str:
    """The id `_quote` (and `Entity.__repr__`) wrote as ``s``: ``\\\\`` and ``\\"`` back to a
    backslash and a quote; any other backslash (an id typed by hand, ``C:\\tools``) is kept."""
    return _ESCAPED.sub(r"\1", s) if "\\" in s else s


def format_arg(arg: Any) -> str:
    if isinstance(arg, Entity):
        return repr(arg)
    if isinstance(arg, bool):
        return "true" if arg else "false"
    if isinstance(arg, str):
        return _quote(arg)
    if arg is None:
        return "_"
    return str(arg)


def format_fact(fact: tuple) -> str:
    """The Polar text of a fact or pattern, e.g. ``has_role(User{"alice"}, "member", Org{"acme"})``."""
    return f"{fact[0]}({', '.join(format_arg(a) for a in fact[1:])})"


def check_fact(fact: tuple, *, pattern: bool = False) -> tuple:
    """Validate the shape of a fact (or pattern) and return it as a plain tuple."""
    if not isinstance(fact, tuple) or not fact:
        raise FactError(f"a fact is a tuple (predicate, *args), got {fact!r}")
    predicate, *args = fact
    if not isinstance(predicate, str) or not predicate.isidentifier():
        raise FactError(f"a fact's predicate must be an identifier, got {predicate!r}")
    out = [predicate]
    for i, arg in enumerate(args):
        if isinstance(arg, Entity):
            if not (isinstance(arg.type, str) and isinstance(arg.id, str) and arg.type):
                raise FactError(f"argument {i + 1} of {predicate}: bad entity {arg!r}")
            out.append(arg)
        elif isinstance(arg, (str, int, bool)) or (pattern and arg is None):
            if isinstance(arg, int) and not MIN_INTEGER <= arg <= MAX_INTEGER:
                raise FactError(
                    f"argument {i + 1} of {predicate}: {arg} is out of range; integers in facts"
                    f" are 64-bit ({MIN_INTEGER} to {MAX_INTEGER})"
                )
            out.append(arg)
        else:
            kind = (
                "entity, string, integer, boolean or None"
                if pattern
                else "entity, string, integer or boolean"
            )
            raise FactError(f"argument {i + 1} of {predicate} must be an {kind}, got {arg!r}")
    return tuple(out)


def arg_to_json(arg: Any) -> Any:
    if isinstance(arg, Entity):
        return {"type": arg.type, "id": arg.id}
    return arg


def arg_from_json(value: Any, *, pattern: bool = False) -> Any:
    if value.__class__ is float and value.is_integer():
        # JSON has one kind of number: 3.0 is the integer 3 (as JSON Schema says).
        value = int(value)
    if isinstance(value, dict):
        # Exactly the two keys, both text (two keys, and both found as text, are those two).
        kind, name = value.get("type"), value.get("id")
        if len(value) != 2 or not isinstance(kind, str) or not isinstance(name, str):
            raise FactError(f'an entity is {{"type": str, "id": str}}, got {quoted(value)}')
        return Entity(kind, name)
    if isinstance(value, (str, int, bool)) or (pattern and value is None):
        return value
    raise FactError(f"unsupported fact argument {quoted(value)}")


def fact_to_json(fact: tuple) -> dict:
    """``{"predicate": "has_role", "args": [{"type": "User", "id": "alice"}, "member", ...]}``."""
    return {"predicate": fact[0], "args": [arg_to_json(a) for a in fact[1:]]}


FACT_KEYS = ("predicate", "args")


def fact_from_json(obj: Any, *, pattern: bool = False, also: tuple[str, ...] = ()) -> tuple:
    """The fact (or pattern) ``obj`` is. A key other than ``predicate``, ``args`` and those in
    ``also`` (``expires_at`` where the caller takes it) is refused: a misspelt ``expires_at``
    ignored would store a fact that never expires."""
    if not isinstance(obj, dict) or not isinstance(obj.get("args", []), list):
        raise FactError('a fact is {"predicate": str, "args": [...]}')
    allowed = FACT_KEYS + also
    unknown = [key for key in obj if key not in allowed]
    if unknown:
        raise FactError(
            f"unknown key {str(unknown[0])!r} in a {'pattern' if pattern else 'fact'}"
            f" (it has {', '.join(allowed)})"
        )
    args = [arg_from_json(a, pattern=pattern) for a in obj.get("args", [])]
    return check_fact((obj.get("predicate"), *args), pattern=pattern)


def matches(fact: tuple, pattern: tuple) -> bool:
    """True when ``fact`` fits ``pattern`` (same predicate and arity; ``None`` matches anything)."""
    if len(fact) != len(pattern) or fact[0] != pattern[0]:
        return False
    return all(p is None or same_value(p, a) for p, a in zip(pattern[1:], fact[1:], strict=True))


def same_value(a: Any, b: Any) -> bool:
    """Equality of fact values: ``True == 1`` in Python, but a boolean is not an integer here."""
    return a == b and type(a) is type(b) if isinstance(a, bool) or isinstance(b, bool) else a == b
