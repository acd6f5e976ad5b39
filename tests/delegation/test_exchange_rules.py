"""Token exchange's rules, each tried and refused against a real `bastion serve`: RFC 8693's
errors, the policy's say (may_delegate, delegated_scope with live signals), the chain's depth,
``may_act``, the kinds of tokens accepted, and malformed ``act`` claims at the gateway. Tokens
with claims bastion itself never issues (``may_act``, a broken ``act``, an expired one) are
signed here with the server's own key and recorded as issued, so only the rule under test can
refuse them."""

from __future__ import annotations

import time
import uuid

import pytest

from bastion.db import Database
from bastion.oauth.access_token import mint_access_token
from bastion.oauth.keys import KeyRing
from bastion.oauth.store import OAuthStore

from .support import ACCESS_TOKEN, ADMIN_KEY, claims, start_studio


def cast(studio, name: str, *, sub_roles=("illustrator",), sub_scope: str | None = None):
    coder = studio.coding_agent(name)
    sub = studio.sub_agent(f"{name}-sub", **({"scope": sub_scope} if sub_scope else {}))
    studio.facts(
        ("has_role", f"Agent:{coder.client_id}", "coder", "McpServer:studio"),
        *(("has_role", f"Agent:{sub.client_id}", role, "McpServer:studio") for role in sub_roles),
        ("may_use_folder", f"Agent:{sub.client_id}", "icons"),
    )
    return coder, sub


def error(response) -> tuple[int, str]:
    return response.status_code, response.json().get("error")


def reissue(studio, token: str, **changes) -> str:
    """``token`` signed again by the server's key with ``changes`` to its claims (None drops
    one), under the same grant, recorded as issued: a token bastion would accept but for the
    rule under test."""
    db = Database(studio.database, role="test")
    try:
        store = OAuthStore(db)
        keys = KeyRing(store, studio.directory / "keys", retain_seconds=600, clock=time.time)
        old = claims(token)
        grant_id = store.access_token_state(old["jti"]).grant_id
        extra = {
            k: v for k, v in changes.items() if k not in ("iat", "exp", "aud") and v is not None
        }
        issued_at = changes.get("iat", old["iat"])
        minted = mint_access_token(
            keys,
            issuer=old["iss"],
            subject=old["sub"],
            client_id=old["client_id"],
            resource=changes.get("aud", old["aud"]),
            scope=old["scope"],
            now=issued_at,
            seconds=changes.get("exp", old["exp"]) - issued_at,
            extra={**{k: v for k, v in old.items() if k in ("act", "task")}, **extra}
            if "act" not in changes or changes["act"] is not None
            else extra,
        )
        store.save_access_token(minted.jti, grant_id, minted.expires_at, minted.token, minted.kid)
        return minted.token
    finally:
        db.close()


# -- what is issued ------------------------------------------------------------------------


def test_conditional_delegation_trims_writes_while_the_device_is_out_of_compliance(studio):
    coder, sub = cast(studio, "conditional")
    subject = studio.user_token(coder, "sam")["access_token"]
    studio.signal("sam", "device_compliant", False)
    try:
        answer = studio.exchange(coder, subject, studio.own_token(sub))
        assert answer.status_code == 200, answer.text
        assert answer.json()["scope"] == "files:read"
        read_only = answer.json()["access_token"]
        refused = studio.exchange(coder, subject, studio.own_token(sub), scope="svg:write")
        assert error(refused) == (400, "invalid_scope")
        # The read-only token reads, and cannot write (403 insufficient_scope).
        assert "result" in studio.call(read_only, "read_file", folder="icons", name="logo.svg")
        assert studio.call(read_only, "write_svg", folder="icons", name="x", svg="s")["http"] == 403
    finally:
        studio.signal("sam", "device_compliant", True)
    answer = studio.exchange(coder, subject, studio.own_token(sub))
    assert answer.status_code == 200, answer.text
    assert answer.json()["scope"] == "files:read files:write svg:write"
    trimmed = [
        e.detail["trimmed"]
        for e in studio.events("token.exchanged")
        if e.client_id == sub.client_id
    ]
    assert trimmed == [[], ["files:write", "svg:write"]]  # newest first


