"""When access is taken away, everything that rests on it stops: a person the kill switch holds
cannot sign in, consent or approve anything in a browser (a clear page says why), and an agent
that acts as itself (client credentials, and what it delegates) stops on its next call, at the
gateway, the token endpoint and introspection, while its owner is suspended or disabled; it
works again once the owner is resumed or enabled. An agent acting for a signed-in person is
bounded by that person, not by whoever owns the client."""

from __future__ import annotations

import time
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from bastion.agents.identity import owner_fact
from bastion.facts.model import Entity
from bastion.oauth.sign_in import SESSION_COOKIE
from bastion.oauth.users import create_user
from bastion.signals.suspensions import resume, suspend, suspension
from tests.gateway.streams import call_tool, modern_headers, modern_request
from tests.gateway.support import register_public_client
from tests.oauth.support import hidden_fields, pkce_pair
from tests.signals.support import running
from tests.signals.test_kill_switch import authorize_url, confidential_client, token_request
from tests.waits import eventually

QUERY = {"query": "a"}


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    yield from running(tmp_path_factory, "standing", "")


def kill_switch(bastion, change, kind: str, id: str) -> None:
    """Suspend or resume (`suspend`, `resume`) as the API does; this replica has it after."""
    seq = change(bastion.app.state.store, suspension(kind, id), "test").seq
    wait_for(bastion, seq)


def wait_for(bastion, seq: int) -> None:
    assert eventually(lambda: bastion.app.state.replica.applied >= seq, every=0.01), (
        "the replica did not apply the change"
    )


def new_user(bastion, name: str) -> str:
    create_user(bastion.app.state.oauth.store, name, bastion.password, time.time(), actor="test")
    return name


def fresh_authorize_url(bastion, client: str) -> str:
    """`authorize_url` with a new PKCE challenge (its verifier is not needed)."""
    return authorize_url(bastion, client, pkce_pair()[1])


def sign_in_at_authorize(bastion, browser: httpx.Client, username: str) -> httpx.Response:
    page = browser.get(
        fresh_authorize_url(bastion, register_public_client(bastion.http, bastion.url))
    )
    assert page.status_code == 200 and "name=password" in page.text, page.text
    return browser.post(
        f"{bastion.url}/authorize/login",
        data={**hidden_fields(page.text), "username": username, "password": bastion.password},
    )


def consent(bastion, browser: httpx.Client, page: httpx.Response) -> httpx.Response:
    return browser.post(
        f"{bastion.url}/authorize/consent", data={**hidden_fields(page.text), "decision": "allow"}
    )


def code_of(answer: httpx.Response) -> str | None:
    if answer.status_code not in (302, 303):
        return None
    return parse_qs(urlsplit(answer.headers["location"]).query).get("code", [None])[0]


# -- a suspended person in a browser -----------------------------------------------------------


def test_a_suspended_user_cannot_sign_in_and_is_told_why(bastion):
    quinn = new_user(bastion, "quinn")
    kill_switch(bastion, suspend, "user", quinn)
    try:
        with httpx.Client(follow_redirects=False, timeout=10) as browser:
            at_authorize = sign_in_at_authorize(bastion, browser, quinn)
            assert SESSION_COOKIE not in str(browser.cookies)
            page = browser.get(f"{bastion.url}/sign-in", params={"next": "/approvals"})
            at_sign_in = browser.post(
                f"{bastion.url}/sign-in",
                data={**hidden_fields(page.text), "username": quinn, "password": bastion.password},
            )
            assert SESSION_COOKIE not in str(browser.cookies)
            # A wrong password learns nothing of the suspension: who is suspended stays unknown.
            page = browser.get(f"{bastion.url}/sign-in", params={"next": "/approvals"})
            guessed = browser.post(
                f"{bastion.url}/sign-in",
                data={**hidden_fields(page.text), "username": quinn, "password": "a guess"},
            )
    finally:
        kill_switch(bastion, resume, "user", quinn)
    for answer in (at_authorize, at_sign_in):
        assert answer.status_code == 403, answer.text
        assert "suspended" in answer.text and "name=decision" not in answer.text
    assert guessed.status_code == 401 and "suspended" not in guessed.text
    # Each refusal is a row of its own (the password was right: it names the person).
    refusals = [
        e.detail["reason"]
        for e in bastion.app.state.oauth.audit.events("login.refused", 1000)
        if e.subject == quinn
    ]
    assert refusals == ["suspended", "suspended"]
    # Resumed, the same password signs in.
    with httpx.Client(follow_redirects=False, timeout=10) as browser:
        signed_in = sign_in_at_authorize(bastion, browser, quinn)
    assert signed_in.status_code == 200 and "name=decision" in signed_in.text


