"""Just-in-time tasks against a running bastion (uvicorn, real HTTP, the quickstart's MCP server
upstream): a task opened through /v1/tasks grants its agent the "reports" folder; the official
MCP SDK client, with a token whose grant is bound to the task, reads it. Ended (API or command
line) or expired, the task's facts are gone and the same token is refused on its next call.
Every way of using a task to grant more, or to end someone else's, is refused and changes
nothing."""

from __future__ import annotations

import base64
import json
import time

import anyio
import httpx2
import pytest
from mcp.client.client import Client as McpClient
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from bastion.cli import main
from bastion.delegation.tasks import TaskClosed
from bastion.facts.model import Entity
from tests.gateway.streams import modern_headers, modern_request
from tests.signals.support import running

MAX_SECONDS = 3600
# An agent reads the "reports" folder (a search for "reports") only while a task grants it.
RULES = """
resource Folder { roles = ["reader"]; }
deny(agent: Agent, "call", _tool: Tool) if
  context.arguments.query = "reports" and not has_role(agent, "reader", Folder{"reports"});
"""
REPORTS = {"query": "reports"}


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    yield from running(
        tmp_path_factory,
        "tasks",
        RULES,
        tasks={"max_seconds": MAX_SECONDS, "sweep_seconds": 0.2},
    )


@pytest.fixture(scope="module")
def keys(bastion) -> dict[str, str]:
    made = {}
    for name, scopes in (
        ("orchestrator", ["tasks"]),
        ("other", ["tasks"]),
        ("facts-reader", ["facts:read", "decide"]),
        ("admin", ["admin"]),
    ):
        made[name], _ = bastion.app.state.keys.create(name, scopes, created_by="test")
    return made


def api(bastion, key: str, method: str, path: str = "", **kwargs):
    return bastion.http.request(
        method,
        f"{bastion.url}/v1/tasks{path}",
        headers={"authorization": f"Bearer {key}"},
        **kwargs,
    )


