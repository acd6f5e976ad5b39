"""/v1/signals on a real `bastion serve` (uvicorn, a SQLite file): a key of scope ``signals`` sets,
lists and clears signals, stored as expiring ``signal`` facts the policy reads like any fact; every
refusal (scope, bad body, a signal the policy cannot hold, TTL bounds) changes nothing."""

from __future__ import annotations

import math
import time
import uuid

import httpx
import pytest

from bastion.facts.store import FactStore
from tests import clients
from tests.server.conftest import ADMIN_KEY, ServerProcess
from tests.signals.conftest import set_signal
from tests.waits import before_expiry, past

POLICY = """
actor User {}
actor Device {}
resource Tool {}
declare signal(User, String, Boolean, String, Integer);
declare signal(Device, String, String, String, Integer);
allow(user: User, "call", _: Tool) if
  signal(user, "device_compliant", true, _source, _set_at);
"""
MAX_TTL = 7200


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("signals-api")
    database = str(tmp / "bastion.db")
    policy = tmp / "policy.polar"
    policy.write_text(POLICY)
    config = tmp / "bastion.toml"
    config.write_text(f"[signals.api]\nmax_ttl_seconds = {MAX_TTL}\ndefault_ttl_seconds = 600\n")
    server = ServerProcess(database, tmp, str(policy), env={"BASTION_CONFIG": str(config)})
    server.start()
    keys = {"admin": ADMIN_KEY}
    try:
        with server.client() as admin:
            for scope in ("signals", "facts:write"):
                r = admin.post("/v1/keys", json={"name": f"{scope} bot", "scopes": [scope]})
                assert r.status_code == 201, r.text
                keys[scope] = r.json()["key"]
        server.keys = keys
        server.db = database
        yield server
    finally:
        server.stop()


def client(bastion, scope: str | None = "signals") -> httpx.Client:
    headers = {"authorization": f"Bearer {bastion.keys[scope]}"} if scope else {}
    return clients.client(base_url=bastion.url, headers=headers, timeout=30)


def allowed(bastion, user: str) -> bool:
    with client(bastion, "admin") as c:
        r = c.post(
            "/v1/authorize",
            json={"actor": f"User:{user}", "action": "call", "resource": "Tool:deploy"},
        )
        assert r.status_code == 200, r.text
        return r.json()["allowed"]


def stored_signals(bastion) -> list:
    store = FactStore.open(bastion.db)
    try:
        return [f.fact for f in store.get(("signal", None, None, None, None, None))]
    finally:
        store.close()


