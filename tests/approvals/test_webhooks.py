"""Webhooks against a real local receiver (uvicorn, real HTTP) that checks the signature with its
own code, the code docs/approvals.md gives receivers: delivered and verified, retried with
backoff, not retried when refused, redirects not followed, a forged or tampered notification
refused by the receiver, nothing on the request's path waits for a receiver; and nothing lost
to a restart, a killed process, a database outage or a second replica racing for the outbox."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bastion import Authorizer, Entity
from bastion.approvals.service import Approvals, Call
from bastion.approvals.settings import ApprovalSettings, Webhook, webhook_label
from bastion.approvals.store import ApprovalStore
from bastion.approvals.webhooks import DELIVERED, FAILED, PENDING, WebhookNotifier, payload
from bastion.audit.log import AuditLog
from bastion.db import Database, DatabaseUnavailable
from bastion.facts.store import FactStore
from bastion.server.app import create_app
from bastion.server.config import ConfigError, ServerConfig
from bastion.signals.alerts import AlertSettings
from bastion.webhooks import Attempt
from tests import waits
from tests.clock import ManualClock
from tests.oauth.support import free_socket, serve
from tests.relays import Relay
from tests.waits import PATIENCE

SECRET = b"whsec-the-receivers-own-copy"
ISSUER = "https://bastion.test"

POLICY = """
actor User {}
actor Agent {}
resource Tool {}
allow(_user: User, "call", _tool: Tool);
allow(_agent: Agent, "call", _tool: Tool);
requires_approval(_user: User, "call", Tool{"crm/send"});
"""


# -- the receiver's own code: what docs/approvals.md tells a receiver to do --------------------


def verify(
    secret: bytes, header: str, body: bytes, now: float | None = None, tolerance: int = 300
) -> bool:
    """True if ``header`` (Bastion-Signature) signs ``body`` under ``secret`` and is fresh."""
    try:
        parts = [item.split("=", 1) for item in header.split(",")]
        [timestamp] = [int(value) for key, value in parts if key == "t"]
        given = [value for key, value in parts if key == "v1"]  # two while a secret is rotated
    except ValueError:
        return False
    now = time.time() if now is None else now
    if abs(now - timestamp) > tolerance:
        return False  # too old (a replay) or from the future
    signed = f"{timestamp}.".encode() + body
    expected = hmac.new(secret, signed, hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected, value) for value in given)


def verify_last(secret: bytes, header: str, body: bytes) -> bool:
    """The receiver these docs showed before secrets could be rotated: it reads the header as a
    dictionary, so of two ``v1`` it checks the last."""
    parts = dict(item.split("=", 1) for item in header.split(","))
    signed = f"{parts['t']}.".encode() + body
    expected = hmac.new(secret, signed, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, parts["v1"])


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    verified: bool


@dataclass
class Receiver:
    """A chat tool's incoming webhook: answers 401 to what it cannot verify, else the next of
    ``answers`` (then 200), after ``gate`` is open."""

    secret: bytes = SECRET
    answers: list[int] = field(default_factory=list)
    otherwise: int = 200  # the answer once ``answers`` are used up
    redirect_to: str = ""
    clock_offset: float = 0.0
    gate: threading.Event = field(default_factory=threading.Event)
    got: list[Received] = field(default_factory=list)
    waiting: int = 0

    def __post_init__(self) -> None:
        self.gate.set()

    def app(self) -> Starlette:
        async def hook(request: Request) -> Response:
            body = await request.body()
            ok = verify(
                self.secret,
                request.headers.get("bastion-signature", ""),
                body,
                time.time() + self.clock_offset,
            )
            self.got.append(Received(dict(request.headers), body, ok))
            self.waiting += 1
            await anyio.to_thread.run_sync(self.gate.wait)
            self.waiting -= 1
            if not ok:
                return Response("bad signature", status_code=401)
            if self.redirect_to:
                return Response(status_code=307, headers={"location": self.redirect_to})
            status = self.answers.pop(0) if self.answers else self.otherwise
            return Response(status_code=status)

        return Starlette(routes=[Route("/hook", hook, methods=["POST"])])


@pytest.fixture
def receivers():
    """Start receivers with ``receivers(Receiver(...))`` -> URL of its hook; stopped after."""
    stops = []

    def start(receiver: Receiver) -> str:
        served = serve(receiver.app(), free_socket())
        stops.append((receiver, served))
        return served.__enter__() + "/hook"

    yield start
    for receiver, served in stops:
        receiver.gate.set()
        served.__exit__(None, None, None)


def closed_port_url() -> str:
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there: connections are refused
    return f"http://127.0.0.1:{port}/hook"


# -- the approvals room, on a real database --------------------------------------------------


def settings(*urls: str, **values) -> ApprovalSettings:
    values.setdefault("webhook_backoff_seconds", 0.02)
    # A delivery that must be answered is bounded against a hang only: a busy machine took more
    # than the default 5 s, and the attempt was abandoned and made again. A test of the timeout
    # gives its own.
    values.setdefault("webhook_timeout_seconds", PATIENCE)
    # Some tests hold a hundred calls of one agent, to load the receivers.
    values.setdefault("max_pending_per_agent", 10_000)
    return ApprovalSettings(webhooks=tuple(Webhook(u, SECRET) for u in urls), **values)


def approvals_on(database: str, chosen: ApprovalSettings, sweep_seconds: float = 0.05) -> Approvals:
    db = Database(database)
    authz = Authorizer(POLICY)
    approvals = Approvals(
        ApprovalStore(db, b"k" * 32),
        FactStore(db),
        lambda: authz,
        lambda: 1,
        chosen,
        ISSUER,
        b"b" * 32,
        AuditLog(db),
    )
    approvals.webhooks = WebhookNotifier(chosen, db, approvals.url, sweep_seconds=sweep_seconds)
    approvals.on_new_request.append(approvals.webhooks.notify)
    return approvals


def the_call(arguments: dict | None = None, client_id: str = "bot", subject: str = "sam") -> Call:
    arguments = (
        {"to": "x@example.com", "body": "the quarterly numbers"} if arguments is None else arguments
    )
    return Call(
        "approval",
        subject,
        client_id,
        "crm",
        "tools/call",
        "call",
        Entity("Tool", "crm/send"),
        arguments,
        repr(sorted(arguments.items())),
    )


async def hold(approvals: Approvals, call: Call | None = None):
    """A held call, made in a worker thread as the gateway makes it."""
    call = call or the_call()
    return await anyio.to_thread.run_sync(
        lambda: approvals.hold(call, "d1", ('requires_approval(_, "call", Tool{"crm/send"})',), {})
    )


def state(notifier: WebhookNotifier, request_id: str) -> dict[str, str]:
    """Each webhook's delivery state, by URL (the record names a webhook by its label)."""
    urls = {hook.label: hook.url for hook in notifier.settings.webhooks}
    return {urls[label]: value for label, value in notifier.state(request_id).items()}


