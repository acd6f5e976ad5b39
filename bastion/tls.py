"""The TLS contexts of bastion's outbound HTTPS, each made once per process.

Making a context reads the trust store (tens of milliseconds), and the fetches that need one (a
client's metadata document, an issuer's key set, an upstream session's connection) run on the
event loop: a context per fetch let anyone who can make bastion fetch from a new host hold the
loop that long each time. An `ssl.SSLContext` serves any number of connections at once.
"""

from __future__ import annotations

import functools
import ssl

import httpx


@functools.cache
def httpx_context() -> ssl.SSLContext:
    """What an ``httpx.AsyncClient()`` verifies against by default (its trust store)."""
    return httpx.create_ssl_context()


@functools.cache
def default_context() -> ssl.SSLContext:
    """The system's trust store (`ssl.create_default_context`)."""
    return ssl.create_default_context()


@functools.cache
def file_context(ca_file: str) -> ssl.SSLContext:
    """The certificates of ``ca_file`` alone (a setting: read once; a change needs a restart)."""
    return ssl.create_default_context(cafile=ca_file)


def fetching_client(
    transport: httpx.AsyncBaseTransport | None = None,
    verify: ssl.SSLContext | None = None,
    **options: object,
) -> httpx.AsyncClient:
    """A client for one of bastion's fetches from another party (a key set, a metadata
    document, a provider's or an authorization server's answer): the shared TLS context (or
    ``verify``), no redirect followed, nothing taken from the environment (proxies, netrc)."""
    return httpx.AsyncClient(
        follow_redirects=False,
        trust_env=False,
        transport=transport,
        verify=verify or httpx_context(),
        **options,  # type: ignore[arg-type]
    )
