"""Session labels: an agent that was shown data labelled ``pii`` cannot send it outside, on a
running bastion with the official MCP SDK client; the label set is keyed by (user, first agent,
task), survives new MCP sessions, is shared through Redis, and fails closed without it.

Chains of agents are tested here on the enforcement step with a `Caller` carrying the chain
(sub-agents of sub-agents, other chains, tasks), and end to end through token exchange in
test_labels_chain.py."""

from __future__ import annotations

import contextlib
import time
import uuid

import anyio
import httpx2
import pytest
from mcp.client.client import Client as McpClient
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from bastion import Authorizer, Entity
from bastion.audit import AuditLog
from bastion.delegation.labels import (
    LabelKey,
    LabelSettings,
    LabelsFull,
    LabelsUnavailable,
    LocalLabels,
    RedisLabels,
)
from bastion.gateway.enforce import Caller, Enforcer, label_keys
from bastion.gateway.jsonrpc import RpcError
from bastion.oauth.users import create_user
from tests.conftest import REDIS_URL, require_service
from tests.gateway.support import PASSWORD, start
from tests.gateway.test_shared_rate_limits import ENVELOPE, call_tool
from tests.oauth.support import free_socket
from tests.signals.support import latest_agent, running
from tests.waits import PATIENCE, eventually

RULES = """
# tests/delegation: what an agent was shown decides where it may send mail.
declare label(Tool, String);
declare label(McpResource, String);
resource Folder { roles = ["reader"]; }
deny(_actor, "call", Tool{"deskhttp/send_email"}) if
  "pii" in context.session.labels and
  lower(context.arguments.to, to) and
  not ends_with(to, "@acme.example");
deny(_actor, "call", Tool{"deskhttp/send_email"}) if
  "pii" in context.session.labels and
  not lower(context.arguments.to, _to);
"""
LABELS = [
    ("label", Entity("Tool", "deskhttp/search_customers"), "pii"),
    ("label", Entity("McpResource", "deskhttp/customers://directory"), "pii"),
    ("label", Entity("McpResource", "deskhttp/customers://audit-notes"), "confidential"),
]
OUTSIDE = {"to": "someone@elsewhere.example", "subject": "s", "body": "b"}
INSIDE = {"to": "Ann@ACME.example", "subject": "s", "body": "b"}


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    yield from running(tmp_path_factory, "labels", RULES)


_users = iter(range(1_000_000))


def new_user(bastion) -> str:
    """A support-team member of their own: the email rate limits (per user) never interfere."""
    name = f"u{next(_users)}-{uuid.uuid4().hex[:6]}"
    create_user(bastion.app.state.oauth.store, name, PASSWORD, time.time(), actor="test")
    bastion.apply([("has_role", Entity("User", name), "member", Entity("Team", "support"))])
    bastion.apply(LABELS)
    return name


def sessions(bastion, token: str, mode: str, *scripts) -> list:
    """Run each script in an MCP session of its own (the official SDK client), with ``token``:
    the same agent each time. Each script gets the client and returns what it saw."""
    seen: list = []

    async def main() -> None:
        for script in scripts:
            async with (
                httpx2.AsyncClient(headers={"authorization": f"Bearer {token}"}, timeout=20) as h,
                McpClient(
                    streamable_http_client(bastion.mcp_url("deskhttp"), http_client=h), mode=mode
                ) as client,
            ):
                seen.append(await script(client))

    anyio.run(main)
    return seen


async def send(client, arguments: dict) -> tuple:
    try:
        result = await client.call_tool("send_email", arguments)
        return ("sent", result.content[0].text)
    except MCPError as e:
        if e.error.code == -32602:  # refused before any decision (invalid params)
            return ("invalid", e.error.message)
        return ("refused", e.error.data["reason"])


async def search(client) -> str:
    result = await client.call_tool("search_customers", {"query": "a"})
    return result.content[0].text


def sent_outside(bastion, before: int) -> list[str]:
    """The addresses outside acme.example the upstream was asked to mail since ``before``."""
    return [
        m["params"]["arguments"]["to"]
        for m in bastion.recorder.messages()[before:]
        if m.get("method") == "tools/call"
        and m["params"]["name"] == "send_email"
        and not m["params"]["arguments"]["to"].lower().endswith("@acme.example")
    ]