async def eventually(check: Callable[[], object], what: str):
    """Wait until ``check()``, asked on a worker thread, is true (`tests.waits.PATIENCE`: a
    deadline against hanging, not a timing assertion)."""
    deadline = time.monotonic() + PATIENCE
    while True:
        found = await anyio.to_thread.run_sync(check)
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.02)


# -- the tests -------------------------------------------------------------------------------


def test_a_new_request_is_posted_signed_and_the_receiver_verifies_it(database_url, receivers):
    receiver = Receiver()
    url = receivers(receiver)
    approvals = approvals_on(database_url, settings(url))
    notifier = approvals.webhooks

    async def scenario():
        await notifier.start()
        try:
            request = await hold(approvals)
            await eventually(lambda: state(notifier, request.id) == {url: DELIVERED}, "delivered")
        finally:
            await notifier.close()
        return request

    request = anyio.run(scenario)
    [got] = receiver.got
    assert got.verified
    assert got.headers["bastion-event"] == "approval.requested"
    assert got.headers["content-type"] == "application/json"
    sent = json.loads(got.body)
    page = f"{ISSUER}/approvals/{request.id}"
    assert sent["approval"] == {
        "id": request.id,
        "kind": "approval",
        "user": "sam",
        "agent": "bot",
        "agents": [],
        "task": "",
        "server": "crm",
        "method": "tools/call",
        "target": 'Tool{"crm/send"}',
        "expires_at": request.expires_at,
        "url": page,
    }
    assert sent["text"].endswith(f"approve or deny at {page}")
    # The event and the delivery id are signed too: a receiver dedupes on the body's id.
    assert sent["event"] == "approval.requested"
    assert sent["delivery"] == got.headers["bastion-delivery"]
    assert sent["text"] == (
        '`bot` for `sam` asks to `tools/call` `Tool{"crm/send"}` on `crm`:'
        f" approve or deny at {page}"
    )
    # Chat tools are not the place for data: the arguments are on the page, after sign-in.
    assert "quarterly" not in got.body.decode() and "x@example.com" not in got.body.decode()
    [attempt] = notifier.attempts(request.id)
    assert (attempt.attempt, attempt.status_code, attempt.error) == (1, 200, "")
    assert attempt.webhook == webhook_label(url) and "/hook" not in attempt.webhook
    assert attempt.delivery_id == got.headers["bastion-delivery"]
    approvals.store.db.close()


def test_a_receiver_that_fails_twice_then_succeeds_gets_three_attempts_all_recorded(
    sqlite_url, receivers
):
    receiver = Receiver(answers=[503, 429, 200])
    url = receivers(receiver)
    approvals = approvals_on(sqlite_url, settings(url))
    notifier = approvals.webhooks

    async def scenario():
        await notifier.start()
        try:
            request = await hold(approvals)
            await eventually(lambda: state(notifier, request.id) == {url: DELIVERED}, "delivered")
        finally:
            await notifier.close()
        return request

    request = anyio.run(scenario)
    attempts = notifier.attempts(request.id)
    assert [(a.attempt, a.status_code) for a in attempts] == [(1, 503), (2, 429), (3, 200)]
    # One delivery, retried: the same id each time (receivers dedupe on it), each signed afresh.
    assert {a.delivery_id for a in attempts} == {
        r.headers["bastion-delivery"] for r in receiver.got
    }
    assert len({a.delivery_id for a in attempts}) == 1
    assert all(r.verified for r in receiver.got) and len(receiver.got) == 3
    # Backoff: each wait at least the first delay, doubled each time.
    gaps = [b.at - a.at for a, b in zip(attempts, attempts[1:], strict=False)]
    assert gaps[0] >= 0.02 and gaps[1] >= 0.04
    approvals.store.db.close()


def test_a_400_is_not_retried_and_5xx_are_until_the_attempts_run_out(sqlite_url, receivers):
    refusing = Receiver(answers=[400])
    failing = Receiver(answers=[500, 502, 503])
    refused_url, failing_url = receivers(refusing), receivers(failing)
    approvals = approvals_on(sqlite_url, settings(refused_url, failing_url, webhook_attempts=3))
    notifier = approvals.webhooks

    async def scenario():
        await notifier.start()
        try:
            request = await hold(approvals)
            await eventually(
                lambda: state(notifier, request.id) == {refused_url: FAILED, failing_url: FAILED},
                "both given up",
            )
        finally:
            await notifier.close()
        return request

    request = anyio.run(scenario)
    attempts = notifier.attempts(request.id)
    assert [a.status_code for a in attempts if a.webhook == webhook_label(refused_url)] == [400]
    assert [a.status_code for a in attempts if a.webhook == webhook_label(failing_url)] == [
        500,
        502,
        503,
    ]
    assert len(refusing.got) == 1 and len(failing.got) == 3
    approvals.store.db.close()


def test_an_attempt_without_an_answer_in_time_is_abandoned_and_retried(sqlite_url, receivers):
    hanging = Receiver()
    hanging.gate.clear()
    url = receivers(hanging)
    approvals = approvals_on(
        sqlite_url, settings(url, webhook_attempts=2, webhook_timeout_seconds=0.5)
    )
    notifier = approvals.webhooks

    async def scenario():
        await notifier.start()
        try:
            request = await hold(approvals)
            await eventually(lambda: state(notifier, request.id) == {url: FAILED}, "given up")
        finally:
            await notifier.close()
        return request

    request = anyio.run(scenario)
    attempts = notifier.attempts(request.id)
    assert [(a.attempt, a.status_code, a.error) for a in attempts] == [
        (1, None, "no answer within 0.5 s"),
        (2, None, "no answer within 0.5 s"),
    ]
    approvals.store.db.close()


def test_a_redirect_is_not_followed_to_wherever_it_points(sqlite_url, receivers):
    elsewhere = Receiver()
    redirecting = Receiver(redirect_to=receivers(elsewhere))
    url = receivers(redirecting)
    approvals = approvals_on(sqlite_url, settings(url))
    notifier = approvals.webhooks

    async def scenario():
        await notifier.start()
        try:
            request = await hold(approvals)
            await eventually(lambda: state(notifier, request.id) == {url: FAILED}, "given up")
        finally:
            await notifier.close()
        return request

    request = anyio.run(scenario)
    assert [a.status_code for a in notifier.attempts(request.id)] == [307]
    assert elsewhere.got == []
    approvals.store.db.close()


