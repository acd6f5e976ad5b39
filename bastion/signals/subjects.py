"""Subject identifiers of Security Event Tokens (RFC 9493) and how they name bastion users.

A subject names a user only through the transmitter's explicit ``users`` table (``email:``,
``iss_sub:<iss>|<sub>``, ``opaque:``, ``phone_number:``, ``account:``, ``did:``, ``uri:``):
bastion never guesses a user name from an email address. RFC 9493 ``aliases`` name the one user
their identifiers map to, never two, and an identifier of a format not read among them is passed
over; SSF 1.0 §3.3 ``complex`` subjects carry ``user``, ``device`` and ``session`` members (and
others, which bastion does not read: `Subject.unread` names them). RISC 1.0's Google
transmitter writes ``subject_type`` for ``format``; it is read so. SSF 1.0 §3.4's ``jwt_id``,
``saml_assertion_id`` and ``ip-addresses`` identify a token, an assertion or addresses, never a
user or device bastion knows: checked, and the event about one is recorded with that reason
(`NotAPrincipal`). `identifier_of` turns a lookup key back into the identifier a stream's
subjects are added with (§8.1.3).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from bastion.signals.settings import normal_subject_key

MAX_FIELD = 512
MAX_ALIASES = 32
# RFC 9493 §3.2's simple formats (other than email and iss_sub): the member holding the value.
ONE_MEMBER_FORMATS = {"opaque": "id", "phone_number": "phone_number", "account": "uri",
                      "did": "url", "uri": "uri"}  # fmt: skip
# The members of an SSF 1.0 complex subject that bastion acts on.
READ_MEMBERS = ("user", "device", "session")


class SubjectError(ValueError):
    """A subject identifier that is malformed or of a format bastion does not read."""


class UnreadFormat(SubjectError):
    """A well-formed identifier of a format bastion does not read (SSF 1.0 §3.4 allows
    proprietary ones): passed over among ``aliases``, never a reason to drop the others."""


class NotAPrincipal(UnreadFormat):
    """A well-formed SSF 1.0 §3.4 identifier of a JWT (``jwt_id``), a SAML assertion
    (``saml_assertion_id``) or IP addresses (``ip-addresses``): none names a user or a device
    bastion knows (it keeps no record of other issuers' tokens, and an address is not a
    person), so an event about one alone is recorded with this reason, not applied."""


# SSF 1.0 §3.4's formats, each with its required string members, and what it names.
_NOT_PRINCIPALS = {
    "jwt_id": (("iss", "jti"), "a JWT"),
    "saml_assertion_id": (("issuer", "assertion_id"), "a SAML assertion"),
}
MAX_ADDRESSES = 32


@dataclass(frozen=True)
class Subject:
    """The parts of a subject bastion acts on. ``user_keys`` are the lookup keys in ``users``
    of the one user the subject is (several for ``aliases``)."""

    user_keys: tuple[str, ...] = ()
    device: str | None = None
    session: str | None = None
    # A complex subject's members bastion does not read (``tenant``, ``application``, or a
    # ``device`` of a format not read), for the transmitter's critical_subject_members (SSF 1.0
    # §3.6); empty for a simple one.
    unread: tuple[str, ...] = ()

    def describe(self) -> str:
        parts = [*self.user_keys, *([f"device:{self.device}"] if self.device else [])]
        return ", ".join(parts) or "(no user or device)"


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_FIELD:
        raise SubjectError(f"{name} must be a non-empty string of at most {MAX_FIELD} characters")
    return value


def subject_format(sub: dict) -> Any:
    """An identifier's ``format``; or, without one, its ``subject_type``, which Google's RISC
    transmitter writes instead (RISC 1.0, "Google compatibility")."""
    return sub["format"] if "format" in sub else sub.get("subject_type")


def simple_key(sub: Any) -> str:
    """The lookup key of a simple RFC 9493 identifier (§3.2: email, iss_sub, opaque,
    phone_number, account, did, uri); `UnreadFormat` for any other format."""
    if not isinstance(sub, dict):
        raise SubjectError("a subject identifier must be a JSON object")
    fmt = subject_format(sub)
    if not isinstance(fmt, str):
        # A list or an object cannot be looked up among the formats (TypeError): a format not
        # read, passed over among aliases as any other.
        raise UnreadFormat(f"subject format must be a string, got {type(fmt).__name__}")
    if fmt == "email":
        return normal_subject_key("email:" + _text(sub.get("email"), "email"))
    if fmt == "iss_sub":
        iss = _text(sub.get("iss"), "iss")
        if "|" in iss:
            # The key's first "|" ends the issuer: one holding it (no URL does, RFC 3986) made
            # the key of another issuer's account whose sub holds one ("auth0|abc").
            raise SubjectError("iss must be a URL, and holds '|'")
        return f"iss_sub:{iss}|{_text(sub.get('sub'), 'sub')}"
    if fmt in ONE_MEMBER_FORMATS:
        member = ONE_MEMBER_FORMATS[fmt]
        return f"{fmt}:{_text(sub.get(member), member)}"
    if fmt in _NOT_PRINCIPALS:
        members, what = _NOT_PRINCIPALS[fmt]
        # Malformed or not, it is passed over among aliases and complex members as before.
        for member in members:
            try:
                _text(sub.get(member), f"{fmt} {member}")
            except SubjectError as e:
                raise UnreadFormat(str(e)) from None
        raise NotAPrincipal(
            f"the subject is {what} ({fmt}, SSF 1.0 §3.4), not a user or device: bastion keeps"
            " no record of other issuers' tokens or assertions"
        )
    if fmt == "ip-addresses":
        found = sub.get("ip-addresses")
        if not isinstance(found, list) or not 0 < len(found) <= MAX_ADDRESSES:
            raise UnreadFormat(
                f"ip-addresses needs ip-addresses, a list of 1 to {MAX_ADDRESSES} addresses"
            )
        for address in found:
            try:
                ipaddress.ip_address(address if isinstance(address, str) else "")
            except ValueError:
                raise UnreadFormat("ip-addresses holds a value that is not an IP address") from None
        raise NotAPrincipal(
            "the subject is IP addresses (ip-addresses, SSF 1.0 §3.4), not a user or device:"
            " an address names no person"
        )
    raise UnreadFormat(
        f"subject format {str(fmt)[:64]!r} is not read here; use email, iss_sub,"
        f" {', '.join(ONE_MEMBER_FORMATS)}, aliases or complex"
    )


def user_keys(sub: Any) -> tuple[str, ...]:
    """The lookup keys of an identifier of one user: a simple one's key, or each of its
    ``aliases`` (RFC 9493: never aliases within aliases)."""
    if not isinstance(sub, dict) or subject_format(sub) != "aliases":
        return (simple_key(sub),)
    identifiers = sub.get("identifiers")
    if not isinstance(identifiers, list) or not 0 < len(identifiers) <= MAX_ALIASES:
        raise SubjectError(f"aliases needs identifiers, a list of 1 to {MAX_ALIASES} identifiers")
    if any(isinstance(i, dict) and subject_format(i) == "aliases" for i in identifiers):
        raise SubjectError("aliases must not hold aliases (RFC 9493)")
    keys, unread = [], []
    for identifier in identifiers:
        try:
            keys.append(simple_key(identifier))
        except UnreadFormat as e:
            # Any identifier names the subject (RFC 9493 §3.2.8): one of a format not read
            # made the whole subject unreadable, and a revocation naming the user so was lost.
            unread.append(str(e))
    if not keys:
        raise UnreadFormat(f"no identifier among the aliases is read here: {unread[0]}")
    return tuple(dict.fromkeys(keys))


def parse_subject(sub: Any) -> Subject:
    """The subject of an event (RFC 9493 §3, SSF 1.0 §3.3 complex subjects)."""
    if not isinstance(sub, dict):
        raise SubjectError("sub_id must be a JSON object (RFC 9493 subject identifier)")
    if subject_format(sub) != "complex":
        return Subject(user_keys(sub))
    unread = [k for k in sub if k not in ("format", "subject_type", *READ_MEMBERS)]
    user: tuple[str, ...] = ()
    if "user" in sub:
        try:
            user = user_keys(sub["user"])
        except UnreadFormat:
            unread.append("user")
    device, session = _member(sub, "device", unread), _member(sub, "session", unread)
    if not user and device is None:
        raise SubjectError("a complex subject needs a user or a device member read here")
    return Subject(user, device, session, tuple(unread))


def _member(sub: dict, name: str, unread: list[str]) -> str | None:
    """A complex subject's device or session id; None when absent or of a format not read
    (appended to ``unread``): an ``ip-addresses`` device left the user's revocation unread."""
    if name not in sub:
        return None
    try:
        return simple_key(sub[name]).partition(":")[2]
    except UnreadFormat:
        unread.append(name)
        return None


