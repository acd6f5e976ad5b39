"""A call with no person behind it, through the gateway: an agent acting as itself (client
credentials: its token's subject is its own client id) whose call is held with no approver rule
naming anyone is confirmed by its registered owner, never by a person of its client id's name
(an approvals key or the CLI vouching for that name is refused); with no owner either, nobody
could ever answer, so the call is refused at once (``no_approver``) and recorded, in both MCP
eras, on ``connect`` and for a result held for review (before the call runs). A user's own
agent's call is confirmed by the user, as before."""

from __future__ import annotations

import time

import pytest

from bastion.agents.identity import owner_fact
from bastion.facts.model import Entity
from bastion.oauth.users import create_user
from bastion.policy.parser import parse_fact
from tests.gateway.streams import (
    call_tool,
    legacy_session,
    messages,
    modern_headers,
    modern_request,
)
from tests.signals.support import running
from tests.signals.test_kill_switch import confidential_client, token_request

RULES = """
requires_approval(_user: User, "call", Tool{"deskhttp/search_customers"}) if
  context.arguments.query = "held";
requires_review(_user: User, "call", Tool{"deskhttp/search_customers"}) if
  context.arguments.query = "reviewed";
"""

HELD, REVIEWED = {"query": "held"}, {"query": "reviewed"}


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    yield from running(tmp_path_factory, "no-person", RULES)


@pytest.fixture(scope="module")
def approvals_key(bastion) -> str:
    key, _ = bastion.app.state.keys.create("approvals bot", ["approvals"], created_by="test")
    return key


def agent(bastion, name: str, owner: str | None = None) -> tuple[str, str]:
    """A confidential client acting as itself, which the policy lets search the customers;
    owned by ``owner`` (made a bastion user) when given."""
    client = confidential_client(bastion, name)
    facts = [("has_role", Entity("User", client[0]), "member", Entity("Team", "support"))]
    if owner is not None:
        create_user(bastion.app.state.oauth.store, owner, bastion.password, time.time(), actor="t")
        facts.append(owner_fact(client[0], owner))
    bastion.apply(facts)
    return client


def own_token(bastion, client: tuple[str, str]) -> str:
    form = {"grant_type": "client_credentials", "resource": bastion.mcp_url("deskhttp")}
    answer = token_request(bastion, form, client)
    assert answer.status_code == 200, answer.text
    return answer.json()["access_token"]


def legacy_call(bastion, token: str, arguments: dict) -> dict:
    headers = legacy_session(bastion, token, "deskhttp")
    response = bastion.http.post(
        bastion.mcp_url("deskhttp"),
        json={
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": "search_customers", "arguments": arguments},
        },
        headers=headers,
    )
    assert response.status_code == 200, response.text
    return messages(response)[-1]


def call(bastion, token: str, arguments: dict, era: str = "modern") -> dict:
    if era == "legacy":
        return legacy_call(bastion, token, arguments)
    return call_tool(bastion, token, "deskhttp", "search_customers", arguments)


def answer(bastion, key: str, request_id: str, person: str):
    return bastion.http.post(
        f"{bastion.url}/v1/approvals/{request_id}/approve",
        json={"approver": person},
        headers={"authorization": f"Bearer {key}"},
    )


def recorded(bastion, decision_id: str):
    bastion.flush()
    return bastion.records.get(decision_id)


@pytest.mark.parametrize("era", ["legacy", "modern"])
def test_an_agent_with_no_owner_and_no_approver_is_refused_at_once_and_recorded(bastion, era):
    client = agent(bastion, f"orphan {era}")
    pending = len(bastion.app.state.approvals.listed(status="pending", limit=200))
    refused = call(bastion, own_token(bastion, client), HELD, era)
    error = refused["error"]
    assert error["data"]["reason"] == "no_approver", refused
    assert "approval_id" not in error["data"]
    # What to configure: an approver rule, or the agent's owner.
    assert "approver" in error["message"] and "--owner" in error["message"], error["message"]
    record = recorded(bastion, error["data"]["decision_id"])
    assert (record.result, record.reason) == ("deny", "no_approver")
    # Nothing was held where nobody could ever answer it.
    assert len(bastion.app.state.approvals.listed(status="pending", limit=200)) == pending