def test_a_forged_or_tampered_notification_fails_the_receivers_check(sqlite_url, receivers):
    receiver = Receiver()
    url = receivers(receiver)
    approvals = approvals_on(sqlite_url, settings(url))
    notifier = approvals.webhooks

    async def scenario():
        await notifier.start()
        try:
            request = await hold(approvals)
            await eventually(lambda: state(notifier, request.id) == {url: DELIVERED}, "delivered")
        finally:
            await notifier.close()

    anyio.run(scenario)
    [genuine] = receiver.got
    assert genuine.verified
    signature = genuine.headers["bastion-signature"]
    body = genuine.body
    headers = {"content-type": "application/json", "bastion-signature": signature}
    phished = body.replace(b"https://bastion.test/approvals/", b"https://evil.example/approvals/")
    assert phished != body
    timestamp = int(signature.split(",")[0].removeprefix("t="))
    wrong_key = hmac.new(b"a guess", f"{timestamp}.".encode() + body, "sha256").hexdigest()
    later = str(timestamp + 1)
    moved = hmac.new(SECRET, f"{later}.".encode() + body, "sha256").hexdigest()
    forged = [
        (phished, signature),  # the body changed under a genuine signature
        (body, f"t={timestamp},v1={wrong_key}"),  # signed without the secret
        (body, f"t={later},v1={signature.split('v1=')[1]}"),  # the timestamp moved
        (body, f"t={later},v1={moved[:-1]}"),  # cut short
        (body, f"v1={signature.split('v1=')[1]}"),  # no timestamp
        (body, ""),
    ]
    with httpx.Client() as client:
        for content, header in forged:
            answer = client.post(
                url, content=content, headers={**headers, "bastion-signature": header}
            )
            assert answer.status_code == 401, header
        # The genuine notification sent again later than five minutes is a replay: refused.
        receiver.clock_offset = 301
        assert client.post(url, content=body, headers=headers).status_code == 401
        receiver.clock_offset = 0
        assert client.post(url, content=body, headers=headers).status_code == 200
    assert [r.verified for r in receiver.got] == [True] + [False] * 7 + [True]
    approvals.store.db.close()


def test_a_notifier_that_cannot_reach_anyone_never_holds_up_or_loses_the_request(
    sqlite_url, receivers
):
    hanging = Receiver()
    hanging.gate.clear()  # takes the request and does not answer until the test says so
    hanging_url = receivers(hanging)
    refused_url = closed_port_url()
    approvals = approvals_on(
        sqlite_url,
        settings(hanging_url, refused_url, webhook_attempts=2, webhook_timeout_seconds=600),
    )
    notifier = approvals.webhooks

    async def scenario():
        await notifier.start()
        try:
            request = await hold(approvals)
            # hold() has returned while the receiver still holds its notification unanswered.
            await eventually(lambda: hanging.waiting == 1, "the receiver has the notification")
            assert [a.webhook for a in notifier.attempts(request.id)].count(
                webhook_label(hanging_url)
            ) == 0
            # The request is pending and answerable whatever the webhooks do.
            assert (await anyio.to_thread.run_sync(approvals.get, request.id)).status == "pending"
            answered = await anyio.to_thread.run_sync(
                lambda: approvals.answer(request.id, "sam", "approve", channel="api")
            )
            assert answered.status == "approved"
            assert approvals.check(the_call()).state == "approved"
            await eventually(
                lambda: state(notifier, request.id).get(refused_url) == FAILED, "refused given up"
            )
            hanging.gate.set()
            await eventually(
                lambda: state(notifier, request.id).get(hanging_url) == DELIVERED, "delivered"
            )
        finally:
            await notifier.close()
        return request

    request = anyio.run(scenario)
    refused = [a for a in notifier.attempts(request.id) if a.webhook == webhook_label(refused_url)]
    assert [a.attempt for a in refused] == [1, 2]
    assert all(a.status_code is None and "ConnectError" in a.error for a in refused)
    approvals.store.db.close()


def test_a_request_whose_announcement_cannot_be_queued_is_not_made_either(
    database_url, receivers, monkeypatch
):
    """The request, its audit event and its outbox rows are one transaction. A process killed
    between the request and its outbox rows (here: the rows cannot be written) left a request
    nothing would ever announce: the agent's retry finds it pending, and only a new request is
    announced. Now the call is refused (the gateway's approval_unavailable) with nothing kept,
    and held again, announced, when it comes back."""
    url = receivers(Receiver())
    approvals = approvals_on(database_url, settings(url))
    notifier = approvals.webhooks

    def unwritable(subject_id, body):
        raise DatabaseUnavailable("the outbox cannot be written")

    monkeypatch.setattr(notifier, "enqueue", unwritable)
    with pytest.raises(DatabaseUnavailable):
        approvals.hold(the_call(), "d1", (), {})
    assert approvals.check(the_call()).state == "hold"
    assert approvals.listed() == []
    assert approvals.audit.events(kind_prefix="approval.") == []
    monkeypatch.undo()

    async def scenario():
        await notifier.start()
        try:
            request = await hold(approvals)
            await eventually(lambda: state(notifier, request.id) == {url: DELIVERED}, "delivered")
        finally:
            await notifier.close()

    anyio.run(scenario)
    approvals.store.db.close()


def test_a_restart_resumes_an_unfinished_delivery(database_url, receivers):
    receiver = Receiver(answers=[503])
    url = receivers(receiver)
    # A backoff longer than the sweeps: the retry waits in the outbox. The first process's clock
    # stands still, so the retry is due only after the restart, however long the first process
    # takes to stop (on a busy machine its sweeps took the retry up and sent it before).
    chosen = settings(url, webhook_backoff_seconds=0.5)
    approvals = approvals_on(database_url, chosen)
    first = approvals.webhooks
    first.clock = ManualClock(time.time())

    async def before():
        await first.start()
        try:
            request = await hold(approvals)
            await eventually(lambda: len(first.attempts(request.id)) == 1, "one attempt")
        finally:
            await first.close()
        return request

    request = anyio.run(before)
    assert state(first, request.id) == {url: PENDING}
    # A request made while no sender runs waits in the outbox too.
    later = approvals.hold(the_call({"to": "y@example.com"}), "d2", (), {})
    assert state(first, later.id) == {url: PENDING}
    approvals.store.db.close()

    again = Database(database_url)
    second = WebhookNotifier(chosen, again, lambda i: f"{ISSUER}/approvals/{i}", sweep_seconds=0.05)

    async def after():
        await second.start()
        try:
            for held in (request, later):
                await eventually(
                    lambda held=held: state(second, held.id) == {url: DELIVERED}, "delivered"
                )
        finally:
            await second.close()

    anyio.run(after)
    assert [(a.attempt, a.status_code) for a in second.attempts(request.id)] == [(1, 503), (2, 200)]
    assert [(a.attempt, a.status_code) for a in second.attempts(later.id)] == [(1, 200)]
    assert all(r.verified for r in receiver.got) and len(receiver.got) == 3
    again.close()


def test_a_delivery_is_not_sent_once_its_request_has_expired(sqlite_url, receivers):
    receiver = Receiver()
    url = receivers(receiver)
    chosen = settings(url)
    approvals = approvals_on(sqlite_url, chosen)
    request = approvals.hold(the_call(), "d1", (), {})  # while no sender runs (bastion down)

    class AnHourLater:
        def __call__(self) -> float:
            return time.time() + 3600

    late = WebhookNotifier(chosen, approvals.store.db, approvals.url, clock=AnHourLater())

    async def scenario():
        await late.start()
        try:
            await eventually(lambda: state(late, request.id) == {url: FAILED}, "given up")
        finally:
            await late.close()

    anyio.run(scenario)
    [delivery] = late.deliveries(request.id)
    assert delivery.reason == "the request expired before it could be delivered"
    assert late.attempts(request.id) == [] and receiver.got == []
    approvals.store.db.close()


