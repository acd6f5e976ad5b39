"""Held calls end to end: the official MCP SDK client's call is held by the gateway, the
approver opens the page the error names in Debian's chromium, signs in and approves, and the
client's retry goes through, once, in both protocol eras; a result held for review is released
on the page with a field withheld, and reaches the agent without it."""

from __future__ import annotations

import json

import anyio
import pytest
from mcp.shared.exceptions import MCPError
from playwright.sync_api import sync_playwright

from tests.browser import CHROMIUM, CHROMIUM_ARGS, on_this_machine
from tests.conftest import require_program
from tests.gateway.streams import messages, modern_headers, modern_request
from tests.gateway.support import PASSWORD, start

RULES = """
declare approval_grant(User, Agent, String, Tool);
requires_approval(_user: User, "call", Tool{"deskhttp/send_email"});
approver(User{"avery"}, User{"sam"}, "call", Tool{"deskhttp/send_email"});
requires_review(_user: User, "read", McpResource{"deskhttp/customers://directory"});
approver(User{"avery"}, _user: User, "read", McpResource{"deskhttp/customers://directory"});
"""
EMAIL = {"to": "ada@example.com", "subject": "hello", "body": "hi"}


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    require_program("Debian's chromium", CHROMIUM)
    with start(
        tmp_path_factory.mktemp("pages-gateway"),
        approvals={"wait_seconds": 0},
        policy_extra=RULES,
    ) as running:
        yield running


def answer_in_browser(
    url: str,
    username: str,
    button: str = "Approve",
    fill: dict[str, str] | None = None,
    password: str = PASSWORD,
) -> tuple[str, str, str]:
    """As the approver: open ``url`` in a fresh chromium, sign in where it sends you, fill the
    fields labelled as in ``fill``, press ``button``. Returns the request's status after, what
    the page said it was signed in as, and the text of the page before the answer. Runs in a
    thread of its own when an SDK client's event loop runs in the test's."""
    off_machine: list[str] = []
    with sync_playwright() as driver:
        browser = driver.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            context = browser.new_context()

            def refuse(route) -> None:
                off_machine.append(route.request.url)
                route.abort()

            context.route(lambda u: not on_this_machine(u), refuse)
            page = context.new_page()
            page.goto(url)
            assert page.title() == "Sign in to bastion"
            page.get_by_label("Username").fill(username)
            page.get_by_label("Password").fill(password)
            with page.expect_navigation():
                page.get_by_role("button", name="Sign in").click()
            assert page.url == url
            who = page.locator("p").first.inner_text()
            before = page.locator("body").inner_text()
            for label, value in (fill or {}).items():
                page.get_by_label(label).fill(value)
            with page.expect_navigation():
                page.get_by_role("button", name=button, exact=True).click()
            status = page.locator("#status").inner_text()
        finally:
            browser.close()
    assert off_machine == []
    return status, who, before


async def attempt(client, seen, tool, arguments):
    try:
        result = await client.call_tool(tool, arguments)
        seen.setdefault("calls", []).append(("ok", result.content[0].text))
    except MCPError as e:
        seen.setdefault("calls", []).append(("error", e.error.code, e.error.data))


@pytest.mark.parametrize("mode", ["legacy", "auto"])  # 2025-11-25, 2026-07-28
def test_a_held_call_approved_on_the_page_in_a_browser_goes_through_once(bastion, mode):
    email = {**EMAIL, "subject": f"page {mode}"}

    async def script(client, seen):
        await attempt(client, seen, "send_email", email)
        _, _, held = seen["calls"][-1]
        seen["held"] = held
        answered = await anyio.to_thread.run_sync(answer_in_browser, held["url"], "avery")
        seen["answered"] = answered[:2]
        await attempt(client, seen, "send_email", email)  # goes through
        await attempt(client, seen, "send_email", email)  # the approval is spent: held anew

    seen = bastion.sdk("sam", "deskhttp", mode, script)
    held = seen["held"]
    assert held["reason"] == "approval_pending"
    assert held["url"] == f"{bastion.url}/approvals/{held['approval_id']}"
    assert seen["answered"] == ("approved", "Signed in as avery.")
    (_, *_), (ok, text), (_, _, again) = seen["calls"]
    assert ok == "ok" and "ada@example.com" in text
    assert again["reason"] == "approval_pending" and again["approval_id"] != held["approval_id"]
    request = bastion.app.state.approvals.get(held["approval_id"])
    assert request.status == "used"
    assert [(a.approver, a.channel) for a in request.answers] == [("avery", "page")]


def test_a_result_released_on_the_page_with_a_field_withheld_reaches_the_agent_without_it(
    bastion,
):
    token = bastion.token("sam", "deskhttp")
    uri = "customers://directory"
    held = read(bastion, token, uri)["error"]["data"]
    assert held["reason"] == "review_pending"
    status, _, shown = answer_in_browser(
        held["url"],
        "avery",
        "Release with these fields withheld",
        {"Fields to withhold": "customers.*.plan"},
    )
    assert status == "released"
    # avery saw the result she released (her policy masks nothing of it).
    assert "Ada Lovelace" in shown and "enterprise" in shown
    released = read(bastion, token, uri)
    assert "result" in released, released
    text = json.dumps(released["result"])
    assert "Ada Lovelace" in text
    assert "enterprise" not in text  # withheld by avery
    assert "ada@example.com" not in text  # masked for sam by the policy, as any result is
    request = bastion.app.state.approvals.get(held["approval_id"])
    assert request.status == "delivered" and request.withheld_fields == ("customers.*.plan",)


def read(bastion, token: str, uri: str) -> dict:
    response = bastion.http.post(
        bastion.mcp_url("deskhttp"),
        json=modern_request(1, "resources/read", {"uri": uri}),
        headers=modern_headers(token, "resources/read", uri),
    )
    assert response.status_code == 200, response.text
    # Plain JSON, or an event stream when the answer took a while (under load).
    return messages(response)[-1]
