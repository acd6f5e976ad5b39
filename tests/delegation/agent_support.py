"""Helpers for the agent identity and private_key_jwt tests: keys, client assertions signed
with them, and a bastion.toml the admin CLI reads for a running test bastion."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from joserfc import jwt
from joserfc.jwk import ECKey

from bastion.cli import main

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def new_key(kid: str) -> ECKey:
    return ECKey.generate_key("P-256", {"kid": kid}, private=True)


def public_jwks(*keys: ECKey) -> dict:
    return {"keys": [k.as_dict(private=False) for k in keys]}


def assertion(
    key: ECKey,
    client_id: str,
    audience: str,
    *,
    lifetime: int = 60,
    issued: float | None = None,
    jti: str | None = None,
    header: dict | None = None,
    **claims,
) -> str:
    """A client assertion (RFC 7523 §3) signed with ``key``; ``claims`` override the defaults."""
    now = int(issued if issued is not None else time.time())
    body = {
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "iat": now,
        "exp": now + lifetime,
        "jti": jti or uuid.uuid4().hex,
        **claims,
    }
    return jwt.encode(header or {"alg": "ES256", "kid": key.kid}, body, key)


def cli_config(running, directory: Path) -> str:
    """A bastion.toml for the admin CLI with the running bastion's database and [oauth] table."""
    config = running.app.state.config
    oauth = config.oauth
    lines = [
        "[server]",
        f"database = {json.dumps(config.database)}",
        "[oauth]",
        f"issuer = {json.dumps(oauth['issuer'])}",
        f"key_dir = {json.dumps(oauth['key_dir'])}",
    ]
    for resource in oauth["resources"]:
        lines += [
            "[[oauth.resources]]",
            f"uri = {json.dumps(resource['uri'])}",
            f"scopes = {json.dumps(resource['scopes'])}",
        ]
    path = directory / "bastion.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err