def test_a_suspended_users_browser_session_neither_consents_nor_gets_a_code(bastion):
    rory = new_user(bastion, "rory")
    with httpx.Client(follow_redirects=False, timeout=10) as browser:
        consent_page = sign_in_at_authorize(bastion, browser, rory)
        assert consent_page.status_code == 200 and "name=decision" in consent_page.text
        kill_switch(bastion, suspend, "user", rory)
        try:
            consented = consent(bastion, browser, consent_page)
            # A new authorization request with the same session: no consent page, no code.
            again = browser.get(
                fresh_authorize_url(bastion, register_public_client(bastion.http, bastion.url))
            )
        finally:
            kill_switch(bastion, resume, "user", rory)
        for answer in (consented, again):
            assert answer.status_code == 403, answer.text
            assert "rory" in answer.text and "suspended" in answer.text
            assert code_of(answer) is None and "name=decision" not in answer.text
        # Resumed, the same session consents and gets a code.
        resumed = browser.get(
            fresh_authorize_url(bastion, register_public_client(bastion.http, bastion.url))
        )
        assert resumed.status_code == 200 and "name=decision" in resumed.text
        assert code_of(consent(bastion, browser, resumed)) is not None


# -- agents that act as themselves, and their owners ------------------------------------------


def owned_agent(bastion, name: str, owner: str) -> tuple[str, str]:
    """A confidential client acting as itself (client credentials), owned by ``owner``, that the
    policy lets search the customers."""
    agent = confidential_client(bastion, name)
    bastion.apply(
        [
            owner_fact(agent[0], owner),
            ("has_role", Entity("User", agent[0]), "member", Entity("Team", "support")),
        ]
    )
    return agent


def own_token(bastion, agent: tuple[str, str]) -> httpx.Response:
    form = {"grant_type": "client_credentials", "resource": bastion.mcp_url("deskhttp")}
    return token_request(bastion, form, agent)


def gateway_call(bastion, token: str) -> tuple[int, dict]:
    """(HTTP status, JSON-RPC answer or {}) of one tools/call."""
    response = bastion.http.post(
        bastion.mcp_url("deskhttp"),
        json=modern_request(1, "tools/call", {"name": "search_customers", "arguments": QUERY}),
        headers=modern_headers(token, "tools/call", "search_customers"),
    )
    if response.status_code != 200:
        return response.status_code, {}
    return 200, call_tool(bastion, token, "deskhttp", "search_customers", QUERY)


def introspect(bastion, token: str) -> dict:
    resource_server = confidential_client(
        bastion, "resource server", introspection_resources=("*",)
    )
    url = f"{bastion.url}/introspect"
    return bastion.http.post(url, data={"token": token}, auth=resource_server).json()


def test_an_agent_acting_as_itself_stops_while_its_owner_is_suspended(bastion):
    sloane = new_user(bastion, "sloane")
    agent = owned_agent(bastion, "sloane's nightly job", sloane)
    token = own_token(bastion, agent).json()["access_token"]
    assert "result" in gateway_call(bastion, token)[1]
    kill_switch(bastion, suspend, "user", sloane)
    try:
        status, refused = gateway_call(bastion, token)
        issued = own_token(bastion, agent)
        inactive = introspect(bastion, token)
    finally:
        kill_switch(bastion, resume, "user", sloane)
    assert status == 200 and refused["error"]["data"]["reason"] == "suspended", refused
    assert (issued.status_code, issued.json()["error"]) == (400, "invalid_grant")
    assert "user 'sloane'" in issued.json()["error_description"]
    assert "owner" in issued.json()["error_description"]
    assert inactive == {"active": False}
    # Resumed: the same token works again, and new ones are issued.
    assert "result" in gateway_call(bastion, token)[1]
    assert own_token(bastion, agent).status_code == 200


