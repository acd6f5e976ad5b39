"""A Shared Signals transmitter whose answers to bastion are hostile (tests/signals/transmitter.py,
real HTTP, `Transmitter.answer_next`): poll answers (RFC 8936) with a hostile JSON value in one
place (`tests.security.hostile_json`: a ``sets`` map's values and names, ``moreAvailable``, the
whole object), a member named twice, truncated, oversized, not UTF-8, not JSON, of odd content
types and statuses, to a served bastion (SQLite and PostgreSQL) that polls; and the answers to
bastion's stream configuration (creation, read, status, verification) and subject calls, to a
receiver in this process. The poll loop must outlive every answer: the next poll happens, and a
good SET queued after a bad answer is applied; an answer refused as a whole is logged ("poll
failed"), a SET of it that is not one is reported back to the transmitter (``setErrs``); no
traceback, and a refused answer changes no row. A stream configuration is used only when the poll
loop can use it, else refused with bastion's ValueError (the loop configures again), and a
refused one stores nothing. Derandomized, so a run in CI draws what a run here drew."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastion import untrusted_json
from bastion.db import Database
from bastion.facts.model import Entity
from bastion.facts.store import FactStore
from bastion.oauth.store import OAuthStore
from bastion.oauth.users import create_user
from bastion.signals.settings import SsfSettings
from bastion.signals.ssf import MAX_ANSWER_BYTES, POLL_METHOD, SsfReceiver, secure_url
from bastion.signals.ssf_store import SsfStore
from tests.conftest import postgres_schema
from tests.draws import fuzzed
from tests.oauth.support import free_socket, serve
from tests.security.conftest import OAUTH as OAUTH_TABLE
from tests.security.conftest import logged_since
from tests.security.hostile_headers import CONTENT_TYPE, JSON_TYPES
from tests.security.hostile_json import VALUES, deep, members, placed, places, twice
from tests.security.rows import snapshot, unexpected_changes
from tests.server.conftest import POLICY, ServerProcess
from tests.signals.transmitter import BEARER, CAEP, Transmitter
from tests.waits import PATIENCE

AUDIENCE = "https://bastion.test/ssf"
SAM = {"format": "email", "email": "sam@example.com"}
CONFIG = """
[signals.ssf]

[[signals.ssf.transmitters]]
name = "idp"
issuer = "%(issuer)s"
audience = "%(audience)s"
delivery = "poll"
bearer_env = "BASTION_TEST_SSF_BEARER"
poll_interval_seconds = 0.02

[signals.ssf.transmitters.users]
"email:sam@example.com" = "sam"
"""
# A poll answer holding one SET that is none: refused, reported back, nothing applied.
POLL_ANSWER = {"sets": {"jti-h": "a.b.c"}, "moreAvailable": False}
JSON = b"application/json"
_OVERSIZED = b'{"sets": {"j": "' + b"a" * 1_100_000 + b'"}, "moreAvailable": false}'
# Bodies that are no poll answer bastion can read, as sent.
RAW = [
    b"",
    b" ",
    b"{",
    json.dumps(POLL_ANSWER).encode()[:-5],  # truncated
    b"\xff\xfe{}",
    '{"sets": {"j": "\u00e9"}}'.encode("latin-1"),  # not UTF-8
    '{"sets": {"j": "\u00e9"}}'.encode("utf-16"),
    b"\xef\xbb\xbf" + json.dumps(POLL_ANSWER).encode(),  # a byte order mark
    _OVERSIZED,
    b"null",
    b"[]",
    b'"sets"',
    deep(5000, '{"sets":', "}").replace('{"sets":}', "{}").encode(),
    b'{"sets": NaN}',
    b'{"sets": {"j": "a.b.c"}, "moreAvailable": Infinity}',
    b"<html>502 Bad Gateway</html>",
    b"\x00" * 64,
]
STATUSES = [201, 202, 204, 206, 301, 302, 304, 400, 401, 404, 429, 500, 503]


@st.composite
def poll_answers(draw: st.DrawFn) -> tuple[int, bytes, bytes]:
    """(status, content type, body) of one poll answer."""
    return hostile_answer(draw, POLL_ANSWER)


def hostile_answer(draw: st.DrawFn, template: object) -> tuple[int, bytes, bytes]:
    """(status, content type, body) of an answer like ``template`` with one thing wrong: a
    hostile value in one place, a member named twice, a raw body, a content type, a status."""
    where = draw(st.sampled_from(["place"] * 8 + ["twice", "raw", "type", "status"]))
    status, kind, body = 200, JSON, json.dumps(template).encode()
    if where == "place":
        body = placed(template, draw(st.sampled_from(places(template))), draw(VALUES))
    elif where == "twice":
        body = twice(template, draw(st.sampled_from(members(template))), draw(VALUES))
    elif where == "raw":
        body = draw(st.sampled_from(RAW))
    elif where == "type":
        kind = draw(st.sampled_from([*JSON_TYPES, *CONTENT_TYPE, b"text/html", b""]))
    else:
        status = draw(st.sampled_from(STATUSES))
    return status, kind, b"" if status in (204, 304) else body  # HTTP: no body with these


@dataclass
class Poller:
    """A served bastion polling ``transmitter``'s stream."""

    server: ServerProcess
    transmitter: Transmitter
    db: Database
    stream_id: str


