"""A whole bastion (decision service, authorization server, gateway) on loopback, with the
quickstart's MCP server as upstream twice: over stdio (a child process) and over Streamable HTTP
(uvicorn in a thread, wrapped so the test sees every request that reached it)."""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import anyio
import httpx
import httpx2
from mcp.client.client import Client as McpClient
from mcp.client.streamable_http import streamable_http_client
from mcp.server.streamable_http import EventMessage, EventStore
from mcp.shared.auth import (
    OAuthClientInformationFull,
)

from bastion.facts.store import FactStore
from bastion.oauth.users import create_user
from bastion.policy.parser import parse_fact
from bastion.server.app import create_app
from bastion.server.config import ServerConfig
from tests import clients
from tests.conftest import require_program
from tests.gateway.lab_server import SECRET as LAB_SECRET
from tests.oauth.support import (
    MemoryStorage,
    Servers,
    free_socket,
    log_in_and_consent,
    pkce_pair,
    sdk_auth,
)
from tests.waits import PATIENCE, eventually, until_ready

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "quickstart"
PASSWORD = "gateway-test-password"
UPSTREAM_KEY = "upstream-credential-of-bastion"
REDIRECT_URI = "http://127.0.0.1:9/callback"
LAB = Path(__file__).resolve().parent / "lab_server.py"
# What the MCP conformance suite's server scenarios ask of a server (test_conformance.py).
CONFORMANCE = Path(__file__).resolve().parent / "conformance_server.py"
CONFORMANCE_USER, CONFORMANCE_PASSWORD = "conformance", "conformance-test-password"
# The same MCP server over stdio, then over Streamable HTTP: the quickstart's, and the lab's
# (lists that change, slow calls, questions to the client).
SERVERS = ("desk", "deskhttp", "lab", "labhttp", "labold")
LAB_FACTS = """
has_relation(McpServer{"lab"}, "team", Team{"support"})
has_role(User{"avery"}, "admin", McpServer{"lab"})
has_relation(Tool{"lab/announce"}, "server", McpServer{"lab"})
has_relation(Tool{"lab/wait"}, "server", McpServer{"lab"})
has_relation(Tool{"lab/run_until_released"}, "server", McpServer{"lab"})
has_relation(Tool{"lab/greet"}, "server", McpServer{"lab"})
has_relation(Tool{"lab/quiz"}, "server", McpServer{"lab"})
has_relation(Tool{"lab/greet_privately"}, "server", McpServer{"lab"})
has_relation(Tool{"lab/ask_anyway"}, "server", McpServer{"lab"})
has_relation(Tool{"lab/ask_by_url"}, "server", McpServer{"lab"})
has_relation(Tool{"lab/ask_model_more"}, "server", McpServer{"lab"})
has_relation(McpResource{"lab/lab://guarded"}, "server", McpServer{"lab"})
has_relation(McpResource{"lab/lab://held"}, "server", McpServer{"lab"})
has_relation(McpResource{"lab/lab://open"}, "server", McpServer{"lab"})
has_relation(McpResource{"lab/lab://slow"}, "server", McpServer{"lab"})
has_relation(McpResource{"lab/lab://locked"}, "server", McpServer{"lab"})
has_relation(McpResource{"lab/lab://secret"}, "server", McpServer{"lab"})
has_attribute(McpResource{"lab/lab://secret"}, "audience", "admin")
has_relation(Prompt{"lab/hello"}, "server", McpServer{"lab"})
has_relation(Tool{"lab/leak"}, "server", McpServer{"lab"})
has_relation(Tool{"lab/leak_raw"}, "server", McpServer{"lab"})
has_relation(Tool{"lab/leak_error"}, "server", McpServer{"lab"})
has_relation(Tool{"lab/leak_list"}, "server", McpServer{"lab"})
has_relation(Tool{"lab/leak_spelled"}, "server", McpServer{"lab"})
has_relation(Tool{"lab/leak_http_error"}, "server", McpServer{"lab"})
has_relation(Tool{"lab/pose_as_bastion"}, "server", McpServer{"lab"})
has_relation(Tool{"lab/chatter"}, "server", McpServer{"lab"})
has_relation(McpResource{"lab/lab://leaky"}, "server", McpServer{"lab"})
has_relation(McpResource{"lab/lab://leaky-blob"}, "server", McpServer{"lab"})
has_relation(McpResource{"lab/lab://leaky-raw"}, "server", McpServer{"lab"})
has_relation(Prompt{"lab/leaky"}, "server", McpServer{"lab"})
has_relation(Prompt{"lab/greeting"}, "server", McpServer{"lab"})
"""


