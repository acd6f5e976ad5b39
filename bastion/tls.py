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