def test_a_restart_with_fewer_attempts_or_without_the_webhook_ends_what_it_left(
    sqlite_url, receivers
):
    kept, dropped = Receiver(otherwise=503), Receiver(otherwise=503)
    kept_url, dropped_url = receivers(kept), receivers(dropped)
    # The first process's clock moves only when the test moves it: past the first backoff
    # (1 s), never to the third attempts (due 3 s after the first), which a busy machine reached
    # before the test stopped the process.
    before = settings(kept_url, dropped_url, webhook_attempts=5, webhook_backoff_seconds=1.0)
    approvals = approvals_on(sqlite_url, before)
    first = approvals.webhooks
    clock = first.clock = ManualClock(time.time())

    async def until_two_attempts_each():
        await first.start()
        try:
            request = await hold(approvals)
            await eventually(
                lambda: sorted(a.attempt for a in first.attempts(request.id)) == [1, 1],
                "one attempt each",
            )
            clock.now += before.webhook_backoff_seconds
            await eventually(
                lambda: sorted(a.attempt for a in first.attempts(request.id)) == [1, 1, 2, 2],
                "two attempts each",
            )
        finally:
            await first.close()
        return request

    request = anyio.run(until_two_attempts_each)
    after = settings(kept_url, webhook_attempts=2)
    second = WebhookNotifier(after, approvals.store.db, approvals.url, sweep_seconds=0.05)

    async def restarted():
        await second.start()
        try:
            await eventually(lambda: set(second.state(request.id).values()) == {FAILED}, "ended")
        finally:
            await second.close()

    anyio.run(restarted)
    ended = {d.webhook: d.reason for d in second.deliveries(request.id)}
    assert ended == {
        webhook_label(kept_url): "2 attempts made already; webhook_attempts is now 2",
        webhook_label(dropped_url): "this webhook is no longer configured",
    }
    assert len(kept.got) == len(dropped.got) == 2  # nothing sent after the restart
    approvals.store.db.close()


def test_a_full_queue_keeps_the_rest_in_the_database_until_there_is_room(sqlite_url, receivers):
    receiver = Receiver()
    receiver.gate.clear()
    url = receivers(receiver)
    approvals = approvals_on(sqlite_url, settings(url, webhook_queue_size=1))
    notifier = approvals.webhooks

    async def scenario():
        await notifier.start()
        try:
            held = [await hold(approvals, the_call({"n": n})) for n in range(3)]
            await eventually(lambda: receiver.waiting == 1, "the first is being sent")
            # Sweeps (each request wakes one) that must not take more than the queue holds.
            swept = notifier.sweeps
            await eventually(lambda: notifier.sweeps >= swept + 3, "three more sweeps")
            assert receiver.waiting == 1 and len(receiver.got) == 1
            assert [state(notifier, r.id) for r in held] == [{url: PENDING}] * 3
            receiver.gate.set()
            for r in held:
                await eventually(lambda r=r: state(notifier, r.id) == {url: DELIVERED}, "sent")
        finally:
            await notifier.close()

    anyio.run(scenario)
    assert len(receiver.got) == 3 and all(r.verified for r in receiver.got)
    approvals.store.db.close()


def test_names_an_agent_or_upstream_chooses_cannot_add_mentions_or_links_to_the_chat_text(
    sqlite_url, receivers
):
    receiver = Receiver()
    url = receivers(receiver)
    approvals = approvals_on(sqlite_url, settings(url))
    notifier = approvals.webhooks
    agent = (
        "<!channel> `@here` [approve](https://evil.example/a) <https://evil.example|approve>\u202e"
    )

    async def scenario():
        await notifier.start()
        try:
            # The agent calls for another agent, whose name is as hostile: both are shown.
            call = dataclasses.replace(the_call(client_id=agent), agents=(agent + " 2", agent))
            request = await hold(approvals, call)
            await eventually(lambda: state(notifier, request.id) == {url: DELIVERED}, "delivered")
        finally:
            await notifier.close()

    anyio.run(scenario)
    sent = json.loads(receiver.got[0].body)
    text = sent["text"]
    # Each name is escaped (and cut, with a mark): only the marks hold parentheses.
    for mark in ("<", ">", "[", "]", "(", ")", "@", "!", "|", "\u202e"):
        assert mark not in re.sub(r"\u2026 \(\d+ more characters\)`", "`", text), mark
    # Outside code spans the only link is the request's page: a name cannot close its span.
    plain = re.sub(r"`[^`]*`", "", text)
    assert re.findall(r"https?://\S+", plain) == [sent["approval"]["url"]]
    # The calling agent, and the one it works for.
    assert text.count("`\\u003c\\u0021channel\\u003e \\u0060\\u0040here\\u0060") == 2, text
    # The JSON keeps the names as they are, for a receiver that builds its own message.
    assert sent["approval"]["agent"] == agent
    assert sent["approval"]["agents"] == [agent + " 2", agent]
    [made] = approvals.audit.events(kind="approval.requested")
    assert made.detail["agents"] == [agent + " 2", agent]
    approvals.store.db.close()


@pytest.mark.parametrize(
    ("name", "reads"),
    [
        ("sam@example.com", "`sam@example.com`"),  # a user id as most providers give it
        ("ops.é@example.com", "`ops.é@example.com`"),
        ("@channel", "`\\u0040channel`"),
        ("sam @here", "`sam \\u0040here`"),
        ("sam_@here", "`sam_\\u0040here`"),
        ("\u200b@here", "`\\u200b\\u0040here`"),  # after an escape, not after a letter
        ("x\\u0040y", "`x\\\\u0040y`"),  # the text of an escape is not taken for one
    ],
)
def test_an_at_sign_reads_as_written_in_an_address_and_escaped_where_it_could_mention(name, reads):
    from bastion.webhooks import shown

    assert shown(name) == reads


def test_two_requests_from_different_users_or_agents_never_read_the_same_in_the_chat_text(
    sqlite_url,
):
    """A character the chat text cannot show as it is (markup, a direction or zero-width
    character) is shown as its escape, so ``mallory\\u202egnp.exe`` is not read as another user,
    and a long name is cut with a mark that says so."""
    approvals = approvals_on(sqlite_url, settings())
    whos = [
        ("mallory\u202egnp.exe", "bot"),
        ("mallory\u200bgnp.exe", "bot"),
        ("mallory?gnp.exe", "bot"),
        ("sam", "Trusted Bot<1>"),
        ("sam", "Trusted Bot[1]"),
        ("sam", "x" * 300 + "-one"),
    ]

    async def scenario():
        return [await hold(approvals, the_call(subject=u, client_id=a)) for u, a in whos]

    held = anyio.run(scenario)
    texts = [payload(r, "https://bastion.example/approvals/x", "d")["text"] for r in held]
    assert len(set(texts)) == len(texts), texts
    assert "`mallory\\u202egnp.exe`" in texts[0] and "\u202e" not in texts[0]
    assert "`Trusted Bot\\u003c1\\u003e`" in texts[3]
    assert "x" * 200 not in texts[5] and "\u2026 (" in texts[5]
    approvals.store.db.close()


