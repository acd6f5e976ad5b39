"""The mission's scenario end to end, with a real `bastion serve`, real HTTP and the official MCP
SDK client: a person's coding agent exchanges its token (RFC 8693) for an illustrator
sub-agent's, limited to ``svg:write`` and the one folder the facts give the sub-agent. The
sub-agent cannot exceed its token, the coding agent or the person; every decision record
holds the whole chain; revoking the coding agent's grant ends the sub-agent's token on its next
call, and its open streams at once; suspending the coding agent refuses the sub-agent's calls."""

from __future__ import annotations

import anyio
import httpx2
from mcp.client.client import Client as McpClient
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import OAuthClientInformationFull

from bastion.facts.model import Entity
from tests.gateway.streams import events, modern_headers, modern_request
from tests.oauth.support import MemoryStorage, log_in_and_consent, sdk_auth
from tests.waits import eventually

from .support import ADMIN_KEY, EXCHANGE, PASSWORD, REDIRECT_URI, SCOPES, claims


def cast(studio, name: str = "coder"):
    """A coding agent (role coder) and an illustrator sub-agent that may use ``icons``."""
    coder, svgbot = studio.coding_agent(name), studio.sub_agent(f"{name}-svgbot")
    studio.facts(
        ("has_role", f"Agent:{coder.client_id}", "coder", "McpServer:studio"),
        ("has_role", f"Agent:{svgbot.client_id}", "illustrator", "McpServer:studio"),
        ("may_use_folder", f"Agent:{svgbot.client_id}", "icons"),
    )
    return coder, svgbot


def sdk_session(studio, client_info, tokens: dict):
    """The coding agent as an MCP client would be: the SDK signs sam in (authorization code
    flow, PKCE), then writes a draft; its tokens land in ``tokens``."""
    storage = MemoryStorage()
    storage.client_info = client_info
    provider = sdk_auth(
        studio.mcp_url,
        lambda url: log_in_and_consent(studio.url, url, "sam", PASSWORD),
        storage,
        [],
        client_name="coding agent",
        redirect_uri=REDIRECT_URI,
    )

    async def main() -> str:
        async with (
            httpx2.AsyncClient(auth=provider, timeout=20) as http,
            McpClient(streamable_http_client(studio.mcp_url, http_client=http)) as client,
        ):
            result = await client.call_tool(
                "write_svg", {"folder": "drafts", "name": "a.svg", "svg": "<svg/>"}
            )
        tokens["access_token"] = storage.tokens.access_token
        tokens["refresh_token"] = storage.tokens.refresh_token
        return result.content[0].text

    return anyio.run(main)


def sub_agent_call(studio, token: str, tool: str, arguments: dict) -> str:
    """The sub-agent calls through the official SDK client with its delegated token."""

    async def main() -> str:
        headers = {"authorization": f"Bearer {token}"}
        async with (
            httpx2.AsyncClient(headers=headers, timeout=20) as http,
            McpClient(streamable_http_client(studio.mcp_url, http_client=http)) as client,
        ):
            result = await client.call_tool(tool, arguments)
            return result.content[0].text

    return anyio.run(main)


def refusal(answer: dict) -> tuple:
    """("refused", reason) of a call bastion refused, ("http", status) of one refused before
    JSON-RPC (401, 403), or ("ok",) of one that went through."""
    if "http" in answer:
        return ("http", answer["http"])
    if "error" in answer:
        return ("refused", answer["error"]["data"]["reason"])
    return ("ok",)


def wait_for_records(studio, count_from: int, at_least: int) -> list:
    eventually(lambda: len(studio.records(count_from)) >= at_least, every=0.1)
    return studio.records(count_from)


