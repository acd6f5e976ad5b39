"""The npm package oidc-provider (a certified OpenID provider) run with Node for the tests:
`oidc_provider.mjs` beside this file, installed once into `.npm-oidc-provider/` (gitignored).

``python -m tests.identity.oidc_provider`` runs it for the quickstart's ``make run-oidc``
(docs/identity.md): port 9400, bastion's client ``bastion`` / ``quickstart-oidc-secret`` and the
quickstart's people (password ``quickstart-password``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from joserfc.jwk import RSAKey

from tests.waits import PATIENCE

ROOT = Path(__file__).resolve().parents[2]
NPM_PREFIX = ROOT / ".npm-oidc-provider"
# 9.x is ESM, needs no install scripts, and runs on Node 20 (the machine's).
OIDC_PROVIDER_VERSION = "9.13.3"
SCRIPT = Path(__file__).with_name("oidc_provider.mjs")


def install() -> Path:
    """The package's entry module, installed once (a pinned version)."""
    from tests.gateway.support import npm_install

    folder = npm_install(NPM_PREFIX, "oidc-provider", OIDC_PROVIDER_VERSION)
    return folder / "lib" / "index.js"


@contextmanager
def oidc_provider(
    port: int,
    *,
    client_id: str,
    client_secret: str,
    redirect_uris: list[str],
    users_file: Path,
    key: RSAKey | None = None,
    client_metadata: dict | None = None,
    tenants: list[str] | None = None,
    tenant_file: Path | None = None,
):
    """oidc-provider on 127.0.0.1:``port``; yields its issuer URL. ``users_file`` is read at
    each login, so a test can change a person's groups between two logins. ``client_metadata``
    overrides bastion's client's (``token_endpoint_auth_method``, ``jwks``). With ``tenants``,
    a multi-tenant provider as Entra ID is (`oidc_provider.mjs`): it yields the issuer of its
    ``/organizations/v2.0``, which answers for the tenant ``tenant_file`` names at the time."""
    module = install()
    key = key or RSAKey.generate_key(2048, parameters={"kid": "provider-key", "use": "sig"})
    env = {
        **os.environ,
        "OIDC_PROVIDER_MODULE": str(module),
        "PORT": str(port),
        "CLIENT_ID": client_id,
        "CLIENT_SECRET": client_secret,
        "CLIENT_METADATA": json.dumps(client_metadata or {}),
        "REDIRECT_URIS": " ".join(redirect_uris),
        "USERS_FILE": str(users_file),
        "JWKS": json.dumps({"keys": [key.as_dict(private=True)]}),
        "NODE_ENV": "production",
        "TENANTS": " ".join(tenants or []),
        "TENANT_FILE": str(tenant_file or ""),
    }
    process = subprocess.Popen(
        ["node", str(SCRIPT)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        # Its first line says it listens; an empty one, that it ended (the read waits for either).
        line = process.stdout.readline()
        if not line.startswith("ready "):
            process.kill()
            raise RuntimeError(f"oidc-provider did not start: {line}{process.stderr.read()}")
        yield line.split()[1]
    finally:
        process.terminate()
        try:
            process.wait(timeout=PATIENCE)
        except subprocess.TimeoutExpired:
            process.kill()


QUICKSTART_PEOPLE = {
    "avery": {
        "password": "quickstart-password",
        "email": "avery@acme.test",
        "groups": ["support-leads"],
    },
    "sam": {"password": "quickstart-password", "email": "sam@acme.test", "groups": ["support"]},
}


def main() -> None:
    """For ``make run-oidc``: the provider bastion's quickstart logs in through."""
    # `make run-oidc` ends it with SIGTERM: leave through the finally that stops Node.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    users = ROOT / ".quickstart" / "oidc-people.json"
    users.parent.mkdir(exist_ok=True)
    users.write_text(json.dumps(QUICKSTART_PEOPLE))
    port = int(os.environ.get("OIDC_PORT", "9400"))
    bastion = os.environ.get("BASTION_URL", "http://127.0.0.1:8000")
    with oidc_provider(
        port,
        client_id="bastion",
        client_secret="quickstart-oidc-secret",
        redirect_uris=[f"{bastion}/login/test-idp/callback"],
        users_file=users,
    ) as issuer:
        print(f"oidc-provider at {issuer}; people: {', '.join(QUICKSTART_PEOPLE)}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            sys.exit(0)


if __name__ == "__main__":
    main()
