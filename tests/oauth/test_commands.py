"""The admin CLI: ``bastion users``, ``bastion clients`` and ``bastion signing-keys``."""

from __future__ import annotations

import io
import json
import sys
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from argon2 import PasswordHasher

from bastion.audit.actor import cli_actor
from bastion.cli import main
from bastion.db import Database
from bastion.oauth.errors import InvalidToken
from bastion.oauth.store import OAuthStore
from bastion.oauth.users import check_password

from .support import PASSWORD, pkce_pair, running_bastion


def run(capsys, monkeypatch, *argv: str, stdin: str = "") -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_config(tmp_path, database: str) -> str:
    path = tmp_path / "bastion.toml"
    path.write_text(
        f"""
[server]
database = "{database}"

[oauth]
issuer = "https://auth.example.com"
key_dir = "{tmp_path / "keys"}"

[[oauth.resources]]
uri = "https://mcp.example.com/mcp"
scopes = ["tools:read", "tools:call"]
"""
    )
    return str(path)


@pytest.mark.real_password_hashing
def test_users_create_list_disable(capsys, monkeypatch, sqlite_url):
    code, out, _ = run(
        capsys,
        monkeypatch,
        "users",
        "create",
        "bob",
        "--password-stdin",
        "--database",
        sqlite_url,
        stdin="a long enough password\n",
    )
    assert code == 0 and "bob" in out
    store = OAuthStore(Database(sqlite_url))
    assert check_password(store, "bob", "a long enough password")
    assert not check_password(store, "bob", "another password")
    stored = store.db.execute("SELECT password_hash FROM oauth_users")[0][0]
    assert stored.startswith("$argon2id$") and "a long enough password" not in stored
    assert not PasswordHasher().check_needs_rehash(stored)  # the library's current parameters
    code, _, err = run(
        capsys,
        monkeypatch,
        "users",
        "create",
        "bob",
        "--password-stdin",
        "--database",
        sqlite_url,
        stdin="a long enough password\n",
    )
    assert code == 2 and "already exists" in err
    code, _, err = run(
        capsys,
        monkeypatch,
        "users",
        "create",
        "eve",
        "--password-stdin",
        "--database",
        sqlite_url,
        stdin="short\n",
    )
    assert code == 2 and "at least 8" in err
    code, out, _ = run(capsys, monkeypatch, "users", "list", "--database", sqlite_url)
    assert "bob" in out and "active" in out
    code, _, _ = run(capsys, monkeypatch, "users", "disable", "bob", "--database", sqlite_url)
    assert code == 0
    assert not check_password(store, "bob", "a long enough password")


def test_set_password_ends_the_sessions_grants_and_tokens_the_old_password_let_in(
    capsys, monkeypatch, database_url, tmp_path
):
    """A password is reset after a suspected takeover: whoever took over holds a browser
    session, and agents hold grants and tokens, all from the old password."""
    with running_bastion(database_url, tmp_path) as bastion:
        client = bastion.register()
        browser = httpx.Client(follow_redirects=False, timeout=10)
        verifier, challenge = pkce_pair()
        params = bastion.authorize_params(client, challenge)
        redirect = bastion.log_in_and_consent(
            f"{bastion.url}/authorize?{urlencode(params)}", browser
        )
        code = parse_qs(urlsplit(redirect.headers["location"]).query)["code"][0]
        tokens = bastion.token(
            grant_type="authorization_code",
            code=code,
            redirect_uri=client["redirect_uris"][0],
            code_verifier=verifier,
            client_id=client["client_id"],
        ).json()
        assert bastion.server.verifier.verify(tokens["access_token"], bastion.resource)

        new_password = "a new password after the takeover"
        code, out, err = run(
            capsys,
            monkeypatch,
            *("users", "set-password", "alice", "--password-stdin"),
            *("--database", bastion.db.url),
            stdin=f"{new_password}\n",
        )
        assert code == 0, err

        with pytest.raises(InvalidToken, match="revoked"):
            bastion.server.verifier.verify(tokens["access_token"], bastion.resource)
        refreshed = bastion.token(
            grant_type="refresh_token",
            refresh_token=tokens["refresh_token"],
            client_id=client["client_id"],
        )
        assert refreshed.status_code == 400 and refreshed.json()["error"] == "invalid_grant"
        # The old browser session gets no code: the sign-in form again.
        _, challenge = pkce_pair()
        params = bastion.authorize_params(client, challenge, state="after-the-reset")
        page = browser.get(f"{bastion.url}/authorize?{urlencode(params)}")
        assert page.status_code == 200 and "name=password" in page.text, page.headers
        assert bastion.db.execute("SELECT COUNT(*) FROM oauth_sessions")[0][0] == 0
        # The old password no longer signs in; the new one does.
        assert not check_password(bastion.server.store, "alice", PASSWORD)
        assert check_password(bastion.server.store, "alice", new_password)


