"""A flood of alerts, tried as an attacker would make one: a rule that names its alert with a
value of the request lets an agent raise as many alerts as it makes calls. Every alert is still
stored and listed, but no more than ``notify_limit_count`` notifications are sent one by one in
a window of ``notify_limit_seconds`` (counted in the database: two replicas on PostgreSQL share
one count); past it, ONE critical ``alert.too_many`` summary per window names how many were
folded and where to list them, and a folded alert still escalates. A webhook body is bounded
whatever the alert names: its lists are cut, ``max_decisions`` has an upper bound. A real bastion
(uvicorn) in front of real MCP servers, real webhook receivers that verify every signature."""

from __future__ import annotations

import json
import math
import os
import time

import pytest

from bastion import Authorizer
from bastion.db import Database
from bastion.facts.model import Entity
from bastion.facts.store import FactStore
from bastion.signals.alerts import MAX_NAME, Alerts, AlertSettings, AlertStore
from bastion.webhooks import PENDING, SettingsError
from tests.approvals.test_webhooks import SECRET, Receiver, receivers  # noqa: F401 (fixture)
from tests.gateway.support import start
from tests.gateway.test_shared_rate_limits import call_tool
from tests.oauth.support import free_socket, serve
from tests.signals.test_alert_delivery import alerts_with_webhooks, deliver
from tests.waits import eventually

# An agent names its own alerts: one per query it sends.
FLOOD = """
alert(agent: Agent, name, "critical") if
  context.tool = "search_customers" and name = context.arguments.query;
"""
SECRET_ENV = "BASTION_TEST_FLOOD_SECRET"
WINDOW = 600  # the default notify_limit_seconds
LIMIT = 100  # the default notify_limit_count
ESCALATE_AFTER = 1200
LISTED = 10  # recipients a body lists
DECISIONS = 1000  # the most decision ids an alert keeps (max_decisions at its bound)


def flood_settings(url: str) -> dict:
    """The [signals] table: the notification limit left at its defaults."""
    return {
        "alerts": {
            "escalate_after_seconds": ESCALATE_AFTER,
            "escalation_poll_seconds": 0.05,
            "repeat_write_seconds": 0.05,
            "fallback_recipients": ["oncall"],
            "webhook_backoff_seconds": 0.02,
            "webhooks": [{"url": url, "secret_env": SECRET_ENV}],
        }
    }


class Flooded:
    """A running bastion (and its replicas), a receiver, and one clock for their alerts."""

    def __init__(self, running, receiver: Receiver) -> None:
        self.running = running
        self.receiver = receiver
        self.apps = [running.app, *running.replica_apps]
        # Each replica's clock at the start of a window (plus a second), moved by the test.
        now = time.time()
        self.offset = math.ceil(now / WINDOW) * WINDOW + 1 - now
        for app in self.apps:
            app.state.alerts.clock = lambda: time.time() + self.offset
        self.window = math.ceil(now / WINDOW) * WINDOW
        key, _ = running.app.state.keys.create("flood test", ["alerts"], created_by="test")
        self.key = {"Authorization": f"Bearer {key}"}

    def move_to(self, seconds: float) -> None:
        """Every replica's alerts at ``seconds`` past the window the flood began in."""
        self.offset += self.window + seconds - self.running.app.state.alerts.clock()

    def stored(self) -> list[dict]:
        answer = self.running.http.get(
            f"{self.running.url}/v1/alerts", params={"limit": 500}, headers=self.key
        )
        assert answer.status_code == 200, answer.text
        return answer.json()["alerts"]

    def told(self, event: str) -> list[dict]:
        bodies = [json.loads(r.body) for r in self.receiver.got if r.verified]
        return [b for b in bodies if b["event"] == event]

    def all_sent(self) -> bool:
        db = self.running.app.state.alerts.store.db
        return not db.execute(
            "SELECT 1 FROM alert_webhook_outbox WHERE state = ? LIMIT 1", (PENDING,)
        )


@pytest.fixture
def flooded(tmp_path, request):
    """A bastion with the flood rule and a receiver; ``request.param``: a PostgreSQL URL's
    fixture name and replicas, or SQLite alone."""
    replicas, database = request.param
    receiver = Receiver()
    served = serve(receiver.app(), free_socket())
    url = served.__enter__() + "/hook"
    os.environ[SECRET_ENV] = SECRET.decode()
    try:
        with start(
            tmp_path,
            policy_extra=FLOOD,
            signals=flood_settings(url),
            replicas=replicas,
            database=request.getfixturevalue(database) if database else None,
        ) as running:
            yield Flooded(running, receiver)
    finally:
        os.environ.pop(SECRET_ENV, None)
        served.__exit__(None, None, None)


def wait_for(condition, what: str):
    assert eventually(condition, every=0.02), f"never: {what}"
    return condition()


