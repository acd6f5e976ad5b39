"""The audit retention (`bastion.audit.retention.prune`: the server's hourly task and `bastion
audit prune`) deletes, besides audit events and decision records, every row that grows with use
and is over: finished webhook deliveries and their attempts, approval requests and their answers,
alerts, ended tasks and expired OAuth grants, once all they record is older than
``audit_retention_days``. What is newer, or still in use, stays. On a real SQLite file and a real
PostgreSQL."""

from __future__ import annotations

import logging
import time
import uuid

import pytest

from bastion import Authorizer
from bastion.approvals.store import Answer, ApprovalStore
from bastion.audit import AuditLog
from bastion.audit.retention import prune, prune_forever
from bastion.db import Database
from bastion.delegation.tasks import Task, TaskStore
from bastion.oauth.store import Client, Grant, OAuthStore
from bastion.signals.alerts import Alerts, AlertSettings, AlertStore
from bastion.webhooks import DELIVERED, FAILED, Attempt, Outbox, Webhook, WebhookDelivery
from tests.outage_rounds import logged, through_a_cut
from tests.relays import Relay

DAY = 86_400.0
NOW = time.time()
OLD = NOW - 40 * DAY  # older than the 30 days kept below
NEW = NOW - 10 * DAY


@pytest.fixture
def db(database_url):
    db = Database(database_url)
    yield db
    db.close()


def pruned_rows(db: Database) -> dict[str, int]:
    """What the one ``audit.pruned`` event says was deleted from the tables besides the trail."""
    [event] = AuditLog(db).events("audit.pruned")
    return event.detail["rows_deleted"]


# -- webhook deliveries ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["approval_webhook", "alert_webhook"])
def test_finished_webhook_deliveries_and_their_attempts_go_after_the_retention(db, name):
    hook = Webhook("http://127.0.0.1:9/hook", b"s" * 32)
    at = [OLD]
    outbox = Outbox(name, WebhookDelivery(webhooks=(hook,)), db, clock=lambda: at[0])

    def delivery(subject: str, when: float, state: str | None) -> None:
        at[0] = when
        outbox.enqueue(subject, lambda delivery_id: {"event": "x", "id": delivery_id})
        if state is None:
            return  # still pending
        [claimed] = outbox._claim(1)
        for n in (1, 2):  # two attempts, the second ends it
            attempt = Attempt(claimed.id, subject, hook.label, n, 500, "", when)
            assert outbox._record(attempt, state if n == 2 else "pending", 0.0)

    delivery("old-delivered", OLD, DELIVERED)
    delivery("old-failed", OLD, FAILED)
    delivery("new-delivered", NEW, DELIVERED)
    delivery("old-pending", OLD, None)  # last: nothing claims it here
    prune(db, 30, NOW, actor="test")
    for finished in ("old-delivered", "old-failed"):
        assert outbox.state(finished) == {} and outbox.attempts(finished) == []
    # An unfinished delivery is never deleted (it may still be sent); a newer one is kept.
    assert outbox.state("old-pending") == {hook.label: "pending"}
    assert outbox.state("new-delivered") == {hook.label: DELIVERED}
    assert len(outbox.attempts("new-delivered")) == 2
    assert pruned_rows(db) == {f"{name}_outbox": 2, f"{name}_deliveries": 4}


# -- approval requests ----------------------------------------------------------------------------


def _request(store: ApprovalStore, binding: str, seconds: float = 600.0):
    made, _ = store.create(
        kind="approval",
        binding=binding,
        subject="sam",
        client_id="agent",
        server="desk",
        method="tools/call",
        action="call",
        target='Tool{"desk/delete"}',
        arguments_digest="d",
        arguments={"id": 1},
        policy_version=1,
        decision_id=f"dec-{binding}",
        rules=("r",),
        approvers=("pat",),
        required=1,
        self_forbidden=True,
        window_minutes=0,
        seconds=seconds,
    )
    return made


