"""Where bastion's requests to other parties may go: over https, or plain http to the loopback
only (`cleartext_problem`, checked by every outbound client as each request leaves:
`bastion.tls.fetching_client`); and, to addresses someone else chose, public addresses only.

A client ID metadata document's URL is chosen by whoever names it as a client_id, a registered
client's ``jwks_uri`` by whoever registered it, and the endpoints a peer's own metadata names by
that peer: an upstream MCP server's authorization server and its endpoints
(`bastion.connections.upstream_oauth`), an identity provider's, a trusted issuer's or an ID-JAG
provider's key set, token, UserInfo and introspection endpoints, a Shared Signals transmitter's
key set, stream management and poll endpoints. Fetched as given, they reached the loopback, the
cloud's metadata service (169.254.169.254) and the operator's private network (SSRF), and the
refusal told what was there. `pinned` resolves the name once, refuses unless every address it
gave may be reached (`may_connect`: public, or within what the fetch's setting allows), and has
the connection made to the address it checked (a name resolved again could lead elsewhere: DNS
rebinding), with the request and TLS still the name's. A webhook receiver's URL is the
operator's, but its name is whoever controls its DNS: its deliveries are pinned too
(`bastion.webhooks.Outbox`).

A setting that allows non-public addresses (``allow_private_addresses``) is read by one function,
`private_allowance`: ``false`` (none), ``true`` (every one), or a list of networks (only those);
unset on a peer, `metadata_allowance` says what its metadata may lead to.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import Any, TypeAlias
from urllib.parse import urlsplit

import anyio
import httpx

log = logging.getLogger("bastion.egress")

# IPv6 forms that carry an IPv4 address the packets end up at: NAT64 (RFC 6052), 6to4 (RFC 3056),
# Teredo (RFC 4380) and IPv4-compatible addresses (RFC 4291 §2.5.5.1, deprecated but routable by
# some stacks). IPv4-mapped addresses (::ffff:0:0/96) are read by ``ipv4_mapped``.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# RFC 8215: a translator's local-use prefix; what it reaches is the operator's own network.
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")
_TEREDO = ipaddress.IPv6Network("2001::/32")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
# The only global unicast space (RFC 4291 §2.4, IANA's IPv6 address space): an address outside
# it that Python calls global (fec0::/10 site-local, deprecated by RFC 3879 but still routed in
# some networks; ::ffff:0:0:0/96, RFC 2765's IPv4-translated form; 5f00::/16, RFC 9602's SRv6
# identifiers; the unassigned rest) reaches no one on the internet and may reach the local one.
_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")

Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

# IANA's IPv4 and IPv6 Special-Purpose Address Registries (RFC 6890, RFC 8190) with each block's
# "Globally Reachable". Python's ``is_global`` reads an older copy that differs by patch release
# (3.11.7 calls 3fff::1 and 192.0.0.8 global, 2001:30::1 not; later ones changed 192.0.0.0/24
# and 2001::/23), so bastion keeps its own: the most specific block holding an address decides,
# and an address in none is judged by ``is_global``. A block whose use ended (a termination
# date, N/A) is refused.
# Absent: the IPv6 forms that carry an IPv4 address (::ffff:0:0/96, 64:ff9b::/96, Teredo
# 2001::/32, 6to4 2002::/16), judged by the IPv4 one (`embedded_ipv4`). Check it against the
# registries when they change: tests/security/test_special_addresses.py holds a row for each.
_SPECIAL_PURPOSE_BLOCKS: tuple[tuple[str, bool], ...] = (
    ("0.0.0.0/8", False),  # "this network": RFC 791 §3.2, RFC 1122 §3.2.1.3
    ("10.0.0.0/8", False),  # private-use: RFC 1918
    ("100.64.0.0/10", False),  # shared address space (CGNAT): RFC 6598
    ("127.0.0.0/8", False),  # loopback: RFC 1122 §3.2.1.3
    ("169.254.0.0/16", False),  # link local (cloud metadata services): RFC 3927
    ("172.16.0.0/12", False),  # private-use: RFC 1918
    ("192.0.0.0/24", False),  # IETF protocol assignments: RFC 6890 §2.1
    ("192.0.0.0/29", False),  # IPv4 service continuity prefix (DS-Lite): RFC 7335
    ("192.0.0.8/32", False),  # IPv4 dummy address: RFC 7600
    ("192.0.0.9/32", True),  # Port Control Protocol anycast: RFC 7723
    ("192.0.0.10/32", True),  # TURN anycast: RFC 8155
    ("192.0.0.170/32", False),  # NAT64/DNS64 discovery: RFC 8880, RFC 7050
    ("192.0.0.171/32", False),  # NAT64/DNS64 discovery: RFC 8880, RFC 7050
    ("192.0.2.0/24", False),  # documentation (TEST-NET-1): RFC 5737
    ("192.31.196.0/24", True),  # AS112-v4: RFC 7535
    ("192.52.193.0/24", True),  # AMT: RFC 7450
    ("192.88.99.0/24", False),  # 6to4 relay anycast, deprecated (terminated 2015-03): RFC 7526
    ("192.88.99.2/32", False),  # 6a44 relay anycast: RFC 6751
    ("192.168.0.0/16", False),  # private-use: RFC 1918
    ("192.175.48.0/24", True),  # direct delegation AS112 service: RFC 7534
    ("198.18.0.0/15", False),  # benchmarking: RFC 2544
    ("198.51.100.0/24", False),  # documentation (TEST-NET-2): RFC 5737
    ("203.0.113.0/24", False),  # documentation (TEST-NET-3): RFC 5737
    ("240.0.0.0/4", False),  # reserved: RFC 1112 §4
    ("255.255.255.255/32", False),  # limited broadcast: RFC 8190, RFC 919 §7
    ("::1/128", False),  # loopback: RFC 4291
    ("::/128", False),  # unspecified: RFC 4291
    ("64:ff9b:1::/48", False),  # local-use IPv4/IPv6 translation: RFC 8215
    ("100::/64", False),  # discard-only: RFC 6666
    ("100:0:0:1::/64", False),  # dummy IPv6 prefix: RFC 9780
    ("2001::/23", False),  # IETF protocol assignments: RFC 2928
    ("2001:1::1/128", True),  # Port Control Protocol anycast: RFC 7723
    ("2001:1::2/128", True),  # TURN anycast: RFC 8155
    ("2001:1::3/128", True),  # DNS-SD service registration protocol anycast: RFC 9665
    ("2001:2::/48", False),  # benchmarking: RFC 5180
    ("2001:3::/32", True),  # AMT: RFC 7450
    ("2001:4:112::/48", True),  # AS112-v6: RFC 7535
    ("2001:10::/28", False),  # ORCHID, deprecated (terminated 2014-03): RFC 4843
    ("2001:20::/28", True),  # ORCHIDv2: RFC 7343
    ("2001:30::/28", True),  # drone remote ID protocol entity tags (DETs): RFC 9374
    ("2001:db8::/32", False),  # documentation: RFC 3849
    ("2620:4f:8000::/48", True),  # direct delegation AS112 service: RFC 7534
    ("3fff::/20", False),  # documentation: RFC 9637
    ("5f00::/16", False),  # segment routing (SRv6) SIDs: RFC 9602
    ("fc00::/7", False),  # unique-local: RFC 4193, RFC 8190
    ("fe80::/10", False),  # link-local unicast: RFC 4291
)
# Most specific first, so the first block that holds an address is the one that decides.
_SPECIAL_PURPOSE: tuple[tuple[Network, bool], ...] = tuple(
    sorted(
        ((ipaddress.ip_network(block), reachable) for block, reachable in _SPECIAL_PURPOSE_BLOCKS),
        key=lambda row: -row[0].prefixlen,
    )
)

# Which non-public addresses a fetch may reach besides the public ones: every one (True), none
# (False), or those of the networks listed (never empty: an empty list is False).
PrivateAllowance: TypeAlias = bool | tuple[Network, ...]


def embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...] | None:
    """The IPv4 addresses an IPv6 address leads to (a Teredo address has two: its server and its
    client), or None when it is not one of the forms that embed one."""
    if address.ipv4_mapped is not None:
        return (address.ipv4_mapped,)
    if address in _TEREDO:
        server, client = address.teredo
        return (server, client)
    if address in _SIX_TO_FOUR:
        return (address.sixtofour,)
    if address in _NAT64 or (address in _IPV4_COMPATIBLE and int(address) > 1):
        return (ipaddress.IPv4Address(int(address) & 0xFFFFFFFF),)
    return None


def _globally_reachable(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """What IANA's special-purpose registries say of ``address`` (the most specific block that
    holds it, `_SPECIAL_PURPOSE`), or, for an address in none of their blocks, ``is_global``."""
    for network, reachable in _SPECIAL_PURPOSE:
        if address in network:
            return reachable
    return address.is_global


def is_public_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether a fetch may connect to ``address``: globally reachable (`_globally_reachable`:
    not a private, loopback, link-local, shared (CGNAT), documentation, benchmarking or reserved
    address, nor another block IANA's registries call not globally reachable) and not multicast,
    even wrapped in IPv6; an IPv6 address that carries no IPv4 one only within global unicast
    (2000::/3)."""
    if isinstance(address, ipaddress.IPv6Address):
        if address in _NAT64_LOCAL:
            return False
        inner = embedded_ipv4(address)
        if inner is not None:
            return all(is_public_address(v4) for v4 in inner)
        if address not in _GLOBAL_UNICAST:
            return False
    return _globally_reachable(address) and not address.is_multicast


