"""The quickstart's people in the loop, as `make run` serves them (`bastion serve` in a process of
its own): avery's delete_customer waits for her own confirmation, given in Debian's chromium on
the page the error names, and survives a restart of bastion while it waits; sam's reading of the
internal notes is held until avery releases it. (sam's email out of hours waits for avery: it
depends on the clock, and is tested by the policy's own tests.)"""

from __future__ import annotations

import signal

import httpx
import pytest

from tests.approvals.test_pages_gateway import answer_in_browser
from tests.browser import CHROMIUM
from tests.conftest import require_program
from tests.gateway.streams import messages, modern_headers, modern_request
from tests.waits import PATIENCE

from .support import access_token, bastion_serve, serve_quickstart, stop

PASSWORD = "quickstart-password"


def rpc(http, url, token, method, params, name):
    response = http.post(
        f"{url}/mcp/desk",
        json=modern_request(1, method, params),
        headers=modern_headers(token, method, name),
    )
    assert response.status_code == 200, response.text
    return messages(response)[-1]


@pytest.fixture
def quickstart(tmp_path):
    require_program("Debian's chromium", CHROMIUM)
    server, url = serve_quickstart(tmp_path, replace={"wait_seconds = 20": "wait_seconds = 0"})
    state = {"server": server, "url": url}
    yield state, tmp_path
    stop(state["server"])


def test_averys_delete_waits_for_her_confirmation_across_a_restart(quickstart):
    state, directory = quickstart
    url = state["url"]
    with httpx.Client(timeout=20) as http:
        token = access_token(
            http, url, f"{url}/mcp/desk", "avery", PASSWORD, "customers:read customers:write"
        )
        delete = {"name": "delete_customer", "arguments": {"customer_id": "c-101"}}
        held = rpc(http, url, token, "tools/call", delete, "delete_customer")["error"]["data"]
        assert held["reason"] == "approval_pending"
        assert held["url"] == f"{url}/approvals/{held['approval_id']}"

        # bastion stops and starts again while the request waits: it is in the database.
        state["server"].send_signal(signal.SIGTERM)
        state["server"].wait(timeout=PATIENCE)
        state["server"], _ = bastion_serve(directory / "bastion.toml", url)

        status, who, shown = answer_in_browser(held["url"], "avery", password=PASSWORD)
        assert (status, who) == ("approved", "Signed in as avery.")
        assert "c-101" in shown  # the arguments, in full, on the page
        done = rpc(http, url, token, "tools/call", delete, "delete_customer")
        assert done["result"]["content"][0]["text"] == "deleted c-101"
        again = rpc(http, url, token, "tools/call", delete, "delete_customer")
        assert again["error"]["data"]["reason"] == "approval_pending"  # used once


def test_sams_reading_of_the_internal_notes_is_released_by_avery(quickstart):
    state, _ = quickstart
    url = state["url"]
    notes = {"uri": "customers://audit-notes"}
    with httpx.Client(timeout=20) as http:
        token = access_token(http, url, f"{url}/mcp/desk", "sam", PASSWORD, "customers:read")
        listed = rpc(http, url, token, "resources/list", {}, None)["result"]["resources"]
        assert "customers://audit-notes" not in [r["uri"] for r in listed]
        held = rpc(http, url, token, "resources/read", notes, notes["uri"])["error"]["data"]
        assert held["reason"] == "review_pending"
        # sam cannot release what his own agent read: the page refuses him.
        assert answer_in_browser_refused(held["url"], "sam")
        status, _, shown = answer_in_browser(held["url"], "avery", "Release", password=PASSWORD)
        assert status == "released"
        released = rpc(http, url, token, "resources/read", notes, notes["uri"])
        assert "exported customer list" in shown  # what avery reviewed
        text = released["result"]["contents"][0]["text"]
        assert text == "2026-01-12: exported customer list for the yearly review."


def answer_in_browser_refused(url: str, username: str) -> bool:
    """Whether ``username``, signed in, is shown no answer form for the request at ``url``."""
    from playwright.sync_api import sync_playwright

    from tests.browser import CHROMIUM_ARGS

    with sync_playwright() as driver:
        browser = driver.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = browser.new_context().new_page()
            page.goto(url)
            page.get_by_label("Username").fill(username)
            page.get_by_label("Password").fill(PASSWORD)
            with page.expect_navigation():
                page.get_by_role("button", name="Sign in").click()
            response = page.goto(url)
            # The only button left is the one to sign out.
            buttons = page.get_by_role("button").all_inner_texts()
            return response.status == 403 and buttons == ["Sign out"]
        finally:
            browser.close()