@pytest.mark.parametrize("name", ["avery\u3164", "av\u034fery", "avery\ufe0f", "a  very"])
def test_a_username_that_would_read_as_another_is_refused_and_creates_nothing(
    capsys, monkeypatch, sqlite_url, name
):
    """Printable to Python, yet shown blank (a Hangul filler, a grapheme joiner, a variation
    selector, a second space): each would read as another user on every page and line."""
    OAuthStore(Database(sqlite_url))
    code, _, err = run(
        capsys,
        monkeypatch,
        *("users", "create", name, "--password-stdin", "--database", sqlite_url),
        stdin="a long enough password\n",
    )
    assert code == 2 and "printable characters" in err
    assert Database(sqlite_url).execute("SELECT COUNT(*) FROM oauth_users")[0][0] == 0


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("\u0430very", "mixes scripts in one word (Latin and Cyrillic: \\u0430very)"),
        ("\uff53am", "has compatibility characters that Unicode's NFKC changes"),
        ("Jose\u0301", "is not in Unicode's normal form NFC (write Jose\\u0301 as Jos\\u00e9)"),
    ],
)
def test_a_username_that_looks_like_another_is_refused_saying_why_and_creates_nothing(
    capsys, monkeypatch, sqlite_url, name, problem
):
    """``аvery`` with a Cyrillic а, a fullwidth ``ｓam``, ``José`` spelt as e and a combining
    accent: each reads as another user (avery, sam, the José in NFC) wherever it is shown."""
    OAuthStore(Database(sqlite_url))
    code, _, err = run(
        capsys,
        monkeypatch,
        *("users", "create", name, "--password-stdin", "--database", sqlite_url),
        stdin="a long enough password\n",
    )
    assert code == 2 and f"a username {problem}" in err
    assert Database(sqlite_url).execute("SELECT COUNT(*) FROM oauth_users")[0][0] == 0


@pytest.mark.parametrize("name", ["Борис", "田中", "José", "Γιώργος"])
def test_a_username_in_one_script_is_created(capsys, monkeypatch, sqlite_url, name):
    OAuthStore(Database(sqlite_url))
    code, out, err = run(
        capsys,
        monkeypatch,
        *("users", "create", name, "--password-stdin", "--database", sqlite_url),
        stdin="a long enough password\n",
    )
    assert code == 0, err
    assert Database(sqlite_url).execute("SELECT username FROM oauth_users") == [(name,)]


def test_set_password_of_an_unknown_user_changes_nothing(capsys, monkeypatch, sqlite_url):
    OAuthStore(Database(sqlite_url))
    code, _, err = run(
        capsys,
        monkeypatch,
        *("users", "set-password", "nobody", "--password-stdin", "--database", sqlite_url),
        stdin="a long enough password\n",
    )
    assert code == 2 and "no user 'nobody'" in err
    assert Database(sqlite_url).execute("SELECT COUNT(*) FROM oauth_user_revocations")[0][0] == 0


def test_users_enable_refuses_an_unknown_or_enabled_user_and_changes_nothing(
    capsys, monkeypatch, sqlite_url
):
    store = OAuthStore(Database(sqlite_url))
    store.create_user("bob", "x", 1.0, actor="test")
    before = store.db.execute("SELECT * FROM oauth_users")
    for name, error in (("nobody", "no user 'nobody'"), ("bob", "user 'bob' is not disabled")):
        code, _, err = run(capsys, monkeypatch, "users", "enable", name, "--database", sqlite_url)
        assert code == 2 and error in err
    assert store.db.execute("SELECT * FROM oauth_users") == before
    assert store.db.execute("SELECT COUNT(*) FROM oauth_user_revocations")[0][0] == 0
    run(capsys, monkeypatch, "users", "disable", "bob", "--database", sqlite_url)
    code, out, _ = run(capsys, monkeypatch, "users", "enable", "bob", "--database", sqlite_url)
    assert code == 0 and "enabled bob" in out
    assert store.user_state("bob") == "enabled"
    code, _, err = run(capsys, monkeypatch, "users", "enable", "bob", "--database", sqlite_url)
    assert code == 2 and "not disabled" in err