def problem(r: httpx.Response, status: int, *words: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    for word in words:
        assert word in body["detail"], body
    return body


COMPLIANT = {
    "subject": {"type": "User", "id": "sam"},
    "name": "device_compliant",
    "value": True,
    "source": "mdm",
    "ttl_seconds": 3600,
}


def test_a_signal_set_is_a_fact_the_policy_reads_at_once_and_clearing_it_takes_it_back(bastion):
    before = time.time()
    with client(bastion) as c:
        r = c.post("/v1/signals", json=COMPLIANT)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["sequence"] > 0
        signal = body["signal"]
        assert signal["subject"] == {"type": "User", "id": "sam"}
        assert (signal["name"], signal["value"], signal["source"]) == (
            "device_compliant",
            True,
            "mdm",
        )
        assert before - 1 <= signal["set_at"] <= time.time()
        assert signal["expires_at"] == pytest.approx(signal["set_at"] + 3600, abs=2)
        assert allowed(bastion, "sam")

        listed = c.get("/v1/signals", params={"subject": "User:sam"}).json()["signals"]
        assert [s["name"] for s in listed] == ["device_compliant"]

        # Set again: the new value replaces the old one, it does not sit beside it.
        r = c.post("/v1/signals", json={**COMPLIANT, "value": False})
        assert r.status_code == 200, r.text
        assert not allowed(bastion, "sam")
        sams = [f for f in stored_signals(bastion) if f[1].id == "sam"]
        assert len(sams) == 1 and sams[0][3] is False

        r = c.post("/v1/signals", json={**COMPLIANT, "value": True})
        assert allowed(bastion, "sam")
        r = c.post(
            "/v1/signals/clear", json={"subject": COMPLIANT["subject"], "name": "device_compliant"}
        )
        assert r.status_code == 200, r.text
        assert r.json()["cleared"] == 1
        assert not allowed(bastion, "sam")
        assert c.get("/v1/signals", params={"subject": "User:sam"}).json()["signals"] == []


def test_a_signal_without_a_ttl_lives_the_default_and_lists_by_name(bastion):
    body = {k: v for k, v in COMPLIANT.items() if k != "ttl_seconds"}
    body = {**body, "subject": {"type": "Device", "id": "laptop-7"}, "value": "managed"}
    with client(bastion) as c:
        r = c.post("/v1/signals", json=body)
        assert r.status_code == 200, r.text
        signal = r.json()["signal"]
        assert signal["expires_at"] == pytest.approx(signal["set_at"] + 600, abs=2)
        listed = c.get("/v1/signals", params={"name": "device_compliant"}).json()["signals"]
        assert {"type": "Device", "id": "laptop-7"} in [s["subject"] for s in listed]
        r = c.post("/v1/signals/clear", json={"subject": body["subject"]})
        assert r.json()["cleared"] == 1


def test_an_expired_signal_no_longer_counts(bastion):
    with client(bastion) as c:

        def counted_before_expiry(at: float) -> tuple[str, float]:
            """A signal, of a new person each time, set to live until ``at`` at least (its
            ttl, whole seconds, counts from the post's arrival), that allows that person."""
            kim = f"kim-{uuid.uuid4().hex[:8]}"
            ttl = math.ceil(at - time.time())
            subject = {"type": "User", "id": kim}
            r = c.post("/v1/signals", json={**COMPLIANT, "subject": subject, "ttl_seconds": ttl})
            assert r.status_code == 200, r.text
            assert allowed(bastion, kim)
            return kim, r.json()["signal"]["expires_at"]

        (kim, expires_at), _ = before_expiry(counted_before_expiry, 1)
        past(expires_at)
        assert not allowed(bastion, kim)
        assert c.get("/v1/signals", params={"subject": f"User:{kim}"}).json()["signals"] == []


def test_without_the_signals_scope_nothing_is_set(bastion):
    before = stored_signals(bastion)
    with httpx.Client(base_url=bastion.url, timeout=30) as anonymous:
        assert anonymous.post("/v1/signals", json=COMPLIANT).status_code == 401
        assert anonymous.get("/v1/signals").status_code == 401
    with client(bastion, "facts:write") as c:
        problem(c.post("/v1/signals", json=COMPLIANT), 403)
        problem(c.post("/v1/signals/clear", json={"subject": COMPLIANT["subject"]}), 403)
        problem(c.get("/v1/signals"), 403)
    with httpx.Client(
        base_url=bastion.url, headers={"authorization": "Bearer bst_nope_nope"}, timeout=30
    ) as forged:
        assert forged.post("/v1/signals", json=COMPLIANT).status_code == 401
    assert stored_signals(bastion) == before


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"subject": {"type": "Printer", "id": "p1"}}, ("User, Device, Agent, Session",)),
        ({"subject": {"type": "User", "id": ""}}, ("1 to 256",)),
        ({"subject": {"type": "User", "id": "sam", "admin": True}}, ("subject",)),
        ({"subject": "User:sam"}, ("subject",)),
        ({"name": "device compliant"}, ("name",)),
        ({"name": "x" * 65}, ("name",)),
        ({"source": ""}, ("source",)),
        ({"value": 1.5}, ("value",)),
        ({"value": None}, ("value",)),
        ({"value": {"nested": True}}, ("value",)),
        ({"value": "x" * 257}, ("256",)),
        ({"ttl_seconds": 0}, ("ttl_seconds",)),
        ({"ttl_seconds": "3600"}, ("ttl_seconds",)),
    ],
)
def test_a_malformed_signal_is_refused_and_changes_nothing(bastion, change, words):
    before = stored_signals(bastion)
    with client(bastion) as c:
        problem(c.post("/v1/signals", json={**COMPLIANT, **change}), 400, *words)
    assert stored_signals(bastion) == before


