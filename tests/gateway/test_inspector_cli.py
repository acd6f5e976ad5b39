"""The MCP Inspector's CLI, as the README runs it, against a real `bastion serve` of the quickstart.

The Inspector (installed with npm into `.npm-inspector/`, kept across runs) finds bastion's
authorization server from the gateway's 401 challenge and runs the OAuth flow itself; the test
plays the person at the browser: it logs in (as sam; then, with `--relogin`, as avery) and
consents, and the browser is sent to the Inspector's callback listener.
"""

from __future__ import annotations

import json
import os
import pty
import queue
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.oauth.support import hidden_fields
from tests.ports import free_port
from tests.waits import PATIENCE, eventually

from .support import npm_install, serve_quickstart, stop

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "quickstart-password"  # examples/quickstart/setup.py
INSPECTOR_VERSION = "2.12.0"  # the README's command pins the same version
NPM_PREFIX = ROOT / ".npm-inspector"
TOOLS = {"search_customers", "delete_customer", "send_email"}


def install_inspector() -> Path:
    """The Inspector's launcher, installed once into `.npm-inspector/` (a pinned version)."""
    npm_install(NPM_PREFIX, "@modelcontextprotocol/inspector", INSPECTOR_VERSION)
    return NPM_PREFIX / "node_modules" / ".bin" / "mcp-inspector"


