"""bastion's outbound HTTP: the one trust store of the process, and the one way to make a client
for requests to other parties (`fetching_client`).

Making a context reads the trust store (tens of milliseconds), and the fetches that need one (a
client's metadata document, an issuer's key set, an upstream session's connection) run on the
event loop: a context per fetch let anyone who can make bastion fetch from a new host hold the
loop that long each time. An `ssl.SSLContext` serves any number of connections at once, and
`bastion serve` makes every one it will use before it serves (`load_trust_stores`): made at
the first fetch instead, the load held the event loop (up to 218 ms seen under load).
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import AsyncIterator, Iterable

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


def load_trust_stores(ca_files: Iterable[str] = ()) -> None:
    """Make the process's trust store (`trust`) and the context of each of ``ca_files``
    (`file_context`) now, off the event loop: every client of this module, the gateway's
    upstream connections and the outbound proxy's tunnels take theirs from these two, so none
    is made at a first fetch, on the loop. `OSError` or `ssl.SSLError` for a file that cannot
    be read as PEM certificates."""
    trust()
    for ca_file in ca_files:
        file_context(ca_file)


class CompressedAnswerRefused(httpx.DecodingError):
    """An answer's body in a content coding (``Content-Encoding: gzip``), refused as it is read:
    bastion asks for none, and inflating one is unbounded (httpx inflates what each read brings
    in one call, so 273 bytes of ``gzip, gzip`` became 64 MiB before a size bound saw any)."""


class _Uninflated(httpx.AsyncByteStream):
    """The body of an answer in a content coding: refused when read, never inflated."""

    def __init__(self, stream: httpx.AsyncByteStream, codings: str) -> None:
        self._stream = stream
        self._codings = codings

    async def __aiter__(self) -> AsyncIterator[bytes]:
        raise CompressedAnswerRefused(
            f"answered compressed (Content-Encoding: {self._codings[:100]}) though asked for"
            " Accept-Encoding: identity; bastion reads no compressed answer"
        )
        yield b""  # pragma: no cover -- makes this an async generator

    async def aclose(self) -> None:
        await self._stream.aclose()


async def _uncompressed(response: httpx.Response) -> None:
    codings = response.headers.get("content-encoding", "")
    if codings.strip().lower() not in ("", "identity"):
        response.stream = _Uninflated(response.stream, codings)  # type: ignore[arg-type]


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
    ``allow_http`` (a setting said so: the caller names it). It asks for answers uncompressed
    (``Accept-Encoding: identity``), and a compressed one is refused when its body is read
    (`CompressedAnswerRefused`), never inflated. Through the configured proxy
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
    headers = {"Accept-Encoding": "identity", **options.pop("headers", {})}  # type: ignore[dict-item]
    return httpx.AsyncClient(
        follow_redirects=False,
        trust_env=False,
        transport=transport,
        verify=verify,
        headers=headers,
        event_hooks={"request": [] if allow_http else [secure], "response": [_uncompressed]},
        **options,  # type: ignore[arg-type]
    )
