"""bastion's streams brought in step at the transmitter (SSF 1.0 §8.1.1.3, PATCH): a real bastion
and real transmitters (tests/signals/transmitter.py, over HTTP). ``older`` holds a poll stream an
earlier bastion made, known by its id in bastion's database, that asks for neither
``risk-level-change`` nor ``identifier-changed``; ``moved`` allows one stream per receiver and
holds a push stream to the URL and token bastion had before (the create answers 409). Each is
updated at start (the members that differ, ``stream_id`` with them), audited, and delivers what
bastion asks for; a transmitter that refuses the update, or answers a stream still lacking it,
leaves the stream in error naming why; a stream of another issuer is never changed."""

from __future__ import annotations

import json
import os
import time

import pytest

from bastion.cli import main
from bastion.db import Database
from bastion.signals.settings import CAEP, DEFAULT_EFFECTS, RISC
from bastion.signals.ssf_store import SsfStore
from tests.oauth.support import free_socket, serve

from .test_ssf import _toml, jti_of, received, streams, wait_until
from .transmitter import BEARER, Transmitter, receivers_of

AUDIENCE = "https://bastion.test/ssf-update"
PUSH_TOKEN = "push-credential-of-moved"
OLD_PUSH = {
    "method": "urn:ietf:rfc:8935",
    "endpoint_url": "https://bastion-before.example.com/ssf/events",
    "authorization_header": "Bearer the-token-bastion-had-before",
}
NEW_TYPES = (CAEP + "risk-level-change", RISC + "identifier-changed")
# What bastion asked for before it read these two.
BEFORE = sorted(e for e in DEFAULT_EFFECTS if e not in NEW_TYPES)
SAM = {"format": "email", "email": "sam@example.com"}


def changes(bastion, name: str) -> list:
    return [
        e.detail
        for e in bastion.app.state.oauth.audit.events("ssf.stream_changed")
        if e.detail["transmitter"] == name and e.detail.get("changed")
    ]


