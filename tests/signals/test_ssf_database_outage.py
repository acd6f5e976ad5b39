"""The Shared Signals receiver while its database is away, against the real test transmitter
(tests/signals/transmitter.py) and a real PostgreSQL reached through a relay the test cuts (the
database of this test alone goes away): a stream's task lives through the outage, says it once,
and takes up again after it; a SET that could not be stored is not acknowledged by a poll, nor
answered 202 to a push, so the transmitter delivers it again and it is applied, once; the SETs
a poll stored before it are acknowledged, not delivered again."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import anyio

from bastion.db import Database, DatabaseUnavailable
from bastion.facts.store import FactStore
from bastion.oauth.store import Grant, OAuthStore
from bastion.signals.settings import SsfSettings
from bastion.signals.ssf import SsfReceiver
from tests.gateway.streams import modern_headers, modern_request
from tests.gateway.support import start
from tests.oauth.support import free_socket, serve
from tests.outage_rounds import logged, through_a_cut
from tests.relays import Relay
from tests.waits import PATIENCE, eventually

from .transmitter import BEARER, CAEP, Transmitter

AUDIENCE = "https://bastion.example.com"
SSF_LOG = "bastion.signals.ssf"
SAM = {"format": "email", "email": "sam@example.com"}
PUSH_TOKEN = "push-credential-of-the-idp-stream"
# Polls that fail before the database comes back: enough that a line at each would show.
FAILED_POLLS = 6


@contextmanager
def _through_a_relay(postgres_url: str) -> Iterator[tuple[Transmitter, str, Relay, Database]]:
    """A test transmitter served, and the database reached through a relay the test cuts."""
    idp = Transmitter(AUDIENCE)
    with Relay(("127.0.0.1", 5432)) as relay, serve(idp.app(), free_socket()) as url:
        idp.url = url
        db = Database(postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}"))
        try:
            yield idp, url, relay, db
        finally:
            db.close()


def said(caplog, level: int = logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == SSF_LOG and r.levelno >= level]


def test_a_poll_stream_lives_through_a_database_outage_and_acknowledges_only_what_it_stored(
    postgres_url, caplog
):
    """The database goes away before the stream is configured, comes back, then goes away again
    while a SET revoking sam's session waits at the transmitter. The task tries again at every
    interval and says each outage once, and once that it is over; the SET is neither
    acknowledged nor reported as an error while it cannot be stored (it stays queued at the
    transmitter), and once the database is back it is applied and acknowledged."""
    caplog.set_level(logging.DEBUG, logger=SSF_LOG)
    with _through_a_relay(postgres_url) as (idp, url, relay, db):
        receiver, t = poll_receiver(db, url)
        oauth = receiver.oauth_store

        def polls() -> int:
            return idp.calls["poll"]

        def status() -> str | None:
            return stream_status(receiver, t)

        def steps() -> list[str]:
            """What the task said loud since the last look (the steps, not their errors)."""
            lines = said(caplog)
            caplog.clear()
            return sorted(
                line.removeprefix(f"ssf transmitter {t.name}: ").split(":")[0].split(" (")[0]
                for line in lines
            )

        async def scenario() -> tuple[str, list[list[str]]]:
            told = []
            relay.cut()  # away before the stream is configured
            task = asyncio.create_task(receiver._run(t))
            try:
                await until(lambda: len(said(caplog, logging.DEBUG)) >= 2 * FAILED_POLLS)
                assert not task.done(), task
                told.append(steps())
                relay.restore()
                await until(lambda: status() == "verified")
                await until(lambda: polls() > 0)
                # Its first round of subjects done (the next is a day away): what follows
                # is the stream's alone.
                await until(lambda: receiver.rounds.get(t.name, 0) > 0)
                told.append(steps())
                relay.cut()  # away while a SET waits
                jti = idp.queue(idp.set_token(CAEP + "session-revoked", {}, SAM))
                first = polls()
                await until(lambda: polls() >= first + FAILED_POLLS)
                assert not task.done(), task
                # Neither acknowledged nor refused: it waits at the transmitter.
                assert jti in idp.queued and jti not in idp.acked, idp.acked
                assert jti not in idp.errors, idp.errors
                told.append(steps())
                relay.restore()
                await until(lambda: jti in idp.acked)
                assert not task.done(), task
                told.append(steps())
                return jti, told
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

        jti, told = anyio.run(scenario)
        # Each outage said once by each step it failed, not at every attempt, and once that
        # the step works again.
        assert told == [
            ["its status could not be recorded", "stream not configured"],
            ["its status is recorded again", "stream configured again"],
            ["its status could not be recorded", "poll failed"],
            ["its status is recorded again", "poll answered again"],
        ], told
        assert oauth.grant("g1").revoked_at is not None
        received = [e for e in receiver.audit.events("signal.received") if e.detail["jti"] == jti]
        assert len(received) == 1


def test_a_stream_made_as_the_database_went_away_is_not_made_again(postgres_url, caplog):
    """The transmitter makes bastion's stream, and the database goes away before bastion keeps
    its id. Tried again once the database is back, bastion reads that stream and uses it: it
    made a second (a transmitter that allows several), and the first, holding the events queued
    for bastion, was never polled."""
    caplog.set_level(logging.DEBUG, logger=SSF_LOG)
    with _through_a_relay(postgres_url) as (idp, url, relay, db):
        receiver, t = poll_receiver(db, url)
        idp.on_create = relay.cut  # away as the stream is made, before its answer

        async def scenario() -> None:
            task = asyncio.create_task(receiver._run(t))
            try:
                await until(lambda: any("stream not configured" in m for m in said(caplog)))
                assert idp.calls["stream"] >= 1 and len(idp.streams) == 1, idp.streams
                idp.on_create = None
                relay.restore()
                await until(lambda: stream_status(receiver, t) == "verified")
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

        anyio.run(scenario)
        [made] = idp.streams
        assert receiver.store.stream(t.name).stream_id == made
        creates = [body for method, body in idp.stream_calls if method == "POST"]
        assert len(creates) == 1, creates


def test_sets_a_poll_stored_before_the_database_went_away_are_acknowledged_not_refused_as_replays(
    postgres_url,
):
    """The database goes away between two SETs of one poll's answer: the first is stored, the
    second cannot be. The first's acknowledgement was dropped with the poll, so the transmitter
    delivered it again and it was recorded refused as a replay (a ``signal.refused`` of a SET
    applied without fault). Now it is acknowledged at the next poll; the second waits at the
    transmitter, and is applied and acknowledged once the database is back."""
    with _through_a_relay(postgres_url) as (idp, url, relay, db):
        receiver, t = poll_receiver(db, url)
        receive = receiver.receive
        taken: list[str] = []

        def stored_then_the_database_goes(t, token, keys):
            outcome = receive(t, token, keys)  # the real one: only the moment is chosen
            taken.append(outcome.jti)
            if len(taken) == 1:
                relay.cut()
            return outcome

        async def scenario() -> tuple[str, str]:
            task = asyncio.create_task(receiver._run(t))
            try:
                await until(lambda: stream_status(receiver, t) == "verified")
                receiver.receive = stored_then_the_database_goes
                first = idp.queue(idp.set_token(CAEP + "session-revoked", {}, SAM))
                second = idp.queue(idp.set_token(CAEP + "credential-change", {}, SAM))
                await until(lambda: first in idp.acked)
                assert second not in idp.acked and second in idp.queued, idp.acked
                relay.restore()
                await until(lambda: second in idp.acked)
                return first, second
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

        first, second = anyio.run(scenario)
        assert taken == [first, second], taken
        for jti in (first, second):
            assert [e.detail["jti"] for e in receiver.audit.events("signal.received")].count(
                jti
            ) == 1
        refused = [e.detail for e in receiver.audit.events("signal.refused")]
        assert not refused, refused


def poll_receiver(db: Database, url: str):
    """A receiver on ``db`` of the transmitter at ``url`` (poll, every 50 ms), and its
    transmitter's settings; sam has a grant its SETs can revoke."""
    settings = SsfSettings.from_table(
        {
            "transmitters": [
                {
                    "name": "idp",
                    "issuer": url,
                    "audience": AUDIENCE,
                    "delivery": "poll",
                    "bearer_env": "BEARER",
                    "poll_interval_seconds": 0.05,
                    "subjects_sync_seconds": 86400,
                    "users": {"email:sam@example.com": "sam"},
                }
            ]
        },
        issuer=AUDIENCE,
        env={"BEARER": BEARER},
    )
    oauth = OAuthStore(db)
    now = time.time()
    oauth.create_user("sam", "x", now, actor="test")
    oauth.create_grant(Grant("g1", "c", "sam", "https://r", "s", now, now + 3600, None))
    return SsfReceiver(settings, db, oauth, FactStore(db), lambda: None), settings.transmitters[0]


