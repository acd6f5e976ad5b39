"""Approvals and reviews through chains of agents, end to end: a real `bastion serve`, token
exchange (RFC 8693). A sub-agent that works for one person through two coding agents is two
callers to the people in the loop: what they approve or release for one chain is never spent
by, or delivered to, the other."""

from __future__ import annotations

import pytest

from tests.delegation.support import ADMIN_KEY, POLICY, SCOPES, start_studio
from tests.delegation.test_mission import refusal

HELD = """
# Writes wait for avery's approval; what is read waits for avery's review before it is released.
requires_approval(_user: User, "call", Tool{"studio/write_svg"});
requires_review(_user: User, "call", Tool{"studio/read_file"});
approver(User{"avery"}, _user: User, "call", Tool{"studio/write_svg"});
approver(User{"avery"}, _user: User, "call", Tool{"studio/read_file"});
approval_window(_user: User, "call", Tool{"studio/write_svg"}, 30);
declare approval_grant(User, Agent, String, Tool);
"""


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    directory = tmp_path_factory.mktemp("held-chains")
    policy = directory / "policy.polar"
    policy.write_text(POLICY.read_text() + HELD)
    with start_studio(directory, policy=policy, settings="[approvals]\nwait_seconds = 0\n") as s:
        yield s


def two_chains(studio, name: str) -> tuple[str, str]:
    """Tokens of one sub-agent acting for sam through each of his two coding agents."""
    sub = studio.sub_agent(f"{name}-svgbot")
    studio.facts(
        ("has_role", f"Agent:{sub.client_id}", "illustrator", "McpServer:studio"),
        ("may_use_folder", f"Agent:{sub.client_id}", "icons"),
    )
    tokens = []
    for n in (1, 2):
        coder = studio.coding_agent(f"{name}-coder-{n}")
        studio.facts(("has_role", f"Agent:{coder.client_id}", "coder", "McpServer:studio"))
        token = studio.user_token(coder, "sam", " ".join(SCOPES))["access_token"]
        answer = studio.exchange(coder, token, studio.own_token(sub))
        assert answer.status_code == 200, answer.text
        tokens.append(answer.json()["access_token"])
    return tokens[0], tokens[1]


def held(studio, token: str, tool: str, arguments: dict, reason: str) -> str:
    """The id of the request the call is held on (``reason``: approval_pending, review_pending)."""
    answer = studio.call(token, tool, **arguments)
    assert refusal(answer) == ("refused", reason), answer
    return answer["error"]["data"]["approval_id"]


def answer_as_avery(studio, request_id: str, **terms) -> None:
    response = studio.http.post(
        f"{studio.url}/v1/approvals/{request_id}/approve",
        json={"approver": "avery", **terms},
        headers={"authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert response.status_code == 200, response.text


def test_a_result_released_for_one_chain_is_never_delivered_to_another(studio):
    first, second = two_chains(studio, "review")
    read = {"folder": "icons", "name": "logo.svg"}
    request = held(studio, first, "read_file", read, "review_pending")
    answer_as_avery(studio, request)
    # The same call through the other coding agent is a call of its own, held for its own review.
    assert held(studio, second, "read_file", read, "review_pending") != request
    # The chain it was released for gets it.
    assert studio.call(first, "read_file", **read)["result"]["content"][0]["text"] == "<svg/>"


def test_an_approval_given_for_one_chain_is_not_spent_by_another(studio):
    first, second = two_chains(studio, "approval")
    draw = {"folder": "icons", "name": "approved.svg", "svg": "<svg/>"}
    request = held(studio, first, "write_svg", draw, "approval_pending")
    answer_as_avery(studio, request)
    written = list(studio.upstream.written)
    assert held(studio, second, "write_svg", draw, "approval_pending") != request
    assert studio.upstream.written == written, "nothing the other chain sent reached the studio"
    assert refusal(studio.call(first, "write_svg", **draw)) == ("ok",)
    assert studio.upstream.written == [*written, ("write_svg", "icons", "approved.svg")]


def test_an_approval_for_minutes_given_for_one_chain_lets_no_other_through(studio):
    """A grant for minutes is bound to the chain whose call was held, as a single-use approval
    is: the sub-agent working for the other coding agent, or on its own grant from sam, is held
    on a request of its own. (Before, the grant named the sub-agent alone and let both through.)"""
    first, second = two_chains(studio, "window")
    draw = {"folder": "icons", "name": "window.svg", "svg": "<svg/>"}
    request = held(studio, first, "write_svg", draw, "approval_pending")
    answer_as_avery(studio, request, minutes=15)
    # A fact written through /v1/facts is answered once this replica has applied it, and so the
    # grant written before it.
    studio.facts(("has_role", "User:window-witness", "designer", "McpServer:studio"))
    written = list(studio.upstream.written)
    again = {**draw, "name": "again.svg"}
    assert refusal(studio.call(first, "write_svg", **again)) == ("ok",)
    assert held(studio, second, "write_svg", again, "approval_pending") != request
    assert studio.upstream.written == [*written, ("write_svg", "icons", "again.svg")]


def test_the_people_asked_see_whom_the_calling_agent_works_for(studio):
    """A held call of a sub-agent is kept with its chain, first agent to calling (the API, the
    command line, the audit trail, the webhook's payload and the page show it): the approver
    judges the call of an agent working for another, not of the sub-agent on its own."""
    sub = studio.sub_agent("shown-svgbot")
    studio.facts(
        ("has_role", f"Agent:{sub.client_id}", "illustrator", "McpServer:studio"),
        ("may_use_folder", f"Agent:{sub.client_id}", "icons"),
    )
    coder = studio.coding_agent("shown-coder")
    studio.facts(("has_role", f"Agent:{coder.client_id}", "coder", "McpServer:studio"))
    token = studio.user_token(coder, "sam", " ".join(SCOPES))["access_token"]
    exchanged = studio.exchange(coder, token, studio.own_token(sub)).json()["access_token"]
    draw = {"folder": "icons", "name": "shown.svg", "svg": "<svg/>"}
    request = held(studio, exchanged, "write_svg", draw, "approval_pending")
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    shown = studio.http.get(f"{studio.url}/v1/approvals/{request}", headers=admin).json()
    assert (shown["agent"], shown["agents"]) == (sub.client_id, [coder.client_id, sub.client_id])
