"""RFC 9728 protected-resource metadata for each ``/mcp/<server>``, and RFC 6750 challenges.

A request without a valid token gets 401 with ``WWW-Authenticate: Bearer resource_metadata=...,
scope=...``; a token that lacks a scope the policy requires gets 403 ``insufficient_scope`` with
the scopes to ask for, which MCP clients use to step up (MCP authorization, 2025-11-25).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@dataclass(frozen=True, slots=True)
class ProtectedResourceMetadata:
    resource: str
    authorization_servers: tuple[str, ...]
    scopes_supported: tuple[str, ...]
    resource_name: str = ""
    # DPoP (RFC 9449 §7.1 and RFC 9728 §2): accepted, never required; the proof algorithms.
    dpop_signing_alg_values: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "resource": self.resource,
            "authorization_servers": list(self.authorization_servers),
            "scopes_supported": list(self.scopes_supported),
            "bearer_methods_supported": ["header"],
        }
        if self.dpop_signing_alg_values:
            body["dpop_signing_alg_values_supported"] = list(self.dpop_signing_alg_values)
            body["dpop_bound_access_tokens_required"] = False
        if self.resource_name:
            body["resource_name"] = self.resource_name
        return body


WELL_KNOWN = "/.well-known/oauth-protected-resource"


def metadata_url(public_url: str, path: str) -> str:
    """RFC 9728 §3.1: the well-known segment goes between the host and the resource's path,
    the whole of it: for ``public_url`` ``https://host/bastion``, the resource
    ``https://host/bastion/mcp/desk`` has its metadata at
    ``https://host/.well-known/oauth-protected-resource/bastion/mcp/desk``."""
    parts = urlsplit(public_url)
    return f"{parts.scheme}://{parts.netloc}{WELL_KNOWN}{parts.path.rstrip('/')}{path}"


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def challenge(
    metadata: str,
    scopes: Iterable[str] = (),
    error: str | None = None,
    description: str | None = None,
    max_age: int | None = None,
) -> str:
    """A ``WWW-Authenticate`` value for the Bearer scheme (``max_age``: RFC 9470 §3)."""
    parts = []
    if error:
        parts.append(f'error="{error}"')
    if description:
        parts.append(f'error_description="{_quote(description)}"')
    scope = " ".join(scopes)
    if scope:
        parts.append(f'scope="{scope}"')
    if max_age is not None:
        parts.append(f'max_age="{max_age}"')
    parts.append(f'resource_metadata="{metadata}"')
    return "Bearer " + ", ".join(parts)
