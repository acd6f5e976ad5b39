"""Session labels through a chain of agents, end to end: a real `bastion serve`, token exchange
(RFC 8693) and the official MCP SDK client. What a sub-agent reads with its delegated token is
recorded in the label set of the first agent of its chain (the coding agent the person signed
in), so the coding agent cannot publish it: data does not launder through a sub-agent."""

from __future__ import annotations

import pytest

from tests.delegation.support import ADMIN_KEY, POLICY, SCOPES, start_studio
from tests.delegation.test_mission import refusal, sub_agent_call
from tests.delegation.test_tasks import claims

LABELS = """
# Confidential files may not reach the public site through anyone who read one.
declare label(Tool, String);
deny(_actor, "call", Tool{"studio/publish"}) if "confidential" in context.session.labels;
"""


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    directory = tmp_path_factory.mktemp("labels-chain")
    policy = directory / "policy.polar"
    policy.write_text(POLICY.read_text() + LABELS)
    with start_studio(directory, policy=policy) as running:
        running.facts(
            ("has_role", "User:sam", "publisher", "McpServer:studio"),
            ("label", "Tool:studio/read_file", "confidential"),
        )
        yield running


def coding_agent_of_sam(studio, name: str):
    coder = studio.coding_agent(name)
    studio.facts(("has_role", f"Agent:{coder.client_id}", "coder", "McpServer:studio"))
    return coder, studio.user_token(coder, "sam", " ".join(SCOPES))["access_token"]


def test_what_a_sub_agent_reads_keeps_its_coding_agent_from_publishing(studio):
    coder, token = coding_agent_of_sam(studio, "labels-coder")
    other_coder, other_token = coding_agent_of_sam(studio, "labels-other-coder")
    svgbot = studio.sub_agent("labels-svgbot")
    studio.facts(
        ("has_role", f"Agent:{svgbot.client_id}", "illustrator", "McpServer:studio"),
        ("may_use_folder", f"Agent:{svgbot.client_id}", "icons"),
    )
    publish = {"folder": "icons", "name": "logo.svg"}
    assert refusal(studio.call(token, "publish", **publish)) == ("ok",)  # nothing read yet
    answer = studio.exchange(coder, token, studio.own_token(svgbot), scope="files:read")
    assert answer.status_code == 200, answer.text
    delegated = answer.json()["access_token"]

    # The sub-agent reads a confidential file through the official SDK client.
    assert sub_agent_call(studio, delegated, "read_file", {"folder": "icons", "name": "logo.svg"})
    published = list(studio.upstream.written)
    # Its parent, the coding agent, may no longer publish; the sub-agent's chain neither.
    assert refusal(studio.call(token, "publish", **publish)) == ("refused", "not_permitted")
    assert studio.upstream.written == published, "a refused publish never reaches the studio"
    # Another coding agent of the same person read nothing: it still publishes.
    assert refusal(studio.call(other_token, "publish", **publish)) == ("ok",)
    assert other_coder.client_id != coder.client_id


def open_task(studio, agent: str) -> str:
    """A task for sam's ``agent``, opened through /v1/tasks; its id."""
    response = studio.http.post(
        f"{studio.url}/v1/tasks",
        json={
            "user": "sam",
            "agent": agent,
            "purpose": "icons",
            "facts": [
                {
                    "predicate": "has_role",
                    "args": [
                        {"type": "Agent", "id": agent},
                        "illustrator",
                        {"type": "McpServer", "id": "studio"},
                    ],
                }
            ],
            "expires_in": 600,
        },
        headers={"authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert response.status_code == 201, response.text
    return response.json()["task"]["id"]


def test_a_delegation_into_a_task_keeps_the_labels_of_the_token_it_came_from(studio):
    """A task has label sets of its own (wiped when it ends), but a delegation bound at the
    exchange to a task its subject token was not in is the same chain: what the sub-agent reads
    inside the task reaches its coding agent's set outside it, and the reverse."""
    coder, token = coding_agent_of_sam(studio, "labels-task-coder")
    svgbot = studio.sub_agent("labels-task-svgbot")
    # The task grants the illustrator's role; its folder is its own.
    studio.facts(("may_use_folder", f"Agent:{svgbot.client_id}", "icons"))
    publish = {"folder": "icons", "name": "logo.svg"}
    assert refusal(studio.call(token, "publish", **publish)) == ("ok",)  # nothing read yet
    task = open_task(studio, svgbot.client_id)
    answer = studio.exchange(coder, token, studio.own_token(svgbot), scope="files:read", task=task)
    assert answer.status_code == 200, answer.text
    delegated = answer.json()["access_token"]
    assert claims(delegated)["task"] == task and claims(delegated)["labels_task"] == ""

    assert sub_agent_call(studio, delegated, "read_file", {"folder": "icons", "name": "logo.svg"})
    assert refusal(studio.call(token, "publish", **publish)) == ("refused", "not_permitted")