def test_clients_create_list_revoke(capsys, monkeypatch, sqlite_url, tmp_path):
    config = write_config(tmp_path, sqlite_url)
    code, out, err = run(
        capsys,
        monkeypatch,
        "clients",
        "create",
        "--name",
        "Nightly agent",
        "--confidential",
        "--scope",
        "tools:read",
        "--config",
        config,
    )
    assert code == 0, err
    created = json.loads(out)
    assert created["client_secret"] and created["grant_types"] == ["client_credentials"]
    code, out, _ = run(capsys, monkeypatch, "clients", "list", "--json", "--config", config)
    listed = json.loads(out)
    assert [c["client_id"] for c in listed] == [created["client_id"]]
    assert created["client_secret"] not in out
    code, out, _ = run(
        capsys, monkeypatch, "clients", "revoke", created["client_id"], "--config", config
    )
    assert code == 0
    code, out, _ = run(capsys, monkeypatch, "clients", "list", "--config", config)
    assert "revoked" in out
    code, _, err = run(capsys, monkeypatch, "clients", "revoke", "nobody", "--config", config)
    assert code == 2 and "no active client" in err


def test_clients_create_refuses_bad_metadata(capsys, monkeypatch, sqlite_url, tmp_path):
    config = write_config(tmp_path, sqlite_url)
    code, _, err = run(
        capsys,
        monkeypatch,
        "clients",
        "create",
        "--name",
        "x",
        "--redirect-uri",
        "http://example.com/cb",
        "--config",
        config,
    )
    assert code == 2 and "https" in err
    code, _, err = run(
        capsys,
        monkeypatch,
        "clients",
        "create",
        "--name",
        "x",
        "--confidential",
        "--scope",
        "admin",
        "--config",
        config,
    )
    assert code == 2 and "admin" in err


def test_a_user_cannot_take_the_name_of_a_client(capsys, monkeypatch, sqlite_url, tmp_path):
    # A client credentials token's subject is its client id: a person of that name would be
    # the same User{<client id>} as the agent acting as itself, sharing its roles and state.
    config = write_config(tmp_path, sqlite_url)
    code, out, err = run(
        capsys,
        monkeypatch,
        "clients",
        "create",
        "--name",
        "Nightly",
        "--confidential",
        "--config",
        config,
    )
    assert code == 0, err
    client_id = json.loads(out)["client_id"]
    code, _, err = run(
        capsys,
        monkeypatch,
        "users",
        "create",
        client_id,
        "--password-stdin",
        "--config",
        config,
        stdin="a long enough password\n",
    )
    assert code == 2 and "is the id of a client" in err
    assert OAuthStore(Database(sqlite_url)).user_state(client_id) is None


def test_signing_keys_rotate_and_list(capsys, monkeypatch, sqlite_url, tmp_path):
    config = write_config(tmp_path, sqlite_url)
    Database(sqlite_url).close()  # as `bastion serve` leaves it: rotate creates no database
    code, out, _ = run(capsys, monkeypatch, "signing-keys", "rotate", "--config", config)
    assert code == 0
    run(capsys, monkeypatch, "signing-keys", "rotate", "--config", config)
    code, out, _ = run(capsys, monkeypatch, "signing-keys", "list", "--config", config)
    lines = out.strip().splitlines()
    assert len(lines) == 2 and "signing" in lines[0] and "retired" in lines[1]
    assert "PRIVATE" not in out


def test_signing_keys_retire_withdraws_a_previous_key_and_refuses_the_key_that_signs(
    capsys, monkeypatch, sqlite_url, tmp_path
):
    config = write_config(tmp_path, sqlite_url)
    Database(sqlite_url).close()  # as `bastion serve` leaves it: rotate creates no database
    run(capsys, monkeypatch, "signing-keys", "rotate", "--config", config)
    run(capsys, monkeypatch, "signing-keys", "rotate", "--config", config)
    _, listed, _ = run(capsys, monkeypatch, "signing-keys", "list", "--config", config)
    current, previous = (line.split("\t")[0] for line in listed.strip().splitlines())

    code, out, err = run(
        capsys, monkeypatch, "signing-keys", "retire", "--config", config, "--", current
    )
    assert code == 2 and "rotate" in err and not out
    code, _, err = run(
        capsys, monkeypatch, "signing-keys", "retire", "--config", config, "--", "nope"
    )
    assert code == 2 and "no signing key 'nope'" in err
    assert run(capsys, monkeypatch, "signing-keys", "list", "--config", config)[1] == listed

    code, out, _ = run(
        capsys, monkeypatch, "signing-keys", "retire", "--config", config, "--", previous
    )
    assert code == 0 and f"retired signing key {previous}" in out and "stop working" in out
    _, listed, _ = run(capsys, monkeypatch, "signing-keys", "list", "--config", config)
    assert [line.split("\t")[0] for line in listed.strip().splitlines()] == [current]
    assert sorted(p.name for p in (tmp_path / "keys").glob("*.pem")) == [f"{current}.pem"]


