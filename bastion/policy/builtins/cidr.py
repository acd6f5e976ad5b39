"""CIDR matching: ``cidr_contains("10.0.0.0/8", context.client.ip)``.

An address or a network is text of at most `MAX_ADDRESS_CHARS` characters: parsed texts are
remembered, so a longer one (a request's, of any size) is not an address rather than a cache
entry. An IPv4-mapped IPv6 address (``::ffff:203.0.113.5``, how a server listening on IPv6 sees
an IPv4 client) is the IPv4 address it maps, and a network within ``::ffff:0:0/96`` the IPv4 network it maps, as
the request's posture and the egress rules read them: the same host is in the same networks
whichever way its socket spelt it (so it is no longer in ``::/0``, which names IPv6 hosts).
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

from bastion.ip_addresses import Address, read_address

# The longest text read as an address or a network: ``ffff:...:ffff/128`` is 43 characters, an
# IPv6 address with a zone (``fe80::1%eth0``) a few more.
MAX_ADDRESS_CHARS = 64
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@lru_cache(maxsize=1024)
def _network(cidr: str) -> Network | None:
    try:
        network = ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return None
    if network.version == 6 and network.subnet_of(_MAPPED):  # type: ignore[arg-type]
        mapped = int(network.network_address) & 0xFFFFFFFF
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


_address = lru_cache(maxsize=4096)(read_address)


def _read(cidr: object, ip: object) -> tuple[Network, Address] | None:
    if (
        cidr.__class__ is not str
        or ip.__class__ is not str
        or len(cidr) > MAX_ADDRESS_CHARS  # type: ignore[arg-type]
        or len(ip) > MAX_ADDRESS_CHARS  # type: ignore[arg-type]
    ):
        return None
    network, address = _network(cidr), _address(ip)  # type: ignore[arg-type]
    if network is None or address is None:
        return None
    return network, address


def cidr_contains(cidr: object, ip: object) -> bool:
    """True when ``ip`` lies in the network ``cidr``; false for anything malformed."""
    read = _read(cidr, ip)
    if read is None:
        return False
    network, address = read
    return network.version == address.version and address in network


def cidr_decidable(cidr: object, ip: object) -> bool:
    """Whether `cidr_contains` can be decided: both are texts that parse as a network and an
    address (else, in strict code, it may hold: `bastion.policy.builtins.Builtin.strict`)."""
    return _read(cidr, ip) is not None
