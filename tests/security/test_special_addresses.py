"""Every block of IANA's IPv4 and IPv6 Special-Purpose Address Registries (RFC 6890 and its
updates) is judged by its "Globally Reachable" column wherever bastion fetches a URL someone
else chose (`bastion.egress.is_public_address`, under `may_connect` and `pinned`): a block that is
not globally reachable is refused, one that is stays reachable, whatever table the Python running
bastion carries (3.11.7's ``is_global`` called ``3fff::1`` and ``192.0.0.8`` global, and the
drone identifiers ``2001:30::/28`` not)."""

from __future__ import annotations

import ipaddress

import anyio
import httpx
import pytest

from bastion.egress import AddressRefused, is_public_address, may_connect, pinned, private_allowance

# (address, the block it stands for and the RFC that made it, globally reachable). Each block's
# first, a middle and its last address where it has more than one; a more specific block
# inside a larger one (192.0.0.9 in 192.0.0.0/24) is a row of its own.
REGISTRY_V4 = [
    ("0.0.0.0/8 this network, RFC 791", ["0.0.0.0", "0.1.2.3", "0.255.255.255"], False),
    ("10.0.0.0/8 private-use, RFC 1918", ["10.0.0.0", "10.1.2.3", "10.255.255.255"], False),
    ("100.64.0.0/10 shared, RFC 6598", ["100.64.0.0", "100.100.1.1", "100.127.255.255"], False),
    ("127.0.0.0/8 loopback, RFC 1122", ["127.0.0.1", "127.255.255.255"], False),
    ("169.254.0.0/16 link local, RFC 3927", ["169.254.0.0", "169.254.169.254"], False),
    ("172.16.0.0/12 private-use, RFC 1918", ["172.16.0.0", "172.31.255.255"], False),
    ("192.0.0.0/24 IETF protocol assignments, RFC 6890", ["192.0.0.11", "192.0.0.100"], False),
    ("192.0.0.0/24's last address, RFC 6890", ["192.0.0.255"], False),
    ("192.0.0.0/29 IPv4 service continuity, RFC 7335", ["192.0.0.0", "192.0.0.7"], False),
    ("192.0.0.8/32 IPv4 dummy address, RFC 7600", ["192.0.0.8"], False),
    ("192.0.0.9/32 PCP anycast, RFC 7723", ["192.0.0.9"], True),
    ("192.0.0.10/32 TURN anycast, RFC 8155", ["192.0.0.10"], True),
    ("192.0.0.170/31 NAT64/DNS64 discovery, RFC 8880", ["192.0.0.170", "192.0.0.171"], False),
    ("192.0.2.0/24 TEST-NET-1, RFC 5737", ["192.0.2.1"], False),
    ("192.31.196.0/24 AS112-v4, RFC 7535", ["192.31.196.1"], True),
    ("192.52.193.0/24 AMT, RFC 7450", ["192.52.193.1"], True),
    ("192.88.99.0/24 6to4 relay anycast, deprecated by RFC 7526", ["192.88.99.1"], False),
    ("192.88.99.2/32 6a44 relay anycast, RFC 6751", ["192.88.99.2"], False),
    ("192.168.0.0/16 private-use, RFC 1918", ["192.168.0.1"], False),
    ("192.175.48.0/24 AS112 direct delegation, RFC 7534", ["192.175.48.1"], True),
    ("198.18.0.0/15 benchmarking, RFC 2544", ["198.18.0.1", "198.19.255.255"], False),
    ("198.51.100.0/24 TEST-NET-2, RFC 5737", ["198.51.100.1"], False),
    ("203.0.113.0/24 TEST-NET-3, RFC 5737", ["203.0.113.1"], False),
    ("240.0.0.0/4 reserved, RFC 1112", ["240.0.0.1", "255.255.255.254"], False),
    ("255.255.255.255/32 limited broadcast, RFC 8190", ["255.255.255.255"], False),
]
REGISTRY_V6 = [
    ("::1/128 loopback, RFC 4291", ["::1"], False),
    ("::/128 unspecified, RFC 4291", ["::"], False),
    ("64:ff9b:1::/48 local-use IPv4/IPv6 translation, RFC 8215", ["64:ff9b:1::808:808"], False),
    ("100::/64 discard-only, RFC 6666", ["100::1"], False),
    ("100:0:0:1::/64 dummy prefix, RFC 9780", ["100:0:0:1::1"], False),
    ("2001::/23 IETF protocol assignments, RFC 2928", ["2001:5::1", "2001:1ff:ffff::1"], False),
    ("2001:1::1/128 PCP anycast, RFC 7723", ["2001:1::1"], True),
    ("2001:1::2/128 TURN anycast, RFC 8155", ["2001:1::2"], True),
    ("2001:1::3/128 DNS-SD SRP anycast, RFC 9665", ["2001:1::3"], True),
    ("2001::/23 beside its three anycast addresses, RFC 2928", ["2001:1::4"], False),
    ("2001:2::/48 benchmarking, RFC 5180", ["2001:2::1"], False),
    ("2001:3::/32 AMT, RFC 7450", ["2001:3::1", "2001:3:ffff::1"], True),
    ("2001:4:112::/48 AS112-v6, RFC 7535", ["2001:4:112::1"], True),
    ("2001:10::/28 ORCHID, deprecated by RFC 7343", ["2001:10::1"], False),
    ("2001:20::/28 ORCHIDv2, RFC 7343", ["2001:20::1"], True),
    ("2001:30::/28 drone remote ID entity tags, RFC 9374", ["2001:30::1", "2001:3f::1"], True),
    ("2001:db8::/32 documentation, RFC 3849", ["2001:db8::1"], False),
    ("2620:4f:8000::/48 AS112 direct delegation, RFC 7534", ["2620:4f:8000::1"], True),
    ("3fff::/20 documentation, RFC 9637", ["3fff::1", "3fff:fff:ffff::1"], False),
    ("5f00::/16 SRv6 segment identifiers, RFC 9602", ["5f00::1"], False),
    ("fc00::/7 unique-local, RFC 4193", ["fc00::1", "fd12:3456::1"], False),
    ("fe80::/10 link-local, RFC 4291", ["fe80::1"], False),
]
REGISTRY = REGISTRY_V4 + REGISTRY_V6