def test_a_confidential_client_with_a_redirect_uri_gets_the_authorization_code_grant(
    capsys, monkeypatch, sqlite_url, tmp_path
):
    config = write_config(tmp_path, sqlite_url)
    code, out, _ = run(
        capsys,
        monkeypatch,
        "clients",
        "create",
        "--name",
        "Web agent",
        "--confidential",
        "--redirect-uri",
        "https://agent.example.com/callback",
        "--config",
        config,
    )
    assert code == 0
    client = json.loads(out)
    assert client["grant_types"] == ["authorization_code", "refresh_token"]
    assert client["redirect_uris"] == ["https://agent.example.com/callback"]
    assert client["client_secret"]
    # Without a redirect URI, a confidential client acts as itself.
    code, out, _ = run(
        capsys, monkeypatch, "clients", "create", "--name", "Nightly", "--confidential",
        "--config", config,
    )  # fmt: skip
    assert code == 0 and json.loads(out)["grant_types"] == ["client_credentials"]


def test_a_redirect_uri_without_the_authorization_code_grant_is_refused(
    capsys, monkeypatch, sqlite_url, tmp_path
):
    config = write_config(tmp_path, sqlite_url)
    code, _, err = run(
        capsys, monkeypatch, "clients", "create", "--name", "x", "--confidential",
        "--grant-type", "client_credentials", "--redirect-uri", "https://agent.example.com/cb",
        "--config", config,
    )  # fmt: skip
    assert code == 2 and "--grant-type authorization_code" in err
    assert OAuthStore(Database(sqlite_url)).clients() == []


def test_a_client_for_id_jags_is_created_only_where_identity_providers_are_configured(
    capsys, monkeypatch, sqlite_url, tmp_path
):
    config = write_config(tmp_path, sqlite_url)
    grant = "urn:ietf:params:oauth:grant-type:jwt-bearer"
    create = ("clients", "create", "--name", "Enterprise agent", "--confidential",
              "--grant-type", grant, "--config", config)  # fmt: skip
    code, _, err = run(capsys, monkeypatch, *create)
    assert code == 2 and "not supported" in err
    with open(config, "a") as file:
        file.write('\n[[oauth.id_jag.issuers]]\nissuer = "https://acme.okta.com"\n')
    code, out, _ = run(capsys, monkeypatch, *create)
    assert code == 0 and json.loads(out)["grant_types"] == [grant]


def test_clients_create_refuses_a_redirect_uri_outside_rfc_3986(
    capsys, monkeypatch, sqlite_url, tmp_path
):
    config = write_config(tmp_path, sqlite_url)
    for uri in ("http://127.0.0.1:9/cb\x01", "https://agent.example.com/c b"):
        code, _, err = run(
            capsys, monkeypatch, "clients", "create", "--name", "x", "--redirect-uri", uri,
            "--config", config,
        )  # fmt: skip
        assert code == 2 and "RFC 3986" in err
    assert OAuthStore(Database(sqlite_url)).clients() == []


def audit_events(capsys, monkeypatch, database: str, kind: str = "") -> list[dict]:
    """The audit events as ``bastion audit events --json`` prints them, oldest first."""
    code, out, err = run(
        capsys, monkeypatch, "audit", "events", "--json", "--kind", kind, "--database", database
    )
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


