"""The HTTP proxy bastion's requests to other parties go through, when the operator names one
(``[server] egress_proxy`` and ``egress_no_proxy``): each connection is a tunnel the proxy opens
with CONNECT (RFC 9110 §9.3.6), TLS inside it end to end with the party, whose name and
certificate bastion checks as without a proxy. An ``https://`` proxy is spoken to over TLS
itself, its certificate checked against the process's trust store for its host: the CONNECT
request, its credentials and the party's TLS (TLS in TLS, the stdlib's `ssl` over memory
buffers through asyncio or anyio) all travel inside that TLS.

Where the address rule applies (`bastion.egress.pinned`), bastion resolves the name and checks
its addresses first, then asks the proxy for a tunnel to the address it checked, not to the name:
the proxy resolves nothing, so it cannot be led where the rule refuses (a name that resolves to
169.254.169.254). The loopback, and the hosts and networks of ``egress_no_proxy``, are reached
directly. Only this setting names a proxy: HTTP_PROXY and the like are never read.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import ipaddress
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import anyio
import httpcore
import httpx

from bastion.egress import Network, is_loopback_host

# The most bytes of the proxy's answer to CONNECT bastion reads before giving up on it.
_MAX_ANSWER = 16 * 1024


class TunnelRefused(Exception):
    """The proxy did not open the tunnel asked for (its status, an answer that is not HTTP, or
    for an https proxy, TLS with it failed: its certificate not trusted or not for its host)."""


@dataclass(frozen=True)
class OutboundProxy:
    host: str
    port: int
    # The URL with its password replaced by ***: what every message names.
    shown: str
    # A Proxy-Authorization value from the URL's credentials (Basic), or None.
    authorization: str | None = field(default=None, repr=False)
    # Reached directly: host names (each with its subdomains) and IP networks.
    no_proxy: tuple[str | Network, ...] = ()
    # An https:// proxy: TLS to the proxy itself, the tunnel inside it.
    tls: bool = False

    def bypasses(self, name: str, address: str | None = None) -> bool:
        """Whether a connection to ``name`` (at ``address`` where bastion resolved it, else the
        name is the address) is made directly: the loopback, or an entry of ``no_proxy``."""
        name = name.strip("[]").lower().rstrip(".")
        address = (address or name).strip("[]")
        if is_loopback_host(name) or is_loopback_host(address):
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            ip = None
        for entry in self.no_proxy:
            if isinstance(entry, str):
                if name == entry or name.endswith("." + entry):
                    return True
            elif ip is not None and ip in entry:
                return True
        return False

    def connect_request(self, host: str, port: int) -> bytes:
        """The CONNECT request for a tunnel to ``host`` (a name or an address) and ``port``."""
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
        if self.authorization:
            lines.append(f"Proxy-Authorization: {self.authorization}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _credentials(url: str) -> tuple[str, str | None]:
    """``url`` without its credentials (shown ``***@``), and the credentials (None: none). They
    end at the last "@": a password as generated may hold "/", "?" or "#" unencoded, where
    ``urlsplit`` ends the authority, and then took part of it for the host or port and quoted it
    in its error."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not sep or not at:
        return url, None
    return f"{scheme}://***@{host}", credentials


def parse_outbound_proxy(url: str, no_proxy: str = "") -> OutboundProxy | None:
    """The proxy ``egress_proxy`` names (None when empty), with ``egress_no_proxy`` (host names
    and IP networks, comma-separated). `ValueError` naming the setting, the URL shown without
    its password: only ``http://`` or ``https://[user:password@]host[:port]`` (the credentials
    percent-encoded, or as they are up to the last "@")."""
    if not url:
        if no_proxy.strip():
            raise ValueError("egress_no_proxy is set but egress_proxy is not: name the proxy")
        return None
    shown, credentials = _credentials(url)
    try:
        parts = urlsplit(shown)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        raise ValueError(f"egress_proxy: {shown!r} is not a URL ({e})") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(
            f"egress_proxy: {shown!r} must be an http:// or https:// URL (the proxy's own"
            " address, spoken to in the clear or over TLS; https to the parties goes end to end"
            " through its CONNECT tunnel either way)"
        )
    if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(
            f"egress_proxy: {shown!r} must be {parts.scheme}://[user:password@]host[:port],"
            " nothing more"
        )
    authorization = None
    if credentials is not None:
        user, _, password = credentials.partition(":")
        pair = f"{unquote(user)}:{unquote(password)}"
        authorization = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
    return OutboundProxy(
        parts.hostname,
        port,
        shown,
        authorization,
        _no_proxy_entries(no_proxy.split(",")),
        tls=parts.scheme == "https",
    )