def fresh_module(name: str, path: Path):
    """The module at ``path``, loaded anew: each running bastion gets its own SDK server."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def demo_server_module():
    return fresh_module("quickstart_server", QUICKSTART / "server.py")


class MemoryEvents(EventStore):
    """Resumability for an SDK server's event streams, in memory. With an event store the SDK
    opens each event stream with a priming event (an id and empty data), as servers that let
    clients resume do."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, object]] = []

    async def store_event(self, stream_id, message):
        event_id = str(len(self.events) + 1)
        self.events.append((event_id, stream_id, message))
        return event_id

    async def replay_events_after(self, last_event_id, send_callback):
        found = [e for e in self.events if e[0] == last_event_id]
        if not found:
            return None
        stream = found[0][1]
        for event_id, stream_id, message in self.events[int(last_event_id) :]:
            if stream_id == stream and message is not None:
                await send_callback(EventMessage(message, event_id))
        return stream


class LegacyOnly:
    """ASGI wrapper: an MCP server that does not speak 2026-07-28 (``server/discover`` gets
    -32601), so bastion talks 2025-11-25 to it, sessions and all. With ``legacy=False`` it lets
    ``server/discover`` through. Either way, a ``tools/call`` of ``leak_http_error`` (the lab's)
    is answered as a failing web server would: HTTP 500, the error in plain text."""

    def __init__(self, app, legacy: bool = True) -> None:
        self.app = app
        self.legacy = legacy

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
        params = request.get("params") if isinstance(request, dict) else None
        if isinstance(params, dict) and params.get("name") == "leak_http_error":
            text = f"500 Internal Server Error: no customer {LAB_SECRET}".encode()
            headers = [(b"content-type", b"text/plain")]
            await send({"type": "http.response.start", "status": 500, "headers": headers})
            await send({"type": "http.response.body", "body": text})
            return None
        if self.legacy and isinstance(request, dict) and request.get("method") == "server/discover":
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
        # Tool names whose next call is answered 502 without reaching the server (`fail_next`).
        self.failing: set[str] = set()

    def fail_next(self, tool: str) -> None:
        """Answer the next ``tools/call`` of ``tool`` with 502, as a server that broke down:
        it is not recorded and does not run."""
        self.failing.add(tool)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.failing and scope["method"] == "POST":
            body, more = b"", True
            while more:
                message = await receive()
                body += message.get("body", b"")
                more = message.get("more_body", False)
            try:
                tool = json.loads(body).get("params", {}).get("name")
            except (ValueError, AttributeError):
                tool = None
            if tool in self.failing:
                self.failing.discard(tool)
                await send({"type": "http.response.start", "status": 502, "headers": []})
                await send({"type": "http.response.body", "body": b"broken"})
                return None
            replayed = [{"type": "http.request", "body": body, "more_body": False}]

            async def replay():
                return replayed.pop() if replayed else await receive()

            receive = replay
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

    def count(self, method: str, **params: str) -> int:
        """How many messages of ``method`` whose params hold each of ``params`` reached the
        upstream: ``count("tools/call", name="send_email")``."""
        return sum(
            1
            for m in self.messages()
            if m.get("method") == method
            and all(m.get("params", {}).get(key) == value for key, value in params.items())
        )


