"""A whole bastion (decision service, authorization server, gateway) on loopback, with the
quickstart's MCP server as upstream twice: over stdio (a child process) and over Streamable HTTP
(uvicorn in a thread, wrapped so the test sees every request that reached it)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import anyio
import httpx
import httpx2
from mcp.client.client import Client as McpClient
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import (
    OAuthClientInformationFull,
)

from bastion.facts.store import FactStore
from bastion.oauth.users import create_user
from bastion.policy.parser import parse_fact
from bastion.server.app import create_app
from bastion.server.config import ServerConfig
from tests.oauth.support import (
    MemoryStorage,
    free_socket,
    log_in_and_consent,
    pkce_pair,
    sdk_auth,
    serve,
)

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "quickstart"
PASSWORD = "gateway-test-password"
UPSTREAM_KEY = "upstream-credential-of-bastion"
REDIRECT_URI = "http://127.0.0.1:9/callback"
LAB = Path(__file__).resolve().parent / "lab_server.py"
# The same MCP server over stdio, then over Streamable HTTP: the quickstart's, and the lab's
# (lists that change, slow calls, questions to the client).
SERVERS = ("desk", "deskhttp", "lab", "labhttp", "labold")
LAB_FACTS = """
has_relation(McpServer{"lab"}, "team", Team{"support"})
has_role(User{"avery"}, "admin", McpServer{"lab"})
has_relation(Tool{"lab/announce"}, "server", McpServer{"lab"})
has_relation(Tool{"lab/wait"}, "server", McpServer{"lab"})
has_relation(Tool{"lab/greet"}, "server", McpServer{"lab"})
has_relation(Tool{"lab/quiz"}, "server", McpServer{"lab"})
has_relation(Tool{"lab/greet_privately"}, "server", McpServer{"lab"})
has_relation(Tool{"lab/ask_anyway"}, "server", McpServer{"lab"})
has_relation(Tool{"lab/ask_by_url"}, "server", McpServer{"lab"})
has_relation(McpResource{"lab/lab://guarded"}, "server", McpServer{"lab"})
has_relation(McpResource{"lab/lab://held"}, "server", McpServer{"lab"})
has_relation(McpResource{"lab/lab://open"}, "server", McpServer{"lab"})
has_relation(McpResource{"lab/lab://secret"}, "server", McpServer{"lab"})
has_attribute(McpResource{"lab/lab://secret"}, "audience", "admin")
has_relation(Prompt{"lab/hello"}, "server", McpServer{"lab"})
"""


def _load(name: str, path: Path):
    # A fresh module each time: each running bastion gets its own SDK server instance.
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def demo_server_module():
    return _load("quickstart_server", QUICKSTART / "server.py")


class LegacyOnly:
    """ASGI wrapper: an MCP server that does not speak 2026-07-28 (``server/discover`` gets
    -32601), so bastion talks 2025-11-25 to it, sessions and all."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        try:
            request = json.loads(body)
        except ValueError:
            request = None
        if isinstance(request, dict) and request.get("method") == "server/discover":
            answer = json.dumps(
                {
                    "jsonrpc": "2.0",
                    "id": request.get("id"),
                    "error": {"code": -32601, "message": "Method not found"},
                }
            ).encode()
            headers = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": answer})
            return None
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


class Recorder:
    """ASGI wrapper: remembers every request (headers and body) that reaches the upstream."""

    def __init__(self, app) -> None:
        self.app = app
        self.requests: list[dict] = []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        entry = {
            "method": scope["method"],
            "headers": dict(scope["headers"]),
            "body": b"",
            "client": tuple(scope.get("client") or ()),
        }
        self.requests.append(entry)

        async def recording_receive():
            message = await receive()
            if message["type"] == "http.request":
                entry["body"] += message.get("body", b"")
            return message

        return await self.app(scope, recording_receive, send)

    def messages(self) -> list[dict]:
        found = []
        for r in self.requests:
            if r["body"]:
                try:
                    found.append(json.loads(r["body"]))
                except ValueError:
                    found.append({"unparsed": r["body"]})
        return found


def test_policy() -> str:
    """The quickstart policy with business hours taken out, so tests do not depend on the clock."""
    text = (QUICKSTART / "policy.polar").read_text()
    window = 'in_time_window(context.time, "Mon-Fri", "09:00", "18:00", "Europe/Paris")'
    assert window in text
    text = text.replace(window, 'context.method = "tools/call"')
    # A lab tool whose result is masked (what its upstream asks the client cannot be), and two
    # lab resources read only with more than the tests' tokens have: a scope, an approval.
    return (
        text
        + '\nmask(_user: User, "call", _tool: Tool, "note") if context.tool = "greet_privately";\n'
        + 'requires_scope("read", _r: McpResource, "customers:write") if\n'
        + '  context.uri = "lab://guarded";\n'
        + 'requires_approval(_user: User, "read", _r: McpResource) if context.uri = "lab://held";\n'
        # Obligations on `connect` itself, switched on per server (and user) by a fact.
        + "declare connect_scope(McpServer, String);\n"
        + "declare connect_held(McpServer, User);\n"
        + 'requires_scope("connect", server: McpServer, scope) if connect_scope(server, scope);\n'
        + 'requires_approval(user: User, "connect", server: McpServer) if\n'
        + "  connect_held(server, user);\n"
    )


