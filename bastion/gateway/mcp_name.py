"""The ``Mcp-Name`` header of MCP 2026-07-28 (Streamable HTTP, "Request Metadata"): which
params field it mirrors, and its value encoding, as bastion reads it from clients and writes it
to upstreams. One reading for both sides, so that what bastion compares with a client's body is
what it writes for the same name upstream.
"""

from __future__ import annotations

import base64

# The methods whose Mcp-Name is required, and the params field it mirrors.
NAME_PARAMS = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
_PREFIX, _SUFFIX = "=?base64?", "?="


def _looks_encoded(value: str) -> bool:
    return value.startswith(_PREFIX) and value.endswith(_SUFFIX)


def encode(name: str) -> str:
    """The header value for ``name``: as it is if it is plain ASCII a header keeps as sent; else
    ``=?base64?...?=`` of its UTF-8 (non-ASCII text, controls, surrounding whitespace, which
    HTTP strips, and a plain name that reads as the encoded form, which a reader would decode)."""
    if name.isascii() and name.isprintable() and name.strip() == name and not _looks_encoded(name):
        return name
    return _PREFIX + base64.b64encode(name.encode()).decode() + _SUFFIX


def decode(value: str | None) -> str | None:
    """The name a header value carries; None for an encoded value with anything outside
    base64's alphabet in it (b64decode by default skips that, where a strict reader refuses
    it), or that is not UTF-8."""
    if value and _looks_encoded(value):
        try:
            return base64.b64decode(value[len(_PREFIX) : -len(_SUFFIX)], validate=True).decode()
        except ValueError:
            return None
    return value