def _database(kind: str, tmp):
    return postgres_schema() if kind == "postgresql" else nullcontext(str(tmp / "bastion.db"))


def wait(condition, what: str, log=None) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        tail = log.read_text()[-3000:] if log is not None else ""
        assert time.monotonic() < deadline, f"never: {what}\n{tail}"
        time.sleep(0.01)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def poller(request, tmp_path_factory) -> Iterator[Poller]:
    tmp = tmp_path_factory.mktemp("hostile-transmitter")
    transmitter = Transmitter(AUDIENCE)
    os.environ["BASTION_TEST_SSF_BEARER"] = BEARER
    with serve(transmitter.app(), free_socket()) as url, _database(request.param, tmp) as database:
        transmitter.url = url
        # The first creation of the stream is answered with a stream whose poll endpoint bastion
        # cannot use (`test_a_stream_whose_poll_endpoint_cannot_be_used_is_configured_again`).
        unusable = {
            "stream_id": "s-unusable",
            "iss": url,
            "aud": AUDIENCE,
            "delivery": {"method": POLL_METHOD, "endpoint_url": "ftp://127.0.0.1/poll"},
        }
        transmitter.answer_next("stream", 201, JSON, json.dumps(unusable).encode())
        policy = tmp / "policy.polar"
        policy.write_text(POLICY + "\ndeclare assurance_level(User, String);\n")
        server = ServerProcess(database, tmp, str(policy))
        config = OAUTH_TABLE % (tmp / "keys") + CONFIG % {"issuer": url, "audience": AUDIENCE}
        (tmp / "bastion.toml").write_text(config.replace("{url}", server.url))
        server.env["BASTION_CONFIG"] = str(tmp / "bastion.toml")
        server.start()
        db = Database(database)
        try:
            create_user(OAuthStore(db), "sam", "a password of sam's", time.time(), actor="test")
            store = SsfStore(db)
            deadline = time.monotonic() + PATIENCE
            while not ((s := store.stream("idp")) and s.verified_at) and (
                time.monotonic() < deadline
            ):
                time.sleep(0.05)
            yield Poller(server, transmitter, db, s.stream_id if s else "")
        finally:
            db.close()
            server.stop()


def applied_after(p: Poller, level: str) -> None:
    """Queue a good SET setting sam's assurance level to ``level``: the poll loop takes it,
    applies it and acknowledges it."""
    token = p.transmitter.set_token(CAEP + "assurance-level-change", {"current_level": level}, SAM)
    jti = p.transmitter.queue(token)
    wait(lambda: jti in p.transmitter.acked, f"the SET {jti} acknowledged", p.server.log)
    found = FactStore(p.db).get(("assurance_level", Entity("User", "sam"), None))
    assert [f.fact[-1] for f in found] == [level], found