@pytest.mark.parametrize(
    ("block", "addresses", "reachable"), REGISTRY, ids=[row[0] for row in REGISTRY]
)
def test_each_special_purpose_block_is_public_only_if_the_registry_calls_it_globally_reachable(
    block, addresses, reachable
):
    for text in addresses:
        address = ipaddress.ip_address(text)
        assert is_public_address(address) is reachable, (block, text)
        assert may_connect(address) is reachable, (block, text)


@pytest.mark.parametrize(
    ("block", "addresses"),
    [(block, addresses) for block, addresses, reachable in REGISTRY_V4 if not reachable],
    ids=[row[0] for row in REGISTRY_V4 if not row[2]],
)
def test_an_ipv4_block_not_globally_reachable_is_not_public_wrapped_in_ipv6(block, addresses):
    for text in addresses:
        v4 = int(ipaddress.IPv4Address(text))
        for wrapped in (
            ipaddress.IPv6Address((0xFFFF << 32) | v4),  # IPv4-mapped
            ipaddress.IPv6Address((0x64FF9B << 96) | v4),  # NAT64
            ipaddress.IPv6Address((0x2002 << 112) | (v4 << 80) | 1),  # 6to4
        ):
            assert not is_public_address(wrapped), (block, str(wrapped))


@pytest.mark.parametrize("address", ["3fff::1", "192.0.0.8", "192.0.0.200", "192.88.99.2"])
def test_a_fetch_to_a_block_not_globally_reachable_is_refused_before_it_connects(address):
    """`pinned` is what every fetch of a URL someone else chose goes through (client ID
    metadata documents, key sets, webhooks, a peer's metadata and endpoints)."""
    host = f"[{address}]" if ":" in address else address

    async def main() -> None:
        await pinned(httpx.URL(f"https://{host}/agent.json"))

    with pytest.raises(AddressRefused, match="non-public address"):
        anyio.run(main)


def test_a_block_not_globally_reachable_is_reached_when_its_network_is_listed():
    """An operator's lab on a documentation prefix says so by listing it, as any other network."""
    listed = private_allowance(["3fff:1::/32", "192.0.0.0/24"], "the tests' setting")
    assert may_connect(ipaddress.ip_address("3fff:1::5"), listed)
    assert may_connect(ipaddress.ip_address("192.0.0.8"), listed)
    assert not may_connect(ipaddress.ip_address("3fff:2::5"), listed)
    assert not may_connect(ipaddress.ip_address("198.18.0.1"), listed)


@pytest.mark.parametrize(
    "host",
    [
        "2130706433",  # 127.0.0.1 as one decimal number
        "0x7f000001",  # in hexadecimal
        "017700000001",  # in octal
        "127.1",  # short: the last part fills the rest
        "0",  # 0.0.0.0, the local host on Linux
        "[::ffff:7f00:1]",  # IPv4-mapped, written in hexadecimal
        "[::7f00:1]",  # IPv4-compatible
        "[fe80::1%25lo]",  # link-local with a zone
    ],
)
def test_an_address_spelt_another_way_is_refused_as_what_it_resolves_to(host):
    """Not an IP address to `ipaddress`, these reach `pinned` as names: the resolver reads
    them as the address they spell (inet_aton), and that address is judged."""

    async def main() -> None:
        await pinned(httpx.URL(f"https://{host}/agent.json"))

    with pytest.raises(AddressRefused):
        anyio.run(main)