def flood(flooded: Flooded, calls: int) -> set[str]:
    """``calls`` calls, each raising an alert of its own, spread over every replica: the
    names of the alerts."""
    running = flooded.running
    token = running.token("sam", "deskhttp")
    bases = [running.url, *running.replicas]
    names = {f"q{i:04d}" for i in range(calls)}
    for i, name in enumerate(sorted(names)):
        answer = call_tool(
            running.http, bases[i % len(bases)], token, "search_customers", {"query": name}
        )
        assert "error" not in answer, answer  # an alert never changes the decision
    return names


def flood_is_told_up_to_the_limit_then_summed_up_once(flooded: Flooded) -> None:
    names = flood(flooded, LIMIT + 30)
    stored = wait_for(
        lambda: [a for a in flooded.stored() if a["name"] in names], "every alert stored"
    )
    assert len(stored) == LIMIT + 30  # nothing hidden from the API
    wait_for(flooded.all_sent, "every notification answered")
    raised = flooded.told("alert.raised")
    assert len(raised) == LIMIT, f"{len(raised)} alerts told one by one, not {LIMIT}"
    assert flooded.told("alert.too_many") == []  # its window is not over
    flooded.move_to(WINDOW + 1)
    [summary] = wait_for(lambda: flooded.told("alert.too_many"), "the summary")
    too_many = summary["too_many"]
    assert too_many["severity"] == "critical"
    assert (too_many["folded"], too_many["escalations"], too_many["limit"]) == (30, 0, LIMIT)
    assert (too_many["from"], too_many["until"]) == (flooded.window, flooded.window + WINDOW)
    assert too_many["url"] == f"{flooded.running.url}/v1/alerts?state=open"
    assert too_many["recipients"] == ['User{"oncall"}']
    assert "30" in summary["text"] and "bastion alerts list" in summary["text"]
    assert too_many["url"] in summary["text"]
    # Asked again, on every replica: the window was summed up once.
    for app in flooded.apps:
        assert app.state.alerts.tell_folded() == []
    wait_for(flooded.all_sent, "every notification answered")
    assert len(flooded.told("alert.too_many")) == 1


@pytest.mark.parametrize("flooded", [(0, None)], indirect=True, ids=["sqlite"])
def test_a_flood_of_alerts_is_stored_whole_told_up_to_the_limit_and_summed_up_once(flooded):
    """130 alerts named by what the agent sent, within a window: all stored and listed, 100
    told one by one, then one critical summary naming the 30 folded and where to list them.
    A folded alert still escalates: with 30 of those told acknowledged, the 100 left escalate in
    a later window, and each is told to the manager, the 30 folded at their raising among them."""
    flood_is_told_up_to_the_limit_then_summed_up_once(flooded)
    raised_ids = {b["alert"]["id"] for b in flooded.told("alert.raised")}
    stored = [a for a in flooded.stored() if a["name"].startswith("q")]
    folded = {a["id"] for a in stored} - raised_ids
    assert len(folded) == 30
    for alert_id in sorted(raised_ids)[:30]:
        answer = flooded.running.http.post(
            f"{flooded.running.url}/v1/alerts/{alert_id}/acknowledge",
            json={"by": "ops"},
            headers=flooded.key,
        )
        assert answer.status_code == 200, answer.text
    flooded.move_to(ESCALATE_AFTER + WINDOW + 1)  # a window of its own, past every escalation
    escalated = wait_for(
        lambda: len(flooded.told("alert.escalated")) == LIMIT and flooded.all_sent(),
        "the escalations told",
    )
    assert escalated
    told_escalated = {b["alert"]["id"] for b in flooded.told("alert.escalated")}
    assert folded <= told_escalated
    assert told_escalated == {a["id"] for a in stored} - set(sorted(raised_ids)[:30])
    flooded.move_to(ESCALATE_AFTER + 2 * WINDOW + 1)
    # That window told as many as the limit, no more: nothing to sum up.
    assert flooded.running.app.state.alerts.tell_folded() == []
    assert len(flooded.told("alert.too_many")) == 1


@pytest.mark.parametrize(
    "flooded", [(1, "postgres_url")], indirect=True, ids=["two replicas, postgresql"]
)
def test_two_replicas_on_postgresql_share_one_limit_and_one_summary(flooded):
    """The limit is the deployment's: two replicas, each taking half of the flood, tell 100
    between them, and one summary (each replica looks for windows to sum up)."""
    flood_is_told_up_to_the_limit_then_summed_up_once(flooded)


@pytest.mark.parametrize(
    "table",
    [
        {"notify_limit_count": 0},
        {"notify_limit_count": -1},
        {"notify_limit_count": 1.5},
        {"notify_limit_count": True},
        {"notify_limit_count": 10_000_001},
        {"notify_limit_seconds": 0},
        {"notify_limit_seconds": "10m"},
        {"notify_limit_seconds": 86_401},
        {"max_decisions": 1001},
        {"max_decisions": 10**9},
    ],
)
def test_bad_notification_limits_are_refused_naming_the_setting(table):
    [key] = table
    with pytest.raises(SettingsError, match=f"signals.alerts.{key}"):
        AlertSettings.from_mapping(table, env={})


def test_the_notification_limit_has_safe_defaults():
    settings = AlertSettings.from_mapping({})
    assert (settings.notify_limit_count, settings.notify_limit_seconds) == (LIMIT, WINDOW)
    assert settings.max_decisions == 50


