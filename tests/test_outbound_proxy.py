"""bastion's requests to other parties through the operator's HTTP proxy ([server] egress_proxy,
`bastion.outbound_proxy`), against a real proxy: Debian's tinyproxy, started here on a port of
its own with a configuration of its own (Basic credentials required), whose log shows each
CONNECT; for an ``https://`` proxy, Debian's HAProxy in front of it terminating TLS with a
certificate made here. The parties are https servers on this machine's own non-loopback address
(the loopback never goes through the proxy): ``peer.test`` resolves to it, and the address rule
lets it through as a listed private network; ``metadata.test`` resolves to the cloud's metadata
service. bastion trusts the parties' and the proxy's certificates as an operator makes it trust a
private CA: OpenSSL's ``SSL_CERT_FILE`` names a bundle holding them."""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bastion import outbound_proxy, tls
from bastion.gateway.http1 import Http1Client, HttpConnectError
from bastion.oauth.jwks import FetchLimits, RemoteDocumentError, fetch_json
from bastion.outbound_proxy import parse_outbound_proxy
from bastion.server.config import ConfigError, ServerConfig
from bastion.webhooks import DELIVERED, FAILED, Webhook
from tests.conftest import unavailable
from tests.oauth.support import self_signed_certificate, serve
from tests.ports import free_port
from tests.test_egress import deliver, own_address
from tests.waits import PATIENCE, eventually

TINYPROXY = "/usr/bin/tinyproxy"
HAPROXY = "/usr/sbin/haproxy"
PASSWORD = "pr0xy-s3cret"


def _started(command: list[str], port: int, what: str) -> subprocess.Popen:
    """``command`` run quietly, once it accepts connections on ``port``."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def accepting() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            assert process.poll() is None, f"{what} exited"
            return False

    assert eventually(accepting, every=0.05), f"{what} did not start"
    return process


class Tinyproxy:
    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.log_file = directory / "tinyproxy.log"
        config = directory / "tinyproxy.conf"
        config.write_text(
            f"Port {self.port}\nListen 127.0.0.1\nTimeout 10\nMaxClients 20\n"
            f'LogFile "{self.log_file}"\nLogLevel Info\nAllow 127.0.0.1\n'
            f"BasicAuth bastion {PASSWORD}\n"
        )
        self.process = _started([TINYPROXY, "-d", "-c", str(config)], self.port, "tinyproxy")
        self.url = f"http://bastion:{PASSWORD}@127.0.0.1:{self.port}"

    def connects(self) -> list[str]:
        text = self.log_file.read_text() if self.log_file.exists() else ""
        asked = "): CONNECT "  # "Request (file descriptor 5): CONNECT host:port HTTP/1.1"
        return [line.split(asked, 1)[1] for line in text.splitlines() if asked in line]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(PATIENCE)


class _CertificateAuthority:
    """A CA made here (``cryptography``) and the server certificates it issues."""

    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.certificate = (
            _valid_now(x509.CertificateBuilder())
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.certificate.public_bytes(serialization.Encoding.PEM).decode()

    def issue(self, directory: Path, host: str | ipaddress.IPv4Address) -> Path:
        """A certificate for ``host`` and its key in one PEM file in ``directory``."""
        directory.mkdir()
        key = ec.generate_private_key(ec.SECP256R1())
        named = x509.IPAddress(host) if not isinstance(host, str) else x509.DNSName(host)
        certificate = (
            _valid_now(x509.CertificateBuilder())
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(host))]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .add_extension(x509.SubjectAlternativeName([named]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        path = directory / "front.pem"
        path.write_bytes(
            certificate.public_bytes(serialization.Encoding.PEM)
            + key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return path


def _valid_now(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        builder.serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
    )


class TlsFront:
    """HAProxy terminating TLS with ``certificate`` (a PEM file holding the certificate and its
    key) on a port of its own, passing the bytes inside to ``tinyproxy``: an https:// proxy."""

    def __init__(self, directory: Path, certificate: Path, tinyproxy: Tinyproxy) -> None:
        self.port = free_port()
        config = directory / f"haproxy-{self.port}.cfg"
        config.write_text(
            "global\n    maxconn 100\n"
            "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n"
            "    timeout server 30s\n"
            f"frontend tls\n    bind 127.0.0.1:{self.port} ssl crt {certificate}\n"
            "    default_backend tinyproxy\n"
            f"backend tinyproxy\n    server tinyproxy 127.0.0.1:{tinyproxy.port}\n"
        )
        self.process = _started([HAPROXY, "-db", "-f", str(config)], self.port, "HAProxy")
        self.url = f"https://bastion:{PASSWORD}@127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(PATIENCE)


