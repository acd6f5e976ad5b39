"""Every request bastion makes to another party goes one way (`bastion.tls.fetching_client`,
`bastion.egress.cleartext_problem`): no proxy taken from the environment, https except to the
loopback (or where a setting says so), one trust store. Against real servers over sockets: a
recorder that stands for a proxy or a receiver, on the loopback and on this machine's own
non-loopback address."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import anyio
import pytest

from bastion import tls
from bastion.approvals.settings import ApprovalSettings
from bastion.db import Database
from bastion.oauth.jwks import FetchLimits, RemoteDocumentError, fetch_json
from bastion.server.config import ConfigError
from bastion.signals.settings import SsfSettings
from bastion.webhooks import DELIVERED, FAILED, Outbox, Webhook, WebhookDelivery
from tests.conftest import unavailable
from tests.waits import PATIENCE

SECRET = "0123456789abcdef0123"


class Recorder:
    """A bare HTTP/1.1 server: records each request's first line and Host, answers ``answer``."""

    def __init__(self, host: str = "127.0.0.1", answer: bytes = b"{}") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.answer = answer
        self.requests: list[str] = []
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(2)
                data = b""
                try:
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                except OSError:
                    continue
                self.requests.append(data.split(b"\r\n", 1)[0].decode("latin-1"))
                head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                conn.sendall(
                    head
                    + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(self.answer)
                    + self.answer
                )

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        self.sock.close()


@contextmanager
def recording(host: str = "127.0.0.1", answer: bytes = b"{}") -> Iterator[Recorder]:
    recorder = Recorder(host, answer)
    try:
        yield recorder
    finally:
        recorder.close()


def own_address() -> str:
    """This machine's own non-loopback IPv4 address (`hostname -I`); a machine with none is
    reported as a missing service is (a failure under BASTION_REQUIRE_SERVICES=1, as in CI)."""
    try:
        words = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    except OSError:
        words = []
    for word in words:
        if "." in word and not word.startswith("127."):
            return word
    unavailable("this machine has no non-loopback IPv4 address")


def deliver(tmp_path, hook: Webhook) -> str:
    """Send one notification to ``hook`` through a real outbox; its final state."""
    # A delivery that must be answered is bounded against a hang only (PATIENCE), not by a
    # time a loaded machine could overrun; a refused one fails before anything is sent.
    settings = WebhookDelivery(
        webhooks=(hook,), webhook_attempts=1, webhook_timeout_seconds=PATIENCE
    )
    tmp_path.mkdir(exist_ok=True)
    db = Database(str(tmp_path / "outbox.db"))
    outbox = Outbox("egress_test", settings, db, sweep_seconds=0.05)

    def final() -> str:
        [row] = db.execute("SELECT state FROM egress_test_outbox")
        return row[0]

    async def scenario() -> str:
        await outbox.start()
        try:
            outbox.enqueue("r1", lambda delivery: {"event": "test", "text": "hello"})
            deadline = time.monotonic() + PATIENCE  # the state is read on a worker thread
            while (state := await anyio.to_thread.run_sync(final)) not in (DELIVERED, FAILED):
                assert time.monotonic() < deadline, "the delivery never ended"
                await anyio.sleep(0.02)
            return state
        finally:
            await outbox.close()

    try:
        return anyio.run(scenario)
    finally:
        db.close()