def test_scopes_never_widen_beyond_the_subject_token_or_the_actors_registration(studio):
    coder, sub = cast(studio, "narrow", sub_scope="files:read svg:write")
    subject = studio.user_token(coder, "sam", scope="files:read")["access_token"]
    wider = studio.exchange(coder, subject, studio.own_token(sub), scope="files:read svg:write")
    assert error(wider) == (400, "invalid_scope")
    subject = studio.user_token(coder, "sam")["access_token"]
    unregistered = studio.exchange(coder, subject, studio.own_token(sub), scope="files:write")
    assert error(unregistered) == (400, "invalid_scope")
    answer = studio.exchange(coder, subject, studio.own_token(sub))
    assert answer.json()["scope"] == "files:read svg:write"


def test_the_lifetime_never_exceeds_the_subject_tokens(studio):
    coder, sub = cast(studio, "short")
    subject = studio.user_token(coder, "sam")["access_token"]
    soon = int(time.time()) + 20
    short = reissue(studio, subject, exp=soon)
    answer = studio.exchange(coder, short, studio.own_token(sub))
    assert answer.status_code == 200, answer.text
    assert claims(answer.json()["access_token"])["exp"] <= soon
    assert answer.json()["expires_in"] <= 20


# -- refusals ------------------------------------------------------------------------------


def test_a_client_cannot_exchange_another_clients_token(studio):
    coder, sub = cast(studio, "victim")
    thief, _ = cast(studio, "thief")
    subject = studio.user_token(coder, "sam")["access_token"]
    assert error(studio.exchange(thief, subject, studio.own_token(sub))) == (
        400,
        "invalid_request",
    )
    # Nor may the sub-agent present the coding agent's token as its own.
    assert error(studio.exchange(sub, subject, studio.own_token(sub)))[1] in (
        "invalid_request",
        "unauthorized_client",
    )
    refused = [e for e in studio.events("token.exchange_refused") if e.client_id == thief.client_id]
    assert refused and refused[0].detail["chain"] == [coder.client_id]


def test_expired_and_revoked_subject_tokens_are_refused(studio):
    coder, sub = cast(studio, "stale")
    tokens = studio.user_token(coder, "sam")
    now = int(time.time())
    expired = reissue(studio, tokens["access_token"], iat=now - 600, exp=now - 1)
    assert error(studio.exchange(coder, expired, studio.own_token(sub))) == (400, "invalid_request")
    revoked = studio.http.post(
        f"{studio.url}/revoke",
        data={"token": tokens["access_token"], "client_id": coder.client_id},
    )
    assert revoked.status_code == 200
    answer = studio.exchange(coder, tokens["access_token"], studio.own_token(sub))
    assert error(answer) == (400, "invalid_request")
    assert "revoked" in answer.json()["error_description"]


def test_an_actor_token_must_be_the_actors_own_client_credentials_token(studio):
    coder, sub = cast(studio, "kinds")
    subject = studio.user_token(coder, "sam")["access_token"]
    # A person's token (the coding agent's own) is not an actor's proof.
    person = studio.user_token(coder, "sam")["access_token"]
    assert error(studio.exchange(coder, subject, person)) == (400, "invalid_request")
    # Nor is a delegated token.
    delegated = studio.exchange(coder, subject, studio.own_token(sub)).json()["access_token"]
    assert error(studio.exchange(coder, subject, delegated)) == (400, "invalid_request")
    # Nor a token of another type, or none.
    wrong_type = studio.exchange(
        coder,
        subject,
        studio.own_token(sub),
        actor_token_type="urn:ietf:params:oauth:token-type:jwt",
    )
    assert error(wrong_type) == (400, "invalid_request")
    assert error(studio.exchange(coder, subject, "")) == (400, "invalid_request")
    assert error(studio.exchange(coder, subject, "not-a-token")) == (400, "invalid_request")


def test_the_policy_decides_who_may_be_delegated_to(studio):
    coder, stranger = cast(studio, "deny-by-default", sub_roles=())
    subject = studio.user_token(coder, "sam")["access_token"]
    answer = studio.exchange(coder, subject, studio.own_token(stranger))
    assert error(answer) == (400, "invalid_request")
    assert "may_delegate" in answer.json()["error_description"]
    event = [
        e
        for e in studio.events("token.exchange_refused")
        if e.detail.get("actor") == stranger.client_id
    ]
    assert event and event[0].detail["chain"] == [coder.client_id, stranger.client_id]