def test_missing_fields_are_refused(bastion):
    with client(bastion) as c:
        for name in ("subject", "name", "value", "source"):
            body = {k: v for k, v in COMPLIANT.items() if k != name}
            problem(c.post("/v1/signals", json=body), 400, name)
        problem(c.post("/v1/signals/clear", json={}), 400, "subject")
        problem(c.get("/v1/signals", params={"subject": "sam"}), 400, "Type:id")
        problem(c.get("/v1/signals", params={"subject": "Printer:p1"}), 400, "subject")
        problem(c.get("/v1/signals", params={"limit": "0"}), 400, "limit")


def test_a_ttl_above_the_configured_maximum_is_refused(bastion):
    before = stored_signals(bastion)
    with client(bastion) as c:
        problem(
            c.post("/v1/signals", json={**COMPLIANT, "ttl_seconds": MAX_TTL + 1}),
            422,
            f"1 to {MAX_TTL}",
            "max_ttl_seconds",
        )
        assert c.post("/v1/signals", json={**COMPLIANT, "ttl_seconds": MAX_TTL}).status_code == 200
        c.post("/v1/signals/clear", json={"subject": COMPLIANT["subject"]})
    assert stored_signals(bastion) == before


@pytest.mark.parametrize(
    "change",
    [
        # The policy holds a Boolean for a user's signal, a String for a device's.
        {"value": "yes"},
        {"subject": {"type": "Device", "id": "d1"}, "value": True},
        # Agent and Session are subjects the API knows, but this policy declares no such actor.
        {"subject": {"type": "Agent", "id": "a1"}},
        {"subject": {"type": "Session", "id": "s1"}},
    ],
)
def test_a_signal_the_policy_cannot_hold_is_refused_with_422(bastion, change):
    before = stored_signals(bastion)
    with client(bastion) as c:
        problem(c.post("/v1/signals", json={**COMPLIANT, **change}), 422, "cannot hold")
    assert stored_signals(bastion) == before


# -- through the gateway, with the official MCP SDK client ------------------------------------


@pytest.fixture
def gateway(request):
    # The running gateway of tests/signals/conftest.py (this module's `bastion` is a bare server).
    return request.getfixturevalue("signals_gateway")


EMAIL = {"to": "ada@example.com", "subject": "hello", "body": "hi"}


@pytest.mark.parametrize("mode", ["legacy", "auto"])  # 2025-11-25, 2026-07-28
def test_a_non_compliant_device_downgrades_writes_to_reads_until_it_is_compliant_again(
    gateway, mode
):
    """The quickstart's send_email is a write (not read-only); search_customers a read."""
    from mcp.shared.exceptions import MCPError

    async def attempt(client, seen, tool, arguments):
        try:
            result = await client.call_tool(tool, arguments)
            seen["calls"].append(("ok", tool, result.content[0].text))
        except MCPError as e:
            seen["calls"].append(("refused", tool, e.error.data["reason"]))

    async def script(client, seen):
        seen["calls"] = []
        await attempt(client, seen, "send_email", EMAIL)
        set_signal(gateway, "sam", "device_compliant", False)
        await attempt(client, seen, "send_email", EMAIL)
        await attempt(client, seen, "search_customers", {"query": "ada"})
        set_signal(gateway, "sam", "device_compliant", True)
        await attempt(client, seen, "send_email", EMAIL)

    logins = len(gateway.logins)
    seen = gateway.sdk("sam", "deskhttp", mode, script)
    outcomes = [
        (kind, tool, detail if kind == "refused" else "") for kind, tool, detail in seen["calls"]
    ]
    assert outcomes == [
        ("ok", "send_email", ""),
        ("refused", "send_email", "not_permitted"),
        ("ok", "search_customers", ""),
        ("ok", "send_email", ""),
    ]
    # One sign-in for the whole scenario: no new token was needed either way.
    assert len(gateway.logins) == logins + 1
