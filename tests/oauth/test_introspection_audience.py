"""RFC 7662 §4: the authorization server must tell a resource server nothing of tokens that are
not meant for it. An introspecting client is bound to the protected resources it introspects
for (`bastion clients create --introspection URI`, or ``*`` for every one); a token (access or
refresh) whose audience is none of them is answered exactly as an unknown token is, and its
``token.introspected`` row says why (``aud``). A client allowed to introspect before the binding
existed keeps every resource through the upgrade, and ``bastion clients show`` says so.

Real HTTP throughout: a bastion on loopback with two protected resources, the admin CLI on its
database, tokens from the real authorization code flow."""

from __future__ import annotations

import io
import json
import sys

import pytest

from bastion.cli import main
from bastion.db import Database
from bastion.oauth import store
from bastion.oauth.store import digest

from .support import Bastion, running_bastion
from .test_endpoints import basic
from .test_introspection_audit import answers


def run(capsys, monkeypatch, *argv: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def cli_config(bastion: Bastion, tmp_path, database: str) -> str:
    """A bastion.toml for the admin CLI naming the running server's database and resources."""
    path = tmp_path / "bastion.toml"
    path.write_text(
        f"""
[server]
database = "{database}"

[oauth]
issuer = "{bastion.url}"
key_dir = "{tmp_path / "keys"}"

[[oauth.resources]]
uri = "{bastion.resource}"
scopes = ["tools:read", "tools:call"]

[[oauth.resources]]
uri = "{bastion.other_resource}"
scopes = ["tools:read"]
"""
    )
    return str(path)


def resource_server(capsys, monkeypatch, config: str, *introspection: str) -> dict:
    """A resource server as an administrator registers it: `bastion clients create
    --confidential --introspection URI` (once per URI)."""
    flags = [arg for uri in introspection for arg in ("--introspection", uri)]
    code, out, err = run(
        capsys, monkeypatch, "clients", "create", "--name", "Resource server",
        "--confidential", *flags, "--config", config,
    )  # fmt: skip
    assert code == 0, err
    return json.loads(out)


def tokens_for_resource(bastion: Bastion, resource: str) -> dict:
    """alice's tokens for ``resource``, from the authorization code flow."""
    agent = bastion.register()
    code, verifier = bastion.code_for(agent, resource=resource)
    response = bastion.token(
        grant_type="authorization_code",
        code=code,
        redirect_uri=agent["redirect_uris"][0],
        code_verifier=verifier,
        client_id=agent["client_id"],
    )
    assert response.status_code == 200, response.text
    return response.json()


def ask(bastion: Bastion, asker: dict, token: str):
    return bastion.http.post(
        f"{bastion.url}/introspect", data={"token": token}, headers=basic(asker)
    )


def assert_answered_as_unknown(bastion: Bastion, asker: dict, token: str) -> None:
    """The answer about ``token`` is, to the byte, the answer about a token nobody issued:
    status, headers (but the date) and body."""
    unknown = ask(bastion, asker, "not-a-token-bastion-issued")
    answer = ask(bastion, asker, token)
    assert unknown.status_code == 200 and unknown.json() == {"active": False}
    assert answer.status_code == unknown.status_code
    assert answer.content == unknown.content

    def headers(response):
        return {k: v for k, v in response.headers.items() if k.lower() != "date"}

    assert headers(answer) == headers(unknown)


@pytest.fixture
def served(database_url, tmp_path):
    with running_bastion(database_url, tmp_path) as bastion:
        yield bastion, cli_config(bastion, tmp_path, database_url)


def test_a_resource_server_learns_nothing_of_the_tokens_of_another_resource(
    served, capsys, monkeypatch
):
    bastion, config = served
    asker = resource_server(capsys, monkeypatch, config, bastion.resource)
    mine = tokens_for_resource(bastion, bastion.resource)
    theirs = tokens_for_resource(bastion, bastion.other_resource)

    for token in (mine["access_token"], mine["refresh_token"]):
        answer = ask(bastion, asker, token).json()
        assert answer["active"] is True and answer["aud"] == bastion.resource
    for token in (theirs["access_token"], theirs["refresh_token"]):
        assert_answered_as_unknown(bastion, asker, token)

    # The audit trail says why, naming the token, its audience and the asker.
    refused = [row for row in answers(bastion) if row.detail["reason"] == "aud"]
    assert {row.detail["token_kind"] for row in refused} == {"access_token", "refresh_token"}
    for row in refused:
        assert row.client_id == asker["client_id"] and row.subject == "alice"
        assert row.detail["active"] is False
        assert row.detail["aud"] == bastion.other_resource
        assert bastion.resource in row.detail["description"]


def test_a_resource_server_bound_to_every_resource_sees_every_token(served, capsys, monkeypatch):
    bastion, config = served
    asker = resource_server(capsys, monkeypatch, config, "*")
    for resource in (bastion.resource, bastion.other_resource):
        tokens = tokens_for_resource(bastion, resource)
        for token in (tokens["access_token"], tokens["refresh_token"]):
            answer = ask(bastion, asker, token).json()
            assert answer["active"] is True and answer["aud"] == resource


def test_a_resource_server_bound_to_both_resources_sees_both_and_narrowed_sees_one(
    served, capsys, monkeypatch
):
    bastion, config = served
    asker = resource_server(capsys, monkeypatch, config, bastion.resource, bastion.other_resource)
    theirs = tokens_for_resource(bastion, bastion.other_resource)
    assert ask(bastion, asker, theirs["access_token"]).json()["active"] is True
    code, _, err = run(
        capsys, monkeypatch, "clients", "update", asker["client_id"],
        "--introspection", bastion.resource, "--config", config,
    )  # fmt: skip
    assert code == 0, err
    assert_answered_as_unknown(bastion, asker, theirs["access_token"])
    assert_answered_as_unknown(bastion, asker, theirs["refresh_token"])


def test_a_client_allowed_to_introspect_before_the_upgrade_keeps_every_resource(
    database_url, tmp_path, capsys, monkeypatch
):
    """A client a release before the binding allowed (``may_introspect``, the released schema)
    keeps seeing every token through the new migration, and `clients show` says it should be
    narrowed; a client that was not allowed still is not."""
    binding = next(i for i, m in enumerate(store._MIGRATIONS) if "introspection_resources" in m)
    db = Database(database_url)
    db.migrate("oauth", store._MIGRATIONS[:binding])  # the schema of the release before
    for client_id, may_introspect in (("old-resource-server", 1), ("old-agent", 0)):
        db.execute(
            "INSERT INTO oauth_clients (client_id, secret_digest, client_name, redirect_uris,"
            " grant_types, token_endpoint_auth_method, scope, source, may_introspect, metadata,"
            " created_at) VALUES (?, ?, ?, '[]', '[\"client_credentials\"]',"
            " 'client_secret_basic', 'tools:read', 'admin', ?, '{}', 0)",
            (client_id, digest(f"{client_id}-secret"), client_id, may_introspect),
        )
    db.close()
    with running_bastion(database_url, tmp_path) as bastion:
        old = {"client_id": "old-resource-server", "client_secret": "old-resource-server-secret"}
        for resource in (bastion.resource, bastion.other_resource):
            tokens = tokens_for_resource(bastion, resource)
            for token in (tokens["access_token"], tokens["refresh_token"]):
                answer = ask(bastion, old, token).json()
                assert answer["active"] is True and answer["aud"] == resource
        agent = {"client_id": "old-agent", "client_secret": "old-agent-secret"}
        assert ask(bastion, agent, tokens["access_token"]).status_code == 403

        code, out, err = run(
            capsys, monkeypatch, "clients", "show", "old-resource-server",
            "--database", database_url,
        )  # fmt: skip
        assert code == 0, err
        assert "every resource" in out and "before the upgrade" in out
        assert "bastion clients update old-resource-server --introspection" in out
        code, out, err = run(
            capsys, monkeypatch, "clients", "show", "old-resource-server", "--json",
            "--database", database_url,
        )  # fmt: skip
        shown = json.loads(out)
        assert shown["introspection_resources"] == ["*"]
        assert shown["introspection_kept_at_upgrade"] is True

        # Narrowed by an administrator: no longer "kept", and bound.
        config = cli_config(bastion, tmp_path, database_url)
        code, _, err = run(
            capsys, monkeypatch, "clients", "update", "old-resource-server",
            "--introspection", bastion.resource, "--config", config,
        )  # fmt: skip
        assert code == 0, err
        code, out, _ = run(
            capsys, monkeypatch, "clients", "show", "old-resource-server", "--json",
            "--database", database_url,
        )  # fmt: skip
        shown = json.loads(out)
        assert shown["introspection_resources"] == [bastion.resource]
        assert shown["introspection_kept_at_upgrade"] is False
        assert_answered_as_unknown(bastion, old, tokens["access_token"])


def test_introspection_without_resources_is_refused_and_creates_nothing(
    served, capsys, monkeypatch
):
    bastion, config = served
    before = bastion.rows()["oauth_clients"]
    for flags, says in (
        (["--introspection"], "--introspection"),
        (["--introspection", "https://elsewhere.example/mcp"], "not a protected resource"),
        (["--introspection", "*", "--introspection", bastion.resource], "'*'"),
    ):
        code, out, err = run(
            capsys, monkeypatch, "clients", "create", "--name", "Resource server",
            "--confidential", *flags, "--config", config,
        )  # fmt: skip
        assert code == 2 and out == "", (flags, out)
        assert says in err, err
    # A public client may not introspect at all.
    code, _, err = run(
        capsys, monkeypatch, "clients", "create", "--name", "Desktop",
        "--redirect-uri", "http://127.0.0.1/cb", "--introspection", "*", "--config", config,
    )  # fmt: skip
    assert code == 2 and "--confidential" in err
    assert bastion.rows()["oauth_clients"] == before


def test_clients_show_list_and_update_name_the_resources_and_the_change_is_audited(
    served, capsys, monkeypatch
):
    bastion, config = served
    asker = resource_server(capsys, monkeypatch, config, bastion.resource)
    code, out, err = run(capsys, monkeypatch, "clients", "show", asker["client_id"],
                         "--config", config)  # fmt: skip
    assert code == 0, err
    assert bastion.resource in out and "before the upgrade" not in out
    code, out, _ = run(capsys, monkeypatch, "clients", "list", "--json", "--config", config)
    listed = {c["client_id"]: c for c in json.loads(out)}
    assert listed[asker["client_id"]]["introspection_resources"] == [bastion.resource]

    # Bad input changes nothing.
    before = bastion.rows()["oauth_clients"]
    for argv in (
        ["update", asker["client_id"], "--introspection"],
        ["update", asker["client_id"], "--introspection", "https://elsewhere.example/mcp"],
        ["update", "nobody", "--introspection", "*"],
        ["update", asker["client_id"]],
        ["update", asker["client_id"], "--introspection", "*", "--no-introspection"],
    ):
        code, _, err = run(capsys, monkeypatch, "clients", *argv, "--config", config)
        assert code == 2 and err, argv
    assert bastion.rows()["oauth_clients"] == before

    code, _, err = run(
        capsys, monkeypatch, "clients", "update", asker["client_id"], "--introspection", "*",
        "--config", config,
    )  # fmt: skip
    assert code == 0, err
    code, _, err = run(
        capsys, monkeypatch, "clients", "update", asker["client_id"], "--no-introspection",
        "--config", config,
    )  # fmt: skip
    assert code == 0, err
    token = tokens_for_resource(bastion, bastion.resource)["access_token"]
    assert ask(bastion, asker, token).status_code == 403
    changes = [e for e in bastion.server.audit.events("client.updated")]
    assert [(e.detail["old"], e.detail["new"]) for e in reversed(changes)] == [
        ({"introspection_resources": [bastion.resource]}, {"introspection_resources": ["*"]}),
        ({"introspection_resources": ["*"]}, {"introspection_resources": []}),
    ]
    assert all(e.client_id == asker["client_id"] for e in changes)
