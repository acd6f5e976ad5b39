"""Upstream sessions per user and per client session (``session`` of an upstream).

A stateful upstream (official SDK, Streamable HTTP, sessions: `session_server.py`) says which of
its sessions each call came on, and asks its client for input on its standing stream. Through
bastion, each user's calls land on an upstream session of their own (``per_user``), or each client
session's (``per_client_session``); what the upstream asks on one user's session reaches that
user's client, decided by the policy and its answer masked, never another user's; ``shared``
stays one session for everyone, whose standing-stream requests are refused as before.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path

import anyio
import httpx2
import pytest
from mcp import types
from mcp.client.client import Client as McpClient
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from bastion.cli import main as cli
from bastion.gateway.client_requests import ASKED_STATE
from bastion.gateway.config import GatewayConfig
from bastion.gateway.upstream_sessions import SessionOwner
from bastion.oauth import registration
from bastion.oauth.token_exchange import ACCESS_TOKEN_TYPE, TOKEN_EXCHANGE_GRANT_TYPE
from bastion.oauth.users import create_user
from bastion.server.config import ConfigError
from tests import clients
from tests.oauth.support import MemoryStorage, free_socket, sdk_auth, serve
from tests.waits import PATIENCE, eventually, eventually_async

from .streams import legacy_session, messages, modern_headers, modern_request
from .support import REDIRECT_URI, LegacyOnly, MemoryEvents, Recorder, fresh_module, start
from .support import test_policy as quickstart_policy

SERVER = fresh_module("session_server", Path(__file__).parent / "session_server.py")
NAMES = ["solo", "pair", "together", "capped", "brief", "hushed", "reviewed", "approved"]
# Everyone may do everything on these servers, except that the upstream may not list a client's
# roots, and a client's elicitation answer goes back with its "secret" field masked.
POLICY = f"""
allow(_actor, _action: String, _it: McpServer) if context.server in {json.dumps(NAMES)};
allow(_actor, _action: String, _it: Tool) if context.server in {json.dumps(NAMES)};
deny(_user: User, "roots/list", _it: McpServer) if context.server in {json.dumps(NAMES)};
mask(_user: User, "elicitation/create", _it: McpServer, "content.secret") if
  context.server in {json.dumps(NAMES)};
# "reviewed": what the client answers the upstream's sampling requests is held for a review.
requires_review(_user: User, "sampling/createMessage", _it: McpServer) if
  context.server = "reviewed";
# "approved": the upstream's sampling requests need a person's approval.
requires_approval(_user: User, "sampling/createMessage", _it: McpServer) if
  context.server = "approved";
# "hushed": every call's result is under a mask (the SDK puts a tool's text in "result").
mask(_user: User, "call", _it: Tool, "result") if context.server = "hushed";
deny(user: User, "connect", _it: McpServer) if user = User{{"sam"}} and
  context.server in {json.dumps(NAMES)};
allow(_actor, _action: String, _it: McpServer) if context.server = "mine";
allow(_actor, _action: String, _it: Tool) if context.server = "mine";
mask(_user: User, "elicitation/create", _it: McpServer, "content.name") if context.server = "mine";
deny(_user: User, "roots/list", _it: McpServer) if context.server = "mine";
# On "pair" and "mine" any agent may delegate to any other, every scope passing.
may_delegate(_from: Agent, _to: Agent, server: McpServer) if server = McpServer{{"pair"}};
delegated_scope(_user: User, _from: Agent, _to: Agent, server: McpServer, _scope: String) if
  server = McpServer{{"pair"}};
may_delegate(_from: Agent, _to: Agent, server: McpServer) if server = McpServer{{"mine"}};
delegated_scope(_user: User, _from: Agent, _to: Agent, server: McpServer, _scope: String) if
  server = McpServer{{"mine"}};
"""
# "mine": the lab's server speaking 2026-07-28 (which asks by input_required results), one
# upstream session per user, whose elicitations' answers go back with their name masked, and
# which may not list a user's roots.
LAB = fresh_module("lab_server_mine", Path(__file__).parent / "lab_server.py")


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    upstream = Recorder(LegacyOnly(SERVER.server.streamable_http_app(streamable_http_path="/mcp")))
    lab = Recorder(
        LegacyOnly(
            LAB.server.streamable_http_app(streamable_http_path="/mcp", event_store=MemoryEvents()),
            legacy=False,
        )
    )
    with serve(upstream, free_socket()) as url, serve(lab, free_socket()) as lab_url:
        more = (
            {"name": "mine", "url": f"{lab_url}/mcp", "session": "per_user"},
            {"name": "solo", "url": f"{url}/mcp", "session": "per_user"},
            {"name": "hushed", "url": f"{url}/mcp", "session": "per_user"},
            {"name": "reviewed", "url": f"{url}/mcp", "session": "per_user"},
            {"name": "approved", "url": f"{url}/mcp", "session": "per_user"},
            {"name": "pair", "url": f"{url}/mcp", "session": "per_client_session"},
            {"name": "together", "url": f"{url}/mcp"},
            {"name": "capped", "url": f"{url}/mcp", "session": "per_user", "max_sessions": 1},
            {
                "name": "brief",
                "url": f"{url}/mcp",
                "session": "per_user",
                "session_idle_seconds": 1,
            },
        )
        with start(
            tmp_path_factory.mktemp("upsessions"), policy_extra=POLICY, more_upstreams=more
        ) as running:
            for name in ("alice", "bob"):
                create_user(
                    running.app.state.oauth.store, name, running.password, time.time(), actor="test"
                )
            running.upstream_requests = upstream.requests
            running.lab_requests = lab.requests
            yield running


def callbacks(user: str, seen: list, declines: bool = False, refuses: bool = False) -> dict:
    """An SDK client's answers: each request it is asked is noted in ``seen``. One that
    ``declines`` answers an elicitation with an error that names its secret; one that
    ``refuses`` answers it with MCP's ``decline`` (no content)."""

    async def elicit(context, params):
        seen.append(("elicit", params.message))
        if refuses:
            return types.ElicitResult(action="decline")
        if declines:
            secret = f"{user}-secret"
            return types.ErrorData(code=-32042, message=f"not {secret}", data={"secret": secret})
        return types.ElicitResult(
            action="accept", content={"name": user, "secret": f"{user}-secret"}
        )

    async def sample(context, params):
        seen.append(("sample", params.messages[0].content.text))
        text = types.TextContent(type="text", text=f"{user}'s model")
        return types.CreateMessageResult(role="assistant", content=text, model="test-model")

    async def roots(context):
        seen.append(("roots", ""))
        return types.ListRootsResult(roots=[types.Root(uri=f"file:///home/{user}")])

    return {
        "elicitation_callback": elicit,
        "sampling_callback": sample,
        "list_roots_callback": roots,
    }


