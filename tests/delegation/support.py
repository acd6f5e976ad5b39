"""A real `bastion serve` (its own process) in front of the studio MCP server, with the example
delegation policy (examples/delegation.polar), and the parties of the mission's scenario: a
person, their coding agent (a public client that signs them in by the authorization code
flow) and sub-agents (confidential clients that get their own tokens by client_credentials)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx

from tests.command_line import bastion_in_process
from tests.gateway.streams import messages, modern_headers, modern_request
from tests.gateway.support import bastion_serve, fresh_module
from tests.oauth.support import free_socket, log_in_and_consent, pkce_pair, serve

ROOT = Path(__file__).resolve().parents[2]
POLICY = ROOT / "examples" / "delegation.polar"
STUDIO = Path(__file__).resolve().parent / "studio_server.py"
PASSWORD = "delegation-test-password"
ADMIN_KEY = "delegation-tests-admin-key-0123456789abcdef"
REDIRECT_URI = "http://127.0.0.1:9/callback"
SCOPES = ["files:read", "files:write", "svg:write"]
EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
TOOLS = ("read_file", "write_svg", "write_file", "publish")


def claims(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def entity(text: str) -> dict | str:
    """``Type:id`` as a JSON entity of /v1/facts; anything else is a string value."""
    kind, sep, ident = text.partition(":")
    if sep and kind[:1].isupper():
        return {"type": kind, "id": ident}
    return text


@dataclass
class Agent:
    client_id: str
    secret: str | None = None

    @property
    def auth(self) -> tuple[str, str] | None:
        return (self.client_id, self.secret) if self.secret else None


@dataclass
class Studio:
    url: str
    directory: Path
    config: Path
    upstream: object  # the studio server's module: what reached it
    http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=20))

    @property
    def mcp_url(self) -> str:
        return f"{self.url}/mcp/studio"

    @property
    def database(self) -> str:
        return str(self.directory / "bastion.db")

    def cli(self, *args: str, stdin: str | None = None) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "bastion.cli", *args, "--config", str(self.config)],
            cwd=ROOT,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def command(self, *args: str, stdin: str | None = None) -> str:
        """What `cli` runs, run in this process on the same database: it spares the second a
        new Python takes to start and import bastion, for each of the many users and clients
        a module makes. (`cli` is for a test whose point is another process.)"""
        done = bastion_in_process(*args, "--config", str(self.config), env=os.environ, stdin=stdin)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def register(self, *args: str) -> dict:
        """`bastion clients create *args`, run by `command`: the client as it printed it."""
        return json.loads(self.command("clients", "create", *args))

    def admin(self, path: str, body: dict) -> dict:
        response = self.http.post(
            f"{self.url}{path}", json=body, headers={"authorization": f"Bearer {ADMIN_KEY}"}
        )
        assert response.status_code == 200, response.text
        return response.json()

    def facts(self, *facts: tuple[str, ...], delete: bool = False) -> None:
        """Insert (or delete) facts through /v1/facts; this replica has them when it answers."""
        body = {"facts": [{"predicate": f[0], "args": [entity(a) for a in f[1:]]} for f in facts]}
        self.admin("/v1/facts/delete" if delete else "/v1/facts", body)

    def signal(self, user: str, name: str, value) -> None:
        self.admin(
            "/v1/signals",
            {
                "subject": {"type": "User", "id": user},
                "name": name,
                "value": value,
                "source": "mdm",
                "ttl_seconds": 3600,
            },
        )

    # -- the parties -----------------------------------------------------------------------

    def coding_agent(self, name: str = "coder") -> Agent:
        """A public client (as MCP clients are) that may exchange its tokens."""
        created = self.register(
            "--name", name, "--redirect-uri", REDIRECT_URI,
            "--grant-type", "authorization_code", "--grant-type", "refresh_token",
            "--grant-type", EXCHANGE, "--scope", " ".join(SCOPES),
        )  # fmt: skip
        return Agent(created["client_id"])

    def sub_agent(self, name: str, scope: str = " ".join(SCOPES)) -> Agent:
        """A confidential client that gets tokens for itself (and may delegate further)."""
        created = self.register(
            "--name", name, "--confidential",
            "--grant-type", "client_credentials", "--grant-type", EXCHANGE, "--scope", scope,
        )  # fmt: skip
        return Agent(created["client_id"], created["client_secret"])

    def user_token(self, agent: Agent, username: str, scope: str = " ".join(SCOPES)) -> dict:
        """The person signs in and consents; ``agent`` redeems the code (PKCE), with its
        secret if it has one."""
        verifier, challenge = pkce_pair()
        params = {
            "response_type": "code",
            "client_id": agent.client_id,
            "redirect_uri": REDIRECT_URI,
            "state": "s",
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "resource": self.mcp_url,
            "scope": scope,
        }
        response = log_in_and_consent(
            self.url, f"{self.url}/authorize?{urlencode(params)}", username, PASSWORD
        )
        code = parse_qs(urlsplit(response.headers["location"]).query)["code"][0]
        answer = self.http.post(
            f"{self.url}/token",
            data={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": REDIRECT_URI,
                "code_verifier": verifier,
                **({} if agent.secret else {"client_id": agent.client_id}),
            },
            auth=agent.auth,
        )
        assert answer.status_code == 200, answer.text
        return answer.json()

    def own_token(self, agent: Agent, scope: str | None = None) -> str:
        """A sub-agent's token for itself (client_credentials): what it shows as actor_token."""
        data = {"grant_type": "client_credentials", "resource": self.mcp_url}
        if scope:
            data["scope"] = scope
        answer = self.http.post(f"{self.url}/token", data=data, auth=agent.auth)
        assert answer.status_code == 200, answer.text
        return answer.json()["access_token"]

    def exchange(
        self, agent: Agent, subject_token: str, actor_token: str, **more
    ) -> httpx.Response:
        """``agent`` (the subject token's) asks for a token for the actor (RFC 8693)."""
        data = {
            "grant_type": EXCHANGE,
            "subject_token": subject_token,
            "subject_token_type": ACCESS_TOKEN,
            "actor_token": actor_token,
            "actor_token_type": ACCESS_TOKEN,
            **more,
        }
        if agent.secret is None:
            data["client_id"] = agent.client_id
        return self.http.post(f"{self.url}/token", data=data, auth=agent.auth)

    def call(self, token: str, tool: str, **arguments) -> dict:
        """tools/call over raw Streamable HTTP (2026-07-28): the JSON-RPC answer, or the HTTP
        error body when refused before JSON-RPC (401, 403)."""
        response = self.http.post(
            self.mcp_url,
            json=modern_request(1, "tools/call", {"name": tool, "arguments": arguments}),
            headers=modern_headers(token, "tools/call", tool),
        )
        if response.status_code != 200:
            return {"http": response.status_code, "body": response.text}
        return messages(response)[-1]

    def records(self, after: int = 0) -> list:
        """The gateway's decision records (`bastion audit tail` reads the same)."""
        from bastion.audit.decisions import DecisionRecords
        from bastion.db import Database

        records = DecisionRecords(Database(self.database, role="test"))
        try:
            return [r for _, r in records.after(after, 10_000)]
        finally:
            records.db.close()

    def events(self, kind: str) -> list:
        from bastion.audit import AuditLog
        from bastion.db import Database

        db = Database(self.database, role="test")
        try:
            return AuditLog(db).events(kind=kind)
        finally:
            db.close()