def test_a_stream_whose_poll_endpoint_cannot_be_used_is_configured_again(poller):
    p = poller
    stream = SsfStore(p.db).stream("idp")
    assert stream is not None and stream.verified_at, (stream, p.server.log.read_text()[-3000:])
    assert stream.stream_id in p.transmitter.streams, stream
    assert p.transmitter.calls["stream"] >= 2
    assert "poll endpoint" in p.server.log.read_text()
    applied_after(p, "configured-again")


def test_no_hostile_poll_answer_ends_the_poll_loop_or_changes_anything(poller):
    p = poller
    t = p.transmitter
    log = p.server.log
    examples = 90 if not p.db.is_postgres else 30
    drawn = [0]

    @fuzzed(examples)
    @given(answer=poll_answers())
    def probe(answer: tuple[int, bytes, bytes]) -> None:
        drawn[0] += 1
        before = snapshot(p.db)
        stream = SsfStore(p.db).stream("idp")
        seen = log.stat().st_size
        with t.lock:
            t.errors.clear()
            polled = t.calls["poll"]
        t.answer_next("poll", *answer)
        # Taken, then the next poll answered: bastion is done with the hostile answer.
        wait(lambda: t.calls["poll"] >= polled + 3, "the next polls", log)
        written = logged_since(log, seen)
        assert "Traceback" not in written, (answer[:2], answer[2][:300], written[-3000:])
        try:
            said = untrusted_json.loads(answer[2])  # JSON from elsewhere, as bastion reads it
        except ValueError:
            said = None
        sets = said.get("sets") if isinstance(said, dict) else None
        if answer[0] == 200 and isinstance(sets, dict) and len(answer[2]) <= MAX_ANSWER_BYTES:
            # An answer of the protocol's shape is taken, whatever its SETs are.
            assert "poll failed" not in written, (answer[2][:300], written[-2000:])
        if "poll failed" not in written:
            # Taken: every member of its sets that is not a SET was reported back.
            assert answer[0] == 200 and isinstance(sets, dict), (answer[:2], answer[2][:300])
            assert set(sets) <= set(t.errors), (answer[2][:300], sorted(t.errors)[:5])
        changed = unexpected_changes(before, snapshot(p.db))
        # The stream's row notes the failure and the rounds' holder: its id and verification
        # are what they were.
        changed.pop("ssf_streams", None)
        after = SsfStore(p.db).stream("idp")
        assert (after.stream_id, after.verified_at) == (stream.stream_id, stream.verified_at)
        assert not changed, (answer[:2], answer[2][:300], changed)
        applied_after(p, f"level-{drawn[0]}")

    probe()
    assert "Traceback" not in log.read_text()


def test_a_poll_answer_forges_no_line_of_the_log(poller):
    """A SET keyed in the poll answer by a name other than its jti is logged with the name the
    transmitter chose: a line break there starts no line of the log's own shape (CWE-117;
    bastion.server.log_lines). Before, the line ``ERROR bastion.signals.ssf: forged ...`` was
    in the log as if bastion had written it."""
    p = poller
    t = p.transmitter
    token = t.set_token(CAEP + "assurance-level-change", {"current_level": "keyed"}, SAM)
    forged = "ERROR bastion.signals.ssf: forged by the transmitter"
    seen = p.server.log.stat().st_size
    with t.lock:
        polled = t.calls["poll"]
    t.answer_next("poll", 200, JSON, json.dumps({"sets": {f"k\r\n{forged}": token}}).encode())
    wait(lambda: t.calls["poll"] >= polled + 3, "the next polls", p.server.log)
    written = logged_since(p.server.log, seen)
    assert "carries jti" in written, written[-3000:]
    assert not [line for line in written.splitlines() if line.startswith(forged)], written
    assert f"k\\r\\n{forged}" in written, written[-3000:]


