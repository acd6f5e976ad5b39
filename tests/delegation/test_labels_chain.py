"""Session labels through a chain of agents, end to end: a real `bastion serve`, token exchange
(RFC 8693) and the official MCP SDK client. What a sub-agent reads with its delegated token is
recorded in the label set of the first agent of its chain (the coding agent the person signed
in), so the coding agent cannot publish it: data does not launder through a sub-agent."""

from __future__ import annotations

import pytest

from tests.delegation.support import POLICY, SCOPES, start_studio
from tests.delegation.test_mission import refusal, sub_agent_call

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
