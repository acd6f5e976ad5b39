"""No secret is kept where the audit trail is: a real `bastion serve` of the quickstart, logging
at debug level, is used as a client and a person use it (a sign-in with a wrong password first,
tokens issued, refreshed and revoked, calls allowed, masked and refused, a forged token, an API
key made and used and a wrong one tried), then stopped; its log, its database (every table, as
SQLite dumps it, and the files themselves) and its decision journal are searched for each secret
and for what the masks withheld."""

from __future__ import annotations

import secrets
import sqlite3
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest

from tests.gateway.streams import messages, modern_headers, modern_request
from tests.gateway.support import REDIRECT_URI, register_public_client, stop
from tests.oauth.support import hidden_fields, log_in_and_consent, pkce_pair
from tests.security.test_edge import ADMIN_KEY, start_quickstart

PASSWORD = "quickstart-password"  # examples/quickstart/setup.py
# What sam's search returns with the emails masked (examples/quickstart/server.py).
EMAILS = ("ada@example.com", "alan@example.com", "grace@example.com")


def rpc(http: httpx.Client, url: str, token: str, method: str, params: dict, name=None) -> dict:
    response = http.post(
        f"{url}/mcp/desk",
        json=modern_request(1, method, params),
        headers=modern_headers(token, method, name),
    )
    assert response.status_code == 200, response.text
    return messages(response)[-1]


def tokens(http: httpx.Client, url: str, kept: list[str]) -> dict:
    """sam's tokens by the plain OAuth flow, after one sign-in with a wrong password; the code,
    the verifier and the wrong password are added to ``kept``."""
    client_id = register_public_client(http, url)
    verifier, challenge = pkce_pair()
    query = urlencode(
        {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": REDIRECT_URI,
            "state": "s",
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "resource": f"{url}/mcp/desk",
            "scope": "customers:read",
        }
    )
    wrong = "wrong-password-" + secrets.token_urlsafe(12)
    with httpx.Client(timeout=30) as browser:
        page = browser.get(f"{url}/authorize?{query}")
        refused = browser.post(
            f"{url}/authorize/login",
            data={**hidden_fields(page.text), "username": "sam", "password": wrong},
        )
        assert "Wrong username or password" in refused.text
    sent = log_in_and_consent(url, f"{url}/authorize?{query}", "sam", PASSWORD)
    code = parse_qs(urlsplit(sent.headers["location"]).query)["code"][0]
    kept += [code, verifier, wrong]
    answer = http.post(
        f"{url}/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "code_verifier": verifier,
            "client_id": client_id,
        },
    )
    assert answer.status_code == 200, answer.text
    return {**answer.json(), "client_id": client_id}


@pytest.fixture(scope="module")
def used(tmp_path_factory) -> tuple[Path, list[str], str]:
    directory = tmp_path_factory.mktemp("records")
    served = start_quickstart(directory, log_level="debug", access_log=True)
    kept: list[str] = [PASSWORD, ADMIN_KEY]
    url = served.url
    try:
        with httpx.Client(timeout=30) as http:
            issued = tokens(http, url, kept)
            token = issued["access_token"]
            refreshed = http.post(
                f"{url}/token",
                data={
                    "grant_type": "refresh_token",
                    "refresh_token": issued["refresh_token"],
                    "client_id": issued["client_id"],
                },
            )
            assert refreshed.status_code == 200, refreshed.text
            again = refreshed.json()
            kept += [token, token.rsplit(".", 1)[1], issued["refresh_token"]]
            kept += [again["access_token"], again["refresh_token"]]
            token = again["access_token"]
            # The old refresh token, used again, is refused (and revokes the grant): do it last.

            # A call allowed (its result masked), one refused by the policy, one with a query a
            # person typed (the arguments are kept as a digest only).
            private = "private-query-" + secrets.token_urlsafe(12)
            kept.append(private)
            search = {"name": "search_customers", "arguments": {"query": ""}}
            found = rpc(http, url, token, "tools/call", search, "search_customers")
            assert "ada@example.com" not in str(found) and "Ada Lovelace" in str(found)
            mine = {"name": "search_customers", "arguments": {"query": private}}
            assert "result" in rpc(http, url, token, "tools/call", mine, "search_customers")
            delete = {"name": "delete_customer", "arguments": {"customer_id": "c-101"}}
            assert "error" in rpc(http, url, token, "tools/call", delete, "delete_customer")

            forged = token.rsplit(".", 1)[0] + "." + secrets.token_urlsafe(64)
            kept.append(forged.rsplit(".", 1)[1])
            refused = http.post(
                f"{url}/mcp/desk",
                json=modern_request(1, "tools/list", {}),
                headers=modern_headers(forged, "tools/list"),
            )
            assert refused.status_code == 401

            with served.api() as api:
                made = api.post("/v1/keys", json={"name": "reader", "scopes": ["facts:read"]})
                assert made.status_code in (200, 201), made.text
                key = made.json()["key"]
                kept.append(key)
            listed = http.get(f"{url}/v1/facts", headers={"authorization": f"Bearer {key}"})
            assert listed.status_code == 200, listed.text
            wrong_key = "bsk_" + secrets.token_urlsafe(32)
            kept.append(wrong_key)
            assert (
                http.get(f"{url}/v1/facts", headers={"authorization": f"Bearer {wrong_key}"})
            ).status_code == 401

            revoked = http.post(
                f"{url}/revoke",
                data={"token": token, "client_id": issued["client_id"]},
            )
            assert revoked.status_code == 200, revoked.text
            reused = http.post(
                f"{url}/token",
                data={
                    "grant_type": "refresh_token",
                    "refresh_token": issued["refresh_token"],
                    "client_id": issued["client_id"],
                },
            )
            assert reused.status_code == 400
    finally:
        stop(served.process)
    return directory, kept, issued["client_id"]


def written(directory: Path) -> dict[str, bytes]:
    """Everything the run wrote but the signing keys: each file, and each table as text."""
    found = {
        str(path.relative_to(directory)): path.read_bytes()
        for path in directory.rglob("*")
        if path.is_file() and "keys" not in path.relative_to(directory).parts
    }
    with sqlite3.connect(directory / "bastion.db") as db:
        found["bastion.db (dumped)"] = "\n".join(db.iterdump()).encode()
    return found


def test_the_run_wrote_records_events_and_its_log(used):
    """What the search below reads is there: the decision records of the calls (allowed and
    refused), the audit events of the tokens and the log of every request."""
    directory, _, _ = used
    with sqlite3.connect(directory / "bastion.db") as db:
        results = {r for (r,) in db.execute("SELECT result FROM audit_decisions")}
        kinds = {k for (k,) in db.execute("SELECT kind FROM audit_events")}
    assert {"allow", "deny"} <= results
    assert {"token.issued", "grant.revoked"} <= kinds, kinds
    log = (directory / "serve.log").read_text()
    assert '"POST /mcp/desk HTTP/1.1" 401' in log and '"POST /revoke HTTP/1.1" 200' in log


def test_no_secret_and_no_masked_value_is_in_the_log_the_database_or_the_journal(used):
    directory, kept, client_id = used
    everything = written(directory)
    # The search finds what is there: the client's id, in its records, its events and the log.
    assert {"serve.log", "bastion.db (dumped)"} <= {
        name for name, text in everything.items() if client_id.encode() in text
    }
    for secret in [*kept, *EMAILS]:
        holders = [name for name, text in everything.items() if secret.encode() in text]
        assert not holders, f"{secret[:24]}... is in {holders}"
