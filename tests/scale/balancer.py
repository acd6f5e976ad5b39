"""Two real `bastion serve` replicas on one PostgreSQL and one Redis, behind HAProxy (Debian's
package, started here) balancing round robin, in front of the quickstart's MCP server over
Streamable HTTP. HAProxy names the replica that answered each response in `X-Bastion-Replica`,
so a test can tell which replica served what. Beside it, unless an upstream is given, the
test lab's MCP server (slow calls: tools/call `wait`) as `labhttp`."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from bastion.db import Database
from bastion.facts.model import Entity
from bastion.facts.store import FactStore
from bastion.oauth.store import OAuthStore
from bastion.oauth.users import create_user
from tests.conftest import REDIS_URL, drop_redis_keys, require_program, require_service
from tests.gateway.support import (
    LAB,
    PASSWORD,
    LegacyOnly,
    MemoryEvents,
    Recorder,
    bastion_serve,
    demo_server_module,
    facts,
    fresh_module,
)
from tests.gateway.support import stop as stop_bastion
from tests.gateway.support import test_policy as gateway_test_policy
from tests.oauth.support import free_socket, serve
from tests.waits import PATIENCE, eventually

HAPROXY = "/usr/sbin/haproxy"
ADMIN_KEY = "lb-test-admin-key-" + "x" * 32
REPLICA_HEADER = "x-bastion-replica"
# riley is on the support team as sam is: a test that changes a support member's facts changes
# riley's, so that a deployment shared by several tests keeps sam's as they were.
RILEY = ("has_role", Entity("User", "riley"), "member", Entity("Team", "support"))
# The quickstart's delete waits for a person here (tests/gateway's policy takes that out).
APPROVAL = 'requires_approval(_user: User, "call", Tool{"deskhttp/delete_customer"});\n'

# The configuration docs/operations.md gives ("Replicas behind a load balancer"), with the test's
# ports. STICKY is added when 2025-11-25 sessions must stay on the replica that opened them.
HAPROXY_CONFIG = """\
global
    maxconn 1000

defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-request 10s
    # A client that goes away (the 2026-07-28 way to cancel a call) closes the replica's
    # connection too, so bastion cancels the call upstream: without it HAProxy keeps that
    # connection open until the answer comes, and the call runs to its end.
    option abortonclose

frontend mcp
    bind 127.0.0.1:{port}
    # bastion trusts these from HAProxy only (proxy_headers): set here, never passed through.
    http-request set-header X-Forwarded-For %[src]
    http-request set-header X-Forwarded-Proto http
    http-request del-header Forwarded
    http-request del-header X-Real-IP
    default_backend bastion

backend bastion
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 500ms fall 2 rise 1
    http-response set-header X-Bastion-Replica %s
{sticky}{servers}
"""
LAB_UPSTREAM = """
[[gateway.upstreams]]
name = "labhttp"
url = "{url}"

[[oauth.resources]]
uri = "{public}/mcp/labhttp"
scopes = ["customers:read", "customers:write"]
"""
STICKY = """\
    stick-table type string len 128 size 100k expire 1h
    stick store-response res.hdr(mcp-session-id)
    stick match req.hdr(mcp-session-id)
"""


@dataclass
class Deployment:
    url: str  # the load balancer's
    replicas: dict[str, str]  # HAProxy's server name: the replica's own URL
    database: str
    recorder: Recorder | None  # None when the upstream was given
    lab_trace: Path | None  # what the lab's server noted (None when the upstream was given)
    admin: httpx.Client
    pids: dict[str, int]  # each replica's process and HAProxy's ("haproxy")
    redis_prefix: str  # the replicas' [gateway] redis_prefix: the keys they share in Redis

    def mcp_url(self, server: str = "deskhttp") -> str:
        return f"{self.url}/mcp/{server}"

    def admin_post(self, replica: str, path: str, body: dict) -> httpx.Response:
        """A `/v1` write sent to one replica directly (not through the load balancer)."""
        return self.admin.post(f"{self.replicas[replica]}{path}", json=body)


def _haproxy_config(port: int, replicas: dict[str, str], sticky: bool) -> str:
    servers = "".join(
        f"    server {name} {url.removeprefix('http://')} check\n" for name, url in replicas.items()
    )
    return HAPROXY_CONFIG.format(port=port, sticky=STICKY if sticky else "", servers=servers)


def _bastion_config(
    directory: Path, port: int, public: str, database: str, prefix: str, gateway: str = ""
) -> Path:
    directory.mkdir(exist_ok=True)
    config = directory / "bastion.toml"
    root = directory.parent
    config.write_text(
        f"""\
[server]
host = "127.0.0.1"
port = {port}
database = "{database}"
proxy_headers = true
forwarded_allow_ips = "127.0.0.1"
policy_file = "{root}/policy.polar"

[oauth]
issuer = "{public}"
key_dir = "{root}/keys"
open_registration = {{ max_per_address = 10000 }}

[[oauth.resources]]
uri = "{public}/mcp/deskhttp"
scopes = ["customers:read", "customers:write"]

