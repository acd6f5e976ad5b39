"""bastion scaled out: two `bastion serve` replicas on one PostgreSQL and one Redis behind HAProxy
(round robin), used by the official MCP SDK client through the load balancer. Whichever replica
answers, a call is decided and recorded the same; a rate limit is counted once; a fact changed,
or a grant revoked, through one replica is enforced by the other on its next call; an approval
asked through one is found and answered through the other, and a result held for review by one
is reviewed and released through the other. 2025-11-25 sessions live in the replica that opened them:
the other answers 404, so HAProxy routes by `Mcp-Session-Id` (docs/operations.md)."""

from __future__ import annotations

import json
import socket
import uuid
from urllib.parse import urlsplit

import anyio
import httpx
import httpx2
import psycopg
import pytest
from mcp.client.client import Client as McpClient
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from tests.conftest import postgres_schema
from tests.gateway.streams import messages, modern_headers, modern_request, traced
from tests.gateway.support import PASSWORD, REDIRECT_URI, access_token
from tests.oauth.support import MemoryStorage, log_in_and_consent, sdk_auth
from tests.waits import eventually

from .balancer import REPLICA_HEADER, Deployment, deployment

SEARCH = ("search_customers", {"query": "a"})
EMAIL = ("send_email", {"to": "a@example.com", "subject": "s", "body": "b"})
DELETE = ("delete_customer", {"customer_id": "c-101"})
NOTES = "customers://audit-notes"
NOTES_TEXT = "2026-01-12: exported customer list for the yearly review."


@pytest.fixture(scope="module")
def lb(tmp_path_factory):
    """One deployment for the tests of this file (its start and stop are most of their time).
    Each test keeps to what is its own, so none can find another's traces or miss what it left:
    a new agent (OAuth client: its own grant, rate-limit counters, behaviour counters), decision
    records and upstream requests counted from its own start or by its own agent, approvals by
    their ids. What the others rely on stays as it was: the fact deleted is riley's, which no
    other test reads, and sticky routing has a deployment of its own."""
    with (
        postgres_schema() as database,
        deployment(tmp_path_factory.mktemp("lb"), database) as running,
    ):
        yield running


class Agent:
    """One agent of ``username``'s, with the official SDK client, reaching bastion only through
    the load balancer. Its sign-in is kept between connections. Each `tools/call` outcome is
    noted with the replica that answered it (HAProxy's `X-Bastion-Replica`)."""

    def __init__(self, lb: Deployment, username: str) -> None:
        self.lb = lb
        self.username = username
        self.storage = MemoryStorage()
        self.calls: list[tuple[str, str, str]] = []  # (tool, replica, outcome)
        self.responses: list[tuple[str, str, int]] = []  # (JSON-RPC method, replica, status)

    def run(self, script, mode: str = "auto") -> dict:
        seen: dict = {"redirects": []}
        provider = sdk_auth(
            self.lb.mcp_url(),
            lambda url: log_in_and_consent(self.lb.url, url, self.username, PASSWORD),
            self.storage,
            seen["redirects"],
            client_name="load balancer test agent",
            redirect_uri=REDIRECT_URI,
        )

        async def note(response) -> None:
            request = response.request
            if request.method == "POST" and request.url.path.startswith("/mcp/"):
                try:
                    method = json.loads(request.content).get("method", "(response)")
                except ValueError:
                    method = "(unreadable)"
                replica = response.headers.get(REPLICA_HEADER, "?")
                self.responses.append((method, replica, response.status_code))

        async def main() -> None:
            async with (
                httpx2.AsyncClient(
                    auth=provider, timeout=20, event_hooks={"response": [note]}
                ) as http,
                McpClient(
                    streamable_http_client(self.lb.mcp_url(), http_client=http), mode=mode
                ) as client,
            ):
                seen["protocol_version"] = client.protocol_version
                await script(client, seen)

        anyio.run(main)
        return seen

    async def call(self, client, tool: tuple[str, dict]) -> str:
        """Call ``tool``; its outcome: "ok", or the refusal's reason."""
        name, arguments = tool
        try:
            result = await client.call_tool(name, arguments)
            outcome = "error_result" if result.is_error else "ok"
            self.last_result = result
        except MCPError as e:
            data = e.error.data if isinstance(e.error.data, dict) else {}
            outcome = data.get("reason", f"code {e.error.code}")
            self.last_error = data
        replica = [r for m, r, _ in self.responses if m == "tools/call"][-1]
        self.calls.append((name, replica, outcome))
        return outcome

    @property
    def principal(self) -> str:
        """The agent as its decision records name it (one of their principals)."""
        return f'Agent{{"{self.storage.client_info.client_id}"}}'

    def replicas_of(self, tool: str, outcome: str | None = None) -> set[str]:
        return {r for n, r, o in self.calls if n == tool and (outcome is None or o == outcome)}


