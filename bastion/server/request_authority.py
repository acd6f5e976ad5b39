"""The authority a request is for (RFC 9112 §3.2, §3.2.2; RFC 9110 §7.2): its ``Host`` header,
one and valid, agreeing with the request target's authority when the target is an absolute URL.

RFC 9112 §3.2: "A server MUST respond with a 400 (Bad Request) status code to any HTTP/1.1 request
message that lacks a Host header field and to any request message that contains more than one
Host header field line or a Host header field with an invalid field value." A request in absolute
form (``GET http://other/v1/...``) names its authority twice; RFC 9112 §3.2.2 has the server take
the target's and ignore ``Host``, where a proxy in front may have routed or cached by ``Host``:
bastion refuses the two when they differ, so that every URL it builds from the request (AuthZEN's
metadata without ``[server] public_url``, Starlette's ``request.url``) names the one authority
the client sent in both places. A request in HTTP/1.0 may leave ``Host`` out (then bastion builds
from its own address), as HTTP/1.0 clients did.
"""

from __future__ import annotations

import ipaddress
import re

# uri-host [ ":" port ] (RFC 9110 §7.2, RFC 3986 §3.2.2): a reg-name (unreserved, pct-encoded and
# sub-delims characters, not empty: RFC 9110 §4.2.1 refuses an http URI with an empty host) or an
# IP literal, then a port of digits. Nearly every Host is a name or an IPv4 address and a port,
# matched at once (_PLAIN); an escape or an IP literal is checked the long way.
_PLAIN = re.compile(rb"[A-Za-z0-9\-._~!$&'()*+,;=]+(?::[0-9]*)?")
_HOST = re.compile(
    rb"(?:\[(?P<literal>[0-9A-Fa-f:.]+)\]|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})+)"
    rb"(?::[0-9]*)?"
)
# An absolute-form target (RFC 9112 §3.2.2): its scheme and authority.
_ABSOLUTE = re.compile(rb"(?P<scheme>[A-Za-z][A-Za-z0-9+\-.]*)://(?P<authority>[^/?#]*)")
# HTTP versions whose requests need not carry Host (before HTTP/1.1).
_BEFORE_HOST = frozenset({"1.0", "0.9"})

MISSING = "the request has no Host header (RFC 9112 §3.2: every HTTP/1.1 request names its host)"
TWICE = "the request has more than one Host header (RFC 9112 §3.2 allows one)"


def authority_problem(
    headers: list[tuple[bytes, bytes]], names: list[bytes], target: bytes, version: str
) -> str | None:
    """Why this request's authority is refused (a 400), or None: its header ``names``
    (lowercased, in the order of ``headers``), its request ``target`` as sent and its HTTP
    ``version`` ("1.1")."""
    count = names.count(b"host")
    if count != 1:
        if count == 0 and version in _BEFORE_HOST:
            return _target_problem(target, None)
        return MISSING if count == 0 else TWICE
    host = headers[names.index(b"host")][1]
    if _PLAIN.fullmatch(host) is None and not _valid_host(host):
        return f"the Host header is not a host and port: {_shown(host)}"
    if target[:1] == b"/":  # origin-form, nearly every request: nothing more to compare
        return None
    return _target_problem(target, host)


def _valid_host(host: bytes) -> bool:
    match = _HOST.fullmatch(host)
    return match is not None and (match["literal"] is None or _ip_literal(match["literal"]))


def _target_problem(target: bytes, host: bytes | None) -> str | None:
    if target[:1] == b"/" or target == b"*":
        return None
    absolute = _ABSOLUTE.match(target)
    if absolute is None or absolute["scheme"].lower() not in (b"http", b"https"):
        return f"the request target is not a path or an http(s) URL: {_shown(target)}"
    authority = absolute["authority"]
    if host is None or authority.lower() != host.lower():
        named = "no Host header" if host is None else f"the Host header {_shown(host)}"
        return (
            f"the request target's authority {_shown(authority)} is not the same as {named}"
            " (RFC 9112 §3.2: a client sends the target's authority as Host)"
        )
    return None


def _ip_literal(text: bytes) -> bool:
    try:
        ipaddress.IPv6Address(text.decode("ascii"))
    except ValueError:
        return False
    return True


def _shown(value: bytes) -> str:
    return repr(value[:100].decode("latin-1"))