def patches(transmitter: Transmitter) -> list[dict]:
    return [body for method, body in transmitter.stream_calls if method == "PATCH"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tests.gateway.support import start

    os.environ["BASTION_TEST_UPDATE_BEARER"] = BEARER
    os.environ["BASTION_TEST_UPDATE_PUSH"] = PUSH_TOKEN
    older, moved = Transmitter(AUDIENCE), Transmitter(AUDIENCE)
    moved.one_stream = True
    home = tmp_path_factory.mktemp("stream-update")
    database = str(home / "bastion.db")
    with serve(older.app(), free_socket()) as older_url, serve(moved.app(), free_socket()) as url:
        older.url, moved.url = older_url, url
        held = older.hold("older-1", {"method": "urn:ietf:rfc:8936",
                                      "endpoint_url": f"{older_url}/ssf/poll/older-1"}, BEFORE)  # fmt: skip
        moved.hold("moved-1", dict(OLD_PUSH), sorted(DEFAULT_EFFECTS), description="bastion")
        # The earlier bastion's database knows the poll stream by its id.
        db = Database(database)
        try:
            SsfStore(db).save_stream(
                "older", "verified", "verification event received",
                stream_id=held["stream_id"], actor="server",
            )  # fmt: skip
        finally:
            db.close()
        common = {"audience": AUDIENCE, "bearer_env": "BASTION_TEST_UPDATE_BEARER",
                  "users": {"email:sam@example.com": "sam"}}  # fmt: skip
        table = {
            "ssf": {
                "transmitters": [
                    {"name": "older", "issuer": older_url, "delivery": "poll",
                     "poll_interval_seconds": 0.1, **common},
                    {"name": "moved", "issuer": url, "delivery": "push",
                     "push_token_env": "BASTION_TEST_UPDATE_PUSH", **common},
                ]
            }
        }  # fmt: skip
        rules = "declare risk_level(User, String);\n"
        with start(home, signals=table, database=database, policy_extra=rules) as running:
            running.older, running.moved, running.signals_table = older, moved, table
            wait_until(
                lambda: all(
                    streams(running).get(n, {}).get("verified_at") for n in ("older", "moved")
                )
            )
            yield running


def test_a_stream_an_earlier_bastion_made_is_given_the_event_types_it_lacks_at_start(world):
    """The stream known by its id asked for neither risk-level-change nor identifier-changed:
    they never came. At start bastion PATCHes its events_requested (stream_id with it, nothing
    else), audits what changed, and the transmitter delivers them."""
    [patch] = patches(world.older)
    assert patch == {"stream_id": "older-1", "events_requested": sorted(DEFAULT_EFFECTS)}
    stream = world.older.streams["older-1"]
    assert all(e in stream["events_delivered"] for e in NEW_TYPES)
    [changed] = changes(world, "older")
    assert changed["actor"] == "server" and changed["stream_id"] == "older-1"
    assert changed["changed"] == [
        "events_requested: added risk-level-change, identifier-changed"
    ], changed
    assert len(world.older.streams) == 1  # updated, not made anew
    event = world.older.deliver(
        CAEP + "risk-level-change",
        {"current_level": "HIGH", "principal": "USER", "event_timestamp": int(time.time())},
        SAM,
    )
    assert event is not None
    wait_until(lambda: received(world, jti_of(event)) is not None)
    effect = received(world, jti_of(event)).detail["effects"][0]
    assert effect["result"].startswith("wrote 1 fact"), effect


def test_a_stream_found_after_a_409_pushing_elsewhere_is_pointed_at_bastion(world):
    """SSF 1.0 §8.1.1.1: "The Receiver MAY then GET the existing stream configuration and, if
    desired, use PATCH or PUT to update". The stream the transmitter holds pushes to the URL,
    with the token, bastion had before; it is updated to bastion's (the delivery whole, the
    event types it had kept) and used. It was an error naming the difference."""
    [patch] = patches(world.moved)
    assert patch == {
        "stream_id": "moved-1",
        "delivery": {
            "method": "urn:ietf:rfc:8935",
            "endpoint_url": f"{world.url}/ssf/events",
            "authorization_header": f"Bearer {PUSH_TOKEN}",
        },
    }
    assert streams(world)["moved"]["stream_id"] == "moved-1"
    [changed] = changes(world, "moved")
    assert changed["changed"] == [
        f"delivery: endpoint_url now {world.url}/ssf/events",
        "delivery: authorization_header now bastion's (push_token_env)",
    ], changed
    assert PUSH_TOKEN not in json.dumps(changed) and "before" not in json.dumps(changed)
    event = world.moved.deliver(RISC + "identifier-changed", {"new-value": "s@x.com"}, SAM)
    assert received(world, jti_of(event)) is not None  # pushed to bastion, applied


def configure_older(world, tmp_path) -> list[str]:
    """The command line of `bastion signals streams configure` for transmitter ``older``, on
    the running bastion's database and settings."""
    config = tmp_path / "bastion.toml"
    config.write_text(
        f"[server]\ndatabase = {json.dumps(world.app.state.config.database)}\n"
        f"[oauth]\nissuer = {json.dumps(world.url)}\n[signals.ssf]\n"
        f"transmitters = {_toml(world.signals_table['ssf']['transmitters'])}\n"
    )
    return ["signals", "streams", "configure", "--config", str(config), "--transmitter", "older"]


def test_streams_configure_updates_the_stream_and_says_what_it_changed(world, tmp_path, capsys):
    """On demand, as at start: a stream that lost an event type at the transmitter (an
    operator's edit) gets it back, and the command says so; run again, nothing to change."""
    argv = configure_older(world, tmp_path)
    world.older.streams["older-1"]["events_requested"].remove(CAEP + "session-revoked")
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "updated at the transmitter: events_requested: added session-revoked" in out, out
    assert CAEP + "session-revoked" in world.older.streams["older-1"]["events_requested"]
    assert main(argv) == 0
    assert "updated" not in capsys.readouterr().out
    # A transmitter that refuses: the command fails and says why; the stream is in error.
    world.older.patch_answer = 405
    world.older.streams["older-1"]["events_requested"].remove(CAEP + "session-revoked")
    try:
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "lacks 1 of bastion's: session-revoked" in err and "HTTP 405" in err, err
        assert streams(world)["older"]["status"] == "error"
        # The running server's /readyz shows it too, though another process wrote it.
        wait_until(lambda: shown(world)["older"]["status"] == "error")
        assert "HTTP 405" in shown(world)["older"]["detail"]
    finally:
        world.older.patch_answer = None
    assert main(argv) == 0
    assert "added session-revoked" in capsys.readouterr().out
    wait_until(lambda: shown(world)["older"]["status"] != "error")


def shown(world) -> dict:
    """What the running server's /readyz shows of each stream."""
    return world.http.get(f"{world.url}/readyz").json()["ssf_streams"]


def test_a_verification_asked_before_the_stream_fell_in_error_verifies_nothing(
    world, tmp_path, capsys
):
    """A configure asks for a verification; its event comes late, after a later configure left
    the stream in error: its update refused (the stream used as it is), or the stream not
    configured at all. That event proves the transmitter answers, not that the stream is in
    step: it is taken as an unexpected state and the stream stays in error. It showed the stream
    verified (CI saw the poll bring such an event in between a refused update and the check)."""
    argv = configure_older(world, tmp_path)
    older = world.older

    def late_event_leaves_it_in_error(late: str) -> None:
        older.queue(late)  # the poll brings it in
        wait_until(lambda: received(world, jti_of(late)) is not None)
        effect = received(world, jti_of(late)).detail["effects"][0]
        assert effect["effect"] == "verify" and effect["result"] == "unexpected state", effect
        assert streams(world)["older"]["status"] == "error"

    older.verifications_held = []
    try:
        # Refused: the stream lacks an event type and the transmitter will not PATCH it.
        assert main(argv) == 0
        [late] = older.verifications_held
        older.patch_answer = 405
        older.streams["older-1"]["events_requested"].remove(CAEP + "session-revoked")
        assert main(argv) == 1
        late_event_leaves_it_in_error(late)
        # Not configured: the transmitter's configuration endpoint fails.
        older.patch_answer = None
        assert main(argv) == 0
        [_, late] = older.verifications_held
        older.answers["stream"] = [(500, b"application/json", b"{}")]
        assert main(argv) == 1
        assert "stream not configured" in capsys.readouterr().err
        late_event_leaves_it_in_error(late)
    finally:
        older.verifications_held = older.patch_answer = None
        older.answers.pop("stream", None)
    # Configured again, its own verification marks it verified.
    assert main(argv) == 0
    wait_until(lambda: streams(world)["older"]["status"] == "verified")


@pytest.mark.parametrize(
    "said, shown",
    [
        ("verified", "named no status of SSF's"),  # bastion's own word, before any verification
        ("error", "named no status of SSF's"),
        ("enabled\n2026-12-07 ERROR forged \x1b[2J", "named no status of SSF's"),
        (None, "answered HTTP 500"),
    ],
)
def test_a_status_endpoint_is_believed_only_for_a_status_ssf_defines(
    world, tmp_path, capsys, said, shown
):
    """At configure, the stream's status is read from the transmitter's status endpoint and
    shown (`streams status`; `/readyz`, which anyone may read). Whatever text it answered was
    recorded as the status: "verified" showed a stream verified that never was, and a line
    break or a terminal's escape went to the page and the terminal. Now only enabled, paused
    or disabled is taken; anything else, or an error answer, is recorded as unknown and said
    in the detail, until the stream's verification event arrives."""
    argv = configure_older(world, tmp_path)
    older = world.older
    older.verifications_held = []  # no verification event comes meanwhile
    if said is None:
        older.answers["status"] = [(500, b"application/json", b"{}")]
    else:
        older.status["older-1"] = said
    try:
        assert main(argv) == 0
        recorded = streams(world)["older"]
        assert recorded["status"] == "unknown", recorded
        assert recorded["detail"].endswith(shown), recorded
    finally:
        older.verifications_held = None
        older.status.pop("older-1", None)
        older.answers.pop("status", None)
    capsys.readouterr()
    assert main(argv) == 0
    wait_until(lambda: streams(world)["older"]["status"] == "verified")


def test_a_set_on_a_stream_the_transmitter_disabled_is_still_applied(world):
    """SSF 1.0 §8.1.2.1: a disabled stream's events are not transmitted. That binds the
    transmitter; a SET that verifies and comes anyway (sent before the change, or the
    stream-updated event delivered after it) is applied: refusing it would drop a revocation.
    The status is shown as the transmitter said it."""
    world.older.status["older-1"] = "disabled"
    argv_status = world.older.set_token(
        "https://schemas.openid.net/secevent/ssf/event-type/stream-updated",
        {"status": "disabled"},
        {"format": "opaque", "id": "older-1"},
    )
    world.older.queue(argv_status)
    wait_until(lambda: streams(world)["older"]["status"] == "disabled")
    event = world.older.deliver(CAEP + "session-revoked", {}, SAM)
    wait_until(lambda: received(world, jti_of(event)) is not None)
    assert received(world, jti_of(event)).detail["effects"][0]["effect"] == "revoke"
    ready = world.http.get(f"{world.url}/readyz").json()
    assert ready["ssf_streams"]["older"]["status"] == "disabled"
    world.older.status.pop("older-1")


# -- refusals, against the receiver alone ---------------------------------------------------------


@pytest.fixture
def receivers(tmp_path):
    """A receiver of a one-stream push transmitter, each on a database of its own (the stream's
    id lost): (transmitter, configure(name) -> (stream or None, error or None, recorded))."""
    idp = Transmitter("https://bastion.example.com")
    idp.one_stream = True
    with receivers_of(idp, tmp_path, {"PUSH": "p" * 32, "BEARER": BEARER}) as configure:
        yield idp, configure


def push_delivery(token: str = "p" * 32) -> dict:
    return {"method": "urn:ietf:rfc:8935", "endpoint_url": "https://bastion.example.com/ssf/events",
            "authorization_header": f"Bearer {token}"}  # fmt: skip


@pytest.mark.parametrize(
    "answer, why",
    [
        (405, "updating it at {url}/ssf/stream answered HTTP 405"),
        (403, "updating it at {url}/ssf/stream answered HTTP 403"),
        ("unchanged", "answered a stream that still differs: its events_requested lacks 2"),
    ],
)
def test_a_transmitter_that_does_not_update_the_stream_leaves_it_in_error_naming_why(
    receivers, answer, why
):
    """A transmitter that refuses the PATCH (405: it has none; 403), or answers 200 with the
    stream as it was: the stream is in error, naming what it lacks and the transmitter's answer
    (its status, never its words). Bastion's own stream, lacking event types only, is still
    used: the events it does deliver (revocations) keep coming."""
    idp, configure = receivers
    idp.patch_answer = answer
    idp.hold("s1", push_delivery(), BEFORE)
    stream, problem, recorded = configure(f"refused-{answer}")
    assert problem is not None
    assert why.format(url=idp.url) in problem, problem
    assert "risk-level-change, identifier-changed" in problem, problem
    assert "update it at the transmitter" in problem, problem
    assert "not updated" not in problem  # the transmitter's words are not quoted
    assert len(patches(idp)) == 1
    assert stream is not None and stream["stream_id"] == "s1"
    assert (recorded.status, recorded.stream_id) == ("error", "s1")
    assert problem in recorded.detail


def test_a_stream_pushing_elsewhere_that_is_not_updated_is_not_used(receivers):
    idp, configure = receivers
    idp.patch_answer = 405
    idp.hold("s1", dict(OLD_PUSH), sorted(DEFAULT_EFFECTS))
    stream, problem, recorded = configure("elsewhere")
    assert stream is None and recorded is None
    assert "it does not push to https://bastion.example.com/ssf/events" in problem, problem
    assert "answered HTTP 405" in problem, problem


@pytest.mark.parametrize(
    "held, differs",
    [
        ({"iss": "https://another.example.com"}, "its iss is not"),
        ({"delivery": {"method": "urn:ietf:rfc:8936", "endpoint_url": "https://x.example/p"}},
         "its delivery method is not urn:ietf:rfc:8935"),
    ],
)  # fmt: skip
def test_a_stream_that_is_not_bastions_is_never_changed(receivers, held, differs):
    """Another issuer's stream, or one of another delivery method, is not bastion's to change:
    no PATCH is sent, and the 409 is an error naming the difference, as before."""
    idp, configure = receivers
    idp.hold("s1", **{"delivery": push_delivery(), "requested": BEFORE, **held})
    stream, problem, recorded = configure("foreign")
    assert stream is None and recorded is None
    assert "answered 409" in problem and differs in problem, problem
    assert patches(idp) == []


def test_a_known_stream_of_another_delivery_method_is_not_changed_or_used(receivers, tmp_path):
    """The stream known by its id, when the configuration now asks for another delivery
    method: bastion does not turn it into another (nor poll a push stream's endpoint)."""
    idp, configure = receivers
    idp.one_stream = False
    idp.hold("s1", {"method": "urn:ietf:rfc:8936", "endpoint_url": f"{idp.url}/ssf/poll/s1"},
             sorted(DEFAULT_EFFECTS))  # fmt: skip
    db = Database(str(tmp_path / "known.db"))
    try:
        SsfStore(db).save_stream("idp", "verified", "v", stream_id="s1", actor="server")
    finally:
        db.close()
    stream, problem, recorded = configure("known")
    assert stream is None and "its delivery method is not urn:ietf:rfc:8935" in problem, problem
    assert patches(idp) == []
    assert recorded.stream_id == "s1"
