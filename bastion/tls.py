"""bastion's outbound HTTP: the one trust store of the process, and the one way to make a client
for requests to other parties (`fetching_client`).

Making a context reads the trust store (tens of milliseconds), and the fetches that need one (a
client's metadata document, an issuer's key set, an upstream session's connection) run on the
event loop: a context per fetch let anyone who can make bastion fetch from a new host hold the
loop that long each time. An `ssl.SSLContext` serves any number of connections at once.
"""

from __future__ import annotations

import functools
import ssl

import httpx

from bastion import outbound_proxy
from bastion.egress import CleartextRefused, cleartext_problem


@functools.cache
def trust() -> ssl.SSLContext:
    """The process's one trust store, for every party bastion connects to (the gateway's
    upstreams, identity providers, key sets, metadata documents, transmitters, webhooks): the
    system's (`ssl.create_default_context`; OpenSSL's ``SSL_CERT_FILE`` and ``SSL_CERT_DIR``
    point it elsewhere), so a private CA added there is trusted by all of them or by none.
    Verification is always on."""
    return ssl.create_default_context()


@functools.cache
def file_context(ca_file: str) -> ssl.SSLContext:
    """The certificates of ``ca_file`` alone (a setting: read once; a change needs a restart)."""
    return ssl.create_default_context(cafile=ca_file)


def fetching_client(
    transport: httpx.AsyncBaseTransport | None = None,
    verify: ssl.SSLContext | None = None,
    *,
    allow_http: bool = False,
    **options: object,
) -> httpx.AsyncClient:
    """A client for bastion's requests to another party (a key set, a metadata document, a
    provider's or an authorization server's answer, a transmitter, a webhook): the process's
    trust store (`trust`, or ``verify``), no redirect followed (a 3xx is an answer), nothing
    taken from the environment (proxies, netrc), and each request refused before it leaves
    (`CleartextRefused`) unless it is https or to the loopback (`cleartext_problem`), or
    ``allow_http`` (a setting said so: the caller names it). Through the configured proxy
    (`bastion.outbound_proxy`; an https one's certificate checked against `trust`) unless
    ``transport`` is given."""

    async def secure(request: httpx.Request) -> None:
        problem = cleartext_problem(str(request.url))
        if problem:
            raise CleartextRefused(
                f"{request.url.scheme}://{request.url.netloc.decode()} {problem}"
            )

    verify = verify or trust()
    proxy = outbound_proxy.configured()
    if transport is None and proxy is not None:
        transport = outbound_proxy.RoutedTransport(proxy, verify, trust())
    return httpx.AsyncClient(
        follow_redirects=False,
        trust_env=False,
        transport=transport,
        verify=verify,
        event_hooks={"request": [] if allow_http else [secure]},
        **options,  # type: ignore[arg-type]
    )
