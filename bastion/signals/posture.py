"""Request posture: where a request comes from and on what device, and how old its token is.

What the gateway adds to the ``context`` of every decision (docs/signals.md, field by field):

- ``context.network``: ``ip`` (the client address bastion sees) and ``zone``, the first zone of
  ``[signals.posture].zones`` whose CIDR lists hold the address, else ``default_zone``;
- ``context.device``: ``id`` and ``posture`` from the token's claims (``device_claim``,
  ``posture_claim``) or, failing those, from headers a trusted proxy sets (``device_header``,
  ``posture_header``), honoured only from the ``trusted_proxies`` addresses: anyone else's are
  ignored; ``source`` says which (``token`` or ``proxy``); one of these headers sent twice is
  refused by whoever reads it (`PostureSettings.proxy_headers`);
- ``context.token``: ``issued_at`` and ``age_seconds`` (the token's ``iat``, RFC 7519 §4.1.6),
  ``auth_time`` when the token carries it (OpenID Connect Core §2), and ``acr`` and ``amr`` (how
  the person signed in, Core §2, RFC 8176) when it carries them, as the token's verifier read
  them (a malformed one refused the token there).

The CIDR lists are parsed once, when the settings are read; each request is a few lookups.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bastion.ip_addresses import read_address

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# What is taken of a header or a claim: a device id or posture is short and printable.
MAX_VALUE = 256
# Addresses whose zone and trust are remembered (parsing and matching cost ~20 µs; a lookup ~0.1).
_REMEMBERED = 4096
_ZONE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HEADER = re.compile(r"[A-Za-z0-9_-]{1,128}")
_KEYS = (
    "zones",
    "default_zone",
    "trusted_proxies",
    "device_header",
    "posture_header",
    "device_claim",
    "posture_claim",
)


class PostureError(ValueError):
    """A ``[signals.posture]`` setting that cannot be used; the message says how to fix it."""


def _networks(values: Any, where: str) -> tuple[Network, ...]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise PostureError(f'{where} must be a list of CIDR blocks, such as ["10.0.0.0/8"]')
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip()))
        except ValueError as e:
            raise PostureError(
                f"{where}: {value!r} is not a CIDR block ({e}); write the network address,"
                " such as 10.0.0.0/8"
            ) from None
    return tuple(networks)


def _text(value: Any) -> str | None:
    """A claim or header value worth taking: a short, printable string."""
    if isinstance(value, str) and 0 < len(value) <= MAX_VALUE and value.isprintable():
        return value
    return None


@dataclass(frozen=True, slots=True)
class RequestPosture:
    """What one request says of itself, read once when its token is checked."""

    ip: str
    zone: str
    device_id: str | None = None
    device_posture: str | None = None
    device_source: str | None = None  # "token" or "proxy"
    issued_at: int | None = None
    auth_time: int | None = None
    acr: str | None = None
    amr: tuple[str, ...] | None = None

    def context(self, now: float) -> dict[str, Any]:
        """The posture fields of ``context`` at the decision's time ``now``."""
        device: dict[str, Any] = {}
        if self.device_id is not None:
            device["id"] = self.device_id
        if self.device_posture is not None:
            device["posture"] = self.device_posture
        if device:
            device["source"] = self.device_source
        token: dict[str, Any] = {}
        if self.issued_at is not None:
            token["issued_at"] = self.issued_at
            token["age_seconds"] = max(0, int(now) - self.issued_at)
        if self.auth_time is not None:
            token["auth_time"] = self.auth_time
        if self.acr is not None:
            token["acr"] = self.acr
        if self.amr is not None:
            token["amr"] = list(self.amr)  # a list value: `"mfa" in context.token.amr`
        return {"network": {"ip": self.ip, "zone": self.zone}, "device": device, "token": token}