async def connect(
    bastion,
    stack: AsyncExitStack,
    user: str,
    server: str,
    seen: list,
    mode="legacy",
    declines: bool = False,
    refuses: bool = False,
):
    """An official SDK client of ``user`` on ``server`` (signed in through OAuth)."""
    provider = sdk_auth(
        bastion.mcp_url(server),
        lambda url: bastion.log_in_and_consent(url, user),
        MemoryStorage(),
        [],
        client_name=f"{user}'s agent",
        redirect_uri=REDIRECT_URI,
    )
    http = await stack.enter_async_context(
        httpx2.AsyncClient(auth=provider, timeout=30, verify=clients.TRUST)
    )
    return await stack.enter_async_context(
        McpClient(
            streamable_http_client(bastion.mcp_url(server), http_client=http),
            mode=mode,
            **callbacks(user, seen, declines, refuses),
        )
    )


async def text(client, tool: str, **arguments) -> str:
    return (await client.call_tool(tool, arguments)).content[0].text


async def streams_open(bastion, server: str, count: int) -> None:
    """Wait until ``count`` client sessions on ``server`` have their GET stream open (an SDK
    client opens it in the background after initialize)."""
    table = bastion.app.state.gateway.sessions
    opened = await eventually_async(
        lambda: (
            sum(1 for s in table._sessions.values() if s.server == server and s.listener) >= count
        ),
        every=0.02,
    )
    assert opened, f"{count} GET streams were never open on {server}"


def support_policy() -> str:
    """The policy these tests' bastion runs: the tests' own, then this module's."""
    return quickstart_policy() + POLICY


def upstream_deleted(bastion, session_id: str) -> bool:
    return any(
        r["method"] == "DELETE" and r["headers"].get(b"mcp-session-id") == session_id.encode()
        for r in bastion.upstream_requests
    )


def test_each_users_calls_land_on_their_own_upstream_session(bastion):
    async def main():
        async with AsyncExitStack() as stack:
            alice = await connect(bastion, stack, "alice", "solo", [])
            again = await connect(bastion, stack, "alice", "solo", [])
            bob = await connect(bastion, stack, "bob", "solo", [])
            return [await text(c, "whoami") for c in (alice, again, alice, bob, bob)]

    first, again, later, bob, bob_later = anyio.run(main)
    assert first == again == later != bob == bob_later
    assert "none" not in (first, bob)


def test_a_request_on_alices_session_reaches_alice_never_bob(bastion):
    asked = {"alice": [], "bob": []}

    async def main():
        async with AsyncExitStack() as stack:
            alice = await connect(bastion, stack, "alice", "solo", asked["alice"])
            bob = await connect(bastion, stack, "bob", "solo", asked["bob"])
            await streams_open(bastion, "solo", 2)
            return (
                await text(alice, "ask", kind="elicit"),
                await text(bob, "ask", kind="sample"),
                await text(alice, "ask", kind="sample"),
            )

    alice_elicit, bob_sample, alice_sample = anyio.run(main)
    # Decided and masked: the upstream never sees alice's secret.
    assert json.loads(alice_elicit.removeprefix("answer: ")) == {
        "name": "alice",
        "secret": "[masked]",
    }
    assert bob_sample == "answer: bob's model"
    assert alice_sample == "answer: alice's model"
    assert asked["alice"] == [("elicit", "Who are you?"), ("sample", "Which model?")]
    assert asked["bob"] == [("sample", "Which model?")]


@pytest.mark.parametrize("tool", ["ask", "ask_in_call"])
def test_a_clients_error_answer_under_a_mask_reaches_the_upstream_without_its_text(bastion, tool):
    # An error's message and data are the client's free text: they could hold what is masked.
    async def main():
        async with AsyncExitStack() as stack:
            alice = await connect(bastion, stack, "alice", "solo", [], declines=True)
            await streams_open(bastion, "solo", 1)
            return await text(alice, tool, kind="elicit")

    before = len(bastion.upstream_requests)
    answer = anyio.run(main)
    assert answer.startswith("refused: the client answered with an error"), answer
    sent = b"".join(r["body"] for r in bastion.upstream_requests[before:])
    assert b"-32042" in sent  # its code goes back
    assert b"alice-secret" not in sent


@pytest.mark.parametrize("mode", ["legacy", "auto"])
def test_a_2026_upstreams_question_is_answered_under_its_masks_in_either_era(bastion, mode):
    # A 2025-11-25 client is asked by bastion, which sends the answer masked; a 2026-07-28 client
    # answers in a retry of its own, whose answers bastion must mask (or refuse) as well.
    async def main():
        async with AsyncExitStack() as stack:
            alice = await connect(bastion, stack, "alice", "mine", [], mode=mode)
            try:
                return await text(alice, "greet")
            except MCPError as e:
                return f"refused: {e}"

    before = len(bastion.lab_requests)
    answer = anyio.run(main)
    sent = b"".join(r["body"] for r in bastion.lab_requests[before:])
    assert b'"name":"alice"' not in sent.replace(b" ", b""), answer
    assert answer == "hello [masked]", answer


