"""The Shared Signals receiver against a real transmitter (tests/signals/transmitter.py) and a
real bastion: what each CAEP and RISC event does to users, grants, streams and facts, through
push (RFC 8935) and poll (RFC 8936), and every SET that must be refused is refused and changes
nothing."""

from __future__ import annotations

import base64
import json
import os
import time

import anyio
import pytest

from bastion.audit.actor import cli_actor
from bastion.cli import main
from bastion.oauth.users import create_user
from bastion.policy.parser import parse_fact
from tests.gateway.streams import events, modern_headers, modern_request
from tests.gateway.support import PASSWORD, start
from tests.identity.test_trusted_issuers import TestIssuer
from tests.oauth.support import free_socket, serve
from tests.waits import eventually

from .transmitter import BEARER, CAEP, RISC, Transmitter

AUDIENCE = "https://bastion.test/ssf"
PUSH_TOKEN = "push-credential-of-the-idp-stream"
POLICY = """
declare device_compliance(User, String);
declare token_claim(User, String, String);
declare device_compliance(Device, String);
deny(user: User, "call", _tool: Tool) if device_compliance(user, "not-compliant");
declare risk_level(User, String);
deny(user: User, "call", _tool: Tool) if risk_level(user, "HIGH");
"""
CALL = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "tools/call",
    "params": {
        "name": "search_customers",
        "arguments": {"query": "a"},
        "_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {},
        },
    },
}


def email(address: str) -> dict:
    return {"format": "email", "email": address}


@pytest.fixture(scope="module")
def signals(tmp_path_factory):
    os.environ["BASTION_TEST_SSF_PUSH"] = PUSH_TOKEN
    os.environ["BASTION_TEST_SSF_BEARER"] = BEARER
    pusher, poller, idp = Transmitter(AUDIENCE), Transmitter(AUDIENCE), TestIssuer()
    # SSF 1.0 §7.1 critical_subject_members: a tenant named in a subject must be understood.
    pusher.critical_subject_members = ["tenant"]
    mapping = {
        "email:Sam@Example.com": "sam",
        "email:dana@example.com": "dana",
        "opaque:avery-0001": "avery",
        "email:lee@example.com": "lee",
        "email:rowan@example.com": "rowan",
        "phone_number:+12025550123": "morgan",
        "email:quinn@example.com": "quinn",
        "email:casey@example.com": "casey",
        # Not users of bastion: the trusted issuer's alone.
        "email:kim@example.com": "kim",
        "email:jo@example.com": "jo",
    }
    closed = free_socket()
    closed_port = closed.getsockname()[1]  # bound, never listening: connections are refused
    try:
        with (
            serve(pusher.app(), free_socket()) as push_url,
            serve(poller.app(), free_socket()) as poll_url,
            serve(idp.app, free_socket()) as idp_url,
        ):
            pusher.url, poller.url, idp.url = push_url, poll_url, idp_url
            # The company's provider, whose access tokens the gateway takes too.
            trusted = [{"issuer": idp.issuer("a"), "audiences": {"deskhttp": "api://desk-a"}}]
            table = {
                "ssf": {
                    "transmitters": [
                        {
                            "name": "idp",
                            "issuer": push_url,
                            "audience": AUDIENCE,
                            "delivery": "push",
                            "bearer_env": "BASTION_TEST_SSF_BEARER",
                            "push_token_env": "BASTION_TEST_SSF_PUSH",
                            "users": mapping,
                        },
                        {
                            "name": "mdm",
                            "issuer": poll_url,
                            "audience": AUDIENCE,
                            "delivery": "poll",
                            "bearer_env": "BASTION_TEST_SSF_BEARER",
                            "poll_interval_seconds": 0.1,
                            "fact_expiry_seconds": 3600,
                            "users": mapping,
                            "devices": True,
                        },
                        {
                            # Nothing listens here: its stream fails, and bastion serves on.
                            "name": "down",
                            "issuer": f"http://127.0.0.1:{closed_port}",
                            "audience": AUDIENCE,
                            "delivery": "poll",
                            "poll_interval_seconds": 1,
                        },
                    ]
                }
            }
            with start(
                tmp_path_factory.mktemp("signals"),
                policy_extra=POLICY,
                signals=table,
                gateway={"trusted_issuers": trusted},
            ) as running:
                for name in ("dana", "lee", "rowan", "morgan", "quinn", "casey"):
                    create_user(
                        running.app.state.oauth.store, name, PASSWORD, time.time(), actor="test"
                    )
                # casey works on the support team as sam does (the risk level's test).
                running.app.state.store.apply(
                    [parse_fact('has_role(User{"casey"}, "member", Team{"support"})')],
                    actor="test",
                )
                running.pusher, running.poller, running.signals_table = pusher, poller, table
                running.idp = idp
                wait_until(lambda: streams(running).get("idp", {}).get("status") == "verified")
                wait_until(lambda: streams(running).get("mdm", {}).get("status") == "verified")
                yield running
    finally:
        closed.close()


def wait_until(condition) -> None:
    assert eventually(condition, every=0.05), "the condition never held"


def streams(bastion) -> dict:
    return {s.transmitter: s.__dict__ for s in bastion.app.state.signals.store.streams()}


def call(bastion, token):
    return bastion.http.post(
        bastion.mcp_url("deskhttp"),
        json=CALL,
        headers={
            "content-type": "application/json",
            "accept": "application/json",  # JSON however long it takes (httpx's */* takes events)
            "mcp-protocol-version": "2026-07-28",
            "mcp-method": "tools/call",
            "mcp-name": "search_customers",
            "authorization": f"Bearer {token}",
        },
    )


def received(bastion, jti: str):
    found = [
        e
        for e in bastion.app.state.signals.audit.events("signal.received")
        if e.detail["jti"] == jti
    ]
    return found[0] if found else None


