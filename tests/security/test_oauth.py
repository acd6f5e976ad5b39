"""Attacks on the authorization server of a real `bastion serve` (a process of its own, its own
SQLite file, production Argon2id parameters): guessing passwords, flooding registration and
the audit log, a client ID metadata document that trickles its headers, redirect URIs outside
RFC 3986. Each must be refused, and the refusal must cost the server little."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest

from tests import clients
from tests.oauth.support import TricklingHost, free_socket, hidden_fields, pkce_pair
from tests.waits import PATIENCE, until_ready

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "a password nobody guesses"
REDIRECT = "http://127.0.0.1:9/callback"


@dataclass
class Served:
    """A running `bastion serve` with an [oauth] table, and one user, alice."""

    process: subprocess.Popen
    url: str
    resource: str
    database: Path
    http: httpx.Client

    def audit_rows(self, kind: str) -> list[dict]:
        with sqlite3.connect(self.database) as db:
            rows = db.execute("SELECT detail FROM audit_events WHERE kind = ?", (kind,)).fetchall()
        return [json.loads(row[0]) for row in rows]

    def login_form(self, client_id: str, redirect_uri: str = REDIRECT) -> tuple[httpx.Client, dict]:
        """A browser at the login page of a new authorization request."""
        browser = clients.client(timeout=PATIENCE)
        _, challenge = pkce_pair()
        params = {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": redirect_uri,
            "state": "s",
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "resource": self.resource,
        }
        page = browser.get(f"{self.url}/authorize?{urlencode(params)}")
        assert page.status_code == 200, page.text
        return browser, hidden_fields(page.text)

    def stop(self) -> None:
        """SIGTERM, as a service manager stops it (the shutdown writes open refusal counts)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(PATIENCE)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _serve(directory: Path, client_metadata: dict | None = None) -> Served:
    port = free_socket().getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    database = directory / "bastion.db"
    metadata = "".join(f"{k} = {json.dumps(v)}\n" for k, v in (client_metadata or {}).items())
    config = directory / "bastion.toml"
    config.write_text(
        f"""
[server]
host = "127.0.0.1"
port = {port}
database = "{database}"

[oauth]
issuer = "{url}"
key_dir = "{directory / "keys"}"

[oauth.client_metadata]
{metadata}
[[oauth.resources]]
uri = "{url}/mcp/desk"
scopes = ["customers:read"]
name = "Customer desk"
"""
    )
    subprocess.run(
        [sys.executable, "-m", "bastion.cli", "users", "create", "alice", "--password-stdin",
         "--database", str(database)],
        input=PASSWORD + "\n", text=True, check=True, cwd=ROOT, capture_output=True,
    )  # fmt: skip
    log = directory / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "bastion.cli", "serve", "--config", str(config)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        until_ready(process, lambda: clients.ready(url), log)
    except AssertionError:
        process.kill()
        raise
    return Served(process, url, f"{url}/mcp/desk", database, clients.client(timeout=PATIENCE))


@pytest.fixture
def served(tmp_path) -> Iterator[Served]:
    running = _serve(tmp_path)
    yield running
    running.stop()


def _register(served: Served, **metadata) -> httpx.Response:
    body = {"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none", **metadata}
    return served.http.post(f"{served.url}/register", json=body)


def test_guessing_a_password_is_throttled_before_any_hash(served: Served):
    client = _register(served).json()["client_id"]
    answers = []
    browser, fields = served.login_form(client)
    for guess in range(5):
        if guess == 3:  # the first request ended after 3 failures: start again
            browser, fields = served.login_form(client)
        answer = browser.post(
            f"{served.url}/authorize/login",
            data={**fields, "username": "alice", "password": f"guess {guess}"},
        )
        answers.append(answer.status_code)
    assert answers == [401, 401, 403, 401, 401]
    # The sixth attempt waits, even with the right password, and nothing is hashed for it.
    refused = browser.post(
        f"{served.url}/authorize/login",
        data={**fields, "username": "alice", "password": PASSWORD},
    )
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1
    assert "Too many failed sign-ins" in refused.text
    assert "bastion_session" not in browser.cookies
    assert len(served.audit_rows("login.failed")) == 5
    assert len(served.audit_rows("login.succeeded")) == 0


def test_a_registration_flood_is_cut_off_per_address(served: Served):
    answers = [_register(served, client_name=f"flood {n}").status_code for n in range(200)]
    assert answers[:20] == [201] * 20
    assert set(answers[20:]) == {429}
    refused = _register(served)
    assert refused.json()["error"] == "invalid_client_metadata"
    assert int(refused.headers["retry-after"]) >= 1
    with sqlite3.connect(served.database) as db:
        assert db.execute("SELECT COUNT(*) FROM oauth_clients").fetchone()[0] == 20


def test_an_audit_flood_writes_a_bounded_number_of_rows(served: Served):
    for n in range(300):
        response = served.http.post(
            f"{served.url}/token",
            data={"grant_type": "authorization_code", "client_id": f"nobody-{n}", "code": "x"},
        )
        assert response.status_code == 401
    # The first refusal is a row; the others are counted (written every repeat_write_seconds).
    assert len([row for row in served.audit_rows("token.refused") if "repeats" not in row]) == 1
    served.stop()  # the open window's count is written at shutdown
    rows = served.audit_rows("token.refused")
    assert len([row for row in rows if "repeats" not in row]) == 1
    assert len(rows) < 30  # two, and one more per 5 s the flood lasted
    assert sum(row.get("repeats", 1) for row in rows) == 300


def test_redirect_uris_outside_rfc_3986_are_refused(served: Served):
    for uri in (
        "http://127.0.0.1:9/cb\r\nSet-Cookie: x=1",
        "https://example.com/c b",
        "https://ex\\@a/",
    ):
        response = _register(served, redirect_uris=[uri])
        assert response.status_code == 400
        assert response.json()["error"] == "invalid_redirect_uri"
    with sqlite3.connect(served.database) as db:
        assert db.execute("SELECT COUNT(*) FROM oauth_clients").fetchone()[0] == 0


def test_a_metadata_document_that_trickles_its_headers_does_not_hold_authorize(tmp_path):
    # Header bytes a quarter second apart: each read is quick, and the document is held back
    # until bastion has given up, however slow the machine (eighty bytes, 20 s, were a margin a
    # late deadline could overrun). Without the one deadline, it comes after PATIENCE.
    host = TricklingHost(tmp_path, pad=None, interval=0.25, redirect_uri=REDIRECT)
    settings = {
        "allow_private_addresses": True,
        "ca_file": host.ca_file,
        "timeout_seconds": 2,
        # Remembered for longer than the test takes, however slow: not expired by the second ask.
        "failure_cache_seconds": 3600,
    }
    served = _serve(tmp_path, settings)
    try:
        _, challenge = pkce_pair()
        params = {
            "response_type": "code",
            "client_id": host.url("/agent.json"),
            "redirect_uri": REDIRECT,
            "state": "s",
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "resource": served.resource,
        }
        url = f"{served.url}/authorize?{urlencode(params)}"
        first = served.http.get(url)
        assert first.status_code == 400 and "within 2 s" in first.text
        # The failure is remembered: asking again does not fetch again.
        second = served.http.get(url)
        assert second.status_code == 400 and "within 2 s" in second.text
        assert host.accepted == 1
    finally:
        served.stop()
        host.close()