def suspension(studio, method: str, kind: str, id: str) -> None:
    """Suspend (POST) or resume (DELETE) through /v1/suspensions, the kill switch."""
    headers = {"authorization": f"Bearer {ADMIN_KEY}"}
    if method == "POST":
        url, body = f"{studio.url}/v1/suspensions", {"kind": kind, "id": id}
        answer = studio.http.post(url, json=body, headers=headers)
    else:
        answer = studio.http.delete(f"{studio.url}/v1/suspensions/{kind}/{id}", headers=headers)
    assert answer.status_code in (200, 201), answer.text


def test_no_agent_of_a_chain_may_be_suspended_for_a_token_to_be_exchanged_or_introspected(
    studio,
):
    coder, sub = cast(studio, "kill-switch")
    resource_server = studio.register(
        "--name", "kill-switch-rs", "--confidential",
        "--grant-type", "client_credentials", "--introspection", "*",
    )  # fmt: skip
    rs = (resource_server["client_id"], resource_server["client_secret"])

    def introspect(token: str) -> dict:
        answer = studio.http.post(f"{studio.url}/introspect", data={"token": token}, auth=rs)
        return answer.json()

    subject = studio.user_token(coder, "sam")["access_token"]
    actor = studio.own_token(sub)
    delegated = studio.exchange(coder, subject, actor).json()["access_token"]
    refused = {}
    for suspended in (coder, sub):
        suspension(studio, "POST", "agent", suspended.client_id)
        try:
            refused[suspended.client_id] = studio.exchange(coder, subject, actor)
            # The delegated token's chain holds the suspended agent, first or last.
            assert introspect(delegated) == {"active": False}
        finally:
            suspension(studio, "DELETE", "agent", suspended.client_id)
    for agent, answer in refused.items():
        assert error(answer) == (400, "invalid_request")  # RFC 8693 §2.2.2
        assert f"agent {agent!r} is suspended" in answer.json()["error_description"]
    assert studio.exchange(coder, subject, actor).status_code == 200
    assert introspect(delegated)["active"] is True


def test_a_chain_cannot_grow_past_max_delegation_depth(studio):
    # The studio allows 2 delegations (oauth.max_delegation_depth = 2).
    coder, first = cast(studio, "deep", sub_roles=("illustrator", "coder"))
    second = studio.sub_agent("deep-2")
    third = studio.sub_agent("deep-3")
    for agent in (second, third):
        studio.facts(
            ("has_role", f"Agent:{agent.client_id}", "illustrator", "McpServer:studio"),
            ("has_role", f"Agent:{agent.client_id}", "coder", "McpServer:studio"),
        )
    token = studio.user_token(coder, "sam")["access_token"]
    token = studio.exchange(coder, token, studio.own_token(first)).json()["access_token"]
    answer = studio.exchange(first, token, studio.own_token(second))
    assert answer.status_code == 200, answer.text
    token = answer.json()["access_token"]
    assert claims(token)["act"] == {
        "sub": second.client_id,
        "act": {"sub": first.client_id, "act": {"sub": coder.client_id}},
    }
    answer = studio.exchange(second, token, studio.own_token(third))
    assert error(answer) == (400, "invalid_request")
    assert "max_delegation_depth" in answer.json()["error_description"]


@pytest.fixture(scope="module")
def deep_studio(tmp_path_factory):
    """A studio allowing 4 delegations: room for a loop the depth alone would not refuse."""
    with start_studio(tmp_path_factory.mktemp("deep"), max_delegation_depth=4) as running:
        yield running


def test_a_chain_cannot_loop_back_to_an_agent_already_in_it(deep_studio):
    studio = deep_studio
    coder, first = cast(studio, "loop", sub_roles=("illustrator", "coder"))
    second = studio.sub_agent("loop-2")
    studio.facts(
        ("has_role", f"Agent:{second.client_id}", "illustrator", "McpServer:studio"),
        ("has_role", f"Agent:{second.client_id}", "coder", "McpServer:studio"),
    )
    token = studio.user_token(coder, "sam")["access_token"]
    token = studio.exchange(coder, token, studio.own_token(first)).json()["access_token"]
    answer = studio.exchange(first, token, studio.own_token(second))
    assert answer.status_code == 200, answer.text
    # coder -> first -> second -> first: 3 delegations of the 4 allowed, and the policy lets
    # second delegate to first; only the loop refuses it.
    looped = studio.exchange(second, answer.json()["access_token"], studio.own_token(first))
    assert error(looped) == (400, "invalid_request"), looped.text
    assert "already in the chain" in looped.json()["error_description"]


