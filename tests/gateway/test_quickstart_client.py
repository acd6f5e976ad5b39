"""examples/quickstart/client.py run as the README says (`.venv/bin/python
examples/quickstart/client.py sam`, then `avery`), against `bastion serve` of the quickstart on a
free port (its address the client's second argument). The test is the person at the terminal and
the browser: it signs in on bastion's login page over HTTP, pastes back the address the browser
was sent to, answers held calls with `bastion approvals approve <id> --as avery` and presses
Enter, and reads what the client prints against the README's table of what each user sees.

Two changes to `make run`'s configuration keep it fast and independent of the hour: a held call
is answered at once (wait_seconds = 0, as a person sees it who did not answer within 20 s), and
business hours never are (sam's email always waits for avery's approval)."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.oauth.support import hidden_fields
from tests.ports import free_port, free_socket
from tests.waits import PATIENCE

from .support import serve_quickstart, stop

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "examples" / "quickstart" / "client.py"
PASSWORD = "quickstart-password"  # examples/quickstart/setup.py, as the README gives it
TOOLS = ["search_customers", "delete_customer", "send_email"]
SAMS_ROLE = 'has_role(User{"sam"}, "member", Team{"support"})'
# What client.py asks with input(): its output follows on the same line.
PROMPTS = (
    "Paste the address your browser was sent to: ",
    "Press Enter once it is answered on that page: ",
    "Press Enter once it is answered: ",
)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    directory = tmp_path_factory.mktemp("quickstart")
    policy = (ROOT / "examples" / "quickstart" / "policy.polar").read_text()
    hours = 'in_time_window(context.time, "Mon-Fri", "09:00", "18:00", "Europe/Paris")'
    assert hours in policy
    (directory / "policy.polar").write_text(policy.replace(hours, "false"))
    server, url = serve_quickstart(
        directory,
        replace={
            "wait_seconds = 20": "wait_seconds = 0",
            '"examples/quickstart/policy.polar"': json.dumps(str(directory / "policy.polar")),
        },
    )
    try:
        yield url, directory / "bastion.toml"
    finally:
        stop(server)


def bastion(config: Path, *args: str) -> str:
    """A `bastion` command of the README, as the operator types it next to the client."""
    done = subprocess.run(
        [sys.executable, "-m", "bastion.cli", *args, "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


class Terminal:
    """client.py in a process of its own, and what the person at its terminal reads and types."""

    def __init__(self, user: str, url: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(CLIENT), user, url],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # Never a browser opened (the test is the browser); each line as it is printed.
            env={**os.environ, "BROWSER": "true", "PYTHONUNBUFFERED": "1"},
        )
        self.printed: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            for prompt in PROMPTS:
                line = line.replace(prompt, "")
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def line(self, containing: str) -> str:
        """Wait for the next printed line that contains ``containing``."""
        while True:
            try:
                line = self._lines.get(timeout=30)
            except queue.Empty:
                line = None
            if line is None:
                self.process.kill()
                raise AssertionError(
                    f"client.py printed no line with {containing!r}:\n"
                    + "\n".join(self.printed)
                    + self.process.stderr.read()
                )
            self.printed.append(line)
            if containing in line:
                return line

    def type(self, text: str = "") -> None:
        self.process.stdin.write(text + "\n")
        self.process.stdin.flush()

    def sign_in(self, user: str, decision: str = "allow") -> None:
        """Open the login address the client printed, sign in as ``user``, answer the consent
        page, and paste the address the browser is sent to."""
        authorize_url = self.line("/authorize?").strip()
        base = authorize_url.split("/authorize?")[0]
        with httpx.Client(timeout=10) as browser:
            page = browser.get(authorize_url)
            assert "/authorize/login" in page.text, page.text
            page = browser.post(
                f"{base}/authorize/login",
                data={**hidden_fields(page.text), "username": user, "password": PASSWORD},
            )
            assert "/authorize/consent" in page.text, page.text
            page = browser.post(
                f"{base}/authorize/consent", data={**hidden_fields(page.text), "decision": decision}
            )
            assert page.is_redirect, page.text
        self.type(page.headers["location"])

    def interrupt(self) -> tuple[int, str, str]:
        """Ctrl-C at the terminal (SIGINT): the client must end at once, whatever it waits on."""
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(PATIENCE)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(PATIENCE)
            raise AssertionError(
                "client.py did not end on Ctrl-C:\n" + self.process.stderr.read()
            ) from None
        return self.finish()

    def finish(self) -> tuple[int, str, str]:
        """Wait for the client to end: its status, all it printed, and its stderr."""
        self.process.stdin.close()
        status = self.process.wait(PATIENCE)
        self._reader.join(PATIENCE)
        while (line := self._lines.get_nowait()) is not None:
            self.printed.append(line)
        return status, "\n".join(self.printed), self.process.stderr.read()


def approve_held(terminal: Terminal, config: Path) -> None:
    """The held call's page address, as the client printed it: avery answers it from the
    command line, then the person presses Enter in the client."""
    url = terminal.line("/approvals/").split()[-1]
    bastion(config, "approvals", "approve", url.rsplit("/", 1)[1], "--as", "avery")
    terminal.type()


def shown(printed: str, label: str) -> str:
    """What the client printed after ``label`` (one value: a line, or JSON over several)."""
    start = printed.index(f"\n{label} ") + len(label) + 2
    return printed[start:].split("\n", 1)[0]


def customers(printed: str) -> list[dict]:
    """The customers `search` printed (JSON on one line, or indented over several)."""
    start = printed.index("\nsearch    ") + len("\nsearch    ")
    return json.JSONDecoder().raw_decode(printed, start)[0]["customers"]


def test_sam_sees_emails_masked_cannot_delete_and_waits_for_avery(quickstart):
    url, config = quickstart
    terminal = Terminal("sam", f"{url}/mcp/desk")
    terminal.sign_in("sam")
    approve_held(terminal, config)  # out of hours: avery approves
    approve_held(terminal, config)  # held for review: avery releases it
    status, printed, errors = terminal.finish()
    assert status == 0, printed + errors
    assert shown(printed, "tools    ") == str(TOOLS)
    assert shown(printed, "resources") == str(["customers://plans", "customers://directory"])
    found = customers(printed)
    assert [c["name"] for c in found] == ["Ada Lovelace", "Alan Turing", "Grace Hopper"]
    assert {c["email"] for c in found} == {"[masked]"}
    assert shown(printed, "send_email").startswith("waits: approval_pending, answer at ")
    assert printed.count("\nsend_email ") == 2
    assert printed.rsplit("\nsend_email ", 1)[1].startswith("sent 'Hello' to ada@example.com")
    refused = shown(printed, "delete_customer")
    assert refused.startswith(
        "refused: bastion refused this request (desk/delete_customer): not permitted (decision "
    )
    assert shown(printed, "notes    ").startswith("waits: review_pending, answer at ")
    released = printed.rsplit("\nnotes     ", 1)[1]
    assert released == "2026-01-12: exported customer list for the yearly review."
    assert "Traceback" not in errors


def test_avery_sees_emails_and_deletes_after_stepping_up_and_confirming(quickstart):
    url, config = quickstart
    terminal = Terminal("avery", f"{url}/mcp/desk")
    terminal.sign_in("avery")
    terminal.sign_in("avery")  # delete_customer needs customers:write: a second sign-in
    approve_held(terminal, config)  # her own confirmation
    status, printed, errors = terminal.finish()
    assert status == 0, printed + errors
    assert shown(printed, "tools    ") == str(TOOLS)
    assert shown(printed, "resources") == str(
        ["customers://plans", "customers://directory", "customers://audit-notes"]
    )
    assert {c["email"] for c in customers(printed)} == {
        "ada@example.com",
        "alan@example.com",
        "grace@example.com",
    }
    assert shown(printed, "send_email") == "sent 'Hello' to ada@example.com"  # no wait
    assert shown(printed, "delete_customer") == "deleted c-101"
    assert (
        shown(printed, "notes    ") == "2026-01-12: exported customer list for the yearly review."
    )
    assert "Traceback" not in errors


def test_sam_refused_at_connect_is_told_in_one_line(quickstart):
    url, config = quickstart
    bastion(config, "facts", "delete", SAMS_ROLE)
    try:
        terminal = Terminal("sam", f"{url}/mcp/desk")
        terminal.sign_in("sam")
        status, printed, errors = terminal.finish()
    finally:
        bastion(config, "facts", "insert", SAMS_ROLE)
    assert status == 1, printed + errors
    assert errors.startswith("bastion refused this request (desk): not permitted (decision ")
    assert errors.count("\n") == 1, errors


def test_a_client_started_before_bastion_is_told_in_one_line():
    down = f"http://127.0.0.1:{free_port()}/mcp/desk"
    terminal = Terminal("sam", down)
    status, printed, errors = terminal.finish()
    assert status == 1, printed + errors
    assert errors.startswith(f"cannot reach bastion at {down}: ")
    assert "check that bastion runs there" in errors, errors
    assert errors.count("\n") == 1, errors


def test_a_sign_in_the_person_denies_is_told_in_one_line(quickstart):
    url, _ = quickstart
    terminal = Terminal("sam", f"{url}/mcp/desk")
    terminal.type("sam")  # not the address: asked again
    terminal.sign_in("sam", decision="deny")
    status, printed, errors = terminal.finish()
    assert status == 1, printed + errors
    assert "That address has no ?code=" in printed
    assert errors.startswith("sign-in failed: access_denied: ")
    assert errors.count("\n") == 1, errors


def test_sam_is_told_what_still_waits_and_what_avery_withheld(quickstart):
    url, config = quickstart
    terminal = Terminal("sam", f"{url}/mcp/desk")
    terminal.sign_in("sam")
    terminal.line("send_email waits: ")
    terminal.type()  # Enter before avery has answered
    notes = terminal.line("notes     waits: ").rsplit("/", 1)[1]
    bastion(config, "approvals", "deny", notes, "--as", "avery")  # withheld
    terminal.type()
    status, printed, errors = terminal.finish()
    assert status == 0, printed + errors
    assert printed.rsplit("\nsend_email ", 1)[1].startswith(
        "still waits: bastion holds this request (desk/send_email): it waits for approval;"
        " retry after it is answered (decision "
    )
    assert printed.rsplit("\nnotes     ", 1)[1].startswith(
        "refused: bastion refused this request (desk/customers://audit-notes): review withheld"
        " (decision "
    )


def test_ctrl_c_at_a_prompt_ends_the_client_at_once_in_one_line(quickstart):
    url, _ = quickstart
    terminal = Terminal("sam", f"{url}/mcp/desk")
    terminal.line("/authorize?")  # then it asks for the address the browser was sent to
    status, printed, errors = terminal.interrupt()
    assert status == 130, printed + errors
    assert errors == "interrupted (Ctrl-C)\n", errors


def test_input_ending_at_a_prompt_ends_the_client_in_one_line(quickstart):
    """Ctrl-D at the terminal, or a script that pipes too few lines: no traceback."""
    url, _ = quickstart
    terminal = Terminal("sam", f"{url}/mcp/desk")
    terminal.line("/authorize?")  # then it asks for the address the browser was sent to
    status, printed, errors = terminal.finish()  # its input ends
    assert status == 1, printed + errors
    assert errors == "input ended at a prompt (Ctrl-D, or nothing more piped in)\n", errors


def test_ctrl_c_while_bastion_has_not_answered_ends_the_client_at_once():
    with free_socket() as silent:  # takes the connection, never answers
        silent.listen()
        terminal = Terminal("sam", f"http://127.0.0.1:{silent.getsockname()[1]}/mcp/desk")
        silent.settimeout(30)
        connection, _ = silent.accept()
        with connection:
            status, printed, errors = terminal.interrupt()
    assert status == 130, printed + errors
    assert errors == "interrupted (Ctrl-C)\n", errors


@contextmanager
def web_server(status: int, content_type: str, body: bytes) -> Iterator[str]:
    """A real HTTP server that is not an MCP gateway: every request gets the same answer."""

    class Answer(BaseHTTPRequestHandler):
        def answer(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_DELETE = answer

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.mark.parametrize(
    "answer, said",
    [
        ((404, "text/plain", b"Not Found"), "HTTP 404"),
        ((200, "text/html", b"<html><body>a web page</body></html>"), "HTTP 200 text/html"),
    ],
    ids=["404", "a web page"],
)
def test_an_address_with_no_mcp_gateway_is_told_in_one_line_with_what_to_check(answer, said):
    with web_server(*answer) as site:
        wrong = f"{site}/mcp/desk"
        terminal = Terminal("sam", wrong)
        status, printed, errors = terminal.finish()
    assert status == 1, printed + errors
    assert errors.startswith(f"no MCP gateway at {wrong}: initialize was answered {said}"), errors
    assert "check the address" in errors, errors
    assert errors.count("\n") == 1, errors
