"""RFC 7662 introspection says of an active access token exactly what the token says of itself:
each answer is compared, whole, with the claims of the JWT it is about (plus ``active`` and
``token_type``, "DPoP" for a token bound to a key, RFC 9449 §6.2). So a resource server that
introspects instead of verifying the JWT sees when and how the person signed in (``auth_time``,
``acr``, ``amr``: RFC 9470 §3, for step-up and multi-factor rules), a delegation's ``act``
chain (RFC 8693 §4.1) and a binding's ``cnf`` as the gateway's policy does. A refresh token's
answer names its grant's sign-in too; an inactive token is still ``{"active": false}`` and
nothing more; only a client an admin allowed may ask, about any token.

Real HTTP throughout: a bastion on loopback, an enterprise identity provider issuing ID-JAGs
(whose ``acr`` and ``amr`` the grant keeps), real DPoP proofs, real token exchanges."""

from __future__ import annotations

import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from bastion.delegation.tasks import Tasks
from bastion.facts.store import FactStore
from bastion.oauth.jwt_bearer import JWT_BEARER_GRANT_TYPE
from tests.delegation.test_delegated_grants import (
    chain_of_three,
    coding_agent,
    exchange,
    own_token,
    policy_for,
    sub_agent,
)
from tests.identity.test_dpop import Holder
from tests.identity.test_id_jag import EnterpriseIdp

from .support import Bastion, free_socket, running_bastion, serve
from .test_endpoints import IAT, assert_oauth_error, basic, confidential
from .test_introspection_audit import claims, introspect, resource_server


@pytest.fixture(scope="module")
def idp() -> Iterator[EnterpriseIdp]:
    provider = EnterpriseIdp()
    with serve(provider.app, free_socket()) as url:
        provider.url = url
        yield provider


@pytest.fixture
def bastion(sqlite_url, tmp_path, idp) -> Iterator[Bastion]:
    id_jag = {"issuers": [{"issuer": idp.issuer("acme")}]}
    with running_bastion(sqlite_url, tmp_path, id_jag=id_jag) as running:
        yield running


def as_the_token_says(token: str) -> dict:
    """The introspection answer an active ``token`` must get: its claims, each as it is."""
    carried = claims(token)
    return {"active": True, "token_type": "DPoP" if "cnf" in carried else "Bearer", **carried}


def enterprise_agent(bastion: Bastion) -> dict:
    response = bastion.http.post(
        f"{bastion.url}/register",
        json={
            "client_name": "enterprise agent",
            "grant_types": [JWT_BEARER_GRANT_TYPE],
            "token_endpoint_auth_method": "client_secret_basic",
            "scope": "tools:read",
        },
        headers=IAT,
    )
    assert response.status_code == 201, response.text
    return response.json()


def through_an_id_jag(
    bastion: Bastion, idp: EnterpriseIdp, agent: dict, holder: Holder | None = None, **said
) -> str:
    """alice's access token for ``agent`` from an ID-JAG saying ``said`` (``acr``, ``amr``,
    ``auth_time``), bound to ``holder``'s key when one is given."""
    # The provider writes the ID-JAG for a bastion whose resources are the gateway's servers'.
    audience = SimpleNamespace(url=bastion.url, mcp_url=lambda _server: bastion.resource)
    jag = idp.id_jag(audience, agent["client_id"], sub="alice", scope="tools:read", **said)
    token_url = f"{bastion.url}/token"
    response = bastion.http.post(
        token_url,
        data={"grant_type": JWT_BEARER_GRANT_TYPE, "assertion": jag},
        auth=(agent["client_id"], agent["client_secret"]),
        headers={"DPoP": holder.proof("POST", token_url)} if holder else None,
    )
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


def test_a_password_sign_in_is_introspected_with_its_auth_time_and_amr(bastion: Bastion):
    asker = resource_server(bastion)
    token = bastion.tokens_for(bastion.register())["access_token"]
    carried = claims(token)
    assert isinstance(carried["auth_time"], int) and carried["amr"] == ["pwd"]
    assert "acr" not in carried  # bastion names no class of its own for a password
    assert introspect(bastion, asker, token) == as_the_token_says(token)


def test_an_id_jags_acr_amr_and_auth_time_are_introspected_as_the_token_carries_them(
    bastion: Bastion, idp: EnterpriseIdp
):
    asker, agent = resource_server(bastion), enterprise_agent(bastion)
    signed_in = int(time.time()) - 120
    token = through_an_id_jag(
        bastion, idp, agent, acr="phr", amr=["pwd", "mfa", "hwk"], auth_time=signed_in
    )
    answer = introspect(bastion, asker, token)
    assert answer == as_the_token_says(token)
    assert (answer["acr"], answer["amr"], answer["auth_time"]) == (
        "phr",
        ["pwd", "mfa", "hwk"],
        signed_in,
    )
    # An ID-JAG that says nothing of the sign-in: neither does the token, nor the answer.
    silent = through_an_id_jag(bastion, idp, agent)
    assert not {"acr", "amr", "auth_time"} & claims(silent).keys()
    assert introspect(bastion, asker, silent) == as_the_token_says(silent)


def test_a_dpop_bound_token_is_introspected_with_its_binding(bastion: Bastion, idp: EnterpriseIdp):
    asker, agent, holder = resource_server(bastion), enterprise_agent(bastion), Holder()
    token = through_an_id_jag(bastion, idp, agent, holder, acr="phr", amr=["hwk", "mfa"])
    answer = introspect(bastion, asker, token)
    assert answer == as_the_token_says(token)
    assert answer["token_type"] == "DPoP" and answer["cnf"] == {"jkt": holder.jkt}
    assert answer["amr"] == ["hwk", "mfa"]