def test_a_sub_agent_gets_svg_write_on_one_folder_and_cannot_exceed_anyone_in_its_chain(studio):
    coder, svgbot = cast(studio)
    info = OAuthClientInformationFull(
        client_id=coder.client_id,
        redirect_uris=[REDIRECT_URI],
        token_endpoint_auth_method="none",
        grant_types=["authorization_code", "refresh_token", EXCHANGE],
        scope=" ".join(SCOPES),
    )
    tokens: dict = {}
    assert sdk_session(studio, info, tokens) == "wrote drafts/a.svg"
    before = studio.records()
    seq = len(before)

    answer = studio.exchange(
        coder, tokens["access_token"], studio.own_token(svgbot), scope="svg:write"
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["issued_token_type"] == "urn:ietf:params:oauth:token-type:access_token"
    assert body["token_type"] == "Bearer" and body["scope"] == "svg:write"
    assert "refresh_token" not in body and 0 < body["expires_in"] <= 300
    delegated = body["access_token"]
    issued = claims(delegated)
    assert issued["sub"] == "sam" and issued["client_id"] == svgbot.client_id
    assert issued["act"] == {"sub": svgbot.client_id, "act": {"sub": coder.client_id}}
    assert issued["exp"] <= claims(tokens["access_token"])["exp"]

    # Within its token and folder, through the official SDK client.
    drawn = sub_agent_call(
        studio, delegated, "write_svg", {"folder": "icons", "name": "b.svg", "svg": "<svg/>"}
    )
    assert drawn == "wrote icons/b.svg"
    written = list(studio.upstream.written)
    # Another folder: refused by the sub-agent's own rights.
    other = studio.call(delegated, "write_svg", folder="drafts", name="c.svg", svg="<svg/>")
    assert refusal(other) == ("refused", "not_permitted")
    # A scope its token does not carry (the coding agent's token had it): step-up refused.
    assert refusal(studio.call(delegated, "write_file", folder="icons", name="t", text="x")) == (
        "http",
        403,
    )
    # Publishing: the sub-agent and the coding agent may, the person (not a publisher) may not.
    published = studio.call(delegated, "publish", folder="icons", name="b.svg")
    assert refusal(published) == ("refused", "not_permitted")
    # The archive: the sub-agent is given it, the coding agent keeps out of it.
    studio.facts(("may_use_folder", f"Agent:{svgbot.client_id}", "archive"))
    archived = studio.call(delegated, "write_svg", folder="archive", name="d.svg", svg="<svg/>")
    assert refusal(archived) == ("refused", "not_permitted")
    assert studio.upstream.written == written  # nothing refused reached the studio

    chain = tuple(
        repr(p)
        for p in (
            Entity("User", "sam"),
            Entity("Agent", coder.client_id),
            Entity("Agent", svgbot.client_id),
        )
    )

    def calls_of_the_sub_agent() -> list:
        return [
            r
            for r in studio.records()[seq:]
            if r.method == "tools/call" and r.principals[-1] == chain[-1]
        ]

    # Records are written in the background, refusals at once and allowed calls once their
    # obligations are known: wait for the three refusals and the allowed call.
    def written() -> bool:
        mine = calls_of_the_sub_agent()
        return [r.result for r in mine].count("deny") >= 3 and len(mine) >= 4

    eventually(written, every=0.1)
    mine = calls_of_the_sub_agent()
    assert len(mine) >= 4
    assert all(tuple(r.principals) == chain for r in mine)
    # Every refusal names the principal it turned on.
    refused = [r.deciding_principal for r in mine if r.result == "deny"]
    assert refused.count(chain[2]) == 1  # the other folder
    assert refused.count(chain[0]) == 1  # publish
    assert refused.count(chain[1]) == 1  # the archive
    # `bastion audit tail` shows the chain.
    tail = studio.cli("audit", "tail", "--lines", "50")
    assert " ".join(chain) in tail

    # The coding agent's grant is revoked (its refresh token, RFC 7009 §2.1): the sub-agent's
    # delegated token dies on its very next call.
    revoked = studio.http.post(
        f"{studio.url}/revoke",
        data={"token": tokens["refresh_token"], "client_id": coder.client_id},
    )
    assert revoked.status_code == 200
    after = studio.call(delegated, "write_svg", folder="icons", name="e.svg", svg="<svg/>")
    assert after["http"] == 401 and "revoked" in after["body"]
    exchanged = [e for e in studio.events("token.exchanged") if e.client_id == svgbot.client_id]
    assert exchanged[0].detail["chain"] == [coder.client_id, svgbot.client_id]


def test_revoking_the_coding_agents_grant_ends_the_sub_agents_open_stream(studio):
    coder, svgbot = cast(studio, "streamer")
    tokens = studio.user_token(coder, "sam")
    delegated = studio.exchange(
        coder, tokens["access_token"], studio.own_token(svgbot), scope="svg:write"
    ).json()["access_token"]
    with studio.http.stream(
        "POST",
        studio.mcp_url,
        json=modern_request("w-1", "subscriptions/listen", {"notifications": {}}),
        headers=modern_headers(delegated, "subscriptions/listen"),
    ) as stream:
        assert stream.status_code == 200
        frames = events(stream)
        assert next(frames)["method"] == "notifications/subscriptions/acknowledged"
        studio.http.post(
            f"{studio.url}/revoke",
            data={"token": tokens["refresh_token"], "client_id": coder.client_id},
        )
        assert list(frames) == []  # ended (a read timeout would fail the test instead)


def test_a_revoked_client_takes_every_delegation_it_made_with_it(studio):
    coder, svgbot = cast(studio, "fired")
    tokens = studio.user_token(coder, "sam")
    delegated = studio.exchange(
        coder, tokens["access_token"], studio.own_token(svgbot), scope="svg:write"
    ).json()["access_token"]
    drawn = studio.call(delegated, "write_svg", folder="icons", name="f.svg", svg="<svg/>")
    assert "result" in drawn, drawn
    studio.cli("clients", "revoke", coder.client_id)  # another process, the same database
    refused = studio.call(delegated, "write_svg", folder="icons", name="g.svg", svg="<svg/>")
    assert refused["http"] == 401


def test_suspending_the_coding_agent_refuses_its_sub_agents_delegated_calls(studio):
    """The kill switch covers every principal of the chain, not only the user and the agent
    calling: the coding agent suspended, the sub-agent acting for it is refused."""
    coder, svgbot = cast(studio, "suspended-coder")
    subject = studio.user_token(coder, "sam")["access_token"]
    delegated = studio.exchange(coder, subject, studio.own_token(svgbot)).json()["access_token"]
    assert refusal(studio.call(delegated, "read_file", folder="icons", name="a.svg")) == ("ok",)
    suspended = studio.http.post(
        f"{studio.url}/v1/suspensions",
        json={"kind": "agent", "id": coder.client_id},
        headers={"authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert suspended.status_code == 201, suspended.text
    answer = studio.call(delegated, "read_file", folder="icons", name="a.svg")
    assert refusal(answer) == ("refused", "suspended")
