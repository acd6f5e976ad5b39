"""bastion's requests to other parties through the operator's HTTP proxy ([server] egress_proxy,
`bastion.outbound_proxy`), against a real proxy: Debian's tinyproxy, started here on a port of
its own with a configuration of its own (Basic credentials required), whose log shows each
CONNECT. The parties are https servers on this machine's own non-loopback address (the loopback
never goes through the proxy): ``peer.test`` resolves to it, and the address rule lets it through
as a listed private network; ``metadata.test`` resolves to the cloud's metadata service."""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bastion import outbound_proxy, tls
from bastion.gateway import http1
from bastion.gateway.http1 import Http1Client, HttpConnectError
from bastion.oauth.jwks import FetchLimits, RemoteDocumentError, fetch_json
from bastion.outbound_proxy import parse_outbound_proxy
from bastion.server.config import ConfigError, ServerConfig
from bastion.webhooks import DELIVERED, Webhook
from tests.conftest import unavailable
from tests.oauth.support import self_signed_certificate, serve
from tests.ports import free_port
from tests.test_egress import deliver, own_address

TINYPROXY = "/usr/bin/tinyproxy"
PASSWORD = "pr0xy-s3cret"


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
        self.process = subprocess.Popen(
            [TINYPROXY, "-d", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and self.process.poll() is None, (
                    "tinyproxy did not start"
                )
                time.sleep(0.05)
        self.url = f"http://bastion:{PASSWORD}@127.0.0.1:{self.port}"

    def connects(self) -> list[str]:
        text = self.log_file.read_text() if self.log_file.exists() else ""
        asked = "): CONNECT "  # "Request (file descriptor 5): CONNECT host:port HTTP/1.1"
        return [line.split(asked, 1)[1] for line in text.splitlines() if asked in line]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


async def _answer(request: Request) -> JSONResponse:
    return JSONResponse({"path": request.url.path, "host": request.headers["host"]})


@pytest.fixture
def world(tmp_path, monkeypatch) -> Iterator[dict]:
    """tinyproxy; peer.test (https, its certificate for the name) and the same address by number
    (its certificate for the address), both trusted; the process's proxy set, and unset after."""
    if not os.path.exists(TINYPROXY):
        unavailable("tinyproxy is not installed (Debian package tinyproxy)")
    own = own_address()
    for part in ("n", "a"):
        (tmp_path / part).mkdir()
    named_cert, named_key = self_signed_certificate(tmp_path / "n", dns_name="peer.test")
    number_cert, number_key = self_signed_certificate(tmp_path / "a", addresses=(own,))
    trusted = tmp_path / "trusted.pem"
    trusted.write_text(Path(named_cert).read_text() + Path(number_cert).read_text())
    context = tls.file_context(str(trusted))
    monkeypatch.setattr(tls, "trust", lambda: context)
    monkeypatch.setattr(http1, "trust", lambda: context)
    real = socket.getaddrinfo

    def resolving(host, port, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        address = {"peer.test": own, "metadata.test": "169.254.169.254"}.get(name)
        if address:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolving)
    app = Starlette(routes=[Route("/{path:path}", _answer, methods=["GET", "POST"])])
    named, numbered = (socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(2))
    for sock in (named, numbered):
        sock.bind((own, 0))
    proxy = Tinyproxy(tmp_path)
    try:
        with (
            serve(app, named, ssl_certfile=named_cert, ssl_keyfile=named_key),
            serve(app, numbered, ssl_certfile=number_cert, ssl_keyfile=number_key),
        ):
            yield {
                "own": own,
                "proxy": proxy,
                "peer": f"https://peer.test:{named.getsockname()[1]}",
                "numbered": f"https://{own}:{numbered.getsockname()[1]}",
                "limits": FetchLimits(private_addresses=(ipaddress.ip_network(f"{own}/32"),)),
            }
    finally:
        outbound_proxy.configure(None)
        proxy.stop()


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


def test_a_name_resolving_to_the_metadata_service_is_refused_before_the_proxy_is_asked(world):
    _use(world["proxy"].url)
    with pytest.raises(RemoteDocumentError, match="non-public address 169.254.169.254"):
        anyio.run(fetch_json, "https://metadata.test/latest/meta-data/", world["limits"])
    assert world["proxy"].connects() == []


def test_a_webhook_is_delivered_through_the_proxy(world, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    _use(world["proxy"].url)
    hook = Webhook(url=world["numbered"] + "/hook", secret=b"0123456789abcdef0123")
    assert deliver(tmp_path / "outbox", hook) == DELIVERED
    assert world["proxy"].connects() == [world["numbered"].removeprefix("https://") + " HTTP/1.1"]
    assert PASSWORD not in caplog.text


def test_an_upstream_is_reached_through_the_proxy(world):
    _use(world["proxy"].url)

    async def call() -> bytes:
        client = Http1Client(world["numbered"] + "/mcp")
        try:
            response = await client.request("POST", {"content-type": "application/json"}, b"{}")
            try:
                return await response.read()
            finally:
                response.close()
        finally:
            await client.aclose()

    assert b'"path":"/mcp"' in anyio.run(call)
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


@pytest.mark.parametrize(
    ("proxy", "no_proxy", "said"),
    [
        (f"https://bastion:{PASSWORD}@proxy.example:3128", "", "must be an http:// URL"),
        (f"socks5://bastion:{PASSWORD}@proxy.example:1080", "", "must be an http:// URL"),
        (f"http://bastion:{PASSWORD}@proxy.example:99999", "", "is not a URL"),
        (f"http://bastion:{PASSWORD}@proxy.example:3128/path", "", "nothing more"),
        ("http://proxy.example:3128", "example.com/x", "neither a host name"),
    ],
)
def test_a_proxy_setting_that_cannot_be_used_is_refused_at_start(proxy, no_proxy, said):
    overrides = {"egress_proxy": proxy, "egress_no_proxy": no_proxy}
    with pytest.raises(ConfigError, match=said) as refused:
        ServerConfig.load(env={}, overrides=overrides)
    assert PASSWORD not in str(refused.value)


def test_bastion_serve_refuses_a_proxy_setting_it_cannot_use(tmp_path):
    bastion = shutil.which("bastion", path=str(Path(sys.executable).parent))
    env = {
        **os.environ,
        "BASTION_EGRESS_PROXY": f"https://bastion:{PASSWORD}@proxy.example:3128",
        "BASTION_DATABASE": str(tmp_path / "b.db"),
    }
    ran = subprocess.run(
        [bastion or "bastion", "serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert ran.returncode != 0
    assert "egress_proxy" in ran.stderr and "must be an http:// URL" in ran.stderr
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
