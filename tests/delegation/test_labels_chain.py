"""Session labels through a chain of agents, end to end: a real `bastion serve`, token exchange
(RFC 8693) and the official MCP SDK client. What a sub-agent reads with its delegated token is
recorded in the label set of the first agent of its chain (the coding agent the person signed
in), so the coding agent cannot publish it: data does not launder through a sub-agent. It is
recorded in the own set of every agent of the chain too, so no agent launders it through its own
identity (its client_credentials token). Each test runs with the sets in bastion's process and in
Redis."""

from __future__ import annotations

import uuid

import anyio
import pytest

from tests.conftest import REDIS_URL, require_service
from tests.delegation.support import (
    ADMIN_KEY,
    EXCHANGE,
    POLICY,
    REDIRECT_URI,
    SCOPES,
    Agent,
    start_studio,
)
from tests.delegation.test_mission import refusal, sub_agent_call
from tests.delegation.test_tasks import claims

LABELS = """
# Confidential files may not reach the public site through anyone who read one.
declare label(Tool, String);
deny(_actor, "call", Tool{"studio/publish"}) if "confidential" in context.session.labels;
"""


@pytest.fixture(scope="module", params=["local", "redis"])
def studio(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"labels-chain-{request.param}")
    policy = directory / "policy.polar"
    policy.write_text(POLICY.read_text() + LABELS)
    settings, prefix = "", f"bastion-test-{uuid.uuid4().hex[:12]}"
    if request.param == "redis":
        require_service("Redis", "127.0.0.1", 6379)
        settings = f'[gateway]\nredis_url = "{REDIS_URL}"\nredis_prefix = "{prefix}"\n'
    try:
        with start_studio(directory, policy=policy, settings=settings) as running:
            running.facts(
                ("has_role", "User:sam", "publisher", "McpServer:studio"),
                ("label", "Tool:studio/read_file", "confidential"),
            )
            yield running
    finally:
        if request.param == "redis":
            anyio.run(_drop, prefix)


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


# -- no laundering through an agent's own identity -------------------------------------------------


def acting_as_itself(studio, agent: Agent, role: str) -> str:
    """``agent``'s own token (client_credentials): its user is the agent (``User{<client id>}``),
    here one who may publish, and the agent has ``role``."""
    studio.facts(
        ("has_role", f"User:{agent.client_id}", "publisher", "McpServer:studio"),
        ("has_role", f"Agent:{agent.client_id}", role, "McpServer:studio"),
        ("may_use_folder", f"Agent:{agent.client_id}", "icons"),
    )
    return studio.own_token(agent)


def clear(studio, user: str, agent: str) -> dict:
    response = studio.http.post(
        f"{studio.url}/v1/labels/clear",
        json={"user": user, "agent": agent},
        headers={"authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_a_sub_agent_shown_confidential_data_for_a_person_cannot_publish_acting_as_itself(studio):
    """The sub-agent read a confidential file with the token its coding agent delegated to it
    for sam; its own token (the one it showed as actor token) names a set of its own, but that
    set holds what it read for sam too: publishing as itself is refused."""
    coder, token = coding_agent_of_sam(studio, "self-coder")
    svgbot = studio.sub_agent("self-svgbot")
    bystander = studio.sub_agent("self-bystander")
    own = acting_as_itself(studio, svgbot, "illustrator")
    other_own = acting_as_itself(studio, bystander, "illustrator")
    publish = {"folder": "icons", "name": "logo.svg"}
    assert refusal(studio.call(own, "publish", **publish)) == ("ok",)  # nothing read yet
    answer = studio.exchange(coder, token, own, scope="files:read")
    assert answer.status_code == 200, answer.text

    read = {"folder": "icons", "name": "logo.svg"}
    assert sub_agent_call(studio, answer.json()["access_token"], "read_file", read)
    published = list(studio.upstream.written)
    assert refusal(studio.call(own, "publish", **publish)) == ("refused", "not_permitted")
    # A fresh token of its own reads the same set (it is the agent's, not the token's).
    fresh = studio.own_token(svgbot)
    assert refusal(studio.call(fresh, "publish", **publish)) == ("refused", "not_permitted")
    assert studio.upstream.written == published, "a refused publish never reaches the studio"
    # An agent that took no part in the chain keeps a clean set of its own.
    assert refusal(studio.call(other_own, "publish", **publish)) == ("ok",)
    # The agent's own set is cleared as any other: user and agent are its client id.
    assert clear(studio, svgbot.client_id, svgbot.client_id) == {"cleared": 1}
    assert refusal(studio.call(own, "publish", **publish)) == ("ok",)
    # The chain's set is another: the coding agent, acting for sam, still may not publish.
    assert refusal(studio.call(token, "publish", **publish)) == ("refused", "not_permitted")


def test_a_coding_agent_shown_confidential_data_for_a_person_cannot_publish_acting_as_itself(
    studio,
):
    """The same for the first agent of the chain: a confidential coding agent that signs sam in
    and also holds a client_credentials token of its own."""
    created = studio.register(
        "--name", "self-confidential-coder", "--confidential", "--redirect-uri", REDIRECT_URI,
        "--grant-type", "authorization_code", "--grant-type", "refresh_token",
        "--grant-type", "client_credentials", "--grant-type", EXCHANGE,
        "--scope", " ".join(SCOPES),
    )  # fmt: skip
    coder = Agent(created["client_id"], created["client_secret"])
    own = acting_as_itself(studio, coder, "coder")
    token = studio.user_token(coder, "sam")["access_token"]
    publish = {"folder": "icons", "name": "logo.svg"}
    assert refusal(studio.call(own, "publish", **publish)) == ("ok",)  # nothing read yet
    read = studio.call(token, "read_file", folder="icons", name="logo.svg")
    assert refusal(read) == ("ok",)
    assert refusal(studio.call(own, "publish", **publish)) == ("refused", "not_permitted")
    assert clear(studio, coder.client_id, coder.client_id) == {"cleared": 1}
    assert refusal(studio.call(own, "publish", **publish)) == ("ok",)


async def _drop(prefix: str) -> None:
    import redis.asyncio as redis

    client = redis.Redis.from_url(REDIS_URL)
    keys = [k async for k in client.scan_iter(f"{prefix}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()