@pytest.mark.parametrize("tool", ["ask", "ask_in_call"])
def test_a_request_the_policy_denies_is_refused_to_the_upstream(bastion, tool):
    asked: list = []

    async def main():
        async with AsyncExitStack() as stack:
            alice = await connect(bastion, stack, "alice", "solo", asked)
            await streams_open(bastion, "solo", 1)
            return await text(alice, tool, kind="roots")

    answer = anyio.run(main)
    assert answer.startswith("refused: bastion refused this request (solo): not permitted")
    assert asked == []


@pytest.mark.parametrize("tool", ["ask", "ask_in_call"])
def test_a_request_the_policy_holds_for_review_is_refused_to_the_upstream(bastion, tool):
    """Nobody can review what the client answers while the upstream waits for it (within a
    call or on the standing stream): such a request is refused, and recorded so. Before, where
    someone could review (alice, for her own agent), it was let through with a review to do
    that nobody did: the client was asked, and its answer went upstream unreviewed."""
    asked: list = []

    async def main():
        async with AsyncExitStack() as stack:
            alice = await connect(bastion, stack, "alice", "reviewed", asked)
            await streams_open(bastion, "reviewed", 1)
            return await text(alice, tool, kind="sample")

    bastion.flush()
    after = bastion.records.last_seq()
    answer = anyio.run(main)
    assert answer.startswith(
        "refused: bastion refused this request (reviewed): the policy holds this request for a"
        " person's review"
    ), answer
    assert asked == []
    [record] = relayed_records(bastion, after, "reviewed", "sampling/createMessage")
    assert (record.result, record.reason) == ("deny", "review_required")


@pytest.mark.parametrize("tool", ["ask", "ask_in_call"])
def test_a_request_the_policy_holds_for_approval_is_refused_and_asks_nobody(bastion, tool):
    """Nobody can approve an upstream's request while the upstream waits for its answer: it is
    refused (``requires_approval``), recorded so, and no person is asked (no approval request
    is filed: approved, it would let through a later request of the upstream's, whatever it
    carries, that nobody saw). Before, it filed a request and was recorded ``held``
    (``approval_pending``) while the upstream was told it was refused."""
    asked: list = []
    approvals = bastion.app.state.approvals.store

    def filed() -> list:
        return [r.id for r in approvals.listed(limit=1000) if r.server == "approved"]

    async def main():
        async with AsyncExitStack() as stack:
            alice = await connect(bastion, stack, "alice", "approved", asked)
            await streams_open(bastion, "approved", 1)
            return await text(alice, tool, kind="sample")

    before = filed()
    bastion.flush()
    after = bastion.records.last_seq()
    answer = anyio.run(main)
    [record] = relayed_records(bastion, after, "approved", "sampling/createMessage")
    assert (record.result, record.reason) == ("deny", "requires_approval")
    assert "approval" not in record.obligations, record.obligations
    assert filed() == before
    assert answer.startswith("refused: bastion refused this request (approved): "), answer
    assert asked == []


@pytest.mark.parametrize("tool", ["ask", "ask_in_call"])
@pytest.mark.parametrize("kind", ["elicit", "sample"])
def test_an_upstream_cannot_ask_the_client_about_what_a_masked_call_holds_on_any_stream(
    bastion, tool, kind
):
    # During a call whose result is masked, what the upstream asks the client (a sampling
    # prompt, an elicitation's message) can carry the masked field, and cannot be masked: the
    # SDK sends it on the standing stream unless told which request it belongs to.
    asked: list = []
    address = "ada@example.com"

    async def main():
        async with AsyncExitStack() as stack:
            alice = await connect(bastion, stack, "alice", "hushed", asked)
            await streams_open(bastion, "hushed", 1)
            return await alice.call_tool(tool, {"kind": kind, "about": address})

    before = len(bastion.upstream_requests)
    result = anyio.run(main)
    assert asked == []
    assert address not in result.model_dump_json()
    sent = b"".join(r["body"] for r in bastion.upstream_requests[before:])
    assert b"masked or held for review" in sent  # the upstream was told why


def relayed_records(bastion, after: int, server: str, method: str) -> list:
    """The decision records of ``method`` requests ``server`` sent a client, written since
    sequence ``after``."""
    bastion.flush()
    return [
        r
        for _, r in bastion.records.after(after, 10_000)
        if r.server == server and r.method == method
    ]


@pytest.mark.parametrize("kind", ["elicit", "sample"])
def test_a_request_withheld_from_a_masked_call_is_recorded_as_refused(bastion, kind):
    # The policy allows the upstream to ask; bastion withholds it all the same, as the call's
    # result is masked: the record says what reached the client (nothing), not "allow".
    method = "elicitation/create" if kind == "elicit" else "sampling/createMessage"
    asked: list = []

    async def main():
        async with AsyncExitStack() as stack:
            alice = await connect(bastion, stack, "alice", "hushed", asked)
            return await alice.call_tool("ask_in_call", {"kind": kind})

    bastion.flush()
    after = bastion.records.last_seq()
    anyio.run(main)
    assert asked == []
    [record] = relayed_records(bastion, after, "hushed", method)
    assert (record.result, record.reason) == ("deny", "masked_call")


@pytest.mark.parametrize("tool", ["ask", "ask_in_call"])
def test_a_clients_answer_withheld_from_the_upstream_is_recorded_as_refused(bastion, tool):
    # The answer (a decline: no content) has no field for the mask to reach, so bastion
    # withholds it whole; the upstream hears a refusal, and the record says so.
    asked: list = []

    async def main():
        async with AsyncExitStack() as stack:
            alice = await connect(bastion, stack, "alice", "solo", asked, refuses=True)
            await streams_open(bastion, "solo", 1)
            return await text(alice, tool, kind="elicit")

    bastion.flush()
    after = bastion.records.last_seq()
    answer = anyio.run(main)
    assert answer.startswith("refused: the client's answer is withheld by bastion"), answer
    assert [kind for kind, _ in asked] == ["elicit"]
    [record] = relayed_records(bastion, after, "solo", "elicitation/create")
    assert (record.result, record.reason) == ("deny", "answer_withheld")