def jti_of(token: str) -> str:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"]


# -- streams ------------------------------------------------------------------------------------


def test_bastion_creates_and_verifies_a_stream_with_each_transmitter(signals):
    push = signals.pusher.stream("urn:ietf:rfc:8935")
    assert push["delivery"]["endpoint_url"] == f"{signals.url}/ssf/events"
    assert push["delivery"]["authorization_header"] == f"Bearer {PUSH_TOKEN}"
    assert CAEP + "session-revoked" in push["events_requested"]
    assert signals.poller.stream("urn:ietf:rfc:8936")
    for name in ("idp", "mdm"):
        assert streams(signals)[name]["verified_at"] is not None
    # Each change is audited with who made it: the server configured, the transmitter verified.
    changed = [
        (e.detail["actor"], e.detail["status"])
        for e in reversed(signals.app.state.oauth.audit.events("ssf.stream_changed"))
        if e.detail["transmitter"] == "idp"
    ]
    assert changed[:2] == [("server", "enabled"), ("ssf:idp", "verified")]


def test_a_transmitter_that_cannot_be_reached_is_an_error_in_the_status_not_a_crash(signals):
    wait_until(lambda: streams(signals).get("down", {}).get("status") == "error")
    assert "stream not configured" in streams(signals)["down"]["detail"]
    ready = signals.http.get(f"{signals.url}/readyz")
    assert ready.status_code == 200
    assert ready.json()["ssf_streams"]["down"]["status"] == "error"
    assert "stream not configured" in ready.json()["ssf_streams"]["down"]["detail"]
    assert ready.json()["ssf_streams"]["idp"]["status"] == "verified"


def _toml(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)


