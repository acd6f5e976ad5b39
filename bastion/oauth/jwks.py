"""Remote JSON Web Key Sets (RFC 7517 §5) and the JSON documents that point to them (RFC 8414,
OpenID Connect Discovery): fetched off the event loop with one deadline, a size cap and no
redirects, then kept in a bounded cache. A ``kid`` the cached set lacks is a key rotation: the
set is fetched again, at most once every ``refetch_seconds`` per URI, so a stream of made-up kids
cannot turn into a stream of fetches.

Used by ``private_key_jwt`` client authentication (`bastion.oauth.client_assertion`) and by the
verification of trusted issuers' access tokens (`bastion.identity.trusted_issuers`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
from joserfc.jwk import KeySet

from bastion import untrusted_json


class RemoteDocumentError(Exception):
    """A remote key set or metadata document could not be had: the message says why (the URI is
    the caller's to name)."""


@dataclass(frozen=True)
class FetchLimits:
    """How a remote document is fetched and kept; ``where`` names the settings table in errors."""

    timeout_seconds: float = 5
    max_bytes: int = 65536
    cache_seconds: float = 300
    refetch_seconds: float = 30
    max_cached: int = 1000
    where: str = ""


async def fetch_json(
    uri: str, limits: FetchLimits, transport: httpx.AsyncBaseTransport | None = None
) -> Any:
    """GET ``uri`` and read its body as untrusted JSON, within ``limits``; `RemoteDocumentError`
    on any failure (timeout, HTTP status other than 200, too large, not JSON)."""
    where = f" ([{limits.where}]" if limits.where else ""
    try:
        with anyio.fail_after(limits.timeout_seconds):
            async with (
                httpx.AsyncClient(
                    follow_redirects=False, transport=transport, trust_env=False
                ) as http,
                http.stream("GET", uri, headers={"Accept": "application/json"}) as response,
            ):
                if response.status_code != 200:
                    raise RemoteDocumentError(f"answered HTTP {response.status_code}")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > limits.max_bytes:
                        raise RemoteDocumentError(
                            f"sent more than {limits.max_bytes} bytes"
                            + (f"{where}.jwks_max_bytes)" if where else "")
                        )
    except TimeoutError:
        raise RemoteDocumentError(
            f"did not answer within {limits.timeout_seconds} s"
            + (f"{where}.jwks_timeout_seconds)" if where else "")
        ) from None
    except httpx.HTTPError as exc:
        raise RemoteDocumentError(f"cannot be fetched: {exc}") from None
    try:
        return untrusted_json.loads(bytes(body))
    except untrusted_json.JsonRefused as exc:
        raise RemoteDocumentError(f"sent no JSON: {exc}") from None


@dataclass
class _Fetched:
    keys: KeySet
    fetched_at: float


def has_kid(keys: KeySet, kid: str) -> bool:
    return any(k.kid == kid for k in keys.keys)


class RemoteKeySets:
    """Key sets fetched from ``jwks_uri``s, cached per URI (one implementation for every caller).

    ``check(document)`` returns why a fetched document is not an acceptable key set, or None.
    """

    def __init__(
        self,
        limits: FetchLimits,
        check: Callable[[Any], str | None],
        clock: Callable[[], float] = time.time,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.limits = limits
        self.check = check
        self.clock = clock
        self.transport = transport
        self._fetched: dict[str, _Fetched] = {}
        self._fetching: dict[str, asyncio.Lock] = {}

    async def keys(self, uri: str, kid: str | None) -> KeySet:
        """The key set at ``uri``: cached while young and holding ``kid``; fetched again for a
        ``kid`` it lacks when the last fetch is older than ``refetch_seconds``."""
        now = self.clock()
        cached = self._fetched.get(uri)
        if cached is not None:
            young = now - cached.fetched_at < self.limits.cache_seconds
            known = kid is None or has_kid(cached.keys, kid)
            may_refetch = now - cached.fetched_at >= self.limits.refetch_seconds
            if young and (known or not may_refetch):
                return cached.keys
        lock = self._fetching.setdefault(uri, asyncio.Lock())
        async with lock:
            again = self._fetched.get(uri)
            if again is not None and again is not cached:
                return again.keys  # fetched by another request while this one waited
            keys = await self._fetch(uri)
            if len(self._fetched) >= self.limits.max_cached:
                self._fetched.pop(next(iter(self._fetched)))
            self._fetched[uri] = _Fetched(keys, self.clock())
            return keys

    async def _fetch(self, uri: str) -> KeySet:
        document = await fetch_json(uri, self.limits, self.transport)
        problem = self.check(document)
        if problem:
            raise RemoteDocumentError(f"sent no acceptable key set: {problem}")
        return await anyio.to_thread.run_sync(KeySet.import_key_set, document)