def decision_records(database: str, agent: Agent, expected: int) -> list[tuple[str, str, dict]]:
    """The gateway's decision records of ``agent``'s `tools/call` in PostgreSQL (written by
    each replica in the background, so in the order of their time, not of their sequence):
    (target, result, record), once ``expected`` are there."""

    def records() -> list[tuple[str, str, dict]]:
        with psycopg.connect(database, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT target, result, record FROM audit_decisions"
                " WHERE method = 'tools/call' ORDER BY at"
            ).fetchall()
        found = [(t, r, json.loads(record)) for t, r, record in rows]
        return [rec for rec in found if agent.principal in rec[2]["principals"]]

    eventually(lambda: len(records()) >= expected, every=0.05)
    return records()


def test_every_call_is_decided_and_recorded_the_same_whichever_replica_answers(lb):
    sam = Agent(lb, "sam")
    earlier = len(lb.recorder.messages())  # what reached the upstream before this test

    async def script(client, seen):
        # Two of each in a row, then the other tool: round robin cannot put one tool on one
        # replica only.
        for tool in (SEARCH, SEARCH, DELETE, DELETE, SEARCH, DELETE):
            await sam.call(client, tool)

    seen = sam.run(script)
    assert seen["protocol_version"] == "2026-07-28"  # stateless: nothing to route by
    assert sam.replicas_of("search_customers", "ok") == {"a", "b"}
    # sam is not desk's admin: the delete is refused, by either replica, for the same reason.
    assert sam.replicas_of("delete_customer", "not_permitted") == {"a", "b"}, sam.calls
    assert [o for _, _, o in sam.calls] == [
        "ok",
        "ok",
        "not_permitted",
        "not_permitted",
        "ok",
        "not_permitted",
    ]
    upstream = lb.recorder.messages()[earlier:]
    assert len(upstream) > 0
    assert not any(m.get("params", {}).get("name") == "delete_customer" for m in upstream)

    records = decision_records(lb.database, sam, 6)
    assert [(t, r) for t, r, _ in records] == [
        ('Tool{"deskhttp/search_customers"}', "allow"),
        ('Tool{"deskhttp/search_customers"}', "allow"),
        ('Tool{"deskhttp/delete_customer"}', "deny"),
        ('Tool{"deskhttp/delete_customer"}', "deny"),
        ('Tool{"deskhttp/search_customers"}', "allow"),
        ('Tool{"deskhttp/delete_customer"}', "deny"),
    ]
    # What differs from one call to the next by nature: its id, time and latency, the token's
    # age, the behaviour counters (which count on across replicas: they are shared in Redis).
    volatile = {"id", "at", "latency_us"}
    changing_context = {"time", "behavior", "token"}

    def same_parts(record: dict) -> dict:
        kept = {k: v for k, v in record.items() if k not in volatile}
        kept["context"] = {k: v for k, v in record["context"].items() if k not in changing_context}
        return kept

    for tool in ("search_customers", "delete_customer"):
        kept = [same_parts(record) for t, _, record in records if tool in t]
        differing = {k for r in kept for k in set(r) | set(kept[0]) if r.get(k) != kept[0].get(k)}
        assert not differing, differing
    # The behaviour counters count every call, whichever replica it reached: each record has the
    # count before its own call, which misses at most the call just before it (counts are
    # written after the answer: docs/signals.md, known limits). Counted per replica, each would
    # see no more than the earlier calls its own replica served.
    counts = [
        r["context"]["behavior"]["agent"]["calls"]["ten_minutes"]["count"] for _, _, r in records
    ]
    assert counts == sorted(counts), counts
    assert all(i - 1 <= count <= i for i, count in enumerate(counts)), counts
    replicas = [replica for _, replica, _ in sam.calls]
    own = [replicas[:i].count(replica) for i, replica in enumerate(replicas)]
    assert any(count > mine for count, mine in zip(counts, own, strict=True)), (counts, own)


