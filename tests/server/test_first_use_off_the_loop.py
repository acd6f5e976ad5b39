"""What a process loads once, at its first use (trust stores, deployment secrets, modules), and
the wait for the revocation listener at shutdown: none of it on the event loop of `bastion serve`,
where it would hold every request meanwhile (docs/operations.md, "Loaded at start")."""

from __future__ import annotations

import ast
import os
import ssl
from pathlib import Path
from urllib.parse import urlencode

import certifi
import pytest

from bastion import tls
from bastion.db import Listener
from bastion.oauth import server as oauth_server
from bastion.server.app import create_app
from bastion.server.config import ConfigError, ServerConfig
from tests import clients
from tests.conftest import postgres_schema
from tests.gateway.support import (
    REDIRECT_URI,
    access_token,
    serve_quickstart,
    start,
    stop,
)
from tests.loop import noting_where
from tests.oauth.support import pkce_pair

ROOT = Path(__file__).resolve().parents[2]
WEBHOOK_SECRET = "first-use-webhook-secret-0123456789"


@pytest.fixture(scope="module")
def first_uses(tmp_path_factory) -> dict[str, list[str]]:
    """A gateway with an authorization server on PostgreSQL (so its tokens have a revocation
    listener), an approvals webhook (a client made at start), DPoP nonces, and client metadata
    documents checked against a CA file of their own; started with the process's trust stores
    not yet made, then used (a sign-in, a metadata document fetched) and stopped. Where each
    first use ran: "event loop" or "worker thread" (any thread without a running loop)."""
    seen: dict[str, list[str]] = {"trust stores": [], "secrets": [], "listener stops": []}
    with postgres_schema() as database, pytest.MonkeyPatch.context() as patch:
        tls.trust.cache_clear()
        tls.file_context.cache_clear()
        # Every way a context's certificates are read: the system's store, or a file.
        for method in ("load_default_certs", "load_verify_locations"):
            loads = noting_where(getattr(ssl.SSLContext, method), seen["trust stores"])
            patch.setattr(ssl.SSLContext, method, loads)
        read = noting_where(oauth_server.deployment_secret, seen["secrets"])
        patch.setattr(oauth_server, "deployment_secret", read)
        patch.setattr(Listener, "stop", noting_where(Listener.stop, seen["listener stops"]))
        patch.setenv("BASTION_TEST_FIRST_USE_HOOK", WEBHOOK_SECRET)
        with start(
            tmp_path_factory.mktemp("first-use"),
            database=database,
            approvals={
                "wait_seconds": 0,
                "webhooks": [
                    {"url": "https://127.0.0.1:9/hook", "secret_env": "BASTION_TEST_FIRST_USE_HOOK"}
                ],
            },
            oauth={
                "dpop": {"require_nonce": True},
                "client_metadata": {"allow_private_addresses": True, "ca_file": certifi.where()},
            },
        ) as running:
            seen["at start"] = list(seen["trust stores"])
            desk = f"{running.url}/mcp/desk"
            access_token(running.http, running.url, desk, "sam", running.password, "customers:read")
            _, challenge = pkce_pair()
            # Nothing listens there: the fetch fails, once its client is made.
            document = "https://127.0.0.1:9/client.json"
            query = {
                "response_type": "code",
                "client_id": document,
                "redirect_uri": REDIRECT_URI,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
                "resource": desk,
            }
            answer = running.http.get(f"{running.url}/authorize?{urlencode(query)}")
            assert document in answer.text, answer.text  # fetched, and said so
    return seen


def test_the_trust_stores_are_loaded_at_start_off_the_event_loop(first_uses):
    # The process's store and the CA file's, both before the first request.
    assert first_uses["at start"] == ["worker thread", "worker thread"]
    assert "event loop" not in first_uses["trust stores"]


def test_deployment_secrets_are_read_at_start_off_the_event_loop(first_uses):
    # The login counters', DPoP nonces' and forms' secrets (a sign-in uses two of them).
    assert len(first_uses["secrets"]) == 3
    assert "event loop" not in first_uses["secrets"]


