"""Alerts end to end: a real bastion (uvicorn) in front of real MCP servers, the official MCP SDK
client, and a real webhook receiver that checks the signature with its own code. A policy alert
fires on a call and reaches the receiver; raised again within the cooldown it is the same alert,
told once; not acknowledged in time it escalates to the owner's manager; acknowledged (API), it
does not. A burst of refusals raises the built-in alert. Every API refusal is tried."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import threading
import time
from contextlib import contextmanager
from urllib.parse import urlsplit

import httpx
import pytest
from mcp.shared.exceptions import MCPError

from bastion.audit.actor import cli_actor
from bastion.facts.model import Entity
from bastion.server.config import ConfigError
from bastion.signals.alerts import AlertError, AlertNotFound, Alerts, AlertSettings, severity_of
from bastion.signals.behavior import LocalBehavior
from bastion.webhooks import PENDING, SettingsError
from tests import clients
from tests.approvals.test_pages import csrf_of, press
from tests.approvals.test_webhooks import SECRET, Receiver
from tests.browser import browser_fixture, tab_fixture  # noqa: F401 (fixtures)
from tests.gateway.support import start
from tests.oauth.support import free_socket, hidden_fields, serve
from tests.relays import Relay
from tests.waits import PATIENCE, eventually

RULES = """
declare manager(User, User);
alert(agent: Agent, "customer_search", "high") if
  context.tool = "search_customers" and context.arguments.query = "everyone";
alert(_user: User, "loud_search", "bogus") if
  context.tool = "search_customers" and context.arguments.query = "loud";
# Bulk deletion (the issue's third scenario): from the third destructive call an agent makes in
# a minute, further ones wait for a person, and its owner is alerted.
alert(agent: Agent, "bulk_delete", "critical") if
  context.annotations.destructiveHint = true and
  context.behavior.agent.destructive.minute.count >= 3;
requires_approval(agent: Agent, "call", _tool: Tool) if
  context.annotations.destructiveHint = true and
  context.behavior.agent.destructive.minute.count >= 3;
"""
SECRET_ENV = "BASTION_TEST_ALERT_SECRET"
ESCALATE_AFTER = 600


@pytest.fixture(scope="module")
def receiver():
    got = Receiver()
    served = serve(got.app(), free_socket())
    url = served.__enter__() + "/hook"
    yield got, url
    served.__exit__(None, None, None)


@pytest.fixture(scope="module")
def bastion(tmp_path_factory, receiver):
    os.environ[SECRET_ENV] = SECRET.decode()
    signals = {
        "alerts": {
            "cooldown_seconds": 300,
            "escalate_after_seconds": ESCALATE_AFTER,
            "escalation_poll_seconds": 0.05,
            "repeat_write_seconds": 0.05,
            "refusal_burst_count": 3,
            "refusal_burst_seconds": 60,
            "bulk_destructive_count": 3,
            "fallback_recipients": ["oncall"],
            "webhook_backoff_seconds": 0.02,
            "webhooks": [{"url": receiver[1], "secret_env": SECRET_ENV}],
        }
    }
    try:
        with start(
            tmp_path_factory.mktemp("alerts"), policy_extra=RULES, signals=signals
        ) as running:
            yield running
    finally:
        os.environ.pop(SECRET_ENV, None)


@pytest.fixture
def clock(bastion):
    """Moves the alerts' clock (escalation) forward without sleeping."""
    alerts = bastion.app.state.alerts
    offset = [0.0]
    alerts.clock = lambda: time.time() + offset[0]
    yield offset
    alerts.clock = time.time


def owned_agent(bastion, owner: str, manager: str | None):
    """Registers the SDK's client ahead of its run, and makes ``owner`` own it."""
    registered = {}
    plain = type(bastion).register

    def register(scope):
        info = plain(bastion, scope)
        registered["client_id"] = info.client_id
        agent = Entity("Agent", info.client_id)
        facts = [("has_relation", agent, "owner", Entity("User", owner))]
        if manager:
            facts.append(("manager", Entity("User", owner), Entity("User", manager)))
        bastion.apply(inserts=facts)
        return info

    bastion.register = register
    return registered


def search(bastion, *queries: str, server: str = "deskhttp", owner="pat", manager="boss"):
    registered = owned_agent(bastion, owner, manager)

    async def script(client, seen):
        for q in queries:
            try:
                await client.call_tool("search_customers", {"query": q})
                seen.setdefault("calls", []).append("ok")
            except MCPError as e:
                seen.setdefault("calls", []).append(e.error.data)

    try:
        seen = bastion.sdk("sam", server, "legacy", script, registered_scope="customers:read")
    finally:
        del bastion.register
    return registered["client_id"], seen


def told(receiver, alert_id: str, event: str | None = None) -> list[dict]:
    got, _ = receiver
    bodies = [json.loads(r.body) for r in got.got if r.verified]
    return [
        b
        for b in bodies
        if b.get("alert", {}).get("id") == alert_id and (event is None or b["event"] == event)
    ]


def all_sent(bastion, alert_id: str) -> bool:
    """Whether every notification of ``alert_id`` in the outbox has been answered (none left
    pending). A notification is queued in the transaction that writes what it tells of, so once
    that is seen written, the receiver then holds all it will ever be told of it."""
    deliveries = bastion.app.state.alerts.webhooks.deliveries(alert_id)
    return all(d.state != PENDING for d in deliveries)


def wait_for(condition, what: str):
    assert eventually(condition, every=0.02), f"never: {what}"
    return condition()


def alerts_of(bastion, name: str, principal: str):
    return [
        a
        for a in bastion.app.state.alerts.store.list()
        if a.name == name and a.principal == principal
    ]


def api_key(bastion, scopes=("alerts",)) -> dict:
    key, _ = bastion.app.state.keys.create("alerts test", list(scopes), created_by="test")
    return {"Authorization": f"Bearer {key}"}


def acknowledged_events(bastion, capsys, alert_id: str) -> list[dict]:
    """The ``alert.acknowledged`` audit events of ``alert_id``, as ``bastion audit events`` shows
    them."""
    from bastion.cli import main

    capsys.readouterr()
    database = str(bastion.app.state.config.database)
    kind = ["--kind", "alert.acknowledged"]
    assert main(["audit", "events", *kind, "--json", "--database", database]) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    return [e["detail"] for e in shown if e["detail"]["alert_id"] == alert_id]


# -- a policy alert, told, deduplicated, escalated ----------------------------------------------


def test_a_policy_alert_reaches_the_owner_signed_once_within_the_cooldown(bastion, receiver):
    client_id, seen = search(bastion, "everyone", "everyone", "ada")
    assert seen["calls"] == ["ok", "ok", "ok"]  # an alert never changes the decision
    # Raised again within its cooldown, it is counted in memory and written soon after.
    [alert] = wait_for(
        lambda: [
            a
            for a in alerts_of(bastion, "customer_search", f'Agent{{"{client_id}"}}')
            if a.count == 2
        ],
        "the second raising written",
    )
    assert alert.severity == "high" and alert.state == "open"
    assert len(alert.decision_ids) == 2
    assert alert.owner == 'User{"pat"}' and alert.recipients == ('User{"pat"}',)
    [body] = wait_for(lambda: told(receiver, alert.id), "the alert's webhook")
    assert body["event"] == "alert.raised"
    assert body["alert"]["recipients"] == ['User{"pat"}']
    assert f"{bastion.url}/alerts/{alert.id}" in body["text"]
    # Every alert links the decision records that raised it.
    bastion.flush()
    for decision_id in alert.decision_ids:
        record = bastion.records.get(decision_id)
        assert record is not None and record.result == "allow"
    # The second raising is written (above): a notification of it would be in the outbox.
    wait_for(lambda: all_sent(bastion, alert.id), "every notification of the alert answered")
    assert len(told(receiver, alert.id)) == 1


def test_an_alert_not_acknowledged_in_time_escalates_to_the_owners_manager(
    bastion, receiver, clock
):
    client_id, _ = search(bastion, "everyone", owner="quinn", manager="boss")
    [alert] = [
        a
        for a in alerts_of(bastion, "customer_search", f'Agent{{"{client_id}"}}')
        if a.state == "open"
    ]
    assert alert.owner == 'User{"quinn"}'
    wait_for(lambda: told(receiver, alert.id, "alert.raised"), "the first notification")
    assert not told(receiver, alert.id, "alert.escalated")
    clock[0] = ESCALATE_AFTER + 1
    [body] = wait_for(lambda: told(receiver, alert.id, "alert.escalated"), "the escalation")
    assert body["alert"]["recipients"] == ['User{"boss"}']
    escalated = bastion.app.state.alerts.store.get(alert.id)
    assert escalated.escalated_to == ('User{"boss"}',) and escalated.escalate_at is None


