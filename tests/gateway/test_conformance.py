"""The official MCP conformance suite (`@modelcontextprotocol/conformance`, its server scenarios),
run in one test directly against an upstream written with the MCP Python SDK
(conformance_server.py), then through a real `bastion serve` in front of that upstream (spoken
to in 2026-07-28, then in 2025-11-25). Every scenario that passes directly must pass through
bastion, except those docs/gateway.md lists (section "Conformance") with the reason.

The suite needs Node 22; npm installs it (the `node` package) and the suite, pinned, into
`.npm-conformance/`, kept across runs. The suite's client cannot send an `Authorization` header,
so a forwarder written here adds the Bearer token of a real OAuth flow (sign-in and consent as a
person would) to every request, as a reverse proxy in front of bastion would forward it:
bastion's `public_url` is the forwarder's, and the `Origin` the suite sends reaches bastion as is.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import anyio
import httpx
import pytest

from tests import clients
from tests.oauth.support import free_socket, serve

from .support import (
    CONFORMANCE,
    ROOT,
    LegacyOnly,
    access_token,
    conformance_bastion,
    fresh_module,
    npm_install,
)
from .support import CONFORMANCE_PASSWORD as PASSWORD
from .support import CONFORMANCE_USER as USER

CONFORMANCE_VERSION = "0.1.16"
NODE_VERSION = "22.23.3"  # the suite's CLI needs Node 22 (fs.globSync); the machine may have 20
NPM_PREFIX = ROOT / ".npm-conformance"
DOCS = ROOT / "docs" / "gateway.md"
# Outcomes from best to worst: a scenario must not do worse through bastion than directly.
OUTCOMES = ("passed", "warned", "failed")


def install_suite() -> tuple[Path, Path]:
    """Node 22 and the suite's CLI, installed once into `.npm-conformance/` (pinned versions)."""
    node_package = npm_install(NPM_PREFIX, "node", NODE_VERSION, scripts=True)
    suite = npm_install(NPM_PREFIX, "@modelcontextprotocol/conformance", CONFORMANCE_VERSION)
    node = node_package / "bin" / "node"
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == f"v{NODE_VERSION}", version
    return node, suite / "dist" / "index.js"