def test_approval_requests_and_their_answers_go_once_all_of_it_is_older_than_the_retention(db):
    at = [OLD]
    store = ApprovalStore(db, b"k" * 32, clock=lambda: at[0])
    answered = _request(store, "answered")
    store.answer(answered.id, Answer("pat", "approve", 0, "page", "ok", OLD))
    assert store.resolve(answered.id, "approved")
    assert store.use(answered.id, "dec-used", from_status="approved")
    never_answered = _request(store, "never")  # still 'pending', expired long ago
    # Made long ago, but used within the retention: its record stays whole.
    used_lately = _request(store, "lately", seconds=40 * DAY)
    store.answer(used_lately.id, Answer("pat", "approve", 0, "page", "", OLD))
    assert store.resolve(used_lately.id, "approved")
    at[0] = NEW
    assert store.use(used_lately.id, "dec-late", from_status="approved")
    recent = _request(store, "recent")
    store.answer(recent.id, Answer("pat", "deny", 0, "api", "no", NEW))
    prune(db, 30, NOW, actor="test")
    assert store.get(answered.id) is None and store.get(never_answered.id) is None
    assert db.execute(
        "SELECT COUNT(*) FROM approval_answers WHERE request_id = ?", (answered.id,)
    ) == [(0,)]
    assert [a.reason for a in store.get(recent.id).answers] == ["no"]
    assert store.get(used_lately.id).status == "used"
    assert len(store.get(used_lately.id).answers) == 1
    assert pruned_rows(db) == {"approval_requests": 2, "approval_answers": 1}


# -- alerts ---------------------------------------------------------------------------------------


def test_alerts_go_once_raised_acknowledged_and_escalated_before_the_retention(db):
    at = [OLD]
    authz = Authorizer("actor User {}")
    alerts = Alerts(
        AlertStore(db), AlertSettings(), lambda: authz, "https://b", clock=lambda: at[0]
    )
    old = alerts.raise_alert("spike", "high", 'Agent{"a"}')
    alerts.acknowledge(old.id, "pat", "cli")
    unacknowledged = alerts.raise_alert("spike", "high", 'Agent{"b"}')
    acknowledged_lately = alerts.raise_alert("spike", "high", 'Agent{"c"}')
    raised_again_lately = alerts.raise_alert("burst", "high", 'Agent{"d"}')
    at[0] = NEW
    alerts.acknowledge(acknowledged_lately.id, "pat", "page")
    db.execute("UPDATE alerts SET last_at = ? WHERE id = ?", (NEW, raised_again_lately.id))
    recent = alerts.raise_alert("spike", "low", 'Agent{"e"}')
    prune(db, 30, NOW, actor="test")
    kept = {a.id for a in alerts.store.list(limit=100)}
    assert kept == {acknowledged_lately.id, raised_again_lately.id, recent.id}
    assert old.id not in kept and unacknowledged.id not in kept
    assert pruned_rows(db) == {"alerts": 2}