def claims(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def agent_and_grant(bastion, token: str) -> tuple[str, str]:
    """The token's agent (OAuth client id) and the grant it was issued under."""
    state = bastion.app.state.oauth.store.access_token_state(claims(token)["jti"])
    return claims(token)["client_id"], state[0]


def reader(agent: str) -> dict:
    return {
        "predicate": "has_role",
        "args": [{"type": "Agent", "id": agent}, "reader", {"type": "Folder", "id": "reports"}],
    }


def reader_fact(agent: str) -> tuple:
    return ("has_role", Entity("Agent", agent), "reader", Entity("Folder", "reports"))


def open_task(bastion, key: str, agent: str, **expiry) -> dict:
    answer = api(
        bastion,
        key,
        "POST",
        json={
            "user": "sam",
            "agent": agent,
            "purpose": "summarise this week's reports",
            "facts": [reader(agent)],
            **(expiry or {"expires_in": 600}),
        },
    )
    assert answer.status_code == 201, answer.text
    return answer.json()["task"]


def sdk_calls(bastion, token: str, between=None) -> list:
    """Read the reports with the official SDK client and a fixed bearer token (2026-07-28);
    ``between()`` runs between the first call and the second. Each call's outcome: ("ok", text)
    or ("refused", the exception)."""
    outcomes: list = []

    async def call(client) -> None:
        try:
            result = await client.call_tool("search_customers", REPORTS)
            outcomes.append(("ok", result.content[0].text))
        except Exception as e:  # the SDK raises on a refused token or a JSON-RPC error
            outcomes.append(("refused", e))

    async def run() -> None:
        headers = {"authorization": f"Bearer {token}"}
        try:
            async with (
                httpx2.AsyncClient(headers=headers, timeout=20) as http,
                McpClient(
                    streamable_http_client(bastion.mcp_url("deskhttp"), http_client=http),
                    mode="auto",
                ) as client,
            ):
                await call(client)
                if between is not None:
                    await anyio.to_thread.run_sync(between)
                    await call(client)
        except Exception as e:  # refused while connecting (server/discover, initialize)
            outcomes.append(("refused", e))

    anyio.run(run)
    return outcomes


def raw_status(bastion, token: str) -> tuple[int, dict]:
    response = bastion.http.post(
        bastion.mcp_url("deskhttp"),
        json=modern_request(9, "tools/call", {"name": "search_customers", "arguments": REPORTS}),
        headers=modern_headers(token, "tools/call", "search_customers"),
    )
    body = response.json() if response.headers.get("content-type", "").startswith("app") else {}
    return response.status_code, body


def until(check, seconds: float = 5.0):
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def test_a_task_grants_its_agent_the_folder_and_ending_it_refuses_the_token_at_once(bastion, keys):
    token = bastion.token("sam", "deskhttp")
    agent, grant_id = agent_and_grant(bastion, token)
    # Without a task the agent may not read the folder (its user may).
    [(outcome, error)] = sdk_calls(bastion, token)
    assert outcome == "refused" and isinstance(error, MCPError)
    assert (error.error.code, error.error.data["reason"]) == (-32003, "not_permitted")

    task = open_task(bastion, keys["orchestrator"], agent)
    assert (task["status"], task["user"], task["agent"]) == ("open", "sam", agent)
    bastion.app.state.tasks.bind(task["id"], "sam", agent, grant_id)
    assert bastion.store.get(reader_fact(agent))[0].expires_at == task["expires_at"]

    def end() -> None:
        answer = api(bastion, keys["orchestrator"], "POST", f"/{task['id']}/end", json={})
        assert answer.status_code == 200, answer.text
        assert answer.json()["ended"] is True
        assert answer.json()["task"]["status"] == "ended"

    before, after = sdk_calls(bastion, token, between=end)
    assert before[0] == "ok", before
    # Refused before any decision: the SDK reports the HTTP 401 (checked raw below).
    assert after[0] == "refused" and isinstance(after[1], MCPError), after
    assert after[1].error.code != -32003
    assert bastion.store.get(reader_fact(agent), include_expired=True) == []
    status, body = raw_status(bastion, token)
    assert status == 401 and body["error"] == "invalid_token", (status, body)
    [event] = [
        e
        for e in bastion.app.state.oauth.audit.events("task.ended")
        if e.detail["task_id"] == task["id"]
    ]
    assert event.detail["grants_revoked"] == 1 and event.detail["facts_deleted"] == 1
    # Ending again changes nothing; binding to the ended task is refused.
    again = api(bastion, keys["orchestrator"], "POST", f"/{task['id']}/end")
    assert again.status_code == 200 and again.json()["ended"] is False
    fresh = bastion.token("sam", "deskhttp")
    with pytest.raises(TaskClosed):
        bastion.app.state.tasks.bind(task["id"], "sam", *agent_and_grant(bastion, fresh))
    assert raw_status(bastion, fresh)[0] == 200  # refused to bind: not revoked by the task


def test_at_its_expiry_a_task_grants_nothing_and_its_tokens_are_refused(bastion, keys):
    token = bastion.token("sam", "deskhttp")
    agent, grant_id = agent_and_grant(bastion, token)
    task = open_task(bastion, keys["orchestrator"], agent, expires_in=2)
    bastion.app.state.tasks.bind(task["id"], "sam", agent, grant_id)
    [first] = sdk_calls(bastion, token)
    assert first[0] == "ok", first

    # The sweeper wakes at the expiry: no sleeping longer than the task lasts, and a little.
    assert until(lambda: raw_status(bastion, token)[0] == 401, 5)
    [late] = sdk_calls(bastion, token)
    assert late[0] == "refused"
    shown = api(bastion, keys["orchestrator"], "GET", f"/{task['id']}").json()["task"]
    assert (shown["status"], shown["end_reason"], shown["ended_at"]) == (
        "expired",
        "expired",
        task["expires_at"],
    )
    assert bastion.store.get(reader_fact(agent), include_expired=True) == []


def test_a_task_cannot_grant_anyone_but_its_agent_nor_outlast_the_cap(bastion, keys):
    head = bastion.store.head()
    agent = "some-agent"
    body = {"user": "sam", "agent": agent, "purpose": "a job", "expires_in": 600}

    def refused(status: int, key: str = keys["orchestrator"], **changes) -> str:
        answer = api(bastion, key, "POST", json={**body, "facts": [reader(agent)], **changes})
        assert answer.status_code == status, answer.text
        return answer.json()["detail"]

    # Facts for someone else than the task's agent: another agent, a user, anything but the
    # predicates tasks grant (the kill switch among them), the agent anywhere but first.
    other_agent = reader("another-agent")
    a_user = {**reader(agent), "args": [{"type": "User", "id": "sam"}, "admin", "x"]}
    resume = {"predicate": "suspended", "args": [{"type": "Agent", "id": agent}]}
    related = {
        "predicate": "has_relation",
        "args": [{"type": "Folder", "id": "reports"}, "viewer", {"type": "Agent", "id": agent}],
    }
    assert "first argument" in refused(403, facts=[reader(agent), other_agent])
    assert "first argument" in refused(403, facts=[a_user])
    assert "grants only" in refused(403, facts=[resume])
    assert "grants only" in refused(403, facts=[related])
    # A fact the policy cannot use is 422, as on /v1/facts.
    undeclared = {**reader(agent), "args": [{"type": "Agent", "id": agent}, "reader", 3]}
    refused(422, facts=[undeclared])
    # Expiry: required, in the future, within [tasks].max_seconds.
    assert "max_seconds" in refused(422, expires_in=MAX_SECONDS + 60)
    refused(422, expires_in=None, expires_at=time.time() + MAX_SECONDS + 60)
    refused(422, expires_in=-5)
    refused(400, expires_in=None)
    refused(400, expires_at=time.time() + 60)  # both
    refused(400, facts=[{**reader(agent), "expires_at": time.time() + 10**6}])
    # Without the scope: the facts scope does not open tasks, and no key writes through them.
    refused(403, key=keys["facts-reader"])
    assert api(bastion, "bst_unknown_key", "POST", json=body).status_code == 401
    assert bastion.store.head() == head  # nothing was written
    assert bastion.store.get(reader_fact(agent), include_expired=True) == []


def test_a_key_sees_and_ends_only_its_own_tasks(bastion, keys):
    task = open_task(bastion, keys["orchestrator"], "owned-agent")
    path = f"/{task['id']}"
    assert api(bastion, keys["other"], "POST", f"{path}/end").status_code == 404
    assert api(bastion, keys["other"], "GET", path).status_code == 404
    assert task["id"] not in [t["id"] for t in api(bastion, keys["other"], "GET").json()["tasks"]]
    assert api(bastion, keys["facts-reader"], "POST", f"{path}/end").status_code == 403
    assert api(bastion, keys["facts-reader"], "GET").status_code == 403
    assert bastion.store.get(reader_fact("owned-agent"))  # still granted
    mine = api(bastion, keys["orchestrator"], "GET", params={"status": "open"}).json()["tasks"]
    assert task["id"] in [t["id"] for t in mine]
    assert all(t["status"] == "open" for t in mine)
    assert api(bastion, keys["orchestrator"], "GET", params={"status": "x"}).status_code == 400
    assert api(bastion, keys["orchestrator"], "GET", "/task_nope").status_code == 404
    # An admin key sees and ends any task.
    assert api(bastion, keys["admin"], "POST", f"{path}/end").json()["ended"] is True
    assert bastion.store.get(reader_fact("owned-agent"), include_expired=True) == []


def test_the_command_line_opens_lists_shows_and_ends_tasks(bastion, capsys):
    token = bastion.token("sam", "deskhttp")
    agent, grant_id = agent_and_grant(bastion, token)
    database = ["--database", bastion.app.state.config.database]
    fact = f'has_role(Agent{{"{agent}"}}, "reader", Folder{{"reports"}})'
    opened = main(
        ["tasks", "open", "--user", "sam", "--agent", agent, "--purpose", "cli job"]
        + ["--expires-in", "600", "--fact", fact, *database]
    )
    assert opened == 0
    task_id = capsys.readouterr().out.strip()
    bastion.app.state.tasks.bind(task_id, "sam", agent, grant_id)
    # Written by another process: this server applies it from the change log.
    assert until(lambda: "result" in raw_status(bastion, token)[1])

    assert main(["tasks", "list", "--status", "open", *database]) == 0
    assert task_id in capsys.readouterr().out
    assert main(["tasks", "show", task_id, *database]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "open"
    assert main(["tasks", "end", task_id, *database]) == 0
    assert "ended" in capsys.readouterr().out
    # Another process ended it: this server hears of the revocation on the token's next call.
    assert until(lambda: raw_status(bastion, token)[0] == 401)
    assert main(["tasks", "end", task_id, *database]) == 0
    assert "already" in capsys.readouterr().out
    # Refusals are one line and exit status 2, and change nothing.
    other = 'has_role(Agent{"someone-else"}, "reader", Folder{"reports"})'
    refused = main(
        ["tasks", "open", "--user", "sam", "--agent", agent, "--purpose", "x"]
        + ["--expires-in", "600", "--fact", other, *database]
    )
    assert refused == 2
    assert "first argument" in capsys.readouterr().err
    assert main(["tasks", "show", "task_unknown", *database]) == 2
