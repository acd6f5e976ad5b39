"""Builtin predicates: tests over bound values, each in a module of its own.

Every builtin takes only bound arguments and returns a boolean; a builtin given a value of the
wrong kind (or a missing context field) is simply false, so a malformed request fails closed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bastion.policy.builtins.cidr import cidr_contains
from bastion.policy.builtins.time_window import in_time_window, time_after, time_before


@dataclass(frozen=True, slots=True)
class Builtin:
    name: str
    arity: int
    function: Callable[..., bool]
    doc: str


BUILTINS: dict[tuple[str, int], Builtin] = {
    (b.name, b.arity): b
    for b in (
        Builtin("in_time_window", 5, in_time_window,
                'in_time_window(time, "Mon-Fri", "09:00", "17:00", "Europe/Paris")'),
        Builtin("time_before", 2, time_before, 'time_before(context.time, "2026-12-01T00:00:00Z")'),
        Builtin("time_after", 2, time_after, 'time_after(context.time, "2026-11-01T00:00:00Z")'),
        Builtin("cidr_contains", 2, cidr_contains, 'cidr_contains("10.0.0.0/8", context.client.ip)'),
    )
}  # fmt: skip
