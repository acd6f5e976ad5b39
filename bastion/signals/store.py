"""Signals from any source (an MDM, a SIEM, a script), stored as expiring facts.

A signal is one fact of one shape, so the change log carries it to every replica and the policy
reads it like any other fact::

    signal(Subject, name: String, value: String | Integer | Boolean, source: String, set_at: Integer)

``Subject`` is a ``User``, ``Device``, ``Agent`` or ``Session``; ``set_at`` is when it was set
(epoch seconds), so a policy can ask how fresh it is (``requires_signal``, see
`bastion.decide.contract`). One subject holds one value per name: setting a signal replaces the
one before it, in the same transaction. Every signal expires (``ttl_seconds``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from bastion.facts.model import Entity
from bastion.facts.store import FactStore, StoredFact, WriteResult
from bastion.untrusted_json import MAX_INTEGER, MIN_INTEGER

PREDICATE = "signal"
SUBJECT_TYPES = ("User", "Device", "Agent", "Session")
# Sizes are fixed (the OpenAPI document states them): a signal is a small fact.
# The most signals one listing returns, through the API or the command line.
MAX_LIST = 1000
MAX_NAME = 64
MAX_SOURCE = 64
MAX_SUBJECT_ID = 256
MAX_TEXT_VALUE = 256
# A name or a source: letters, digits and _ . : - (no spaces, nothing to escape in a policy).
NAME_PATTERN = "^[A-Za-z0-9_.:-]+$"
_NAME = re.compile(NAME_PATTERN[1:-1])


class SignalError(ValueError):
    """A signal that cannot be stored as sent; the message says what to change."""


@dataclass(frozen=True)
class SignalSettings:
    """The ``[signals.api]`` table of bastion.toml."""

    # The time to live of a signal that names none.
    default_ttl_seconds: int = 24 * 3600
    # The longest a signal may live: a source that stops sending must not be believed for ever.
    max_ttl_seconds: int = 30 * 24 * 3600

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any] | None) -> SignalSettings:
        table = dict(table or {})
        unknown = set(table) - {"default_ttl_seconds", "max_ttl_seconds"}
        if unknown:
            raise SignalError(
                f"unknown key(s) in [signals.api]: {', '.join(sorted(unknown))}; known keys:"
                " default_ttl_seconds, max_ttl_seconds"
            )
        settings = cls(**table)
        for name in ("default_ttl_seconds", "max_ttl_seconds"):
            value = getattr(settings, name)
            if type(value) is not int or value < 1:
                raise SignalError(f"[signals.api].{name} must be a whole number of seconds >= 1")
        if settings.default_ttl_seconds > settings.max_ttl_seconds:
            raise SignalError(
                "[signals.api].default_ttl_seconds must not exceed max_ttl_seconds"
                f" ({settings.max_ttl_seconds})"
            )
        return settings


@dataclass(frozen=True)
class Signal:
    """One signal about one subject."""

    subject: Entity
    name: str
    value: str | int | bool
    source: str
    set_at: int
    expires_at: float

    def fact(self) -> tuple:
        return (PREDICATE, self.subject, self.name, self.value, self.source, self.set_at)

    def stored(self) -> StoredFact:
        return StoredFact(self.fact(), self.expires_at)

    def to_json(self) -> dict[str, Any]:
        return {
            "subject": {"type": self.subject.type, "id": self.subject.id},
            "name": self.name,
            "value": self.value,
            "source": self.source,
            "set_at": self.set_at,
            "expires_at": self.expires_at,
        }

    @classmethod
    def from_stored(cls, stored: StoredFact) -> Signal | None:
        """The signal a stored fact holds; None for a ``signal`` fact of another shape."""
        fact = stored.fact
        if len(fact) != 6 or stored.expires_at is None:
            return None
        _, subject, name, value, source, set_at = fact
        if not (isinstance(subject, Entity) and isinstance(name, str) and isinstance(source, str)):
            return None
        if type(set_at) is not int:
            return None
        return cls(subject, name, value, source, set_at, stored.expires_at)


def check_subject(type_: Any, id_: Any) -> Entity:
    if type_ not in SUBJECT_TYPES:
        raise SignalError(f"a signal's subject is one of {', '.join(SUBJECT_TYPES)}, got {type_!r}")
    if not isinstance(id_, str) or not 1 <= len(id_) <= MAX_SUBJECT_ID:
        raise SignalError(f"a subject's id is a string of 1 to {MAX_SUBJECT_ID} characters")
    return Entity(type_, id_)


def check_name(value: Any, what: str = "name", most: int = MAX_NAME) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= most or not _NAME.fullmatch(value):
        raise SignalError(
            f"a signal's {what} is 1 to {most} letters, digits or _ . : -, got {value!r}"
        )
    return value


def check_value(value: Any) -> str | int | bool:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON has one kind of number: 1.0 is the integer 1
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if not MIN_INTEGER <= value <= MAX_INTEGER:
            raise SignalError("a signal's value must fit in 64 bits")
        return value
    if isinstance(value, str):
        if len(value) > MAX_TEXT_VALUE:
            raise SignalError(f"a signal's text value is at most {MAX_TEXT_VALUE} characters")
        return value
    raise SignalError(f"a signal's value is a boolean, an integer or a string, got {value!r}")


def new_signal(
    subject: Entity,
    name: str,
    value: Any,
    source: str,
    ttl_seconds: int | None,
    settings: SignalSettings,
    now: float | None = None,
) -> Signal:
    """A checked signal set ``now``; `SignalError` says what is wrong."""
    subject = check_subject(subject.type, subject.id)
    check_name(name)
    check_name(source, "source", MAX_SOURCE)
    value = check_value(value)
    ttl = settings.default_ttl_seconds if ttl_seconds is None else ttl_seconds
    if type(ttl) is not int or not 1 <= ttl <= settings.max_ttl_seconds:
        raise SignalError(
            f"ttl_seconds must be a whole number from 1 to {settings.max_ttl_seconds}"
            f" ([signals.api].max_ttl_seconds), got {ttl!r}"
        )
    now = time.time() if now is None else now
    return Signal(subject, name, value, source, int(now), now + ttl)


def _pattern(subject: Entity | None, name: str | None) -> tuple:
    return (PREDICATE, subject, name, None, None, None)


def set_signal(
    store: FactStore,
    signal: Signal,
    *,
    actor: str,
    validate: Callable[[tuple], tuple] | None = None,
) -> WriteResult:
    """Store ``signal`` in place of the subject's earlier value of that name: one transaction.

    ``validate`` (the policy in force's `FactSet.validate`) refuses, with `FactError`, a signal
    the policy cannot hold, before anything is written.
    """
    if validate is not None:
        validate(signal.fact())
    return store.apply([signal.stored()], [_pattern(signal.subject, signal.name)], actor=actor)


def clear_signal(
    store: FactStore, subject: Entity, name: str | None = None, *, actor: str
) -> WriteResult:
    """Remove the subject's signal ``name`` (every one of its signals when None)."""
    return store.apply([], [_pattern(subject, name)], actor=actor)


def list_signals(
    store: FactStore,
    subject: Entity | None = None,
    name: str | None = None,
    *,
    limit: int = 100,
) -> list[Signal]:
    """Live signals, of one subject and name when given, in the store's order."""
    found = []
    for stored in store.get(_pattern(subject, name), limit=limit):
        signal = Signal.from_stored(stored)
        if signal is not None and (name is None or signal.name == name):
            found.append(signal)
            if len(found) >= limit:
                break
    return found
