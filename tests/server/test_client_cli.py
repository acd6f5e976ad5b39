"""The client SDK (sync and async) and the admin CLI, against a real `bastion serve` process."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bastion import Entity, Variable
from bastion.audit.actor import cli_actor
from bastion.client import AsyncClient, Client, RemoteError
from tests.command_line import bastion_in_process

from .conftest import ADMIN_KEY, POLICY

QUICKSTART_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "quickstart" / "bastion.toml"

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


def test_an_error_answer_that_is_not_bastions_is_quoted_short_and_escaped():
    """A proxy in front of bastion (the operator's own) may answer an error page of its own: the
    client quotes its start, to say what answered, with a line break and a terminal escape
    written as escapes, so the quote cannot forge a line of a log or drive a terminal."""
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    from tests.oauth.support import free_socket
    from tests.oauth.support import serve as serve_app

    page = "bad gateway\nERROR forged line \x1b[2J\x1b[31m" + "x" * 1000

    async def proxy(request):
        return Response(page, status_code=502, media_type="text/plain")

    app = Starlette(routes=[Route("/v1/authorize", proxy, methods=["POST"])])
    with (
        serve_app(app, free_socket()) as url,
        Client(url, ADMIN_KEY) as client,
        pytest.raises(RemoteError) as refused,
    ):
        client.authorize(ALICE, "read", ANVIL)
    detail = refused.value.detail
    assert refused.value.status == 502
    assert detail.startswith("bad gateway\\u000aERROR forged line \\u001b[2J"), detail
    assert "\n" not in str(refused.value) and "\x1b" not in str(refused.value)
    assert len(detail) < 300, detail


@pytest.mark.parametrize(
    "body", ["[1,2]", '"x"', "null", '"forged\\nline \u202egnp.exe"', "3", "true"]
)
def test_an_error_answer_in_json_that_is_not_an_object_is_a_remote_error(body):
    """An error answer whose body is JSON but not bastion's problem object (a list, a string,
    null: a proxy's, or a server that is not bastion) is the client's usual `RemoteError` with
    the status and the body's start, escaped, not an AttributeError from reading it as one."""
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    from tests.oauth.support import free_socket
    from tests.oauth.support import serve as serve_app

    async def proxy(request):
        return Response(body, status_code=502, media_type="application/json")

    app = Starlette(routes=[Route("/v1/authorize", proxy, methods=["POST"])])
    with serve_app(app, free_socket()) as url:
        with Client(url, ADMIN_KEY) as client, pytest.raises(RemoteError) as refused:
            client.authorize(ALICE, "read", ANVIL)
        assert refused.value.status == 502
        assert refused.value.title == "Bad Gateway"
        assert refused.value.body == {}
        assert refused.value.detail.startswith(body.split("\\", 1)[0]), refused.value.detail
        for raw in ("\n", "\x1b", "\u202e"):
            assert raw not in str(refused.value)

        async def remotely() -> None:
            async with AsyncClient(url, ADMIN_KEY) as client:
                await client.authorize(ALICE, "read", ANVIL)

        with pytest.raises(RemoteError) as refused:
            asyncio.run(remotely())
        assert refused.value.status == 502 and refused.value.body == {}


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


def bastion_process(*args: str, env: dict | None = None, stdin: str | None = None):
    """`bastion *args` in a new Python: for a test whose point is the process (its environment,
    its exit status)."""
    return subprocess.run(
        [sys.executable, "-m", "bastion.cli", *args],
        capture_output=True,
        text=True,
        input=stdin,
        env={**os.environ, "BASTION_CONFIG": "/nonexistent", **(env or {})},
        timeout=60,
    )


def bastion(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """What `bastion_process` runs, with the environment it has, run in this process: it spares
    the second a new Python takes to start and import bastion, twenty times in a test."""
    return bastion_in_process(
        *args, env={**os.environ, "BASTION_CONFIG": "/nonexistent"}, stdin=stdin
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
    # Who pushed the policy: the administrator, as every other command names them.
    assert len(versions) == 1 and versions[0].split("\t")[2] == cli_actor()
    key_id = key.split("_")[1]
    assert bastion("keys", "revoke", key_id, *db).returncode == 0
    r = bastion("keys", "list", *db)
    assert f"{key_id}\trevoked" in r.stdout
    # The key's making and its revocation are in the audit log, with who did each.
    shown = bastion("audit", "events", "--kind", "api_key.", "--json", *db)
    assert shown.returncode == 0, shown.stderr
    events = [json.loads(line) for line in shown.stdout.splitlines()]
    assert [(e["kind"], e["detail"]["key_id"], e["detail"]["actor"]) for e in events] == [
        ("api_key.created", key_id, cli_actor()),
        ("api_key.revoked", key_id, cli_actor()),
    ]
    assert events[0]["detail"]["scopes"] == ["admin"] and events[0]["detail"]["name"] == "ops"
    assert key.split("_", 2)[2] not in shown.stdout  # never the key


def test_admin_commands_refuse_a_database_that_is_not_there_and_create_none(tmp_path):
    """A mistyped --database must not make a new, empty store: `keys list` on it would say
    there are no keys, and `facts insert` write facts no server reads. Only the commands a
    deployment is set up with (keys create, policy push, users create, clients create) create
    the database, and they say so."""
    missing = tmp_path / "typo" / "k3.db"
    for command in (("keys", "list"), ("facts", "get"), ("policy", "versions")):
        r = bastion(*command, "--database", f"sqlite:///{missing}")
        assert r.returncode == 2, (command, r.stderr)
        assert r.stderr == f"bastion: no database at {missing} (bastion serve creates it);" + (
            " check --database, BASTION_DATABASE or database in the configuration\n"
        ), command
    r = bastion("facts", "insert", 'is_public(Repo{"x"})', "--database", str(tmp_path / "k3.db"))
    assert r.returncode == 2 and "no database at" in r.stderr
    r = bastion("keys", "list", "--database", "mysql://x/y")
    assert r.returncode == 2 and "not mysql://" in r.stderr
    r = bastion("keys", "list", "--database", str(tmp_path))
    assert r.returncode == 2 and "is a directory" in r.stderr
    assert list(tmp_path.iterdir()) == []

    new = tmp_path / "new.db"
    r = bastion("keys", "create", "--name", "admin", "--scope", "admin", "--database", str(new))
    assert r.returncode == 0 and f"no database at {new}; creating it" in r.stderr
    r = bastion("keys", "list", "--database", str(new))
    assert r.returncode == 0 and "\tactive\tadmin\tadmin" in r.stdout


def test_a_creating_command_refused_for_its_input_creates_no_database(tmp_path):
    """The commands that create the database check what they were given first: a refused key
    name, scope or lifetime, username or password, policy or client leaves no new store behind
    (nor says it is creating one)."""
    (tmp_path / "bad.polar").write_text("allow(x) if")
    config = str(QUICKSTART_CONFIG)
    refused = [
        (("keys", "create", "--name", " admin", "--scope", "admin"), ""),
        (("keys", "create", "--name", "a", "--scope", "admin", "--expires-in", "-5"), ""),
        (("users", "create", "bad\tname", "--password-stdin"), "long enough password\n"),
        (("users", "create", "ada", "--password-stdin"), "short\n"),
        (("policy", "push", str(tmp_path / "bad.polar")), ""),
        (
            (
                "clients",
                "create",
                "--name",
                "a",
                "--redirect-uri",
                "javascript:x",
                "--config",
                config,
            ),
            "",
        ),
    ]
    for n, (command, given) in enumerate(refused):
        store = tmp_path / f"store-{n}.db"
        r = bastion(*command, "--database", str(store), stdin=given)
        assert r.returncode == 2, (command, r.stderr)
        assert "creating it" not in r.stderr, (command, r.stderr)
        assert not store.exists(), command
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.polar"]


def test_an_empty_bastion_database_is_refused_not_taken_for_unset(tmp_path):
    r = bastion_process(
        "keys", "create", "--name", "a", "--scope", "admin", env={"BASTION_DATABASE": ""}
    )
    assert r.returncode == 2
    assert r.stderr == "bastion: BASTION_DATABASE is set but empty: give it a value, or unset it\n"


# Every command family with --database, as the error boundary of `bastion.cli.main` meets it.
FAMILIES = [
    ("keys", "list"),
    ("facts", "get"),
    ("facts", "snapshot", "out.snapshot"),
    ("policy", "versions"),
    ("changes", "prune"),
    ("users", "list"),
    ("clients", "list"),
    ("signing-keys", "list"),
    ("agents", "list"),
    ("agents", "suspend", "bot", "--minutes", "5"),
    ("audit", "tail"),
    ("audit", "events"),
    ("audit", "prune", "--older-than", "1"),
    ("approvals", "list"),
    ("signals", "list"),
    ("signals", "shadow-report"),
    ("alerts", "list"),
    ("tasks", "list"),
]


@pytest.mark.parametrize("command", FAMILIES, ids=" ".join)
def test_every_command_family_answers_a_bad_database_in_one_line_and_exit_2(
    command, tmp_path, capsys, monkeypatch
):
    from bastion.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BASTION_CONFIG", str(tmp_path / "absent.toml"))
    for database, says in (
        (str(tmp_path / "absent" / "bastion.db"), "no database at"),
        (str(tmp_path), "is a directory"),
        ("mysql://x/y", "not mysql://"),
    ):
        assert main([*command, "--database", database]) == 2, database
        err = capsys.readouterr().err
        assert err.startswith("bastion: ") and says in err, err
        assert err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("content", "says"),
    [(b"\xff\xfe[server]\n", "not UTF-8 text"), (None, "Is a directory")],
)
def test_a_configuration_file_that_cannot_be_read_is_named_in_one_line(
    content, says, tmp_path, capsys
):
    from bastion.cli import main

    config = tmp_path / "bastion.toml"
    if content is None:
        config.mkdir()
    else:
        config.write_bytes(content)
    for command in (("keys", "list"), ("agents", "list"), ("audit", "tail"), ("serve",)):
        assert main([*command, "--config", str(config)]) == 2, command
        err = capsys.readouterr().err
        assert err.startswith(f"bastion: {config}: ") and says in err, err
        assert err.count("\n") == 1, err


def test_an_unreachable_postgresql_is_an_answer_not_a_traceback(capsys):
    from bastion.cli import main

    for command in (("audit", "tail"), ("agents", "list"), ("keys", "list")):
        assert main([*command, "--database", "postgresql://bastion@127.0.0.1:9/x"]) == 2
        last = capsys.readouterr().err.splitlines()[-1]
        assert last.startswith("bastion: the database is unavailable"), command


def test_audit_tail_lines_is_a_bounded_whole_number(capsys):
    from bastion.cli import main

    with pytest.raises(SystemExit) as refused:
        main(["audit", "tail", "-n", "99999999999999999999"])
    assert refused.value.code == 2
    assert "give a whole number from 0 to" in capsys.readouterr().err


def test_keys_create_refuses_a_name_that_would_forge_a_line_of_keys_list(tmp_path):
    database = str(tmp_path / "bastion.db")
    r = bastion("keys", "create", "--name", "a\nb", "--scope", "admin", "--database", database)
    assert r.returncode == 2
    assert r.stderr.endswith(
        "bastion: a key's name is 1 to 128 printable characters without surrounding spaces\n"
    )
    assert r.stdout == ""


def test_keys_create_refuses_a_name_in_fullwidth_letters(tmp_path):
    database = str(tmp_path / "bastion.db")
    r = bastion(
        "keys", "create", "--name", "\uff53taging", "--scope", "admin", "--database", database
    )
    assert r.returncode == 2
    assert r.stderr.endswith(
        "bastion: a key's name has compatibility characters that Unicode's NFKC changes"
        " (\\uff53taging is staging)\n"
    )
    assert r.stdout == ""


def test_policy_push_strict_refuses_a_misspelt_guardrail_locally_and_remotely(
    sqlite_url, tmp_path, serve
):
    misspelt = tmp_path / "misspelt.polar"
    misspelt.write_text(
        POLICY + "declare is_blocked(User);\ndeny(u: User, _a, _r) if is_blokced(u);\n"
    )
    db = ["--database", sqlite_url]
    r = bastion("policy", "push", "--strict", str(misspelt), *db)
    assert r.returncode != 0 and "is_blokced" in r.stderr and "nothing changed" in r.stderr
    good = tmp_path / "p.polar"
    good.write_text(POLICY)
    assert bastion("policy", "push", str(good), *db).returncode == 0
    server = serve(sqlite_url)
    remote = ["--url", server.url, "--api-key", ADMIN_KEY]
    r = bastion("policy", "push", "--strict", str(misspelt), *remote)
    assert r.returncode != 0 and "is_blokced" in r.stderr
    with Client(server.url, ADMIN_KEY) as client:
        assert client.policy()["version"] == 1
        with pytest.raises(RemoteError, match="is_blokced"):
            client.load_policy(misspelt.read_text(), strict=True)
    # Not strict: in force, and the warning printed, on the server as on the local store.
    r = bastion("policy", "push", str(misspelt), *remote)
    assert r.returncode == 0 and "warning: is_blokced/1" in r.stderr, r.stderr
    assert "policy version 2 is in force" in r.stderr


def test_json_a_command_reads_is_held_to_the_limits_of_a_request_body(tmp_path):
    """JSON given on the command line or in a file (explain's --context and JSON-lines facts,
    a signal's value, a client's --jwks-file) is read as the API reads a body: nested past the
    limit, or holding NUL, it is one line and exit 2, never a RecursionError's traceback, and
    nothing is written. explain's context is an object, as the API's is."""
    from bastion.facts.store import FactStore
    from tests.signals.test_api import POLICY as SIGNALS_POLICY

    deep = "[" * 5000 + "]" * 5000
    (tmp_path / "deep.jsonl").write_text(deep + "\n")
    (tmp_path / "deep.jwks.json").write_text(deep)
    database = str(tmp_path / "bastion.db")
    store = FactStore.open(database)
    store.put_policy(SIGNALS_POLICY)
    store.close()
    gitclub = str(Path(QUICKSTART_CONFIG).parents[1] / "gitclub.polar")
    db = ("--database", database)
    explain = ("policy", "explain", gitclub, "User:alice", "read", "Repository:anvil")
    refused = [
        ((*explain, "--context", deep), "deeper than"),
        ((*explain, "--context", '{"ip": "\\u0000"}'), "NUL"),
        ((*explain, "--context", "[1]"), "--context"),
        ((*explain, "--facts", str(tmp_path / "deep.jsonl")), "deeper than"),
        (
            ("signals", "set", "User:sam", "device_compliant", deep, "--source", "mdm", *db),
            "256",
        ),
        (
            (
                "clients",
                "create",
                "--name",
                "nightly",
                "--jwks-file",
                str(tmp_path / "deep.jwks.json"),
                "--config",
                str(QUICKSTART_CONFIG),
                *db,
            ),
            "deeper than",
        ),
    ]
    for command, says in refused:
        r = bastion(*command)
        assert r.returncode == 2, (command[:3], r.stderr[-300:])
        assert r.stderr.startswith("bastion: ") and says in r.stderr, (command[:3], r.stderr)
        assert r.stderr.count("\n") == 1, (command[:3], r.stderr[-300:])
    store = FactStore.open(database)
    try:
        assert store.get(("signal", None, None, None, None, None)) == []
        assert store.head() == 1  # the policy; nothing after it
    finally:
        store.close()
    r = bastion("clients", "list", "--json", *db)
    assert r.returncode == 0 and json.loads(r.stdout) == [], r.stderr


def test_an_id_that_names_nothing_is_one_line_and_exit_2_in_every_command(
    database_url, tmp_path, capsys, monkeypatch
):
    """A key, user, client, agent, suspension, task, decision record, alert or connection that
    is not there is the same class of error whichever command met it: `bastion: ...` on stderr,
    exit 2, nothing on stdout and nothing written. (Some said it with exit 1, the code that
    `policy check` and `policy test` give a policy that fails, so a script could not tell.)"""
    from bastion.cli import main
    from bastion.facts.store import FactStore

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BASTION_CONFIG", str(tmp_path / "absent.toml"))
    db = ("--database", database_url)
    assert main(["keys", "create", "--name", "admin", "--scope", "admin", *db]) == 0
    config = tmp_path / "per_user.toml"
    config.write_text(
        f'[oauth]\nissuer = "https://auth.example.com"\nkey_dir = "{tmp_path / "keys"}"\n'
        '[[oauth.resources]]\nuri = "https://mcp.example.com/mcp"\nscopes = ["tools:read"]\n'
        '[[gateway.upstreams]]\nname = "up"\nurl = "https://up.example.com/mcp"\n'
        'auth = "per_user"\noauth = { scopes = ["tools:read"] }\n'
    )
    capsys.readouterr()
    store = FactStore.open(database_url)
    head = store.head()
    store.close()
    for command in (
        ("keys", "revoke", "nosuch"),
        ("users", "disable", "nosuch"),
        ("clients", "revoke", "nosuch"),
        ("agents", "show", "nosuch"),
        ("agents", "resume", "nosuch"),
        ("tasks", "end", "nosuch"),
        ("audit", "show", "nosuch"),
        ("alerts", "show", "nosuch"),
        ("alerts", "ack", "nosuch", "--as", "ops"),
        ("connections", "revoke", "sam", "up", "--config", str(config)),
        ("tools", "show", "up", "nosuch"),
        ("prompts", "show", "up", "nosuch"),
        ("tools", "accept", "up", "nosuch", "--digest", "0" * 64),
    ):
        assert main([*command, *db]) == 2, command
        out, err = capsys.readouterr()
        assert err.startswith("bastion: ") and err.count("\n") == 1, (command, err)
        assert "nosuch" in err or "sam" in err, (command, err)
        assert out == "", command
    store = FactStore.open(database_url)
    try:
        assert store.head() == head
    finally:
        store.close()


def test_suspending_an_agent_bastion_does_not_know_is_refused_unless_said_so(
    database_url, tmp_path, capsys, monkeypatch
):
    """A mistyped client id must not look like a kill switch that holds: `agents suspend` of
    an id no registered client has is refused, naming the flag for an agent that another
    issuer names (a trusted issuer's agent_claims); a registered client and a client id
    metadata document (an https URL, never registered) are suspended as before."""
    from bastion.cli import main
    from bastion.facts.store import FactStore
    from bastion.signals.suspensions import stored

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BASTION_CONFIG", str(tmp_path / "absent.toml"))
    db = ("--database", database_url)
    config = tmp_path / "bastion.toml"
    config.write_text(
        f'[oauth]\nissuer = "https://auth.example.com"\nkey_dir = "{tmp_path / "keys"}"\n'
        '[[oauth.resources]]\nuri = "https://mcp.example.com/mcp"\nscopes = ["tools:read"]\n'
    )
    assert (
        main(
            ["clients", "create", "--name", "desk", "--confidential", "--config", str(config), *db]
        )
        == 0
    )
    desk = json.loads(capsys.readouterr().out)["client_id"]

    assert main(["agents", "suspend", desk + "x", *db]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert f"no agent (OAuth client) {desk + 'x'!r}" in err and "--unregistered" in err
    store = FactStore.open(database_url)
    assert stored(store) == []
    store.close()

    assert main(["agents", "suspend", desk, *db]) == 0
    assert main(["agents", "suspend", "https://agent.example.com/client.json", *db]) == 0
    assert main(["agents", "suspend", "corp-azp-7", "--unregistered", *db]) == 0
    assert main(["agents", "suspend", "sam", "--kind", "user", *db]) == 0
    store = FactStore.open(database_url)
    try:
        assert sorted(s.id for s in stored(store)) == sorted(
            [desk, "https://agent.example.com/client.json", "corp-azp-7", "sam"]
        )
    finally:
        store.close()