def test_an_acknowledged_alert_does_not_escalate(bastion, receiver, clock):
    client_id, _ = search(bastion, "everyone", owner="rene", manager="boss")
    [alert] = alerts_of(bastion, "customer_search", f'Agent{{"{client_id}"}}')
    response = bastion.http.post(
        f"{bastion.url}/v1/alerts/{alert.id}/acknowledge",
        json={"by": "rene"},
        headers=api_key(bastion),
    )
    assert response.status_code == 200, response.text
    assert response.json()["acknowledged_by"] == "rene"
    assert response.json()["acknowledged_channel"] == "api"
    clock[0] = ESCALATE_AFTER * 10
    bastion.app.state.alerts.escalate_due()  # as the background task does
    # An escalation is queued in its own transaction: any would be in the outbox by now.
    wait_for(lambda: all_sent(bastion, alert.id), "every notification of the alert answered")
    assert not told(receiver, alert.id, "alert.escalated")
    assert bastion.app.state.alerts.store.get(alert.id).state == "acknowledged"


# -- the bulk-deletion scenario: behaviour, a hold and an alert that escalates ------------


def test_bulk_deletion_is_held_and_alerts_the_owner_then_the_manager(bastion, receiver, clock):
    registered = owned_agent(bastion, "pat", "boss")

    async def script(client, seen):
        for i in range(5):
            try:
                await client.call_tool("delete_customer", {"customer_id": f"c-{i}"})
                seen.setdefault("calls", []).append("ok")
            except MCPError as e:
                seen.setdefault("calls", []).append(e.error.data["reason"])

    try:
        seen = bastion.sdk(
            "avery",
            "deskhttp",
            "legacy",
            script,
            registered_scope="customers:read customers:write",
        )
    finally:
        del bastion.register
    # Three deletes go through; from then on each one waits for a person.
    assert seen["calls"] == ["ok", "ok", "ok", "approval_pending", "approval_pending"]
    agent = f'Agent{{"{registered["client_id"]}"}}'
    [alert] = alerts_of(bastion, "bulk_delete", agent)
    assert alert.severity == "critical" and alert.owner == 'User{"pat"}'
    [body] = wait_for(lambda: told(receiver, alert.id, "alert.raised"), "the owner's webhook")
    assert body["alert"]["recipients"] == ['User{"pat"}']
    clock[0] = ESCALATE_AFTER + 1
    [escalated] = wait_for(lambda: told(receiver, alert.id, "alert.escalated"), "escalation")
    assert escalated["alert"]["recipients"] == ['User{"boss"}']
    bastion.flush()
    held = [bastion.records.get(d) for d in alert.decision_ids]
    assert held and all(r is not None and r.result == "held" for r in held)
    # Without any rule of the policy, the built-in alert saw more than 3 destructive calls in a
    # minute (three allowed, then the fourth and the fifth tried): one alert, counted twice (the
    # second raising counted in memory, and written within repeat_write_seconds).
    [built_in] = wait_for(
        lambda: [a for a in alerts_of(bastion, "bulk_destructive", agent) if a.count == 2],
        "the second raising written",
    )
    assert built_in.severity == "critical" and built_in.owner == 'User{"pat"}'
    assert built_in.count == 2 and built_in.detail["destructive_calls"] == 4
    assert [bastion.records.get(d).result for d in built_in.decision_ids] == ["held", "held"]


def test_bulk_deletion_spread_over_new_clients_of_one_user_still_alerts(bastion):
    """An agent that dodges the per-agent count by registering a new OAuth client for every
    two deletes (dynamic registration is open) is still one user deleting in bulk: the fourth
    delete of the user within the minute raises ``bulk_destructive`` for the user, though no
    single client went past the threshold of three."""

    async def script(client, seen):
        for i in range(2):
            await client.call_tool("delete_customer", {"customer_id": f"s-{i}"})
            seen.setdefault("calls", []).append("ok")

    from bastion.oauth.users import create_user

    create_user(bastion.app.state.oauth.store, "riley", bastion.password, time.time(), actor="test")
    bastion.apply(
        inserts=[("has_role", Entity("User", "riley"), "admin", Entity("McpServer", "deskhttp"))]
    )
    clients = []
    plain = type(bastion).register

    def register(scope):  # each run a client of its own, as dynamic registration allows
        info = plain(bastion, scope)
        clients.append(info.client_id)
        return info

    bastion.register = register
    try:
        for _ in range(2):  # two deletes each: no client goes past the threshold of three
            seen = bastion.sdk(
                "riley", "deskhttp", "legacy", script, registered_scope="customers:write"
            )
            assert seen["calls"] == ["ok", "ok"]
    finally:
        del bastion.register
    assert len(set(clients)) == 2
    for client_id in clients:
        assert not alerts_of(bastion, "bulk_destructive", f'Agent{{"{client_id}"}}')
    [alert] = wait_for(
        lambda: alerts_of(bastion, "bulk_destructive", 'User{"riley"}'), "the user's alert"
    )
    assert alert.detail["destructive_calls"] == 4 and alert.detail["scope"] == "user"
    assert alert.recipients == ('User{"oncall"}',)  # a user has no owner: the fallback


def test_the_built_in_behaviour_alerts_need_their_thresholds_and_a_baseline():
    now = [0.0]
    counters = LocalBehavior(clock=lambda: now[0])
    settings = AlertSettings(bulk_destructive_count=2, spike_ratio=3.0, spike_min_calls=20)
    alerts = Alerts(None, settings, lambda: None, "https://bastion.example")  # type: ignore[arg-type]

    def call(
        destructive: bool = False, agent: str = "bot", user: str = "sam"
    ) -> list[tuple[str, str, str, dict]]:
        view = counters.view(user, agent, 'Tool{"desk/delete"}')
        raised = alerts.behavior_alerts(view, destructive)
        record = {"result": "allow", "target": 'Tool{"desk/delete"}', "arguments_digest": "d"}
        counters.observe_decision(
            record, {"annotations": {"destructiveHint": destructive}, "behavior": view}
        )
        return raised

    # Two destructive calls in a minute are within the threshold; the third is above it.
    assert call(True) == [] and call(True) == []
    [(scope, name, severity, detail)] = call(True)
    assert (scope, name, severity) == ("agent", "bulk_destructive", "critical")
    assert detail["destructive_calls"] == 3
    # Spread over two agents of one user, within the threshold each: the user's third.
    assert call(True, "one", "kim") == [] and call(True, "two", "kim") == []
    [(scope, name, _, detail)] = call(True, "three", "kim")
    assert (scope, name, detail["destructive_calls"]) == ("user", "bulk_destructive", 3)
    assert call(False) == []  # a read is no destructive call
    # A brand-new agent has no baseline: however busy, it is not "far above" anything yet.
    assert all(call() == [] for _ in range(40))
    # Fifteen quiet ten-minute windows of 4 calls teach a baseline; no call among them spikes.
    for w in range(1, 16):
        now[0] = w * 600 + 1
        assert all(call(agent="steady", user="ann") == [] for _ in range(4))
    # Then a burst: the spike is raised from the first call that sees at least spike_min_calls
    # calls in ten minutes at more than spike_ratio times the baseline, and not before.
    now[0] = 16 * 600 + 1
    raised, seen = [], []
    for _ in range(40):
        seen.append(counters.view("ann", "steady", "t")["agent"]["calls"]["ten_minutes"])
        raised.append(call(agent="steady", user="ann"))
    first = next(i for i, r in enumerate(raised) if r)
    assert 0 < first < 40 and all(raised[first:])
    figure = seen[first]
    assert figure["count"] >= 20 and figure["ratio"] > 3 and figure["baseline"] > 0
    before = seen[first - 1]
    assert before["count"] < 20 or before["ratio"] <= 3
    [(scope, name, severity, detail)] = raised[first]
    assert (scope, name, severity) == ("agent", "behavior_spike", "high")
    assert detail == {
        "calls": figure["count"],
        "baseline": figure["baseline"],
        "seconds": 600,
        "scope": "agent",
    }
    # A new agent of the same user, with no baseline of its own, bursting ten minutes later:
    # the user's baseline judges it.
    now[0] = 18 * 600 + 1
    fresh = [call(agent=f"fresh-{i}", user="ann") for i in range(40)]
    assert any(r and r[0][:2] == ("user", "behavior_spike") for r in fresh)
    # Without a person in the chain only the agent's figures count (the user is the agent).
    view = counters.view("ann", "fresh-0", "t")
    assert alerts.behavior_alerts(view, False, person=False) == []
    # The user's figures are kept in the view (and so in the decision record) only where they
    # raise an alert; the agent's, as before, always.
    quiet = counters.view("sam", "bot", "t")
    assert alerts.behavior_alerts(quiet, True) == []
    assert set(quiet) == {"agent"}
    assert quiet.peek("user", "calls", "ten_minutes") == quiet["user"]["calls"]["ten_minutes"]
    # Off when set to 0.
    off = Alerts(None, AlertSettings(bulk_destructive_count=0, spike_ratio=0), lambda: None, "x")  # type: ignore[arg-type]
    assert off.behavior_alerts(counters.view("sam", "bot", "t"), True) == []


def test_without_an_owner_the_fallback_recipients_are_named(bastion):
    alert = bastion.app.state.alerts.raise_alert(
        "bulk_delete", "critical", Entity("Agent", "nobody-owns-me"), "d-1", {"rows": 900}
    )
    assert alert.owner == "" and alert.recipients == ('User{"oncall"}',)


def test_an_unknown_severity_is_treated_as_high(bastion):
    search(bastion, "loud")
    [alert] = alerts_of(bastion, "loud_search", 'User{"sam"}')
    assert alert.severity == "high"
    assert severity_of("critical", "x") == "critical"


