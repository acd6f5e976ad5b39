"""Names that people give and read back on a line of their own: a username, an API key's name;
whether a token's claim may name a user at all, and the prefix that keeps one source's users
apart from another's."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# The longest name (characters): a username or a key's name.
MAX_NAME_LENGTH = 128
# The longest ``user_prefix`` (characters): the user id is the prefix then a claim's value.
MAX_USER_PREFIX = 64
# Why a token's ``user_claim`` of ``email`` cannot name a user (`vouched_for`).
UNVERIFIED_EMAIL = (
    "The issuer does not vouch for the email address (email_verified is not true): it cannot"
    " name the user."
)


def vouched_for(claims: Mapping[str, Any], user_claim: str) -> bool:
    """Whether the issuer vouches for the claim that names the user. An email address names a
    person only with ``email_verified`` true (OpenID Connect Core §5.1): one the provider did not
    verify is what somebody typed, which may be another person's. One rule for every token that
    names a user (an ID token at sign-in, a trusted issuer's access token, an ID-JAG)."""
    return user_claim != "email" or claims.get("email_verified") is True


def check_name(
    value: object, what: str, error: type[Exception] = ValueError, most: int = MAX_NAME_LENGTH
) -> str:
    """``value`` if it is 1 to ``most`` printable characters without surrounding spaces, else
    ``error`` saying so of ``what``. Printable: no newline or other control character, which
    would forge a line of `bastion keys list` or `users list`, or of a log."""
    if (
        not isinstance(value, str)
        or not value
        or len(value) > most
        or not value.isprintable()
        or value.strip() != value
    ):
        raise error(f"{what} is 1 to {most} printable characters without surrounding spaces")
    return value


def user_prefix_problem(value: object) -> str | None:
    """Why ``value`` cannot be a ``user_prefix``, or None. The prefix puts one identity source's
    users (a provider's at sign-in, a trusted issuer's, an ID-JAG issuer's) in a namespace of
    their own, so that its ``sub`` "alice" is not bastion's local user "alice"."""
    if not isinstance(value, str) or len(value) > MAX_USER_PREFIX or not value.isprintable():
        return f"a string of at most {MAX_USER_PREFIX} printable characters"
    return None
