"""Attacks on the MCP gateway of a real `bastion serve` (the quickstart's configuration, as
`make run` starts it): each tries to get past a rule, and must be refused."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import stat
from pathlib import Path

import httpx
import pytest

from tests.gateway.streams import messages, modern_headers, modern_request
from tests.gateway.support import Running, serve_quickstart
from tests.waits import PATIENCE, eventually

QUICKSTART_PASSWORD = "quickstart-password"


class Served:
    """One `bastion serve` of the quickstart in ``directory``, and a way to act on it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.process, self.url = serve_quickstart(directory)
        self.http = httpx.Client(timeout=30)
        self.running = Running(
            self.url, None, None, None, self.http, None, password=QUICKSTART_PASSWORD
        )

    def token(self, username: str, scope: str = "customers:read") -> str:
        return self.running.token(username, "desk", scope)

    def call(self, token: str, tool: str, arguments: dict, request_id: int = 1) -> dict:
        """tools/call in 2026-07-28; the JSON-RPC response (JSON, or the last event)."""
        response = self.http.post(
            f"{self.url}/mcp/desk",
            json=modern_request(request_id, "tools/call", {"name": tool, "arguments": arguments}),
            headers=modern_headers(token, "tools/call", tool),
        )
        assert response.status_code == 200, response.text
        return messages(response)[-1]

    def digests(self, tool: str, count: int) -> list[str]:
        """The argument digests recorded for calls of ``tool``, oldest first, once there are
        ``count`` (records are written every 200 ms)."""

        def recorded() -> list[str]:
            with sqlite3.connect(self.directory / "bastion.db") as db:
                rows = db.execute(
                    "SELECT arguments_digest FROM audit_decisions WHERE target = ? ORDER BY seq",
                    (f'Tool{{"desk/{tool}"}}',),
                ).fetchall()
            return [row[0] for row in rows]

        eventually(lambda: len(recorded()) >= count, every=0.05)
        return recorded()

    def stop(self) -> None:
        self.http.close()
        self.process.terminate()
        self.process.wait(PATIENCE)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    server = Served(tmp_path_factory.mktemp("served"))
    try:
        yield server
    finally:
        server.stop()


def test_argument_digests_cannot_be_hashed_back_and_survive_a_restart(tmp_path):
    arguments = {"customer_id": "c-101"}
    canonical = json.dumps(arguments, sort_keys=True, separators=(",", ":"))
    guessed = hashlib.sha256(canonical.encode()).hexdigest()
    first = Served(tmp_path)
    try:
        refused = first.call(first.token("sam"), "delete_customer", arguments)
        assert refused["error"]["data"]["reason"] == "not_permitted"
        (before,) = first.digests("delete_customer", 1)
    finally:
        first.stop()
    # A reader of the records who guesses the arguments cannot confirm the guess by hashing it.
    assert before.startswith("hmac-sha256:") and guessed not in before
    key = tmp_path / "keys" / "argument-digest.key"  # documented: copied to every replica
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    second = Served(tmp_path)  # the same database and key_dir: a restart
    try:
        second.call(second.token("sam"), "delete_customer", arguments)
        second.call(second.token("sam"), "delete_customer", {"customer_id": "c-102"})
        digests = second.digests("delete_customer", 3)
    finally:
        second.stop()
    # The same arguments still match across the restart; others do not.
    assert digests[:2] == [before, before] and digests[2] != before


def test_a_page_of_another_origin_is_refused_before_anything_else(served):
    url = f"{served.url}/mcp/desk"
    evil = {"origin": "http://evil.example.com"}
    token = served.token("sam")
    call = modern_request(1, "tools/call", {"name": "search_customers", "arguments": {}})
    headers = {**modern_headers(token, "tools/call", "search_customers"), **evil}
    assert served.http.post(url, json=call, headers=headers).status_code == 403
    assert served.http.get(url, headers={**evil, "accept": "text/event-stream"}).status_code == 403
    assert served.http.delete(url, headers=evil).status_code == 403
    # The gateway's own origin (the issuer's, by default) is served.
    headers["origin"] = served.url
    assert served.http.post(url, json=call, headers=headers).status_code == 200


def test_a_masked_field_cannot_be_searched_for_by_value(served):
    # The email is masked in sam's results; a search on it would still confirm a guess.
    sam = served.token("sam")
    found = served.call(sam, "search_customers", {"query": "alan"})["result"]
    assert "alan@example.com" not in json.dumps(found) and "[masked]" in json.dumps(found)
    for guess in ("alan@example.com", "nobody@example.com"):
        refused = served.call(sam, "search_customers", {"query": guess, "field": "email"})
        assert refused["error"]["data"]["reason"] == "not_permitted"  # hit or miss alike
    avery = served.token("avery")
    hit = served.call(avery, "search_customers", {"query": "alan@", "field": "email"})["result"]
    assert "alan@example.com" in json.dumps(hit)


def test_the_same_data_read_as_a_resource_is_masked(served):
    response = served.http.post(
        f"{served.url}/mcp/desk",
        json=modern_request(2, "resources/read", {"uri": "customers://directory"}),
        headers=modern_headers(served.token("sam"), "resources/read", "customers://directory"),
    )
    read = messages(response)[-1]["result"]
    assert "@example.com" not in json.dumps(read)
    assert {c["email"] for c in json.loads(read["contents"][0]["text"])["customers"]} == {
        "[masked]"
    }


def test_a_forged_token_at_the_gateway_is_audited_with_the_callers_address(served):
    # Refusals of tokens this server did not sign are aggregated per address: the gateway must
    # hand the verifier the caller's address, or one flooding address hides among all others.
    forged = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJzYW0ifQ.c2ln"
    response = served.http.post(
        f"{served.url}/mcp/desk",
        json=modern_request(3, "tools/list", {}),
        headers=modern_headers(forged, "tools/list"),
    )
    assert response.status_code == 401
    with sqlite3.connect(served.directory / "bastion.db") as db:
        rows = db.execute("SELECT detail FROM audit_events WHERE kind = 'token.refused'").fetchall()
    assert [json.loads(detail).get("address") for (detail,) in rows] == ["127.0.0.1"]
