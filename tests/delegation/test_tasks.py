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
import uuid
from urllib.parse import parse_qs, urlencode, urlsplit

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
from tests.gateway.support import PASSWORD, REDIRECT_URI
from tests.oauth.support import log_in_and_consent, pkce_pair
from tests.signals.support import running
from tests.waits import PATIENCE, before_expiry, eventually, past

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
    return claims(token)["client_id"], state.grant_id


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


def until(check, seconds: float = PATIENCE):
    """``check()`` once it holds, or once ``seconds`` have gone by (then the caller asserts)."""
    eventually(check, seconds, every=0.05)
    return check()


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


def bound(bastion, task: dict, agent: str, grant_id: str) -> None:
    """The grant bound to the task; refused as an assertion (see `before_expiry`) if the task
    had ended first."""
    try:
        bastion.app.state.tasks.bind(task["id"], "sam", agent, grant_id)
    except TaskClosed as e:
        raise AssertionError(f"the task ended before its grant was bound: {e}") from None


def test_at_its_expiry_a_task_grants_nothing_and_its_tokens_are_refused(bastion, keys):
    def granted_before_expiry(at: float) -> tuple[str, str, dict]:
        # A task that expires at ``at``, and a call it granted before then (a machine too busy
        # for that makes one that lives longer: `before_expiry`).
        token = bastion.token("sam", "deskhttp")
        agent, grant_id = agent_and_grant(bastion, token)
        task = open_task(bastion, keys["orchestrator"], agent, expires_at=at)
        bound(bastion, task, agent, grant_id)
        [first] = sdk_calls(bastion, token)
        assert first[0] == "ok", first
        return token, agent, task

    (token, agent, task), _ = before_expiry(granted_before_expiry, 2)
    # Past the expiry the sweeper takes the grant away (it wakes at the expiry: no sleeping
    # longer than the task lasts; `test_the_sweeper_wakes_at_the_expiry_it_knows_of`).
    past(task["expires_at"])
    assert until(lambda: raw_status(bastion, token)[0] == 401)
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
    # A name with a line break at its end is no user's or agent's (printable ASCII only).
    refused(400, user="sam\n")
    refused(400, agent=agent + "\n")
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


def code_for(bastion, user: str) -> tuple[str, str, str]:
    """A registered client, the person's sign-in and consent: (client_id, code, verifier)."""
    client = bastion.http.post(
        f"{bastion.url}/register",
        json={
            "client_name": "task agent",
            "redirect_uris": [REDIRECT_URI],
            "token_endpoint_auth_method": "none",
            "grant_types": ["authorization_code", "refresh_token"],
        },
    ).json()
    verifier, challenge = pkce_pair()
    params = {
        "response_type": "code",
        "client_id": client["client_id"],
        "redirect_uri": REDIRECT_URI,
        "state": "s",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "resource": bastion.mcp_url("deskhttp"),
        "scope": "customers:read",
    }
    bastion.logins.append(user)
    answer = log_in_and_consent(
        bastion.url, f"{bastion.url}/authorize?{urlencode(params)}", user, PASSWORD
    )
    code = parse_qs(urlsplit(answer.headers["location"]).query)["code"][0]
    return client["client_id"], code, verifier


def redeem(bastion, client_id: str, code: str, verifier: str, **extra):
    return bastion.http.post(
        f"{bastion.url}/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "code_verifier": verifier,
            "client_id": client_id,
            **extra,
        },
    )


def test_the_task_parameter_at_the_code_exchange_binds_the_grant_to_the_task(bastion, keys):
    client_id, code, verifier = code_for(bastion, "sam")
    task = open_task(bastion, keys["orchestrator"], client_id)
    others = open_task(bastion, keys["orchestrator"], "someone-else")
    # Refused (RFC 6749's invalid_request, the reason in the description), nothing issued, and
    # the code is still unused: a task of another agent, an unknown one.
    for wrong in (others["id"], "task_" + "0" * 24):
        refused = redeem(bastion, client_id, code, verifier, task=wrong)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"] == "invalid_request"
        assert "task" in refused.json()["error_description"]
    issued = redeem(bastion, client_id, code, verifier, task=task["id"])
    assert issued.status_code == 200, issued.text
    token = issued.json()["access_token"]
    assert "result" in raw_status(bastion, token)[1]
    shown = api(bastion, keys["orchestrator"], "GET", f"/{task['id']}").json()["task"]
    assert shown["grants"] == 1
    [issued_event] = [
        e
        for e in bastion.app.state.oauth.audit.events("token.issued")
        if e.detail.get("task") == task["id"]
    ]
    assert issued_event.client_id == client_id

    ended = api(bastion, keys["orchestrator"], "POST", f"/{task['id']}/end")
    assert ended.status_code == 200 and ended.json()["ended"] is True
    assert raw_status(bastion, token)[0] == 401
    # Its refresh token went with the grant.
    refreshed = bastion.http.post(
        f"{bastion.url}/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": issued.json()["refresh_token"],
            "client_id": client_id,
        },
    )
    assert refreshed.status_code == 400 and refreshed.json()["error"] == "invalid_grant"
    # An ended task binds nothing at the code exchange either.
    client_id, code, verifier = code_for(bastion, "sam")
    late = open_task(bastion, keys["orchestrator"], client_id)
    api(bastion, keys["orchestrator"], "POST", f"/{late['id']}/end")
    closed = redeem(bastion, client_id, code, verifier, task=late["id"])
    assert closed.status_code == 400 and "ended" in closed.json()["error_description"]


