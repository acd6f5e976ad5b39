"""Agent identities: every OAuth client is an agent with an owner (the first person to consent,
or the administrator's choice), a name, a purpose, a status and maybe a parent. Owner and parent
are facts the policy and the alerts use; `bastion agents` and `/v1/agents` show and change them;
`bastion agents suspend` refuses the agent's calls. A real server, real HTTP."""

from __future__ import annotations

import json
import time
from urllib.parse import urlencode

import httpx
import pytest

from bastion.audit.actor import cli_actor
from bastion.facts.model import Entity
from tests.delegation.agent_support import cli, cli_config
from tests.gateway.streams import call_tool
from tests.gateway.support import PASSWORD, REDIRECT_URI, start
from tests.oauth.support import log_in_and_consent, pkce_pair
from tests.waits import eventually

QUERY = {"query": "a"}
# Sub-agents may not search customers; anyone's agents otherwise may (the quickstart's rules).
POLICY_EXTRA = """
declare has_relation(Agent, String, Agent);
declare has_relation(Agent, String, User);
deny(agent: Agent, "call", Tool{"deskhttp/search_customers"}) if
  has_relation(agent, "parent", _parent);
"""


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    with start(tmp_path_factory.mktemp("agents"), policy_extra=POLICY_EXTRA) as running:
        yield running


@pytest.fixture(scope="module")
def config(bastion, tmp_path_factory):
    return cli_config(bastion, tmp_path_factory.mktemp("agents-cli"))


def register(bastion, name: str = "coding agent") -> str:
    answer = bastion.http.post(
        f"{bastion.url}/register",
        json={
            "client_name": name,
            "redirect_uris": [REDIRECT_URI],
            "token_endpoint_auth_method": "none",
            "grant_types": ["authorization_code"],
        },
    )
    assert answer.status_code == 201, answer.text
    return answer.json()["client_id"]


def consent(bastion, client_id: str, username: str, server: str = "deskhttp") -> str:
    """``username`` signs in and lets ``client_id`` act for them; returns the access token."""
    verifier, challenge = pkce_pair()
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": REDIRECT_URI,
        "state": "s",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "resource": bastion.mcp_url(server),
        "scope": "customers:read",
    }
    url = f"{bastion.url}/authorize?{urlencode(params)}"
    # A browser of its own: each person signs in afresh.
    with httpx.Client(follow_redirects=False, timeout=10) as browser:
        redirect = log_in_and_consent(bastion.url, url, username, PASSWORD, browser)
    code = httpx.URL(redirect.headers["location"]).params["code"]
    tokens = bastion.http.post(
        f"{bastion.url}/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "code_verifier": verifier,
            "client_id": client_id,
        },
    )
    assert tokens.status_code == 200, tokens.text
    return tokens.json()["access_token"]


def call(bastion, token: str, tool: str = "search_customers") -> dict:
    """One tools/call on deskhttp with the 2026-07-28 headers; the JSON-RPC answer."""
    return call_tool(bastion, token, "deskhttp", tool, QUERY)


def answer_with(bastion, token: str, key: str) -> dict:
    """Call until the answer has ``key`` ("result" or "error"): the server hears of the command
    line's write through the change log."""
    answers = [call(bastion, token)]

    def answered() -> bool:
        if key not in answers[-1]:
            answers.append(call(bastion, token))
        return key in answers[-1]

    assert eventually(answered, every=0.05), f"never answered with {key}: {answers[-1]}"
    return answers[-1]


def owner_facts(bastion, client_id: str) -> list[tuple]:
    found = bastion.store.get(("has_relation", Entity("Agent", client_id), "owner", None))
    return [f.fact for f in found]


def test_the_first_person_to_consent_owns_the_agent(bastion):
    client_id = register(bastion)
    assert owner_facts(bastion, client_id) == []
    consent(bastion, client_id, "sam")
    sam = Entity("User", "sam")
    assert owner_facts(bastion, client_id) == [
        ("has_relation", Entity("Agent", client_id), "owner", sam)
    ]
    consent(bastion, client_id, "avery")  # a later consent does not take it over
    assert [f[3] for f in owner_facts(bastion, client_id)] == [sam]
    # The change log says who made the fact, and carries it to replicas.
    changes = bastion.store.changes_since(0, limit=100_000)
    [written] = [c for c in changes if any(client_id in repr(f.fact) for f in c.inserts)]
    assert written.actor == "consent:sam"


def test_the_alerts_tell_the_owner_through_the_same_fact(bastion):
    client_id = register(bastion, "alerting agent")
    consent(bastion, client_id, "avery")
    from bastion.db import Database
    from bastion.signals.alerts import Alerts, AlertSettings, AlertStore

    # Alerts on the deployment's database, under a policy that never mentions owners.
    store = AlertStore(Database(bastion.app.state.config.database))
    try:
        alerts = Alerts(store, AlertSettings(), lambda: None, bastion.url)
        alert = alerts.raise_alert("bulk_delete", "high", Entity("Agent", client_id), "d-agents")
    finally:
        store.db.close()
    assert alert.owner == 'User{"avery"}' and alert.recipients == ('User{"avery"}',)