def identifier_of(key: str) -> dict[str, str]:
    """The RFC 9493 identifier a lookup key (a ``users`` table's, `simple_key`'s) stands for: the
    subject bastion adds to a stream (SSF 1.0 §8.1.3)."""
    fmt, _, value = key.partition(":")
    if fmt == "email":
        return {"format": "email", "email": value}
    if fmt == "iss_sub":
        iss, _, sub = value.partition("|")
        return {"format": "iss_sub", "iss": iss, "sub": sub}
    if fmt in ONE_MEMBER_FORMATS:
        return {"format": fmt, ONE_MEMBER_FORMATS[fmt]: value}
    raise ValueError(f"{key!r} is not a subject key")


def user_of(
    subject: Subject, users: dict[str, str], linked: dict[str, str] | None = None
) -> str | None:
    """The bastion user ``users`` (the transmitter's table) or ``linked`` (its accounts linked to
    users) maps the subject to, or None; `SubjectError` when its identifiers map to more than
    one (an event about one person never reaches another)."""
    linked = linked or {}
    found = {users[k] for k in subject.user_keys if k in users}
    found |= {linked[k] for k in subject.user_keys if k in linked}
    if len(found) > 1:
        raise SubjectError(
            f"its identifiers name more than one user ({', '.join(sorted(found))}): nothing done"
        )
    return found.pop() if found else None