def test_a_webhook_body_is_bounded_whatever_the_alert_names(sqlite_url, receivers):  # noqa: F811
    """Alerts whose name and principal are the longest and costliest to write as JSON, with
    the most decision ids kept, told to 200 fallback recipients; another escalated to an owner
    (the longest) with 1,000 managers: each body lists the first 10 recipients and says how
    many more, and stays within `alert_webhooks.MAX_BODY_BYTES` plus twice the alert's URL.
    The alerts keep every recipient and manager (who may acknowledge)."""
    receiver = Receiver()
    url = receivers(receiver)
    owner = Entity("User", '"' * 512)
    owned = Entity("Agent", "c1")
    managers = [Entity("User", f"{i:04d}" + '"' * 760) for i in range(1000)]
    facts = FactStore(Database(sqlite_url))
    try:
        facts.apply(
            [("has_relation", owned, "owner", owner)]
            + [("manager", owner, manager) for manager in managers],
            [],
        )
    finally:
        facts.db.close()
    now = [time.time()]
    fallback = tuple(f"{i:03d}" + "\u202e" * 125 for i in range(200))
    settings = AlertSettings.from_mapping({"max_decisions": DECISIONS}, env={})
    alerts = alerts_with_webhooks(
        sqlite_url,
        url,
        max_decisions=settings.max_decisions,
        fallback_recipients=tuple(repr(Entity("User", name)) for name in fallback),
    )
    alerts.clock = lambda: now[0]
    try:
        name = "\U000e0041" * MAX_NAME
        unowned = Entity("Agent", "\x01" * 3000)
        first = alerts.raise_alert(name, "critical", unowned, "d0")
        second = alerts.raise_alert(name, "critical", owned, "d0")
        for principal in (unowned, owned):
            for i in range(DECISIONS + 5):
                assert alerts.count_again(name, "critical", principal, f"{i:032x}")
        alerts.write_repeats()
        now[0] += alerts.settings.escalate_after_seconds + 1
        escalated = {a.id: a for a in alerts.escalate_due()}
        assert len(escalated[second.id].escalated_to) == 1000  # the alert keeps them all
        assert len(escalated[first.id].escalated_to) == 200
        assert len(escalated[first.id].decision_ids) == DECISIONS
        for alert in (first, second):
            deliver(alerts.webhooks, alert.id)
        # At least once (docs/signals.md): a notification in flight when the first run's sender
        # closed is sent again by the next run, the same body under the same delivery id, on
        # which a receiver deduplicates.
        told: dict[str, dict] = {}
        for body in (json.loads(r.body) for r in receiver.got if r.verified):
            assert told.setdefault(body["delivery"], body) == body
        bodies = list(told.values())
        assert len(bodies) == 4
        for body in bodies:
            if (body["alert"]["id"], body["event"]) == (second.id, "alert.raised"):
                assert body["alert"]["recipients"] == [repr(owner)]
                assert body["alert"]["more_recipients"] == 0
                continue
            recipients, more = body["alert"]["recipients"], body["alert"]["more_recipients"]
            assert len(recipients) == LISTED and f"and {more} more" in body["text"]
            if body["alert"]["id"] == second.id and body["event"] == "alert.escalated":
                assert recipients == sorted(repr(m) for m in managers)[:LISTED]
                assert more == 1000 - LISTED
            elif body["alert"]["id"] == first.id:
                assert recipients == list(alerts.settings.fallback_recipients[:LISTED])
                assert more == 200 - LISTED
        from bastion.signals.alert_webhooks import MAX_BODY_BYTES

        for sent in receiver.got:
            link = alerts.url(json.loads(sent.body)["alert"]["id"])
            assert len(sent.body) <= MAX_BODY_BYTES + 2 * len(link)
    finally:
        alerts.store.db.close()


def test_a_max_decisions_past_its_bound_stops_the_server_from_starting(tmp_path):
    from bastion.server.app import create_app
    from bastion.server.config import ConfigError, ServerConfig
    from tests.approvals.support import config as approvals_config

    toml = tmp_path / "bastion.toml"
    toml.write_text(
        approvals_config("http://127.0.0.1:9", str(tmp_path / "b.db"), tmp_path / "keys")
        + "\n[signals.alerts]\nmax_decisions = 1000000\n"
    )
    with pytest.raises(ConfigError, match="signals.alerts.max_decisions"):
        create_app(ServerConfig.load(toml))


def test_without_webhooks_nothing_is_counted_against_the_limit(sqlite_url):
    """The limit counts notifications: alerts told to nobody take no row of it."""
    alerts = Alerts(
        AlertStore(Database(sqlite_url)),
        AlertSettings(),
        lambda: Authorizer(""),
        "https://bastion.test",
    )
    try:
        for i in range(3):
            alerts.raise_alert(f"quiet{i}", "low", Entity("Agent", "c1"))
        assert alerts.store.db.execute("SELECT * FROM alert_notification_windows") == []
    finally:
        alerts.store.db.close()