# -- the built-in refusal burst -------------------------------------------------------------------


def test_a_burst_of_refusals_raises_the_built_in_alert(bastion):
    # The lab's admin-only resources are refused to sam; more than 3 refusals within 60 s.
    before = {a.id for a in alerts_of(bastion, "refusal_burst", 'User{"sam"}')}
    alerts = bastion.app.state.alerts
    bursts = [
        alerts.refusal_burst(Entity("User", "sam"), {"reason": "not_permitted"}) for _ in "abcd"
    ]
    assert bursts[:3] == [None, None, None]  # three refusals within 60 s: no burst yet
    name, severity, principal, detail = bursts[3]
    alerts.raise_alert(name, severity, principal, "refused-3", detail)
    [alert] = [a for a in alerts_of(bastion, "refusal_burst", 'User{"sam"}') if a.id not in before]
    assert alert.severity == "high" and alert.decision_ids == ("refused-3",)
    assert alert.detail["refusals"] == 4


def test_refusals_through_the_gateway_count_towards_the_burst(bastion):
    registered = owned_agent(bastion, "pat", None)

    async def script(client, seen):
        for _ in range(5):
            try:
                await client.call_tool("delete_customer", {"customer_id": "c1"})
            except MCPError as e:
                seen.setdefault("refused", []).append(e.error.data["reason"])

    try:
        seen = bastion.sdk("sam", "deskhttp", "legacy", script, registered_scope="customers:read")
    finally:
        del bastion.register
    assert seen.get("refused"), "the call was expected to be refused"
    agent = f'Agent{{"{registered["client_id"]}"}}'
    [alert] = alerts_of(bastion, "refusal_burst", agent)
    assert alert.count >= 1 and alert.owner == 'User{"pat"}'


# -- the API: every refusal ----------------------------------------------------------------------


def test_the_api_lists_and_shows_alerts(bastion):
    alert = bastion.app.state.alerts.raise_alert("listed", "low", Entity("Agent", "a1"))
    headers = api_key(bastion)
    listed = bastion.http.get(f"{bastion.url}/v1/alerts?state=open", headers=headers)
    assert listed.status_code == 200
    assert alert.id in [a["id"] for a in listed.json()["alerts"]]
    shown = bastion.http.get(f"{bastion.url}/v1/alerts/{alert.id}", headers=headers)
    assert shown.json()["name"] == "listed"


def test_the_api_refuses_what_it_must(bastion, capsys):
    alert = bastion.app.state.alerts.raise_alert("refusals", "low", Entity("Agent", "a2"))
    url = f"{bastion.url}/v1/alerts"
    good = api_key(bastion)
    wrong_scope = api_key(bastion, ("facts:read",))
    http = bastion.http
    assert http.get(url).status_code == 401
    assert http.get(url, headers={"Authorization": "Bearer bst_nope"}).status_code == 401
    assert http.get(url, headers=wrong_scope).status_code == 403
    ack = f"{url}/{alert.id}/acknowledge"
    assert http.post(ack, json={"by": "x"}, headers=wrong_scope).status_code == 403
    assert http.get(f"{url}?state=closed", headers=good).status_code == 400
    assert http.get(f"{url}?limit=0", headers=good).status_code == 400
    assert http.get(f"{url}?limit=x", headers=good).status_code == 400
    assert http.get(f"{url}/nope", headers=good).status_code == 404
    assert http.get(f"{url}/{'x' * 100}", headers=good).status_code == 404
    assert http.post(f"{url}/nope/acknowledge", json={"by": "x"}, headers=good).status_code == 404
    for bad in ({}, {"by": ""}, {"by": 3}, {"by": "x" * 200}):
        assert http.post(ack, json=bad, headers=good).status_code == 400, bad
    for unnamed in (" spaced ", "new\nline"):
        assert http.post(ack, json={"by": unnamed}, headers=good).status_code == 422
    assert http.post(ack, content=b"not json", headers=good).status_code == 400
    # Nothing changed by the refused requests.
    assert bastion.app.state.alerts.store.get(alert.id).state == "open"
    assert http.post(ack, json={"by": "ops"}, headers=good).status_code == 200
    again = http.post(ack, json={"by": "other"}, headers=good)
    assert again.status_code == 409
    assert bastion.app.state.alerts.store.get(alert.id).acknowledged_by == "ops"
    # The audit log names the API key that vouched for "ops", once: the 409 recorded nothing.
    key_id = bastion.app.state.keys.verify(good["Authorization"].removeprefix("Bearer ")).id
    assert acknowledged_events(bastion, capsys, alert.id) == [
        {
            "alert_id": alert.id,
            "name": "refusals",
            "principal": alert.principal,
            "by": "ops",
            "channel": "api",
            "via": f"key:{key_id}",
        }
    ]


# -- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "table",
    [
        {"cooldown": 3},
        {"cooldown_seconds": -1},
        {"cooldown_seconds": "soon"},
        {"refusal_burst_count": 1.5},
        {"refusal_burst_severity": "urgent"},
        {"fallback_recipients": "oncall"},
        {"max_decisions": 0},
        {"repeat_write_seconds": -0.5},
        {"repeat_write_seconds": True},
        {"owner_may_acknowledge": "false"},
        {"owner_may_acknowledge": 0},
        {"webhooks": [{"url": "https://h.example/x", "secret": "inline"}]},
        {"webhooks": [{"url": "https://h.example/x", "secret_env": "BASTION_UNSET_SECRET"}]},
    ],
)
def test_bad_alert_settings_are_refused_with_a_clear_error(table):
    with pytest.raises(SettingsError):
        AlertSettings.from_mapping(table, env={})


def test_alert_settings_have_defaults():
    settings = AlertSettings.from_mapping({})
    assert settings.cooldown_seconds == 300 and settings.escalate_after_seconds == 900
    assert settings.refusal_burst_count == 20 and settings.refusal_burst_seconds == 60
    assert settings.repeat_write_seconds == 1.0
    assert settings.owner_may_acknowledge is True  # as before the setting: upgrades change nothing


# -- the command line ----------------------------------------------------------------------------


def test_the_cli_lists_shows_and_acknowledges_and_then_nothing_escalates(
    bastion, receiver, clock, capsys
):
    from bastion.cli import main

    alert = bastion.app.state.alerts.raise_alert(
        "cli_case", "medium", Entity("Agent", "cli-agent"), "d-cli"
    )
    database = ["--database", str(bastion.app.state.config.database)]
    assert main(["alerts", "list", "--state", "open", *database]) == 0
    assert alert.id in capsys.readouterr().out
    assert main(["alerts", "show", alert.id, "--json", *database]) == 0
    assert json.loads(capsys.readouterr().out)["decision_ids"] == ["d-cli"]
    assert main(["alerts", "ack", "nope", "--as", "ops", *database]) == 2
    assert "no alert has the id" in capsys.readouterr().err
    assert main(["alerts", "ack", alert.id, "--as", "ops", *database]) == 0
    acked = bastion.app.state.alerts.store.get(alert.id)
    assert (acked.state, acked.acknowledged_by, acked.acknowledged_channel) == (
        "acknowledged",
        "ops",
        "cli",
    )
    assert main(["alerts", "ack", alert.id, "--as", "someone", *database]) == 2
    # The OS user who ran the command vouched for "ops"; the refused second ack recorded nothing.
    [event] = acknowledged_events(bastion, capsys, alert.id)
    assert (event["by"], event["channel"], event["via"]) == ("ops", "cli", cli_actor())
    clock[0] = ESCALATE_AFTER * 10
    assert alert.id not in [a.id for a in bastion.app.state.alerts.escalate_due()]


# -- the page, in chromium -----------------------------------------------------------------------


@contextmanager
def signed_in(bastion, username: str):
    """An HTTP client with ``username``'s session, by the sign-in page."""
    with clients.client(base_url=bastion.url, follow_redirects=False, timeout=10) as http:
        page = http.get("/sign-in", params={"next": "/"})
        fields = {**hidden_fields(page.text), "username": username, "password": bastion.password}
        assert http.post("/sign-in", data=fields).status_code == 303
        yield http


def sign_in(tab, username: str, password: str) -> None:
    page = tab.page
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    with page.expect_navigation():
        page.get_by_role("button", name="Sign in").click()


def test_the_owner_acknowledges_on_the_page_and_nobody_else_can(bastion, tab, clock):
    bastion.apply(
        inserts=[("has_relation", Entity("Agent", "page-agent"), "owner", Entity("User", "avery"))]
    )
    alert = bastion.app.state.alerts.raise_alert(
        "page_case", "high", Entity("Agent", "page-agent"), "d-page"
    )
    url = f"{bastion.url}/alerts/{alert.id}"
    # sam was not told of it: it is not there for him, and an acknowledgement he sends anyway
    # is refused.
    with signed_in(bastion, "sam") as http:
        shown = http.get(f"/alerts/{alert.id}")
        assert shown.status_code == 404 and "csrf_token" not in shown.text
        with signed_in(bastion, "avery") as avery:
            token = csrf_of(avery.get(f"/alerts/{alert.id}").text)
        forged = http.post(f"/alerts/{alert.id}", data={"csrf_token": token})
        assert forged.status_code == 403
    anonymous = httpx.post(url, data={"csrf_token": token})
    assert anonymous.status_code == 403
    assert bastion.app.state.alerts.store.get(alert.id).state == "open"
    # avery, in the browser: signed out, sent to sign in, back to the alert, acknowledged.
    page = tab.page
    page.goto(url)
    assert urlsplit(page.url).path == "/sign-in"
    sign_in(tab, "avery", bastion.password)
    assert page.url == url
    assert page.locator("#alert").inner_text() == "page_case"
    assert press(tab, "Acknowledge") == 200
    assert "by avery (page)" in page.locator("#acknowledged").inner_text()
    acked = bastion.app.state.alerts.store.get(alert.id)
    assert (acked.state, acked.acknowledged_by, acked.acknowledged_channel) == (
        "acknowledged",
        "avery",
        "page",
    )
    clock[0] = ESCALATE_AFTER * 10
    assert alert.id not in [a.id for a in bastion.app.state.alerts.escalate_due()]
    assert tab.console_errors == [] and tab.failed_requests == []