def test_each_admin_change_to_users_clients_and_signing_keys_is_in_the_audit_log(
    capsys, monkeypatch, database_url, tmp_path
):
    config = write_config(tmp_path, database_url)
    admin = cli_actor()
    assert admin.startswith("cli:")
    password = "a long enough password\n"
    for argv in (
        ("users", "create", "bob", "--password-stdin"),
        ("users", "set-password", "bob", "--password-stdin"),
        ("users", "disable", "bob"),
        ("users", "enable", "bob"),
    ):
        code, _, err = run(capsys, monkeypatch, *argv, "--config", config, stdin=password)
        assert code == 0, err
    code, out, err = run(
        capsys, monkeypatch, "clients", "create", "--name", "Nightly agent", "--confidential",
        "--scope", "tools:read", "--config", config,
    )  # fmt: skip
    assert code == 0, err
    client = json.loads(out)
    assert (
        run(capsys, monkeypatch, "clients", "revoke", client["client_id"], "--config", config)[0]
        == 0
    )
    for _ in range(2):
        assert run(capsys, monkeypatch, "signing-keys", "rotate", "--config", config)[0] == 0
    _, listed, _ = run(capsys, monkeypatch, "signing-keys", "list", "--config", config)
    current, previous = (line.split("\t")[0] for line in listed.strip().splitlines())
    assert (
        run(capsys, monkeypatch, "signing-keys", "retire", "--config", config, "--", previous)[0]
        == 0
    )

    events = audit_events(capsys, monkeypatch, database_url)
    assert [(e["kind"], e["subject"], e["client_id"]) for e in events] == [
        ("user.created", "bob", None),
        ("user.password_changed", "bob", None),
        ("user.disabled", "bob", None),
        ("user.enabled", "bob", None),
        ("client.registered", None, client["client_id"]),
        ("client.revoked", None, client["client_id"]),
        ("signing_key.rotated", None, None),
        ("signing_key.rotated", None, None),
        ("signing_key.retired", None, None),
    ]
    assert all(e["detail"]["actor"] == admin for e in events)
    detail = [e["detail"] for e in events]
    assert detail[1]["grants_revoked"] == 0 and detail[2]["grants_revoked"] == 0
    assert detail[4]["client_name"] == "Nightly agent"
    assert detail[4]["auth_method"] == "client_secret_basic"
    assert detail[5]["grants_revoked"] == 0
    assert (detail[6]["kid"], detail[6]["previous"]) == (previous, [])
    assert (detail[7]["kid"], detail[7]["previous"]) == (current, [previous])
    assert detail[8] == {"kid": previous, "tokens_revoked": 0, "actor": admin}
    # Never a password, a hash or a secret.
    stored = json.dumps(events)
    assert "argon2" not in stored and "long enough" not in stored
    assert client["client_secret"] not in stored


def _signed_in_grant(bastion) -> tuple[dict, dict]:
    """A client and the tokens alice gave it (authorization code, PKCE)."""
    client = bastion.register()
    return client, bastion.tokens_for(client)


def test_each_grant_an_admin_change_revokes_is_in_the_audit_log_once_with_its_reason(
    capsys, monkeypatch, database_url, tmp_path
):
    admin = cli_actor()
    with running_bastion(database_url, tmp_path) as bastion:
        revoked_with_the_client, _ = _signed_in_grant(bastion)
        database = ("--database", bastion.db.url)
        argv = ("clients", "revoke", revoked_with_the_client["client_id"], *database)
        assert run(capsys, monkeypatch, *argv)[0] == 0
        revoked_with_the_user, _ = _signed_in_grant(bastion)
        assert run(capsys, monkeypatch, "users", "disable", "alice", *database)[0] == 0
        # A refresh token the client itself revokes (RFC 7009): the client is the actor.
        assert run(capsys, monkeypatch, "users", "enable", "alice", *database)[0] == 0
        by_client, tokens = _signed_in_grant(bastion)
        answer = bastion.http.post(
            f"{bastion.url}/revoke",
            data={"token": tokens["refresh_token"], "client_id": by_client["client_id"]},
        )
        assert answer.status_code == 200

        events = audit_events(capsys, monkeypatch, bastion.db.url, "grant.")
    assert [
        (e["client_id"], e["subject"], e["detail"]["reason"], e["detail"]["actor"]) for e in events
    ] == [
        (revoked_with_the_client["client_id"], "alice", "client revoked", admin),
        (revoked_with_the_user["client_id"], "alice", "user disabled", admin),
        (
            by_client["client_id"],
            "alice",
            "refresh token revoked by client",
            f"client:{by_client['client_id']}",
        ),
    ]
    assert all(e["kind"] == "grant.revoked" and e["detail"]["grant_id"] for e in events)
    assert all(e["detail"]["delegated_revoked"] == 0 for e in events)