def test_may_act_names_the_only_actor_allowed(studio):
    coder, sub = cast(studio, "may-act")
    subject = studio.user_token(coder, "sam")["access_token"]
    someone_else = reissue(studio, subject, may_act={"sub": "someone-else"})
    assert error(studio.exchange(coder, someone_else, studio.own_token(sub))) == (
        400,
        "invalid_request",
    )
    malformed = reissue(studio, subject, may_act="everyone")
    assert error(studio.exchange(coder, malformed, studio.own_token(sub)))[1] == "invalid_request"
    named = reissue(studio, subject, may_act={"sub": sub.client_id})
    assert studio.exchange(coder, named, studio.own_token(sub)).status_code == 200


def test_may_act_naming_a_party_bastion_cannot_match_is_refused(studio):
    """RFC 8693 §4.4: the members of ``may_act`` are claims that identify the party that may
    act. One naming the sub-agent's ``sub`` but another issuer (``iss``), or by a claim bastion
    cannot check against its client, names someone else: it licenses no exchange."""
    coder, sub = cast(studio, "may-act-iss")
    subject = studio.user_token(coder, "sam")["access_token"]
    for may_act in (
        {"sub": sub.client_id, "iss": "https://elsewhere.example.com"},
        {"sub": sub.client_id, "email": "icons@example.com"},
    ):
        other = reissue(studio, subject, may_act=may_act)
        answer = studio.exchange(coder, other, studio.own_token(sub))
        assert error(answer) == (400, "invalid_request"), answer.text
        assert "may_act" in answer.json()["error_description"]
    # Named by every claim bastion knows of it: its sub, its client_id and bastion's issuer.
    issuer = claims(subject)["iss"]
    named = reissue(
        studio, subject, may_act={"sub": sub.client_id, "client_id": sub.client_id, "iss": issuer}
    )
    assert studio.exchange(coder, named, studio.own_token(sub)).status_code == 200


def test_a_resource_or_audience_given_twice_is_invalid_target(studio):
    """RFC 8693 §2.1 lets ``resource`` and ``audience`` repeat (one token for every target
    named); bastion issues a token for one resource, and §2.2.2: "If the authorization server
    is unwilling or unable to issue a token for any target service indicated by the resource or
    audience parameters, the invalid_target error code SHOULD be used"."""
    coder, sub = cast(studio, "two-targets")
    subject = studio.user_token(coder, "sam")["access_token"]
    for name in ("resource", "audience"):
        twice = [studio.mcp_url, "https://elsewhere.example.com/mcp"]
        answer = studio.exchange(coder, subject, studio.own_token(sub), **{name: twice})
        assert error(answer) == (400, "invalid_target"), answer.text
        assert name in answer.json()["error_description"]


def test_a_resource_or_audience_other_than_the_subject_tokens_is_refused(studio):
    coder, sub = cast(studio, "target")
    subject = studio.user_token(coder, "sam")["access_token"]
    for name in ("resource", "audience"):
        answer = studio.exchange(coder, subject, studio.own_token(sub), **{name: "https://x/mcp"})
        assert error(answer) == (400, "invalid_target")
    same = studio.exchange(coder, subject, studio.own_token(sub), resource=studio.mcp_url)
    assert same.status_code == 200, same.text


def test_a_subject_token_for_a_resource_no_longer_served_is_refused(studio):
    # A token bastion issued for a resource since removed from its configuration.
    coder, sub = cast(studio, "removed")
    subject = studio.user_token(coder, "sam")["access_token"]
    gone = reissue(studio, subject, aud="https://removed.example/mcp")
    answer = studio.exchange(coder, gone, studio.own_token(sub))
    assert error(answer) == (400, "invalid_target")
    assert "no longer a protected resource" in answer.json()["error_description"]