[gateway]
public_url = "{public}"
redis_url = "{REDIS_URL}"
redis_prefix = "{prefix}"
redis_timeout_seconds = {PATIENCE}
{gateway}
[[gateway.upstreams]]
name = "deskhttp"
url = "{{upstream}}"
scopes = ["customers:read"]
{{lab}}
[approvals]
wait_seconds = 0
"""
    )
    return config


@contextmanager
def deployment(
    tmp_path: Path,
    postgres_url: str,
    sticky: bool = False,
    upstream: str | None = None,
    gateway: str = "",
) -> Iterator[Deployment]:
    """Everything started, stopped after; skips (or fails under BASTION_REQUIRE_SERVICES=1)
    without HAProxy or Redis. ``upstream``: the Streamable HTTP URL of a quickstart MCP server
    already running (the benchmark's, in a process of its own); by default one is started in
    a thread of this process, behind a `Recorder`. ``gateway``: more lines of both replicas'
    ``[gateway]`` table."""
    require_program("HAProxy (Debian package haproxy)", HAPROXY)
    require_service("Redis", "127.0.0.1", 6379)

    prefix = f"bastion-lb-{uuid.uuid4().hex[:12]}"
    (tmp_path / "policy.polar").write_text(gateway_test_policy() + APPROVAL)
    store = FactStore.open(postgres_url)
    try:
        store.apply(facts() + [RILEY], actor="test")
    finally:
        store.close()
    db = Database(postgres_url)
    try:
        for name in ("sam", "avery", "riley"):
            create_user(OAuthStore(db), name, PASSWORD, time.time(), actor="test")
    finally:
        db.close()

    lb_port = free_socket().getsockname()[1]
    public = f"http://127.0.0.1:{lb_port}"
    recorder = None
    lab_trace = None
    lab = ""
    with ExitStack() as stack:
        if upstream is None:
            module = demo_server_module()
            recorder = Recorder(module.server.streamable_http_app(streamable_http_path="/mcp"))
            upstream = stack.enter_context(serve(recorder, free_socket())) + "/mcp"
            lab_trace = tmp_path / "lab-trace.jsonl"
            lab_url = stack.enter_context(serve(_lab_app(lab_trace), free_socket())) + "/mcp"
            lab = LAB_UPSTREAM.format(public=public, url=lab_url)
        replicas: dict[str, str] = {}
        pids: dict[str, int] = {}
        # One after the other: the first start makes the signing keys the second one reads.
        for name in ("a", "b"):
            port = free_socket().getsockname()[1]
            config = _bastion_config(tmp_path / name, port, public, postgres_url, prefix, gateway)
            text = config.read_text().replace("{upstream}", upstream).replace("{lab}", lab)
            config.write_text(text)
            process, url = bastion_serve(
                config, f"http://127.0.0.1:{port}", {"BASTION_ADMIN_KEY": ADMIN_KEY}
            )
            stack.callback(stop_bastion, process)
            replicas[name] = url
            pids[name] = process.pid
        haproxy_config = tmp_path / "haproxy.cfg"
        haproxy_config.write_text(_haproxy_config(lb_port, replicas, sticky))
        log = stack.enter_context(open(tmp_path / "haproxy.log", "wb"))
        haproxy = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(haproxy_config)], stdout=log, stderr=log
        )
        stack.callback(_stop_haproxy, haproxy)
        pids["haproxy"] = haproxy.pid
        admin = stack.enter_context(
            httpx.Client(timeout=20, headers={"authorization": f"Bearer {ADMIN_KEY}"})
        )
        _wait_for_both(admin, public, haproxy, tmp_path / "haproxy.log")
        try:
            yield Deployment(
                public, replicas, postgres_url, recorder, lab_trace, admin, pids, prefix
            )
        finally:
            drop_redis_keys(prefix)


def _lab_app(trace: Path):
    """The test lab's MCP server (2026-07-28), noting what its tools do in ``trace``."""
    lab = fresh_module("lab_server", LAB)
    lab.TRACE = str(trace)
    app = lab.server.streamable_http_app(streamable_http_path="/mcp", event_store=MemoryEvents())
    return LegacyOnly(app, legacy=False)


def _wait_for_both(http: httpx.Client, url: str, haproxy: subprocess.Popen, log: Path) -> None:
    """Until HAProxy's health checks have found both replicas up (each answered `/readyz`)."""
    seen: set[str] = set()

    def both_seen_or_ended() -> bool:
        if haproxy.poll() is not None:
            return True
        try:
            response = http.get(f"{url}/readyz", timeout=1)
            if response.status_code == 200:
                seen.add(response.headers[REPLICA_HEADER])
        except httpx.HTTPError:
            pass
        return seen == {"a", "b"}

    eventually(both_seen_or_ended, every=0.05)
    if seen != {"a", "b"}:
        raise AssertionError(f"HAProxy did not serve both replicas:\n{log.read_text()}")


def _stop_haproxy(haproxy: subprocess.Popen) -> None:
    haproxy.terminate()
    try:
        haproxy.wait(PATIENCE)
    except subprocess.TimeoutExpired:
        haproxy.kill()
        haproxy.wait()
