"""Builtin predicates: tests over bound values, each in a module of its own.

Every builtin returns a boolean for bound arguments; a builtin given a value of the wrong kind
or one it cannot read (a text that is no time, no address) is false in ordinary code, so a
malformed request fails closed, and holds in strict code (`Builtin.strict`: a ``deny`` rule, an
obligation that restricts, what a ``not`` negates), so it fails closed there too. A missing
context field is false everywhere (the rule does not apply). A builtin with
``produce`` may be called with its last argument an unbound variable, which it binds to each
value ``produce`` returns for the others (``lower``); inputs it cannot read bind nothing in
ordinary code, and in strict code stop it as undecided (`Builtin.strict_produce`). ``types`` names the value type each argument
must have ("String"), when the builtin has one: a literal of another type is a load error.
``literal`` says what is wrong with an argument written in the policy (a time zone that does not
exist), when the builtin can tell: that too is a load error, never a builtin false on every request.
A builtin whose work grows with the texts it is given (``reads``: the string builtins, which say
how many characters they read) spends a step of the evaluation budget per `CHARACTERS_PER_STEP`
of them (`spend_on_texts`), as going through a list spends a step per item: a long text from the
request cannot make each round of a loop thousands of times dearer than the budget counts it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bastion.policy.builtins.cidr import cidr_contains, cidr_decidable
from bastion.policy.builtins.strings import (
    affix_read,
    contains,
    ends_with,
    lower,
    lowered,
    starts_with,
    text_read,
    texts,
)
from bastion.policy.builtins.time_window import (
    in_time_window,
    instant_literal,
    time_after,
    time_before,
    times,
    window_decidable,
    window_literal,
)
from bastion.policy.errors import Undecided
from bastion.policy.runtime import Query, exhausted

# Characters of text a string builtin reads for one step: a step of a loop costs about as much
# as scanning this many (`in` over 64 characters, `lower` of them); a usual text (an address, a
# name, a URI) is shorter and spends nothing.
CHARACTERS_PER_STEP = 64


def spend_on_texts(q: Query, size: int) -> None:
    """Spends the steps of reading ``size`` characters (`CHARACTERS_PER_STEP`)."""
    if size >= CHARACTERS_PER_STEP:
        q.steps -= size // CHARACTERS_PER_STEP
        if q.steps < 0:
            exhausted(q)


def _paid(
    function: Callable[..., Any], reads: Callable[..., int], count: int
) -> Callable[..., Any]:
    """``function`` of ``count`` arguments, called by compiled code with the query first: it
    spends on its texts. Only a text of `CHARACTERS_PER_STEP` characters or more spends (so
    `reads` is asked only then): the usual check, of short texts, pays one class and length test
    per argument. Chosen by ``count``: the strict forms take ``*args``."""
    unit = CHARACTERS_PER_STEP

    def paid1(q: Query, a: Any) -> Any:
        if a.__class__ is str and len(a) >= unit:
            spend_on_texts(q, reads(a))
        return function(a)

    def paid2(q: Query, a: Any, b: Any) -> Any:
        if a.__class__ is str and len(a) >= unit or b.__class__ is str and len(b) >= unit:
            spend_on_texts(q, reads(a, b))
        return function(a, b)

    def paid(q: Query, *args: Any) -> Any:
        if any(a.__class__ is str and len(a) >= unit for a in args):
            spend_on_texts(q, reads(*args))
        return function(*args)

    return paid1 if count == 1 else paid2 if count == 2 else paid


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
    # Whether the builtin can be decided of its arguments (values of the kinds it reads, that
    # parse): where it cannot, it is false, and in strict code it may hold (`strict`). For one
    # that produces, also asked of the inputs alone (`strict_produce`).
    decidable: Callable[..., bool] = lambda *args: True
    # The characters it reads of its arguments (of its inputs, to produce), when its work grows
    # with them: compiled code spends on them (`compiled`).
    reads: Callable[..., int] | None = None

    def compiled(self, function: Callable[..., Any], count: int) -> Callable[..., Any]:
        """``function`` (`function`, `strict`, or `produce`, `strict_produce`), of ``count``
        arguments, as compiled code calls it: with the query first when the builtin `reads`
        texts, to spend on them (`spend_on_texts`), else as it is."""
        return function if self.reads is None else _paid(function, self.reads, count)

    @property
    def strict(self) -> Callable[..., bool]:
        """The builtin in strict code (`bastion.policy.compile.Node.strict`: a ``deny`` rule,
        an obligation that restricts, what a ``not`` in ordinary code negates): what cannot be
        decided of its arguments (a text that is no address, no time; a value that is no
        string) may hold, so it holds, as an ordering of two kinds does."""
        function, decidable = self.function, self.decidable
        return lambda *args: function(*args) or not decidable(*args)

    @property
    def strict_produce(self) -> Callable[..., tuple]:
        """`produce` in strict code: inputs it cannot read (``lower`` of a value that is no
        string) leave its output undecided, with no value to bind nor answer to name without
        one, so it raises `Undecided`, as arithmetic with no result that a rule binds does: the
        ``deny`` holds, the ``not`` fails, an obligation asked for its values refuses."""
        produce, decidable = self.produce, self.decidable
        assert produce is not None, self.name

        def produced(*inputs: Any) -> tuple:
            values = produce(*inputs)
            if values or decidable(*inputs):
                return values
            raise Undecided

        return produced


_TEXT2 = ("String", "String")

BUILTINS: dict[tuple[str, int], Builtin] = {
    (b.name, b.arity): b
    for b in (
        Builtin("in_time_window", 5, in_time_window,
                'in_time_window(time, "Mon-Fri", "09:00", "17:00", "Europe/Paris")',
                literal=window_literal, decidable=window_decidable),
        Builtin("time_before", 2, time_before, 'time_before(context.time, "2026-12-01T00:00:00Z")',
                literal=instant_literal, decidable=times),
        Builtin("time_after", 2, time_after, 'time_after(context.time, "2026-11-01T00:00:00Z")',
                literal=instant_literal, decidable=times),
        Builtin("cidr_contains", 2, cidr_contains, 'cidr_contains("10.0.0.0/8", context.client.ip)',
                decidable=cidr_decidable),
        Builtin("starts_with", 2, starts_with, 'starts_with(context.uri, "customers://")', _TEXT2,
                decidable=texts, reads=affix_read),
        Builtin("ends_with", 2, ends_with, 'ends_with(context.arguments.to, "@acme.example")', _TEXT2,
                decidable=texts, reads=affix_read),
        Builtin("contains", 2, contains, 'contains(context.arguments.query, "password")', _TEXT2,
                decidable=texts, reads=text_read),
        Builtin("lower", 2, lower, "lower(context.arguments.to, to)", _TEXT2, lowered,
                decidable=texts, reads=text_read),
    )
}  # fmt: skip