def facts() -> list[tuple]:
    lines = (QUICKSTART / "desk.facts").read_text().splitlines() + LAB_FACTS.splitlines()
    found = []
    for line in lines:
        if line.strip() and not line.startswith("#"):
            found.append(parse_fact(line))
            for name, others in (("desk", ("deskhttp",)), ("lab", ("labhttp", "labold"))):
                if f"{name}/" in line or f'McpServer{{"{name}"}}' in line:
                    for other in others:
                        copy = line.replace(f"{name}/", f"{other}/").replace(
                            f'McpServer{{"{name}"}}', f'McpServer{{"{other}"}}'
                        )
                        found.append(parse_fact(copy))
    return found


@dataclass
class Running:
    url: str
    app: object
    recorder: Recorder
    trace: Path
    http: httpx.Client
    lab_trace: Path
    password: str = PASSWORD
    logins: list[str] = field(default_factory=list)
    # More bastion processes' worth of app on the same database and configuration (same issuer,
    # same resources), each on its own port: what replicas behind a load balancer would be.
    replicas: list[str] = field(default_factory=list)

    @property
    def store(self) -> FactStore:
        return self.app.state.store

    @property
    def records(self):
        return self.app.state.gateway.records

    def mcp_url(self, server: str) -> str:
        return f"{self.url}/mcp/{server}"

    def apply(self, inserts=(), deletes=()) -> None:
        """Write facts through the store, then wait until this server's replica has them."""
        seq = self.store.apply(inserts, deletes, actor="test").seq
        deadline = time.monotonic() + 10
        while self.app.state.replica.applied < seq:
            assert time.monotonic() < deadline, "the replica did not catch up"
            time.sleep(0.01)

    def flush(self):
        self.records.flush()

    # -- acting as a person in a browser -------------------------------------------------------

    def log_in_and_consent(self, url: str, username: str) -> httpx.Response:
        self.logins.append(username)
        return log_in_and_consent(self.url, url, username, self.password)

    def token(self, username: str, server: str, scope: str = "customers:read") -> str:
        """An access token by the plain OAuth flow (no SDK), for raw HTTP tests."""
        client = self.http.post(
            f"{self.url}/register",
            json={
                "client_name": "raw test client",
                "redirect_uris": [REDIRECT_URI],
                "token_endpoint_auth_method": "none",
                "grant_types": ["authorization_code", "refresh_token"],
            },
        ).json()
        verifier, challenge = pkce_pair()
        params = {
            "response_type": "code",
            "client_id": client["client_id"],
            "redirect_uri": REDIRECT_URI,
            "state": "s",
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "resource": self.mcp_url(server),
            "scope": scope,
        }
        response = self.log_in_and_consent(f"{self.url}/authorize?{urlencode(params)}", username)
        code = parse_qs(urlsplit(response.headers["location"]).query)["code"][0]
        tokens = self.http.post(
            f"{self.url}/token",
            data={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": REDIRECT_URI,
                "code_verifier": verifier,
                "client_id": client["client_id"],
            },
        )
        assert tokens.status_code == 200, tokens.text
        return tokens.json()["access_token"]

    # -- the official SDK client -------------------------------------------------------------

    def register(self, scope: str) -> OAuthClientInformationFull:
        """A client registered ahead of time, allowed ``scope`` (it may step up within it)."""
        response = self.http.post(
            f"{self.url}/register",
            json={
                "client_name": "pre-registered test agent",
                "redirect_uris": [REDIRECT_URI],
                "token_endpoint_auth_method": "none",
                "grant_types": ["authorization_code", "refresh_token"],
                "scope": scope,
            },
        )
        assert response.status_code == 201, response.text
        return OAuthClientInformationFull.model_validate(response.json())

    def sdk(
        self,
        username: str,
        server: str,
        mode: str,
        script,
        registered_scope: str | None = None,
        **client_options,
    ) -> dict:
        """Connect with the SDK's OAuthClientProvider as ``username``; run ``script(client, seen)``.

        The SDK registers the client itself, unless ``registered_scope`` asks for a client
        registered beforehand with that scope. ``client_options`` go to the SDK's ``Client``
        (``sampling_callback``, ``elicitation_callback``...).
        """
        seen: dict = {"redirects": []}
        storage = MemoryStorage()
        if registered_scope is not None:
            storage.client_info = self.register(registered_scope)
        provider = sdk_auth(
            self.mcp_url(server),
            lambda url: self.log_in_and_consent(url, username),
            storage,
            seen["redirects"],
            client_name="gateway test agent",
            redirect_uri=REDIRECT_URI,
        )

        async def main() -> None:
            async with (
                httpx2.AsyncClient(auth=provider, timeout=20) as http,
                McpClient(
                    streamable_http_client(self.mcp_url(server), http_client=http),
                    mode=mode,
                    **client_options,
                ) as client,
            ):
                seen["protocol_version"] = client.protocol_version
                await script(client, seen)
            seen["tokens"] = storage.tokens

        anyio.run(main)
        return seen