def test_names_an_attacker_chose_read_as_themselves_on_the_alerts_page(bastion, tab):
    """An alert's name may be bound by a rule to what the agent sent (a tool name, an
    argument), and its principal is a client id anyone registers: on the page they are text,
    never markup, and a character that does not show as itself (a right-to-left override, a
    line break) reads as its escape, as in the webhook's text and on the command line (the
    name was shown as it came: "gnp.exe" read as "exe.png")."""
    from bastion.names import readable

    name = "<img src=x onerror=alert(1)>\u202egnp.exe\nfine"
    agent = Entity("Agent", "<script>alert(2)</script>\u202ecod.exe")
    bastion.apply(inserts=[("has_relation", agent, "owner", Entity("User", "avery"))])
    alert = bastion.app.state.alerts.raise_alert(name, "high", agent, "d-names")
    dialogs = []
    page = tab.page
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(f"{bastion.url}/alerts/{alert.id}")
    sign_in(tab, "avery", bastion.password)
    assert page.locator("#alert").inner_text() == readable(name)
    assert "\\u202e" in page.locator("#alert").inner_text()
    assert page.locator("#about").inner_text() == readable(repr(agent))
    assert page.locator("h1").inner_text() == f"Alert: {readable(name)}"
    assert page.title() == f"Alert: {readable(name)}"
    assert page.locator("img").count() == 0 and page.locator("script").count() == 0
    assert press(tab, "Acknowledge") == 200
    assert dialogs == [] and tab.console_errors == []


def test_an_alerts_page_is_there_only_for_whom_it_was_told(bastion, clock):
    """The page shows what was raised, about whom and by which decisions: only to those it was
    told to (owner, recipients, the managers it escalated to) and whoever acknowledged it. To
    anyone else signed in it is the page of an alert that does not exist, the same bytes, so an
    id is not confirmed either (it showed every alert to any signed-in user)."""
    from bastion.oauth.users import create_user

    agent = Entity("Agent", "seen-agent")
    create_user(
        bastion.app.state.oauth.store, "seen-boss", bastion.password, time.time(), actor="test"
    )
    bastion.apply(
        inserts=[
            ("has_relation", agent, "owner", Entity("User", "avery")),
            ("manager", Entity("User", "avery"), Entity("User", "seen-boss")),
        ]
    )
    alerts = bastion.app.state.alerts
    alert = alerts.raise_alert("seen_case", "high", agent, "d-seen")
    with signed_in(bastion, "sam") as http:
        unknown = http.get("/alerts/no-such-alert")
        shown = http.get(f"/alerts/{alert.id}")
        assert unknown.status_code == shown.status_code == 404
        assert shown.content == unknown.content
        assert "seen" not in shown.text
        with signed_in(bastion, "avery") as avery:
            token = csrf_of(avery.get(f"/alerts/{alert.id}").text)
        refused = http.post(f"/alerts/{alert.id}", data={"csrf_token": token})
        assert refused.status_code == 403 and "seen" not in refused.text
    # The owner sees it; the manager once it escalated to him, not before.
    with signed_in(bastion, "avery") as http:
        shown = http.get(f"/alerts/{alert.id}")
        assert shown.status_code == 200 and "seen_case" in shown.text
    with signed_in(bastion, "seen-boss") as http:
        assert http.get(f"/alerts/{alert.id}").status_code == 404
        clock[0] = ESCALATE_AFTER * 10
        assert alert.id in [a.id for a in alerts.escalate_due()]
        shown = http.get(f"/alerts/{alert.id}")
        assert shown.status_code == 200 and "d-seen" in shown.text
    # Acknowledged through the API by someone it was not told to: they see it too.
    alerts.acknowledge(alert.id, "sam", "api")
    with signed_in(bastion, "sam") as http:
        shown = http.get(f"/alerts/{alert.id}")
        assert shown.status_code == 200 and "by sam (api)" in shown.text


def test_an_acknowledgement_past_the_pages_body_limit_is_refused_unread(bastion):
    agent = Entity("Agent", "form-agent")
    bastion.apply(inserts=[("has_relation", agent, "owner", Entity("User", "avery"))])
    alert = bastion.app.state.alerts.raise_alert("big_form", "high", agent, "d-big")
    limit = bastion.app.state.config.max_oauth_body_bytes  # the pages' forms, not max_body_bytes
    with signed_in(bastion, "avery") as http:
        token = csrf_of(http.get(f"/alerts/{alert.id}").text)
        answer = http.post(
            f"/alerts/{alert.id}", data={"csrf_token": token, "note": "x" * (limit + 1)}
        )
    assert answer.status_code == 413, answer.text
    assert "max_oauth_body_bytes" in answer.text
    assert bastion.app.state.alerts.store.get(alert.id).state == "open"


def test_alert_settings_without_a_gateway_are_a_configuration_error(tmp_path):
    from bastion.server.app import create_app
    from bastion.server.config import ServerConfig

    config = ServerConfig(database=str(tmp_path / "b.db"), signals={"alerts": {}})
    create_app(config)  # an empty table is no alert setting
    table = {"alerts": {"cooldown_seconds": 1}}
    with pytest.raises(ConfigError, match="no \\[gateway\\]"):
        create_app(ServerConfig(database=str(tmp_path / "c.db"), signals=table))


def test_a_bad_alert_setting_stops_the_server_from_starting(tmp_path):
    from tests.approvals.support import config as approvals_config

    toml = tmp_path / "bastion.toml"
    toml.write_text(
        approvals_config("http://127.0.0.1:9", str(tmp_path / "b.db"), tmp_path / "keys")
        + "\n[signals.alerts]\ncooldown_seconds = -1\n"
    )
    from bastion.server.app import create_app
    from bastion.server.config import ServerConfig

    with pytest.raises(ConfigError, match="signals.alerts.cooldown_seconds"):
        create_app(ServerConfig.load(toml))


# -- the decision contract -----------------------------------------------------------------------


def test_decide_chain_asks_alerts_of_every_principal_allowed_or_refused():
    from bastion import Authorizer
    from bastion.decide.contract import decide_chain

    authz = Authorizer(
        """
        actor User {}
        actor Agent {}
        resource Tool {}
        allow(_u: User, "call", _t: Tool);
        allow(_a: Agent, "call", Tool{"ok"});
        alert(_u: User, "user_called", "low") if context.tool = "t";
        alert(_a: Agent, "agent_called", "critical") if context.tool = "t";
        alert(_a: Agent, 42, "high") if context.tool = "t";
        """
    )
    user, agent = Entity("User", "u"), Entity("Agent", "a")
    allowed = decide_chain(authz, [user, agent], "call", Entity("Tool", "ok"), {"tool": "t"})
    assert allowed.allowed
    assert set(allowed.obligations.alerts) == {
        (user, "user_called", "low"),
        (agent, "agent_called", "critical"),
        (agent, "42", "high"),  # not text: kept, never dropped
    }
    refused = decide_chain(authz, [user, agent], "call", Entity("Tool", "no"), {"tool": "t"})
    assert not refused.allowed and len(refused.obligations.alerts) == 3
    quiet = decide_chain(authz, [user, agent], "call", Entity("Tool", "ok"), {"tool": "x"})
    assert quiet.obligations.alerts == ()


# -- the store, on SQLite and PostgreSQL ---------------------------------------------------------