def _no_proxy_entries(items: Iterable[str]) -> tuple[str | Network, ...]:
    entries: list[str | Network] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        if not item.isascii():
            # Lowered below with str.lower, which makes the Kelvin sign (U+212A) a "k": such an
            # entry would exempt kiosk.example.com, a name it is not.
            raise ValueError(
                f"egress_no_proxy: {item!r} is not ASCII: write a host name of other letters in"
                " its A-label form (xn--...)"
            )
        try:
            entries.append(ipaddress.ip_network(item.strip("[]"), strict=True))
            continue
        except ValueError:
            pass
        name = item.lower().removeprefix("*.").removeprefix(".").rstrip(".")
        if not name or any(c in name for c in "/:@ *"):
            raise ValueError(
                f"egress_no_proxy: {item!r} is neither a host name (example.com, which covers"
                " its subdomains) nor an IP network (10.0.0.0/8, 192.0.2.7)"
            )
        entries.append(name)
    return tuple(entries)


_configured: OutboundProxy | None = None


def configure(proxy: OutboundProxy | None) -> None:
    """Set the process's proxy (at start: a change needs a restart), or none."""
    global _configured
    _configured = proxy


def configured() -> OutboundProxy | None:
    """The process's proxy, or None: every connection is then direct."""
    return _configured


async def open_tunnel(
    proxy: OutboundProxy,
    host: str,
    port: int,
    read: Callable[[], Awaitable[bytes]],
    write: Callable[[bytes], Awaitable[object]],
) -> None:
    """Ask the proxy, over a connection to it (``read``, ``write``), for a tunnel to ``host``
    and ``port``; `TunnelRefused` unless it answers 2xx and nothing more (TLS speaks first)."""
    await write(proxy.connect_request(host, port))
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = await read()
        if not chunk:
            raise TunnelRefused(f"the proxy {proxy.shown} closed the connection")
        answer += chunk
        if len(answer) > _MAX_ANSWER:
            raise TunnelRefused(f"the proxy {proxy.shown} answered CONNECT at unending length")
    status = answer.split(b"\r\n", 1)[0].decode("latin-1")
    words = status.split(" ", 2)
    if len(words) < 2 or not words[0].startswith("HTTP/1.") or not words[1].startswith("2"):
        if proxy.authorization:  # a proxy that echoes what it was sent: not into bastion's logs
            status = status.replace(proxy.authorization, "Basic ***")
        raise TunnelRefused(
            f"the proxy {proxy.shown} refused a tunnel to {host}:{port}: {status[:200]!r}"
        )
    if not answer.endswith(b"\r\n\r\n"):
        raise TunnelRefused(f"the proxy {proxy.shown} sent data into the tunnel before bastion")


async def tunnel_socket(proxy: OutboundProxy, host: str, port: int) -> socket.socket:
    """A socket to an http:// proxy whose tunnel to ``host`` and ``port`` is open, for
    asyncio's ``create_connection(sock=...)``. `OSError` when the proxy cannot be reached,
    `TunnelRefused` when it does not open the tunnel."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(proxy.host, proxy.port, type=socket.SOCK_STREAM)
    error: OSError = OSError(f"cannot resolve {proxy.host}")
    for family, kind, protocol, _, address in infos:
        sock = socket.socket(family, kind, protocol)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
        except OSError as e:
            sock.close()
            error = e
            continue
        try:
            await open_tunnel(
                proxy,
                host,
                port,
                functools.partial(loop.sock_recv, sock, 4096),
                functools.partial(loop.sock_sendall, sock),
            )
        except BaseException:
            sock.close()
            raise
        return sock
    raise error


class _TunnelOpening(asyncio.Protocol):
    """The proxy's side of a TLS connection to it while CONNECT is asked and answered: what it
    sends, read in turn (b"" once it has closed)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._received: asyncio.Queue[bytes] = asyncio.Queue()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._received.put_nowait(data)

    def eof_received(self) -> None:
        self._received.put_nowait(b"")

    def connection_lost(self, exc: Exception | None) -> None:
        self._received.put_nowait(b"")

    async def read(self) -> bytes:
        return await self._received.get()

    async def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