def test_the_revocation_listener_is_waited_for_off_the_event_loop(first_uses):
    # The tokens' revocation listener and the replica's change-log listener.
    assert len(first_uses["listener stops"]) == 2
    assert "event loop" not in first_uses["listener stops"]


def _imports_in_coroutines(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.AsyncFunctionDef):
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)):
                        found.append(f"{path.relative_to(root.parent)}:{inner.lineno} {node.name}")
    return found


def test_no_coroutine_imports_a_module():
    """An import inside a coroutine loads the module on the event loop at its first run."""
    assert _imports_in_coroutines(ROOT / "bastion") == []


def _rpc(method: str, params: dict) -> dict:
    return {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}


def test_bastion_serve_loads_no_module_on_the_event_loop(tmp_path):
    """From start to stop of the quickstart, with a sign-in, gateway calls and a write between:
    no module is loaded by bastion's code on the event loop (tests/loop_imports notes each one
    loaded while a loop runs in the loading thread, with the bastion frames that asked)."""
    noted = tmp_path / "loaded-on-the-loop.tsv"
    env = {
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "loop_imports"), str(ROOT)]),
        "BASTION_TEST_LOOP_IMPORTS": str(noted),
        "BASTION_ADMIN_KEY": "first-use-admin-key-0123456789abcdef",
    }
    server, url = serve_quickstart(tmp_path, env=env)
    try:
        with clients.client(timeout=20) as http:
            token = access_token(
                http, url, f"{url}/mcp/desk", "sam", "quickstart-password", "customers:read"
            )
            mcp = f"{url}/mcp/desk"
            headers = {
                "authorization": f"Bearer {token}",
                "accept": "application/json, text/event-stream",
            }
            hello = {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "first-use", "version": "1"},
            }
            opened = http.post(mcp, headers=headers, json=_rpc("initialize", hello))
            assert opened.status_code == 200, opened.text
            headers["mcp-session-id"] = opened.headers["mcp-session-id"]
            headers["mcp-protocol-version"] = "2025-06-18"
            initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
            http.post(mcp, headers=headers, json=initialized)
            search = {"name": "search_customers", "arguments": {"query": "a"}}
            called = http.post(mcp, headers=headers, json=_rpc("tools/call", search))
            assert "Ada Lovelace" in called.text, called.text
            zed = {"type": "User", "id": "zed"}
            fact = {"predicate": "has_role", "args": [zed, "member", {"type": "Team", "id": "a"}]}
            written = http.post(
                f"{url}/v1/facts",
                headers={"authorization": f"Bearer {env['BASTION_ADMIN_KEY']}"},
                json={"facts": [fact]},
            )
            assert written.status_code == 200, written.text
    finally:
        stop(server)
    lines = noted.read_text().splitlines() if noted.exists() else []
    assert [line for line in lines if "bastion/" in line.split("\t")[1]] == []


def _config(tmp_path: Path, **oauth) -> ServerConfig:
    policy = tmp_path / "policy.polar"
    policy.write_text("actor User {}\n")
    table = {
        "issuer": "http://127.0.0.1:9",
        "key_dir": str(tmp_path / "keys"),
        "resources": [{"uri": "http://127.0.0.1:9/mcp/desk", "scopes": ["tools:read"]}],
        **oauth,
    }
    return ServerConfig(database=str(tmp_path / "bastion.db"), policy_file=str(policy), oauth=table)


def test_a_damaged_deployment_secret_stops_the_start_naming_its_file(tmp_path):
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "form-tokens.key").write_text("not a secret\n")
    with pytest.raises(ConfigError, match="form-tokens.key must hold a secret of 32 bytes"):
        create_app(_config(tmp_path))


def test_a_ca_file_that_holds_no_certificates_stops_the_start_naming_its_setting(tmp_path):
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text("not a certificate\n")
    metadata = {"client_metadata": {"ca_file": str(ca_file)}}
    with pytest.raises(
        ConfigError, match=r"oauth.client_metadata.ca_file .*ca.pem: cannot be read"
    ):
        create_app(_config(tmp_path, **metadata))
