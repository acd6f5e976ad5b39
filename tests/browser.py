"""A real browser for the page tests: Debian's chromium, driven by Playwright.

Playwright never downloads a browser: it launches /usr/bin/chromium with a fresh profile, and
any request the browser makes off this machine is aborted and fails the test. A test module uses
the fixtures by importing them: ``from tests.browser import browser_fixture, tab_fixture``.
`ClientSite` is another site on loopback: a client's redirect URI, a page that frames others.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from html import escape
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.sync_api import BrowserContext, Page, sync_playwright

from tests.conftest import require_program

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCRATCH = "/tmp/browser-test"


@dataclass
class Tab:
    """A page in a fresh browser profile, with what the browser reported while it was used."""

    page: Page
    console_errors: list[str] = field(default_factory=list)
    failed_requests: list[tuple[str, str]] = field(default_factory=list)


def on_this_machine(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme not in ("http", "https", "ws", "wss") or parts.hostname == "127.0.0.1"


@pytest.fixture(scope="module", name="browser")
def browser_fixture() -> Iterator[tuple[BrowserContext, list[str]]]:
    """Chromium with a fresh profile, for this module; and the off-machine URLs it tried."""
    require_program("Debian's chromium", CHROMIUM)
    os.makedirs(SCRATCH, exist_ok=True)
    profile = tempfile.mkdtemp(prefix="profile-", dir=SCRATCH)
    off_machine: list[str] = []

    def refuse(route) -> None:
        off_machine.append(route.request.url)
        route.abort()

    try:
        with sync_playwright() as driver:
            context = driver.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
            )
            context.route(lambda url: not on_this_machine(url), refuse)
            yield context, off_machine
            context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(name="tab")
def tab_fixture(browser: tuple[BrowserContext, list[str]]) -> Iterator[Tab]:
    """A new page, with no cookies left from an earlier test."""
    context, off_machine = browser
    context.clear_cookies()
    tab = Tab(context.new_page())
    tab.page.on(
        "console", lambda m: tab.console_errors.append(m.text) if m.type == "error" else None
    )
    tab.page.on("requestfailed", lambda r: tab.failed_requests.append((r.url, r.failure or "")))
    yield tab
    tab.page.close()
    assert off_machine == [], "the browser tried to reach beyond this machine"


class ClientSite:
    """The client's own web site on another loopback port: the redirect URI (which records what
    it is sent, and the ``Referer`` it came with), a page that puts any URLs in <iframe>s, a
    plain page that may be framed, and a page that submits a form to any URL as soon as it
    loads (``/post?action=<url>&<field>=<value>...``: what a hostile site does)."""

    def __init__(self) -> None:
        self.arrivals: list[dict[str, list[str]]] = []
        self.referers: list[str | None] = []
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                query = parse_qs(parts.query)
                if parts.path == "/callback":
                    site.arrivals.append(query)
                    site.referers.append(self.headers.get("Referer"))
                    body = "<!doctype html><title>Client</title><h1>Back at the client</h1>"
                elif parts.path == "/post":
                    fields = "".join(
                        f"<input type=hidden name='{escape(k, quote=True)}'"
                        f" value='{escape(v[0], quote=True)}'>"
                        for k, v in query.items()
                        if k != "action"
                    )
                    action = escape(query["action"][0], quote=True)
                    body = (
                        "<!doctype html><title>Hostile</title><body"
                        " onload='document.forms[0].submit()'>"
                        f"<form method=post action='{action}'>{fields}</form>"
                    )
                elif parts.path == "/plain":
                    body = "<!doctype html><title>Plain</title><h1>A page that may be framed</h1>"
                elif parts.path == "/frame":
                    frames = "".join(
                        f"<iframe name={name} src='{escape(src[0], quote=True)}'"
                        " width=640 height=480></iframe>"
                        for name, src in query.items()
                    )
                    body = f"<!doctype html><title>Framing</title><h1>Another site</h1>{frames}"
                else:
                    self.send_error(404)
                    return
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.host = urlsplit(self.url).netloc
        self.callback = f"{self.url}/callback"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)