@pytest.mark.parametrize("mode", ["legacy", "auto"])
def test_an_agent_shown_pii_cannot_email_outside_and_still_can_inside(bastion, mode):
    user = new_user(bastion)
    token = bastion.token(user, "deskhttp", "customers:read")

    async def script(client):
        first = await send(client, OUTSIDE)  # nothing seen yet: allowed
        shown = await search(client)
        before = len(bastion.recorder.messages())
        after = [
            await send(client, OUTSIDE),
            await send(client, {**OUTSIDE, "to": "x@acme.example.evil.test"}),
            await send(client, {**OUTSIDE, "to": 42}),
            await send(client, INSIDE),
        ]
        return first, shown, before, after

    ((first, shown, before, after),) = sessions(bastion, token, mode, script)
    assert first[0] == "sent" and "customers" in shown
    assert after[:2] == [("refused", "not_permitted")] * 2
    # A number where the tool takes a string is refused before it is decided (its inputSchema:
    # docs/gateway.md), so no label rule that reads text can be passed with one.
    assert after[2] == (
        "invalid",
        "params.arguments.to: the tool's inputSchema says string, not integer",
    )
    assert after[3][0] == "sent"
    assert sent_outside(bastion, before) == [], "a refused email never reaches the upstream"


def test_labels_survive_a_new_session_of_the_same_agent(bastion):
    user = new_user(bastion)
    token = bastion.token(user, "deskhttp", "customers:read")

    async def read(client):
        return await search(client)

    async def mail(client):
        return await send(client, OUTSIDE)

    shown, refused = sessions(bastion, token, "legacy", read, mail)
    assert "customers" in shown and refused == ("refused", "not_permitted")
    # And over the stateless era, with no session at all.
    answer = call_tool(bastion.http, bastion.url, token, "send_email", OUTSIDE)
    assert answer["error"]["data"]["reason"] == "not_permitted"


def test_another_agent_of_the_same_user_and_another_user_are_not_affected(bastion):
    user, other_user = new_user(bastion), new_user(bastion)
    tainted = bastion.token(user, "deskhttp", "customers:read")
    sibling = bastion.token(user, "deskhttp", "customers:read")  # a second client: its own agent
    stranger = bastion.token(other_user, "deskhttp", "customers:read")
    assert "customers" in sessions(bastion, tainted, "auto", search)[0]
    assert sessions(bastion, tainted, "auto", lambda c: send(c, OUTSIDE)) == [
        ("refused", "not_permitted")
    ]
    for token in (sibling, stranger):
        assert sessions(bastion, token, "auto", lambda c: send(c, OUTSIDE))[0][0] == "sent"


def test_refused_calls_and_results_held_for_review_add_no_labels(bastion):
    user = new_user(bastion)
    token = bastion.token(user, "deskhttp", "customers:read")

    async def script(client):
        # Refused: searching by email is for admins; held: internal notes wait for a reviewer.
        refused = await _outcome(
            client.call_tool("search_customers", {"query": "a", "field": "email"})
        )
        held = await _outcome(client.read_resource("customers://audit-notes"))
        return refused, held, await send(client, OUTSIDE)

    ((refused, held, mailed),) = sessions(bastion, token, "legacy", script)
    assert refused == ("refused", "not_permitted")
    assert held[0] == "refused" and held[1] == "review_pending"
    assert mailed[0] == "sent"
    key = LabelKey(user, latest_agent(bastion))
    assert bastion.app.state.gateway.enforcer.labels.current(key) == []


async def _outcome(call) -> tuple:
    try:
        await call
        return ("ok",)
    except MCPError as e:
        if e.error.code == -32602:  # refused before any decision (invalid params)
            return ("invalid", e.error.message)
        return ("refused", e.error.data["reason"])