def test_the_admin_registers_a_sub_agent_with_owner_parent_and_purpose(
    bastion, config, capsys, tmp_path
):
    parent = register(bastion, "parent agent")
    from tests.delegation.agent_support import new_key, public_jwks

    keys = tmp_path / "sub.jwks.json"
    keys.write_text(json.dumps(public_jwks(new_key("sub"))))
    code, out, err = cli(
        capsys,
        "clients", "create", "--name", "svg sub-agent", "--jwks-file", str(keys),
        "--owner", "sam", "--parent", parent, "--purpose", "draws SVG for the coding agent",
        "--config", config,
    )  # fmt: skip
    assert code == 0, err
    child = json.loads(out)["client_id"]
    code, out, err = cli(capsys, "agents", "show", child, "--config", config)
    assert code == 0, err
    shown = json.loads(out)
    assert shown["owner"] == "sam" and shown["parent"] == parent
    assert shown["purpose"] == "draws SVG for the coding agent" and shown["status"] == "active"
    assert ("has_relation", Entity("Agent", child), "parent", Entity("Agent", parent)) in [
        f.fact for f in bastion.store.get(("has_relation", Entity("Agent", child), None, None))
    ]
    # A parent that would make a loop, and an unknown parent, are refused.
    code, _, err = cli(capsys, "agents", "update", parent, "--parent", child, "--config", config)
    assert code == 2 and "loop" in err
    code, _, err = cli(capsys, "clients", "create", "--name", "x", "--confidential", "--parent", "nobody",
                       "--config", config)  # fmt: skip
    assert code == 2 and "no such client" in err


def test_the_policy_reads_the_parent_fact_and_a_change_applies_at_the_next_call(
    bastion, config, capsys
):
    parent, child = register(bastion, "coding agent"), register(bastion, "sub-agent")
    token = consent(bastion, child, "sam")
    assert "result" in call(bastion, token)
    code, _, err = cli(capsys, "agents", "update", child, "--parent", parent, "--config", config)
    assert code == 0, err
    refused = answer_with(bastion, token, "error")
    assert refused["error"]["code"] == -32003
    code, _, err = cli(capsys, "agents", "update", child, "--no-parent", "--config", config)
    assert code == 0, err
    assert answer_with(bastion, token, "result")


def test_bastion_agents_suspend_refuses_the_agents_calls_and_shows_its_status(
    bastion, config, capsys
):
    client_id = register(bastion, "suspended agent")
    token = consent(bastion, client_id, "sam")
    assert "result" in call(bastion, token)
    code, _, err = cli(capsys, "agents", "suspend", client_id, "--config", config)
    assert code == 0, err
    refused = answer_with(bastion, token, "error")
    assert refused["error"]["data"]["reason"] == "suspended"
    code, out, _ = cli(
        capsys, "agents", "list", "--status", "suspended", "--json", "--config", config
    )
    listed = [json.loads(line) for line in out.splitlines()]
    assert [a["client_id"] for a in listed] == [client_id] and listed[0]["owner"] == "sam"
    code, _, err = cli(capsys, "agents", "resume", client_id, "--config", config)
    assert code == 0, err
    assert answer_with(bastion, token, "result")


def agent_updates(capsys, config: str, client_id: str) -> list[tuple[dict, dict, str]]:
    """The ``agent.updated`` audit events of ``client_id``, oldest first, as ``bastion audit
    events`` shows them: (old, new, actor)."""
    code, out, err = cli(capsys, "audit", "events", "--kind", "agent.updated", "--json",
                         "--config", config)  # fmt: skip
    assert code == 0, err
    shown = [json.loads(line) for line in out.splitlines()]
    return [
        (e["detail"]["old"], e["detail"]["new"], e["detail"]["actor"])
        for e in shown
        if e["client_id"] == client_id
    ]


def test_bastion_agents_update_records_the_old_and_new_name_and_purpose(bastion, config, capsys):
    client_id = register(bastion, "old name")
    code, _, err = cli(capsys, "agents", "update", client_id, "--name", "new name",
                       "--purpose", "files tickets", "--config", config)  # fmt: skip
    assert code == 0, err
    # The same name again, and an owner (a fact, in the change log): no agent.updated.
    code, _, err = cli(capsys, "agents", "update", client_id, "--name", "new name",
                       "--owner", "sam", "--config", config)  # fmt: skip
    assert code == 0, err
    assert agent_updates(capsys, config, client_id) == [
        (
            {"name": "old name", "purpose": ""},
            {"name": "new name", "purpose": "files tickets"},
            cli_actor(),
        )
    ]


def test_bastion_agents_update_refuses_a_name_that_reads_as_another(bastion, config, capsys):
    client_id = register(bastion, "report bot")
    code, _, err = cli(capsys, "agents", "update", client_id, "--name", "rep\u043ert bot",
                       "--config", config)  # fmt: skip
    assert code == 2
    assert "client_name mixes scripts in one word (Latin and Cyrillic: rep\\u043ert)" in err
    assert agent_updates(capsys, config, client_id) == []