@pytest.fixture
def proxy_in_environment(monkeypatch):
    """A proxy named by every variable a client library reads, and nothing exempted."""
    with recording() as proxy:
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
            monkeypatch.setenv(name, proxy.url)
            monkeypatch.setenv(name.lower(), proxy.url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        yield proxy


def test_a_webhook_is_never_sent_through_a_proxy_named_in_the_environment(
    tmp_path, proxy_in_environment
):
    with recording() as receiver:
        state = deliver(tmp_path, Webhook(f"{receiver.url}/hook", SECRET.encode()))
        assert proxy_in_environment.requests == []
        assert receiver.requests == ["POST /hook HTTP/1.1"]
        assert state == DELIVERED


def test_a_transmitters_stream_is_never_managed_through_a_proxy_named_in_the_environment(
    tmp_path, proxy_in_environment
):
    from bastion.facts.store import FactStore
    from bastion.oauth.store import OAuthStore
    from bastion.signals.ssf import SsfReceiver

    with recording(answer=b'{"stream_id": "s1"}') as transmitter:
        settings = SsfSettings.from_table(
            {"transmitters": [{
                "name": "idp", "issuer": transmitter.url, "audience": "https://bastion.test",
                "delivery": "poll", "bearer_env": "BEARER",
            }]},
            issuer="https://bastion.test",
            env={"BEARER": "b" * 32},
        )  # fmt: skip
        db = Database(str(tmp_path / "ssf.db"))
        receiver = SsfReceiver(settings, db, OAuthStore(db), FactStore(db), lambda: None)
        t = settings.transmitters[0]

        async def scenario():
            await receiver.start()
            try:
                return await receiver._call(t, "GET", f"{transmitter.url}/stream")
            finally:
                await receiver.close()

        try:
            status, body = anyio.run(scenario)
        finally:
            db.close()
        assert proxy_in_environment.requests == []
        # (and the stream's own task, started with it, asked for the metadata directly too)
        assert "GET /stream HTTP/1.1" in transmitter.requests
        assert (status, json.loads(body)) == (200, {"stream_id": "s1"})


def test_a_plain_http_webhook_beyond_the_loopback_is_refused_at_start_naming_the_setting():
    address = own_address()
    table = {"webhooks": [{"url": f"http://{address}:9/hook", "secret_env": "S"}]}
    with pytest.raises(ConfigError, match=r"approvals.webhooks\[0\].url.*https.*allow_http"):
        ApprovalSettings.from_mapping(table, env={"S": SECRET})
    # The loopback needs no setting (127.0.0.2 is the loopback too), nor https anywhere.
    for url in ("http://127.0.0.2:9/hook", "http://localhost/h", "https://chat.example/h"):
        hooks = {"webhooks": [{"url": url, "secret_env": "S"}]}
        assert ApprovalSettings.from_mapping(hooks, env={"S": SECRET}).webhooks[0].url == url
    with pytest.raises(ConfigError, match=r"allow_http must be true or false"):
        ApprovalSettings.from_mapping(
            {"webhooks": [{**table["webhooks"][0], "allow_http": "yes"}]}, env={"S": SECRET}
        )


def test_a_plain_http_webhook_beyond_the_loopback_is_sent_only_when_it_allows_http(tmp_path):
    address = own_address()
    with recording(address) as receiver:
        url = f"{receiver.url}/hook"
        # Made without the settings' check: the client refuses it all the same.
        assert deliver(tmp_path / "a", Webhook(url, SECRET.encode())) == FAILED
        assert receiver.requests == []
        table = {"webhooks": [{"url": url, "secret_env": "S", "allow_http": True}]}
        [hook] = ApprovalSettings.from_mapping(table, env={"S": SECRET}).webhooks
        assert deliver(tmp_path / "b", hook) == DELIVERED
        assert receiver.requests == ["POST /hook HTTP/1.1"]


def test_a_document_over_plain_http_beyond_the_loopback_is_not_fetched():
    address = own_address()
    with recording(address, b'{"keys": []}') as remote:
        with pytest.raises(RemoteDocumentError, match="https"):
            anyio.run(fetch_json, f"{remote.url}/jwks", FetchLimits())
        assert remote.requests == []
    with recording("127.0.0.2", b'{"keys": []}') as loopback:
        assert anyio.run(fetch_json, f"{loopback.url}/jwks", FetchLimits()) == {"keys": []}


def test_a_transmitter_on_any_loopback_address_may_speak_plain_http():
    for issuer in ("http://127.0.0.2:8443", "http://localhost:8443", "http://[::1]:8443"):
        settings = SsfSettings.from_table(
            {"transmitters": [{
                "name": "idp", "issuer": issuer, "audience": "https://bastion.test",
                "delivery": "poll", "bearer_env": "BEARER",
            }]},
            issuer="https://bastion.test",
            env={"BEARER": "b" * 32},
        )  # fmt: skip
        assert settings.transmitters[0].issuer == issuer


def test_every_outbound_client_trusts_one_store():
    """The gateway's upstreams and every other party are verified against the same roots: a
    private CA an operator adds is trusted by all of them or by none."""
    from bastion.gateway.http1 import Http1Client

    upstream = Http1Client("https://mcp.example.com/mcp")
    client = tls.fetching_client()
    try:
        pool = client._transport._pool  # type: ignore[attr-defined]
        assert upstream._ssl is pool._ssl_context is tls.trust()
    finally:
        anyio.run(client.aclose)


def test_a_plain_http_upstream_beyond_the_loopback_is_refused_at_start_naming_the_setting():
    from bastion.gateway.config import GatewayConfig

    def upstream(url: str, **more) -> dict:
        return {"upstreams": [{"name": "crm", "url": url, **more}]}

    address = own_address()
    with pytest.raises(ConfigError, match=r"gateway.upstreams\[0\].url.*https.*allow_http"):
        GatewayConfig.from_mapping(upstream(f"http://{address}:9000/mcp"), env={})
    allowed = GatewayConfig.from_mapping(
        upstream(f"http://{address}:9000/mcp", allow_http=True), env={}
    )
    assert allowed.upstreams[0].allow_http is True
    for url in ("http://127.0.0.2:9000/mcp", "http://localhost/mcp", "https://crm.example/mcp"):
        assert GatewayConfig.from_mapping(upstream(url), env={}).upstreams[0].url == url
    with pytest.raises(ConfigError, match=r"allow_http must be true or false"):
        GatewayConfig.from_mapping(upstream("https://crm.example/mcp", allow_http=1), env={})