def test_delegated_tokens_are_introspected_with_their_act_chain_and_the_users_sign_in(
    bastion: Bastion,
):
    asker = resource_server(bastion)
    tokens, delegated = chain_of_three(bastion)
    subject = claims(tokens["access_token"])
    for token in (tokens["access_token"], *delegated):
        assert introspect(bastion, asker, token) == as_the_token_says(token)
    deepest = introspect(bastion, asker, delegated[1])
    assert deepest["act"]["act"]["act"]["sub"] == subject["client_id"]
    # The sign-in behind every token of the chain is the user's, never an agent's.
    assert (deepest["auth_time"], deepest["amr"]) == (subject["auth_time"], subject["amr"])


def test_a_delegation_bound_to_a_task_is_introspected_with_its_task_and_labels(
    bastion: Bastion,
):
    asker, coder, sub = resource_server(bastion), coding_agent(bastion), sub_agent(bastion)
    policy_for(bastion, [sub["client_id"]])
    tasks = Tasks(FactStore(bastion.db), bastion.server.store, bastion.server.audit)
    agent = {"type": "Agent", "id": sub["client_id"]}
    fact = {"predicate": "has_role", "args": [agent, "writer", {"type": "Folder", "id": "a"}]}
    task = tasks.open("alice", sub["client_id"], "icons", time.time() + 60, [fact], "t")
    bastion.server.tasks = tasks
    tokens = bastion.tokens_for(coder)
    answer = exchange(bastion, coder, tokens["access_token"], own_token(bastion, sub), task=task.id)
    assert answer.status_code == 200, answer.text
    token = answer.json()["access_token"]
    # Bound to a task its subject token was not in: it keeps the subject's (empty) label set.
    assert (claims(token)["task"], claims(token)["labels_task"]) == (task.id, "")
    assert introspect(bastion, asker, token) == as_the_token_says(token)


def test_a_refreshed_token_and_its_refresh_token_name_the_original_sign_in(bastion: Bastion):
    asker, client = resource_server(bastion), bastion.register()
    first = bastion.tokens_for(client)
    bastion.clock.advance(60)
    rotated = bastion.token(
        grant_type="refresh_token",
        refresh_token=first["refresh_token"],
        client_id=client["client_id"],
    )
    assert rotated.status_code == 200, rotated.text
    token = rotated.json()["access_token"]
    assert introspect(bastion, asker, token) == as_the_token_says(token)
    signed_in = claims(first["access_token"])
    assert claims(token)["iat"] > signed_in["iat"]
    sign_in = {"auth_time": signed_in["auth_time"], "amr": signed_in["amr"]}
    assert {k: claims(token)[k] for k in sign_in} == sign_in
    refresh = introspect(bastion, asker, rotated.json()["refresh_token"])
    assert refresh["active"] is True and refresh["token_type"] == "refresh_token"
    assert {k: refresh.get(k) for k in sign_in} == sign_in and "acr" not in refresh
    assert introspect(bastion, asker, first["refresh_token"]) == {"active": False}


def test_a_client_acting_as_itself_is_introspected_with_no_sign_in(bastion: Bastion):
    asker, agent = resource_server(bastion), confidential(bastion)
    issued = bastion.http.post(
        f"{bastion.url}/token",
        data={"grant_type": "client_credentials", "resource": bastion.resource},
        headers=basic(agent),
    )
    assert issued.status_code == 200, issued.text
    token = issued.json()["access_token"]
    answer = introspect(bastion, asker, token)
    assert answer == as_the_token_says(token)
    assert not {"auth_time", "acr", "amr"} & answer.keys()


def test_an_inactive_token_says_nothing_of_its_sign_in(bastion: Bastion, idp: EnterpriseIdp):
    asker, agent = resource_server(bastion), enterprise_agent(bastion)
    token = through_an_id_jag(bastion, idp, agent, acr="phr", amr=["mfa"], auth_time=time.time())
    grant_id = bastion.server.store.access_token_state(claims(token)["jti"]).grant_id
    bastion.server.store.revoke_grant(grant_id, bastion.clock(), "test", actor="test")
    assert introspect(bastion, asker, token) == {"active": False}
    expired = bastion.tokens_for(bastion.register())
    bastion.clock.advance(bastion.server.settings.refresh_token_seconds + 1)
    assert introspect(bastion, asker, expired["access_token"]) == {"active": False}
    assert introspect(bastion, asker, expired["refresh_token"]) == {"active": False}


def test_only_a_client_an_admin_allowed_may_introspect_and_then_any_clients_token(
    bastion: Bastion,
):
    """A confidential client allowed to introspect (a resource server) may ask about any token
    this server issued for the resources it is bound to (here every one: the binding itself is
    tests/oauth/test_introspection_audience.py), whoever it was issued to; any other client may
    ask about none, its own included, and learns nothing of it."""
    asker, agent = resource_server(bastion), confidential(bastion)
    own = bastion.http.post(
        f"{bastion.url}/token",
        data={"grant_type": "client_credentials", "resource": bastion.resource},
        headers=basic(agent),
    ).json()["access_token"]
    someone_elses = bastion.tokens_for(bastion.register())["access_token"]
    for token in (own, someone_elses):
        refused = bastion.http.post(
            f"{bastion.url}/introspect", data={"token": token}, headers=basic(agent)
        )
        assert_oauth_error(refused, "unauthorized_client", 403)
        assert "active" not in refused.json() and "sub" not in refused.json()
        assert introspect(bastion, asker, token) == as_the_token_says(token)