def test_a_relayed_request_answered_in_full_is_recorded_as_allowed(bastion):
    async def main():
        async with AsyncExitStack() as stack:
            alice = await connect(bastion, stack, "alice", "solo", [])
            await streams_open(bastion, "solo", 1)
            return await text(alice, "ask_in_call", kind="sample")

    bastion.flush()
    after = bastion.records.last_seq()
    assert anyio.run(main) == "answer: alice's model"
    [record] = relayed_records(bastion, after, "solo", "sampling/createMessage")
    assert (record.result, record.reason) == ("allow", "")


def test_a_candidate_that_holds_a_relayed_request_is_replayed_as_refusing_it(
    bastion, tmp_path, capsys
):
    """``bastion audit replay`` asks an upstream's request again as the gateway decides it: a
    candidate that would have a person approve (or review) it refuses it, as the gateway would
    (nobody waits on it), and is reported so, not as a hold."""

    async def main():
        async with AsyncExitStack() as stack:
            alice = await connect(bastion, stack, "alice", "solo", [])
            await streams_open(bastion, "solo", 1)
            return await text(alice, "ask", kind="sample")

    bastion.flush()
    after = bastion.records.last_seq()
    assert anyio.run(main) == "answer: alice's model"
    [allowed] = relayed_records(bastion, after, "solo", "sampling/createMessage")
    assert allowed.result == "allow"
    for hold, reason in (("requires_approval", "requires_approval"), ("requires_review", None)):
        candidate = tmp_path / f"{hold}.polar"
        candidate.write_text(
            support_policy()
            + f'\n{hold}(_user: User, "sampling/createMessage", _it: McpServer) if'
            + ' context.server = "solo";\n'
        )
        database = bastion.app.state.config.database
        code = cli(
            ["audit", "replay", "--policy", str(candidate), "--database", database, "--json"]
        )
        out = capsys.readouterr()
        assert code == 1, out.err
        changed = {c["id"]: c for c in json.loads(out.out)["changed"]}
        assert changed[allowed.id]["new"]["result"] == "deny", changed[allowed.id]
        assert changed[allowed.id]["new"]["reason"] == (reason or "requires_review")


def test_each_client_session_has_its_own_upstream_session_closed_with_it(bastion):
    asked = {"first": [], "second": []}

    async def main():
        async with AsyncExitStack() as stack:
            second = await connect(bastion, stack, "alice", "pair", asked["second"])
            bob = await connect(bastion, stack, "bob", "pair", [])
            async with AsyncExitStack() as inner:
                first = await connect(bastion, inner, "alice", "pair", asked["first"])
                await streams_open(bastion, "pair", 3)
                ids = [await text(c, "whoami") for c in (first, second, bob, first)]
                answer = await text(first, "ask", kind="sample")
            # The first client session ended (the SDK sent DELETE): its upstream session too.
            closed = await eventually_async(lambda: upstream_deleted(bastion, ids[0]), every=0.02)
            assert closed, "the ended session's upstream session was never closed"
            return ids, answer, upstream_deleted(bastion, ids[1])

    ids, answer, second_deleted = anyio.run(main)
    assert len(set(ids[:3])) == 3 and ids[3] == ids[0]
    assert answer == "answer: alice's model"
    assert asked == {"first": [("sample", "Which model?")], "second": []}
    assert not second_deleted


def test_a_shared_upstream_session_is_one_for_everyone_and_relays_no_standing_request(bastion):
    asked: list = []

    async def main():
        async with AsyncExitStack() as stack:
            alice = await connect(bastion, stack, "alice", "together", asked)
            bob = await connect(bastion, stack, "bob", "together", [])
            await streams_open(bastion, "together", 2)
            return (
                await text(alice, "whoami"),
                await text(bob, "whoami"),
                await text(alice, "ask", kind="sample"),
                # Within a call, relayed as before: not decided by the policy (roots allowed).
                await text(alice, "ask_in_call", kind="roots"),
            )

    alice_id, bob_id, standing, in_call = anyio.run(main)
    assert alice_id == bob_id
    assert standing == "refused: bastion does not relay server requests"
    assert in_call == "answer: file:///home/alice"
    assert asked == [("roots", "")]


def test_an_upstream_session_reaches_no_other_users_call_with_progress(bastion):
    # bastion's progress tokens upstream are its own (and counted: easy to guess). An upstream
    # session that sends progress under the tokens of other requests reaches none of them: not
    # another user's call on the same upstream, nor a call on another upstream. Before, each
    # reached the call holding that token, whichever connection it came from.
    heard: dict[str, list] = {"bob": [], "bob elsewhere": []}
    tag = "progress-crossing"

    async def main():
        async with AsyncExitStack() as stack:
            alice = await connect(bastion, stack, "alice", "solo", [])
            bob = await connect(bastion, stack, "bob", "solo", [])
            again = await connect(bastion, stack, "bob", "solo", [])
            elsewhere = await connect(bastion, stack, "bob", "together", [])

            def noted(who: str):
                async def progress(progress, total, message):
                    heard[who].append(message)

                return progress

            async with anyio.create_task_group() as tasks:
                for client, who, held in (
                    (bob, "bob", tag),
                    (elsewhere, "bob elsewhere", tag + "2"),
                ):
                    tasks.start_soon(
                        partial(
                            client.call_tool, "hold", {"tag": held}, progress_callback=noted(who)
                        )
                    )
                held = await eventually_async(lambda: {tag, tag + "2"} <= SERVER.HELD, every=0.02)
                assert held, "the calls never reached the upstream"
                routes = list(bastion.app.state.gateway.progress_routes)
                assert len(routes) >= 2
                said = await text(alice, "nudge", tokens=routes, message="alice's session says hi")
                # Bob's own upstream session still reaches his call (and only that one).
                await text(again, "nudge", tokens=routes, message="bob's session says hi")
                SERVER.RELEASED.update({tag, tag + "2"})
            return said

    said = anyio.run(main)
    assert said.startswith("nudged")
    assert heard == {"bob": ["bob's session says hi"], "bob elsewhere": []}