def test_a_result_held_for_review_is_announced_without_the_result(sqlite_url, receivers):
    receiver = Receiver()
    url = receivers(receiver)
    approvals = approvals_on(sqlite_url, settings(url))
    notifier = approvals.webhooks
    review = dataclasses.replace(the_call(), kind="review")

    async def scenario():
        await notifier.start()
        try:
            request = await anyio.to_thread.run_sync(
                lambda: approvals.hold(review, "d1", (), {}, result={"ssn": "078-05-1120"})
            )
            await eventually(lambda: state(notifier, request.id) == {url: DELIVERED}, "delivered")
        finally:
            await notifier.close()
        return request

    request = anyio.run(scenario)
    sent = json.loads(receiver.got[0].body)
    assert sent["approval"]["kind"] == "review"
    assert sent["text"].endswith(
        f"held for review: release or withhold it at {ISSUER}/approvals/{request.id}"
    )
    assert b"078-05-1120" not in receiver.got[0].body
    approvals.store.db.close()


def test_a_webhook_whose_secret_variable_is_unset_is_a_clear_configuration_error():
    table = {"webhooks": [{"url": "https://chat.example.com/h", "secret_env": "HOOK_SECRET"}]}
    with pytest.raises(ConfigError, match=r"approvals.webhooks\[0\].secret_env.*'HOOK_SECRET'"):
        ApprovalSettings.from_mapping(table, env={})
    with pytest.raises(ConfigError, match="HOOK_SECRET"):
        ApprovalSettings.from_mapping(table, env={"HOOK_SECRET": ""})
    chosen = ApprovalSettings.from_mapping(table, env={"HOOK_SECRET": "s3cret-s3cret-s3cret"})
    assert chosen.webhooks == (Webhook("https://chat.example.com/h", b"s3cret-s3cret-s3cret"),)


SECRET_ENV = {"HOOK_SECRET": "0123456789abcdef0123", "HOOK_URL": "https://hooks.example.com/T/B/x"}


@pytest.mark.parametrize(
    ("hook", "env", "message"),
    [
        # A secret that one signed notification lets anyone guess offline.
        ({"url": "https://a.example/h", "secret_env": "SHORT"}, {"SHORT": "x" * 15}, "at least 16"),
        # Written in the file, where every reader of the configuration sees it.
        (
            {"url": "https://a.example/h", "secret": "0123456789abcdef"},
            {},
            "belongs in an environment variable",
        ),
        ({"url": "https://a.example/h", "secret_env": "HOOK_SECRET", "retries": 3}, {}, "retries"),
        ({"url": "ftp://a.example/h", "secret_env": "HOOK_SECRET"}, {}, "http"),
        ({"url": "https://", "secret_env": "HOOK_SECRET"}, {}, "no host"),
        (
            {"url": "https://a.example/h", "url_env": "HOOK_URL", "secret_env": "HOOK_SECRET"},
            {},
            "one of",
        ),
        ({"url_env": "UNSET", "secret_env": "HOOK_SECRET"}, {}, r"url_env.*'UNSET' is not set"),
        ({"secret_env": "HOOK_SECRET"}, {}, "needs url"),
        ("https://a.example/h", {}, "needs url"),
    ],
)
def test_a_webhook_configured_wrong_is_a_clear_error_that_names_it(hook, env, message):
    with pytest.raises(ConfigError, match=r"approvals.webhooks\[0\]") as refused:
        ApprovalSettings.from_mapping({"webhooks": [hook]}, env={**SECRET_ENV, **env})
    assert re.search(message, str(refused.value)), str(refused.value)


NEW_SECRET = b"the-new-secret-0123456789"


def test_while_a_secret_is_rotated_each_notification_verifies_under_the_old_and_the_new(
    sqlite_url, receivers
):
    """A receiver moved to the new secret, one still on the old (even one that reads only the
    last ``v1``), and none on any other secret."""
    moved, staying, stranger = Receiver(NEW_SECRET), Receiver(SECRET), Receiver(b"x" * 32)
    urls = [receivers(moved), receivers(staying), receivers(stranger)]
    chosen = settings(webhook_attempts=1)
    hooks = tuple(Webhook(url, NEW_SECRET, previous_secret=SECRET) for url in urls)
    approvals = approvals_on(sqlite_url, dataclasses.replace(chosen, webhooks=hooks))
    notifier = approvals.webhooks

    async def scenario():
        await notifier.start()
        try:
            request = await hold(approvals)
            done = {urls[0]: DELIVERED, urls[1]: DELIVERED, urls[2]: FAILED}
            await eventually(lambda: state(notifier, request.id) == done, "answered")
        finally:
            await notifier.close()

    anyio.run(scenario)
    assert [r.got[0].verified for r in (moved, staying, stranger)] == [True, True, False]
    got = staying.got[0]
    header = got.headers["bastion-signature"]
    assert header.count(",v1=") == 2
    assert verify_last(SECRET, header, got.body) and not verify_last(NEW_SECRET, header, got.body)
    approvals.store.db.close()


def test_a_previous_secret_is_read_like_the_secret_and_refused_alike():
    hook = {"url": "https://a.example/h", "secret_env": "NEW", "previous_secret_env": "OLD"}
    env = {"NEW": NEW_SECRET.decode(), "OLD": SECRET.decode()}
    [chosen] = ApprovalSettings.from_mapping({"webhooks": [hook]}, env=env).webhooks
    assert (chosen.secret, chosen.previous_secret) == (NEW_SECRET, SECRET)
    assert SECRET.decode() not in repr(chosen)
    for wrong, message in [
        ({"OLD": "x" * 15}, r"previous_secret_env: the secret in OLD is 15 bytes"),
        ({"OLD": ""}, r"previous_secret_env must name .*'OLD' is not set"),
        ({"OLD": NEW_SECRET.decode()}, "names the same secret as secret_env"),
    ]:
        with pytest.raises(ConfigError, match=message):
            ApprovalSettings.from_mapping({"webhooks": [hook]}, env={**env, **wrong})


def test_a_webhook_url_may_come_from_the_environment_and_is_never_shown_whole():
    table = {
        "webhooks": [
            {"url_env": "HOOK_URL", "secret_env": "HOOK_SECRET"},
            {"url": "https://hooks.example.com/T/B/x", "secret_env": "HOOK_SECRET"},
        ]
    }
    with pytest.raises(ConfigError, match=r"webhooks\[1\].url names the same URL"):
        ApprovalSettings.from_mapping(table, env=SECRET_ENV)
    chosen = ApprovalSettings.from_mapping({"webhooks": table["webhooks"][:1]}, env=SECRET_ENV)
    [hook] = chosen.webhooks
    assert hook.url == "https://hooks.example.com/T/B/x"
    # The path holds the chat tool's token: records, logs and reprs show only the origin.
    assert hook.label.startswith("https://hooks.example.com/…#")
    for shown in (hook.label, repr(hook), repr(chosen)):
        assert "T/B/x" not in shown and "0123456789" not in shown
    # Nor a user and password written into the URL.
    assert webhook_label("https://me:pw@h.example:8443/T/x?k=1").startswith(
        "https://h.example:8443/…#"
    )