def may_connect(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, private: PrivateAllowance = False
) -> bool:
    """Whether a fetch whose setting says ``private`` may connect to ``address``: a public
    address (`is_public_address`), or a non-public one the setting allows. An IPv6 address
    that carries IPv4 addresses (mapped, compatible, NAT64, 6to4, Teredo) is judged by those,
    each of which must be public or allowed: a listed 10.1.0.0/16 lets no
    ``::ffff:169.254.169.254`` through, nor does a listed IPv6 network that holds it."""
    if private is True:
        return True
    if isinstance(address, ipaddress.IPv6Address) and address not in _NAT64_LOCAL:
        inner = embedded_ipv4(address)
        if inner is not None:
            return all(may_connect(v4, private) for v4 in inner)
    if is_public_address(address):
        return True
    return private is not False and any(address in network for network in private)


def _leads_to_ipv4(network: Network) -> bool:
    """Whether every address of ``network`` carries an IPv4 address (`embedded_ipv4`): listed,
    it would allow nothing (such an address is judged by the IPv4 one)."""
    if network.version == 4:
        return False
    if network.subnet_of(_IPV4_COMPATIBLE):  # type: ignore[arg-type]
        return int(network.network_address) > 1  # :: and ::1 are no IPv4 address
    return any(
        network.subnet_of(form)  # type: ignore[arg-type]
        for form in (_IPV4_MAPPED, _NAT64, _SIX_TO_FOUR, _TEREDO)
    )