@dataclass
class Quickstart:
    """`bastion serve` of examples/quickstart/bastion.toml, on a free port and a fresh database."""

    url: str
    config: Path

    @property
    def mcp_url(self) -> str:
        return f"{self.url}/mcp/desk"

    def decisions(self) -> list[dict]:
        """The latest decision records, as `bastion audit tail --json` prints them."""
        done = subprocess.run(
            [sys.executable, "-m", "bastion.cli", "audit", "tail", "-n", "50", "--json"]
            + ["--config", str(self.config)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        return [json.loads(line) for line in done.stdout.splitlines()]

    def recorded(self, method: str, target: str, user: str) -> list[dict]:
        """The decisions on ``method`` of ``target`` for ``user``, once the gateway (which writes
        its records every 0.2 s) has written at least one."""

        def found() -> list[dict]:
            return [
                r
                for r in self.decisions()
                if (r["method"], r["target"]) == (method, target)
                and r["principals"][0] == f'User{{"{user}"}}'
            ]

        eventually(found, every=0.1)
        return found()


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quickstart")
    server, url = serve_quickstart(tmp)
    running = Quickstart(url, tmp / "bastion.toml")
    try:
        yield running
    finally:
        stop(server)


@dataclass
class Inspector:
    """`mcp-inspector --cli`, with a home of its own: its OAuth state and secrets live there."""

    launcher: Path
    home: Path

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_")}
        # The secrets in a file under `home` (no OS keychain here), and never a browser opened.
        env.update(
            HOME=str(self.home),
            MCP_INSPECTOR_SECRET_STORE="file",
            MCP_AUTO_OPEN_ENABLED="false",
            NO_COLOR="1",
        )
        return env

    def command(self, url: str, *args: str) -> list[str]:
        return [str(self.launcher), "--cli", url, "--transport", "http", *args]

    def run(self, url: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.command(url, *args),
            env=self.env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )


def error_envelope(done: subprocess.CompletedProcess) -> dict:
    """The Inspector's `{"error": {...}}` line (on stdout or stderr)."""
    for line in (done.stdout + done.stderr).splitlines():
        if line.startswith('{"error"'):
            return json.loads(line)["error"]
    raise AssertionError(f"no error envelope in:\n{done.stdout}\n{done.stderr}")


def log_in_and_consent(authorize_url: str, username: str) -> str:
    """What the person does in the browser; returns where bastion sends the browser back."""
    base = authorize_url.split("/authorize?")[0]
    with httpx.Client(follow_redirects=False, timeout=10) as browser:
        page = browser.get(authorize_url)
        assert page.status_code == 200 and "/authorize/login" in page.text, page.text
        # Who asks to act for the person: a name the Inspector chose for itself, so unverified.
        assert "&ldquo;MCP Inspector&rdquo;" in page.text and "Unverified application" in page.text
        page = browser.post(
            f"{base}/authorize/login",
            data={**hidden_fields(page.text), "username": username, "password": PASSWORD},
        )
        assert page.status_code == 200 and "/authorize/consent" in page.text, page.text
        page = browser.post(
            f"{base}/authorize/consent", data={**hidden_fields(page.text), "decision": "allow"}
        )
        assert page.is_redirect, page.text
        return page.headers["location"]


@pytest.fixture(scope="module")
def inspector_launcher() -> Path:
    return install_inspector()


@pytest.fixture(scope="module")
def sam(inspector_launcher, quickstart, tmp_path_factory):
    """The Inspector logged in as sam by its own OAuth flow, and what its first command
    (`tools/list`) printed."""
    inspector = Inspector(inspector_launcher, tmp_path_factory.mktemp("sam-home"))
    return inspector, log_in(inspector, quickstart, "sam", "--method", "tools/list")


def log_in(inspector: Inspector, quickstart: Quickstart, username: str, *args: str) -> str:
    """Run an Inspector command that needs a login, as a person at a terminal would; act as
    that person's browser. Returns what the command printed."""
    callback = f"http://127.0.0.1:{free_port()}/oauth/callback"
    # A terminal on stdin: the Inspector starts a login only when someone is there.
    terminal, terminal_side = pty.openpty()
    process = subprocess.Popen(
        inspector.command(quickstart.mcp_url, *args, "--callback-url", callback),
        env=inspector.env(),
        stdin=terminal_side,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(terminal_side)
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stderr])
    reader.start()
    try:
        prompt = "Please navigate to: "
        line = ""
        while not line.startswith(prompt):
            line = lines.get(timeout=60)
        authorize_url = line[len(prompt) :].strip()
        asked = parse_qs(urlsplit(authorize_url).query)
        # Found from the gateway's 401 challenge and bastion's metadata, not configured.
        assert authorize_url.startswith(f"{quickstart.url}/authorize?")
        assert asked["resource"] == [quickstart.mcp_url]
        assert asked["redirect_uri"] == [callback]
        back = log_in_and_consent(authorize_url, username)
        assert back.startswith(f"{callback}?code=")
        assert httpx.get(back, timeout=10).status_code == 200  # the Inspector's listener
        stdout = process.stdout.read()
        assert process.wait(PATIENCE) == 0, stdout + "".join(list(lines.queue))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(PATIENCE)
        os.close(terminal)
    return stdout


def test_inspector_logs_sam_in_through_bastion_and_lists_the_three_tools(sam):
    _, stdout = sam
    assert {tool["name"] for tool in json.loads(stdout)["tools"]} == TOOLS


def test_inspector_shows_sam_the_customers_with_emails_masked(sam, quickstart):
    inspector, _ = sam
    done = inspector.run(
        quickstart.mcp_url,
        "--method",
        "tools/call",
        "--tool-name",
        "search_customers",
        "--tool-args-json",
        '{"query": ""}',
        "--stored-auth-only",  # the token of the login above, or fail: no second login
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    customers = json.loads(result["content"][0]["text"])["customers"]
    assert [c["name"] for c in customers] == ["Ada Lovelace", "Alan Turing", "Grace Hopper"]
    assert {c["email"] for c in customers} == {"[masked]"}
    assert "@example.com" not in done.stdout


def test_inspector_cannot_delete_as_sam_and_the_refusal_is_recorded(sam, quickstart):
    inspector, _ = sam
    done = inspector.run(
        quickstart.mcp_url,
        "--method",
        "tools/call",
        "--tool-name",
        "delete_customer",
        "--tool-arg",
        "customer_id=c-101",
        "--stored-auth-only",
    )
    assert done.returncode == 1, done.stdout
    error = error_envelope(done)
    assert error["message"] == "bastion refused this request (desk/delete_customer): not permitted"
    # The Inspector prints the JSON-RPC error's message, not its data: the decision id is in
    # `bastion audit tail`.
    refused = quickstart.recorded("tools/call", 'Tool{"desk/delete_customer"}', "sam")
    assert len(refused) == 1, refused
    assert refused[0]["result"] == "deny" and refused[0]["id"]


def test_inspector_relogin_as_avery_shows_the_emails(sam, quickstart, tmp_path):
    inspector, _ = sam
    # sam's Inspector state, copied, so that sam's own stays logged in for the other tests.
    shutil.copytree(inspector.home, tmp_path / "home")
    inspector = Inspector(inspector.launcher, tmp_path / "home")
    search = ["--method", "tools/call", "--tool-name", "search_customers"]
    search += ["--tool-args-json", '{"query": ""}']
    stdout = log_in(inspector, quickstart, "avery", *search, "--relogin")
    customers = json.loads(json.loads(stdout)["content"][0]["text"])["customers"]
    assert {c["email"] for c in customers} == {
        "ada@example.com",
        "alan@example.com",
        "grace@example.com",
    }
    searched = quickstart.recorded("tools/call", 'Tool{"desk/search_customers"}', "avery")
    assert [r["result"] for r in searched] == ["allow"]


def test_inspector_without_a_token_gets_the_gateways_401(inspector_launcher, quickstart, tmp_path):
    inspector = Inspector(inspector_launcher, tmp_path)
    done = inspector.run(quickstart.mcp_url, "--method", "tools/list", "--stored-auth-only")
    assert done.returncode == 3, done.stdout  # the Inspector's exit code for auth_required
    error = error_envelope(done)
    assert error["code"] == "auth_required"
    # bastion's 401 body, as the Inspector reports it.
    assert '"error":"invalid_token"' in error["message"]
    assert "a Bearer access token is required" in error["message"]