class BearerForwarder:
    """ASGI: every request passed on to ``target`` with ``Authorization: Bearer <token>`` added
    (the token for the upstream named in the path), the answer streamed back as it comes (event
    streams included) until either side hangs up. Every other header goes through as the client
    sent it, `Origin` included; `Host` becomes the target's, as a reverse proxy sets it."""

    def __init__(self, target: str, tokens: dict[str, str]) -> None:
        self.target = target
        self.tokens = tokens  # the token for each upstream: /mcp/<name>

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            for step in ("startup", "shutdown"):
                await receive()
                await send({"type": f"lifespan.{step}.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = [
            (name, value)
            for name, value in scope["headers"]
            if name not in (b"host", b"authorization", b"content-length", b"connection")
        ]
        token = self.tokens.get(scope["path"].removeprefix("/mcp/"))
        if token:
            headers.append((b"authorization", f"Bearer {token}".encode()))
        url = self.target + scope["path"]
        if scope["query_string"]:
            url += "?" + scope["query_string"].decode()
        async with (
            httpx.AsyncClient(timeout=None, verify=clients.TRUST) as client,
            anyio.create_task_group() as streaming,
        ):

            async def until_the_client_hangs_up() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                streaming.cancel_scope.cancel()

            streaming.start_soon(until_the_client_hangs_up)
            request = client.build_request(scope["method"], url, headers=headers, content=body)
            response = await client.send(request, stream=True)
            try:
                await send(
                    {
                        "type": "http.response.start",
                        "status": response.status_code,
                        "headers": [
                            (name, value)
                            for name, value in response.headers.raw
                            if name.lower() not in (b"transfer-encoding", b"connection")
                        ],
                    }
                )
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            finally:
                await response.aclose()
                streaming.cancel_scope.cancel()


def run_suite(node: Path, cli: Path, url: str, out: Path) -> dict[str, dict]:
    """Every server scenario of the suite (`--suite all`) against ``url``; per scenario, its
    outcome and the checks that did not succeed."""
    done = subprocess.run(
        [node, cli, "server", "--url", url, "--suite", "all", "-o", out],
        capture_output=True,
        text=True,
        timeout=120,
    )
    results = {}
    for checks in out.glob("server-*/checks.json"):
        found = re.fullmatch(r"server-(.+)-\d{4}-\d\d-\d\dT[\d-]+Z", checks.parent.name)
        assert found, checks
        statuses = [(c["status"], c) for c in json.loads(checks.read_text())]
        failing = [c for s, c in statuses if s == "FAILURE"]
        warning = [c for s, c in statuses if s == "WARNING"]
        results[found[1]] = {
            "outcome": "failed" if failing else "warned" if warning else "passed",
            "checks": [
                f"{c['status']} {c['name']}: {c.get('errorMessage') or c['description']}"
                for c in failing + warning
            ],
        }
    assert results, f"the suite ran no scenario:\n{done.stdout}\n{done.stderr}"
    return results


def scenarios(node: Path, cli: Path) -> list[str]:
    done = subprocess.run(
        [node, cli, "list", "--server"], capture_output=True, text=True, check=True
    )
    return re.findall(r"^\s+- ([\w-]+)", done.stdout, flags=re.M)


def documented_differences() -> dict[str, str]:
    """The scenarios docs/gateway.md says do not pass through bastion, with the reason."""
    section = DOCS.read_text().split("\n## Conformance\n", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| `([\w-]+)` \| (.+?) \|$", section, flags=re.M))


@pytest.fixture(scope="module")
def suite() -> tuple[Path, Path]:
    return install_suite()


# MCPServer serves `conformance` in both eras, and bastion speaks 2026-07-28 to it;
# `conformance-2025` is the same server answering only 2025-11-25 (sessions, priming events,
# `logging/setLevel` upstream), so that the suite also runs over the older upstream path.
THROUGH_BASTION = {
    "conformance": "bastion (upstream 2026-07-28)",
    "conformance-2025": "bastion (upstream 2025-11-25)",
}


@pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning")
def test_every_conformance_scenario_that_passes_directly_passes_through_bastion(
    suite, tmp_path, capsys
):
    # (Logging is deprecated in MCP 2026-07-28; the suite's 2025-11-25 scenarios still ask it.)
    node, cli = suite
    modern = fresh_module("conformance_server", CONFORMANCE).app()
    legacy = LegacyOnly(fresh_module("conformance_server_2025", CONFORMANCE).app())
    forwarder_sock = free_socket()
    forwarder = f"http://127.0.0.1:{forwarder_sock.getsockname()[1]}"
    with serve(modern, free_socket()) as modern_url, serve(legacy, free_socket()) as legacy_url:
        results = {"directly": run_suite(node, cli, f"{modern_url}/mcp", tmp_path / "direct")}
        upstreams = {"conformance": f"{modern_url}/mcp", "conformance-2025": f"{legacy_url}/mcp"}
        # bastion's public URL is the forwarder's: its clients reach it through the forwarder.
        with (
            conformance_bastion(tmp_path, upstreams, forwarder) as url,
            httpx.Client(timeout=20) as http,
        ):
            tokens = {
                name: access_token(http, url, f"{forwarder}/mcp/{name}", USER, PASSWORD, "mcp")
                for name in THROUGH_BASTION
            }
            with serve(BearerForwarder(url, tokens), forwarder_sock):
                for name, label in THROUGH_BASTION.items():
                    results[label] = run_suite(
                        node, cli, f"{forwarder}/mcp/{name}", tmp_path / name
                    )
    log = (tmp_path / "serve.log").read_text()

    names = scenarios(node, cli)
    direct = results["directly"]
    width = max(map(len, names))
    with capsys.disabled():
        print(f"\nMCP conformance {CONFORMANCE_VERSION}, server scenarios:")
        print(f"  {'':<{width}}  " + "  ".join(results))
        for name in names:
            row = "  ".join(f"{r[name]['outcome']:<{len(label)}}" for label, r in results.items())
            print(f"  {name:<{width}}  {row}".rstrip())
            for label, r in results.items():
                for check in r[name]["checks"] if label != "directly" else ():
                    print(f"  {'':<{width}}    {label}: {check}")

    assert all(set(r) == set(names) for r in results.values())
    # The upstream does what each scenario asks: the suite finds nothing wrong with it.
    assert all(r["outcome"] != "failed" for r in direct.values()), direct
    rank = OUTCOMES.index
    worse = {
        name
        for label in THROUGH_BASTION.values()
        for name in names
        if rank(results[label][name]["outcome"]) > rank(direct[name]["outcome"])
    }
    documented = documented_differences()
    assert worse - set(documented) == set(), "worse through bastion, undocumented"
    assert set(documented) - worse == set(), "docs/gateway.md lists scenarios that now pass"
    complaints = [
        line
        for line in log.splitlines()
        if line.startswith(("WARNING", "ERROR", "CRITICAL", "Traceback"))
    ]
    assert complaints == [], log