def test_clearing_an_agents_labels_through_the_api(bastion):
    user = new_user(bastion)
    token = bastion.token(user, "deskhttp", "customers:read")
    sessions(bastion, token, "auto", search)
    agent = latest_agent(bastion)
    key, _ = bastion.app.state.keys.create("ops", ["labels"], created_by="test")
    weak, _ = bastion.app.state.keys.create("reader", ["facts:read"], created_by="test")
    url = f"{bastion.url}/v1/labels/clear"
    body = {"user": user, "agent": agent}
    # A key without the labels scope, and malformed bodies, change nothing.
    assert bastion.http.post(url, json=body, headers=_bearer(weak)).status_code == 403
    for bad in ({"user": user}, {"user": user, "agent": agent, "tsk": "t"}, {"task": ""}, {}):
        response = bastion.http.post(url, json=bad, headers=_bearer(key))
        assert response.status_code == 400, (bad, response.text)
    assert call_tool(bastion.http, bastion.url, token, "send_email", OUTSIDE)["error"]
    response = bastion.http.post(url, json=body, headers=_bearer(key))
    assert response.status_code == 200 and response.json() == {"cleared": 1}
    assert "error" not in call_tool(bastion.http, bastion.url, token, "send_email", OUTSIDE)
    again = bastion.http.post(url, json=body, headers=_bearer(key))
    assert again.json() == {"cleared": 0}


def test_clearing_labels_is_audited_with_the_key_that_cleared_them(bastion):
    """Forgetting a label set lifts what the policy refused because of it (mail after customer
    data): who did it, for whom, and how many sets went, must be found later; a refused attempt
    records nothing."""
    user = new_user(bastion)
    token = bastion.token(user, "deskhttp", "customers:read")
    sessions(bastion, token, "auto", search)
    agent = latest_agent(bastion)
    key, record = bastion.app.state.keys.create("ops", ["labels"], created_by="test")
    weak, _ = bastion.app.state.keys.create("reader", ["facts:read"], created_by="test")
    url = f"{bastion.url}/v1/labels/clear"
    audit = AuditLog(bastion.app.state.store.db)
    before = {e.id for e in audit.events(kind="labels.cleared")}
    assert bastion.http.post(url, json={"user": user}, headers=_bearer(key)).status_code == 400
    weakly = bastion.http.post(url, json={"user": user, "agent": agent}, headers=_bearer(weak))
    assert weakly.status_code == 403
    one = bastion.http.post(url, json={"user": user, "agent": agent}, headers=_bearer(key))
    assert one.json() == {"cleared": 1}
    task = bastion.http.post(url, json={"task": "t-audited"}, headers=_bearer(key))
    assert task.json() == {"cleared": 0}
    events = [e for e in audit.events(kind="labels.cleared") if e.id not in before]
    seen = {(e.subject, e.client_id, e.detail["task"], e.detail["cleared"]) for e in events}
    assert seen == {(None, None, "t-audited", 0), (user, agent, "", 1)}
    assert len(events) == 2
    assert {e.detail["actor"] for e in events} == {f"key:{record.id}"}


def test_ending_a_task_wipes_its_label_sets(bastion):
    key, _ = bastion.app.state.keys.create("orchestrator", ["tasks"], created_by="test")
    opened = bastion.http.post(
        f"{bastion.url}/v1/tasks",
        headers=_bearer(key),
        json={
            "user": "sam",
            "agent": "planner",
            "purpose": "label test",
            "facts": [
                {
                    "predicate": "has_role",
                    "args": [
                        {"type": "Agent", "id": "planner"},
                        "reader",
                        {"type": "Folder", "id": "r"},
                    ],
                }
            ],
            "expires_in": 600,
        },
    )
    assert opened.status_code == 201, opened.text
    task = opened.json()["task"]["id"]
    store = bastion.app.state.gateway.enforcer.labels
    in_task, outside = LabelKey("sam", "planner", task), LabelKey("sam", "planner")
    anyio.run(store.record, [in_task], ["pii"])
    anyio.run(store.record, [outside], ["pii"])
    ended = bastion.http.post(f"{bastion.url}/v1/tasks/{task}/end", headers=_bearer(key), json={})
    assert ended.status_code == 200, ended.text
    assert eventually(lambda: not store.current(in_task)), "the ended task's labels were not wiped"
    assert store.current(outside) == ["pii"], "only the task's sets go"
    anyio.run(store.clear, outside)