async def _answer(request: Request) -> JSONResponse:
    return JSONResponse({"path": request.url.path, "host": request.headers["host"]})


@pytest.fixture
def world(tmp_path, monkeypatch) -> Iterator[dict]:
    """tinyproxy; peer.test (https, its certificate for the name) and the same address by number
    (its certificate for the address), both trusted, and by number over plain http; the process's proxy set, and unset after."""
    if not os.path.exists(TINYPROXY):
        unavailable("tinyproxy is not installed (Debian package tinyproxy)")
    own = own_address()
    for part in ("n", "a"):
        (tmp_path / part).mkdir()
    named_cert, named_key = self_signed_certificate(tmp_path / "n", dns_name="peer.test")
    number_cert, number_key = self_signed_certificate(tmp_path / "a", addresses=(own,))
    # The https proxies' certificates, each with its key (as HAProxy takes them): from the
    # proxy CA, for 127.0.0.1 ("p") or for another name ("m"); from a CA bastion does not
    # trust, for 127.0.0.1 ("u").
    proxy_ca, other_ca = _CertificateAuthority("Proxy CA"), _CertificateAuthority("Other CA")
    fronts = {
        "p": proxy_ca.issue(tmp_path / "p", ipaddress.ip_address("127.0.0.1")),
        "m": proxy_ca.issue(tmp_path / "m", "elsewhere.test"),
        "u": other_ca.issue(tmp_path / "u", ipaddress.ip_address("127.0.0.1")),
    }
    trusted = tmp_path / "trusted.pem"
    trusted.write_text(Path(named_cert).read_text() + Path(number_cert).read_text() + proxy_ca.pem)
    monkeypatch.setenv("SSL_CERT_FILE", str(trusted))
    tls.trust.cache_clear()
    real = socket.getaddrinfo

    def resolving(host, port, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        address = {"peer.test": own, "metadata.test": "169.254.169.254"}.get(name)
        if address:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolving)
    app = Starlette(routes=[Route("/{path:path}", _answer, methods=["GET", "POST"])])
    named, numbered, plain = (socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(3))
    for sock in (named, numbered, plain):
        sock.bind((own, 0))
    proxy = Tinyproxy(tmp_path)
    try:
        with (
            serve(app, named, ssl_certfile=named_cert, ssl_keyfile=named_key),
            serve(app, numbered, ssl_certfile=number_cert, ssl_keyfile=number_key),
            serve(app, plain),
        ):
            yield {
                "own": own,
                "proxy": proxy,
                "fronts": fronts,
                "peer": f"https://peer.test:{named.getsockname()[1]}",
                "numbered": f"https://{own}:{numbered.getsockname()[1]}",
                "plain": f"http://{own}:{plain.getsockname()[1]}",
                "limits": FetchLimits(private_addresses=(ipaddress.ip_network(f"{own}/32"),)),
            }
    finally:
        outbound_proxy.configure(None)
        proxy.stop()
        monkeypatch.delenv("SSL_CERT_FILE")
        tls.trust.cache_clear()


@pytest.fixture
def tls_front(world, tmp_path) -> Iterator[Callable[[str], TlsFront]]:
    """HAProxy in front of the world's tinyproxy, with the certificate asked for: "p" (trusted,
    for 127.0.0.1), "m" (trusted, for elsewhere.test), "u" (for 127.0.0.1, not trusted)."""
    if not os.path.exists(HAPROXY):
        unavailable("HAProxy is not installed (Debian package haproxy)")
    started: list[TlsFront] = []

    def front(certificate: str) -> TlsFront:
        started.append(TlsFront(tmp_path, world["fronts"][certificate], world["proxy"]))
        return started[-1]

    try:
        yield front
    finally:
        for each in started:
            each.stop()


def _use(url: str, no_proxy: str = "") -> None:
    outbound_proxy.configure(parse_outbound_proxy(url, no_proxy))


