"""A client's IP address as bastion reads it everywhere it decides on one (the posture of a
request, the policy's ``cidr_contains``, the token endpoint's throttle): an IPv4-mapped IPv6
address (``::ffff:203.0.113.5``, how a server listening on IPv6 sees an IPv4 client) is the IPv4
address it maps, so the same host is the same address whichever way its socket spelt it."""

from __future__ import annotations

import ipaddress

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def read_address(text: str) -> Address | None:
    """``text`` as an address (IPv4-mapped ones as their IPv4 address), or None when it is not
    one."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:  # type: ignore[union-attr]
        return address.ipv4_mapped  # type: ignore[union-attr]
    return address
