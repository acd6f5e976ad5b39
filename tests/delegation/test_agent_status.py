"""An agent's status says why its calls are refused: an agent acting as itself stops while its
owner is suspended or disabled (`Suspensions.first`, docs/delegation.md), and `bastion agents
list`, `bastion agents show` and `/v1/agents` say so (`stopped`, with the owner and why) instead
of calling it active. The admin CLI on a real SQLite file."""

from __future__ import annotations

import json

import pytest

from tests.delegation.agent_support import cli


@pytest.fixture
def config(tmp_path) -> str:
    """A bastion.toml (the admin commands' ``--config``) on a fresh SQLite file."""
    path = tmp_path / "bastion.toml"
    path.write_text(
        "[server]\n"
        f"database = {json.dumps(str(tmp_path / 'bastion.db'))}\n"
        "[oauth]\n"
        'issuer = "https://bastion.example.com"\n'
        f"key_dir = {json.dumps(str(tmp_path / 'keys'))}\n"
        "[[oauth.resources]]\n"
        'uri = "https://bastion.example.com/mcp/desk"\n'
        'scopes = ["tools:read"]\n'
    )
    return str(path)


def new_agent(capsys, config: str, owner: str) -> str:
    code, out, err = cli(capsys, "clients", "create", "--name", "nightly report",
                         "--confidential", "--owner", owner, "--config", config)  # fmt: skip
    assert code == 0, err
    return json.loads(out)["client_id"]


def listed(capsys, config: str, *extra: str) -> dict[str, dict]:
    code, out, err = cli(capsys, "agents", "list", "--json", *extra, "--config", config)
    assert code == 0, err
    return {a["client_id"]: a for a in map(json.loads, out.splitlines())}


def shown(capsys, config: str, client_id: str) -> dict:
    code, out, err = cli(capsys, "agents", "show", client_id, "--config", config)
    assert code == 0, err
    return json.loads(out)


def test_an_agent_whose_owner_is_suspended_is_shown_stopped_naming_the_owner(capsys, config):
    agent = new_agent(capsys, config, "alice")
    other = new_agent(capsys, config, "bob")
    code, _, err = cli(capsys, "agents", "suspend", "alice", "--kind", "user",
                       "--config", config)  # fmt: skip
    assert code == 0, err
    agents = listed(capsys, config)
    assert agents[agent]["status"] == "stopped"
    assert agents[agent]["stopped"] == "owner 'alice' is suspended until resumed"
    assert agents[other]["status"] == "active" and agents[other]["stopped"] is None
    assert shown(capsys, config, agent)["stopped"] == "owner 'alice' is suspended until resumed"
    assert list(listed(capsys, config, "--status", "stopped")) == [agent]
    code, out, err = cli(capsys, "agents", "list", "--config", config)
    assert code == 0, err
    [line] = [x for x in out.splitlines() if x.startswith(agent)]
    assert "\tstopped: owner 'alice' is suspended until resumed\t" in line
    code, _, err = cli(capsys, "agents", "resume", "alice", "--kind", "user",
                       "--config", config)  # fmt: skip
    assert code == 0, err
    assert listed(capsys, config)[agent]["status"] == "active"


def test_an_agent_whose_owner_is_disabled_is_shown_stopped_until_the_owner_is_enabled(
    capsys, config, monkeypatch
):
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("a long enough password 1\n"))
    code, _, err = cli(capsys, "users", "create", "alice", "--password-stdin",
                       "--config", config)  # fmt: skip
    assert code == 0, err
    agent = new_agent(capsys, config, "alice")
    code, _, err = cli(capsys, "users", "disable", "alice", "--config", config)
    assert code == 0, err
    assert listed(capsys, config)[agent]["status"] == "stopped"
    assert shown(capsys, config, agent)["stopped"] == "owner 'alice' is disabled"
    code, _, err = cli(capsys, "users", "enable", "alice", "--config", config)
    assert code == 0, err
    assert shown(capsys, config, agent)["status"] == "active"


def test_the_agents_own_suspension_and_revocation_come_before_its_owners(capsys, config):
    agent = new_agent(capsys, config, "alice")
    for argv in (("agents", "suspend", "alice", "--kind", "user"), ("agents", "suspend", agent)):
        code, _, err = cli(capsys, *argv, "--config", config)
        assert code == 0, err
    assert shown(capsys, config, agent)["status"] == "suspended"
    code, _, err = cli(capsys, "clients", "revoke", agent, "--config", config)
    assert code == 0, err
    assert shown(capsys, config, agent)["status"] == "revoked"
