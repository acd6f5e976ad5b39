"""Alerts told through their webhooks, tried as an attacker and as a crash would: a receiver that
verifies as docs/approvals.md shows refuses what was replayed, altered or reordered; the signing
secret is nowhere but in the signature; an alert raised by a process killed (SIGKILL) before its
notification was answered is told after, under the same delivery id; two replicas escalating the
same alert at once on PostgreSQL escalate it once and tell it once, and an acknowledged alert is
escalated by neither. Real receivers (uvicorn), real SQLite and PostgreSQL, a real process."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
import time

import anyio
import httpx

from bastion import Authorizer
from bastion.db import Database
from bastion.facts.model import Entity
from bastion.facts.store import FactStore
from bastion.signals.alert_webhooks import AlertWebhooks
from bastion.signals.alerts import Alerts, AlertSettings, AlertStore
from bastion.webhooks import DELIVERED, PENDING, Webhook
from tests import waits
from tests.approvals.test_webhooks import SECRET, Receiver, receivers  # noqa: F401 (fixture)

AGENT, OWNER, MANAGER = Entity("Agent", "c1"), Entity("User", "pat"), Entity("User", "boss")


def owned(database: str) -> None:
    """The agent's owner and the owner's manager, as stored facts."""
    facts = FactStore(Database(database))
    try:
        facts.apply([("has_relation", AGENT, "owner", OWNER), ("manager", OWNER, MANAGER)], [])
    finally:
        facts.db.close()


def alerts_with_webhooks(database: str, url: str, **values) -> Alerts:
    """A replica's alerts on ``database``, told to the webhook at ``url``."""
    settings = AlertSettings(
        webhooks=(Webhook(url, SECRET),), webhook_backoff_seconds=0.02, **values
    )
    db = Database(database)
    alerts = Alerts(AlertStore(db), settings, lambda: Authorizer(""), "https://bastion.test")
    alerts.webhooks = AlertWebhooks(settings, db, alerts.url, sweep_seconds=0.05)
    alerts.notify = alerts.webhooks.notify
    alerts.notify_folded = alerts.webhooks.notify_folded
    return alerts


def deliver(webhooks: AlertWebhooks, alert_id: str) -> None:
    """Run the sender until every notification of ``alert_id`` is answered."""

    async def run() -> None:
        await webhooks.start()
        try:
            for _ in range(int(waits.PATIENCE / 0.02)):
                states = webhooks.state(alert_id)
                if states and PENDING not in states.values():
                    return
                await anyio.sleep(0.02)
            raise AssertionError(f"never delivered: {webhooks.state(alert_id)}")
        finally:
            await webhooks.close()

    anyio.run(run)


def test_a_receiver_refuses_an_alert_replayed_altered_or_reordered_and_no_secret_shows(
    sqlite_url,
    receivers,  # noqa: F811 (the fixture)
    caplog,
):
    """The notification of an alert verifies once, as sent; posted again by whoever captured it
    more than 5 minutes later, with a byte of its body changed, with its keys in another order
    (the same JSON, other bytes), or under a signature of another time, it does not. Its
    delivery id is in the signed body, so a replay within the 5 minutes under another
    ``Bastion-Delivery`` header is still the same id to a receiver that dedupes on the body's.
    The secret is in no log line, outbox or attempt row, body or alert as the API shows it."""
    caplog.set_level(logging.DEBUG)
    receiver = Receiver()
    url = receivers(receiver)
    alerts = alerts_with_webhooks(sqlite_url, url)
    try:
        alert = alerts.raise_alert("bulk_delete", "critical", AGENT, "d1")
        deliver(alerts.webhooks, alert.id)
        [sent] = receiver.got
        assert sent.verified
        body, headers = sent.body, sent.headers
        assert json.loads(body)["alert"]["id"] == alert.id

        def post(content: bytes, signature: str, clock_offset: float = 0.0, **more) -> int:
            receiver.clock_offset = clock_offset
            answer = httpx.post(
                url,
                content=content,
                headers={
                    "content-type": "application/json",
                    "bastion-signature": signature,
                    **more,
                },
            )
            return answer.status_code

        genuine = headers["bastion-signature"]
        timestamp = int(genuine.split(",")[0].removeprefix("t="))
        reordered = json.dumps(dict(reversed(json.loads(body).items()))).encode()
        assert json.loads(reordered) == json.loads(body) and reordered != body
        altered = body.replace(b'"critical"', b'"low"')
        assert altered != body
        later = genuine.replace(f"t={timestamp}", f"t={timestamp + 3600}")
        assert post(body, genuine) == 200  # within the 5 minutes: the receiver dedupes
        assert post(body, genuine, clock_offset=301) == 401  # replayed later
        assert post(altered, genuine) == 401
        assert post(reordered, genuine) == 401
        assert post(body, later, clock_offset=3600) == 401  # its time moved with it
        again = post(body, genuine, **{"bastion-delivery": "another-id"})
        assert again == 200
        assert json.loads(receiver.got[-1].body)["delivery"] == headers["bastion-delivery"]
        # The secret: in the signature only.
        secret = SECRET.decode()
        db = alerts.store.db
        rows = db.execute("SELECT * FROM alert_webhook_outbox") + db.execute(
            "SELECT * FROM alert_webhook_deliveries"
        )
        assert rows and secret not in repr(rows)
        assert secret not in caplog.text and secret not in body.decode()
        assert secret not in json.dumps(alerts.store.get(alert.id).public())
        assert secret not in repr(alerts.settings)
    finally:
        alerts.store.db.close()