def test_a_rate_limit_is_counted_once_across_replicas(lb):
    sam = Agent(lb, "sam")

    async def script(client, seen):
        for _ in range(7):
            await sam.call(client, EMAIL)

    sam.run(script)
    # The policy allows 5 emails a minute per agent; each replica alone would allow 5.
    assert [o for _, _, o in sam.calls] == ["ok"] * 5 + ["rate_limited"] * 2
    assert sam.replicas_of("send_email", "ok") == {"a", "b"}
    assert sam.replicas_of("send_email", "rate_limited") == {"a", "b"}


def test_a_fact_deleted_through_one_replica_is_enforced_by_the_other_on_its_next_call(lb):
    riley = Agent(lb, "riley")

    async def script(client, seen):
        assert await riley.call(client, SEARCH) == "ok"
        changed_on = riley.calls[-1][1]
        # riley leaves the support team, through the replica that just served him.
        response = lb.admin_post(
            changed_on,
            "/v1/facts/delete",
            {
                "patterns": [
                    {
                        "predicate": "has_role",
                        "args": [
                            {"type": "User", "id": "riley"},
                            "member",
                            {"type": "Team", "id": "support"},
                        ],
                    }
                ]
            },
        )
        assert response.status_code == 200, response.text
        assert response.json()["deleted"] == 1
        # Every call after it is refused, the first one the other replica serves included.
        while len({r for _, r, _ in riley.calls[1:]}) < 2:
            assert await riley.call(client, SEARCH) == "not_permitted"
            assert len(riley.calls) < 6
        seen["changed_on"] = changed_on

    seen = riley.run(script)
    first_elsewhere = next(c for c in riley.calls[1:] if c[1] != seen["changed_on"])
    assert first_elsewhere[2] == "not_permitted"


def test_a_grant_revoked_through_one_replica_is_refused_by_the_other_on_its_next_call(lb):
    sam = Agent(lb, "sam")

    async def sign_in(client, seen):
        assert await sam.call(client, SEARCH) == "ok"

    sam.run(sign_in)
    tokens, client_id = sam.storage.tokens, sam.storage.client_info.client_id
    served: list[tuple[str, int]] = []
    with httpx.Client(timeout=20) as http:

        def call() -> int:
            # A client cannot name its own address: HAProxy replaces X-Forwarded-For.
            spoofed = {"x-forwarded-for": "203.0.113.9"}
            response = http.post(
                lb.mcp_url(),
                json=modern_request(1, "tools/call", {"name": SEARCH[0], "arguments": SEARCH[1]}),
                headers={**modern_headers(tokens.access_token, "tools/call", SEARCH[0]), **spoofed},
            )
            served.append((response.headers[REPLICA_HEADER], response.status_code))
            return response.status_code

        assert call() == 200
        revoked_on = served[-1][0]
        # The grant (its refresh token: RFC 7009), revoked through the replica that just served.
        revoked = http.post(
            f"{lb.replicas[revoked_on]}/revoke",
            data={"token": tokens.refresh_token, "client_id": client_id},
        )
        assert revoked.status_code == 200, revoked.text
        while len({replica for replica, _ in served[1:]}) < 2:
            assert call() == 401
            assert len(served) < 6
    first_elsewhere = next(s for s in served[1:] if s[0] != revoked_on)
    assert first_elsewhere[1] == 401
    records = decision_records(lb.database, sam, 2)
    assert [r["context"]["client"]["ip"] for _, _, r in records] == ["127.0.0.1"] * 2