def claims_of(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def test_tokens_of_a_task_name_it_and_do_not_outlive_it(bastion, keys):
    def refresh(client_id: str, token: str):
        return bastion.http.post(
            f"{bastion.url}/token",
            data={"grant_type": "refresh_token", "refresh_token": token, "client_id": client_id},
        )

    def issued_before_expiry(at: float) -> tuple[dict, str, dict]:
        # A task that expires at ``at``, its grant's tokens issued and refreshed before then (a
        # machine too busy for that makes one that lives longer: `before_expiry`).
        client_id, code, verifier = code_for(bastion, "sam")
        task = open_task(bastion, keys["orchestrator"], client_id, expires_at=at)
        asked = time.time()  # no token issued from here on may outlive the task
        issued = redeem(bastion, client_id, code, verifier, task=task["id"])
        assert issued.status_code == 200, issued.text
        claims = claims_of(issued.json()["access_token"])
        # The token names its task (the gateway keys the caller's labels by it) and expires
        # with it.
        assert claims["task"] == task["id"]
        assert issued.json()["expires_in"] <= task["expires_at"] - asked
        assert claims["exp"] <= task["expires_at"]
        refreshed = refresh(client_id, issued.json()["refresh_token"])
        assert refreshed.status_code == 200, refreshed.text
        assert claims_of(refreshed.json()["access_token"])["task"] == task["id"]
        assert refreshed.json()["expires_in"] <= task["expires_at"] - asked
        return task, client_id, refreshed.json()

    (task, client_id, refreshed), _ = before_expiry(issued_before_expiry, 3)
    # Past the task's expiry no token is issued for the grant, swept yet or not.
    past(task["expires_at"])
    late = refresh(client_id, refreshed["refresh_token"])
    assert late.status_code == 400 and late.json()["error"] == "invalid_grant", late.text


def test_the_task_parameter_at_client_credentials_binds_an_agent_acting_as_itself(bastion, keys):
    from bastion.oauth.store import Client, digest

    secret = "a-secret-of-the-nightly-agent"
    agent = Client(
        "nightly-agent",
        "nightly agent",
        (),
        ("client_credentials",),
        "client_secret_post",
        "customers:read",
        "admin",
        {},
        time.time(),
        None,
        digest(secret),
    )
    bastion.app.state.oauth.store.save_client(agent)
    # Acting as itself, the agent is the token's subject: the task is on its own behalf.
    task = api(
        bastion,
        keys["orchestrator"],
        "POST",
        json={
            "user": agent.client_id,
            "agent": agent.client_id,
            "purpose": "the nightly export",
            "facts": [reader(agent.client_id)],
            "expires_in": 600,
        },
    ).json()["task"]

    def token(**extra):
        return bastion.http.post(
            f"{bastion.url}/token",
            data={
                "grant_type": "client_credentials",
                "client_id": agent.client_id,
                "client_secret": secret,
                "resource": bastion.mcp_url("deskhttp"),
                **extra,
            },
        )

    assert token(task="task_" + "1" * 24).json()["error"] == "invalid_request"
    bound, unbound = token(task=task["id"]).json(), token().json()
    assert raw_status(bastion, bound["access_token"])[0] == 200
    api(bastion, keys["orchestrator"], "POST", f"/{task['id']}/end")
    assert raw_status(bastion, bound["access_token"])[0] == 401
    assert raw_status(bastion, unbound["access_token"])[0] == 200  # not the task's


def test_a_real_bastion_serve_ends_an_expired_task_by_itself(tmp_path, database_url):
    """`bastion serve` in a process of its own, on SQLite and on PostgreSQL, no [oauth]: the
    task's grant decides, then its expiry takes it away (the sweeper wakes at the expiry)."""
    from tests.server.conftest import POLICY, ServerProcess

    policy = tmp_path / "policy.polar"
    policy.write_text(POLICY + "\nactor Agent {}\n")
    server = ServerProcess(database_url, tmp_path, str(policy)).start()
    repo = {"type": "Repo", "id": "r1"}
    try:
        with server.client() as http:

            def granted_before_expiry(at: float) -> tuple[dict, dict]:
                # A task that expires at ``at``, and a decision it granted before then (a
                # machine too busy for that makes one that lives longer: `before_expiry`); an
                # agent of its own, whatever the sweeper does with one made before.
                agent = {"type": "Agent", "id": f"builder-{uuid.uuid4().hex[:8]}"}
                opened = http.post(
                    "/v1/tasks",
                    json={
                        "user": "sam",
                        "agent": agent["id"],
                        "purpose": "build r1",
                        "expires_at": at,
                        "facts": [{"predicate": "has_role", "args": [agent, "reader", repo]}],
                    },
                )
                assert opened.status_code == 201, opened.text
                question = {"actor": agent, "action": "read", "resource": repo}
                assert http.post("/v1/authorize", json=question).json()["allowed"] is True
                return opened.json()["task"], agent

            (task, agent), _ = before_expiry(granted_before_expiry, 1.5)
            question = {"actor": agent, "action": "read", "resource": repo}
            assert until(lambda: http.get(f"/v1/tasks/{task['id']}").json()["task"]["ended_at"])
            assert http.post("/v1/authorize", json=question).json()["allowed"] is False
            shown = http.get(f"/v1/tasks/{task['id']}").json()["task"]
            assert (shown["status"], shown["ended_by"]) == ("expired", "expiry")
            facts = http.get(
                "/v1/facts",
                params={
                    "pattern": json.dumps({"predicate": "has_role", "args": [agent, None, None]})
                },
            ).json()
            assert facts["facts"] == []
    finally:
        server.stop()
    assert "Traceback" not in server.log.read_text()