def test_the_store_dedupes_escalates_once_and_keeps_the_latest_decisions(database_url):
    from bastion import Authorizer
    from bastion.db import Database
    from bastion.facts.store import FactStore
    from bastion.signals.alerts import Alerts, AlertStore

    # A policy that never mentions owners or managers: they are read from the store.
    authz = Authorizer('actor User {} actor Agent {}\nallow(_u: User, "x", _a: Agent);')
    agent, pat, boss = Entity("Agent", "c1"), Entity("User", "pat"), Entity("User", "boss")
    facts = FactStore(Database(database_url))
    facts.apply(
        [("has_relation", agent, "owner", pat), ("manager", pat, boss)],
        [("has_relation", agent, "owner", None), ("manager", pat, None)],
    )
    now = [1000.0]
    told: list[tuple[str, str, tuple]] = []
    store = AlertStore(Database(database_url))
    try:
        alerts = Alerts(
            store,
            AlertSettings(cooldown_seconds=60, escalate_after_seconds=300, max_decisions=3),
            lambda: authz,
            "https://bastion.test",
            notify=lambda a, stage, to: told.append((a.id, stage, to)),
            clock=lambda: now[0],
        )
        first = alerts.raise_alert("bulk_delete", "medium", agent, "d0")
        for i in range(1, 5):
            now[0] += 30  # each within the cooldown of the last
            again = alerts.raise_alert(
                "bulk_delete", "critical" if i == 2 else "low", agent, f"d{i}"
            )
            assert again.id == first.id
        assert again.count == 5 and again.decision_ids == ("d2", "d3", "d4")
        assert again.severity == "critical"  # the most severe raising wins
        assert told == [(first.id, "raised", ('User{"pat"}',))]
        now[0] += 61  # past the cooldown: a new alert, told anew
        later = alerts.raise_alert("bulk_delete", "low", agent, "d5")
        assert later.id != first.id and len(told) == 2
        now[0] = first.first_at + 301
        escalated = alerts.escalate_due()
        assert [a.id for a in escalated] == [first.id]
        assert told[-1] == (first.id, "escalated", ('User{"boss"}',))
        assert alerts.escalate_due() == []  # once
        with pytest.raises(AlertError):
            alerts.acknowledge(first.id, "pat", "email")  # not a channel
        assert alerts.acknowledge(later.id, "pat", "api").state == "acknowledged"
        now[0] += 10_000
        assert alerts.escalate_due() == []  # acknowledged: never escalated
        with pytest.raises(AlertError, match="must be text"):
            alerts.raise_alert(None, "low", agent)  # the policy's names are made text before
    finally:
        store.db.close()


@contextmanager
def alerts_on(database_url: str, now: list[float], told: list, **settings):
    """`Alerts` on ``database_url``, on the clock ``now``, telling ``told``; closed after."""
    from bastion import Authorizer
    from bastion.db import Database
    from bastion.signals.alerts import AlertStore

    authz = Authorizer('actor User {} actor Agent {}\nallow(_u: User, "x", _a: Agent);')
    alerts = Alerts(
        AlertStore(Database(database_url)),
        AlertSettings(**settings),
        lambda: authz,
        "https://bastion.test",
        notify=lambda a, stage, to: told.append((a.id, stage)),
        clock=lambda: now[0],
    )
    try:
        yield alerts
    finally:
        alerts.store.db.close()


def raise_or_count(alerts: Alerts, name: str, severity: str, principal, decision_id: str) -> None:
    """As the gateway raises: counted in memory where it may be, else written."""
    if not alerts.count_again(name, severity, principal, decision_id):
        alerts.raise_alert(name, severity, principal, decision_id, {"n": decision_id})


def test_raisings_counted_in_memory_are_written_as_each_raising_written_would_be(database_url):
    """Raisings within an alert's cooldown counted in memory leave the alert's row, once
    written, as the same raisings each written at once: the count, the latest decision ids,
    the most severe severity, the latest time; nobody is told again. Nothing is written per
    raising, and past the cooldown it is a new alert."""
    now, told = [1000.0], []
    with alerts_on(database_url, now, told, cooldown_seconds=60, max_decisions=3) as alerts:
        agent = Entity("Agent", "c1")
        assert not alerts.count_again("spike", "low", agent, "d0")  # nothing stored yet
        for i, severity in enumerate(("medium", "low", "critical", "low", "high")):
            alerts.raise_alert("each", severity, agent, f"d{i}", {"n": i})
            raise_or_count(alerts, "counted", severity, agent, f"d{i}")
            now[0] += 20  # each within the cooldown of the last
        [counted] = [a for a in alerts.store.list() if a.name == "counted"]
        assert counted.count == 1  # the four raisings since are in memory, not written
        assert alerts.write_repeats() == 4
        assert alerts.write_repeats() == 0  # written once
        [each] = [a for a in alerts.store.list() if a.name == "each"]
        [counted] = [a for a in alerts.store.list() if a.name == "counted"]
        assert each.count == counted.count == 5
        assert each.decision_ids == counted.decision_ids == ("d2", "d3", "d4")
        assert each.severity == counted.severity == "critical"
        assert each.last_at == counted.last_at == 1080.0
        assert counted.first_at == 1000.0 and counted.detail == {"n": "d0"}
        assert sorted(stage for _, stage in told) == ["raised", "raised"]  # once each
        now[0] += 61  # past the cooldown: not counted again, a new alert
        assert not alerts.count_again("counted", "low", agent, "d5")
        raise_or_count(alerts, "counted", "low", agent, "d5")
        assert len([a for a in alerts.store.list() if a.name == "counted"]) == 2
        assert len(told) == 3


@pytest.mark.parametrize("stage", ["raised", "escalated"])
def test_an_alert_and_its_notification_are_written_together_or_not_at_all(database_url, stage):
    """A new alert, or its escalation, and the notification of it (the webhooks' outbox rows)
    are one transaction. A process killed between them (here: the notification cannot be
    queued) left an alert nobody would ever be told of: raised again, it is the same alert and
    tells nobody; escalated, it is never escalated again. Now nothing of it is kept, and the next
    raising, or the next round of escalation, tells."""
    from bastion.db import DatabaseUnavailable

    def unwritable(alert, stage, to):
        raise DatabaseUnavailable("the outbox cannot be written")

    now, told = [1000.0], []
    with alerts_on(database_url, now, told, escalate_after_seconds=300) as alerts:
        agent, telling = Entity("Agent", "c1"), alerts.notify
        if stage == "raised":
            alerts.notify = unwritable
            with pytest.raises(DatabaseUnavailable):
                alerts.raise_alert("spike", "high", agent, "d0")
            assert alerts.store.list() == []
            alerts.notify = telling
            alert = alerts.raise_alert("spike", "high", agent, "d1")
        else:
            alert = alerts.raise_alert("spike", "high", agent, "d0")
            now[0] += 301
            alerts.notify = unwritable
            assert alerts.escalate_due() == []
            kept = alerts.store.get(alert.id)
            assert (kept.escalated_at, kept.escalate_at) == (None, alert.escalate_at)
            alerts.notify = telling
            assert [a.id for a in alerts.escalate_due()] == [alert.id]
        assert told[-1] == (alert.id, stage)


@pytest.mark.parametrize("at_once", [True, False], ids=["written at once", "counted in memory"])
def test_an_acknowledged_alert_raised_again_more_severe_is_open_and_told_again(
    database_url, at_once
):
    """Acknowledging a "low" alert must not silence a "critical" raising of it: raisings that
    keep coming within the cooldown would otherwise keep it the same, acknowledged, alert for
    ever, and nobody would be told or escalated to again. The more severe raising opens it
    again and tells its recipients, whether written at once or counted in memory first; as
    severe, or less, it stays acknowledged and nobody is told."""
    now, told = [1000.0], []
    settings = {"cooldown_seconds": 60, "escalate_after_seconds": 300}
    with alerts_on(database_url, now, told, **settings) as alerts:
        agent = Entity("Agent", "c1")

        def again(severity: str, decision_id: str) -> None:
            now[0] += 30  # within the cooldown: the same alert
            if at_once:
                alerts.raise_alert("exfiltration", severity, agent, decision_id)
            else:
                raise_or_count(alerts, "exfiltration", severity, agent, decision_id)
                alerts.write_repeats()

        first = alerts.raise_alert("exfiltration", "low", agent, "d0")
        alerts.acknowledge(first.id, "pat", "api")
        for i in range(1, 4):
            again("low", f"d{i}")
        assert alerts.store.get(first.id).state == "acknowledged" and len(told) == 1
        again("critical", "d4")
        alert = alerts.store.get(first.id)
        assert (alert.state, alert.severity, alert.count) == ("open", "critical", 5)
        assert told == [(first.id, "raised"), (first.id, "raised")]
        for i in range(5, 16):  # it keeps coming, not acknowledged again: it escalates
            again("critical", f"d{i}")
        assert [a.id for a in alerts.escalate_due()] == [first.id]
        alerts.acknowledge(first.id, "pat", "api")
        again("high", "d16")
        again("critical", "d17")
        assert alerts.store.get(first.id).state == "acknowledged"
        assert [stage for _, stage in told] == ["raised", "raised", "escalated"]


def test_raisings_that_could_not_be_written_are_written_the_next_time(database_url):
    from bastion.db import Database

    now, told = [1000.0], []
    with alerts_on(database_url, now, told, cooldown_seconds=60) as alerts:
        agent = Entity("Agent", "c1")
        first = alerts.raise_alert("spike", "low", agent, "d0")
        for i in range(1, 4):
            assert alerts.count_again("spike", "low", agent, f"d{i}")
        other = Database(database_url)  # another connection takes the table away a while
        other.execute("ALTER TABLE alerts RENAME TO alerts_away")
        with pytest.raises(Exception, match="alerts"):
            alerts.write_repeats()
        other.execute("ALTER TABLE alerts_away RENAME TO alerts")
        other.close()
        assert alerts.count_again("spike", "high", agent, "d4")  # counted meanwhile
        assert alerts.write_repeats() == 4
        alert = alerts.store.get(first.id)
        assert alert.count == 5 and alert.severity == "high"
        assert alert.decision_ids == ("d0", "d1", "d2", "d3", "d4")