def api(bastion, scopes: list[str]) -> httpx.Client:
    key, _ = bastion.app.state.keys.create("agents test", scopes, created_by="test")
    return httpx.Client(
        base_url=bastion.url, headers={"authorization": f"Bearer {key}"}, timeout=20
    )


def test_v1_agents_reads_with_agents_read_and_changes_with_agents_write(bastion, config, capsys):
    client_id = register(bastion, "api agent")
    consent(bastion, client_id, "sam")
    with api(bastion, ["decide", "facts:read"]) as other:
        assert other.get("/v1/agents").status_code == 403
    with api(bastion, ["agents:read"]) as reader:
        listed = reader.get("/v1/agents").json()["agents"]
        [mine] = [a for a in listed if a["client_id"] == client_id]
        assert mine["owner"] == "sam" and mine["status"] == "active"
        assert reader.get(f"/v1/agents/{client_id}").json()["agent"]["name"] == "api agent"
        assert reader.patch(f"/v1/agents/{client_id}", json={"owner": "avery"}).status_code == 403
    with api(bastion, ["agents:write"]) as writer:
        changed = writer.patch(
            f"/v1/agents/{client_id}", json={"owner": "avery", "purpose": "triage tickets"}
        )
        assert changed.status_code == 200, changed.text
        body = changed.json()
        assert body["agent"]["owner"] == "avery" and body["agent"]["purpose"] == "triage tickets"
        assert isinstance(body["sequence"], int)
        assert [f[3] for f in owner_facts(bastion, client_id)] == [Entity("User", "avery")]
        assert writer.get("/v1/agents").status_code == 403  # write is not read
        for bad, status in [
            ({}, 400),
            ({"colour": "red"}, 400),
            ({"owner": 7}, 400),
            ({"parent": client_id}, 422),
            ({"parent": "nobody"}, 404),
            ({"purpose": "line\nbreak"}, 422),
        ]:
            answer = writer.patch(f"/v1/agents/{client_id}", json=bad)
            assert answer.status_code == status, (bad, answer.text)
        assert writer.patch("/v1/agents/nobody", json={"owner": "sam"}).status_code == 404
    with api(bastion, ["agents:read"]) as reader:
        # Nothing a refused request asked for was changed.
        agent = reader.get(f"/v1/agents/{client_id}").json()["agent"]
        assert agent["parent"] is None and agent["purpose"] == "triage tickets"
        assert reader.get("/v1/agents", params={"status": "bogus"}).status_code == 400
    # The purpose's change is recorded once, with the key that made it; the refusals, nothing.
    [(old, new, actor)] = agent_updates(capsys, config, client_id)
    assert (old, new) == ({"purpose": ""}, {"purpose": "triage tickets"})
    writers = [k for k in bastion.app.state.keys.list() if "agents:write" in k.scopes]
    assert actor in [f"key:{k.id}" for k in writers]


def test_two_first_consents_at_once_record_one_owner(database_url):
    """Checked and written as one step: racing first consents (on SQLite and PostgreSQL, each
    on a connection of its own, as replicas are) leave exactly one owner."""
    import threading

    from bastion.agents.identity import owners, record_first_owner
    from bastion.facts.store import FactStore

    client_id = f"raced-{time.time_ns()}"
    stores = [FactStore.open(database_url) for _ in range(6)]
    won: list[str] = []
    start_line = threading.Barrier(len(stores))

    def consent_as(store: FactStore, who: str) -> None:
        start_line.wait()
        if record_first_owner(store, client_id, who, f"consent:{who}"):
            won.append(who)

    threads = [
        threading.Thread(target=consent_as, args=(store, f"user{i}"))
        for i, store in enumerate(stores)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert len(won) == 1
        assert owners(stores[0], client_id) == won
    finally:
        for store in stores:
            store.close()


def test_v1_agents_shows_an_agent_whose_owner_is_suspended_as_stopped(bastion):
    client_id = register(bastion, "owned agent")
    with api(bastion, ["agents:read", "agents:write", "suspensions"]) as admin:
        assert admin.patch(f"/v1/agents/{client_id}", json={"owner": "casey"}).status_code == 200
        suspended = admin.post("/v1/suspensions", json={"kind": "user", "id": "casey"})
        assert suspended.status_code == 201, suspended.text
        try:
            agent = admin.get(f"/v1/agents/{client_id}").json()["agent"]
            assert agent["status"] == "stopped"
            assert agent["stopped"] == "owner 'casey' is suspended until resumed"
            listed = admin.get("/v1/agents", params={"status": "stopped"}).json()["agents"]
            assert [a["client_id"] for a in listed] == [client_id]
        finally:
            assert admin.delete("/v1/suspensions/user/casey").status_code == 200
        assert admin.get(f"/v1/agents/{client_id}").json()["agent"]["status"] == "active"