@pytest.mark.parametrize("size", [0, -1, 1.5, "10", True])
def test_the_queue_size_must_be_a_positive_whole_number(size):
    with pytest.raises(ConfigError, match="webhook_queue_size"):
        ApprovalSettings.from_mapping({"webhook_queue_size": size}, env={})
    assert ApprovalSettings.from_mapping({"webhook_queue_size": 5}, env={}).webhook_queue_size == 5


def test_a_server_with_webhooks_configured_sends_them_from_start_to_shutdown(
    tmp_path, receivers, monkeypatch
):
    receiver = Receiver()
    url = receivers(receiver)
    monkeypatch.setenv("TEST_HOOK_SECRET", SECRET.decode())
    sock = free_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    policy = tmp_path / "policy.polar"
    policy.write_text(POLICY)
    config = ServerConfig(
        database=str(tmp_path / "bastion.db"),
        policy_file=str(policy),
        oauth={
            "issuer": base,
            "key_dir": str(tmp_path / "keys"),
            "resources": [{"uri": f"{base}/mcp/crm", "scopes": ["crm"]}],
        },
        gateway={"upstreams": [{"name": "crm", "url": closed_port_url()}]},
        approvals={
            "webhooks": [{"url": url, "secret_env": "TEST_HOOK_SECRET"}],
            "webhook_backoff_seconds": 0.02,
        },
    )
    app = create_app(config)
    approvals = app.state.approvals
    assert approvals.webhooks is not None
    with serve(app, sock):
        # As the gateway does: the request is made in a worker thread of the server.
        request = approvals.hold(the_call(), "d1", (), {})
        sent = waits.eventually(
            lambda: state(approvals.webhooks, request.id) == {url: DELIVERED}, every=0.02
        )
        assert sent, "the server never sent the notification"
    [got] = receiver.got
    assert got.verified
    assert json.loads(got.body)["approval"]["url"] == f"{base}/approvals/{request.id}"


def test_two_replicas_on_one_database_send_each_notification_once(postgres_url, receivers):
    receiver = Receiver()
    url = receivers(receiver)
    chosen = settings(url, webhook_queue_size=4)
    approvals = approvals_on(postgres_url, chosen)
    other_db = Database(postgres_url)
    replicas = [
        approvals.webhooks,
        WebhookNotifier(chosen, other_db, approvals.url, sweep_seconds=0.05),
    ]

    # Made while neither runs: at start both find all twenty in the outbox and race for them.
    held = [approvals.hold(the_call({"n": n}), "d", (), {}) for n in range(20)]

    async def scenario():
        await asyncio.gather(*(replica.start() for replica in replicas))
        try:
            for request in held:
                await eventually(
                    lambda r=request: DELIVERED in state(replicas[0], r.id).values(), "sent"
                )
        finally:
            for replica in replicas:
                await replica.close()

    anyio.run(scenario)
    ids = [r.headers["bastion-delivery"] for r in receiver.got]
    # Each delivery went out once, whichever replica took it.
    assert len(ids) == len(set(ids)) == len(held) == 20
    assert all(r.verified for r in receiver.got)
    approvals.store.db.close()
    other_db.close()


# A bastion process's sender, alone: started, then killed by the test while it sends.
SENDER = """
import asyncio, sys
from bastion.approvals.settings import ApprovalSettings, Webhook
from bastion.approvals.webhooks import WebhookNotifier
from bastion.db import Database, DatabaseUnavailable

database, url, secret = sys.argv[1:4]
chosen = ApprovalSettings(webhooks=(Webhook(url, secret.encode()),))

async def main():
    await WebhookNotifier(chosen, Database(database), str, sweep_seconds=0.05).start()
    await asyncio.Event().wait()

asyncio.run(main())
"""


def test_a_delivery_under_way_when_its_process_is_killed_is_sent_once_its_lease_ends(
    sqlite_url, receivers
):
    receiver = Receiver()
    receiver.gate.clear()
    url = receivers(receiver)
    chosen = settings(url)
    approvals = approvals_on(sqlite_url, chosen)
    request = approvals.hold(the_call(), "d1", (), {})
    sender = subprocess.Popen([sys.executable, "-c", SENDER, sqlite_url, url, SECRET.decode()])
    try:
        # Until the killed process's POST is under way.
        sending = waits.eventually(
            lambda: receiver.waiting >= 1 or sender.poll() is not None, every=0.02
        )
        assert sending and sender.poll() is None, "it never sent"
    finally:
        sender.send_signal(signal.SIGKILL)
        sender.wait()
    receiver.gate.set()
    assert approvals.webhooks.attempts(request.id) == []  # it died before any record

    class Movable:
        offset = 0.0

        def __call__(self) -> float:
            return time.time() + self.offset

    clock = Movable()
    successor = WebhookNotifier(
        chosen, approvals.store.db, approvals.url, clock=clock, sweep_seconds=0.05
    )

    async def scenario():
        await successor.start()
        try:
            # While the dead process's lease lasts, sweeps leave its delivery alone.
            await eventually(lambda: successor.sweeps >= 3, "three sweeps")
            assert state(successor, request.id) == {url: PENDING} and len(receiver.got) == 1
            clock.offset = chosen.webhook_timeout_seconds + 61  # the lease has run out
            await eventually(lambda: state(successor, request.id) == {url: DELIVERED}, "sent")
        finally:
            await successor.close()

    anyio.run(scenario)
    assert [(a.attempt, a.status_code) for a in successor.attempts(request.id)] == [(1, 200)]
    # At least once: the receiver saw it twice, under one delivery id, and dedupes.
    assert len({r.headers["bastion-delivery"] for r in receiver.got}) == 1
    assert len(receiver.got) == 2 and all(r.verified for r in receiver.got)
    approvals.store.db.close()


def test_a_database_outage_while_a_delivery_is_under_way_loses_nothing(outage, receivers, caplog):
    receiver = Receiver(answers=[503])
    url = receivers(receiver)
    role = outage.role()
    chosen = settings(url, webhook_backoff_seconds=0.5)
    # Sweeps further apart than the backoff: the second attempt waits for its time in memory,
    # and is sent while the database is away, which goes as soon as the first attempt is
    # recorded (taken away by the test once it saw that record, it was still there when a busy
    # machine sent the second).
    approvals = approvals_on(outage.url(role), chosen, sweep_seconds=1.0)
    notifier = approvals.webhooks
    record = notifier._record

    def recorded_then_the_database_goes(attempt: Attempt, state: str, delay: float) -> bool:
        kept = record(attempt, state, delay)
        if attempt.attempt == 1:
            outage.block(role)
        return kept

    notifier._record = recorded_then_the_database_goes

    def failed_to_record() -> bool:
        return any("could not record attempt 2" in r.getMessage() for r in caplog.records)

    async def scenario():
        await notifier.start()
        try:
            request = await hold(approvals)
            await eventually(lambda: len(receiver.got) == 2, "second attempt sent")
            await eventually(failed_to_record, "the record of it refused")
            await anyio.to_thread.run_sync(outage.unblock, role)

            def delivered() -> bool:
                try:
                    return state(notifier, request.id) == {url: DELIVERED}
                except DatabaseUnavailable:
                    return False  # not back yet

            await eventually(delivered, "recorded")
        finally:
            await notifier.close()
        return request

    with caplog.at_level("WARNING", logger="bastion.approvals.webhooks"):
        request = anyio.run(scenario)
    assert [(a.attempt, a.status_code) for a in notifier.attempts(request.id)] == [
        (1, 503),
        (2, 200),
    ]
    # The sender waited for the database rather than send the delivered notification again.
    assert [r.verified for r in receiver.got] == [True, True]
    approvals.store.db.close()


