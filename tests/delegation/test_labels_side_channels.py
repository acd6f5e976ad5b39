"""Session labels through the side channels of a call: what an upstream tells a client about a
labelled target before (or instead of) its result is the target's data too. A log message, a
progress message, a question to the client's model (sampling) or an error the upstream answers
with reaches the agent, so the target's labels are in its set before any of it leaves bastion,
whether a result follows or not. On a running bastion, the official MCP SDK client, both eras."""

from __future__ import annotations

import pytest
from mcp import types
from mcp.shared.exceptions import MCPError

from bastion import Entity
from tests.gateway.lab_server import SECRET
from tests.gateway.support import start
from tests.oauth.support import free_socket
from tests.signals.support import running

# The SDK marks logging deprecated as of 2026-07-28; it is still MCP in both eras.
pytestmark = pytest.mark.filterwarnings("ignore:The logging capability is deprecated")

RULES = """
# tests/delegation: an agent shown pii may not chatter.
declare label(Tool, String);
deny(_actor, "call", _tool: Tool) if
  context.tool = "chatter" and
  "pii" in context.session.labels;
"""
LABS = ("labhttp", "labold")


def label_confiding_tools(bastion) -> None:
    tools = [
        (Entity("Tool", f"{server}/{tool}"), Entity("McpServer", server))
        for server in LABS
        for tool in ("confide", "confide_asking")
    ]
    bastion.apply(
        [("has_relation", tool, "server", server) for tool, server in tools]
        + [("label", tool, "pii") for tool, _ in tools]
    )


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    for running_bastion in running(tmp_path_factory, "labels-side", RULES):
        label_confiding_tools(running_bastion)
        yield running_bastion


def confided(bastion, server: str, mode: str, tool: str, arguments: dict) -> dict:
    """Call ``tool`` (it tells the client SECRET one way, then fails) as a new agent of sam's,
    then the sink, ``chatter``: what the client heard, the call's error, and the sink's answer."""
    heard: list[str] = []

    async def on_log(params):
        heard.append(str(params.data))

    async def on_progress(progress, total, message):
        heard.append(str(message))

    async def sample(context, params):
        heard.append(params.messages[0].content.text)
        text = types.TextContent(type="text", text="no")
        return types.CreateMessageResult(role="assistant", content=text, model="test-model")

    async def script(client, seen):
        if mode == "legacy":
            await client.set_logging_level("info")
        try:
            await client.call_tool(tool, arguments, progress_callback=on_progress)
            seen["error"] = None
        except MCPError as e:
            seen["error"] = e.error.message
        try:
            seen["sink"] = (await client.call_tool("chatter", {})).content[0].text
        except MCPError as e:
            seen["sink"] = (e.error.data or {}).get("reason", e.error.message)

    options = {"log_level": "info"} if mode == "auto" else {}
    seen = bastion.sdk(
        "sam", server, mode, script, logging_callback=on_log, sampling_callback=sample, **options
    )
    seen["heard"] = heard
    return seen


@pytest.mark.parametrize("server", LABS)
@pytest.mark.parametrize("mode", ["legacy", "auto"])
@pytest.mark.parametrize("how", ["log", "progress"])
def test_what_a_labelled_call_relays_before_it_fails_labels_the_agent(bastion, server, mode, how):
    seen = confided(bastion, server, mode, "confide", {"how": how})
    assert any(SECRET in text for text in seen["heard"]), seen
    assert seen["sink"] == "not_permitted", seen


@pytest.mark.parametrize("server", LABS)
@pytest.mark.parametrize("mode", ["legacy", "auto"])
def test_an_upstream_error_of_a_labelled_call_labels_the_agent_it_reaches(bastion, server, mode):
    seen = confided(bastion, server, mode, "confide", {"how": "error"})
    assert SECRET in seen["error"]
    assert seen["sink"] == "not_permitted", seen


@pytest.mark.parametrize(("server", "mode"), [("labold", "legacy"), ("labhttp", "legacy")])
def test_a_question_a_labelled_call_asks_the_clients_model_labels_the_agent(bastion, server, mode):
    seen = confided(bastion, server, mode, "confide_asking", {})
    assert any(SECRET in text for text in seen["heard"]), seen
    assert seen["sink"] == "not_permitted", seen


def test_an_unlabelled_call_that_fails_labels_nothing(bastion):
    seen = confided(bastion, "labold", "legacy", "greet", {})  # no elicitation: it fails
    assert seen["sink"] == "said it all", seen


def test_what_cannot_be_labelled_is_not_relayed(tmp_path):
    # Redis cannot be reached: the labels of what a call relays cannot be kept, so nothing of
    # it reaches the client, and its error comes back as bastion's refusal.
    with free_socket() as closed:  # bound, never listening: connections are refused
        settings = {"redis_url": f"redis://127.0.0.1:{closed.getsockname()[1]}/0"}
        with start(tmp_path, gateway=settings, policy_extra="declare label(Tool, String);") as down:
            label_confiding_tools(down)
            for tool, arguments in (
                ("confide", {"how": "log"}),
                ("confide", {"how": "progress"}),
                ("confide", {"how": "error"}),
                ("confide_asking", {}),
            ):
                seen = confided(down, "labold", "legacy", tool, arguments)
                assert not any(SECRET in text for text in seen["heard"]), (tool, arguments, seen)
                assert SECRET not in seen["error"], (tool, arguments)
                assert seen["error"].endswith("labels unavailable"), (
                    tool,
                    arguments,
                    seen["error"],
                )