def test_an_alert_removed_from_the_table_is_raised_anew(database_url):
    from bastion.db import Database

    now, told = [1000.0], []
    with alerts_on(database_url, now, told) as alerts:
        agent = Entity("Agent", "c1")
        first = alerts.raise_alert("spike", "low", agent, "d0")
        assert alerts.count_again("spike", "low", agent, "d1")
        other = Database(database_url)  # an operator deletes it (bastion itself never does)
        other.execute("DELETE FROM alerts WHERE id = ?", (first.id,))
        other.close()
        assert alerts.write_repeats() == 0  # nothing to count into
        assert not alerts.count_again("spike", "low", agent, "d2")
        raise_or_count(alerts, "spike", "low", agent, "d2")
        [again] = alerts.store.list()
        assert again.id != first.id and again.count == 1 and len(told) == 2


def test_the_refusals_counted_stay_bounded_and_bursts_are_still_seen(sqlite_url, monkeypatch):
    import bastion.signals.alerts as module

    monkeypatch.setattr(module, "_REFUSERS", 100)
    now, told = [1000.0], []
    with alerts_on(
        sqlite_url, now, told, refusal_burst_count=3, refusal_burst_seconds=60
    ) as alerts:
        alerts._refusals_pruned_at = 100
        for i in range(150):  # more principals than the bound, all refused within the window
            assert alerts.refusal_burst(Entity("User", f"u{i}"), {}) is None
        assert len(alerts._refusals) == 150  # none is quiet: none forgotten
        now[0] += 61  # all quiet now
        for i in range(20):
            alerts.refusal_burst(Entity("User", f"v{i}"), {})
        assert len(alerts._refusals) == 20  # the quiet ones forgotten at the next refusal
        bursts = [alerts.refusal_burst(Entity("User", "v0"), {}) for _ in range(3)]
        assert bursts[:2] == [None, None] and bursts[2][0] == "refusal_burst"


def test_a_principals_refusals_take_memory_bounded_by_the_threshold_not_by_their_rate(
    sqlite_url,
):
    import tracemalloc

    now, told = [1000.0], []
    with alerts_on(
        sqlite_url, now, told, refusal_burst_count=20, refusal_burst_seconds=60
    ) as alerts:
        sam = Entity("User", "sam")
        alerts.refusal_burst(sam, {})  # sam's first refusal: what is kept for him is made
        tracemalloc.start()
        try:
            for _ in range(50_000):  # 50,000 more within 50 s: every one in the window
                now[0] += 0.001
                burst = alerts.refusal_burst(sam, {})
            held, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # Every one counted in the figure, and held in a few KiB: each refusal's time was kept,
        # over a MiB for this burst, and more the faster the refusals came.
        assert burst is not None and burst[3]["refusals"] == 50_001
        assert held < 64 * 1024, held


def test_a_burst_is_raised_exactly_when_it_was_and_its_figure_counts_the_window(sqlite_url):
    # Against every refusal's time kept (how bursts were counted): the same refusals make a
    # burst, and the figure is their number within the window, less at most those of the
    # sixtieth of it that is leaving: never more than there were.
    import random

    chance = random.Random(7)
    now, told = [1000.0], []
    n, window = 5, 60.0
    with alerts_on(
        sqlite_url, now, told, refusal_burst_count=n, refusal_burst_seconds=window
    ) as alerts:
        sam, times = Entity("User", "sam"), []
        for _ in range(5000):
            now[0] += chance.choice((0.0, 0.01, 0.5, 3.0, 13.0, 61.0))
            times.append(now[0])
            in_window = [t for t in times if t > now[0] - window]
            settled = [t for t in in_window if t > now[0] - window + window / 60]
            burst = alerts.refusal_burst(sam, {})
            assert (burst is not None) == (len(in_window) > n)
            if burst is not None:
                refusals = burst[3]["refusals"]
                assert max(len(settled), n + 1) <= refusals <= len(in_window)


def test_with_repeat_write_seconds_0_every_raising_is_written_at_once(sqlite_url):
    now, told = [1000.0], []
    with alerts_on(sqlite_url, now, told, repeat_write_seconds=0) as alerts:
        agent = Entity("Agent", "c1")
        for i in range(3):
            raise_or_count(alerts, "spike", "low", agent, f"d{i}")
        [alert] = alerts.store.list()
        assert alert.count == 3 and alerts.write_repeats() == 0


def test_two_replicas_count_into_the_same_alert(database_url):
    """Each process counts its own raisings in memory; the alert's row adds them up."""
    now, told = [1000.0], []
    agent = Entity("Agent", "c1")
    with alerts_on(database_url, now, told) as one, alerts_on(database_url, now, told) as two:
        for i in range(6):
            raise_or_count(one if i % 2 else two, "spike", "low", agent, f"d{i}")
            now[0] += 1
        assert one.write_repeats() + two.write_repeats() == 4  # the first of each was written
        [alert] = one.store.list()
        assert alert.count == 6 and len(told) == 1
        assert sorted(alert.decision_ids) == [f"d{i}" for i in range(6)]


def test_a_database_outage_is_logged_once_by_each_background_round_not_at_every_round(
    postgres_url, caplog
):
    """The rounds that write the raisings counted in memory (every ``repeat_write_seconds``,
    1 s by default) and escalate what is due go on while the database is away, and say so once
    each, not at every round; once it is back, once each that they work again, and what was
    counted meanwhile is written. The outage is the test's own: it reaches PostgreSQL through a
    relay it cuts."""
    alerts_log = "bastion.signals.alerts"
    caplog.set_level(logging.WARNING, logger=alerts_log)
    now, told = [1000.0], []
    agent = Entity("Agent", "c1")
    with Relay(("127.0.0.1", 5432)) as relay:
        url = postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}")
        with alerts_on(
            url, now, told, repeat_write_seconds=0.01, escalation_poll_seconds=0.01
        ) as alerts:
            first = alerts.raise_alert("spike", "low", agent, "d0")
            caplog.clear()

            def said() -> list[str]:
                return [r.getMessage() for r in caplog.records if r.name == alerts_log]

            async def rounds() -> None:
                tasks = [
                    asyncio.create_task(alerts.write_repeats_forever()),
                    asyncio.create_task(alerts.escalate_forever()),
                ]
                try:
                    relay.cut()
                    assert alerts.count_again("spike", "low", agent, "d1")
                    before = relay.accepted
                    # The database reconnected at most every 0.5 s meanwhile: many rounds each.
                    while relay.accepted < before + 3:
                        await asyncio.sleep(0.05)
                    assert len(said()) == 2, said()
                    relay.restore()
                    async with asyncio.timeout(PATIENCE):
                        while len(said()) < 4:
                            await asyncio.sleep(0.05)
                finally:
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)

            # In a thread of its own: the page tests of this module leave Playwright's loop
            # running here.
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                pool.submit(asyncio.run, rounds()).result()
            assert len(said()) == 4 and all("again" in line for line in said()[2:]), said()
            assert alerts.store.get(first.id).count == 2


def at_once(*works) -> list:
    """Run each of ``works`` on a thread of its own, all let go at the same moment: what each
    returned, or the exception it raised."""
    start = threading.Barrier(len(works))

    def run(work):
        start.wait()
        try:
            return work()
        except Exception as e:  # what the caller asserts on
            return e

    with concurrent.futures.ThreadPoolExecutor(len(works)) as pool:
        return list(pool.map(run, works))


def test_two_replicas_raising_a_new_alert_at_once_make_one_alert_told_once(postgres_url):
    """Deduplication holds across replicas: the raising of one (name, principal) is read and
    written under a lock of that key, so the second raising waits for the first and counts into
    its alert. (Without it, on PostgreSQL's read committed, most such pairs made two alerts, each
    told.)"""
    now, told = [1000.0], []
    with alerts_on(postgres_url, now, told) as one, alerts_on(postgres_url, now, told) as two:
        for i in range(20):
            name = f"spike{i}"
            raised = at_once(
                lambda name=name: one.raise_alert(name, "high", Entity("Agent", "c1"), "d1"),
                lambda name=name: two.raise_alert(name, "high", Entity("Agent", "c1"), "d2"),
            )
            assert len({a.id for a in raised}) == 1, raised
            [alert] = [a for a in one.store.list(limit=500) if a.name == name]
            assert alert.count == 2 and sorted(alert.decision_ids) == ["d1", "d2"]
        assert len(told) == 20


def test_a_raising_and_another_replicas_counted_raisings_written_at_once_both_count(postgres_url):
    """The alert's row is read for its update under a lock on it, by a raising as by the
    writing of raisings counted in memory: neither writes over the other's decision ids and
    severity with what it read before the other wrote."""
    now, told = [1000.0], []
    with alerts_on(postgres_url, now, told) as one, alerts_on(postgres_url, now, told) as two:
        for i in range(30):
            name = f"spike{i}"
            first = two.raise_alert(name, "low", Entity("Agent", "c1"), "d0")
            assert two.count_again(name, "critical", Entity("Agent", "c1"), "counted")
            at_once(
                lambda name=name: one.raise_alert(name, "low", Entity("Agent", "c1"), "raised"),
                two.write_repeats,
            )
            alert = one.store.get(first.id)
            assert alert.count == 3, alert
            assert sorted(alert.decision_ids) == ["counted", "d0", "raised"], alert
            assert alert.severity == "critical", alert


