"""Comparing a value a request presents (a token, a CSRF token, a MAC, a nonce) with the one
bastion holds, in a time that does not tell where they differ."""

from __future__ import annotations

import hmac


def same(given: str | bytes, held: str | bytes) -> bool:
    """Whether ``given`` equals ``held`` (`hmac.compare_digest`), text compared as its UTF-8
    bytes, lone surrogates passed through: `hmac.compare_digest` raises `TypeError` for text
    beyond ASCII, which a request's value may be (a form field, a header read as Latin-1, a JSON
    claim), and that was a 500 where a refusal was meant."""
    if isinstance(given, str):
        given = given.encode("utf-8", "surrogatepass")
    if isinstance(held, str):
        held = held.encode("utf-8", "surrogatepass")
    return hmac.compare_digest(given, held)