def _bearer(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


# -- the label store and the enforcement step (chains of agents, tasks) --------------------------

POLICY = """
actor User {}
actor Agent {}
resource Tool {}
declare label(Tool, String);
allow(_actor, "call", _tool: Tool);
deny(_actor, "call", Tool{"d/send_email"}) if
  "pii" in context.session.labels and
  lower(context.arguments.to, to) and not ends_with(to, "@acme.example");
"""


def _enforcer(labels=None) -> Enforcer:
    authz = Authorizer(POLICY)
    authz.facts.insert(("label", Entity("Tool", "d/search"), "pii"))
    authz.facts.insert(("label", Entity("Tool", "d/notes"), "confidential"))
    return Enforcer(lambda: authz, None, labels=labels)


async def _call(enforcer: Enforcer, caller: Caller, tool: str, arguments: dict) -> str:
    """Decide a tool call and, when allowed, release its result as the gateway does."""
    context = enforcer.context(caller, "d", "tools/call", tool=tool, arguments=arguments)
    try:
        verdict = await enforcer.decide(
            caller, "d", "tools/call", "call", Entity("Tool", f"d/{tool}"), context, arguments
        )
        await enforcer.record_labels(caller, verdict)
    except RpcError as e:
        return e.data["reason"]
    return "ok"


def _caller(user: str, *agents: str, task: str = "") -> Caller:
    return Caller(
        user, agents[-1], frozenset(), "127.0.0.1", "2026-07-28", agents=agents, task=task
    )


def test_a_sub_agent_shares_its_first_agents_labels_both_ways():
    async def main():
        enforcer = _enforcer()
        parent, child = _caller("sam", "planner"), _caller("sam", "planner", "mailer")
        # What the sub-agent reads taints its parent, and what the parent read taints the child.
        assert await _call(enforcer, child, "search", {}) == "ok"
        assert await _call(enforcer, parent, "send_email", {"to": "x@out.example"}) == (
            "not_permitted"
        )
        other_chain = _caller("sam", "helper", "mailer")  # the same sub-agent for another agent
        assert await _call(enforcer, other_chain, "send_email", {"to": "x@out.example"}) == "ok"
        grandchild = _caller("sam", "planner", "mailer", "formatter")
        assert await _call(enforcer, grandchild, "send_email", {"to": "x@out.example"}) == (
            "not_permitted"
        )
        assert await _call(enforcer, grandchild, "send_email", {"to": "x@acme.example"}) == "ok"

    anyio.run(main)


def test_labels_are_per_task_and_wipe_task_clears_them():
    async def main():
        enforcer = _enforcer()
        store = enforcer.labels
        in_task = _caller("sam", "planner", task="t-1")
        other_task = _caller("sam", "planner", task="t-2")
        no_task = _caller("sam", "planner")
        assert await _call(enforcer, in_task, "search", {}) == "ok"
        assert await _call(enforcer, in_task, "send_email", {"to": "x@out.example"}) == (
            "not_permitted"
        )
        for clean in (other_task, no_task):
            assert await _call(enforcer, clean, "send_email", {"to": "x@out.example"}) == "ok"
        assert await store.wipe_task("t-1") == 1
        assert await _call(enforcer, in_task, "send_email", {"to": "x@out.example"}) == "ok"
        with pytest.raises(ValueError):
            await store.wipe_task("")

    anyio.run(main)


def test_a_delegation_into_a_task_shares_the_set_of_the_token_it_came_from():
    async def main():
        enforcer = _enforcer()
        parent = _caller("sam", "planner")
        # Exchanged with task=t-1 from the parent's token, which is in no task.
        child = Caller(
            "sam", "mailer", frozenset(), "127.0.0.1", "2026-07-28",
            agents=("planner", "mailer"), task="t-1", labels_task="",
        )  # fmt: skip
        in_task = _caller("sam", "planner", task="t-1")  # the planner's own token for t-1
        assert await _call(enforcer, parent, "search", {}) == "ok"
        assert await _call(enforcer, child, "send_email", {"to": "x@out.example"}) == (
            "not_permitted"
        )
        assert await _call(enforcer, in_task, "send_email", {"to": "x@out.example"}) == "ok"
        # Ending the task leaves what the delegation shares with its parent.
        assert await enforcer.labels.wipe_task("t-1") == 0
        assert await _call(enforcer, parent, "send_email", {"to": "x@out.example"}) == (
            "not_permitted"
        )

    anyio.run(main)


@contextlib.asynccontextmanager
async def _store(kind: str, settings: LabelSettings | None = None):
    """A label store of ``kind``: this process's, or Redis's under a prefix of its own."""
    if kind == "local":
        yield LocalLabels(settings)
        return
    prefix = f"bastion-test-{uuid.uuid4().hex[:12]}"
    store = RedisLabels(REDIS_URL, prefix, settings, PATIENCE)
    try:
        yield store
    finally:
        await _drop(prefix)
        await store.close()


def _as_itself(agent: str, task: str = "") -> Caller:
    """An agent acting as itself (client_credentials): the agent is its token's subject."""
    return Caller(agent, agent, frozenset(), "127.0.0.1", "2026-07-28", task=task)


OUT = {"to": "x@out.example"}


@pytest.mark.parametrize("kind", ["local", "redis"])
def test_an_agent_shown_pii_in_a_chain_is_refused_the_sink_acting_as_itself(kind):
    """Every agent of a chain a labelled result was released to has it in its own set too (user
    and first agent: its client id, no task): its own token launders nothing. An agent outside
    the chain, and an agent's task (which starts clean), keep clean sets."""
    if kind == "redis":
        require_service("Redis", "127.0.0.1", 6379)

    async def main():
        async with _store(kind) as store:
            enforcer = _enforcer(store)
            chain = _caller("avery", "coder", "mailer", "formatter")
            assert await _call(enforcer, _as_itself("mailer"), "send_email", OUT) == "ok"
            assert await _call(enforcer, chain, "search", {}) == "ok"
            for agent in ("coder", "mailer", "formatter"):
                refused = await _call(enforcer, _as_itself(agent), "send_email", OUT)
                assert refused == "not_permitted", agent
                assert await store.labels(LabelKey(agent, agent)) == ["pii"]
            assert await _call(enforcer, _as_itself("helper"), "send_email", OUT) == "ok"
            in_task = _as_itself("mailer", task="t-1")
            assert await _call(enforcer, in_task, "send_email", OUT) == "ok"
            # The agent's own set is cleared as any other; the chain's stays.
            assert await store.clear(LabelKey("mailer", "mailer")) is True
            assert await _call(enforcer, _as_itself("mailer"), "send_email", OUT) == "ok"
            assert await _call(enforcer, chain, "send_email", OUT) == "not_permitted"

    anyio.run(main)


@pytest.mark.parametrize("kind", ["local", "redis"])
def test_what_an_agent_reads_in_a_task_reaches_its_own_set_outside_the_task(kind):
    """A task starts clean, but what a chain reads in one reaches its agents' own sets (no
    task): an agent cannot launder it through its own token outside the task."""
    if kind == "redis":
        require_service("Redis", "127.0.0.1", 6379)

    async def main():
        async with _store(kind) as store:
            enforcer = _enforcer(store)
            assert await _call(enforcer, _caller("avery", "coder", task="t-2"), "search", {}) == (
                "ok"
            )
            assert await store.labels(LabelKey("avery", "coder", "t-2")) == ["pii"]
            assert await _call(enforcer, _as_itself("coder"), "send_email", OUT) == (
                "not_permitted"
            )
            assert await store.labels(LabelKey("avery", "coder")) == [], "the chain's, untouched"
            assert await _call(enforcer, _as_itself("coder", task="t-3"), "send_email", OUT) == (
                "ok"
            )

    anyio.run(main)


def test_a_result_is_recorded_in_the_chains_set_and_each_agents_own_set_once():
    def keys(caller: Caller) -> list[tuple[str, str, str]]:
        return [tuple(k) for k in label_keys(caller)]

    assert keys(_caller("avery", "coder", "mailer")) == [
        ("avery", "coder", ""),
        ("coder", "coder", ""),
        ("mailer", "mailer", ""),
    ]
    # Acting as itself with no task, its chain's set is its own set: recorded once.
    assert keys(_as_itself("job")) == [("job", "job", "")]
    assert keys(_as_itself("job", task="t")) == [("job", "job", "t"), ("job", "job", "")]
    # A delegation from an agent acting as itself: the chain's set is the first agent's own.
    child = Caller(
        "job", "mailer", frozenset(), "127.0.0.1", "2026-07-28", agents=("job", "mailer")
    )
    assert keys(child) == [("job", "job", ""), ("mailer", "mailer", "")]
    # An agent named twice in a chain (a cycle the exchange allowed) has one own set.
    assert keys(_caller("avery", "coder", "mailer", "coder")) == [
        ("avery", "coder", ""),
        ("coder", "coder", ""),
        ("mailer", "mailer", ""),
    ]


@pytest.mark.parametrize("kind", ["local", "redis"])
def test_a_result_that_would_overflow_an_agents_own_set_is_withheld_and_recorded_nowhere(kind):
    """Fail closed as for the chain's set: ``labels_full`` when any set of the release would go
    over ``label_max``, and no set gains a label for a result that was not released."""
    if kind == "redis":
        require_service("Redis", "127.0.0.1", 6379)

    async def main():
        async with _store(kind, LabelSettings(max_labels=1)) as store:
            enforcer = _enforcer(store)
            assert await _call(enforcer, _as_itself("mailer"), "notes", {}) == "ok"
            chain = _caller("sam", "planner", "mailer")
            assert await _call(enforcer, chain, "search", {}) == "labels_full"
            assert await store.labels(LabelKey("sam", "planner")) == []
            assert await store.labels(LabelKey("planner", "planner")) == []
            assert await store.labels(LabelKey("mailer", "mailer")) == ["confidential"]

    anyio.run(main)


def test_a_full_label_set_withholds_the_result_that_would_overflow_it():
    async def main():
        enforcer = _enforcer(LocalLabels(LabelSettings(max_labels=1)))
        caller = _caller("sam", "planner")
        assert await _call(enforcer, caller, "search", {}) == "ok"
        assert await _call(enforcer, caller, "search", {}) == "ok"  # nothing new
        assert await _call(enforcer, caller, "notes", {}) == "labels_full"
        assert await enforcer.labels.labels(LabelKey("sam", "planner")) == ["pii"]

    anyio.run(main)


def test_a_label_set_is_forgotten_after_its_time_to_live():
    now = [1000.0]
    store = LocalLabels(LabelSettings(ttl_seconds=60), clock=lambda: now[0])
    key = LabelKey("sam", "planner")

    async def main():
        await store.record([key], ["pii"])
        now[0] += 59
        assert store.current(key) == ["pii"]
        await store.record([key], ["pii"])  # recorded again: kept another 60 s
        now[0] += 59
        assert store.current(key) == ["pii"]
        now[0] += 2
        assert store.current(key) == []

    anyio.run(main)


def test_the_local_store_refuses_a_new_set_beyond_its_cap_and_keeps_the_old_ones():
    store = LocalLabels(LabelSettings(max_sets=2))

    async def main():
        await store.record([LabelKey("a", "x")], ["pii"])
        await store.record([LabelKey("b", "x")], ["pii"])
        with pytest.raises(LabelsUnavailable):
            await store.record([LabelKey("c", "x")], ["pii"])
        assert store.current(LabelKey("a", "x")) == ["pii"]

    anyio.run(main)


def test_labels_cost_nothing_for_a_policy_that_does_not_read_them():
    authz = Authorizer('actor User {}\nresource Tool {}\nallow(_u, "call", _t: Tool);')
    enforcer = Enforcer(lambda: authz, None)
    context = enforcer.context(_caller("sam", "planner"), "d", "tools/call", tool="x")
    assert "session" not in context
    assert "session" in _enforcer().context(_caller("sam", "planner"), "d", "tools/call")


# -- shared through Redis ------------------------------------------------------------------------


def test_redis_store_records_reads_clears_and_wipes_tasks():
    require_service("Redis", "127.0.0.1", 6379)
    prefix = f"bastion-test-{uuid.uuid4().hex[:12]}"

    async def main():
        store = RedisLabels(REDIS_URL, prefix, LabelSettings(max_labels=2), PATIENCE)
        other = RedisLabels(REDIS_URL, prefix, timeout=PATIENCE)  # another process
        try:
            a, b = LabelKey("sam", "planner", "t-1"), LabelKey("avery", "planner", "t-1")
            plain = LabelKey("sam", "planner")
            await store.record([a], ["pii"])
            await store.record([b], ["secret"])
            await store.record([plain], ["pii"])
            assert await other.labels(a) == ["pii"] and await other.labels(b) == ["secret"]
            await store.record([a], ["pii", "hr"])
            with pytest.raises(LabelsFull):
                await store.record([a], ["finance"])
            assert await other.labels(a) == ["hr", "pii"]
            assert await other.wipe_task("t-1") == 2
            assert await store.labels(a) == [] and await store.labels(b) == []
            assert await store.labels(plain) == ["pii"]
            assert await other.clear(plain) is True and await store.labels(plain) == []
        finally:
            await _drop(prefix)
            await store.close()
            await other.close()

    anyio.run(main)


async def _drop(prefix: str) -> None:
    import redis.asyncio as redis

    client = redis.Redis.from_url(REDIS_URL)
    keys = [k async for k in client.scan_iter(f"{prefix}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def test_two_gateways_share_labels_through_redis(tmp_path):
    require_service("Redis", "127.0.0.1", 6379)
    prefix = f"bastion-test-{uuid.uuid4().hex[:12]}"
    settings = {"redis_url": REDIS_URL, "redis_prefix": prefix}
    try:
        with start(tmp_path, gateway=settings, replicas=1, policy_extra=RULES) as two:
            user = new_user(two)
            token = two.token(user, "deskhttp", "customers:read")
            first, second = two.url, two.replicas[0]
            shown = call_tool(two.http, first, token, "search_customers", {"query": "a"})
            assert "error" not in shown
            refused = call_tool(two.http, second, token, "send_email", OUTSIDE)
            assert refused["error"]["data"]["reason"] == "not_permitted"
            assert "error" not in call_tool(two.http, second, token, "send_email", INSIDE)
    finally:
        anyio.run(_drop, prefix)


def test_unreachable_redis_refuses_what_reads_labels_and_withholds_labelled_results(tmp_path):
    with free_socket() as closed:  # bound, never listening: connections are refused
        port = closed.getsockname()[1]
        settings = {"redis_url": f"redis://127.0.0.1:{port}/0"}
        with start(tmp_path, gateway=settings, policy_extra=RULES) as down:
            user = new_user(down)
            token = down.token(user, "deskhttp", "customers:read")
            before = len(down.recorder.messages())
            mailed = call_tool(down.http, down.url, token, "send_email", INSIDE)
            assert mailed["error"]["data"]["reason"] == "labels_unavailable"
            assert not any(
                m.get("method") == "tools/call" for m in down.recorder.messages()[before:]
            ), "a call whose rules read the labels never reaches the upstream"
            # A labelled result whose labels cannot be recorded is not released.
            shown = call_tool(down.http, down.url, token, "search_customers", {"query": "a"})
            assert shown["error"]["data"]["reason"] == "labels_unavailable"
            assert "result" not in shown
            # A read whose rules do not read labels, of a resource without labels, goes on.
            plans = read_resource(down.http, down.url, token, "customers://plans")
            assert "error" not in plans and plans["result"]["contents"]


def read_resource(http, base: str, token: str, uri: str) -> dict:
    response = http.post(
        f"{base}/mcp/deskhttp",
        json={
            "jsonrpc": "2.0",
            "id": 2,
            "method": "resources/read",
            "params": {"uri": uri, "_meta": ENVELOPE},
        },
        headers={
            "authorization": f"Bearer {token}",
            "content-type": "application/json",
            "accept": "application/json",  # JSON however long it takes (httpx's */* takes events)
            "mcp-protocol-version": "2026-07-28",
            "mcp-method": "resources/read",
            "mcp-name": uri,
        },
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_the_example_labels_policy_passes_its_own_tests():
    import subprocess
    import sys

    from tests.gateway.support import ROOT

    done = subprocess.run(
        [sys.executable, "-m", "bastion.cli", "policy", "test", "examples/labels.polar"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed, 0 failed" in done.stdout


def test_a_decision_record_keeps_the_labels_the_decision_read():
    async def main():
        enforcer = _enforcer()
        caller = _caller("sam", "planner")
        assert await _call(enforcer, caller, "search", {}) == "ok"
        context = enforcer.context(caller, "d", "tools/call", tool="send_email")
        with pytest.raises(RpcError):
            await enforcer.decide(
                caller,
                "d",
                "tools/call",
                "call",
                Entity("Tool", "d/send_email"),
                {**context, "arguments": {"to": "x@out.example"}},
                {"to": "x@out.example"},
            )
        assert dict(context["session"]) == {"labels": ["pii"]}

    anyio.run(main)