def start(tmp_path, gateway: dict | None = None, replicas: int = 0):
    """Start everything; a context manager yielding `Running`. ``gateway`` adds settings to the
    ``[gateway]`` table; ``replicas`` more apps share the first one's database and settings."""
    from contextlib import ExitStack, contextmanager

    @contextmanager
    def running():
        module = demo_server_module()
        recorder = Recorder(module.server.streamable_http_app(streamable_http_path="/mcp"))
        lab = _load("lab_server", LAB)
        lab_trace = tmp_path / "lab-trace.jsonl"
        lab.TRACE = str(lab_trace)
        upstream_sock = free_socket()
        lab_sock = free_socket()
        sock = free_socket()
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        trace = tmp_path / "stdio-trace.jsonl"
        policy = tmp_path / "policy.polar"
        policy.write_text(test_policy())
        lab_app = lab.server.streamable_http_app(streamable_http_path="/mcp")
        old = _load("lab_server_legacy", LAB)
        old.TRACE = str(lab_trace)
        old_app = LegacyOnly(old.server.streamable_http_app(streamable_http_path="/mcp"))
        with (
            serve(recorder, upstream_sock) as upstream_url,
            serve(lab_app, lab_sock) as lab_url,
            serve(old_app, free_socket()) as old_url,
        ):
            config = ServerConfig(
                database=str(tmp_path / "bastion.db"),
                policy_file=str(policy),
                oauth={
                    "issuer": base,
                    "key_dir": str(tmp_path / "keys"),
                    "resources": [
                        {
                            "uri": f"{base}/mcp/{name}",
                            "scopes": ["customers:read", "customers:write"],
                        }
                        for name in SERVERS
                    ],
                },
                gateway={
                    **(gateway or {}),
                    "max_body_bytes": 65536,
                    "upstreams": [
                        {
                            "name": "desk",
                            "command": sys.executable,
                            "args": [str(QUICKSTART / "server.py")],
                            "env": {"DEMO_TRACE": str(trace)},
                            "scopes": ["customers:read"],
                        },
                        {
                            "name": "deskhttp",
                            "url": f"{upstream_url}/mcp",
                            "headers": {"X-Desk-Key": UPSTREAM_KEY},
                            "scopes": ["customers:read"],
                        },
                        {
                            "name": "lab",
                            "command": sys.executable,
                            "args": [str(LAB)],
                            "env": {"LAB_TRACE": str(lab_trace)},
                        },
                        {"name": "labhttp", "url": f"{lab_url}/mcp"},
                        {"name": "labold", "url": f"{old_url}/mcp"},
                    ],
                },
            )
            app = create_app(config)
            for name in ("sam", "avery"):
                create_user(app.state.oauth.store, name, PASSWORD, time.time())
            app.state.store.apply(facts(), actor="test")
            with serve(app, sock) as url, httpx.Client(timeout=20) as http, ExitStack() as more:
                others = [
                    more.enter_context(serve(create_app(config), free_socket()))
                    for _ in range(replicas)
                ]
                yield Running(url, app, recorder, trace, http, lab_trace, replicas=others)

    return running()


def serve_quickstart(
    directory: Path, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str]:
    """`bastion serve` of examples/quickstart/bastion.toml in a process of its own, as `make run`
    starts it, but on a free port with a fresh database in ``directory`` (set up by the
    quickstart's setup.py). ``env`` adds environment variables (``BASTION_*`` settings). Returns
    the process and its URL once it is ready; the caller stops it.
    """
    port = free_socket().getsockname()[1]
    config = (QUICKSTART / "bastion.toml").read_text()
    for old, new in [
        ("127.0.0.1:8000", f"127.0.0.1:{port}"),
        ("port = 8000", f"port = {port}"),
        ('".quickstart/', f'"{directory}/'),
        ('".venv/bin/python"', json.dumps(sys.executable)),
    ]:
        assert old in config, f"examples/quickstart/bastion.toml no longer has {old!r}"
        config = config.replace(old, new)
    path = directory / "bastion.toml"
    path.write_text(config)
    subprocess.run(
        [sys.executable, str(QUICKSTART / "setup.py"), str(directory / "bastion.db")],
        cwd=ROOT,
        check=True,
    )
    log = directory / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "bastion.cli", "serve", "--config", str(path)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise AssertionError(f"bastion serve did not come up:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