@dataclass(frozen=True)
class PostureSettings:
    """The ``[signals.posture]`` table of bastion.toml."""

    zones: tuple[tuple[str, tuple[Network, ...]], ...] = ()
    default_zone: str = "public"
    trusted_proxies: tuple[Network, ...] = ()
    device_header: str = ""  # lower case, as ASGI gives header names
    posture_header: str = ""
    device_claim: str = ""
    posture_claim: str = ""
    # address -> (the address as the context shows it, its zone, whether it is a trusted proxy)
    _seen: dict[str, tuple[str, str, bool]] = field(default_factory=dict, compare=False, repr=False)
    # The postures read lately, by their fields: one made once serves each request that has it
    # (a `RequestPosture` is frozen; making one costs more than the rest of reading it).
    _postures: dict[tuple, RequestPosture] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any] | None) -> PostureSettings:
        table = dict(table or {})
        unknown = sorted(set(table) - set(_KEYS))
        if unknown:
            raise PostureError(
                f"unknown key(s) in [signals.posture]: {', '.join(unknown)}; known keys:"
                f" {', '.join(_KEYS)}"
            )
        zones_table = table.get("zones", {})
        if not isinstance(zones_table, dict):
            raise PostureError(
                '[signals.posture].zones is a table of CIDR lists: zones = { corp = ["10.0.0.0/8"] }'
            )
        zones = []
        for name, blocks in zones_table.items():
            if not _ZONE.fullmatch(name):
                raise PostureError(f"zone name {name!r}: 1 to 64 letters, digits or _ . -")
            zones.append((name, _networks(blocks, f"[signals.posture].zones.{name}")))
        default_zone = table.get("default_zone", "public")
        if not isinstance(default_zone, str) or not _ZONE.fullmatch(default_zone):
            raise PostureError("[signals.posture].default_zone: 1 to 64 letters, digits or _ . -")
        names = {}
        for key in ("device_header", "posture_header", "device_claim", "posture_claim"):
            value = table.get(key, "")
            if not isinstance(value, str) or (value and not _HEADER.fullmatch(value)):
                raise PostureError(
                    f"[signals.posture].{key} must be a header or claim name (letters, digits,"
                    f" - and _), got {value!r}"
                )
            names[key] = value.lower() if key.endswith("header") else value
        proxies = _networks(table.get("trusted_proxies", []), "[signals.posture].trusted_proxies")
        if (names["device_header"] or names["posture_header"]) and not proxies:
            raise PostureError(
                "[signals.posture].device_header and posture_header are honoured only from the"
                " addresses in trusted_proxies; list the proxies that set them (CIDR blocks)"
            )
        return cls(tuple(zones), default_zone, proxies, **names)

    @property
    def uses_proxy_headers(self) -> bool:
        return bool(self.device_header or self.posture_header)

    @property
    def proxy_headers(self) -> frozenset[str]:
        """The headers read from a trusted proxy (lower case). Each is read as one value: a
        request that holds one of them twice is refused where it is read (the gateway, a token
        exchange), since which copy is the proxy's and which the client's cannot be told (a
        proxy may append its copy after the client's, or put it first)."""
        return frozenset(name for name in (self.device_header, self.posture_header) if name)

    def zone(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> str:
        if ip is not None:
            for name, networks in self.zones:
                for network in networks:
                    if ip in network:
                        return name
        return self.default_zone

    def read(
        self,
        address: str,
        headers: Mapping[str, str],
        claims: Mapping[str, Any],
        acr: str | None = None,
        amr: tuple[str, ...] | None = None,
    ) -> RequestPosture:
        """The posture of a request from ``address`` with these (lower-case) headers, whose
        verified token carries ``claims``, and says the person signed in as ``acr`` and ``amr``
        (as its verifier checked them)."""
        seen = self._seen.get(address)
        if seen is None:
            ip = read_address(address)
            seen = (str(ip) if ip is not None else "", self.zone(ip), self._trusted(ip))
            if len(self._seen) >= _REMEMBERED:
                self._seen.clear()
            self._seen[address] = seen
        shown, zone, trusted = seen
        device_id = _text(claims.get(self.device_claim)) if self.device_claim else None
        posture = _text(claims.get(self.posture_claim)) if self.posture_claim else None
        source = "token" if device_id is not None or posture is not None else None
        if source is None and trusted and self.uses_proxy_headers:
            if self.device_header:
                device_id = _text(headers.get(self.device_header))
            if self.posture_header:
                posture = _text(headers.get(self.posture_header))
            source = "proxy" if device_id is not None or posture is not None else None
        issued_at = claims.get("iat")
        auth_time = claims.get("auth_time")
        fields = (
            shown,
            zone,
            device_id,
            posture,
            source,
            issued_at if type(issued_at) is int else None,
            auth_time if type(auth_time) is int else None,
            acr,
            amr,
        )
        found = self._postures.get(fields)
        if found is None:
            found = RequestPosture(*fields)
            if len(self._postures) >= _REMEMBERED:
                self._postures.clear()
            self._postures[fields] = found
        return found

    def _trusted(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
        return ip is not None and any(ip in network for network in self.trusted_proxies)
