"""The client SDK (sync and async) and the admin CLI, against a real `bastion serve` process."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from bastion import Entity, Variable
from bastion.client import AsyncClient, Client, RemoteError

from .conftest import ADMIN_KEY, POLICY

ALICE, ANVIL, ACME = Entity("User", "alice"), Entity("Repo", "anvil"), Entity("Org", "acme")


def test_the_client_speaks_the_authorizer_method_names(sqlite_url, serve):
    server = serve(sqlite_url)
    with Client(server.url, ADMIN_KEY) as client:
        seq = client.facts.insert(("has_role", ALICE, "member", ACME))
        client.facts.apply([("has_relation", ANVIL, "parent", ACME)], [])
        assert client.sequence > seq
        assert client.authorize(ALICE, "read", ANVIL)
        assert not client.authorize(ALICE, "push", ANVIL)
        decision = client.decide(ALICE, "read", ANVIL)
        assert decision.allowed and "has_role" in decision.explanation["text"]
        assert client.list(ALICE, "read", "Repo") == ["anvil"]
        assert client.actions(ALICE, ANVIL) == {"read"}
        assert client.authorize_many([(ALICE, "read", ANVIL), (ALICE, "push", ANVIL)]) == [
            True,
            False,
        ]
        rows = client.query("has_role", Variable("u"), "member", Variable("o"))
        assert rows == [("has_role", ALICE, "member", ACME)]
        assert ("has_role", ALICE, "member", ACME) in client.facts.get(
            ("has_role", None, None, None)
        )
        assert client.facts.delete(("has_role", ALICE, None, None)) == 1
        assert not client.authorize(ALICE, "read", ANVIL)
        with pytest.raises(RemoteError) as refused:
            client.facts.insert(("no_such_fact", ALICE))
        assert refused.value.status == 422 and "no_such_fact" in refused.value.detail


def test_the_async_client_has_the_same_methods(sqlite_url, serve):
    server = serve(sqlite_url)

    async def run():
        async with AsyncClient(server.url, ADMIN_KEY) as client:
            await client.facts.insert(("has_role", ALICE, "reader", ANVIL))
            assert await client.authorize(ALICE, "read", ANVIL)
            assert await client.list(ALICE, "read", "Repo") == ["anvil"]
            exported = [f async for f in client.facts.export()]
            assert [f.fact for f in exported] == [("has_role", ALICE, "reader", ANVIL)]
            with pytest.raises(RemoteError):
                await client.load_policy("allow(")
            assert [v["version"] for v in await client.policy_versions()] == [1]

    asyncio.run(run())


def bastion(*args: str, env: dict | None = None, stdin: str | None = None):
    return subprocess.run(
        [sys.executable, "-m", "bastion.cli", *args],
        capture_output=True,
        text=True,
        input=stdin,
        env={**os.environ, "BASTION_CONFIG": "/nonexistent", **(env or {})},
        timeout=60,
    )


def test_cli_on_the_local_store_then_on_the_server(sqlite_url, tmp_path, serve):
    policy = tmp_path / "p.polar"
    policy.write_text(POLICY)
    db = ["--database", sqlite_url]
    assert bastion("policy", "push", str(policy), *db).returncode == 0
    r = bastion("facts", "insert", 'has_role(User{"alice"}, "reader", Repo{"anvil"})', *db)
    assert r.returncode == 0, r.stderr
    r = bastion("facts", "insert", 'has_rol(User{"alice"})', *db)
    assert r.returncode == 2 and "has_rol" in r.stderr
    created = bastion("keys", "create", "--name", "ops", "--scope", "admin", *db)
    key = created.stdout.strip()
    assert key.startswith("bst_")

    server = serve(sqlite_url)
    remote = ["--url", server.url, "--api-key", key]
    r = bastion("facts", "get", *remote)
    assert r.stdout.strip() == 'has_role(User{"alice"}, "reader", Repo{"anvil"})'
    exported = bastion("facts", "export", *remote).stdout
    assert json.loads(exported)["predicate"] == "has_role"
    bastion("facts", "delete", "has_role(_, _, _)", *remote)
    assert bastion("facts", "get", *remote).stdout == ""
    r = bastion("facts", "import", "-", *remote, stdin=exported)
    assert r.returncode == 0 and "imported 1" in r.stderr
    assert bastion("facts", "get", *db).stdout.startswith("has_role")
    versions = bastion("policy", "versions", *remote).stdout.splitlines()
    assert len(versions) == 1 and versions[0].split("\t")[2] == "cli"
    key_id = key.split("_")[1]
    assert bastion("keys", "revoke", key_id, *db).returncode == 0
    r = bastion("keys", "list", *db)
    assert f"{key_id}\trevoked" in r.stdout
