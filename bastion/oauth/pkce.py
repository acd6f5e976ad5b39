"""RFC 7636 Proof Key for Code Exchange, restricted to the ``S256`` method as OAuth 2.1 and the
MCP authorization specification require (``plain`` is refused)."""

from __future__ import annotations

import base64
import hashlib
import re

from bastion.constant_time import same
from bastion.oauth.errors import InvalidGrant, InvalidRequest

# RFC 7636 §4.1: 43 to 128 characters from the unreserved set. Both are matched whole
# (fullmatch): "$" would also match before a final line break, one character more.
_VERIFIER = re.compile(r"[A-Za-z0-9\-._~]{43,128}")
# An S256 challenge is the base64url (unpadded) encoding of a SHA-256 digest: 43 characters.
_S256_CHALLENGE = re.compile(r"[A-Za-z0-9\-_]{43}")


def s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def require_s256_challenge(challenge: str | None, method: str | None) -> str:
    """Return the challenge of an authorization request, or raise ``invalid_request``."""
    if not challenge:
        raise InvalidRequest("code_challenge is required (PKCE, RFC 7636, with method S256)")
    if method != "S256":
        raise InvalidRequest(
            f"code_challenge_method must be S256; {method or 'a missing method (plain)'!r}"
            " is not accepted"
        )
    if not _S256_CHALLENGE.fullmatch(challenge):
        raise InvalidRequest("code_challenge must be 43 base64url characters (an S256 digest)")
    return challenge


def check_verifier(verifier: str | None, challenge: str) -> None:
    """Raise ``invalid_grant`` unless the verifier hashes to the code's challenge."""
    if not verifier:
        raise InvalidRequest("code_verifier is required")
    if not _VERIFIER.fullmatch(verifier):
        raise InvalidGrant("code_verifier must be 43 to 128 unreserved characters (RFC 7636 §4.1)")
    if not same(s256(verifier), challenge):
        raise InvalidGrant("code_verifier does not match the code_challenge of this code")
