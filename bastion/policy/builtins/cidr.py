"""CIDR matching: ``cidr_contains("10.0.0.0/8", context.client.ip)``."""

from __future__ import annotations

import ipaddress
from functools import lru_cache


@lru_cache(maxsize=1024)
def _network(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return None


@lru_cache(maxsize=4096)
def _address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(ip)
    except ValueError:
        return None


def cidr_contains(cidr: object, ip: object) -> bool:
    """True when ``ip`` lies in the network ``cidr``; false for anything malformed."""
    if not isinstance(cidr, str) or not isinstance(ip, str):
        return False
    network, address = _network(cidr), _address(ip)
    if network is None or address is None or network.version != address.version:
        return False
    return address in network


def cidr_decidable(cidr: object, ip: object) -> bool:
    """Whether `cidr_contains` can be decided: both are texts that parse as a network and an
    address (else, in strict code, it may hold: `bastion.policy.builtins.Builtin.strict`)."""
    return (
        isinstance(cidr, str)
        and isinstance(ip, str)
        and _network(cidr) is not None
        and _address(ip) is not None
    )