# -- stream configuration and subjects, in this process ------------------------------------------


def _settings(issuer: str) -> SsfSettings:
    table = {"transmitters": [{
        "name": "idp", "issuer": issuer, "audience": AUDIENCE, "delivery": "poll",
        "bearer_env": "BASTION_TEST_SSF_BEARER", "users": {"email:sam@example.com": "sam"},
    }]}  # fmt: skip
    return SsfSettings.from_table(table, issuer="http://127.0.0.1:9", env=dict(os.environ))


@st.composite
def configuration_answers(draw: st.DrawFn, stream: dict) -> tuple[str, tuple[int, bytes, bytes]]:
    """(the endpoint, its answer): the stream's creation, its list of streams, a stream's
    reading, its status, its verification, or a subject's addition."""
    endpoint = draw(
        st.sampled_from(["stream"] * 5 + ["list"] * 2 + ["read", "status", "verify", "subjects"])
    )
    template: object = stream
    if endpoint == "status":
        template = {"status": "enabled"}
    elif endpoint == "list":
        template = [stream]
    return endpoint, hostile_answer(draw, template)


def test_no_hostile_answer_to_the_streams_configuration_is_used_or_stored(tmp_path):
    transmitter = Transmitter(AUDIENCE)
    transmitter.subject_endpoints = True
    os.environ["BASTION_TEST_SSF_BEARER"] = BEARER
    with serve(transmitter.app(), free_socket()) as url:
        transmitter.url = url
        db = Database(str(tmp_path / "bastion.db"))
        settings = _settings(url)
        t = settings.transmitters[0]
        receiver = SsfReceiver(settings, db, OAuthStore(db), FactStore(db), lambda: None)
        store = receiver.store
        configured = anyio.run(receiver.configure, t).stream
        stream = {**configured, "events_delivered": configured["events_requested"][:2]}
        stream.pop("events_requested")

        @fuzzed(120)
        @given(drawn=configuration_answers(stream))
        def probe(drawn: tuple[str, tuple[int, bytes, bytes]]) -> None:
            endpoint, answer = drawn
            if endpoint in ("stream", "list"):
                # Not known here, as at a first start: read from the transmitter's list, else
                # created (POST).
                db.execute("UPDATE ssf_streams SET stream_id = NULL")
                if endpoint == "stream":
                    transmitter.answer_next("list", 200, JSON, b"[]")  # none listed: created
            elif not store.stream("idp").stream_id:
                anyio.run(receiver.configure, t)  # left unconfigured by a refused creation
            transmitter.answer_next("stream" if endpoint == "read" else endpoint, *answer)
            before = snapshot(db)
            known = store.stream("idp")
            try:
                if endpoint == "subjects":
                    db.execute("DELETE FROM ssf_subjects")
                    before = snapshot(db)
                    result = anyio.run(receiver.change_subject, t, "email:sam@example.com")
                    row = store.subject("idp", "email:sam@example.com")
                    assert row is not None, result
                    # Added only on a 2xx (one the connection broke on is not added either).
                    assert row.state == "add_failed" or 200 <= answer[0] < 300, (answer, row)
                    return
                used = anyio.run(receiver.configure, t).stream
            except ValueError as e:  # bastion's refusal: the loop configures again
                assert "Traceback" not in str(e)
                changed = unexpected_changes(before, snapshot(db))
                assert not changed, (drawn[0], answer[:2], answer[2][:300], str(e), changed)
                assert store.stream("idp") == known
                return
            finally:
                transmitter.answers.clear()
            # Used: what it said is stored, and the poll loop can use it.
            saved = store.stream("idp")
            assert isinstance(used["stream_id"], str) and saved.stream_id == used["stream_id"]
            assert used["iss"] == url, used
            delivery = used.get("delivery")
            assert isinstance(delivery, dict), used
            secure_url(delivery.get("endpoint_url"), "the stream's poll endpoint_url")

        try:
            probe()
        finally:
            db.close()