def test_two_replicas_acknowledging_at_once_record_one_acknowledgement(postgres_url):
    """One acknowledgement is recorded; the other is told who acknowledged it (it overwrote
    the first, each told it had acknowledged)."""
    now, told = [1000.0], []
    with alerts_on(postgres_url, now, told) as one, alerts_on(postgres_url, now, told) as two:
        for i in range(20):
            alert = one.raise_alert(f"spike{i}", "high", Entity("Agent", "c1"), "d1")
            answers = at_once(
                lambda alert=alert: one.acknowledge(alert.id, "pat", "api"),
                lambda alert=alert: two.acknowledge(alert.id, "kim", "page"),
            )
            [done] = [a for a in answers if not isinstance(a, Exception)]
            [refused] = [a for a in answers if isinstance(a, Exception)]
            assert isinstance(refused, AlertError), refused
            assert str(refused) == (
                f"alert {alert.id} was acknowledged already, by {done.acknowledged_by}"
            )
            stored = one.store.get(alert.id)
            assert (stored.acknowledged_by, stored.acknowledged_channel) == (
                done.acknowledged_by,
                done.acknowledged_channel,
            )
        with pytest.raises(AlertNotFound):
            one.acknowledge("no-such-alert", "pat", "api")


def test_raisings_counted_in_memory_are_written_when_the_server_stops(tmp_path):
    """With a write interval far longer than the test, only the write at shutdown can have
    counted the second raising."""
    from bastion.db import Database
    from bastion.signals.alerts import AlertStore

    signals = {"alerts": {"repeat_write_seconds": 3600, "fallback_recipients": ["oncall"]}}

    def run():
        with start(tmp_path, policy_extra=RULES, signals=signals) as running:
            client_id, seen = search(running, "everyone", "everyone")
            assert seen["calls"] == ["ok", "ok"]
            [alert] = alerts_of(running, "customer_search", f'Agent{{"{client_id}"}}')
            assert alert.count == 1
            return alert, running.app.state.alerts.store.db.url

    # In a thread of its own: the page tests of this module leave Playwright's loop running here.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        alert, database = pool.submit(run).result()
    store = AlertStore(Database(database))
    try:
        assert store.get(alert.id).count == 2
    finally:
        store.db.close()


def test_the_gateway_reads_the_built_in_alerts_figures_before_counting_the_call(tmp_path):
    """With a policy that never reads the figures, the built-in alert sees what the decision
    saw (before this call), as the figures a policy reads: three destructive calls within a
    threshold of three raise nothing; the fourth raises "bulk_destructive" (4 calls)."""
    from bastion import Authorizer
    from bastion.db import Database
    from bastion.gateway.enforce import Caller, Enforcer
    from bastion.signals.alerts import AlertStore

    policy = 'actor User {}\nactor Agent {}\nresource Tool {}\nallow(_, "call", _: Tool);'
    authz = Authorizer(policy)
    db = Database(str(tmp_path / "alerts.db"))
    alerts = Alerts(
        AlertStore(db), AlertSettings(bulk_destructive_count=3), lambda: authz, "https://b.example"
    )
    enforcer = Enforcer(lambda: authz, None, behavior=LocalBehavior())
    enforcer.alerts = alerts
    caller = Caller("sam", "bot", frozenset(), "127.0.0.1", "2025-11-25")
    tool = Entity("Tool", "desk/delete_customer")

    async def delete(n: int) -> list:
        context = enforcer.context(
            caller, "desk", "tools/call", annotations={"destructiveHint": True}
        )
        await enforcer.decide(caller, "desk", "tools/call", "call", tool, context, {"id": n})
        return [a for a in alerts.store.list() if a.name == "bulk_destructive"]

    async def run() -> list[list]:
        return [await delete(n) for n in range(7)]

    written = []  # the raisings that went to the database as they happened
    raise_alert = alerts.raise_alert
    alerts.raise_alert = lambda *args: written.append(args) or raise_alert(*args)
    # In a thread of its own: the page tests of this module leave Playwright's loop running here.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        raised = pool.submit(asyncio.run, run()).result()
    assert raised[:3] == [[], [], []]
    [alert] = raised[3]
    assert alert.detail["destructive_calls"] == 4 and alert.principal == 'Agent{"bot"}'
    # Raised again by each later call: counted in memory, not a write per call.
    assert len(written) == 1 and raised[6] == [alert]
    assert alerts.write_repeats() == 3
    assert alerts.store.get(alert.id).count == 4
    db.close()


def test_an_alert_about_an_entity_of_any_length_is_stored_and_counted_again(database_url):
    """A policy's alert may name any entity, a tool whose name the client chose among them:
    (name, principal) is indexed, and PostgreSQL indexes no entry over 2,704 bytes, so an alert
    about one of 3,000 characters was never stored there (logged, lost). Past 1,500 bytes the
    alert names the entity's start and the digest of the whole; two such entities that share
    that start are two alerts."""
    import secrets

    from bastion.db import Database
    from bastion.signals.alerts import MAX_PRINCIPAL_BYTES, AlertStore

    db = Database(database_url)
    try:
        alerts = Alerts(AlertStore(db), AlertSettings(), lambda: None, "http://bastion.test")
        # Random, so that PostgreSQL cannot compress the index entry below its bound.
        tool = Entity("Tool", "desk/é" + secrets.token_urlsafe(2400))
        first = alerts.raise_alert("odd_tool", "high", tool, "d-1")
        again = alerts.raise_alert("odd_tool", "high", tool, "d-2")
        other = alerts.raise_alert("odd_tool", "high", Entity("Tool", tool.id + "x"), "d-3")
        assert again.id == first.id and again.count == 2
        assert other.id != first.id
        named = first.principal.encode()
        assert len(named) <= MAX_PRINCIPAL_BYTES and first.principal.startswith('Tool{"desk/é')
        assert "sha256:" in first.principal
        short = alerts.raise_alert("odd_tool", "high", Entity("Tool", "desk/x"), "d-4")
        assert short.principal == 'Tool{"desk/x"}'
    finally:
        db.close()


def test_an_alert_whose_rule_names_it_with_what_an_agent_sent_is_raised_whatever_its_length(
    database_url,
):
    """A rule may name its alert with a value of the request (the tool called, an argument):
    past 200 characters, or empty, the alert was refused (logged) and never raised, so an agent
    chose not to be seen by sending a long name. Past 200 characters it is named by its start
    and the SHA-256 digest of the whole; empty, as ``""``; each is the same alert when raised
    again, counted in memory too."""
    from bastion import Authorizer
    from bastion.decide.contract import decide_chain
    from bastion.signals.alerts import MAX_NAME

    authz = Authorizer(
        """
        actor User {}
        actor Agent {}
        resource Tool {}
        alert(_a: Agent, name, "critical") if name = context.tool;
        """
    )
    agent = Entity("Agent", "a")
    now, told = [1000.0], []
    with alerts_on(database_url, now, told) as alerts:
        for tool in ("x" * 5000, "x" * 5000 + "y", ""):
            chain = decide_chain(authz, [agent], "call", Entity("Tool", "t"), {"tool": tool})
            [(principal, name, severity)] = chain.obligations.alerts
            assert name == tool
            first = alerts.raise_alert(name, severity, principal, "d1")
            assert alerts.count_again(name, severity, principal, "d2")
            assert alerts.write_repeats() == 1
            again = alerts.raise_alert(name, severity, principal, "d3")
            assert again.id == first.id and again.count == 3
            assert 0 < len(first.name) <= MAX_NAME
        long, longer, empty = sorted(alerts.store.list(), key=lambda a: a.first_at)
        assert long.name.startswith("x" * 100) and "sha256:" in long.name
        assert longer.name != long.name
        assert empty.name == '""'
        assert len(told) == 3
        short = alerts.raise_alert("x" * MAX_NAME, "low", agent)
        assert short.name == "x" * MAX_NAME


def test_a_suspended_owner_cannot_acknowledge_an_alert_on_its_page(bastion):
    """An account the kill switch holds (perhaps taken over) must not silence the alerts about
    its own agents: its session acknowledges nothing until it is resumed."""
    from bastion.signals.suspensions import resume, suspend, suspension

    agent = Entity("Agent", "held-owner-agent")
    bastion.apply(inserts=[("has_relation", agent, "owner", Entity("User", "avery"))])
    alert = bastion.app.state.alerts.raise_alert("held_owner", "high", agent, "d-held")

    def kill_switch(change) -> None:
        seq = change(bastion.app.state.store, suspension("user", "avery"), "test").seq
        bastion.apply()  # nothing: waits for the replica to have the change before it
        assert bastion.app.state.replica.applied >= seq

    with signed_in(bastion, "avery") as http:
        token = csrf_of(http.get(f"/alerts/{alert.id}").text)
        kill_switch(suspend)
        try:
            refused = http.post(f"/alerts/{alert.id}", data={"csrf_token": token})
        finally:
            kill_switch(resume)
        assert refused.status_code == 403 and "suspended" in refused.text
        assert bastion.app.state.alerts.store.get(alert.id).state != "acknowledged"
        done = http.post(f"/alerts/{alert.id}", data={"csrf_token": token})
    assert done.status_code == 303, done.text
    assert bastion.app.state.alerts.store.get(alert.id).acknowledged_by == "avery"


