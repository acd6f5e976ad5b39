"""Subject identifiers of Security Event Tokens (RFC 9493) and how they name bastion users.

A subject names a user only through the transmitter's explicit ``users`` table (``email:``,
``iss_sub:<iss>|<sub>``, ``opaque:``): bastion never guesses a user name from an email address.
SSF 1.0's ``complex`` subjects carry ``user``, ``device`` and ``session`` members.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bastion.signals.settings import normal_subject_key

MAX_FIELD = 512


class SubjectError(ValueError):
    """A subject identifier that is malformed or of a format bastion does not read."""


@dataclass(frozen=True)
class Subject:
    """The parts of a subject bastion acts on. ``user_key`` is the lookup key in ``users``."""

    user_key: str | None
    device: str | None = None
    session: str | None = None

    def describe(self) -> str:
        parts = [p for p in (self.user_key, self.device and f"device:{self.device}") if p]
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
        return f"iss_sub:{_text(sub.get('iss'), 'iss')}|{_text(sub.get('sub'), 'sub')}"
    if fmt == "opaque":
        return "opaque:" + _text(sub.get("id"), "id")
    raise SubjectError(
        f"subject format {fmt!r} is not read here; use email, iss_sub, opaque or complex"
    )


def parse_subject(sub: Any) -> Subject:
    """The subject of an event (RFC 9493 §3, SSF 1.0 §3.2 complex subjects)."""
    if not isinstance(sub, dict):
        raise SubjectError("sub_id must be a JSON object (RFC 9493 subject identifier)")
    if sub.get("format") != "complex":
        return Subject(simple_key(sub))
    user = simple_key(sub["user"]) if "user" in sub else None
    device = simple_key(sub["device"]).partition(":")[2] if "device" in sub else None
    session = simple_key(sub["session"]).partition(":")[2] if "session" in sub else None
    if user is None and device is None:
        raise SubjectError("a complex subject needs a user or a device member")
    return Subject(user, device, session)
