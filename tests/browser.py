"""A real browser for the page tests: Debian's chromium, driven by Playwright.

Playwright never downloads a browser: it launches /usr/bin/chromium with a fresh profile, and
any request the browser makes off this machine is aborted and fails the test. A test module uses
the fixtures by importing them: ``from tests.browser import browser_fixture, tab_fixture``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

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


def _on_this_machine(url: str) -> bool:
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
            context.route(lambda url: not _on_this_machine(url), refuse)
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
