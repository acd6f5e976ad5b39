"""Redirect URIs (RFC 6749 §3.1.2, RFC 3986, RFC 8252 §7.3 and §8.3): which can be registered, and
whether one presented at ``/authorize`` or ``/token`` is one the client registered.

A registered URI is an RFC 3986 URI of ASCII characters the grammar allows, with no fragment and
no user information: https, or http on a loopback host. Matching is character for character, with
one exception from RFC 8252 §7.3: on a loopback IP literal over http (``127.0.0.1``, ``[::1]``) the
port may differ, because a native app listens on whatever port the system gives it that time.
``http://localhost`` can be registered (MCP clients use it and the MCP specification names it)
but is matched exactly, port included: RFC 8252 §8.3 recommends the IP literal, whose port may
vary; a name is resolved by the device and may reach beyond the loopback interface.

Whether a redirect URI proves who receives at it (RFC 8252 §8.6) is `is_claimed_https`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from bastion.egress import is_loopback_host

MAX_LENGTH = 2000

# RFC 3986 §2: unreserved, reserved (gen-delims and sub-delims) and "%". Anything else (controls,
# space, non-ASCII, backslash, quotes, <>, ^, `, {, |, }) is not part of any URI.
_URI_CHARACTERS = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]*")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
# http://<loopback IP literal>[:port]<path and query>, split so the port can be left out.
# The last label of a host a browser reads as an IPv4 address (WHATWG URL: decimal or 0x-hex
# numbers, so ``2130706433`` and ``0x7f.1`` are 127.0.0.1).
_NUMERIC_LABEL = re.compile(r"[0-9]+|0[xX][0-9A-Fa-f]*")
_LOOPBACK_LITERAL = re.compile(
    r"http://(?P<host>[0-9.]+|\[[0-9A-Fa-f:.]+\])(?::(?P<port>[0-9]{1,5}))?(?P<rest>[/?].*|)",
    re.DOTALL,
)


def uri_syntax_problem(uri: str) -> str | None:
    """Why ``uri`` is not an RFC 3986 URI (characters, scheme, percent-encoding), or None."""
    if not _URI_CHARACTERS.fullmatch(uri):
        bad = next(c for c in uri if not _URI_CHARACTERS.fullmatch(c))
        return (
            f"has a character RFC 3986 does not allow ({bad!r} at position {uri.index(bad)});"
            " percent-encode it"
        )
    if not _SCHEME.match(uri):
        return "has no scheme"
    if _BAD_PERCENT.search(uri):
        return "has a '%' that is not followed by two hexadecimal digits"
    return None


def redirect_uri_problem(uri: Any) -> str | None:
    """Why a redirect URI cannot be registered, or None when it can."""
    if not isinstance(uri, str) or not uri or len(uri) > MAX_LENGTH:
        return f"a redirect URI must be a non-empty string of at most {MAX_LENGTH} characters"
    syntax = uri_syntax_problem(uri)
    if syntax:
        return f"redirect URI {uri!r} {syntax}"
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        return f"redirect URI {uri!r} is not a valid URL"
    if parts.fragment or "#" in uri:
        return f"redirect URI {uri!r} must not have a fragment"
    if parts.username is not None or parts.password is not None:
        return f"redirect URI {uri!r} must not carry user information"
    if "[" in parts.path + parts.query or "]" in parts.path + parts.query:
        return f"redirect URI {uri!r} may have brackets only around an IPv6 host (RFC 3986 §3.2.2)"
    if parts.scheme == "https" and parts.hostname:
        return None
    if parts.scheme == "http" and is_loopback_host(parts.hostname):
        return None
    return f"redirect URI {uri!r} must be https, or http on a loopback address (RFC 8252 §7.3)"


def _without_loopback_port(uri: str) -> str | None:
    """``uri`` with its port left out when it is http on a loopback IP literal, else None."""
    match = _LOOPBACK_LITERAL.fullmatch(uri)
    if match is None or "#" in match["rest"]:
        return None
    try:
        if not ipaddress.ip_address(match["host"].strip("[]")).is_loopback:
            return None
    except ValueError:
        return None
    if match["port"] is not None and not 0 < int(match["port"]) < 65536:
        return None
    return f"http://{match['host']}{match['rest']}"


def redirect_uri_allowed(registered: Iterable[str], presented: str) -> bool:
    """Whether ``presented`` is one of the ``registered`` redirect URIs: the same string, or, on a
    loopback IP literal over http, the same string but for the port (RFC 8252 §7.3). Both the
    authorization and the token endpoint ask this, and nothing else."""
    registered = tuple(registered)
    if presented in registered:
        return True
    key = _without_loopback_port(presented)
    return key is not None and any(_without_loopback_port(uri) == key for uri in registered)


def is_claimed_https(uri: str) -> bool:
    """Whether ``uri`` is a claimed https redirect (RFC 8252 §8.6, §7.2): https on a DNS name of
    its own, where the browser hands the code only to a server holding a certificate for that
    name. Not http; not an IP address in any form a browser reads (any program on the device,
    or the network, may answer at one); not ``localhost`` or a name under it (RFC 6761: the
    device itself), where a locally trusted certificate (a developer's own CA) is enough."""
    parts = urlsplit(uri)
    host = (parts.hostname or "").rstrip(".")
    if parts.scheme != "https" or not host or ":" in host:
        return False
    if _NUMERIC_LABEL.fullmatch(host.rsplit(".", 1)[-1]):
        return False
    return host != "localhost" and not host.endswith(".localhost")