def test_a_database_outage_is_logged_once_by_the_sender_not_at_every_retry(
    postgres_url, receivers, caplog
):
    """A sender that cannot record an attempt (the database is away) tries again every sweep,
    and looks for work in the outbox every sweep: each failing step is logged once per outage,
    not at each retry (a warning per delivery every 5 s for as long as it lasted), and once
    that it works again. The outage is the test's own: a relay to PostgreSQL it cuts."""
    caplog.set_level(logging.DEBUG, logger="bastion.webhooks")
    receiver = Receiver(answers=[503])
    url = receivers(receiver)
    with Relay(("127.0.0.1", 5432)) as relay:
        relayed = postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}")
        # A backoff within a sweep: the second attempt waits for its time in memory.
        chosen = settings(url, webhook_backoff_seconds=0.005)
        approvals = approvals_on(relayed, chosen, sweep_seconds=0.01)
        notifier = approvals.webhooks
        record = notifier._record

        def recorded_then_the_database_goes(attempt: Attempt, state: str, delay: float) -> bool:
            kept = record(attempt, state, delay)
            if attempt.attempt == 1:
                relay.cut()
            return kept

        notifier._record = recorded_then_the_database_goes

        def said(about: str, level: int = logging.DEBUG) -> list[str]:
            return [
                r.getMessage()
                for r in caplog.records
                if r.name == "bastion.webhooks" and r.levelno >= level and about in r.getMessage()
            ]

        async def scenario():
            await notifier.start()
            try:
                request = await hold(approvals)
                # The second attempt is sent, and its record refused round after round.
                await eventually(lambda: len(said("attempt 2")) >= 6, "retries")
                assert len(said("attempt 2", logging.WARNING)) == 1, said("attempt 2")
                assert len(said("outbox", logging.WARNING)) <= 1, said("outbox")
                relay.restore()

                def delivered() -> bool:
                    try:
                        return state(notifier, request.id) == {url: DELIVERED}
                    except DatabaseUnavailable:
                        return False  # not back yet

                await eventually(delivered, "recorded")
                # The attempt's record may be back before a sweep has read the outbox again
                # (CI closed the sender in between once, the outage said without its end).
                await eventually(lambda: not notifier._outbox_outage.failing, "outbox read")
            finally:
                await notifier.close()
            return request

        try:
            request = anyio.run(scenario)
            assert [(a.attempt, a.status_code) for a in notifier.attempts(request.id)] == [
                (1, 503),
                (2, 200),
            ]
        finally:
            approvals.store.db.close()
    loud = said("", logging.WARNING)
    recorded = [line for line in loud if "record" in line]
    assert len(recorded) == 2 and "again" in recorded[1], loud
    assert len([line for line in loud if "outbox" in line]) in (0, 2), loud


def test_a_receiver_that_never_answers_cannot_hold_up_another_webhooks_deliveries(
    sqlite_url, receivers
):
    # A receiver whose connections are accepted (by the kernel) and never answered: each
    # delivery to it holds a connection until webhook_timeout_seconds. More of them at once than
    # a shared connection pool holds left the other webhook's deliveries waiting for a
    # connection until they too ran out of time. That time is PATIENCE: the answering one's 150
    # deliveries took more than 3 s on a busy machine, and failed at their only attempt.
    tarpit = free_socket()
    tarpit.listen(1024)
    stuck = f"http://127.0.0.1:{tarpit.getsockname()[1]}/hook"
    receiver = Receiver()
    url = receivers(receiver)
    approvals = approvals_on(sqlite_url, settings(stuck, url, webhook_attempts=1))
    notifier = approvals.webhooks

    async def scenario():
        # Made while no sender runs: the sender starts with all of them to send at once.
        held = [await hold(approvals, the_call({"n": n})) for n in range(150)]
        await notifier.start()
        try:
            for r in held:
                await eventually(
                    lambda r=r: state(notifier, r.id)[url] != PENDING, "the answering one ended"
                )
        finally:
            await notifier.close()
        return held

    held = anyio.run(scenario)
    tarpit.close()
    ended = [state(notifier, r.id)[url] for r in held]
    assert ended == [DELIVERED] * 150, ended.count(FAILED)
    assert len(receiver.got) == 150
    approvals.store.db.close()


def test_a_receiver_that_keeps_failing_cannot_fill_the_queue_with_its_retries(
    sqlite_url, receivers
):
    # A receiver that answers 503 to everything, under a long backoff: each of its deliveries
    # waits a minute for its next attempt. Waiting in memory, they held every slot of the queue
    # and the other webhook's deliveries waited in the outbox behind them (until the requests
    # expired, then were never sent).
    failing = Receiver(otherwise=503)
    receiver = Receiver()
    failing_url, url = receivers(failing), receivers(receiver)
    approvals = approvals_on(
        sqlite_url,
        settings(
            failing_url,
            url,
            webhook_queue_size=4,
            webhook_attempts=3,
            webhook_backoff_seconds=60.0,
        ),
    )
    notifier = approvals.webhooks

    async def scenario():
        held = [await hold(approvals, the_call({"n": n})) for n in range(8)]
        await notifier.start()
        try:
            for r in held:
                await eventually(
                    lambda r=r: state(notifier, r.id)[url] == DELIVERED, "the other one's sent"
                )
                await eventually(
                    lambda r=r: len(notifier.attempts(r.id)) == 2, "the failing one tried once"
                )
            # Their second attempts wait in the outbox, held by no process meanwhile.
            assert notifier.holding == 0
        finally:
            await notifier.close()
        return held

    held = anyio.run(scenario)
    assert [state(notifier, r.id)[failing_url] for r in held] == [PENDING] * 8
    assert len(receiver.got) == 8 and len(failing.got) == 8
    approvals.store.db.close()


# -- where a delivery may go: the address rule (`bastion.egress.pinned`) ----------------------