def test_a_2026_client_cannot_be_asked_on_a_standing_stream(bastion):
    asked: list = []

    async def main():
        async with AsyncExitStack() as stack:
            alice = await connect(bastion, stack, "alice", "solo", asked, mode="auto")
            assert alice.protocol_version == "2026-07-28"
            return await text(alice, "ask", kind="sample")

    answer = anyio.run(main)
    assert answer.startswith("refused: no client of this session can be asked now")
    assert "2026-07-28 client has no standing stream" in answer
    assert asked == []


def _call(bastion, headers, server, tool, arguments, request_id=7):
    body = {"jsonrpc": "2.0", "id": request_id, "method": "tools/call"}
    body["params"] = {"name": tool, "arguments": arguments}
    response = bastion.http.post(bastion.mcp_url(server), json=body, headers=headers)
    assert response.status_code == 200, response.text
    return messages(response)[-1]


def test_the_cap_closes_the_oldest_idle_session_and_refuses_when_none_is_idle(bastion):
    alice = legacy_session(bastion, bastion.token("alice", "capped"), "capped")
    first = _call(bastion, alice, "capped", "whoami", {})["result"]["content"][0]["text"]
    bob = legacy_session(bastion, bastion.token("bob", "capped"), "capped")
    # Bob's session took the only place: alice's, idle, was closed upstream.
    assert upstream_deleted(bastion, first)
    held: dict = {}
    thread = threading.Thread(
        target=lambda: held.update(_call(bastion, bob, "capped", "hold", {"tag": "cap"}))
    )
    thread.start()
    try:
        assert eventually(lambda: "cap" in SERVER.HELD, every=0.02), (
            "the upstream never got bob's call"
        )
        refused = _call(bastion, alice, "capped", "whoami", {})
        assert refused["error"]["code"] == -32000
        assert (
            "has its 1 sessions (max_sessions) open and every one is in use"
            in (refused["error"]["message"])
        )
    finally:
        SERVER.RELEASED.add("cap")
        thread.join(PATIENCE)
    assert held["result"]["content"][0]["text"] == "released cap"
    again = _call(bastion, alice, "capped", "whoami", {})["result"]["content"][0]["text"]
    assert again != first


def test_an_idle_upstream_session_is_closed(bastion):
    alice = legacy_session(bastion, bastion.token("alice", "brief"), "brief")
    first = _call(bastion, alice, "brief", "whoami", {})["result"]["content"][0]["text"]
    assert eventually(lambda: upstream_deleted(bastion, first), every=0.05), (
        "the idle upstream session was never closed"
    )
    # The client's own session lives on; its next call opens a new upstream session.
    again = _call(bastion, alice, "brief", "whoami", {})["result"]["content"][0]["text"]
    assert again not in (first, "none")


@pytest.mark.parametrize(
    ("table", "error"),
    [
        ({"session": "per_agent"}, "session must be one of shared, per_user, per_client_session"),
        ({"session": "per_user", "max_sessions": 0}, "max_sessions must be a whole number"),
        # A count is never rounded to another one.
        ({"session": "per_user", "max_sessions": 2.5}, "max_sessions must be a whole number"),
        (
            {"session": "per_user", "session_idle_seconds": -1},
            "session_idle_seconds must be a positive number of seconds",
        ),
        ({"timeout": float("inf")}, "timeout must be a positive number of seconds"),
        ({"timeout": True}, "timeout must be a positive number of seconds"),
    ],
)
def test_bad_session_settings_are_refused(table, error):
    upstream = {"name": "files", "url": "http://127.0.0.1:9/mcp", **table}
    with pytest.raises(ConfigError, match=error):
        GatewayConfig.from_mapping({"upstreams": [upstream]}, env={})


@pytest.mark.parametrize(
    ("table", "error"),
    [
        ({"label_ttl_seconds": 1.5}, "label_ttl_seconds must be a whole number"),  # Redis EXPIRE
        ({"max_body_bytes": 1024.5}, "max_body_bytes must be a whole number"),
        ({"label_max": 0}, "label_max must be a whole number"),
        ({"session_idle_seconds": 0}, "session_idle_seconds must be a positive number of seconds"),
    ],
)
def test_bad_gateway_numbers_are_refused(table, error):
    with pytest.raises(ConfigError, match=error):
        GatewayConfig.from_mapping(table, env={})


def test_seconds_keep_their_fractions():
    # 0.5 s was read as int(0.5): a timeout of 0, which no call could meet.
    upstream = {"name": "files", "url": "http://127.0.0.1:9/mcp", "session": "per_user"}
    config = GatewayConfig.from_mapping(
        {
            "session_idle_seconds": 2.7,
            "upstreams": [{**upstream, "timeout": 0.5, "session_idle_seconds": 1.5}],
        },
        env={},
    )
    assert config.session_idle_seconds == 2.7
    files = config.upstream("files")
    assert (files.timeout, files.session_idle_seconds) == (0.5, 1.5)


def test_a_stdio_upstream_is_shared():
    upstream = {"name": "desk", "command": "python", "session": "per_user"}
    with pytest.raises(ConfigError, match="needs a Streamable HTTP upstream"):
        GatewayConfig.from_mapping({"upstreams": [upstream]}, env={})
    defaults = GatewayConfig.from_mapping({"upstreams": [{"name": "d", "command": "python"}]})
    assert defaults.upstreams[0].session == "shared"


def _claim(token: str, name: str) -> str:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))[name]


