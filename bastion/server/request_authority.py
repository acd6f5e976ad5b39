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

`AllowedHosts` is ``[server] allowed_hosts``: the names bastion answers to. A request for another
host (a page that reached a bastion on a loopback or private address by DNS rebinding names its
own) is refused 421 Misdirected Request (RFC 9110 §15.5.20: "the server is unwilling to produce
an authoritative response for the target URI").
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

# Answered whatever the Host: load balancers' and Kubernetes' probes name the address they reach.
PROBES = frozenset({b"/healthz", b"/readyz"})
# Ports a Host may leave out (RFC 9110 §4.2.1, §4.2.2): an entry of one also admits no port, since
# behind a proxy that ends TLS bastion cannot tell which scheme the client used.
DEFAULT_PORTS = frozenset({80, 443})
# An entry: a DNS name (letters, digits, "-" and "_" in labels of 1 to 63), an IPv4 address or an
# IPv6 address in brackets; then a port.
_ENTRY = re.compile(
    r"(?:\[(?P<literal>[0-9a-f:.]+)\]|(?P<name>[0-9a-z_](?:[0-9a-z_-]{0,61}[0-9a-z_])?"
    r"(?:\.[0-9a-z_](?:[0-9a-z_-]{0,61}[0-9a-z_])?)*)\.?)(?::(?P<port>[0-9]{1,5}))?"
)
_IPV4_LIKE = re.compile(r"[0-9.]+")
# The ports of a name no entry gives: none.
_UNLISTED: frozenset[bytes] = frozenset()

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


class AllowedHosts:
    """The host names and addresses bastion answers to (``[server] allowed_hosts``), each with
    the ports it is answered on (any, when its entry gives none): a request's ``Host`` is looked
    up once, by its name, compared without regard to case and without a final dot."""

    def __init__(self, entries: tuple[str, ...] | list[str]) -> None:
        """``entries`` as written (`ValueError` naming the first that is no host and port)."""
        hosts: dict[bytes, frozenset[bytes] | None] = {}
        for entry in entries:
            name, port = _entry(entry)
            known = hosts.get(name, _UNLISTED)
            if port is None or known is None:
                hosts[name] = None  # any port
                continue
            # A Host without a port (b"", or b"" after "name:") is for the scheme's default port.
            ports = {b"%d" % port, *([b""] if port in DEFAULT_PORTS else [])}
            hosts[name] = known | ports
        self._hosts = hosts

    def admits(self, host: bytes) -> bool:
        """Whether ``host`` (a Host header's value, valid by `authority_problem`) names one of
        them."""
        host = host.lower()
        if host[-1:] == b"]":
            name, port = host, b""
        else:
            name, _, port = host.rpartition(b":")
            if not name:
                name, port = host, b""
        if name[-1:] == b".":
            name = name[:-1]
        elif name[:1] == b"[":  # an IPv6 address has more than one spelling: its shortest
            try:
                name = b"[%s]" % ipaddress.IPv6Address(name[1:-1].decode()).compressed.encode()
            except ValueError:
                return False
        ports = self._hosts.get(name, _UNLISTED)
        return ports is None or port in ports

    def refusal(
        self, headers: list[tuple[bytes, bytes]], names: list[bytes], target: bytes
    ) -> str | None:
        """Why this request, its authority valid (`authority_problem`), is refused 421, or None:
        its ``Host`` (which an absolute target's authority agrees with) is none of the names
        bastion answers to. A request without ``Host`` (HTTP/1.0) names no host: bastion builds
        from its own address. `PROBES` answer whatever the Host."""
        if b"host" not in names:
            return None
        host = headers[names.index(b"host")][1]
        if self.admits(host) or target in PROBES:
            return None
        return (
            f"this server does not answer to the host {_shown(host)}: it is not in its"
            " [server] allowed_hosts"
        )


def _entry(entry: object) -> tuple[bytes, int | None]:
    """An entry of ``allowed_hosts``: its name as `AllowedHosts.admits` compares it, and its
    port (None: any)."""
    if not isinstance(entry, str):
        raise ValueError(f"allowed_hosts holds host names as strings, got {entry!r}")
    text = entry.strip().lower()
    # Matched only as ASCII: str.lower makes the Kelvin sign (U+212A) a "k", a name it is not.
    match = _ENTRY.fullmatch(text) if entry.isascii() else None
    problem = None
    if "*" in text:
        problem = (
            "has a wildcard: list each name bastion is reached at (leave allowed_hosts empty"
            " to answer to every host)"
        )
    elif "/" in text or "@" in text:
        problem = "is a URL or has a path or userinfo: write a host name or address, and a port"
    elif text.count(":") > 1 and not text.startswith("["):
        problem = "is an IPv6 address without brackets: write it as [::1], or [::1]:8000"
    elif match is None:
        problem = (
            "is not a host name (ASCII letters, digits, '-' and '_' in labels; a name of other"
            " letters in its xn-- form), an IPv4 address or an IPv6 address in brackets,"
            " optionally followed by :port"
        )
    elif match["port"] is not None and not 0 < int(match["port"]) <= 65535:
        problem = "has a port outside 1 to 65535"
    elif match["literal"] is not None and not _ip_literal(match["literal"].encode()):
        problem = "has brackets around something that is no IPv6 address"
    elif match["name"] is not None and _IPV4_LIKE.fullmatch(match["name"]):
        try:
            ipaddress.IPv4Address(match["name"])
        except ValueError:
            problem = "is not an IPv4 address (four numbers of 0 to 255, without leading zeros)"
    if problem is not None:
        raise ValueError(f"allowed_hosts: {entry!r} {problem}")
    assert match is not None
    if match["literal"] is not None:
        name = f"[{ipaddress.IPv6Address(match['literal']).compressed}]"
    else:
        name = match["name"]
    return name.encode(), None if match["port"] is None else int(match["port"])
