"""Resource URIs as bastion takes them from clients: one spelling of each (RFC 3986, section 6).

A resource is decided as the literal text of its URI (``McpResource{"<server>/<uri>"}``), while an
upstream may read several spellings as one: the MCP SDK's ``AnyUrl`` lower-cases the scheme,
removes dot segments (``%2e%2e`` too) and strips surrounding whitespace. A URI that such a reading
would change is refused, so that a rule about one spelling cannot be passed by another.
"""

from __future__ import annotations

import re
from typing import Any

from bastion.gateway.jsonrpc import INVALID_PARAMS, RpcError

# Controls, the space (a parser drops or encodes them) and the backslash (read as "/").
_STRAY = re.compile(r"[\x00-\x20\x7f-\x9f\\]")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")
# RFC 3986, section 2.3: percent-encoding one of these is another spelling of it.
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def spelling_refused(uri: str) -> str | None:
    """Why ``uri`` is not in the one spelling bastion takes, or None if it is."""
    if uri != uri.strip() or _STRAY.search(uri):
        return "holds whitespace, a control character or a backslash"
    scheme = _SCHEME.match(uri)
    rest = uri[scheme.end() :] if scheme else uri
    if scheme and scheme.group() != scheme.group().lower():
        return "has an upper-case scheme"
    path = rest.partition("#")[0].partition("?")[0]
    if path.startswith("//"):
        authority, slash, path = path[2:].partition("/")
        host = authority.rpartition("@")[2]
        if host != host.lower():
            return "has an upper-case host"
        path = slash + path
    if any(segment in (".", "..") for segment in path.split("/")):
        return "has a . or .. path segment"
    if "%" in uri and any(chr(int(h, 16)) in _UNRESERVED for h in _PERCENT.findall(uri)):
        return "percent-encodes a letter, digit, -, ., _ or ~"
    return None


def resource_uri(value: Any, max_chars: int, where: str = "params.uri") -> str:
    """The resource URI a client sent as ``where``: a non-empty string of at most ``max_chars``
    characters (`checked_name`) in the one spelling bastion takes (`spelling_refused`), else
    refused (-32602)."""
    checked_name(value, max_chars, where)
    refusal = spelling_refused(value)
    if refusal is not None:
        raise RpcError(
            INVALID_PARAMS,
            f"{where} {refusal}: resource URIs are matched as written, so bastion takes each in"
            " one spelling only (RFC 3986's normal form)",
            http_status=400,
        )
    return value


def checked_name(value: Any, max_chars: int, where: str) -> str:
    """A name a client sent as ``where`` (a tool's, a prompt's, a resource URI): a non-empty
    string of at most ``max_chars`` characters (``gateway.max_name_chars``), else refused
    (-32602). Every name is a key of what the gateway keeps (decision records, behaviour
    counters, rate-limit windows, subscriptions): bounded here, it is bounded in each of them."""
    if not isinstance(value, str) or not value:
        raise RpcError(INVALID_PARAMS, f"{where} must be a non-empty string", http_status=400)
    if len(value) > max_chars:
        raise RpcError(
            INVALID_PARAMS,
            f"{where} is longer than {max_chars} characters (gateway.max_name_chars)",
            http_status=400,
        )
    return value