def _closed_upstream(bastion, session_id: str) -> None:
    assert eventually(lambda: upstream_deleted(bastion, session_id), every=0.02), (
        "the upstream session was never closed"
    )


def test_revoking_a_grant_closes_the_upstream_sessions_it_used(bastion):
    token = bastion.token("alice", "solo")
    alice = legacy_session(bastion, token, "solo")
    first = _call(bastion, alice, "solo", "whoami", {})["result"]["content"][0]["text"]
    revoked = bastion.http.post(
        f"{bastion.url}/revoke", data={"token": token, "client_id": _claim(token, "client_id")}
    )
    assert revoked.status_code == 200, revoked.text
    _closed_upstream(bastion, first)
    # Another agent of alice's gets a new upstream session.
    again = legacy_session(bastion, bastion.token("alice", "solo"), "solo")
    assert _call(bastion, again, "solo", "whoami", {})["result"]["content"][0]["text"] != first


def test_suspending_a_user_closes_their_upstream_session(bastion):
    key, _ = bastion.app.state.keys.create("kill switch", ["suspensions"], created_by="test")
    headers = {"authorization": f"Bearer {key}"}
    bob = legacy_session(bastion, bastion.token("bob", "solo"), "solo")
    first = _call(bastion, bob, "solo", "whoami", {})["result"]["content"][0]["text"]
    suspended = bastion.http.post(
        f"{bastion.url}/v1/suspensions", json={"kind": "user", "id": "bob"}, headers=headers
    )
    assert suspended.status_code == 201, suspended.text
    try:
        _closed_upstream(bastion, first)
    finally:
        resumed = bastion.http.delete(f"{bastion.url}/v1/suspensions/user/bob", headers=headers)
        assert resumed.status_code == 200, resumed.text


def _client(bastion, grant_types: list[str], **metadata) -> tuple[str, str | None]:
    """A client registered as `bastion clients create` does: its id and secret (if any)."""
    oauth = bastion.app.state.oauth
    values = registration.validate_client_metadata(
        {"grant_types": grant_types, "scope": "customers:read", **metadata}, oauth.settings
    )
    registered = registration.new_client(values, source="admin", now=time.time())
    oauth.store.save_client(registered.client)
    created = registered.response()
    return created["client_id"], created.get("client_secret")


def _coder(bastion, name: str = "coder") -> str:
    """A coding agent (a public client) that signs its user in and may delegate."""
    coder, _ = _client(
        bastion,
        ["authorization_code", "refresh_token", TOKEN_EXCHANGE_GRANT_TYPE],
        client_name=name,
        redirect_uris=[REDIRECT_URI],
        token_endpoint_auth_method="none",
    )
    return coder


def _sub_agent(bastion) -> tuple[str, str | None]:
    return _client(
        bastion,
        ["client_credentials", TOKEN_EXCHANGE_GRANT_TYPE],
        client_name="sub-agent",
        token_endpoint_auth_method="client_secret_basic",
    )


def _delegated(bastion, user: str, coder: str, sub: tuple[str, str | None], server: str) -> str:
    """A token of ``sub`` acting for ``user`` through ``coder`` (RFC 8693): user -> coder -> sub."""
    resource = bastion.mcp_url(server)
    token_url = f"{bastion.url}/token"
    own = bastion.http.post(
        token_url, data={"grant_type": "client_credentials", "resource": resource}, auth=sub
    )
    assert own.status_code == 200, own.text
    exchanged = bastion.http.post(
        token_url,
        data={
            "grant_type": TOKEN_EXCHANGE_GRANT_TYPE,
            "client_id": coder,
            "subject_token": bastion.token(user, server, client_id=coder),
            "subject_token_type": ACCESS_TOKEN_TYPE,
            "actor_token": own.json()["access_token"],
            "actor_token_type": ACCESS_TOKEN_TYPE,
        },
    )
    assert exchanged.status_code == 200, exchanged.text
    return exchanged.json()["access_token"]


def test_suspending_a_parent_agent_closes_its_sub_agents_upstream_session(bastion):
    # alice's agent delegates to a sub-agent (RFC 8693); the sub-agent's client session on
    # "pair" (per_client_session) has an upstream session of its own.
    coder = _coder(bastion)
    token = _delegated(bastion, "alice", coder, _sub_agent(bastion), "pair")
    delegated = legacy_session(bastion, token, "pair")
    first = _call(bastion, delegated, "pair", "whoami", {})["result"]["content"][0]["text"]
    key, _ = bastion.app.state.keys.create("kill switch", ["suspensions"], created_by="test")
    headers = {"authorization": f"Bearer {key}"}
    suspended = bastion.http.post(
        f"{bastion.url}/v1/suspensions", json={"kind": "agent", "id": coder}, headers=headers
    )
    assert suspended.status_code == 201, suspended.text
    try:
        _closed_upstream(bastion, first)  # the parent, not the sub-agent, was suspended
    finally:
        resumed = bastion.http.delete(
            f"{bastion.url}/v1/suspensions/agent/{coder}", headers=headers
        )
        assert resumed.status_code == 200, resumed.text


def _whoami(bastion, headers: dict) -> str:
    """The upstream session a 2025-11-25 call with ``headers`` lands on."""
    return _call(bastion, headers, "pair", "whoami", {})["result"]["content"][0]["text"]


def _whoami_stateless(bastion, token: str) -> str:
    """The upstream session a 2026-07-28 call with ``token`` lands on."""
    response = bastion.http.post(
        bastion.mcp_url("pair"),
        json=modern_request(3, "tools/call", {"name": "whoami", "arguments": {}}),
        headers=modern_headers(token, "tools/call", "whoami"),
    )
    assert response.status_code == 200, response.text
    return messages(response)[-1]["result"]["content"][0]["text"]