def test_a_document_is_fetched_through_the_proxy_by_the_address_bastion_checked(world, caplog):
    caplog.set_level(logging.DEBUG)
    _use(world["proxy"].url)
    document = anyio.run(fetch_json, world["peer"] + "/jwks", world["limits"])
    port = world["peer"].rsplit(":", 1)[1]
    # TLS and Host were the name's; the proxy was asked for the address checked, not the name.
    assert document == {"path": "/jwks", "host": f"peer.test:{port}"}
    assert world["proxy"].connects() == [f"{world['own']}:{port} HTTP/1.1"]
    assert PASSWORD not in caplog.text


def test_a_host_in_egress_no_proxy_is_reached_directly(world):
    _use(world["proxy"].url, "example.com, peer.test")
    assert anyio.run(fetch_json, world["peer"] + "/jwks", world["limits"])["path"] == "/jwks"
    _use(world["proxy"].url, f"{world['own']}/32")
    assert anyio.run(fetch_json, world["peer"] + "/jwks", world["limits"])["path"] == "/jwks"
    assert world["proxy"].connects() == []


def test_a_name_resolving_to_the_metadata_service_is_refused_before_the_proxy_is_asked(
    world, caplog
):
    _use(world["proxy"].url)
    with (
        caplog.at_level(logging.INFO, logger="bastion.egress"),
        pytest.raises(RemoteDocumentError, match="metadata.test resolves to a non-public address"),
    ):
        anyio.run(fetch_json, "https://metadata.test/latest/meta-data/", world["limits"])
    # The address is bastion's log's to name, not the refusal's (whoever chose the URL reads it).
    assert "metadata.test resolves to non-public address 169.254.169.254" in caplog.text
    assert world["proxy"].connects() == []