async def tunnel_connection(
    proxy: OutboundProxy,
    host: str,
    port: int,
    protocol_factory: Callable[[], asyncio.Protocol],
    *,
    ssl_context: ssl.SSLContext | None,
    proxy_trust: ssl.SSLContext,
) -> tuple[asyncio.BaseTransport, asyncio.Protocol]:
    """asyncio's connection to ``host`` and ``port`` through the proxy's tunnel (TLS inside
    for ``host`` where ``ssl_context`` is given), as ``loop.create_connection`` returns it. An
    https proxy's certificate is checked with ``proxy_trust`` for its host. `OSError` when the
    proxy or the party cannot be reached (or the party's TLS fails), `TunnelRefused` when TLS
    with the proxy fails or it does not open the tunnel."""
    loop = asyncio.get_running_loop()
    tls_host = host if ssl_context is not None else None
    if not proxy.tls:
        sock = await tunnel_socket(proxy, host, port)
        return await loop.create_connection(
            protocol_factory, sock=sock, ssl=ssl_context, server_hostname=tls_host
        )
    try:
        transport, opening = await loop.create_connection(
            _TunnelOpening, proxy.host, proxy.port, ssl=proxy_trust, server_hostname=proxy.host
        )
    except ssl.SSLError as e:
        raise TunnelRefused(f"cannot connect to the proxy {proxy.shown}: {e}") from None
    try:
        await open_tunnel(proxy, host, port, opening.read, opening.write)
        protocol = protocol_factory()
        tunnel: asyncio.BaseTransport | None = transport
        if ssl_context is None:
            transport.set_protocol(protocol)
        else:
            # The party's TLS over the proxy's: asyncio's TLS runs over any transport.
            tunnel = await loop.start_tls(
                transport, protocol, ssl_context, server_hostname=tls_host
            )
        if tunnel is None:  # closed as the handshake ended
            raise ConnectionResetError(f"{host}:{port} closed the connection")
    except BaseException:
        transport.close()
        raise
    protocol.connection_made(tunnel)
    return tunnel, protocol


class _Tunnelling(httpcore.AsyncNetworkBackend):
    """httpcore's connections, each a tunnel through ``proxy`` to the host and port asked for
    (the address bastion checked, where it pinned one); httpcore then starts TLS inside with
    the request's ``sni_hostname``, as over a direct connection. An https proxy is spoken to
    over TLS checked with ``proxy_trust``; anyio's TLS wraps any stream, that one too."""

    def __init__(self, proxy: OutboundProxy, proxy_trust: ssl.SSLContext) -> None:
        self._proxy = proxy
        self._proxy_trust = proxy_trust
        self._tcp = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable | None = None,
    ) -> httpcore.AsyncNetworkStream:
        proxy = self._proxy
        try:
            stream = await self._tcp.connect_tcp(
                proxy.host, proxy.port, timeout, local_address, socket_options
            )
        except httpcore.ConnectError as e:
            raise httpcore.ProxyError(f"cannot connect to the proxy {proxy.shown}: {e}") from None
        if proxy.tls:
            try:  # start_tls closes the stream when it fails
                stream = await stream.start_tls(self._proxy_trust, proxy.host, timeout)
            except httpcore.ConnectError as e:
                raise httpcore.ProxyError(
                    f"cannot connect to the proxy {proxy.shown}: {e}"
                ) from None
        try:
            with anyio.fail_after(timeout):
                await open_tunnel(proxy, host, port, lambda: stream.read(4096), stream.write)
        except TunnelRefused as e:
            await stream.aclose()
            raise httpcore.ProxyError(str(e)) from None
        except TimeoutError:
            await stream.aclose()
            raise httpcore.ConnectTimeout(f"the proxy {proxy.shown} did not answer") from None
        except BaseException:
            await stream.aclose()
            raise
        return stream

    async def sleep(self, seconds: float) -> None:
        await self._tcp.sleep(seconds)


class RoutedTransport(httpx.AsyncBaseTransport):
    """Each request directly or through the proxy's tunnel, by the name it is for (a pinned
    request's ``sni_hostname``) and the address it goes to (`OutboundProxy.bypasses`). The
    parties' certificates are checked with ``verify``, an https proxy's with ``proxy_trust``
    (the process's trust store, whatever a party's ``verify``)."""

    def __init__(self, proxy: OutboundProxy, verify: object, proxy_trust: ssl.SSLContext) -> None:
        self._proxy = proxy
        self._direct = httpx.AsyncHTTPTransport(verify=verify, trust_env=False)  # type: ignore[arg-type]
        self._tunnelled = httpx.AsyncHTTPTransport(verify=verify, trust_env=False)  # type: ignore[arg-type]
        # httpx takes no network backend: its pool is replaced by one with the tunnelling
        # backend, with httpx's own default limits.
        self._tunnelled._pool = httpcore.AsyncConnectionPool(
            ssl_context=verify,  # type: ignore[arg-type]
            max_connections=100,
            max_keepalive_connections=20,
            keepalive_expiry=5.0,
            network_backend=_Tunnelling(proxy, proxy_trust),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        name = request.extensions.get("sni_hostname") or request.url.host
        direct = self._proxy.bypasses(name, request.url.host)
        via = self._direct if direct else self._tunnelled
        return await via.handle_async_request(request)

    async def aclose(self) -> None:
        await self._direct.aclose()
        await self._tunnelled.aclose()