def test_notification_windows_go_once_over_and_summed_up_before_the_retention(db):
    """The count of each window of ``notify_limit_seconds`` (`Alerts._folds`) goes with the
    alerts, once summed up or with nothing folded; one whose summary is not told yet stays."""
    at = [OLD]
    authz = Authorizer("actor User {}")
    summed = []
    alerts = Alerts(
        AlertStore(db),
        AlertSettings(notify_limit_count=1, notify_limit_seconds=600),
        lambda: authz,
        "https://b",
        notify=lambda alert, stage, to: None,
        clock=lambda: at[0],
        notify_folded=summed.append,
    )
    for name in ("a", "b"):  # the second folded
        alerts.raise_alert(name, "high", 'Agent{"a"}')
    at[0] += 1200
    [window] = alerts.tell_folded()
    assert window.folded == 1
    for name in ("c", "d"):  # folded, its summary not told yet
        alerts.raise_alert(name, "high", 'Agent{"a"}')
    unsummed = db.execute("SELECT start FROM alert_notification_windows WHERE summed_at IS NULL")
    at[0] = NEW
    alerts.raise_alert("e", "high", 'Agent{"a"}')
    prune(db, 30, NOW, actor="test")
    kept = db.execute("SELECT start FROM alert_notification_windows ORDER BY start")
    assert kept == [*unsummed, (NEW // 600 * 600,)]
    assert pruned_rows(db) == {"alerts": 4, "alert_notification_windows": 1}


# -- tasks ----------------------------------------------------------------------------------------


def test_tasks_ended_and_cleaned_before_the_retention_go_with_their_grant_bindings(db):
    store = TaskStore(db)

    def task(ended: float | None, cleaned: float | None) -> str:
        task_id = f"task_{uuid.uuid4().hex[:24]}"
        store.insert(Task(task_id, "sam", "agent", "fix it", (), "pat", OLD - DAY, OLD))
        store.add_grant(task_id, uuid.uuid4().hex, OLD - DAY)
        if ended is not None:
            assert store.mark_ended(task_id, ended, "pat", "done")
        if cleaned is not None:
            assert store.mark_cleaned(task_id, cleaned)
        return task_id

    old = task(OLD, OLD)
    not_cleaned = task(OLD, None)  # the sweep has yet to delete its facts and revoke its grants
    ended_lately = task(NEW, NEW)
    prune(db, 30, NOW, actor="test")
    assert store.get(old) is None
    assert db.execute("SELECT COUNT(*) FROM task_grants WHERE task_id = ?", (old,)) == [(0,)]
    assert store.get(not_cleaned) is not None and store.get(ended_lately).grants
    assert pruned_rows(db) == {"tasks": 1, "task_grants": 1}


# -- OAuth grants ---------------------------------------------------------------------------------


def test_expired_grants_go_after_the_retention_and_then_their_self_registered_client(db):
    store = OAuthStore(db)

    def grant(client_id: str, expires_at: float, username: str | None = "sam") -> str:
        grant_id = uuid.uuid4().hex
        store.create_grant(
            Grant(grant_id, client_id, username, "https://mcp", "read", expires_at - DAY,
                  expires_at, None),
            strangers=True,
        )  # fmt: skip
        return grant_id

    client = Client("dyn-1", "c", ("http://127.0.0.1/cb",), ("authorization_code",), "none",
                    None, "dynamic", {}, OLD - 2 * DAY, None)  # fmt: skip
    db.execute(
        "INSERT INTO oauth_open_registrations (client_id, address, registered_at) VALUES (?, ?, ?)",
        ("dyn-1", "192.0.2.1", OLD - 2 * DAY),
    )
    store.save_client(client)
    store.remember_consent("sam", "dyn-1", "https://mcp", "http://127.0.0.1/cb", "read", OLD - DAY)
    old = grant("dyn-1", OLD)
    recent = grant("admin-client", NEW)
    live = grant("admin-client", NOW + DAY)
    # A grant a token still hangs from stays (the token's row goes first, by housekeeping).
    with_token = grant("admin-client", OLD)
    store.save_refresh_token("rt", with_token, OLD - DAY, OLD)
    prune(db, 30, NOW, actor="test")
    assert store.grant(old) is None
    assert all(store.grant(g) is not None for g in (recent, live, with_token))
    assert pruned_rows(db) == {"oauth_grants": 1}
    # With its grants gone, the self-registered client is unused: housekeeping deletes it, and
    # the consent given to it, which a client registered again under its id must not inherit.
    assert store.consented_scope("sam", "dyn-1", "https://mcp", "http://127.0.0.1/cb") == {"read"}
    assert store.forget_unused_clients(NOW - DAY) == 1
    assert store.client("dyn-1") is None
    assert store.consented_scope("sam", "dyn-1", "https://mcp", "http://127.0.0.1/cb") is None


# -- the record -----------------------------------------------------------------------------------


def test_a_prune_that_deletes_nothing_besides_the_trail_records_no_rows(db):
    AuditLog(db, clock=lambda: OLD).record("token.issued", subject="u")
    # The newest event stays, whatever its age, so that its hash chain goes on from it.
    AuditLog(db, clock=lambda: NOW).record("token.issued", subject="u")
    pruned = prune(db, 30, NOW, actor="test")
    assert pruned.events == 1 and pruned.rows == {}
    assert pruned_rows(db) == {}


def test_a_database_outage_is_logged_once_by_the_hourly_prune_not_at_every_round(
    postgres_url, caplog
):
    """The server's prune of the audit trail runs hourly; while the database is away each round
    fails, and that is said once (a warning at every round, before), then once that the round
    works again. Here the rounds are made quick (``interval``); the outage is the test's own: a
    relay to PostgreSQL it cuts."""
    caplog.set_level(logging.DEBUG, logger="bastion.audit")
    with Relay(("127.0.0.1", 5432)) as relay:
        db = Database(postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}"))
        AuditLog(db).record("test.event", actor="test")

        said = logged(caplog, "bastion.audit", "prun")
        try:
            through_a_cut(relay, lambda: prune_forever(db, 30, interval=0.01), said)
        finally:
            db.close()
    loud = said(logging.WARNING)
    assert len(loud) == 2 and "failed" in loud[0] and loud[1].endswith(" again"), loud
