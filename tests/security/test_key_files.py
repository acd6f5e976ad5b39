"""The deployment's key files (the connection keys, each signing key's private half, the
deployment secrets) are put in place whole or not at all: a write that fails part way (a full
disk, a failed fsync, a crash) leaves no part of a key under the file's name, for the next start
to read as a key or to fail on without saying why. One found empty, cut short or missing where
the database holds what it sealed is refused, naming the file and what to do; never replaced."""

from __future__ import annotations

import errno
import functools
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from bastion.connections.sealing import KEY_FILE, ConnectionKeysError, load_keys
from bastion.connections.service import connections_from_config
from bastion.connections.settings import UpstreamOAuth
from bastion.connections.store import ConnectionStore, StoredConnection
from bastion.db import Database
from bastion.oauth.keys import ARGUMENT_DIGEST_KEY, KeyRing, SigningKeyError, deployment_secret
from bastion.oauth.store import OAuthStore


def _connection_keys(key_dir: Path) -> Path:
    load_keys(key_dir, env={})
    return key_dir / KEY_FILE


@functools.cache
def signing_key_rows(key_dir: Path) -> OAuthStore:
    """Where the signing keys' rows go: a database beside ``key_dir`` (what is tried here is the
    key file), opened before a test limits how large files may grow."""
    return OAuthStore(Database(str(key_dir.parent / f"{key_dir.name}-rows.db")))


def _signing_key(key_dir: Path) -> Path:
    kid = KeyRing(signing_key_rows(key_dir), key_dir, retain_seconds=60, clock=time.time).rotate(
        actor="test"
    )
    return key_dir / f"{kid}.pem"


def _deployment_secret(key_dir: Path) -> Path:
    deployment_secret(key_dir, ARGUMENT_DIGEST_KEY)
    return key_dir / ARGUMENT_DIGEST_KEY


WRITERS = {
    "connection-keys": _connection_keys,
    "signing key": _signing_key,
    "deployment secret": _deployment_secret,
}


@pytest.mark.parametrize("writer", WRITERS)
def test_a_key_whose_fsync_fails_is_not_left_under_its_name(tmp_path, monkeypatch, writer):
    """Written but not known to be on disk: a crash now could leave it empty or cut short, so
    it is not put under its name (a rename or link comes after the fsync, never before)."""
    key_dir = tmp_path / "keys"
    key_dir.mkdir(mode=0o700)

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "fsync failed (as the test asked)")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="fsync failed"):
        WRITERS[writer](key_dir)
    monkeypatch.undo()
    assert [p.name for p in key_dir.iterdir()] == []  # neither the key nor a draft of it