def test_an_approval_asked_through_one_replica_is_answered_through_the_other(lb):
    avery = Agent(lb, "avery")

    async def script(client, seen):
        assert await avery.call(client, DELETE) == "approval_pending"
        held = avery.last_error
        asked_on = avery.calls[-1][1]
        other = "b" if asked_on == "a" else "a"
        found = lb.admin.get(f"{lb.replicas[other]}/v1/approvals/{held['approval_id']}")
        assert found.status_code == 200, found.text
        assert found.json()["status"] == "pending"
        answer = lb.admin_post(
            other,
            f"/v1/approvals/{held['approval_id']}/approve",
            {"approver": "avery", "minutes": 0, "reason": "expected"},
        )
        assert answer.status_code == 200, answer.text
        # The call again, through the load balancer: approved, whichever replica serves it;
        # once only, on either.
        assert await avery.call(client, DELETE) == "ok"
        assert avery.last_result.content[0].text == "deleted c-101"
        assert await avery.call(client, DELETE) == "approval_pending"
        seen["asked_on"] = asked_on

    avery.run(script, mode="auto")
    assert {r for _, r, _ in avery.calls} == {"a", "b"}


def test_a_result_held_for_review_through_one_replica_is_released_by_the_other(lb):
    """sam's reading of the internal notes is held for review by the replica that served it; the
    other shows the held result to the reviewer, takes the release, and delivers it once without
    asking the upstream again. The next reading is held anew."""
    sam = Agent(lb, "sam")

    async def sign_in(client, seen):
        assert await sam.call(client, SEARCH) == "ok"

    sam.run(sign_in)
    token = sam.storage.tokens.access_token
    earlier = lb.recorder.count("resources/read", uri=NOTES)  # read before this test

    with httpx.Client(timeout=20) as http:

        def read(base: str) -> tuple[str, dict]:
            response = http.post(
                f"{base}/mcp/deskhttp",
                json=modern_request(1, "resources/read", {"uri": NOTES}),
                headers=modern_headers(token, "resources/read", NOTES),
            )
            assert response.status_code == 200, response.text
            # Plain JSON, or an event stream when the answer took a while (under load).
            return response.headers.get(REPLICA_HEADER, ""), messages(response)[-1]

        held_on, answer = read(lb.url)
        held = answer["error"]["data"]
        assert held["reason"] == "review_pending"
        assert lb.recorder.count("resources/read", uri=NOTES) == earlier + 1
        other = "b" if held_on == "a" else "a"
        path = f"/v1/approvals/{held['approval_id']}"
        shown = lb.admin.get(f"{lb.replicas[other]}{path}", params={"reviewer": "avery"})
        assert shown.status_code == 200, shown.text
        assert shown.json()["kind"] == "review" and shown.json()["status"] == "pending"
        assert NOTES_TEXT in json.dumps(shown.json()["result"])
        released = lb.admin_post(other, f"{path}/approve", {"approver": "avery", "reason": "ok"})
        assert released.status_code == 200, released.text
        _, answer = read(lb.replicas[other])
        assert answer["result"]["contents"][0]["text"] == NOTES_TEXT
        # Delivered from the store, not read again.
        assert lb.recorder.count("resources/read", uri=NOTES) == earlier + 1
        assert lb.admin.get(f"{lb.replicas[held_on]}{path}").json()["status"] == "delivered"
        _, again = read(lb.url)
        assert again["error"]["data"]["reason"] == "review_pending"
        assert again["error"]["data"]["approval_id"] != held["approval_id"]
    assert lb.recorder.count("resources/read", uri=NOTES) == earlier + 2