def test_the_streams_status_command_shows_each_stream(signals, tmp_path, capsys):
    ssf = signals.signals_table["ssf"]
    config = tmp_path / "bastion.toml"
    config.write_text(
        f"[server]\ndatabase = {json.dumps(signals.app.state.config.database)}\n"
        f"[oauth]\nissuer = {json.dumps(signals.url)}\n[signals.ssf]\n"
        f"transmitters = {_toml(ssf['transmitters'])}\n"
    )
    wait_until(lambda: streams(signals).get("down", {}).get("status") == "error")
    code = main(["signals", "streams", "status", "--config", str(config), "--json"])
    rows = {r["transmitter"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert code == 1  # one stream is in error
    assert rows["idp"]["status"] == rows["mdm"]["status"] == "verified"
    assert rows["idp"]["stream_id"] == signals.pusher.stream("urn:ietf:rfc:8935")["stream_id"]
    assert rows["down"]["status"] == "error"
    code = main(
        ["signals", "streams", "configure", "--config", str(config), "--transmitter", "down"]
    )
    assert code == 1
    assert "stream not configured" in capsys.readouterr().err

    # An administrator's configure is audited as theirs, in the transaction that records it.
    def mdm_changes() -> list:
        audit = signals.app.state.oauth.audit
        return [e for e in audit.events("ssf.stream_changed") if e.detail["transmitter"] == "mdm"]

    before = len(mdm_changes())
    code = main(
        ["signals", "streams", "configure", "--config", str(config), "--transmitter", "mdm"]
    )
    assert code == 0
    wait_until(lambda: streams(signals)["mdm"]["status"] == "verified")
    configured = mdm_changes()[: len(mdm_changes()) - before][-1]
    assert configured.detail["actor"] == cli_actor()
    assert configured.detail["verification_requested"] is True


# -- 1. off-boarded mid-session -----------------------------------------------------------------


def test_session_revoked_pushed_refuses_the_next_call_and_ends_the_open_stream(signals):
    token = signals.token("sam", "deskhttp")
    listen_token = signals.token("sam", "lab")
    assert "error" not in call(signals, token).json()
    with signals.http.stream(
        "POST",
        signals.mcp_url("lab"),
        json=modern_request("w-1", "subscriptions/listen", {"notifications": {}}),
        headers=modern_headers(listen_token, "subscriptions/listen"),
    ) as stream:
        assert stream.status_code == 200
        frames = events(stream)
        assert next(frames)["method"] == "notifications/subscriptions/acknowledged"
        event = signals.pusher.set_token(
            CAEP + "session-revoked",
            {"event_timestamp": int(time.time())},
            email("sam@example.com"),
        )
        assert signals.pusher.push(event).status_code == 202
        assert list(frames) == []  # the stream ended
    refused = call(signals, token)
    assert refused.status_code == 401
    assert "invalid_token" in refused.headers["www-authenticate"]
    record = received(signals, jti_of(event))
    assert record.subject == "sam"
    assert record.detail["effects"][0]["effect"] == "revoke"
    assert record.detail["effects"][0]["result"].startswith("revoked ")


def test_an_sdk_client_whose_session_is_revoked_must_sign_in_again(signals):
    async def script(client, seen):
        first = await client.call_tool("search_customers", {"query": "a"})
        assert not first.is_error
        event = signals.pusher.set_token(CAEP + "session-revoked", {}, email("sam@example.com"))
        response = await anyio.to_thread.run_sync(signals.pusher.push, event)
        assert response.status_code == 202
        seen["signins_before"] = len(seen["redirects"])
        again = await client.call_tool("search_customers", {"query": "a"})
        assert not again.is_error
        seen["signins_after"] = len(seen["redirects"])

    seen = signals.sdk("sam", "deskhttp", "2026-07-28", script)
    # The SDK's tokens were refused; it could not refresh (the grant is revoked) and sent sam
    # through sign-in again.
    assert seen["signins_after"] > seen["signins_before"]


def test_session_revoked_by_poll_refuses_the_next_call_and_ends_the_open_stream(signals):
    token = signals.token("sam", "deskhttp")
    listen_token = signals.token("sam", "lab")
    assert "error" not in call(signals, token).json()
    with signals.http.stream(
        "POST",
        signals.mcp_url("lab"),
        json=modern_request("w-2", "subscriptions/listen", {"notifications": {}}),
        headers=modern_headers(listen_token, "subscriptions/listen"),
    ) as stream:
        assert stream.status_code == 200
        frames = events(stream)
        assert next(frames)["method"] == "notifications/subscriptions/acknowledged"
        jti = signals.poller.queue(
            signals.poller.set_token(CAEP + "session-revoked", {}, email("sam@example.com"))
        )
        assert list(frames) == []  # the stream ended
    wait_until(lambda: jti in signals.poller.acked)
    assert call(signals, token).status_code == 401
    assert received(signals, jti).detail["effects"][0]["effect"] == "revoke"


def test_a_bad_set_by_poll_is_reported_in_set_errs_and_changes_nothing(signals):
    token = signals.token("sam", "deskhttp")
    other = Transmitter(AUDIENCE)
    other.url = signals.poller.url  # the right iss, the wrong key
    jti = signals.poller.queue(
        other.set_token(CAEP + "session-revoked", {}, email("sam@example.com"))
    )
    wait_until(lambda: jti in signals.poller.errors)
    assert signals.poller.errors[jti]["err"] == "invalid_key"
    assert jti not in signals.poller.acked
    assert "error" not in call(signals, token).json()


# -- 2. device compliance becomes a fact --------------------------------------------------------


def test_device_compliance_change_becomes_a_fact_the_policy_sees(signals):
    token = signals.token("sam", "deskhttp")
    assert "error" not in call(signals, token).json()
    subject = {
        "format": "complex",
        "user": email("sam@example.com"),
        "device": {"format": "opaque", "id": "laptop-7"},
    }
    bad = signals.pusher.set_token(
        CAEP + "device-compliance-change",
        {"current_status": "not-compliant", "previous_status": "compliant"},
        subject,
    )
    assert signals.pusher.push(bad).status_code == 202
    fact = parse_fact('device_compliance(User{"sam"}, "not-compliant")')
    assert [f.fact for f in signals.store.get(("device_compliance", fact[1], None))] == [fact]
    result = received(signals, jti_of(bad)).detail["effects"][0]["result"]
    # The push transmitter does not speak for devices: that one is skipped, and the record says
    # why.
    assert result.startswith("wrote 1 fact(s)") and "skipped" in result and "Device" in result
    wait_until(lambda: "error" in call(signals, token).json())
    good = signals.pusher.set_token(
        CAEP + "device-compliance-change", {"current_status": "compliant"}, subject
    )
    assert signals.pusher.push(good).status_code == 202
    assert [f.fact for f in signals.store.get(("device_compliance", fact[1], None))] == [
        parse_fact('device_compliance(User{"sam"}, "compliant")')
    ]
    wait_until(lambda: "error" not in call(signals, token).json())


def test_an_older_compliance_event_delivered_late_does_not_make_a_device_compliant(signals):
    """Events can arrive out of order (a push retried, a poll queue): lee's device found
    compliant a minute ago, delivered after it was found not compliant, stays not compliant."""
    user = parse_fact('x(User{"lee"})')[1]
    now = int(time.time())
    newer = signals.pusher.set_token(
        CAEP + "device-compliance-change",
        {"current_status": "not-compliant", "event_timestamp": now},
        email("lee@example.com"),
    )
    older = signals.pusher.set_token(
        CAEP + "device-compliance-change",
        {"current_status": "compliant", "event_timestamp": now - 60},
        email("lee@example.com"),
    )
    assert signals.pusher.push(newer).status_code == 202
    assert signals.pusher.push(older).status_code == 202
    assert [f.fact[2] for f in signals.store.get(("device_compliance", user, None))] == [
        "not-compliant"
    ]
    result = received(signals, jti_of(older)).detail["effects"][0]["result"]
    assert result.startswith("skipped") and "older than" in result


def test_an_event_dated_ahead_cannot_hold_its_value_against_later_events(signals):
    """An event_timestamp counts no later than its SET's iat: a transmitter's bad clock (or
    a compromised device reporting its own compliance) cannot date one ahead and so keep
    every later event from changing the value."""
    user = parse_fact('x(User{"kim"})')[1]
    ahead = signals.pusher.set_token(
        CAEP + "device-compliance-change",
        {"current_status": "compliant", "event_timestamp": int(time.time()) + 365 * 86400},
        email("kim@example.com"),
    )
    assert signals.pusher.push(ahead).status_code == 202
    later = signals.pusher.set_token(
        CAEP + "device-compliance-change",
        {"current_status": "not-compliant"},
        email("kim@example.com"),
        iat=int(time.time()) + 1,
    )
    assert signals.pusher.push(later).status_code == 202
    assert [f.fact[2] for f in signals.store.get(("device_compliance", user, None))] == [
        "not-compliant"
    ]


def test_a_transmitter_that_does_not_speak_for_devices_cannot_make_one_compliant(signals):
    """A device is named by a ``complex`` subject without any mapping, so only a transmitter
    told to speak for devices (the MDM: ``devices = true``) sets their facts: the identity
    provider's SET saying laptop-9 is compliant, newer than the MDM's saying it is not, must
    not make it compliant again (nor could any transmitter's say the opposite of a device it
    does not manage)."""
    device = parse_fact('x(Device{"laptop-9"})')[1]
    laptop = {"format": "complex", "device": {"format": "opaque", "id": "laptop-9"}}
    bad = signals.poller.queue(
        signals.poller.set_token(
            CAEP + "device-compliance-change",
            {"current_status": "not-compliant"},
            laptop,
            iat=int(time.time()) - 5,
        )
    )
    wait_until(lambda: bad in signals.poller.acked)
    assert [f.fact[2] for f in signals.store.get(("device_compliance", device, None))] == [
        "not-compliant"
    ]
    good = signals.pusher.set_token(
        CAEP + "device-compliance-change", {"current_status": "compliant"}, laptop
    )
    assert signals.pusher.push(good).status_code == 202
    assert [f.fact[2] for f in signals.store.get(("device_compliance", device, None))] == [
        "not-compliant"
    ]
    result = received(signals, jti_of(good)).detail["effects"][0]["result"]
    assert "does not speak for devices" in result, result


def test_an_event_the_policy_cannot_hold_is_skipped_and_recorded(signals):
    event = signals.pusher.set_token(
        CAEP + "assurance-level-change", {"current_level": "nist-aal1"}, email("sam@example.com")
    )
    assert signals.pusher.push(event).status_code == 202
    assert signals.store.get(("assurance_level", None, None)) == []
    result = received(signals, jti_of(event)).detail["effects"][0]["result"]
    assert result.startswith("skipped") and "no use for assurance_level" in result


def test_a_claim_too_large_to_store_is_skipped_and_recorded_and_the_rest_written(signals):
    """A claim's name is the transmitter's: past the store's bound on a fact's key (PostgreSQL
    indexes no more) its fact is skipped, and the record says why; the others are written."""
    long_name = "c" * 2600
    event = signals.pusher.set_token(
        CAEP + "token-claims-change",
        {"claims": {"department": "finance", long_name: "x"}},
        email("sam@example.com"),
    )
    assert signals.pusher.push(event).status_code == 202
    stored = [f.fact for f in signals.store.get(("token_claim", None, None, None))]
    assert stored == [parse_fact('token_claim(User{"sam"}, "department", "finance")')]
    result = received(signals, jti_of(event)).detail["effects"][0]["result"]
    assert result.startswith("wrote 1 fact(s)") and "too large to store" in result


def test_an_older_claims_event_replaces_only_the_claims_no_newer_event_set(signals):
    """Without event_timestamp the SET's iat orders events. An older SET delivered late changes
    none of the claims a newer one set, and still sets the claims no newer one named."""
    user = parse_fact('x(User{"lee"})')[1]
    now = int(time.time())
    newer = signals.pusher.set_token(
        CAEP + "token-claims-change", {"claims": {"role": "contractor"}}, email("lee@example.com")
    )
    older = signals.pusher.set_token(
        CAEP + "token-claims-change",
        {"claims": {"role": "admin", "region": "eu"}},
        email("lee@example.com"),
        iat=now - 30,
    )
    assert signals.pusher.push(newer).status_code == 202
    assert signals.pusher.push(older).status_code == 202
    stored = {f.fact[2]: f.fact[3] for f in signals.store.get(("token_claim", user, None, None))}
    assert stored == {"role": "contractor", "region": "eu"}
    result = received(signals, jti_of(older)).detail["effects"][0]["result"]
    assert result.startswith("wrote 1 fact(s)") and "older than" in result


def test_a_claim_skipped_keeps_its_value_in_force(signals):
    """A claim whose new value the policy cannot hold (an integer where it declares a string)
    is skipped whole: its old value is not deleted while another claim of the event is written."""
    user = parse_fact('x(User{"dana"})')[1]
    first = signals.pusher.set_token(
        CAEP + "token-claims-change", {"claims": {"team": "ops"}}, email("dana@example.com")
    )
    assert signals.pusher.push(first).status_code == 202
    second = signals.pusher.set_token(
        CAEP + "token-claims-change",
        {"claims": {"team": 5, "site": "berlin"}},
        email("dana@example.com"),
    )
    assert signals.pusher.push(second).status_code == 202
    stored = {f.fact[2]: f.fact[3] for f in signals.store.get(("token_claim", user, None, None))}
    assert stored == {"team": "ops", "site": "berlin"}


# -- 3. RISC account-disabled -------------------------------------------------------------------


def test_risc_account_disabled_disables_the_user_and_refuses_their_tokens(signals):
    token = signals.token("dana", "deskhttp")
    event = signals.pusher.set_token(RISC + "account-disabled", {}, email("DANA@example.com"))
    assert signals.pusher.push(event).status_code == 202
    disabled = {u[0]: u[2] for u in signals.app.state.oauth.store.users()}
    assert disabled["dana"] is not None
    assert disabled["sam"] is None
    assert call(signals, token).status_code == 401
    assert received(signals, jti_of(event)).detail["effects"][0]["result"].startswith("disabled")


def test_risc_account_disabled_refuses_the_users_tokens_from_a_trusted_issuer(signals):
    """A provider's token rests on no grant of bastion's: the user disabled is refused anyway."""
    token = signals.idp.token("a", sub="lee")
    assert call(signals, token).status_code == 200
    event = signals.pusher.set_token(RISC + "account-disabled", {}, email("lee@example.com"))
    assert signals.pusher.push(event).status_code == 202
    response = call(signals, token)
    assert response.status_code == 401, response.text
    assert "'lee' is disabled" in response.json()["error_description"]


@pytest.mark.parametrize(
    ("kind", "user"), [("session-revoked", "kim"), ("credential-change", "jo")]
)
def test_a_revocation_signal_refuses_the_users_tokens_from_a_trusted_issuer_issued_before_it(
    signals, kind, user
):
    """A provider's token rests on no grant of bastion's for the signal to revoke: one issued
    (iat) at or before the revocation is refused from the next call, also for a user bastion
    does not hold; one the provider issues after it (the person signed in again) is served."""
    before = signals.idp.token("a", sub=user)
    assert call(signals, before).status_code == 200
    event = signals.pusher.set_token(CAEP + kind, {}, email(f"{user}@example.com"))
    assert signals.pusher.push(event).status_code == 202
    assert received(signals, jti_of(event)).detail["effects"][0]["effect"] == "revoke"

    for _ in range(2):
        response = call(signals, before)
        assert response.status_code == 401, response.text
        assert (
            f"'{user}' was revoked after this token was issued"
            in (response.json()["error_description"])
        )
    # Within the issuer's leeway: a token issued after the revocation, the second it happened.
    after = signals.idp.token("a", sub=user, iat=int(time.time()) + 1)
    assert call(signals, after).status_code == 200
    assert call(signals, signals.idp.token("a", sub="not-revoked")).status_code == 200


# -- 4. refusals: each refused, and nothing changes ---------------------------------------------


def _refusals(t: Transmitter):
    revoke, sam = CAEP + "session-revoked", email("sam@example.com")
    stranger = Transmitter(AUDIENCE)
    stranger.url = t.url
    unsigned = ".".join(
        base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode()
        for part in (
            {"alg": "none", "typ": "secevent+jwt"},
            {"iss": t.url, "aud": AUDIENCE, "iat": int(time.time()), "jti": "n1",
             "events": {revoke: {}}, "sub_id": sam},
        )
    ) + "."  # fmt: skip
    hs = Transmitter.hs256(
        {"iss": t.url, "aud": AUDIENCE, "iat": int(time.time()), "jti": "h1",
         "events": {revoke: {}}, "sub_id": sam}
    )  # fmt: skip
    return {
        "bad signature": (stranger.set_token(revoke, {}, sam), {}, "invalid_key"),
        "wrong iss": (t.set_token(revoke, {}, sam, iss="https://evil.example"), {}, "invalid_issuer"),
        "wrong aud": (t.set_token(revoke, {}, sam, aud="https://other.example"), {}, "invalid_audience"),
        "no aud": (t.set_token(revoke, {}, sam, aud=None), {}, "invalid_audience"),
        "aud of others only": (
            t.set_token(revoke, {}, sam, aud=["https://other.example", AUDIENCE + "/"]), {},
            "invalid_audience",
        ),
        "aud nested in a list": (
            t.set_token(revoke, {}, sam, aud=[[AUDIENCE]]), {}, "invalid_audience"
        ),
        # Compared exactly: the long s (U+017F) is "s" to str.casefold and "S" to str.upper.
        "aud in another case or letter": (
            t.set_token(revoke, {}, sam, aud=AUDIENCE.upper().replace("SSF", "\u017fsf")), {},
            "invalid_audience",
        ),
        "wrong typ": (t.set_token(revoke, {}, sam, header={"typ": "JWT"}), {}, "invalid_request"),
        "alg none": (unsigned, {}, "invalid_request"),
        "alg HS256": (hs, {}, "invalid_request"),
        "stale iat": (t.set_token(revoke, {}, sam, iat=int(time.time()) - 7200), {}, "invalid_request"),
        "future iat": (t.set_token(revoke, {}, sam, iat=int(time.time()) + 3600), {}, "invalid_request"),
        "no bearer": (t.set_token(revoke, {}, sam), {"authorization": ""}, "authentication_failed"),
        "wrong bearer": (
            t.set_token(revoke, {}, sam),
            {"authorization": "Bearer " + "x" * len(PUSH_TOKEN)},
            "authentication_failed",
        ),
        "wrong content type": (
            t.set_token(revoke, {}, sam), {"content_type": "application/json"}, "invalid_request"
        ),
        "oversized body": ("x" * 70_000, {}, "invalid_request"),
        # The replay guard is keyed by jti: a SET without one could be replayed at will. A SET
        # has no exp (RFC 8417 §2.2): a JWT that carries one is not a SET.
        "no jti": (t.set_token(revoke, {}, sam, jti=None), {}, "invalid_request"),
        "empty jti": (t.set_token(revoke, {}, sam, jti=""), {}, "invalid_request"),
        "a jti that is a number": (t.set_token(revoke, {}, sam, jti=7), {}, "invalid_request"),
        "an exp claim": (
            t.set_token(revoke, {}, sam, exp=int(time.time()) + 300), {}, "invalid_request"
        ),
        # SSF 1.0 §4.1.2-4.1.3: "The JWT sub claim MUST NOT be present in any SET containing
        # an SSF event" (an ID token or access token of the same issuer is not a SET).
        "a sub claim": (t.set_token(revoke, {}, sam, sub="sam"), {}, "invalid_request"),
    }  # fmt: skip


CASES = [
    "bad signature", "wrong iss", "wrong aud", "no aud", "aud of others only",
    "aud nested in a list", "aud in another case or letter", "wrong typ", "alg none", "alg HS256", "stale iat",
    "future iat", "no bearer", "wrong bearer", "wrong content type", "oversized body", "no jti",
    "empty jti", "a jti that is a number", "an exp claim", "a sub claim",
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_a_set_that_must_be_refused_is_refused_and_changes_nothing(signals, case):
    token = signals.token("sam", "deskhttp")
    before = len(signals.app.state.signals.audit.events("signal.received"))
    set_token, options, err = _refusals(signals.pusher)[case]
    response = signals.pusher.push(set_token, **options)
    assert response.status_code in (400, 401, 413), response.text
    assert response.json()["err"] == err
    assert "error" not in call(signals, token).json()
    assert len(signals.app.state.signals.audit.events("signal.received")) == before


def test_a_streamed_gigabyte_push_is_refused_while_it_is_read(signals):
    """The push endpoint reads its body whole, so its cap (`signals.ssf.max_body_bytes`) must
    hold while the body arrives: a gigabyte that never ends is answered 413, not buffered."""

    def gigabyte():
        chunk = b"a" * 65536
        for _ in range((1 << 30) // len(chunk)):
            yield chunk

    before = len(signals.app.state.signals.audit.events("signal.received"))
    response = signals.pusher.push(gigabyte())
    assert response.status_code == 413, response.text
    assert response.json()["err"] == "invalid_request"
    assert "signals.ssf.max_body_bytes" in response.json()["description"]
    assert len(signals.app.state.signals.audit.events("signal.received")) == before
    # The endpoint still answers the next push.
    assert signals.pusher.push("x", content_type="application/json").status_code == 400


def test_a_replayed_jti_is_refused_and_applied_only_once(signals):
    event = signals.pusher.set_token(CAEP + "session-revoked", {}, email("sam@example.com"))
    assert signals.pusher.push(event).status_code == 202
    token = signals.token("sam", "deskhttp")
    replay = signals.pusher.push(event)
    assert replay.status_code == 400
    assert replay.json()["err"] == "invalid_request"
    assert "error" not in call(signals, token).json()


# -- 5. unknown events --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "event_type",
    [
        # RISC's own session revocation, which Google's Cross-Account Protection sends.
        RISC + "sessions-revoked",
        "https://schemas.openid.net/secevent/oauth/event-type/tokens-revoked",
        RISC + "account-credential-change-required",
    ],
)
def test_every_standard_revocation_event_revokes_the_users_grants(signals, event_type):
    """A transmitter saying a user's sessions or tokens are revoked, in any of the standard
    event types for it, ends the user's access on the next call, as CAEP's own does."""
    token = signals.token("sam", "deskhttp")
    assert "error" not in call(signals, token).json()
    event = signals.pusher.set_token(event_type, {}, email("sam@example.com"))
    assert signals.pusher.push(event).status_code == 202
    assert call(signals, token).status_code == 401
    effect = received(signals, jti_of(event)).detail["effects"][0]
    assert effect["effect"] == "revoke" and effect["result"].startswith("revoked ")


def test_an_unknown_event_is_recorded_and_ignored(signals):
    token = signals.token("sam", "deskhttp")
    event = signals.pusher.set_token(
        "https://example.com/event-type/something-new", {"x": 1}, email("sam@example.com")
    )
    assert signals.pusher.push(event).status_code == 202
    record = received(signals, jti_of(event))
    assert record.detail["effects"][0]["result"] == "unknown event type: recorded and ignored"
    assert "error" not in call(signals, token).json()


def test_an_unmapped_subject_changes_nothing(signals):
    token = signals.token("sam", "deskhttp")
    # sam's address at another domain is not in the users table: nothing is guessed.
    event = signals.pusher.set_token(CAEP + "session-revoked", {}, email("sam@elsewhere.example"))
    assert signals.pusher.push(event).status_code == 202
    assert "maps to no user" in received(signals, jti_of(event)).detail["effects"][0]["result"]
    assert "error" not in call(signals, token).json()


def test_an_address_that_only_unicode_case_folding_makes_a_mapped_one_names_no_user(signals):
    """Emails compare without ASCII case only: an account at the transmitter whose address is
    another character that Unicode lowers to a mapped user's letter is not that user (its
    revocation must not lock kim out, its compliance must not be kim's)."""
    # KELVIN SIGN, which str.lower() makes the letter k: "\u212aim@example.com" is not kim's.
    event = signals.pusher.set_token(CAEP + "session-revoked", {}, email("\u212aim@example.com"))
    assert signals.pusher.push(event).status_code == 202
    effect = received(signals, jti_of(event)).detail["effects"][0]
    assert "user" not in effect, effect
    assert "maps to no user" in effect["result"]


def test_a_set_polled_twice_is_acknowledged_twice_and_applied_once(signals):
    event = signals.poller.set_token(
        RISC + "credential-compromise", {"credential_type": "password"}, email("nobody@x.example")
    )
    jti = signals.poller.queue(event)
    wait_until(lambda: jti in signals.poller.acked)
    signals.poller.queue(event)  # the transmitter delivers it again
    wait_until(lambda: signals.poller.acked.count(jti) == 2)
    assert received(signals, jti) is not None
    assert [
        e
        for e in signals.app.state.signals.audit.events("signal.received")
        if e.detail["jti"] == jti
    ] == [received(signals, jti)]


def test_one_transmitters_set_pushed_with_anothers_bearer_is_refused(signals):
    token = signals.token("sam", "deskhttp")
    # Signed by the poll transmitter (a valid SET of its own) but pushed on the push stream.
    event = signals.poller.set_token(CAEP + "session-revoked", {}, email("sam@example.com"))
    response = signals.pusher.push(event)
    assert response.status_code == 400
    # Checked against the keys of the transmitter whose bearer came, never the SET's own iss.
    assert response.json()["err"] == "invalid_key"
    assert "error" not in call(signals, token).json()


def test_facts_from_a_transmitter_with_a_fact_expiry_expire(signals):
    jti = signals.poller.queue(
        signals.poller.set_token(
            CAEP + "device-compliance-change",
            {"current_status": "not-compliant"},
            {"format": "opaque", "id": "avery-0001"},
        )
    )
    wait_until(lambda: jti in signals.poller.acked)
    (stored,) = signals.store.get(("device_compliance", parse_fact('x(User{"avery"})')[1], None))
    assert stored.fact[2] == "not-compliant"
    assert time.time() < stored.expires_at <= time.time() + 3600


@pytest.mark.parametrize(
    "typ", ["application/secevent+jwt", "SECEVENT+JWT", "Application/Secevent+JWT"]
)
def test_a_set_typed_with_the_full_or_other_case_media_type_is_applied(signals, typ):
    """``typ`` is a media type (RFC 7515 §4.1.9): compared without case, ``application/`` may be
    omitted or not. A transmitter writing it whole (or in capitals) revokes as any other; its
    revocation refused, the user's access stood."""
    token = signals.token("sam", "deskhttp")
    assert "error" not in call(signals, token).json()
    event = signals.pusher.set_token(
        CAEP + "session-revoked", {}, email("sam@example.com"), header={"typ": typ}
    )
    response = signals.pusher.push(event)
    assert response.status_code == 202, response.text
    assert call(signals, token).status_code == 401


@pytest.mark.parametrize(
    "typ",
    [
        "jwt",
        "application/jwt",
        "secevent+jwt; x=1",
        "text/secevent+jwt",
        "application/secevent+jwt+x",
        "secevent+jwt ",
        None,
    ],
)
def test_a_set_typed_as_anything_else_is_refused(signals, typ):
    token = signals.token("sam", "deskhttp")
    event = signals.pusher.set_token(
        CAEP + "session-revoked", {}, email("sam@example.com"), header={"typ": typ}
    )
    response = signals.pusher.push(event)
    assert response.status_code == 400, response.text
    assert response.json()["err"] == "invalid_request"
    assert "error" not in call(signals, token).json()


def test_a_revocation_naming_the_user_among_aliases_revokes_and_one_naming_two_users_nothing(
    signals,
):
    """RFC 9493 ``aliases``: a session-revoked naming sam by one of several identifiers
    revokes sam's grants (it was ignored: the user kept access); identifiers that map to two
    users name neither, and nothing is revoked."""
    rowan = signals.token("rowan", "deskhttp")
    assert call(signals, rowan).status_code == 200
    both = signals.pusher.set_token(
        CAEP + "session-revoked",
        {},
        {
            "format": "aliases",
            "identifiers": [email("rowan@example.com"), email("sam@example.com")],
        },
    )
    assert signals.pusher.push(both).status_code == 202
    assert "more than one user" in received(signals, jti_of(both)).detail["effects"][0]["result"]
    # rowan's token stands (the policy answers her call; it is not 401 invalid_token).
    assert call(signals, rowan).status_code == 200
    sam = signals.token("sam", "deskhttp")
    assert "error" not in call(signals, sam).json()
    event = signals.pusher.set_token(
        CAEP + "session-revoked",
        {},
        {
            "format": "aliases",
            "identifiers": [
                {"format": "iss_sub", "iss": "https://idp.example", "sub": "00u9"},
                email("SAM@example.com"),
            ],
        },
    )
    assert signals.pusher.push(event).status_code == 202
    assert call(signals, sam).status_code == 401
    effect = received(signals, jti_of(event)).detail["effects"][0]
    assert effect["user"] == "sam" and effect["result"].startswith("revoked ")


# -- 6. subjects as the specifications write them ---------------------------------------------


def test_a_risc_subject_named_by_subject_type_as_googles_transmitter_writes_it_revokes(signals):
    """RISC 1.0 (Google compatibility): Google's RISC transmitter writes a subject's format as
    ``subject_type``, in the event's ``subject``, and receivers are told to read it. bastion read
    only ``format``: Google's sessions-revoked for sam was ignored, and sam kept access."""
    token = signals.token("sam", "deskhttp")
    assert "error" not in call(signals, token).json()
    event = signals.pusher.set_token(
        RISC + "sessions-revoked",
        {"subject": {"subject_type": "email", "email": "sam@example.com"}},
    )
    assert signals.pusher.push(event).status_code == 202
    effect = received(signals, jti_of(event)).detail["effects"][0]
    assert effect.get("user") == "sam", effect
    assert call(signals, token).status_code == 401


def test_a_user_named_by_phone_number_is_revoked(signals):
    """RFC 9493 §3.2 ``phone_number``: a users table may map one (``phone_number:<E.164>``);
    RISC's identifier events name people by phone too. Before, the format was not read."""
    token = signals.token("morgan", "deskhttp")
    assert call(signals, token).status_code == 200
    event = signals.pusher.set_token(
        CAEP + "session-revoked", {}, {"format": "phone_number", "phone_number": "+12025550123"}
    )
    assert signals.pusher.push(event).status_code == 202
    assert call(signals, token).status_code == 401


def test_aliases_holding_an_identifier_of_a_format_not_mapped_still_name_the_user(signals):
    """RFC 9493 §3.2.8 ``aliases``: any identifier names the subject. One of a format bastion
    does not read (a proprietary one, SSF 1.0 §3.4) made the whole subject unreadable: sam's
    session-revoked was ignored, and sam kept access."""
    token = signals.token("sam", "deskhttp")
    assert "error" not in call(signals, token).json()
    event = signals.pusher.set_token(
        CAEP + "session-revoked",
        {},
        {
            "format": "aliases",
            "identifiers": [
                {"format": "x-employee", "number": "42"},
                email("sam@example.com"),
            ],
        },
    )
    assert signals.pusher.push(event).status_code == 202
    assert call(signals, token).status_code == 401
    assert received(signals, jti_of(event)).detail["effects"][0]["user"] == "sam"


def test_an_event_whose_subject_holds_a_critical_member_not_understood_is_discarded(signals):
    """SSF 1.0 §3.6: "An SSF Receiver MUST discard any event that contains a Subject with a
    Critical member that it is unable to process" (the transmitter's critical_subject_members,
    §7.1). A tenant's compliance is not the user's: bastion wrote it as the user's, and a
    device compliant in another tenant made quinn compliant here."""
    user = parse_fact('x(User{"quinn"})')[1]
    quinn = email("quinn@example.com")
    bad = signals.pusher.set_token(
        CAEP + "device-compliance-change", {"current_status": "not-compliant"}, quinn
    )
    assert signals.pusher.push(bad).status_code == 202
    elsewhere = {"format": "complex", "user": quinn, "tenant": {"format": "opaque", "id": "t-9"}}
    good = signals.pusher.set_token(
        CAEP + "device-compliance-change", {"current_status": "compliant"}, elsewhere
    )
    assert signals.pusher.push(good).status_code == 202
    assert [f.fact[2] for f in signals.store.get(("device_compliance", user, None))] == [
        "not-compliant"
    ]
    result = received(signals, jti_of(good)).detail["effects"][0]["result"]
    assert "critical" in result and "tenant" in result, result
    # A revocation is applied anyway (fail closed): all of quinn's grants, a superset of the
    # tenant's.
    token = signals.token("quinn", "deskhttp")
    revoked = signals.pusher.set_token(CAEP + "session-revoked", {}, elsewhere)
    assert signals.pusher.push(revoked).status_code == 202
    assert call(signals, token).status_code == 401


def test_the_events_initiating_entity_and_administrative_reason_are_in_its_audit_record(signals):
    """CAEP 1.0 §2: ``reason_admin`` is "a localizable administrative message intended for
    logging and auditing"; ``initiating_entity`` says who invoked the event. Neither reached
    the audit record: why the IdP revoked a session could not be told from bastion's trail."""
    event = signals.pusher.set_token(
        CAEP + "session-revoked",
        {
            "initiating_entity": "policy",
            "reason_admin": {"en": "Landspeed Policy Violation: C076E82F"},
            "reason_user": {"en": "not for the audit"},
        },
        email("nobody@example.com"),
    )
    assert signals.pusher.push(event).status_code == 202
    effect = received(signals, jti_of(event)).detail["effects"][0]
    assert effect["initiating_entity"] == "policy"
    assert effect["reason_admin"] == {"en": "Landspeed Policy Violation: C076E82F"}
    assert "reason_user" not in effect


# -- events and subjects read since 2026-12-06 -----------------------------------------------------


def test_a_users_risk_level_becomes_a_fact_the_policy_reads(signals):
    """CAEP 1.0 §3.8 risk-level-change: ``risk_level(User{...}, "<LOW|MEDIUM|HIGH>")``, the
    later event winning; a session's risk, or a level CAEP does not define, changes nothing
    and says why. It was recorded and ignored."""
    casey = email("casey@example.com")
    token = signals.token("casey", "deskhttp")
    assert "error" not in call(signals, token).json()

    def risk(body: dict) -> dict:
        event = signals.pusher.set_token(
            CAEP + "risk-level-change", {"event_timestamp": int(time.time()), **body}, casey
        )
        assert signals.pusher.push(event).status_code == 202
        return received(signals, jti_of(event)).detail["effects"][0]

    effect = risk({"current_level": "HIGH", "principal": "USER", "risk_reason": "breach"})
    assert effect["effect"] == "fact" and effect["result"].startswith("wrote 1 fact"), effect
    # deny ... if risk_level(user, "HIGH"), once the replica applied the change
    wait_until(lambda: "error" in call(signals, token).json())
    for body, why in (
        ({"current_level": "LOW", "principal": "SESSION"}, "is not USER or DEVICE"),
        ({"current_level": "low", "principal": "USER"}, "must be LOW, MEDIUM or HIGH"),
        ({"current_level": "LOW"}, "is not USER or DEVICE"),
    ):
        assert why in risk(body)["result"]
        assert "error" in call(signals, token).json()  # still HIGH
    risk({"current_level": "LOW", "principal": "USER", "previous_level": "HIGH"})
    wait_until(lambda: "error" not in call(signals, token).json())
    user = parse_fact('x(User{"casey"})')[1]
    (stored,) = signals.store.get(("risk_level", user, None))
    assert stored.fact[2] == "LOW"


def test_an_identifier_changed_event_is_recorded_with_the_mapping_it_needs_and_remaps_nothing(
    signals,
):
    """RISC 1.0 identifier-changed: the users table stays the operator's word (a transmitter
    that could move a user's identifier could hand their events to the new holder); the record
    names the user, the new identifier and the line to add."""
    event = signals.pusher.set_token(
        RISC + "identifier-changed", {"new-value": "lee.new@example.com"}, email("lee@example.com")
    )
    assert signals.pusher.push(event).status_code == 202
    effect = received(signals, jti_of(event)).detail["effects"][0]
    assert effect["user"] == "lee" and effect["result"].startswith("recorded, not applied")
    assert '"email:lee.new@example.com" = "lee"' in effect["result"], effect
    revoked = signals.pusher.set_token(CAEP + "session-revoked", {}, email("lee.new@example.com"))
    assert signals.pusher.push(revoked).status_code == 202
    assert "maps to no user" in received(signals, jti_of(revoked)).detail["effects"][0]["result"]


@pytest.mark.parametrize(
    "sub_id, why",
    [
        ({"format": "jwt_id", "iss": "https://idp.example.com/", "jti": "B70B"}, "is a JWT"),
        ({"format": "saml_assertion_id", "issuer": "https://idp.example.com/",
          "assertion_id": "_8e8d"}, "is a SAML assertion"),
        ({"format": "ip-addresses", "ip-addresses": ["10.29.37.75", "2001:db8::1"]},
         "is IP addresses"),
        ({"format": "ip-addresses", "ip-addresses": ["not-an-address"]},
         "not an IP address"),
        ({"format": "jwt_id", "iss": "https://idp.example.com/"}, "jwt_id jti must be"),
    ],
)  # fmt: skip
def test_a_subject_naming_a_token_an_assertion_or_addresses_is_recorded_with_why(
    signals, sub_id, why
):
    """SSF 1.0 §3.4's jwt_id, saml_assertion_id and ip-addresses name no user or device bastion
    knows: the event is recorded, ignored, and says which and why (it said the format was not
    read)."""
    token = signals.token("sam", "deskhttp")
    event = signals.pusher.set_token(CAEP + "session-revoked", {}, sub_id)
    assert signals.pusher.push(event).status_code == 202
    effect = received(signals, jti_of(event)).detail["effects"][0]
    assert effect["result"].startswith("ignored: ") and why in effect["result"], effect
    assert "error" not in call(signals, token).json()