def start_studio(
    directory: Path, max_delegation_depth: int = 2, policy: Path = POLICY, settings: str = ""
):
    """A context manager: the studio upstream in a thread, `bastion serve` in a process
    (``policy``: the policy file it serves, examples/delegation.polar by default; ``settings``:
    more of bastion.toml, appended)."""
    from contextlib import contextmanager

    from tests.gateway.support import stop

    @contextmanager
    def running():
        upstream = fresh_module("studio_server", STUDIO)
        app = upstream.server.streamable_http_app(streamable_http_path="/mcp")
        with serve(app, free_socket()) as upstream_url:
            port = free_socket().getsockname()[1]
            url = f"http://127.0.0.1:{port}"
            config = directory / "bastion.toml"
            config.write_text(
                f"""\
[server]
host = "127.0.0.1"
port = {port}
database = "{directory}/bastion.db"
policy_file = "{policy}"

[oauth]
issuer = "{url}"
key_dir = "{directory}/keys"
max_delegation_depth = {max_delegation_depth}

[[oauth.resources]]
uri = "{url}/mcp/studio"
scopes = {json.dumps(SCOPES)}

[oauth.open_registration]
max_per_address = 10000

[[gateway.upstreams]]
name = "studio"
url = "{upstream_url}/mcp"
{settings}"""
            )
            studio = Studio(url, directory, config, upstream)
            studio.command("users", "create", "sam", "--password-stdin", stdin=PASSWORD)
            studio.command("users", "create", "avery", "--password-stdin", stdin=PASSWORD)
            server, _ = bastion_serve(config, url, {"BASTION_ADMIN_KEY": ADMIN_KEY})
            try:
                facts = [("has_role", "User:sam", "designer", "McpServer:studio")]
                facts += [
                    ("has_relation", f"Tool:studio/{tool}", "server", "McpServer:studio")
                    for tool in TOOLS
                ]
                studio.facts(*facts)
                yield studio
            finally:
                studio.http.close()
                stop(server)

    return running()