def _two_chains(bastion, server: str = "pair") -> tuple[str, str]:
    """Tokens of one sub-agent acting for alice through each of her two coding agents."""
    sub = _sub_agent(bastion)
    return tuple(
        _delegated(bastion, "alice", _coder(bastion, name), sub, server)
        for name in ("first coder", "second coder")
    )


def test_a_sub_agent_cannot_resume_the_session_it_opened_for_another_chain(bastion):
    # The same sub-agent works for alice through two coding agents: its client session of one
    # chain, and the upstream session behind it (which may hold what it read there), is not
    # the other chain's, as an unknown session is not.
    first, second = _two_chains(bastion)
    opened = legacy_session(bastion, first, "pair")
    upstream_session = _whoami(bastion, opened)
    body = {"jsonrpc": "2.0", "id": 7, "method": "tools/call"}
    body["params"] = {"name": "whoami", "arguments": {}}
    borrowed = {**opened, "authorization": f"Bearer {second}"}
    refused = bastion.http.post(bastion.mcp_url("pair"), json=body, headers=borrowed)
    assert refused.status_code == 404, refused.text
    assert upstream_session not in refused.text
    # Each chain keeps its own: the first resumes its session, the second opens one of its own.
    assert _whoami(bastion, opened) == upstream_session
    assert _whoami(bastion, legacy_session(bastion, second, "pair")) != upstream_session


def test_a_sub_agents_stateless_calls_for_two_chains_land_on_two_upstream_sessions(bastion):
    # A 2026-07-28 client has no session: its upstream session is its chain's, not the
    # sub-agent's for every chain it serves.
    first, second = _two_chains(bastion)
    sessions = [_whoami_stateless(bastion, token) for token in (first, second, first, second)]
    assert sessions[0] == sessions[2] != sessions[1] == sessions[3]


def test_a_sub_agent_cannot_cancel_for_one_chain_a_request_it_sent_for_another(bastion):
    # A 2026-07-28 request is known by its user, chain and id: the sub-agent working for the
    # other agent names the same id, and the request runs on.
    first, second = _two_chains(bastion)
    tag = f"chains-{time.monotonic_ns()}"
    answer: dict = {}

    def post() -> None:
        with httpx2.Client(timeout=20) as http:
            answer["response"] = http.post(
                bastion.mcp_url("pair"),
                json=modern_request(11, "tools/call", {"name": "hold", "arguments": {"tag": tag}}),
                headers=modern_headers(first, "tools/call", "hold"),
            )

    thread = threading.Thread(target=post)
    thread.start()
    assert eventually(lambda: tag in SERVER.HELD, every=0.02), "the call never reached the upstream"
    cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 11}}
    headers = modern_headers(second, "notifications/cancelled")
    assert (
        bastion.http.post(bastion.mcp_url("pair"), json=cancel, headers=headers).status_code == 202
    )
    SERVER.RELEASED.add(tag)
    thread.join(PATIENCE)
    assert messages(answer["response"])[-1]["result"]["content"][0]["text"] == f"released {tag}"


def test_a_client_refused_at_initialize_opens_no_upstream_session(bastion):
    token = bastion.token("sam", "solo")
    for body, headers in (
        (
            {
                "jsonrpc": "2.0",
                "id": 0,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-11-25",
                    "capabilities": {},
                    "clientInfo": {"name": "t", "version": "1"},
                },
            },
            {"authorization": f"Bearer {token}", "mcp-protocol-version": "2025-11-25"},
        ),
        (modern_request(1, "server/discover", {}), modern_headers(token, "server/discover")),
    ):
        refused = bastion.http.post(bastion.mcp_url("solo"), json=body, headers=headers)
        assert refused.json()["error"]["data"]["reason"] == "not_permitted"
    pool = bastion.app.state.gateway.upstreams["solo"].sessions
    assert pool.find(SessionOwner("sam")) is None


def _claims(token: str) -> dict:
    body = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))


def _call_mine(bastion, token: str, params: dict, headers: dict | None = None):
    """``tools/call`` on "mine" with ``params`` (in 2026-07-28, unless the ``headers`` of a
    2025-11-25 session are given): the JSON-RPC response, and the calls that reached the
    upstream."""
    before = len(bastion.lab_requests)
    if headers is None:
        body = modern_request(5, "tools/call", params, {"elicitation": {}, "roots": {}})
        headers = modern_headers(token, "tools/call", params["name"])
    else:
        body = {"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": params}
    response = bastion.http.post(bastion.mcp_url("mine"), json=body, headers=headers)
    sent = [json.loads(r["body"]) for r in bastion.lab_requests[before:] if r["body"]]
    return messages(response)[-1], [m for m in sent if m.get("method") == "tools/call"]


def _retry(bastion, token: str, state: str, answers: dict):
    """A 2026-07-28 retry of the lab's ``greet`` on "mine" with ``state`` and ``answers``: the
    JSON-RPC response, and what reached the upstream."""
    params = {"name": "greet", "arguments": {}, "requestState": state, "inputResponses": answers}
    return _call_mine(bastion, token, params)


def _sealed(bastion, subject: str, client_id: str, **fields) -> str:
    value = base64.urlsafe_b64encode(json.dumps(fields).encode()).decode().rstrip("=")
    states = bastion.app.state.gateway.states
    return states.sign(value, subject, (client_id,), ASKED_STATE)


ANSWER = {"action": "accept", "content": {"name": "alice"}}


def test_a_retry_presents_bastions_question_state_only_as_given(bastion):
    """The state bastion gives with an upstream's questions is its own, for one caller and one
    server: made up, another caller's or another server's, the retry is refused and nothing
    reaches the upstream."""
    token = bastion.token("alice", "mine")
    claims = _claims(token)
    subject, client_id = claims["sub"], claims["client_id"]
    methods = {"q": "elicitation/create"}
    for state, refusal in (
        (ASKED_STATE + "e30.00", "requestState was not issued by bastion"),
        (_sealed(bastion, "bob", client_id, server="mine", methods=methods), "not issued"),
        (_sealed(bastion, subject, "other", server="mine", methods=methods), "not issued"),
        (_sealed(bastion, subject, client_id, server="solo", methods=methods), "another server"),
    ):
        reply, sent = _retry(bastion, token, state, {"q": ANSWER})
        assert reply["error"]["code"] == -32602 and refusal in reply["error"]["message"], reply
        assert sent == []