# -- owner_may_acknowledge = false ---------------------------------------------------------------


@contextmanager
def owner_may_acknowledge(bastion, allowed: bool):
    """The running server's ``[signals.alerts] owner_may_acknowledge``, for the block (the
    setting's own reading from bastion.toml is tested below)."""
    from dataclasses import replace

    alerts = bastion.app.state.alerts
    before = alerts.settings
    alerts.settings = replace(before, owner_may_acknowledge=allowed)
    try:
        yield
    finally:
        alerts.settings = before


def cli_config(tmp_path, allowed: bool) -> list[str]:
    """``--config`` of a bastion.toml that says ``owner_may_acknowledge``."""
    toml = tmp_path / "bastion.toml"
    toml.write_text(f"[signals.alerts]\nowner_may_acknowledge = {str(allowed).lower()}\n")
    return ["--config", str(toml)]


def test_with_owner_may_acknowledge_false_nobody_an_alert_is_about_acknowledges_it(
    bastion, tab, clock, capsys, tmp_path
):
    """sam's calls through avery's agent raise an alert told to avery. With the setting false,
    neither avery (the agent's owner) nor sam (the user it acted for) acknowledges it, on the
    page, the API or the command line, each saying why; avery still sees it, it escalates as
    usual, and the manager it escalated to acknowledges it."""
    from bastion.cli import main

    # The SDK's run on a thread of its own: this module's browser holds this one's event loop.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        run = pool.submit(search, bastion, "everyone", owner="avery", manager="avery-boss")
        client_id, _ = run.result()
    [alert] = alerts_of(bastion, "customer_search", f'Agent{{"{client_id}"}}')
    assert alert.owner == 'User{"avery"}' and 'User{"sam"}' in alert.about
    url = f"{bastion.url}/alerts/{alert.id}"
    with signed_in(bastion, "avery") as avery:
        token = csrf_of(avery.get(f"/alerts/{alert.id}").text)  # the page opened before
        with owner_may_acknowledge(bastion, False):
            # The page: avery sees the alert, no button, and why; her POST is refused.
            page = tab.page
            page.goto(url)
            sign_in(tab, "avery", bastion.password)
            assert page.locator("#alert").inner_text() == "customer_search"
            assert page.get_by_role("button", name="Acknowledge").count() == 0
            why = page.locator("#not-acknowledgeable").inner_text()
            assert f'they own Agent{{"{client_id}"}}' in why and "owner_may_acknowledge" in why
            refused = avery.post(f"/alerts/{alert.id}", data={"csrf_token": token})
            assert refused.status_code == 403, refused.text
            assert (
                "owner_may_acknowledge" in refused.text
                and "Nothing was acknowledged" in refused.text
            )
            # The API: neither the owner nor the user the agent acted for.
            ack = f"{bastion.url}/v1/alerts/{alert.id}/acknowledge"
            for person, why in (
                ("avery", "they own Agent"),
                ("sam", 'made for them (User{"sam"})'),
            ):
                answer = bastion.http.post(ack, json={"by": person}, headers=api_key(bastion))
                assert answer.status_code == 403, answer.text
                problem = answer.json()
                assert why in problem["detail"] and "owner_may_acknowledge" in problem["detail"]
            # The command line, reading the setting from bastion.toml.
            database = ["--database", str(bastion.app.state.config.database)]
            capsys.readouterr()
            ack_cli = ["alerts", "ack", alert.id, "--as", "avery", *database]
            assert main([*ack_cli, *cli_config(tmp_path, False)]) == 2
            assert "owner_may_acknowledge = false" in capsys.readouterr().err
            assert bastion.app.state.alerts.store.get(alert.id).state == "open"
            assert acknowledged_events(bastion, capsys, alert.id) == []
            # Not acknowledged, it escalates; the manager it escalated to acknowledges it.
            # Escalated by this call, or by the server's own task when it ran first.
            clock[0] = ESCALATE_AFTER + 1
            bastion.app.state.alerts.escalate_due()
            escalated = bastion.app.state.alerts.store.get(alert.id)
            assert escalated.escalated_at is not None and escalated.escalated_to
            answer = bastion.http.post(ack, json={"by": "avery-boss"}, headers=api_key(bastion))
            assert answer.status_code == 200, answer.text
    assert tab.console_errors == [] and tab.failed_requests == []


def test_with_owner_may_acknowledge_false_a_recipient_acknowledges_and_with_true_the_owner(
    bastion, capsys, tmp_path
):
    """The setting refuses only the people an alert is about: a fallback recipient of an
    alert about a user acknowledges it on the command line, while the user is refused; with
    the setting true (the default) the owner acknowledges as before."""
    from bastion.cli import main

    alerts = bastion.app.state.alerts
    database = ["--database", str(bastion.app.state.config.database)]
    about_sam = alerts.raise_alert("user_case", "high", Entity("User", "sam"), "d-u")
    assert about_sam.recipients == ('User{"oncall"}',)
    with owner_may_acknowledge(bastion, False):
        capsys.readouterr()
        ack = ["alerts", "ack", about_sam.id, *database, *cli_config(tmp_path, False)]
        assert main([*ack, "--as", "sam"]) == 2
        assert 'it is about them (User{"sam"})' in capsys.readouterr().err
        assert main([*ack, "--as", "oncall"]) == 0
    assert alerts.store.get(about_sam.id).acknowledged_by == "oncall"
    agent = Entity("Agent", "owned-cli-agent")
    bastion.apply(inserts=[("has_relation", agent, "owner", Entity("User", "avery"))])
    owned = alerts.raise_alert(
        "owner_case", "high", agent, "d-o", chain=[Entity("User", "sam"), agent]
    )
    ack = ["alerts", "ack", owned.id, "--as", "avery", *database, *cli_config(tmp_path, True)]
    assert main(ack) == 0
    assert alerts.store.get(owned.id).acknowledged_by == "avery"


def test_owner_may_acknowledge_is_read_from_bastion_toml_and_must_be_a_boolean(tmp_path):
    """false reaches the server; a value that is not a boolean (a string, a number) stops it
    from starting, naming the setting, rather than being read as true."""
    from bastion.server.app import create_app
    from bastion.server.config import ServerConfig
    from tests.approvals.support import config as approvals_config

    base = approvals_config("http://127.0.0.1:9", str(tmp_path / "b.db"), tmp_path / "keys")
    toml = tmp_path / "bastion.toml"
    for bad in ('"false"', "0", '"no"'):
        toml.write_text(base + f"\n[signals.alerts]\nowner_may_acknowledge = {bad}\n")
        with pytest.raises(ConfigError, match="owner_may_acknowledge must be true or false"):
            create_app(ServerConfig.load(toml))
    toml.write_text(base + "\n[signals.alerts]\nowner_may_acknowledge = false\n")
    app = create_app(ServerConfig.load(toml))
    assert app.state.alerts.settings.owner_may_acknowledge is False


def test_an_alert_is_about_every_chain_that_raised_it_and_the_owners_up_the_delegation(
    database_url,
):
    """Whom an alert is about: the users of the chains whose decisions raised it, written or
    counted in memory, and the owners of the agents in them and of their parent agents."""
    from bastion.facts.store import FactStore
    from bastion.signals.alerts import MAX_ABOUT, AcknowledgementRefused, about_people

    now, told = [1000.0], []
    with alerts_on(database_url, now, told, owner_may_acknowledge=False) as alerts:
        parent, child = Entity("Agent", "parent-agent"), Entity("Agent", "child-agent")
        FactStore(alerts.store.db).apply(
            [
                ("has_relation", child, "parent", parent),
                ("has_relation", parent, "owner", Entity("User", "olga")),
                ("has_relation", child, "owner", Entity("User", "cid")),
            ],
            actor="test",
        )
        alerts.raise_alert(
            "chain", "high", child, "d1", chain=[Entity("User", "ua"), parent, child]
        )
        # Raised again within the cooldown for another user: counted in memory, then written.
        assert alerts.count_again("chain", "high", child, "d2", [Entity("User", "ub"), child])
        alerts.write_repeats()
        [alert] = alerts.store.list()
        assert alert.about == (
            'User{"ua"}',
            'Agent{"parent-agent"}',
            'Agent{"child-agent"}',
            'User{"ub"}',
        )
        people = about_people(FactStore(alerts.store.db), alert)
        assert sorted(people) == ["cid", "olga", "ua", "ub"]
        for person in people:
            with pytest.raises(AcknowledgementRefused, match=f"{person} may not acknowledge"):
                alerts.acknowledge(alert.id, person, "api")
        assert alerts.store.get(alert.id).state == "open"
        assert alerts.acknowledge(alert.id, "ops", "api").acknowledged_by == "ops"
        # One raised by more principals than it keeps may be about anyone: nobody acknowledges.
        crowd = [Entity("User", f"u{i}") for i in range(MAX_ABOUT + 5)]
        many = alerts.raise_alert("crowd", "high", child, "d3", chain=crowd)
        assert len(many.about) == MAX_ABOUT
        with pytest.raises(AcknowledgementRefused, match="more than the 200 principals"):
            alerts.acknowledge(many.id, "ops", "api")
