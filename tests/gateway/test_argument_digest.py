"""Argument digests in decision records are keyed (HMAC-SHA256) with a secret of the
deployment kept beside the signing keys: a guess of small arguments cannot be confirmed by
hashing it, and the same arguments match across restarts and replicas sharing ``key_dir``."""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import threading

import pytest

from bastion.audit.decisions import canonical_json
from bastion.gateway.enforce import ArgumentDigest
from bastion.oauth.keys import ARGUMENT_DIGEST_KEY, deployment_secret

ARGUMENTS = {"customer_id": "c-101"}


def test_a_digest_is_keyed_not_a_plain_hash(tmp_path):
    key = deployment_secret(tmp_path, ARGUMENT_DIGEST_KEY)
    value = ArgumentDigest(key)(ARGUMENTS)
    plain = hashlib.sha256(b'{"customer_id":"c-101"}').hexdigest()
    assert value.startswith("hmac-sha256:") and plain not in value
    assert ArgumentDigest(key)({"customer_id": "c-101"}) == value  # stable for one key
    assert ArgumentDigest(b"k" * 32)(ARGUMENTS) != value  # another deployment: another digest
    assert ArgumentDigest(key)(None) == ""


@pytest.mark.parametrize("size", [0, 1, 32, 63, 64, 65, 200])
def test_a_digest_is_hmac_sha256_of_the_canonical_arguments(size):
    """RFC 2104 over SHA-256, as the standard library's `hmac` computes it, for keys shorter
    than, as long as and longer than SHA-256's block (a longer key is hashed first)."""
    key = os.urandom(size)
    for arguments in (
        ARGUMENTS,
        {"query": "a" * 300, "n": [1, 2.5, True, None]},
        "",
        [],
        {"name": "Jos\u00e9", "small": 1e-05, "big": 2**70, "line": "\u2028\x7f"},
    ):
        text = canonical_json(arguments).encode()
        expected = hmac.new(key, text, hashlib.sha256).hexdigest()
        assert ArgumentDigest(key)(arguments) == "hmac-sha256:" + expected


def test_the_secret_is_made_once_private_and_read_again(tmp_path):
    keys = tmp_path / "keys"
    found: list[bytes] = []
    threads = [
        threading.Thread(target=lambda: found.append(deployment_secret(keys, ARGUMENT_DIGEST_KEY)))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(found)) == 1 and len(found[0]) == 32  # replicas starting at once agree
    path = keys / ARGUMENT_DIGEST_KEY
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in keys.iterdir()) == [ARGUMENT_DIGEST_KEY]  # no drafts left
    assert deployment_secret(keys, ARGUMENT_DIGEST_KEY) == found[0]  # a restart reads it


def test_a_damaged_secret_is_refused_not_replaced(tmp_path):
    (tmp_path / ARGUMENT_DIGEST_KEY).write_text("not hex")
    with pytest.raises(ValueError, match="64 hex digits"):
        deployment_secret(tmp_path, ARGUMENT_DIGEST_KEY)


def test_a_server_with_a_damaged_secret_does_not_start(tmp_path):
    from bastion.server.app import create_app
    from bastion.server.config import ConfigError, ServerConfig

    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / ARGUMENT_DIGEST_KEY).write_text("0" * 10)
    base = "http://127.0.0.1:9"
    config = ServerConfig(
        database=str(tmp_path / "bastion.db"),
        oauth={
            "issuer": base,
            "key_dir": str(keys),
            "resources": [{"uri": f"{base}/mcp/desk"}],
        },
        gateway={"upstreams": [{"name": "desk", "url": "http://127.0.0.1:9/mcp"}]},
    )
    with pytest.raises(ConfigError, match="argument-digest.key"):
        create_app(config)