def test_an_agent_acting_as_itself_stops_when_its_owner_is_disabled(bastion):
    tate = new_user(bastion, "tate")
    agent = owned_agent(bastion, "tate's build agent", tate)
    token = own_token(bastion, agent).json()["access_token"]
    assert "result" in gateway_call(bastion, token)[1]
    oauth = bastion.app.state.oauth
    assert oauth.store.disable_user(tate, time.time(), actor="test")
    try:
        status, _ = gateway_call(bastion, token)
        issued = own_token(bastion, agent)
    finally:
        assert oauth.store.enable_user(tate, actor="test")
    assert status == 401  # its grant was revoked with its owner's
    assert (issued.status_code, issued.json()["error"]) == (400, "invalid_grant")
    assert "user 'tate'" in issued.json()["error_description"]
    assert "disabled" in issued.json()["error_description"]
    # Enabled again: the agent gets a new token and works; the revoked one stays revoked.
    fresh = own_token(bastion, agent)
    assert fresh.status_code == 200, fresh.text
    assert "result" in gateway_call(bastion, fresh.json()["access_token"])[1]
    assert gateway_call(bastion, token)[0] == 401


def test_an_agent_acting_for_a_person_is_bounded_by_that_person_not_its_owner(bastion):
    """A client that many people use (a client ID metadata document, say) is owned by the first
    to consent: suspending that person must not stop everyone else's use of it."""
    uma = new_user(bastion, "uma")
    client = register_public_client(bastion.http, bastion.url)
    bastion.apply([owner_fact(client, uma)])
    avery = bastion.token("avery", "deskhttp", client_id=client)
    kill_switch(bastion, suspend, "user", uma)
    try:
        answer = call_tool(bastion, avery, "deskhttp", "search_customers", QUERY)
    finally:
        kill_switch(bastion, resume, "user", uma)
    assert "result" in answer, answer


# -- the decision API ----------------------------------------------------------------------------

# The scopes of the decision APIs: /v1, AuthZEN, Oso Cloud.
SCOPES = ["decide", "authzen", "oso:read"]
LIST_TOOL = {"action": "list", "resource": {"type": "Tool", "id": "desk/search_customers"}}


def decision_answers(bastion, key: str, vera: str, agent: str) -> dict:
    """Every decision API's answer about ``vera`` (a support member) and ``agent`` (hers)."""
    headers = {"authorization": f"Bearer {key}"}

    def post(path: str, body: dict):
        answer = bastion.http.post(f"{bastion.url}{path}", json=body, headers=headers)
        assert answer.status_code == 200, answer.text
        return answer

    user = {"type": "User", "id": vera}
    bot = {"type": "Agent", "id": agent}
    tool = LIST_TOOL["resource"]
    return {
        "authorize": post("/v1/authorize", {"actor": user, **LIST_TOOL}).json(),
        "owned agent": post("/v1/authorize", {"actor": bot, **LIST_TOOL}).json(),
        "chain": post("/v1/authorize", {"principals": [user, bot], **LIST_TOOL}).json(),
        "batch": post("/v1/authorize/batch", {"checks": [{"actor": user, **LIST_TOOL}]}).json(),
        "list": post("/v1/list", {"actor": user, "action": "list", "resource_type": "Tool"}).json(),
        "actions": post("/v1/actions", {"actor": user, "resource": tool}).json(),
        "authzen": post(
            "/access/v1/evaluation",
            {"subject": user, "action": {"name": "list"}, "resource": tool},
        ).json(),
        "authzen batch": post(
            "/access/v1/evaluations",
            {"evaluations": [{"subject": user, "action": {"name": "list"}, "resource": tool}]},
        ).json(),
        "authzen search": post(
            "/access/v1/search/resource",
            {"subject": user, "action": {"name": "list"}, "resource": {"type": "Tool"}},
        ).json(),
        "authzen subjects": post(
            "/access/v1/search/subject",
            {"subject": {"type": "User"}, "action": {"name": "list"}, "resource": tool},
        ).json(),
        "query": post(
            "/v1/query", {"predicate": "allow", "args": [user, "list", {"var": "t"}]}
        ).json(),
        "query anyone": post(
            "/v1/query", {"predicate": "allow", "args": [{"var": "u"}, "list", tool]}
        ).json(),
        "oso": post(
            "/api/authorize",
            {
                "actor_type": "User",
                "actor_id": vera,
                "action": "list",
                "resource_type": "Tool",
                "resource_id": tool["id"],
            },
        ),
        "oso list": post(
            "/api/list",
            {"actor_type": "User", "actor_id": vera, "action": "list", "resource_type": "Tool"},
        ),
        "oso actions": post(
            "/api/actions",
            {
                "actor_type": "User",
                "actor_id": vera,
                "resource_type": "Tool",
                "resource_id": tool["id"],
            },
        ),
    }