RAISER = """
import asyncio, sys
from bastion import Authorizer, Entity
from bastion.db import Database
from bastion.signals.alert_webhooks import AlertWebhooks
from bastion.signals.alerts import Alerts, AlertSettings, AlertStore
from bastion.webhooks import Webhook

database, url, secret = sys.argv[1:4]
settings = AlertSettings(webhooks=(Webhook(url, secret.encode()),))
db = Database(database)
alerts = Alerts(AlertStore(db), settings, lambda: Authorizer(""), "https://bastion.test")
alerts.webhooks = AlertWebhooks(settings, db, alerts.url, sweep_seconds=0.05)
alerts.notify = alerts.webhooks.notify

async def main():
    await alerts.webhooks.start()
    alert = await asyncio.to_thread(alerts.raise_alert, "bulk_delete", "critical", Entity("Agent", "c1"), "d1")
    print(alert.id, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def test_an_alert_raised_by_a_process_killed_before_it_was_told_is_told_after(
    database_url,
    receivers,  # noqa: F811 (the fixture)
):
    """At least once, as docs/signals.md says: the alert and its notification are one
    transaction, so a process killed (SIGKILL) while its POST waits for an answer leaves the
    notification in the outbox; the next process sends it once the dead one's lease ends,
    under the same delivery id (the receiver saw it twice and dedupes), one delivery recorded."""
    owned(database_url)
    receiver = Receiver()
    receiver.gate.clear()  # the killed process's POST gets no answer
    url = receivers(receiver)
    raiser = subprocess.Popen(
        [sys.executable, "-c", RAISER, database_url, url, SECRET.decode()],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        alert_id = raiser.stdout.readline().strip()
        assert alert_id, "the process raised nothing"
        sending = waits.eventually(
            lambda: receiver.waiting >= 1 or raiser.poll() is not None, every=0.02
        )
        assert sending and raiser.poll() is None, "it never sent"
    finally:
        raiser.send_signal(signal.SIGKILL)
        raiser.wait()
        raiser.stdout.close()
    receiver.gate.set()
    successor = alerts_with_webhooks(database_url, url)
    try:
        assert successor.store.get(alert_id).recipients == (repr(OWNER),)
        assert successor.webhooks.state(alert_id) == {Webhook(url, SECRET).label: PENDING}
        lease = successor.settings.webhook_timeout_seconds + 61
        successor.webhooks.clock = lambda: time.time() + lease  # the dead one's lease ran out
        deliver(successor.webhooks, alert_id)
        assert set(successor.webhooks.state(alert_id).values()) == {DELIVERED}
        assert [a.attempt for a in successor.webhooks.attempts(alert_id)] == [1]
        assert len(receiver.got) == 2 and all(r.verified for r in receiver.got)
        assert len({r.headers["bastion-delivery"] for r in receiver.got}) == 1
        assert {json.loads(r.body)["alert"]["id"] for r in receiver.got} == {alert_id}
    finally:
        successor.store.db.close()


def test_two_replicas_escalating_at_once_escalate_an_alert_once_and_never_an_acknowledged_one(
    postgres_url,
):
    """Both replicas find the same alert due (each read it before either wrote): one escalates
    it and tells the manager, once; the other's conditional update finds it escalated and tells
    nobody. An acknowledged alert is due for neither, however late."""
    owned(postgres_url)
    now = [1000.0]
    told: list[tuple[str, str, tuple]] = []
    replicas = []
    for _ in range(2):
        alerts = Alerts(
            AlertStore(Database(postgres_url)),
            AlertSettings(escalate_after_seconds=300),
            lambda: Authorizer(""),
            "https://bastion.test",
            notify=lambda a, stage, to: told.append((a.id, stage, to)),
            clock=lambda: now[0],
        )
        replicas.append(alerts)
    one, two = replicas
    try:
        alert = one.raise_alert("bulk_delete", "high", AGENT, "d1")
        quiet = two.raise_alert("spike", "high", AGENT, "d2")
        one.acknowledge(quiet.id, "boss", "api")
        now[0] += 301
        # Each replica past its reading of what is due before either updates.
        both_read = threading.Barrier(2, timeout=waits.PATIENCE)
        for alerts in replicas:
            managers = alerts._managers
            alerts._managers = lambda owner, m=managers: (both_read.wait(), m(owner))[1]
        results: list = [None, None]

        def escalate(i: int) -> None:
            results[i] = replicas[i].escalate_due()

        threads = [threading.Thread(target=escalate, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(len(r) for r in results) == [0, 1]
        assert [t for t in told if t[1] == "escalated"] == [
            (alert.id, "escalated", (repr(MANAGER),))
        ]
        escalated = two.store.get(alert.id)
        assert escalated.escalated_to == (repr(MANAGER),) and escalated.escalate_at is None
        now[0] += 100_000
        for alerts in replicas:
            alerts._managers = alerts.__class__._managers.__get__(alerts)
        assert one.escalate_due() == [] and two.escalate_due() == []
        assert two.store.get(quiet.id).escalated_at is None
        assert len(told) == 3  # two raised, one escalated
    finally:
        for alerts in replicas:
            alerts.store.db.close()