def test_a_result_nobody_could_review_is_refused_before_the_call_runs(bastion):
    client = agent(bastion, "orphan reviewed")
    before = bastion.recorder.count("tools/call", name="search_customers")
    refused = call(bastion, own_token(bastion, client), REVIEWED)
    assert refused["error"]["data"]["reason"] == "no_approver", refused
    assert bastion.recorder.count("tools/call", name="search_customers") == before
    record = recorded(bastion, refused["error"]["data"]["decision_id"])
    assert (record.result, record.reason) == ("deny", "no_approver")


def test_a_hold_on_connect_nobody_could_answer_is_refused_at_once(bastion):
    client = agent(bastion, "orphan connecting")
    held = parse_fact(f'connect_held(McpServer{{"deskhttp"}}, User{{"{client[0]}"}})')
    bastion.apply(inserts=[held])
    try:
        listed = bastion.http.post(
            bastion.mcp_url("deskhttp"),
            json=modern_request(1, "tools/list", {}),
            headers=modern_headers(own_token(bastion, client), "tools/list"),
        ).json()
    finally:
        bastion.apply(deletes=[held])
    assert listed["error"]["data"]["reason"] == "no_approver", listed


def test_an_agents_held_call_is_not_confirmed_in_its_client_ids_name(bastion, approvals_key):
    client = agent(bastion, "nightly job", owner="pat")
    token = own_token(bastion, client)
    held = call(bastion, token, HELD)["error"]["data"]
    assert held["reason"] == "approval_pending", held
    request_id = held["approval_id"]
    # An approvals key vouching for a person of the agent's client id's name is refused.
    vouched = answer(bastion, approvals_key, request_id, client[0])
    assert vouched.status_code == 403, vouched.text
    approvals = bastion.app.state.approvals
    found = approvals.get(request_id)
    assert (found.status, found.answers) == ("pending", ())
    assert found.summary()["confirmer"] == "pat" and found.summary()["person"] is False
    # Its owner confirms it, and the call goes through.
    confirmed = answer(bastion, approvals_key, request_id, "pat")
    assert confirmed.status_code == 200, confirmed.text
    assert "result" in call(bastion, token, HELD)


def test_a_users_own_agents_call_is_still_confirmed_by_the_user(bastion, approvals_key):
    token = bastion.token("sam", "deskhttp")
    held = call(bastion, token, {"query": "held"})["error"]["data"]
    request = bastion.app.state.approvals.get(held["approval_id"])
    assert request.summary()["confirmer"] == "sam" and request.summary()["person"] is True
    assert answer(bastion, approvals_key, request.id, "avery").status_code == 403
    assert answer(bastion, approvals_key, request.id, "sam").status_code == 200
    assert "result" in call(bastion, token, {"query": "held"})


def test_an_agent_acting_as_itself_is_not_sent_to_the_page_by_url_elicitation(bastion):
    """Nobody at the agent's client can answer on the page (its owner confirms): the client is
    told the call waits, not asked to open the page; a person's client still is."""
    token = own_token(bastion, agent(bastion, "eliciting job", owner="quinn"))
    elicits = {"elicitation": {"url": {}}}

    def held(token: str) -> dict:
        response = bastion.http.post(
            bastion.mcp_url("deskhttp"),
            json=modern_request(
                1,
                "tools/call",
                {"name": "search_customers", "arguments": {"query": "held"}},
                capabilities=elicits,
            ),
            headers=modern_headers(token, "tools/call", "search_customers"),
        )
        assert response.status_code == 200, response.text
        return messages(response)[-1]

    waiting = held(token)
    assert waiting["error"]["data"]["reason"] == "approval_pending", waiting
    asked = held(bastion.token("sam", "deskhttp"))
    assert asked["result"]["resultType"] == "input_required", asked