def test_a_refresh_token_is_never_issued_or_accepted(studio):
    coder, sub = cast(studio, "refresh")
    tokens = studio.user_token(coder, "sam")
    refresh = "urn:ietf:params:oauth:token-type:refresh_token"
    answer = studio.exchange(
        coder, tokens["access_token"], studio.own_token(sub), requested_token_type=refresh
    )
    assert error(answer) == (400, "invalid_request")
    as_subject = studio.exchange(
        coder, tokens["refresh_token"], studio.own_token(sub), subject_token_type=refresh
    )
    assert error(as_subject) == (400, "invalid_request")
    answer = studio.exchange(
        coder, tokens["access_token"], studio.own_token(sub), requested_token_type=ACCESS_TOKEN
    )
    assert answer.status_code == 200 and "refresh_token" not in answer.json()


def test_a_client_not_registered_for_the_grant_cannot_exchange(studio):
    created = studio.register(
        "--name", "plain", "--redirect-uri", "http://127.0.0.1:9/callback",
    )  # fmt: skip
    from .support import Agent

    plain = Agent(created["client_id"])
    _, sub = cast(studio, "plain-sub")
    subject = studio.user_token(plain, "sam")["access_token"]
    assert error(studio.exchange(plain, subject, studio.own_token(sub))) == (
        400,
        "unauthorized_client",
    )


def test_a_task_is_refused_while_no_tasks_are_served(studio):
    coder, sub = cast(studio, "task")
    subject = studio.user_token(coder, "sam")["access_token"]
    answer = studio.exchange(coder, subject, studio.own_token(sub), task="t-1")
    assert error(answer) == (400, "invalid_request")


def test_the_metadata_lists_the_grant(studio):
    metadata = studio.http.get(f"{studio.url}/.well-known/oauth-authorization-server").json()
    assert "urn:ietf:params:oauth:grant-type:token-exchange" in metadata["grant_types_supported"]


# -- the gateway reads the chain -----------------------------------------------------------


@pytest.mark.parametrize(
    "act",
    [
        "someone",
        {"sub": ""},
        {"sub": 7},
        {"sub": "not-the-client"},
        {"act": {"sub": "x"}},
        "deep",
    ],
)
def test_the_gateway_refuses_a_malformed_act_claim(studio, act):
    coder, sub = cast(studio, f"act-{uuid.uuid4().hex[:6]}")
    subject = studio.user_token(coder, "sam")["access_token"]
    delegated = studio.exchange(coder, subject, studio.own_token(sub)).json()["access_token"]
    if act == "deep":
        act = {"sub": "a"}
        for _ in range(20):
            act = {"sub": "a", "act": act}
        act = {"sub": sub.client_id, "act": act}
    broken = reissue(studio, delegated, act=act)
    answer = studio.call(broken, "read_file", folder="icons", name="logo.svg")
    assert answer["http"] == 401 and "act" in answer["body"]
    # The same token with its act intact is served: only the claim refused it.
    assert "result" in studio.call(delegated, "read_file", folder="icons", name="logo.svg")


@pytest.fixture(scope="module")
def posture_studio(tmp_path_factory):
    """A studio whose token endpoint reads a device header from a trusted proxy (loopback)."""
    settings = (
        '[signals.posture]\ntrusted_proxies = ["127.0.0.1/32"]\ndevice_header = "X-Device-Id"\n'
    )
    with start_studio(tmp_path_factory.mktemp("posture"), settings=settings) as running:
        yield running


@pytest.mark.parametrize("order", [("laptop-7", "phone-2"), ("phone-2", "laptop-7")])
def test_an_exchange_with_a_device_header_sent_twice_is_refused(posture_studio, order):
    """The exchange's policy reads the request's posture as the gateway's does: with the
    device header twice, the last copy was read, whichever was the proxy's; now refused, as at
    the gateway, and nothing is issued."""
    studio = posture_studio
    coder, sub = cast(studio, f"device-twice-{order[0]}")
    subject = studio.user_token(coder, "sam")["access_token"]
    form = {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "subject_token": subject,
        "subject_token_type": ACCESS_TOKEN,
        "actor_token": studio.own_token(sub),
        "actor_token_type": ACCESS_TOKEN,
        "client_id": coder.client_id,
    }
    once = [("X-Device-Id", order[0])]
    answer = studio.http.post(
        f"{studio.url}/token", data=form, headers=[*once, ("X-Device-Id", order[1])]
    )
    assert error(answer) == (400, "invalid_request"), answer.text
    assert "x-device-id" in answer.json()["error_description"]
    assert studio.http.post(f"{studio.url}/token", data=form, headers=once).status_code == 200