def test_policy() -> str:
    """The quickstart policy with business hours taken out, so tests do not depend on the clock."""
    text = (QUICKSTART / "policy.polar").read_text()
    window = 'in_time_window(context.time, "Mon-Fri", "09:00", "18:00", "Europe/Paris")'
    assert window in text
    text = text.replace(window, 'context.method = "tools/call"')
    # Deleting waits for the user's confirmation in the quickstart; these tests delete at once
    # (tests/approvals hold calls, and tests/gateway/test_quickstart_approvals.py this one).
    confirmation = 'requires_approval(_user: User, "call", Tool{"desk/delete_customer"});'
    assert confirmation in text
    text = text.replace(confirmation, "")
    # The lab's admin-only resources stay refused to others outright (the quickstart holds what
    # others read of its internal notes for review instead).
    text += (
        '\ndeny(user: User, "read", resource: McpResource) if\n'
        '  context.server in ["lab", "labhttp", "labold"] and\n'
        '  has_attribute(resource, "audience", "admin") and\n'
        '  has_relation(resource, "server", server) and\n'
        '  not has_role(user, "admin", server);\n'
    )
    # A lab tool whose result is masked (what its upstream asks the client cannot be), and two
    # lab resources read only with more than the tests' tokens have: a scope, an approval.
    return (
        text
        + '\nmask(_user: User, "call", _tool: Tool, "note") if context.tool = "greet_privately";\n'
        # The lab's leaks, masked for everyone: what they send must never come out.
        + 'mask(_user: User, "call", _tool: Tool, "customers.*.email") if\n'
        + '  context.tool in ["leak", "leak_raw", "leak_error", "leak_http_error"];\n'
        + 'mask(_user: User, "call", _tool: Tool, "result.*.email") if context.tool = "leak_list";\n'
        + 'mask(_user: User, "call", _tool: Tool, "$..email") if context.tool = "leak_spelled";\n'
        + 'mask(_user: User, "read", _r: McpResource, "customers.*.email") if\n'
        + '  context.uri in ["lab://leaky", "lab://leaky-blob", "lab://leaky-raw"];\n'
        + 'mask(_user: User, "get", _p: Prompt, "customers.*.email") if\n'
        + '  context.prompt = "leaky";\n'
        + 'requires_scope("read", _r: McpResource, "customers:write") if\n'
        + '  context.uri = "lab://guarded";\n'
        + 'requires_approval(_user: User, "read", _r: McpResource) if context.uri = "lab://held";\n'
        # Obligations on `connect` itself, switched on per server (and user) by a fact.
        + "declare connect_scope(McpServer, String);\n"
        + "declare connect_held(McpServer, User);\n"
        + 'requires_scope("connect", server: McpServer, scope) if connect_scope(server, scope);\n'
        + 'requires_approval(user: User, "connect", server: McpServer) if\n'
        + "  connect_held(server, user);\n"
        # A mask whose rule cannot be decided (2 / 0): which path is not known, so refused.
        + "declare connect_divisor(McpServer, Integer);\n"
        + 'mask(_user: User, "connect", server: McpServer, "secret") if\n'
        + "  connect_divisor(server, d) and n = 2 / d and n > 1;\n"
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
    # Their apps, in the same order (their state: `app.state.alerts`...).
    replica_apps: list = field(default_factory=list)

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
        caught_up = eventually(lambda: self.app.state.replica.applied >= seq, every=0.01)
        assert caught_up, "the replica did not catch up"

    def flush(self):
        self.records.flush()

    # -- acting as a person in a browser -------------------------------------------------------

    def log_in_and_consent(self, url: str, username: str) -> httpx.Response:
        self.logins.append(username)
        return log_in_and_consent(self.url, url, username, self.password)

    def token(
        self,
        username: str,
        server: str,
        scope: str = "customers:read",
        client_id: str | None = None,
    ) -> str:
        """An access token by the plain OAuth flow (no SDK), for raw HTTP tests: of the client
        ``client_id``, or of a client registered for it."""
        self.logins.append(username)
        return access_token(
            self.http, self.url, self.mcp_url(server), username, self.password, scope, client_id
        )

    # -- the official SDK client -------------------------------------------------------------

    def register(self, scope: str) -> OAuthClientInformationFull:
        """A client registered ahead of time, allowed ``scope`` (it may step up within it)."""
        registered = public_client(self.http, self.url, "pre-registered test agent", scope=scope)
        return OAuthClientInformationFull.model_validate(registered)

    def sdk(
        self,
        username: str,
        server: str,
        mode: str,
        script,
        registered_scope: str | None = None,
        url: str | None = None,
        **client_options,
    ) -> dict:
        """Connect with the SDK's OAuthClientProvider as ``username``; run ``script(client, seen)``.

        The SDK registers the client itself, unless ``registered_scope`` asks for a client
        registered beforehand with that scope. ``client_options`` go to the SDK's ``Client``
        (``sampling_callback``, ``elicitation_callback``...). ``url``: where the client reaches
        the server (a proxy in front of bastion), if not at `mcp_url`.
        """
        url = url or self.mcp_url(server)
        seen: dict = {"redirects": []}
        storage = MemoryStorage()
        if registered_scope is not None:
            storage.client_info = self.register(registered_scope)
        provider = sdk_auth(
            url,
            lambda to: self.log_in_and_consent(to, username),
            storage,
            seen["redirects"],
            client_name="gateway test agent",
            redirect_uri=REDIRECT_URI,
        )

        async def main() -> None:
            async with (
                httpx2.AsyncClient(auth=provider, timeout=20, verify=clients.TRUST) as http,
                McpClient(
                    streamable_http_client(url, http_client=http),
                    mode=mode,
                    **client_options,
                ) as client,
            ):
                seen["protocol_version"] = client.protocol_version
                await script(client, seen)
            seen["tokens"] = storage.tokens

        anyio.run(main)
        return seen


def access_token(
    http: httpx.Client,
    issuer: str,
    resource: str,
    username: str,
    password: str,
    scope: str,
    client_id: str | None = None,
) -> str:
    """An access token for ``resource`` by the plain OAuth flow (no SDK): a client registered
    at ``issuer`` (or the public client ``client_id``), the person's sign-in and consent, the
    code exchanged with its PKCE verifier."""
    if client_id is None:
        client_id = register_public_client(http, issuer)
    client = {"client_id": client_id}
    verifier, challenge = pkce_pair()
    params = {
        "response_type": "code",
        "client_id": client["client_id"],
        "redirect_uri": REDIRECT_URI,
        "state": "s",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "resource": resource,
        "scope": scope,
    }
    response = log_in_and_consent(
        issuer, f"{issuer}/authorize?{urlencode(params)}", username, password
    )
    code = parse_qs(urlsplit(response.headers["location"]).query)["code"][0]
    tokens = http.post(
        f"{issuer}/token",
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


def public_client(http: httpx.Client, issuer: str, name: str, **metadata) -> dict:
    """A public client registered at ``issuer`` for the plain OAuth flow: its registration."""
    response = http.post(
        f"{issuer}/register",
        json={
            "client_name": name,
            "redirect_uris": [REDIRECT_URI],
            "token_endpoint_auth_method": "none",
            "grant_types": ["authorization_code", "refresh_token"],
            **metadata,
        },
    )
    assert response.status_code == 201, response.text
    return response.json()


def register_public_client(http: httpx.Client, issuer: str) -> str:
    """The id of a public client registered at ``issuer`` for the plain OAuth flow."""
    return public_client(http, issuer, "raw test client")["client_id"]


def start(
    tmp_path,
    gateway: dict | None = None,
    replicas: int = 0,
    approvals: dict | None = None,
    policy_extra: str = "",
    signals: dict | None = None,
    oauth: dict | None = None,
    tasks: dict | None = None,
    more_upstreams: tuple[dict, ...] = (),
    database: str | None = None,
    identity: dict | None = None,
    resource_scopes: tuple[str, ...] = ("customers:read", "customers:write"),
):
    """Start everything; a context manager yielding `Running`. ``gateway`` adds settings to the
    ``[gateway]`` table, ``oauth`` to the ``[oauth]`` table; ``approvals`` is the
    ``[approvals]`` table (by default a held request waits for no answer), ``policy_extra``
    rules go after the test policy; ``replicas`` more apps share the first one's database and
    settings; ``signals`` is the ``[signals]`` table, ``tasks`` the ``[tasks]`` table;
    ``more_upstreams`` are more ``[[gateway.upstreams]]`` (each a resource too); ``database``
    is a PostgreSQL URL to use instead of a SQLite file in ``tmp_path``; ``identity`` is the
    ``[identity]`` table; ``resource_scopes`` are the scopes each server's resource offers.
    Redis's ``redis_timeout_seconds`` is PATIENCE unless ``gateway`` gives it."""
    from contextlib import contextmanager

    @contextmanager
    def running():
        module = demo_server_module()
        recorder = Recorder(module.server.streamable_http_app(streamable_http_path="/mcp"))
        lab = fresh_module("lab_server", LAB)
        lab_trace = tmp_path / "lab-trace.jsonl"
        lab.TRACE = str(lab_trace)
        upstream_sock = free_socket()
        lab_sock = free_socket()
        sock = free_socket()
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        trace = tmp_path / "stdio-trace.jsonl"
        policy = tmp_path / "policy.polar"
        policy.write_text(test_policy() + policy_extra)
        lab_app = LegacyOnly(
            lab.server.streamable_http_app(streamable_http_path="/mcp", event_store=MemoryEvents()),
            legacy=False,
        )
        old = fresh_module("lab_server_legacy", LAB)
        old.TRACE = str(lab_trace)
        old_app = LegacyOnly(
            old.server.streamable_http_app(streamable_http_path="/mcp", event_store=MemoryEvents())
        )
        # All stopped together: bastion's shutdown ends its upstream sessions, or finds them gone.
        with Servers() as servers:
            upstream_url = servers.serve(recorder, upstream_sock)
            lab_url = servers.serve(lab_app, lab_sock)
            old_url = servers.serve(old_app, free_socket())
            config = ServerConfig(
                database=database or str(tmp_path / "bastion.db"),
                policy_file=str(policy),
                oauth={
                    "issuer": base,
                    "key_dir": str(tmp_path / "keys"),
                    "resources": [
                        {
                            "uri": f"{base}/mcp/{name}",
                            "scopes": list(resource_scopes),
                        }
                        for name in (*SERVERS, *(u["name"] for u in more_upstreams))
                    ],
                    # One module's tests register many clients, all from 127.0.0.1.
                    "open_registration": {"max_per_address": 10_000},
                    **(oauth or {}),
                },
                approvals={"wait_seconds": 0} if approvals is None else approvals,
                signals=signals or {},
                tasks=tasks or {},
                identity=identity or {},
                gateway={
                    # A bound against a hang, not bastion's 1 s: a machine that does not run
                    # Redis or bastion for a second would refuse a call that must be counted
                    # ("unavailable"). A test of the timeout gives its own.
                    "redis_timeout_seconds": PATIENCE,
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
                        *more_upstreams,
                    ],
                },
            )
            app = create_app(config)
            for name in ("sam", "avery"):
                create_user(app.state.oauth.store, name, PASSWORD, time.time(), actor="test")
            app.state.store.apply(facts(), actor="test")
            with clients.client(timeout=20) as http:
                url = servers.serve(app, sock)
                apps = [create_app(config) for _ in range(replicas)]
                others = [servers.serve(other, free_socket()) for other in apps]
                yield Running(
                    url, app, recorder, trace, http, lab_trace, replicas=others, replica_apps=apps
                )

    return running()


def serve_quickstart(
    directory: Path,
    env: dict[str, str] | None = None,
    replace: dict[str, str] | None = None,
    port: int | None = None,
    prepare: Callable[[Path], None] | None = None,
    process_group: int | None = None,
) -> tuple[subprocess.Popen, str]:
    """`bastion serve` of examples/quickstart/bastion.toml in a process of its own, as `make run`
    starts it, but on a free port with a fresh database in ``directory`` (set up by the
    quickstart's setup.py). ``env`` adds environment variables (``BASTION_*`` settings);
    ``replace`` changes more of the configuration's text; ``prepare``, given the configuration's
    path, adds to the database before bastion starts. Returns the process and its URL once it
    is ready; the caller stops it. ``port``: a port chosen before (else a free one).
    ``process_group``: as `subprocess.Popen`'s (0: a group of its own, as a terminal's job).
    """
    port = port or free_socket().getsockname()[1]
    config = (QUICKSTART / "bastion.toml").read_text()
    for old, new in [
        ("127.0.0.1:8000", f"127.0.0.1:{port}"),
        ("port = 8000", f"port = {port}"),
        ('".quickstart/', f'"{directory}/'),
        ('".venv/bin/python"', json.dumps(sys.executable)),
        *(replace or {}).items(),
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
    if prepare is not None:
        prepare(path)
    return bastion_serve(path, f"http://127.0.0.1:{port}", env, process_group)


def bastion_serve(
    config: Path, url: str, env: dict[str, str] | None = None, process_group: int | None = None
) -> tuple[subprocess.Popen, str]:
    """`bastion serve --config config` in a process of its own, its output in ``serve.log`` next
    to the configuration, with ``env`` added to its environment (and in the process group
    ``process_group`` says, as `subprocess.Popen`'s). Returns the process and ``url`` once
    `/readyz` answers there; the caller stops it."""
    log = config.parent / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "bastion.cli", "serve", "--config", str(config)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            process_group=process_group,
        )
    try:
        until_ready(server, lambda: clients.ready(url), log)
    except AssertionError:
        server.kill()
        raise
    return server, url


def stop(server: subprocess.Popen) -> None:
    """Stop a process started by `bastion_serve` as an operator would (SIGTERM), or kill it."""
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(PATIENCE)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def npm_install(prefix: Path, package: str, version: str, scripts: bool = False) -> Path:
    """``package@version`` installed once into ``prefix`` (a folder of the repository kept across
    runs, gitignored), with npm; returns the package's folder. Skips (or fails under
    BASTION_REQUIRE_SERVICES=1) when node or npm is not on PATH. ``scripts`` lets the package's
    install scripts run (node@22 needs its own to fetch the binary); no other package's do."""
    for program in ("node", "npm"):
        require_program(program, shutil.which(program) or "any directory of PATH")
    prefix.mkdir(exist_ok=True)
    folder = prefix / "node_modules" / package
    # Another test run may be installing at the same moment (the tree is shared).
    with open(prefix / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = folder / "package.json"
        if not manifest.exists() or json.loads(manifest.read_text())["version"] != version:
            done = subprocess.run(
                ["npm", "install", "--prefix", str(prefix), "--save-exact", "--no-audit"]
                + ["--no-fund", "--loglevel=error"]
                + ([] if scripts else ["--ignore-scripts"])
                + [f"{package}@{version}"],
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert done.returncode == 0, f"npm install failed:\n{done.stdout}\n{done.stderr}"
    return folder


@contextmanager
def conformance_bastion(
    directory: Path,
    upstreams: dict[str, str],
    public_url: str | None = None,
    upstream_timeout: float = 60,
) -> Iterator[str]:
    """`bastion serve` (see `bastion_serve`) in front of ``upstreams`` (name: Streamable HTTP
    URL, each with ``upstream_timeout``), where the policy allows every user and agent
    everything on them and nothing anywhere else, with one user (`CONFORMANCE_USER`). Clients
    reach it at ``public_url`` (default: its own URL). Yields its URL; stops it after."""
    port = free_socket().getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    public_url = public_url or url
    names = json.dumps(list(upstreams))
    (directory / "policy.polar").write_text(
        "actor User {}\nactor Agent {}\n"
        + "".join(
            f"resource {kind} {{}}\n"
            f"allow(_actor, _action: String, _it: {kind}) if context.server in {names};\n"
            for kind in ("McpServer", "Tool", "McpResource", "Prompt")
        )
    )
    config = directory / "bastion.toml"
    text = f"""\
[server]
host = "127.0.0.1"
port = {port}
database = "{directory}/bastion.db"
policy_file = "{directory}/policy.polar"

[oauth]
issuer = "{url}"
key_dir = "{directory}/keys"

[gateway]
public_url = "{public_url}"
"""
    for name, upstream in upstreams.items():
        text += f"""
[[oauth.resources]]
uri = "{public_url}/mcp/{name}"
scopes = ["mcp"]

[[gateway.upstreams]]
name = "{name}"
url = "{upstream}"
timeout = {upstream_timeout}
"""
    config.write_text(text)
    subprocess.run(
        [sys.executable, "-m", "bastion.cli", "users", "create", CONFORMANCE_USER]
        + ["--password-stdin", "--config", str(config)],
        cwd=ROOT,
        input=CONFORMANCE_PASSWORD,
        text=True,
        check=True,
        capture_output=True,
    )
    server, url = bastion_serve(config, url)
    try:
        yield url
    finally:
        stop(server)
