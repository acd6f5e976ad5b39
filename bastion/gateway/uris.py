"""Resource URIs as bastion takes them from clients: one spelling of each (RFC 3986, section 6).

A resource is decided as the literal text of its URI (``McpResource{"<server>/<uri>"}``), while an
upstream may read several spellings as one. The MCP SDK's resource templates percent-decode what
they capture (``customers://{id}`` reads ``customers://%41da``, ``customers://%41%64a`` and
``customers://Ada`` as the id ``Ada``; ``{+path}`` reads ``a%2Fb`` as ``a/b``) and drop a
fragment; its (1.x) ``AnyUrl``, like every WHATWG URL parser, lower-cases the scheme and host,
removes dot segments and default ports, percent-encodes non-ASCII text and maps a Unicode host to
ASCII (``ｅxample.com``, ``exa\\u200bmple.com`` and ``ex%41mple.com`` are ``example.com``). A URI
that such a reading would take for another spelling is refused, so that a rule, a mask or an
approval about one spelling cannot be passed by another: bastion takes each URI only as RFC 3986
writes it, each character as it is where it may stand so, percent-encoded (in upper-case hex)
only where it may not.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from bastion.gateway.jsonrpc import INVALID_PARAMS, RpcError

# What a URI may not hold as it is (RFC 3986, section 2): controls, the space and every other
# non-ASCII or excluded character (a parser drops, maps or encodes them: the backslash is read as
# "/", ``ｅ`` as ``e``, ``"`` as ``%22``); each is written percent-encoded.
_STRAY = re.compile(r'[^\x21-\x7e]|["<>\\^`{|}]')
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
# A percent sign, and what follows it when that is a percent-encoding in normal form.
_PERCENT = re.compile(r"%(?:([0-9A-F]{2})|)")
_ESCAPE = re.compile(r"%[0-9A-F]{2}")
_UNRESERVED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
# RFC 3986's delimiters, which stand as they are in the path (and host), except ``?`` and ``#``
# that end it; and in a query, except ``&`` and ``=`` that a server splits it at (and ``#``).
_DELIMITERS = ":/?#[]@!$&'()*+,;="
# Characters whose percent-encoding is another spelling of them, before the query and in it
# (the SDK's templates decode both alike), or which no reading may take as text (controls).
_CONTROLS = "".join(map(chr, range(0x20))) + "\x7f"
_LITERAL_IN_PATH = frozenset(
    _UNRESERVED + _DELIMITERS.replace("?", "").replace("#", "") + _CONTROLS
)
_LITERAL_IN_QUERY = frozenset(
    _UNRESERVED + "".join(c for c in _DELIMITERS if c not in "&=#") + _CONTROLS
)
# WHATWG URL parsers percent-encode ``'`` in the query of the schemes they rewrite (below).
_LITERAL_IN_SPECIAL_QUERY = _LITERAL_IN_QUERY - {"'"}
# Schemes a WHATWG URL parser rewrites (host, port, path) and their default ports.
_SPECIAL = {"http": "80", "https": "443", "ws": "80", "wss": "443", "ftp": "21", "file": ""}
# A template expression of RFC 6570 (``{id}``, ``{+path}``, ``{?q,lang}``) in a completion's
# ``ref/resource``: checked as if it were one plain character.
_EXPRESSION = re.compile(r"\{[^{}]*\}")


def spelling_refused(uri: str, template: bool = False) -> str | None:
    """Why ``uri`` is not in the one spelling bastion takes, or None if it is. ``template``: a
    URI template (a completion's ``ref/resource``), whose expressions are not checked."""
    if template:
        uri = _EXPRESSION.sub("t", uri)
    if _STRAY.search(uri):
        return (
            "holds a character a URI may not hold as it is (whitespace, a control or a"
            " backslash, a non-ASCII or other one: percent-encode it, in UTF-8)"
        )
    if "#" in uri:
        return "has a fragment (#), which is the client's own and no part of the resource"
    scheme = _SCHEME.match(uri)
    name = scheme.group()[:-1] if scheme else ""
    rest = uri[scheme.end() :] if scheme else uri
    if name != name.lower():
        return "has an upper-case scheme"
    before, question, query = rest.partition("?")
    if question and not query:
        return "has an empty query (?)"
    if any(pair.count("=") > 1 for pair in query.split("&")):
        return "has a query parameter holding a second = (written %3D)"
    if "%" in uri:
        refusal = _percent_refused(before, _LITERAL_IN_PATH)
        if refusal is None and question:
            special = name in _SPECIAL
            refusal = _percent_refused(
                query, _LITERAL_IN_SPECIAL_QUERY if special else _LITERAL_IN_QUERY
            )
        if refusal is not None:
            return refusal
    path, authority = before, None
    if path.startswith("//"):
        authority, slash, path = path[2:].partition("/")
        path = slash + path
        host, port, userinfo = _host(authority)
        if host != host.lower() and _ESCAPE.sub("", host) != _ESCAPE.sub("", host).lower():
            return "has an upper-case host"
        # Compared as text: `int` of a port of thousands of digits raises.
        if port is not None and not (
            port.isascii() and port.isdigit() and port == (port.lstrip("0") or "0")
        ):
            return "has an empty port (:), or one written with leading zeros"
        if userinfo is not None and (not userinfo or userinfo.endswith(":")):
            return "has an empty user name or password"
        if host.startswith("[") and host[1:-1] != _compressed(host[1:-1]):
            return "has an IPv6 address not in its shortest form"
    if any(segment in (".", "..") for segment in path.split("/")):
        return "has a . or .. path segment"
    if name in _SPECIAL:
        return _special_refused(name, authority, path, query)
    return None


def upstream_uri(uri: str) -> str | None:
    """A resource URI an upstream sent (``notifications/resources/updated``) in the one spelling
    bastion takes from clients, so that it is compared with their subscriptions and decided by
    the policy as they write it, and neither matches nor misses one by its spelling: as sent if
    it is in that spelling; else the same URI as RFC 3986 (section 6.2.2) and RFC 3987 (section
    3.1) read it (the scheme in lower case, a fragment dropped, non-ASCII text percent-encoded
    in UTF-8, percent-encodings in upper-case hex, those of letters, digits and ``-._~``
    decoded) if that is in it; else None: no client could have named it, and it is dropped."""
    if spelling_refused(uri) is None:
        return uri
    uri = uri.partition("#")[0]
    if (scheme := _SCHEME.match(uri)) is not None:
        uri = scheme.group().lower() + uri[scheme.end() :]
    try:
        uri = "".join(c if c.isascii() else _encoded(c) for c in uri)
    except UnicodeEncodeError:  # a lone surrogate: no URI spells it
        return None
    uri = _ANY_ESCAPE.sub(_normal_escape, uri)
    return uri if spelling_refused(uri) is None else None


_ANY_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")


def _encoded(char: str) -> str:
    return "".join(f"%{byte:02X}" for byte in char.encode())


def _normal_escape(found: re.Match[str]) -> str:
    char = chr(int(found.group(1), 16))
    return char if char in _UNRESERVED else f"%{found.group(1).upper()}"


def _percent_refused(text: str, literal: frozenset[str]) -> str | None:
    for found in _PERCENT.finditer(text):
        digits = found.group(1)
        if digits is None:
            return "has a % that is not a percent-encoding in upper-case hex (%2F, not %2f)"
        char = chr(int(digits, 16))
        if char in _CONTROLS:
            return f"percent-encodes a control character (%{digits})"
        if char in literal:
            return f"percent-encodes {char} (%{digits}), which it must write as it is"
    return None


def _host(authority: str) -> tuple[str, str | None, str | None]:
    """The host, port (None: none written) and user information (None: no ``@``) of an
    authority."""
    at = authority.rfind("@")
    userinfo, hostport = (authority[:at], authority[at + 1 :]) if at >= 0 else (None, authority)
    if hostport.startswith("[") and "]" in hostport:
        end = hostport.index("]") + 1
        host, after = hostport[:end], hostport[end:]
        return host, after[1:] if after.startswith(":") else None, userinfo
    host, colon, port = hostport.partition(":")
    return host, port if colon else None, userinfo


def _special_refused(scheme: str, authority: str | None, path: str, query: str) -> str | None:
    """Why a URI of a scheme WHATWG URL parsers rewrite (``http``, ``https``, ``ws``, ``wss``,
    ``ftp``, ``file``) is not as they write it back, or None."""
    if authority is None:
        return f"is not written {scheme}://"
    host, port, userinfo = _host(authority)
    if not host and scheme != "file":
        return "has no host"
    if scheme == "file" and (host == "localhost" or port is not None or userinfo is not None):
        return "names the local host of a file: URI other than as file:///"
    if "%" in host:
        return "percent-encodes its host"
    if port == _SPECIAL[scheme]:
        return "has its scheme's default port"
    if not path:
        return "has an empty path (read as /)"
    if "'" in query:
        return "has a ' in its query (written %27)"
    if not host.startswith("[") and _looks_numeric(host) and host != _dotted(host):
        return "has an IPv4 address not written as four decimal numbers"
    return None


def _compressed(address: str) -> str | None:
    try:
        return ipaddress.IPv6Address(address).compressed
    except ValueError:
        return None


def _dotted(host: str) -> str | None:
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        return None


def _looks_numeric(host: str) -> bool:
    """Whether a WHATWG URL parser reads ``host`` as an IPv4 address (its last label is a
    number, in decimal or hex: ``127.1``, ``0x7f.1``, ``2130706433``)."""
    labels = host.split(".")
    if len(labels) > 1 and not labels[-1]:
        labels.pop()
    last = labels[-1]
    return last.isdigit() or (
        last[:2] in ("0x", "0X") and all(c in "0123456789abcdefABCDEF" for c in last[2:])
    )


def resource_uri(
    value: Any, max_chars: int, where: str = "params.uri", template: bool = False
) -> str:
    """The resource URI a client sent as ``where``: a non-empty string of at most ``max_chars``
    characters (`checked_name`) in the one spelling bastion takes (`spelling_refused`), else
    refused (-32602). ``template``: a URI template (a completion's ``ref/resource``)."""
    checked_name(value, max_chars, where)
    refusal = spelling_refused(value, template)
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


def plain_name(name: str) -> bool:
    """Whether ``name`` (a tool's or a prompt's) is printable ASCII without surrounding spaces:
    the only names that a person reading them (an approval page, a decision record, `bastion
    approvals show`) cannot take for another. Names are matched as written, and ``ѕend_email``
    (a Cyrillic ``ѕ``), ``send\u200b_email`` (a zero-width space), ``ｓend_email`` (fullwidth) or
    ``send_email `` would each be another tool shown as ``send_email``. MCP asks tool names to be
    ASCII letters, digits, ``_``, ``-`` and ``.``."""
    return name.isascii() and name.isprintable() and name.strip() == name


def tool_or_prompt_name(value: Any, max_chars: int, where: str) -> str:
    """The name of a tool or a prompt a client sent as ``where``: `checked_name`, and a
    `plain_name`, else refused (-32602)."""
    checked_name(value, max_chars, where)
    if not plain_name(value):
        raise RpcError(
            INVALID_PARAMS,
            f"{where} must be printable ASCII without surrounding spaces: a name read by people"
            " (approvals, records) must not pass for another",
            http_status=400,
        )
    return value