@pytest.fixture
def hooks_test(monkeypatch) -> Callable[[str], str]:
    """``hooks.test``, a name that is not the loopback's, resolves to 127.0.0.1, as a receiver's
    DNS name pointed into bastion's own network would: ``named(url)`` is a receiver's URL by it."""
    real = socket.getaddrinfo

    def resolving(host, port, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if name == "hooks.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolving)
    return lambda url: url.replace("//127.0.0.1:", "//hooks.test:", 1)


def test_a_webhook_whose_name_resolves_to_a_private_address_is_refused_and_the_next_delivered(
    sqlite_url, receivers, hooks_test, caplog
):
    """Whoever controls a receiver's DNS name could point the signed POST anywhere in bastion's
    network: a name that is not itself private is reached at public addresses only. The refusal
    is a failed attempt, recorded with its reason and retried as any other; the other webhook's
    deliveries, and the next request's, go on."""
    caplog.set_level(logging.WARNING, logger="bastion.webhooks")
    pointed, receiver = Receiver(), Receiver()
    named = hooks_test(receivers(pointed))
    url = receivers(receiver)  # by its address: 127.0.0.1, allowed its own kind
    hooks = (Webhook(named, SECRET, allow_http=True), Webhook(url, SECRET))
    chosen = dataclasses.replace(settings(webhook_attempts=2), webhooks=hooks)
    approvals = approvals_on(sqlite_url, chosen)
    notifier = approvals.webhooks

    async def scenario():
        await notifier.start()
        try:
            first = await hold(approvals)
            ended = {named: FAILED, url: DELIVERED}
            await eventually(lambda: state(notifier, first.id) == ended, "first answered")
            second = await hold(approvals, the_call({"n": 2}))
            await eventually(lambda: state(notifier, second.id) == ended, "second answered")
        finally:
            await notifier.close()
        return first, second

    first, second = anyio.run(scenario)
    assert pointed.got == []
    assert len(receiver.got) == 2 and all(r.verified for r in receiver.got)
    refusal = (
        "hooks.test resolves to a non-public address; refused"
        " (allow_private_addresses of this webhook) (127.0.0.1)"
    )
    for request in (first, second):
        tried = [a for a in notifier.attempts(request.id) if a.webhook == webhook_label(named)]
        assert [(a.attempt, a.status_code, a.error) for a in tried] == [
            (1, None, refusal),
            (2, None, refusal),
        ]
    logged = [r.getMessage() for r in caplog.records if webhook_label(named) in r.getMessage()]
    assert any(refusal in line for line in logged), logged
    approvals.store.db.close()


def test_a_webhook_whose_name_does_not_resolve_is_retried_and_names_no_setting(sqlite_url, caplog):
    """A name that cannot be resolved (misspelt: `.invalid` never resolves, RFC 6761 §6.4) is
    a failed attempt as any other, retried; its error says so, and names no
    ``allow_private_addresses``, which would not change it (it did, as if an address had been
    refused)."""
    caplog.set_level(logging.WARNING, logger="bastion.webhooks")
    url = "https://hooks.invalid/notify"
    chosen = dataclasses.replace(settings(webhook_attempts=2), webhooks=(Webhook(url, SECRET),))
    approvals = approvals_on(sqlite_url, chosen)
    notifier = approvals.webhooks

    async def scenario():
        await notifier.start()
        try:
            request = await hold(approvals)
            await eventually(lambda: state(notifier, request.id) == {url: FAILED}, "failed")
        finally:
            await notifier.close()
        return request

    request = anyio.run(scenario)
    tried = notifier.attempts(request.id)
    assert [(a.attempt, a.status_code) for a in tried] == [(1, None), (2, None)]
    for attempt in tried:
        assert attempt.error.startswith("cannot resolve hooks.invalid: "), attempt.error
        assert "allow_private_addresses" not in attempt.error
    logged = [r.getMessage() for r in caplog.records if webhook_label(url) in r.getMessage()]
    not_sent = [line for line in logged if "not sent: cannot resolve hooks.invalid: " in line]
    assert len(not_sent) == 2, logged
    assert not any("allow_private_addresses" in line for line in logged), logged
    approvals.store.db.close()


def test_a_webhook_whose_name_resolves_to_a_private_address_is_delivered_once_allowed(
    tmp_path, receivers, hooks_test
):
    """``allow_private_addresses`` of the webhook, read as every other peer's: true, or the
    networks it lists; the request keeps the name (``Host``) while it goes to the address
    checked. Explicitly false, it refuses even a URL that names the loopback by its address."""
    receiver = Receiver()
    url = receivers(receiver)
    named = hooks_test(url)

    databases = iter(range(10))

    def delivered(hook: dict) -> tuple[str, str]:
        """One request told to the webhook ``hook`` configures (by a server of its own): its
        delivery's end, and the error of its one attempt."""
        database = str(tmp_path / f"bastion-{next(databases)}.db")
        table = {"webhooks": [{"secret_env": "S", **hook}], "webhook_attempts": 1}
        chosen = ApprovalSettings.from_mapping(table, env={"S": SECRET.decode()})
        approvals = approvals_on(database, chosen)
        notifier = approvals.webhooks

        async def scenario():
            await notifier.start()
            try:
                request = await hold(approvals)
                ended = lambda: state(notifier, request.id)[hook["url"]]  # noqa: E731
                await eventually(lambda: ended() != PENDING, "answered")
                return ended(), notifier.attempts(request.id)
            finally:
                await notifier.close()

        try:
            ended, [attempt] = anyio.run(scenario)
        finally:
            approvals.store.db.close()
        return ended, attempt.error

    by_name = {"url": named, "allow_http": True}
    for allowed in (["127.0.0.0/8"], True):
        assert delivered({**by_name, "allow_private_addresses": allowed}) == (
            DELIVERED,
            "",
        )
    assert len(receiver.got) == 2 and all(r.verified for r in receiver.got)
    assert {r.headers["host"] for r in receiver.got} == {named.split("/")[2]}
    # A list that does not hold the address, and false, refuse it.
    ended, error = delivered({**by_name, "allow_private_addresses": ["10.0.0.0/8"]})
    assert ended == FAILED and "address outside the networks allowed" in error
    assert error.endswith("(127.0.0.1)")  # the deployment's own URL: the address is named
    assert "approvals.webhooks[0].allow_private_addresses" in error
    ended, error = delivered({"url": url, "allow_private_addresses": False})
    assert ended == FAILED
    assert error.startswith("127.0.0.1 resolves to a non-public address; refused")
    assert len(receiver.got) == 2


@pytest.mark.parametrize("prefix", ["approvals", "signals.alerts"])
@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("yes", r"true, false or a list of networks"),
        (["10.1.2.3/16"], r"did you mean 10.1.0.0/16"),
        ([7], r"each network is a string"),
    ],
)
def test_a_webhooks_allow_private_addresses_that_cannot_be_used_is_refused_at_start(
    prefix, value, said
):
    hook = {"url": "https://hooks.example/h", "secret_env": "S", "allow_private_addresses": value}
    env = {"S": SECRET.decode()}
    read = ApprovalSettings.from_mapping if prefix == "approvals" else AlertSettings.from_mapping
    with pytest.raises(
        ValueError, match=rf"{prefix}.webhooks\[0\].allow_private_addresses.*{said}"
    ):
        read({"webhooks": [hook]}, env=env)
    listed = {**hook, "allow_private_addresses": ["10.1.0.0/16"]}
    [chosen] = read({"webhooks": [listed]}, env=env).webhooks
    assert [str(n) for n in chosen.allow_private_addresses] == ["10.1.0.0/16"]
