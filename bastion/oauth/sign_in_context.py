"""How a person signed in: the ``acr`` (authentication context class reference) and ``amr``
(authentication methods references) of OpenID Connect Core 1.0 §2, the values of ``amr`` as RFC
8176 names them ("pwd", "mfa", "hwk", "otp"...).

Read with one set of checks wherever they come from (a provider's ID token, a trusted issuer's
access token, an ID-JAG, bastion's own tokens): ``acr`` a string of 1 to `MAX_ACR_CHARS`
printable characters, ``amr`` a list of at most `MAX_AMR_VALUES` such strings of 1 to
`MAX_AMR_CHARS`; anything else is refused, never dropped (a policy would otherwise read a
malformed claim as no claim). Kept with the login session and each grant made from it, carried
by the access tokens bastion issues (RFC 9068 §2.2.1 allows both claims), and shown to the
policy as ``context.token.acr`` and ``context.token.amr``. A password typed at bastion is
`PASSWORD`: ``amr`` ``["pwd"]`` and no ``acr`` (bastion has no classes of its own to name).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Far longer than any real value (a URN such as "urn:mace:incommon:iap:silver", "phr"), short
# enough that a token or a session row cannot be swollen with them.
MAX_ACR_CHARS = 256
MAX_AMR_VALUES = 16
MAX_AMR_CHARS = 64


class SignInContextError(ValueError):
    """A malformed ``acr`` or ``amr`` (``claim``): the message names it and what it must be."""

    def __init__(self, claim: str, message: str) -> None:
        super().__init__(message)
        self.claim = claim


@dataclass(frozen=True, slots=True)
class SignInContext:
    """The ``acr`` and ``amr`` of one sign-in; None for a value not known (a provider that did
    not say, a grant or a token from before bastion kept them)."""

    acr: str | None = None
    amr: tuple[str, ...] | None = None

    def claims(self) -> dict[str, Any]:
        """The claims of an access token (or a context) that say this: those known only."""
        said: dict[str, Any] = {}
        if self.acr is not None:
            said["acr"] = self.acr
        if self.amr is not None:
            said["amr"] = list(self.amr)
        return said

    def stored_amr(self) -> str | None:
        """``amr`` as a database column holds it (JSON text), or None."""
        return None if self.amr is None else json.dumps(list(self.amr))

    @classmethod
    def from_stored(cls, acr: str | None, amr: str | None) -> SignInContext:
        """As `stored_amr` and an ``acr`` column left it (bastion wrote both, checked)."""
        return cls(acr, None if amr is None else tuple(json.loads(amr)))


UNKNOWN = SignInContext()
PASSWORD = SignInContext(amr=("pwd",))


def _usable(value: object, most: int) -> bool:
    return isinstance(value, str) and 0 < len(value) <= most and value.isprintable()


def read_sign_in_context(claims: Mapping[str, Any]) -> SignInContext:
    """The ``acr`` and ``amr`` of ``claims`` (absent: None); `SignInContextError` saying what is
    wrong with a malformed one."""
    acr = claims.get("acr")
    if acr is not None:
        if not isinstance(acr, str):
            raise SignInContextError("acr", "acr must be a string")
        if not _usable(acr, MAX_ACR_CHARS):
            raise SignInContextError(
                "acr", f"acr must be 1 to {MAX_ACR_CHARS} printable characters"
            )
    amr = claims.get("amr")
    if amr is not None:
        if not isinstance(amr, list) or not all(isinstance(v, str) for v in amr):
            raise SignInContextError("amr", "amr must be a list of strings (RFC 8176)")
        if len(amr) > MAX_AMR_VALUES:
            raise SignInContextError("amr", f"amr may hold at most {MAX_AMR_VALUES} values")
        if not all(_usable(v, MAX_AMR_CHARS) for v in amr):
            raise SignInContextError(
                "amr", f"each value of amr must be 1 to {MAX_AMR_CHARS} printable characters"
            )
        amr = tuple(amr)
    return SignInContext(acr, amr)