def test_a_retrys_answers_go_upstream_masked_as_their_questions_and_no_others(bastion):
    token = bastion.token("alice", "mine")
    claims = _claims(token)
    state = _sealed(
        bastion,
        claims["sub"],
        claims["client_id"],
        server="mine",
        methods={"q": "elicitation/create"},
        state="the upstream's",
    )
    _, sent = _retry(bastion, token, state, {"q": ANSWER, "extra": ANSWER})
    params = sent[-1]["params"]
    assert params["inputResponses"] == {"q": {"action": "accept", "content": {"name": "[masked]"}}}
    assert params["requestState"] == "the upstream's"
    # An answer that is no object is refused to the client.
    reply, sent = _retry(bastion, token, state, {"q": "alice"})
    assert reply["error"]["code"] == -32602 and sent == [], reply
    # An answer the policy refuses now (the upstream may not list alice's roots) goes nowhere.
    roots = _sealed(
        bastion, claims["sub"], claims["client_id"], server="mine", methods={"q": "roots/list"}
    )
    reply, sent = _retry(bastion, token, roots, {"q": {"roots": []}})
    assert reply["error"]["code"] == -32003 and sent == [], reply
    assert "not permitted" in reply["error"]["message"]


def _unsealed(state: str) -> dict:
    """What bastion's requestState holds: it is signed, not encrypted."""
    value = state[len(ASKED_STATE) :].rpartition(".")[0]
    return json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))


UNMASKED = {"action": "accept", "content": {"name": "alice-unmasked"}}


def test_answers_go_upstream_only_under_bastions_requeststate(bastion):
    """A 2026-07-28 client's answers reach the upstream only as answers to the questions
    bastion relayed, under the requestState bastion gave with them: the upstream's own state
    (readable inside bastion's) with answers that would escape their mask, answers with no
    state at all, or volunteered to a call that asked nothing (a roots list, which the policy
    denies), are refused and reach no upstream."""
    token = bastion.token("alice", "mine")
    asked, _ = _call_mine(bastion, token, {"name": "greet", "arguments": {}})
    state = asked["result"]["requestState"]
    assert state.startswith(ASKED_STATE)
    sealed = _unsealed(state)
    (key,) = sealed["methods"]
    lifted = {"name": "greet", "arguments": {}, "inputResponses": {key: UNMASKED}}
    if "state" in sealed:
        lifted["requestState"] = sealed["state"]
    volunteered = {
        "name": "ask_anyway",
        "arguments": {},
        "inputResponses": {"q": {"roots": [{"uri": "file:///home/alice"}]}},
    }
    for params in (
        lifted,
        {**lifted, "requestState": None},
        {k: v for k, v in lifted.items() if k != "requestState"},
        {"name": "greet", "arguments": {}, "requestState": "the upstream's"},
        volunteered,
    ):
        reply, sent = _call_mine(bastion, token, params)
        assert reply.get("error", {}).get("code") == -32602, (params, reply, sent)
        assert "requestState was not issued by bastion" in reply["error"]["message"]
        assert sent == [] and "alice-unmasked" not in json.dumps(sent)
    # Under bastion's state the same answer goes upstream masked.
    _, sent = _call_mine(
        bastion,
        token,
        {
            "name": "greet",
            "arguments": {},
            "requestState": state,
            "inputResponses": {key: UNMASKED},
        },
    )
    assert sent[-1]["params"]["inputResponses"][key]["content"] == {"name": "[masked]"}


def test_a_sub_agent_answers_an_upstreams_question_only_in_the_chain_it_was_asked_in(bastion):
    # The requestState given with an upstream's questions (holding the upstream's own state of
    # the call) to a sub-agent working for one agent is refused to it working for another.
    first, second = _two_chains(bastion, "mine")
    asked, _ = _call_mine(bastion, first, {"name": "greet", "arguments": {}})
    state = asked["result"]["requestState"]
    (key,) = _unsealed(state)["methods"]
    retry = {"name": "greet", "arguments": {}, "requestState": state, "inputResponses": {}}
    retry["inputResponses"][key] = ANSWER
    reply, sent = _call_mine(bastion, second, retry)
    assert reply.get("error", {}).get("code") == -32602, (reply, sent)
    assert "requestState was not issued by bastion" in reply["error"]["message"]
    assert sent == []
    # In its own chain the answer goes upstream.
    _, sent = _call_mine(bastion, first, retry)
    assert sent[-1]["params"]["inputResponses"][key]["content"] == {"name": "[masked]"}


def test_a_2025_client_sends_no_answers_of_its_own(bastion):
    """bastion asks a 2025-11-25 client an upstream's questions itself: answers or a
    requestState in that client's request are refused, even bastion's own."""
    token = bastion.token("alice", "mine")
    asked, _ = _call_mine(bastion, token, {"name": "greet", "arguments": {}})
    state = asked["result"]["requestState"]
    (key,) = _unsealed(state)["methods"]
    session = legacy_session(bastion, token, "mine", {"elicitation": {}, "roots": {}})
    for params in (
        {
            "name": "greet",
            "arguments": {},
            "requestState": state,
            "inputResponses": {key: UNMASKED},
        },
        {"name": "greet", "arguments": {}, "inputResponses": {key: UNMASKED}},
        {"name": "ask_anyway", "arguments": {}, "requestState": "lab-state"},
    ):
        reply, sent = _call_mine(bastion, token, params, session)
        assert reply.get("error", {}).get("code") == -32602, (params, reply, sent)
        assert "2025-11-25 client sends no requestState" in reply["error"]["message"]
        assert sent == []
