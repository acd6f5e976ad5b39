"""Subject identifiers of Security Event Tokens (RFC 9493) and how they name bastion users.

A subject names a user only through the transmitter's explicit ``users`` table (``email:``,
``iss_sub:<iss>|<sub>``, ``opaque:``): bastion never guesses a user name from an email address.
RFC 9493 ``aliases`` name the one user their identifiers map to, never two; SSF 1.0's
``complex`` subjects carry ``user``, ``device`` and ``session`` members.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bastion.signals.settings import normal_subject_key

MAX_FIELD = 512
MAX_ALIASES = 32


class SubjectError(ValueError):
    """A subject identifier that is malformed or of a format bastion does not read."""


@dataclass(frozen=True)
class Subject:
    """The parts of a subject bastion acts on. ``user_keys`` are the lookup keys in ``users``
    of the one user the subject is (several for ``aliases``)."""

    user_keys: tuple[str, ...] = ()
    device: str | None = None
    session: str | None = None

    def describe(self) -> str:
        parts = [*self.user_keys, *([f"device:{self.device}"] if self.device else [])]
        return ", ".join(parts) or "(no user or device)"


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_FIELD:
        raise SubjectError(f"{name} must be a non-empty string of at most {MAX_FIELD} characters")
    return value


def simple_key(sub: Any) -> str:
    """The lookup key of a simple RFC 9493 identifier (email, iss_sub, opaque)."""
    if not isinstance(sub, dict):
        raise SubjectError("a subject identifier must be a JSON object")
    fmt = sub.get("format")
    if fmt == "email":
        return normal_subject_key("email:" + _text(sub.get("email"), "email"))
    if fmt == "iss_sub":
        iss = _text(sub.get("iss"), "iss")
        if "|" in iss:
            # The key's first "|" ends the issuer: one holding it (no URL does, RFC 3986) made
            # the key of another issuer's account whose sub holds one ("auth0|abc").
            raise SubjectError("iss must be a URL, and holds '|'")
        return f"iss_sub:{iss}|{_text(sub.get('sub'), 'sub')}"
    if fmt == "opaque":
        return "opaque:" + _text(sub.get("id"), "id")
    raise SubjectError(
        f"subject format {fmt!r} is not read here; use email, iss_sub, opaque, aliases or complex"
    )


def user_keys(sub: Any) -> tuple[str, ...]:
    """The lookup keys of an identifier of one user: a simple one's key, or each of its
    ``aliases`` (RFC 9493: never aliases within aliases)."""
    if not isinstance(sub, dict) or sub.get("format") != "aliases":
        return (simple_key(sub),)
    identifiers = sub.get("identifiers")
    if not isinstance(identifiers, list) or not 0 < len(identifiers) <= MAX_ALIASES:
        raise SubjectError(f"aliases needs identifiers, a list of 1 to {MAX_ALIASES} identifiers")
    if any(isinstance(i, dict) and i.get("format") == "aliases" for i in identifiers):
        raise SubjectError("aliases must not hold aliases (RFC 9493)")
    return tuple(dict.fromkeys(simple_key(i) for i in identifiers))


def parse_subject(sub: Any) -> Subject:
    """The subject of an event (RFC 9493 §3, SSF 1.0 §3.2 complex subjects)."""
    if not isinstance(sub, dict):
        raise SubjectError("sub_id must be a JSON object (RFC 9493 subject identifier)")
    if sub.get("format") != "complex":
        return Subject(user_keys(sub))
    user = user_keys(sub["user"]) if "user" in sub else ()
    device = simple_key(sub["device"]).partition(":")[2] if "device" in sub else None
    session = simple_key(sub["session"]).partition(":")[2] if "session" in sub else None
    if not user and device is None:
        raise SubjectError("a complex subject needs a user or a device member")
    return Subject(user, device, session)


def user_of(subject: Subject, users: dict[str, str]) -> str | None:
    """The bastion user ``users`` maps the subject to, or None; `SubjectError` when its
    identifiers map to more than one (an event about one person never reaches another)."""
    found = {users[k] for k in subject.user_keys if k in users}
    if len(found) > 1:
        raise SubjectError(
            f"its identifiers name more than one user ({', '.join(sorted(found))}): nothing done"
        )
    return found.pop() if found else None
