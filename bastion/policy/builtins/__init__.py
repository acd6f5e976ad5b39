"""Builtin predicates: tests over bound values, each in a module of its own.

Every builtin returns a boolean for bound arguments; a builtin given a value of the wrong kind
(or a missing context field) is simply false, so a malformed request fails closed. A builtin with
``produce`` may be called with its last argument an unbound variable, which it binds to each
value ``produce`` returns for the others (``lower``). ``types`` names the value type each argument
must have ("String"), when the builtin has one: a literal of another type is a load error.
``literal`` says what is wrong with an argument written in the policy (a time zone that does not
exist), when the builtin can tell: that too is a load error, never a builtin false on every request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bastion.policy.builtins.cidr import cidr_contains
from bastion.policy.builtins.strings import contains, ends_with, lower, lowered, starts_with
from bastion.policy.builtins.time_window import (
    in_time_window,
    instant_literal,
    time_after,
    time_before,
    window_literal,
)


@dataclass(frozen=True, slots=True)
class Builtin:
    name: str
    arity: int
    function: Callable[..., bool]
    doc: str
    types: tuple[str, ...] = ()  # each argument's value type, if the builtin demands one
    produce: Callable[..., tuple] | None = None  # the values of the last argument, if unbound
    # (position from 0, a value written in the policy) -> what is wrong with it, or None
    literal: Callable[[int, Any], str | None] | None = None


_TEXT2 = ("String", "String")

BUILTINS: dict[tuple[str, int], Builtin] = {
    (b.name, b.arity): b
    for b in (
        Builtin("in_time_window", 5, in_time_window,
                'in_time_window(time, "Mon-Fri", "09:00", "17:00", "Europe/Paris")',
                literal=window_literal),
        Builtin("time_before", 2, time_before, 'time_before(context.time, "2026-12-01T00:00:00Z")',
                literal=instant_literal),
        Builtin("time_after", 2, time_after, 'time_after(context.time, "2026-11-01T00:00:00Z")',
                literal=instant_literal),
        Builtin("cidr_contains", 2, cidr_contains, 'cidr_contains("10.0.0.0/8", context.client.ip)'),
        Builtin("starts_with", 2, starts_with, 'starts_with(context.uri, "customers://")', _TEXT2),
        Builtin("ends_with", 2, ends_with, 'ends_with(context.arguments.to, "@acme.example")', _TEXT2),
        Builtin("contains", 2, contains, 'contains(context.arguments.query, "password")', _TEXT2),
        Builtin("lower", 2, lower, "lower(context.arguments.to, to)", _TEXT2, lowered),
    )
}  # fmt: skip