def private_allowance(value: Any, setting: str) -> PrivateAllowance:
    """What an ``allow_private_addresses`` setting (named ``setting``) says: ``true`` (every
    non-public address), ``false`` (none), or a list of networks in CIDR notation (only the
    non-public addresses within them, e.g. ``["10.1.0.0/16", "fd00:1::/64"]``). `ValueError`
    naming the setting for anything else: another type, a network that does not parse or has
    host bits set (``10.1.2.3/16``), or one that only holds IPv6 forms of IPv4 addresses
    (``::ffff:10.1.0.0/112``: list the IPv4 network)."""
    if isinstance(value, bool):
        return value
    if not isinstance(value, list | tuple):
        raise ValueError(
            f'{setting}: true, false or a list of networks (CIDR, e.g. ["10.1.0.0/16"]),'
            f" got {value!r}"
        )
    networks: list[Network] = []
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"{setting}: each network is a string in CIDR notation, got {item!r}")
        try:
            network = ipaddress.ip_network(item, strict=True)
        except ValueError as e:
            raise ValueError(f"{setting}: {item!r} is not a network ({e}){_meant(item)}") from None
        if _leads_to_ipv4(network):
            raise ValueError(
                f"{setting}: {item!r} holds only IPv6 forms of IPv4 addresses, which are judged"
                " by the IPv4 address they lead to: list the IPv4 network instead"
            )
        if network not in networks:
            networks.append(network)
    return tuple(networks) or False


def on_private_address(url: str) -> bool:
    """Whether ``url`` (as the operator configured it) names a host on a loopback or private
    address: an IP address that is not public (`is_public_address`), or ``localhost``."""
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return not is_public_address(ipaddress.ip_address(host))
    except ValueError:
        return False


def metadata_allowance(configured: str, setting: PrivateAllowance | None) -> PrivateAllowance:
    """The non-public addresses the endpoints a peer's metadata names may be reached at, for a
    peer the operator configured at ``configured`` (an upstream's url, an issuer, a
    transmitter's configuration URL): what its ``allow_private_addresses`` says (``setting``),
    else, unset (None), every one if ``configured`` is itself on a loopback or private address
    (`on_private_address`: its endpoints usually live beside it), and none otherwise."""
    return on_private_address(configured) if setting is None else setting


def _meant(text: str) -> str:
    """The network ``text`` names if its host bits are dropped, as a suggestion, or ""."""
    try:
        return f"; did you mean {ipaddress.ip_network(text, strict=False)}?"
    except ValueError:
        return ""