async def until(condition) -> None:
    """Wait until ``condition`` (asked in a worker thread) holds."""
    async with asyncio.timeout(PATIENCE):
        while not await anyio.to_thread.run_sync(condition):
            await asyncio.sleep(0.01)


def stream_status(receiver, t) -> str | None:
    try:
        known = receiver.store.stream(t.name)
    except DatabaseUnavailable:  # a relay just restored: asked again
        return None
    return known.status if known else None


def verified(receiver) -> bool:
    known = receiver.store.stream("idp")
    return known is not None and known.status == "verified"


def test_a_push_the_database_cannot_store_is_not_answered_202_and_is_applied_when_sent_again(
    tmp_path, postgres_url, monkeypatch
):
    """A whole bastion on PostgreSQL through a relay the test cuts: a SET pushed while the
    database is away is answered 503 (the transmitter sends it again), never 202, and nothing of
    it is kept; sent again once the database is back, it is applied, once."""
    monkeypatch.setenv("BASTION_TEST_SSF_PUSH", PUSH_TOKEN)
    monkeypatch.setenv("BASTION_TEST_SSF_BEARER", BEARER)
    idp = Transmitter(AUDIENCE)
    with Relay(("127.0.0.1", 5432)) as relay, serve(idp.app(), free_socket()) as url:
        idp.url = url
        table = {
            "ssf": {
                "transmitters": [
                    {
                        "name": "idp",
                        "issuer": url,
                        "audience": AUDIENCE,
                        "delivery": "push",
                        "bearer_env": "BASTION_TEST_SSF_BEARER",
                        "push_token_env": "BASTION_TEST_SSF_PUSH",
                        "users": {"email:sam@example.com": "sam"},
                    }
                ]
            }
        }
        database = postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}")
        with start(tmp_path, signals=table, database=database) as bastion:
            receiver = bastion.app.state.signals
            assert eventually(lambda: verified(receiver), every=0.05)
            event = idp.set_token(CAEP + "session-revoked", {}, SAM)
            token = bastion.token("sam", "deskhttp")
            relay.cut()
            refused = idp.push(event)
            assert refused.status_code == 503, (refused.status_code, refused.text)
            assert refused.headers.get("retry-after"), refused.headers
            relay.restore()
            jti = idp.queue(event)  # (its jti: nothing is polled on a push stream)
            assert eventually(lambda: answered(bastion, token), every=0.05)
            kept = [e for e in receiver.audit.events("signal.received") if e.detail["jti"] == jti]
            assert not kept  # nothing of it
            applied = idp.push(event)  # the transmitter's retry
            assert applied.status_code == 202, applied.text
            received = [
                e for e in receiver.audit.events("signal.received") if e.detail["jti"] == jti
            ]
            assert len(received) == 1
            assert received[0].detail["effects"][0]["result"].startswith("revoked ")
            assert idp.push(event).status_code == 400  # a replay now
            assert not answered(bastion, token)  # sam's grant is revoked