@pytest.mark.parametrize("writer", WRITERS)
def test_a_key_cut_short_by_a_full_disk_is_not_left_under_its_name(tmp_path, writer):
    """A real short write: the writer runs in a process whose files may not grow past 20 bytes
    (RLIMIT_FSIZE; the write past it fails with EFBIG), as on a full disk."""
    key_dir = tmp_path / "keys"
    key_dir.mkdir(mode=0o700)
    code = textwrap.dedent(
        f"""
        import resource, signal, sys
        from pathlib import Path
        from tests.security.test_key_files import WRITERS, signing_key_rows

        signing_key_rows(Path({str(key_dir)!r}))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20, 20))
        try:
            WRITERS[{writer!r}](Path({str(key_dir)!r}))
        except OSError as e:
            sys.exit(f"refused: {{e}}")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and "refused:" in done.stderr, done.stderr
    assert "File too large" in done.stderr, done.stderr
    assert [p.name for p in key_dir.iterdir()] == []  # neither part of the key nor a draft


# -- a damaged or missing key file is refused, with its path and what to do ----------------------

PER_USER = {"tracker": ("http://127.0.0.1:9/mcp", UpstreamOAuth())}


def _connected(database_url: str) -> None:
    """A user's connection stored, sealed under keys the test then takes away."""
    db = Database(database_url)
    try:
        row = StoredConnection("alice", "tracker", "sealed-under-the-lost-key", "", 1.0, 1.0, 1.0)
        ConnectionStore(db).put(row)
    finally:
        db.close()


def _open_connections(database_url: str, key_dir: Path):
    db = Database(database_url)
    try:
        return connections_from_config(db, PER_USER, key_dir, "https://b")
    finally:
        db.close()


@pytest.mark.parametrize(
    ("content", "said"),
    [
        ("", "holds no connection key"),
        ("\n  \n", "holds no connection key"),
        (Fernet.generate_key().decode()[:20] + "\n", "key 1 is not a Fernet key"),
        (Fernet.generate_key().decode() + "\n" + Fernet.generate_key().decode()[:30], "key 2"),
    ],
    ids=["empty", "blank", "cut short", "second key cut short"],
)
def test_a_damaged_connection_keys_file_is_refused_with_its_path(tmp_path, content, said):
    path = tmp_path / KEY_FILE
    path.write_text(content)
    with pytest.raises(ConnectionKeysError) as refused:
        load_keys(tmp_path, env={})
    message = str(refused.value)
    assert str(path) in message and said in message
    assert "restore it from a backup" in message
    assert path.read_text() == content  # never replaced


def test_a_missing_connection_keys_file_is_not_made_again_over_stored_connections(
    database_url, tmp_path
):
    """A new key would open none of the stored tokens: every user would be sent to connect
    again, with no word of why. The start is refused instead, saying what to do."""
    _connected(database_url)
    with pytest.raises(ConnectionKeysError) as refused:
        _open_connections(database_url, tmp_path / "keys")
    message = str(refused.value)
    assert str(tmp_path / "keys" / KEY_FILE) in message and "is missing" in message
    assert "restore it from a backup" in message
    assert "bastion connections revoke" in message
    assert not (tmp_path / "keys" / KEY_FILE).exists()


def test_without_stored_connections_a_missing_connection_keys_file_is_made(database_url, tmp_path):
    _open_connections(database_url, tmp_path / "keys")
    assert len(load_keys(tmp_path / "keys", env={})) == 1


def test_a_server_whose_connection_keys_are_missing_does_not_start(tmp_path):
    from bastion.server.app import create_app
    from bastion.server.config import ConfigError, ServerConfig

    database = str(tmp_path / "bastion.db")
    _connected(database)
    base = "http://127.0.0.1:9"
    config = ServerConfig(
        database=database,
        oauth={
            "issuer": base,
            "key_dir": str(tmp_path / "keys"),
            "resources": [{"uri": f"{base}/mcp/tracker"}],
        },
        gateway={"upstreams": [{"name": "tracker", "url": f"{base}/mcp/up", "auth": "per_user"}]},
    )
    with pytest.raises(ConfigError, match=f"{KEY_FILE} is missing"):
        create_app(config)


def _per_user_config(tmp_path: Path, database: str) -> Path:
    """A configuration with one upstream whose users connect their own accounts."""
    config = tmp_path / "bastion.toml"
    config.write_text(
        f"""[server]
database = "{database}"

[oauth]
issuer = "http://127.0.0.1:9"
key_dir = "{tmp_path / "keys"}"
resources = [{{ uri = "http://127.0.0.1:9/mcp/tracker" }}]

[[gateway.upstreams]]
name = "tracker"
url = "http://127.0.0.1:9/mcp"
auth = "per_user"
"""
    )
    return config


def test_the_cli_revokes_connections_whose_keys_are_lost_so_a_new_key_can_be_made(tmp_path, capsys):
    """What the refusal says to do can be done: `bastion connections list` and `revoke` work
    without the keys (the tokens cannot be revoked at the upstream: it says so); `rekey` needs
    them and says so; once no connection is left, a start makes a new key."""
    from bastion.cli import main

    database = str(tmp_path / "bastion.db")
    _connected(database)
    config = _per_user_config(tmp_path, database)
    assert main(["connections", "rekey", "--config", str(config)]) == 2
    assert f"{KEY_FILE} is missing" in capsys.readouterr().err
    assert main(["connections", "list", "--config", str(config)]) == 0
    listed = capsys.readouterr()
    assert listed.out.startswith("alice\ttracker") and "cannot be opened" in listed.err
    assert main(["connections", "revoke", "alice", "tracker", "--config", str(config)]) == 0
    revoked = capsys.readouterr()
    assert "revoked alice's connection" in revoked.out
    assert "not revoked at the upstream" in revoked.err
    assert not (tmp_path / "keys" / KEY_FILE).exists()  # the CLI made no key
    _open_connections(database, tmp_path / "keys")
    assert len(load_keys(tmp_path / "keys", env={})) == 1


def test_the_cli_makes_no_connection_key_where_only_a_server_should(tmp_path, capsys):
    """The key file is the server's: the CLI, run by another user (root, an operator) on the
    same folder, made it when it was missing, owned by that user, and the server could then not
    read it. With no connection stored there is nothing to open: `connections list`, `revoke`
    and `rekey` answer without making a key, and the server's first start makes it."""
    from bastion.cli import main

    database = str(tmp_path / "bastion.db")
    ConnectionStore(Database(database)).db.close()  # a deployment with no connection yet
    config = _per_user_config(tmp_path, database)
    assert main(["connections", "list", "--config", str(config)]) == 0
    assert main(["connections", "revoke", "alice", "tracker", "--config", str(config)]) == 2
    assert main(["connections", "rekey", "--config", str(config)]) == 0
    said = capsys.readouterr()
    assert "re-sealed 0 connection(s)" in said.out
    assert "cannot be opened" not in said.err  # nothing is stored that a key would open
    assert not (tmp_path / "keys").exists()
    _open_connections(database, tmp_path / "keys")
    assert len(load_keys(tmp_path / "keys", env={})) == 1


def test_a_damaged_signing_key_is_refused_with_its_path(tmp_path):
    """An empty or cut-short private key of the key that signs: every token issuance failed
    with "Could not deserialize key data", naming no file."""
    from bastion.server.app import create_app
    from bastion.server.config import ConfigError, ServerConfig

    database = str(tmp_path / "bastion.db")
    db = Database(database)
    ring = KeyRing(OAuthStore(db), tmp_path / "keys", retain_seconds=60, clock=time.time)
    pem = tmp_path / "keys" / f"{ring.rotate(actor='test')}.pem"
    for damaged in (b"", pem.read_bytes()[:60]):
        pem.write_bytes(damaged)
        with pytest.raises(SigningKeyError) as refused:
            KeyRing(OAuthStore(db), tmp_path / "keys", retain_seconds=60, clock=time.time).signer()
        assert str(pem) in str(refused.value) and "restore it from a backup" in str(refused.value)
        assert "bastion signing-keys rotate" in str(refused.value)
    db.close()
    base = "http://127.0.0.1:9"
    config = ServerConfig(
        database=database,
        oauth={"issuer": base, "key_dir": str(tmp_path / "keys"), "resources": [{"uri": base}]},
    )
    with pytest.raises(ConfigError, match=str(pem)):
        create_app(config)
