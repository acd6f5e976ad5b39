"""A transmitter's configuration metadata (SSF 1.0 §7) is read again when its lifetime ends (its
``Cache-Control`` or ``Expires``, within ``[signals.ssf] jwks_refresh_seconds`` and the
transmitter's ``metadata_cache_seconds``), in the background, the kept one answering meanwhile
(each test's run waits for that read before the next: `run_settled`): one that moves its ``jwks_uri`` or its subject
endpoints is followed without a restart. A read that fails, or brings a document that fails the
checks the first one passed (another ``issuer``, an endpoint that is not https), keeps the last
good metadata in use for ``metadata_stale_seconds`` past its lifetime; after that the SETs and
subject rounds that need it are refused with the reason until a good one is read. The
transmitter is the real HTTP one of tests/signals/transmitter.py."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import anyio
import pytest

from bastion.db import Database
from bastion.facts.store import FactStore
from bastion.oauth.store import OAuthStore
from bastion.signals.set_tokens import SetRefused
from bastion.signals.settings import SsfSettings
from bastion.signals.settings import Transmitter as Configured
from bastion.signals.ssf import SsfReceiver
from tests.clock import ManualClock
from tests.oauth.support import free_socket, serve
from tests.waits import run_settled

from .transmitter import BEARER, CAEP, Transmitter

AUDIENCE = "https://bastion.example.com/ssf"
SAM = {"format": "email", "email": "sam@example.com"}
LEE = {"format": "email", "email": "lee@example.com"}


@pytest.fixture
def idp() -> Iterator[Transmitter]:
    """A transmitter that sends events only about subjects added to the stream, and refuses to
    add lee (403) until a test lets it."""
    sender = Transmitter(AUDIENCE)
    sender.default_subjects = "NONE"
    sender.subject_endpoints = True
    sender.subject_answers[sender.subject_key(LEE)] = 403
    with serve(sender.app(), free_socket()) as url:
        sender.url = url
        yield sender


@contextlib.contextmanager
def receiving(
    idp: Transmitter, tmp_path, clock: ManualClock, **table
) -> Iterator[tuple[SsfReceiver, Configured]]:
    """bastion's receiver of ``idp`` (poll delivery, sam and lee its users), its stream
    configured and a first round of subjects made (sam added, lee refused)."""
    settings = SsfSettings.from_table(
        {
            "jwks_refresh_seconds": 30,
            "transmitters": [
                {
                    "name": "idp",
                    "issuer": idp.url,
                    "audience": AUDIENCE,
                    "delivery": "poll",
                    "bearer_env": "BEARER",
                    "users": {"email:sam@example.com": "sam", "email:lee@example.com": "lee"},
                    **table,
                }
            ],
        },
        issuer="https://bastion.example.com",
        env={"BEARER": BEARER},
    )
    db = Database(str(tmp_path / "b.db"))
    try:
        receiver = SsfReceiver(
            settings, db, OAuthStore(db), FactStore(db), lambda: None, clock=clock
        )
        t = settings.transmitters[0]
        anyio.run(receiver.configure, t)
        first = run_settled(receiver.sync_subjects, t)
        assert (first.added, len(first.failed)) == (1, 1), first
        yield receiver, t
    finally:
        db.close()


def keys_for(receiver: SsfReceiver, t: Configured, token: str) -> str:
    """The kid of the key ``receiver`` found for ``token``, or why it was refused."""
    try:
        keys = run_settled(receiver.keys, t, token)
    except SetRefused as e:
        return e.description
    return ",".join(k.kid for k in keys.keys)


def signed(idp: Transmitter, moved: bool = False) -> str:
    """A SET of ``idp``, signed with its first key, or with the one its moved key set holds."""
    if not moved:
        return idp.set_token(CAEP + "session-revoked", {}, SAM)
    return idp.set_token(CAEP + "session-revoked", {}, SAM, header={"kid": "k2"},
                         key=idp.moved_key)  # fmt: skip


def test_a_transmitter_that_moves_its_key_set_and_subject_endpoints_is_followed(idp, tmp_path):
    clock = ManualClock()
    with receiving(idp, tmp_path, clock, metadata_cache_seconds=120) as (receiver, t):
        assert keys_for(receiver, t, signed(idp)) == "k1"
        idp.moved = True  # its key set (a new key) and subject endpoints are elsewhere now
        idp.subject_answers.clear()  # lee may be added
        clock.now += 60  # the metadata is still in its lifetime: the old places are asked
        assert "answered HTTP 404" in keys_for(receiver, t, signed(idp, moved=True))
        round_ = run_settled(receiver.sync_subjects, t)
        assert round_.added == 0 and "404" in round_.failed[0], round_
        assert idp.calls["moved subjects"] == 0
        clock.now += 61  # past its 120 s: this SET is checked with it, while it is read again
        assert "answered HTTP 404" in keys_for(receiver, t, signed(idp, moved=True))
        assert keys_for(receiver, t, signed(idp, moved=True)) == "k2"  # the new places
        assert run_settled(receiver.sync_subjects, t).added == 1
        assert idp.calls["moved subjects"] == 1 and idp.calls["moved jwks"] == 1
        assert LEE in idp.subjects[idp.stream("urn:ietf:rfc:8936")["stream_id"]]


def test_metadata_that_cannot_be_read_again_is_used_for_a_bounded_time(idp, tmp_path):
    clock = ManualClock()
    table = {"metadata_cache_seconds": 60, "metadata_stale_seconds": 120}
    with receiving(idp, tmp_path, clock, **table) as (receiver, t):
        idp.metadata_down = True
        asked = idp.calls["metadata"]
        clock.now += 61
        # A short outage of the metadata: SETs are still verified, and it was asked.
        assert keys_for(receiver, t, signed(idp)) == "k1"
        assert idp.calls["metadata"] == asked + 1
        idp.subject_answers.clear()
        assert run_settled(receiver.sync_subjects, t).added == 1  # the last good add endpoint
        clock.now += 120  # 181 s: past its lifetime and the 120 s after it
        refusal = keys_for(receiver, t, signed(idp))
        assert "answered HTTP 503" in refusal and "metadata_stale_seconds" in refusal, refusal
        with pytest.raises(ValueError, match="metadata_stale_seconds"):
            run_settled(receiver.sync_subjects, t)
        idp.metadata_down = False
        clock.now += 31  # past jwks_refresh_seconds since the last failed read
        assert keys_for(receiver, t, signed(idp)) == "k1"


@pytest.mark.parametrize(
    "overrides, reason",
    [
        ({"issuer": "https://evil.example"}, "names issuer 'https://evil.example'"),
        ({"add_subject_endpoint": "http://transmitter.example/add"}, "add_subject_endpoint"),
    ],
    ids=["another issuer", "an endpoint not https"],
)
def test_a_refetched_document_failing_the_first_ones_checks_never_replaces_it(
    idp, tmp_path, overrides, reason
):
    clock = ManualClock()
    table = {"metadata_cache_seconds": 60, "metadata_stale_seconds": 120}
    with receiving(idp, tmp_path, clock, **table) as (receiver, t):
        # The new document names an add endpoint of its own (where the transmitter answers 404).
        idp.metadata_overrides = {
            "add_subject_endpoint": f"{idp.url}/moved/ssf/subjects:add",
            **overrides,
        }
        idp.subject_answers.clear()
        clock.now += 61
        assert run_settled(receiver.sync_subjects, t).added == 1  # at the good one's endpoint
        assert idp.calls["moved subjects"] == 0
        clock.now += 120
        with pytest.raises(ValueError, match=reason):
            run_settled(receiver.sync_subjects, t)
        assert "metadata_stale_seconds" in keys_for(receiver, t, signed(idp))
        assert idp.calls["moved subjects"] == 0