def answered(bastion, token: str) -> bool:
    """Whether sam's call goes through (False once the database is back and his grant revoked;
    asked again while the database is not back yet)."""
    response = bastion.http.post(
        bastion.mcp_url("deskhttp"),
        json=modern_request(1, "tools/call", {"name": "search_customers", "arguments": {}}),
        headers=modern_headers(token, "tools/call", "search_customers"),
    )
    return response.status_code == 200


def test_the_round_forgetting_old_jtis_says_a_database_outage_once(postgres_url, caplog):
    """The round that forgets the jtis past ``jti_retention_seconds`` kept every failure to
    itself, for ever: a database away, or a table it cannot write, was never said. Now once
    when it begins, at DEBUG for the rounds after, and once that jtis are forgotten again."""
    caplog.set_level(logging.DEBUG, logger=SSF_LOG)
    with Relay(("127.0.0.1", 5432)) as relay:
        db = Database(postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}"))
        try:
            settings = SsfSettings.from_table(
                # Rounds every 50 ms (a tenth of the retention).
                {"jti_retention_seconds": 0.5, "max_event_age_seconds": 0.3,
                 "clock_skew_seconds": 0.2},
                issuer=AUDIENCE,
                env={},
            )  # fmt: skip
            receiver = SsfReceiver(settings, db, OAuthStore(db), FactStore(db), lambda: None)
            through_a_cut(relay, receiver._forget_forever, logged(caplog, SSF_LOG, "jtis"))
        finally:
            db.close()