def test_a_webhook_is_delivered_through_the_proxy(world, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    _use(world["proxy"].url)
    hook = Webhook(url=world["numbered"] + "/hook", secret=b"0123456789abcdef0123")
    assert deliver(tmp_path / "outbox", hook) == DELIVERED
    assert world["proxy"].connects() == [world["numbered"].removeprefix("https://") + " HTTP/1.1"]
    assert PASSWORD not in caplog.text


def test_a_webhook_by_name_goes_through_the_proxy_to_the_address_bastion_checked(world, tmp_path):
    """A webhook named by a DNS name is resolved and checked by bastion, and the proxy asked for
    the address checked: one whose name resolves to the metadata service is refused before the
    proxy is asked; one on the private network it lists is delivered, TLS the name's."""
    _use(world["proxy"].url)
    secret = b"0123456789abcdef0123"
    port = world["peer"].rsplit(":", 1)[1]
    metadata = Webhook(url=f"https://metadata.test:{port}/hook", secret=secret)
    assert deliver(tmp_path / "refused", metadata) == FAILED
    listed = world["limits"].private_addresses
    hook = Webhook(url=world["peer"] + "/hook", secret=secret, allow_private_addresses=listed)
    assert deliver(tmp_path / "listed", hook) == DELIVERED
    assert world["proxy"].connects() == [f"{world['own']}:{port} HTTP/1.1"]
    # Without the setting the private address it resolves to is refused, the proxy not asked.
    unlisted = Webhook(url=world["peer"] + "/hook", secret=secret)
    assert deliver(tmp_path / "unlisted", unlisted) == FAILED
    assert len(world["proxy"].connects()) == 1


def test_a_plain_http_webhook_by_a_name_in_egress_no_proxy_is_reached_directly(world, tmp_path):
    """The name a pinned request is for decides whether it goes direct, over plain http as over
    https: the connection is made to the address checked, not to the name."""
    _use(world["proxy"].url, "peer.test")
    port = world["plain"].rsplit(":", 1)[1]
    hook = Webhook(
        url=f"http://peer.test:{port}/hook",
        secret=b"0123456789abcdef0123",
        allow_http=True,
        allow_private_addresses=world["limits"].private_addresses,
    )
    assert deliver(tmp_path / "outbox", hook) == DELIVERED
    assert world["proxy"].connects() == []


def test_an_upstream_is_reached_through_the_proxy(world):
    _use(world["proxy"].url)
    assert b'"path":"/mcp"' in anyio.run(_post_upstream, world["numbered"] + "/mcp")
    assert world["proxy"].connects() == [world["numbered"].removeprefix("https://") + " HTTP/1.1"]


def test_a_proxy_that_is_down_or_refuses_is_a_clear_failure_naming_no_password(world):
    down = f"http://bastion:{PASSWORD}@127.0.0.1:{free_port()}"
    wrong = world["proxy"].url.replace(PASSWORD, "not-the-password")
    for url, said in ((down, "cannot connect to the proxy"), (wrong, "refused a tunnel")):
        _use(url)
        with pytest.raises(RemoteDocumentError) as fetched:
            anyio.run(fetch_json, world["peer"] + "/jwks", world["limits"])
        assert said in str(fetched.value) and "http://***@127.0.0.1" in str(fetched.value)

        async def connect() -> None:
            await Http1Client(world["numbered"] + "/mcp")._connect()

        with pytest.raises(HttpConnectError) as connected:  # the gateway's "upstream down"
            anyio.run(connect)
        assert "***@127.0.0.1" in str(connected.value)
        for message in (str(fetched.value), str(connected.value)):
            assert "not-the-password" not in message and PASSWORD not in message


class HostileProxy:
    """A proxy on the loopback that reads the CONNECT request and answers ``answer(request)``
    (None: nothing, the connection held open until the test ends)."""

    def __init__(self, answer: Callable[[bytes], bytes | None]) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://bastion:{PASSWORD}@127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, args=(answer,), daemon=True)
        self.thread.start()

    def _serve(self, answer: Callable[[bytes], bytes | None]) -> None:
        with contextlib.suppress(OSError):  # closed by `close`
            while True:
                connection, _ = self.sock.accept()
                self.held.append(connection)
                said = answer(connection.recv(65536))
                if said is not None:
                    connection.sendall(said)

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept (close alone does not)
        self.sock.close()
        for connection in self.held:
            connection.close()
        self.thread.join(10)


def _refusals_through(proxy: HostileProxy) -> list[str]:
    """What a fetch and the gateway's upstream client say through ``proxy``."""
    _use(proxy.url)
    limits = FetchLimits(private_addresses=True, timeout_seconds=2)
    with pytest.raises(RemoteDocumentError) as fetched:
        anyio.run(fetch_json, "https://upstream.example/jwks", limits)

    async def connect() -> None:
        await Http1Client("https://upstream.example/mcp", connect_timeout=0.5)._connect()

    with pytest.raises(HttpConnectError) as connected:
        anyio.run(connect)
    return [str(fetched.value), str(connected.value)]


def test_a_proxy_that_never_answers_connect_is_a_failure_saying_so():
    proxy = HostileProxy(lambda request: None)
    try:
        fetched, connected = _refusals_through(proxy)
    finally:
        outbound_proxy.configure(None)
        proxy.close()
    assert "did not answer within 2 s" in fetched
    # It ended "through the proxy http://***@127.0.0.1:port: ", the reason empty.
    assert connected.endswith("no connection within 0.5 s"), connected


def test_a_proxy_that_echoes_its_credentials_in_its_refusal_has_them_hidden():
    def echo(request: bytes) -> bytes:
        return b"HTTP/1.1 407 " + request.strip().replace(b"\r\n", b" ") + b"\r\n\r\n"

    proxy = HostileProxy(echo)
    try:
        refusals = _refusals_through(proxy)
    finally:
        outbound_proxy.configure(None)
        proxy.close()
    token = base64.b64encode(f"bastion:{PASSWORD}".encode()).decode("ascii")
    for refusal in refusals:
        assert "refused a tunnel to upstream.example:443" in refusal, refusal
        assert "Proxy-Authorization: Basic ***" in refusal, refusal
        assert token not in refusal and PASSWORD not in refusal


@pytest.mark.parametrize(
    ("proxy", "no_proxy", "said"),
    [
        (f"socks5://bastion:{PASSWORD}@proxy.example:1080", "", "must be an http:// or https://"),
        (f"ftp://bastion:{PASSWORD}@proxy.example:21", "", "must be an http:// or https://"),
        (f"https://bastion:{PASSWORD}@proxy.example:3128/path", "", "nothing more"),
        (f"https://bastion:{PASSWORD}@proxy.example:99999", "", "is not a URL"),
        (f"http://bastion:{PASSWORD}@proxy.example:99999", "", "is not a URL"),
        (f"http://bastion:{PASSWORD}@proxy.example:3128/path", "", "nothing more"),
        ("http://proxy.example:3128", "example.com/x", "neither a host name"),
        # The Kelvin sign (U+212A), which str.lower makes a "k": not kiosk.example.com.
        ("http://proxy.example:3128", "corp.example, \u212aiosk.example.com", "egress_no_proxy"),
        ("http://proxy.example:3128", "bücher.example", "egress_no_proxy: .* ASCII"),
    ],
)
def test_a_proxy_setting_that_cannot_be_used_is_refused_at_start(proxy, no_proxy, said):
    overrides = {"egress_proxy": proxy, "egress_no_proxy": no_proxy}
    with pytest.raises(ConfigError, match=said) as refused:
        ServerConfig.load(env={}, overrides=overrides)
    assert PASSWORD not in str(refused.value)


# A password as generated, with characters that end a URL's authority unless percent-encoded.
DELIMITED = "Zq9w/Vx7k?Lp3m#Tr5n"


@pytest.mark.parametrize(
    "proxy",
    [
        f"http://bastion:{DELIMITED}@proxy.example:99999",
        f"https://bastion:{DELIMITED}@proxy.example:3128/path",
        f"socks5://bastion:{DELIMITED}@proxy.example:1080",
        f"http://bastion:{DELIMITED}@",
    ],
)
def test_a_refused_proxy_setting_shows_no_part_of_a_password_with_delimiters(proxy):
    # The URL was cut at its first "/" to hide the credentials, and urllib's own error quoted
    # the "port" it found: the password's first part.
    with pytest.raises(ConfigError) as refused:
        ServerConfig.load(env={}, overrides={"egress_proxy": proxy})
    for part in re.split("[/?#]", DELIMITED):
        assert part not in str(refused.value), refused.value


def test_a_password_with_delimiters_is_the_password():
    proxy = parse_outbound_proxy(f"http://bastion:{DELIMITED}@proxy.example:3128")
    assert proxy is not None and (proxy.host, proxy.port) == ("proxy.example", 3128)
    assert proxy.shown == "http://***@proxy.example:3128"
    assert proxy.authorization == "Basic " + base64.b64encode(
        f"bastion:{DELIMITED}".encode()
    ).decode("ascii")


def test_bastion_serve_refuses_a_proxy_setting_it_cannot_use(tmp_path):
    bastion = shutil.which("bastion", path=str(Path(sys.executable).parent))
    env = {
        **os.environ,
        "BASTION_EGRESS_PROXY": f"socks5://bastion:{PASSWORD}@proxy.example:1080",
        "BASTION_DATABASE": str(tmp_path / "b.db"),
    }
    ran = subprocess.run(
        [bastion or "bastion", "serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert ran.returncode != 0
    assert "egress_proxy" in ran.stderr and "must be an http:// or https:// URL" in ran.stderr
    assert PASSWORD not in ran.stderr + ran.stdout


def test_a_command_that_reaches_a_transmitter_goes_through_the_configured_proxy(
    world, tmp_path, monkeypatch, capsys
):
    """`bastion signals streams configure` runs outside the server: it reads the proxy from the
    configuration as `bastion serve` does (the peer answers no SSF metadata: the command fails,
    after fetching it through the proxy)."""
    from bastion.cli import main
    from bastion.db import Database

    monkeypatch.setenv("BASTION_SSF_PEER_BEARER", "b" * 32)
    config = tmp_path / "bastion.toml"
    config.write_text(
        f'[server]\ndatabase = "{tmp_path / "b.db"}"\negress_proxy = "{world["proxy"].url}"\n'
        '[oauth]\nissuer = "http://127.0.0.1:8000"\n'
        "[signals.ssf]\n[[signals.ssf.transmitters]]\n"
        f'name = "peer"\nissuer = "{world["numbered"]}"\naudience = "http://127.0.0.1:8000"\n'
        'delivery = "poll"\nbearer_env = "BASTION_SSF_PEER_BEARER"\n'
    )
    Database(str(tmp_path / "b.db")).close()  # as `bastion serve` leaves it
    assert main(["signals", "streams", "configure", "--config", str(config)]) == 1
    assert "stream not configured" in capsys.readouterr().err
    assert world["proxy"].connects() == [world["numbered"].removeprefix("https://") + " HTTP/1.1"]


async def _post_upstream(url: str) -> bytes:
    """One request by the gateway's upstream client (`Http1Client`) to ``url``: the body."""
    client = Http1Client(url)
    try:
        response = await client.request("POST", {"content-type": "application/json"}, b"{}")
        try:
            return await response.read()
        finally:
            response.close()
    finally:
        await client.aclose()


def test_an_https_proxy_is_accepted_at_start_and_shown_without_its_password():
    config = ServerConfig.load(
        env={}, overrides={"egress_proxy": f"https://bastion:{PASSWORD}@proxy.example:3129"}
    )
    proxy = config.outbound_proxy()
    assert proxy is not None and proxy.tls and (proxy.host, proxy.port) == ("proxy.example", 3129)
    assert proxy.shown == "https://***@proxy.example:3129" and PASSWORD not in repr(proxy)
    assert parse_outbound_proxy("https://proxy.example").port == 443


def test_a_document_and_an_upstream_are_reached_through_a_proxy_spoken_to_over_tls(
    world, tls_front, caplog
):
    caplog.set_level(logging.DEBUG)
    _use(tls_front("p").url)
    document = anyio.run(fetch_json, world["peer"] + "/jwks", world["limits"])
    port = world["peer"].rsplit(":", 1)[1]
    assert document == {"path": "/jwks", "host": f"peer.test:{port}"}
    assert b'"path":"/mcp"' in anyio.run(_post_upstream, world["numbered"] + "/mcp")
    # An http:// party (an upstream with allow_http): only the proxy's TLS around it.
    assert b'"path":"/plain"' in anyio.run(_post_upstream, world["plain"] + "/plain")
    # tinyproxy, behind HAProxy's TLS, checked the credentials and was asked for the addresses.
    assert world["proxy"].connects() == [
        f"{world['own']}:{port} HTTP/1.1",
        world["numbered"].removeprefix("https://") + " HTTP/1.1",
        world["plain"].removeprefix("http://") + " HTTP/1.1",
    ]
    assert PASSWORD not in caplog.text


def test_a_proxy_whose_certificate_is_untrusted_or_for_another_name_is_refused(world, tls_front):
    for certificate in ("u", "m"):
        front = tls_front(certificate)
        _use(front.url)
        shown = f"https://***@127.0.0.1:{front.port}"
        with pytest.raises(RemoteDocumentError) as fetched:
            anyio.run(fetch_json, world["peer"] + "/jwks", world["limits"])
        with pytest.raises(HttpConnectError) as connected:
            anyio.run(_post_upstream, world["numbered"] + "/mcp")
        for message in (str(fetched.value), str(connected.value)):
            assert f"cannot connect to the proxy {shown}" in message
            assert "CERTIFICATE_VERIFY_FAILED" in message and PASSWORD not in message
    # No CONNECT reached tinyproxy: bastion sent nothing once the proxy's TLS failed.
    assert world["proxy"].connects() == []


def test_a_name_resolving_to_the_metadata_service_is_refused_before_an_https_proxy_is_asked(
    world, tls_front, caplog
):
    _use(tls_front("p").url)
    with (
        caplog.at_level(logging.INFO, logger="bastion.egress"),
        pytest.raises(RemoteDocumentError, match="metadata.test resolves to a non-public address"),
    ):
        anyio.run(fetch_json, "https://metadata.test/latest/meta-data/", world["limits"])
    assert "metadata.test resolves to non-public address 169.254.169.254" in caplog.text
    assert world["proxy"].connects() == []


def test_the_credentials_of_an_https_proxy_go_inside_its_tls_and_a_wrong_one_is_refused(
    world, tls_front
):
    """tinyproxy behind HAProxy requires Basic credentials: the right ones open the tunnel
    (last); the wrong ones (tinyproxy answers 401) or none (407) are refused: HAProxy passed
    it what bastion sent inside the TLS."""
    front = tls_front("p")
    wrong = front.url.replace(PASSWORD, "not-the-password")
    for url, status in ((wrong, "401 Unauthorized"), (f"https://127.0.0.1:{front.port}", "407")):
        _use(url)
        with pytest.raises(RemoteDocumentError) as fetched:
            anyio.run(fetch_json, world["peer"] + "/jwks", world["limits"])
        with pytest.raises(HttpConnectError) as connected:
            anyio.run(_post_upstream, world["numbered"] + "/mcp")
        for message in (str(fetched.value), str(connected.value)):
            assert "refused a tunnel" in message and status in message
            assert "not-the-password" not in message
    _use(front.url)
    assert anyio.run(fetch_json, world["peer"] + "/jwks", world["limits"])["path"] == "/jwks"