def test_the_decision_api_denies_a_suspended_user_and_the_agents_they_own_everywhere(bastion):
    key, _ = bastion.app.state.keys.create("standing", SCOPES, created_by="test")
    vera, agent = "vera", "vera-report-agent"
    bastion.apply(
        [
            ("has_role", Entity("User", vera), "member", Entity("Team", "support")),
            owner_fact(agent, vera),
        ]
    )
    before = decision_answers(bastion, key, vera, agent)
    kill_switch(bastion, suspend, "user", vera)
    try:
        during = decision_answers(bastion, key, vera, agent)
    finally:
        kill_switch(bastion, resume, "user", vera)
    after = decision_answers(bastion, key, vera, agent)
    for answers in (before, after):
        assert answers["authorize"]["allowed"] and answers["owned agent"]["allowed"]
        assert answers["authzen"]["decision"] and answers["oso"].json()["allowed"]
    suspended = {"type": "User", "id": vera}
    assert (during["authorize"]["allowed"], during["authorize"]["reason"]) == (False, "suspended")
    assert during["authorize"]["suspended"] == suspended
    # The agent asked about alone acts as itself: its owner's suspension holds it.
    assert (during["owned agent"]["reason"], during["owned agent"]["suspended"]) == (
        "suspended",
        suspended,
    )
    assert not during["owned agent"]["allowed"]
    chain = during["chain"]
    assert (chain["allowed"], chain["reason"], chain["refused_by"]) == (
        False,
        "suspended",
        suspended,
    )
    [check] = during["batch"]["results"]
    assert (check["allowed"], check["reason"]) == (False, "suspended")
    assert (during["list"]["ids"], during["list"]["reason"]) == ([], "suspended")
    assert (during["actions"]["actions"], during["actions"]["reason"]) == ([], "suspended")
    for reply in (during["authzen"], during["authzen batch"]["evaluations"][0]):
        assert (reply["decision"], reply["context"]["reason"]) == (False, "suspended")
    assert during["authzen search"]["results"] == []
    assert during["authzen search"]["context"]["reason"] == "suspended"
    assert suspended not in during["authzen subjects"]["results"]
    assert suspended in after["authzen subjects"]["results"]
    allowed = ["allow", suspended, "list", LIST_TOOL["resource"]]
    for answers in (before, after):
        assert allowed in answers["query"]["results"]
        assert allowed in answers["query anyone"]["results"]
    assert (during["query"]["results"], during["query"]["reason"]) == ([], "suspended")
    assert during["query"]["suspended"] == suspended
    assert allowed not in during["query anyone"]["results"]
    assert "reason" not in during["query anyone"]
    assert during["oso"].json() == {"allowed": False}
    assert (
        during["oso list"].json()["results"] == [] and during["oso actions"].json()["results"] == []
    )
    for answer in (during["oso"], during["oso list"], during["oso actions"]):
        assert answer.headers["bastion-refusal"] == "suspended"
    # Every refusal is in the decision log with its reason.
    record = bastion.http.get(
        f"{bastion.url}/v1/decisions/{during['authorize']['decision_id']}",
        headers={"authorization": f"Bearer {key}"},
    ).json()
    assert (record["result"], record["reason"]) == (False, "suspended")