def is_loopback_host(host: str | None) -> bool:
    """``localhost`` or a loopback IP address (127.0.0.0/8, ::1), as ``urlsplit`` gives it."""
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def url_syntax_problem(url: Any) -> str | None:
    """Why ``url`` is not a URL a request can be sent to, or None: one with a space or a
    control character (which ``urlsplit`` drops or keeps as it is, and httpx refuses at the
    request, or which would break the gateway's request line), a port beyond 65535, an IPv6
    host not closed, or a host httpx (every outbound request's client) will not parse though
    ``urlsplit`` does: an IPv4 address with a leading zero (``0177.0.0.1``, octal to some
    resolvers) or a part beyond 255. Settings are checked with it where they are read, not at
    their first use; a URL someone else chose, before it is fetched."""
    if not isinstance(url, str):
        return "is not a URL"
    if any(c <= " " or c == "\x7f" for c in url):
        return "is not a valid URL: it holds a space, a line break or another control character"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port out of range
        httpx.URL(url)
    except (ValueError, httpx.InvalidURL):
        return "is not a valid URL"
    return None


def cleartext_problem(url: Any) -> str | None:
    """Why bastion may not send a request to ``url`` as it stands, or None: it must be a valid
    URL (`url_syntax_problem`), https, or plain http to the loopback. Anything else (http across a
    network) lets whoever is on the way read what is sent (credentials, approval links, people's
    names) and change the answer; a setting that allows it says so by name, and the caller names
    that setting."""
    if problem := url_syntax_problem(url):
        return problem
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        return "has no host"
    if parts.scheme == "https":
        return None
    if parts.scheme == "http":
        if is_loopback_host(host):
            return None
        return "must be an https URL (plain http only to the loopback)"
    return "must be an https URL"


class CleartextRefused(httpx.TransportError):
    """A request refused before it left: plain http beyond the loopback (`cleartext_problem`)."""


class AddressRefused(Exception):
    """The URL's host resolves to an address that may not be reached (`NameNotResolved`: to
    none at all). Its text names the host, never the address (``address``, and bastion's log,
    have it): the refusal reaches whoever chose the URL (a client's own metadata document, its
    ``jwks_uri``, a provider's metadata), who may be anyone, and the address would map the
    networks behind bastion for them."""

    def __init__(self, text: str, address: str = "") -> None:
        super().__init__(text)
        self.address = address

    def naming(self, setting: str) -> str:
        """The refusal, naming ``setting`` (the ``allow_private_addresses`` that would change
        it), if any."""
        return f"{self} ({setting})" if setting else str(self)


class NameNotResolved(AddressRefused):
    """The URL's host cannot be resolved: no setting would change that (a name misspelt, or
    the resolver down), so none is named."""

    def naming(self, setting: str) -> str:
        return str(self)


async def pinned(
    url: httpx.URL, private: PrivateAllowance = False
) -> tuple[httpx.URL, dict[str, str], dict[str, Any]]:
    """``url`` with its host replaced by the one address to connect to, and the headers and
    request extensions that keep the request and TLS the name's (``Host``, SNI and the
    certificate's name; over plain http the name too, by which the outbound proxy's
    ``egress_no_proxy`` is matched: `bastion.outbound_proxy.RoutedTransport`). `AddressRefused`
    unless every address the name resolves to may be reached (`may_connect`: public, or
    non-public and allowed by ``private``)."""
    name = url.raw_host.decode("ascii")
    default_port = 443 if url.scheme == "https" else 80
    try:
        infos = await anyio.getaddrinfo(name, url.port or default_port, type=socket.SOCK_STREAM)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise NameNotResolved(f"cannot resolve {name}: {reason}") from None
    addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    if not addresses:
        raise NameNotResolved(f"cannot resolve {name}: no address")
    for address in addresses:
        if not may_connect(address, private):
            outside = "" if private is False else " outside the networks allowed"
            log.info("refused: %s resolves to non-public address %s%s", name, address, outside)
            raise AddressRefused(
                f"{name} resolves to a non-public address{outside}; refused", str(address)
            )
    headers = {"Host": url.netloc.decode("ascii")}
    # httpcore reads it for TLS only; over plain http it still names the request's name (without
    # it a pinned http request was matched against egress_no_proxy by its address alone).
    extensions: dict[str, Any] = {"sni_hostname": name}
    return url.copy_with(host=str(addresses[0])), headers, extensions