def test_a_2025_11_25_session_is_not_found_on_the_other_replica(lb):
    """Sessions are in the memory of the replica that opened them: hence sticky routing."""
    with httpx.Client(timeout=20) as http:
        token = access_token(http, lb.url, lb.mcp_url(), "sam", PASSWORD, "customers:read")
        headers = {
            "authorization": f"Bearer {token}",
            "accept": "application/json, text/event-stream",
            "content-type": "application/json",
            "mcp-protocol-version": "2025-11-25",
        }
        opened = http.post(
            f"{lb.replicas['a']}/mcp/deskhttp",
            headers=headers,
            json={
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-11-25",
                    "capabilities": {},
                    "clientInfo": {"name": "raw", "version": "1"},
                },
            },
        )
        assert opened.status_code == 200, opened.text
        session = {**headers, "mcp-session-id": opened.headers["mcp-session-id"]}
        listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}}
        assert http.post(f"{lb.replicas['a']}/mcp/deskhttp", headers=session, json=listing)
        elsewhere = http.post(f"{lb.replicas['b']}/mcp/deskhttp", headers=session, json=listing)
        assert elsewhere.status_code == 404
        assert elsewhere.json()["error"]["code"] == -32005
        same = http.post(f"{lb.replicas['a']}/mcp/deskhttp", headers=session, json=listing)
        assert same.status_code == 200, same.text
        # A 2026-07-28 request carries no session: either replica answers it.
        for replica in ("a", "b"):
            stateless = http.post(
                f"{lb.replicas[replica]}/mcp/deskhttp",
                json=modern_request(3, "tools/list", {}),
                headers=modern_headers(token, "tools/list", None),
            )
            assert stateless.status_code == 200, stateless.text
            assert "result" in stateless.json()


def test_without_sticky_routing_an_sdk_session_breaks_on_the_other_replica(lb):
    sam = Agent(lb, "sam")

    async def script(client, seen):
        for _ in range(4):
            await sam.call(client, SEARCH)

    seen = sam.run(script, mode="legacy")
    assert seen["protocol_version"] == "2025-11-25"
    # The SDK lists tools after a call (for their output schemas): round robin sends one of the
    # two to the replica that does not know the session, and every call fails with -32005.
    assert [outcome for _, _, outcome in sam.calls] == ["code -32005"] * 4
    opened_on = next(r for m, r, status in sam.responses if m == "initialize" and status == 200)
    lost = {r for _, r, status in sam.responses if status == 404}
    assert lost == {"a", "b"} - {opened_on}, sam.responses


def test_sessions_stay_on_their_replica_with_sticky_routing(tmp_path, postgres_url):
    with deployment(tmp_path, postgres_url, sticky=True) as sticky:
        sam = Agent(sticky, "sam")
        sessions: list[list[str]] = []

        async def script(client, seen):
            start = len(sam.responses)
            for tool in (SEARCH, SEARCH, SEARCH, EMAIL):
                assert await sam.call(client, tool) == "ok"
            await client.list_tools()
            sessions.append([r for _, r, _ in sam.responses[start:]])

        # Sessions are opened round robin; each stays where it was opened.
        for _ in range(3):
            seen = sam.run(script, mode="legacy")
            assert seen["protocol_version"] == "2025-11-25"
        for replicas in sessions:
            assert len(replicas) >= 6
            assert len(set(replicas)) == 1, replicas
        assert {replicas[0] for replicas in sessions} == {"a", "b"}
        # Only the first request of all is refused: 401, the SDK then signs in.
        assert sam.responses[0][::2] == ("initialize", 401)
        assert all(status in (200, 202) for _, _, status in sam.responses[1:]), sam.responses


def test_a_client_that_goes_away_cancels_its_call_behind_the_load_balancer(lb):
    """The 2026-07-28 way to cancel a call is to close its connection: HAProxy must close the
    replica's connection too (`option abortonclose`, docs/operations.md), so the replica
    cancels the call upstream. Without it the call ran to its end (30 s here) while nobody
    waited for its answer."""
    with httpx.Client(timeout=20) as http:
        token = access_token(http, lb.url, lb.mcp_url("labhttp"), "sam", PASSWORD, "customers:read")
    url = urlsplit(lb.mcp_url("labhttp"))
    for _ in range(2):  # round robin: one call reaches each replica
        tag = uuid.uuid4().hex
        call = {"name": "wait", "arguments": {"seconds": 30, "tag": tag}}
        body = json.dumps(modern_request(3, "tools/call", call)).encode()
        headers = {**modern_headers(token, "tools/call", "wait"), "content-length": len(body)}
        head = f"POST {url.path} HTTP/1.1\r\nhost: {url.netloc}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        with socket.create_connection((url.hostname, url.port)) as client:
            client.sendall(head.encode() + body)
            assert traced(lb, "wait-started", tag)
        assert traced(lb, "wait-cancelled", tag), "the call went on after its client left"
        assert not traced(lb, "wait-finished", tag, seconds=0)
