"""The deployment's key files (the connection keys, each signing key's private half, the
deployment secrets) are put in place whole or not at all: a write that fails part way (a full
disk, a failed fsync, a crash) leaves no part of a key under the file's name, for the next start
to read as a key or to fail on without saying why."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bastion.connections.sealing import KEY_FILE, load_keys
from bastion.db import Database
from bastion.oauth.keys import ARGUMENT_DIGEST_KEY, KeyRing, deployment_secret
from bastion.oauth.store import OAuthStore


def _connection_keys(key_dir: Path) -> Path:
    load_keys(key_dir, env={})
    return key_dir / KEY_FILE


def _signing_key(key_dir: Path) -> Path:
    db = Database(":memory:")  # its rows: what is tried here is the file
    try:
        kid = KeyRing(OAuthStore(db), key_dir, retain_seconds=60, clock=time.time).rotate()
    finally:
        db.close()
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
        from tests.security.test_key_files import WRITERS

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
