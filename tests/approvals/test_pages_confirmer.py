"""The approvals page's list of the requests a person confirms, over a real `bastion serve` of
the quickstart, in Debian's chromium. An agent acting as itself (client credentials, its owner
pat) deletes customers: the policy names no approver for that, so its owner confirms
(`Approvals.confirmer`). pat, signed in, finds the request in the list and approves it; avery,
who approves other calls only (sam's reading of the internal notes), a person of no part in it
(mallory) and the agent itself do not see it; once the owner is replaced by quinn, pat no longer
sees the next request nor may answer it, and quinn, who was not its confirmer, does not see it
either (docs/approvals.md, "Where no person stands behind the call")."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.browser import Tab, browser_fixture, tab_fixture  # noqa: F401 (fixtures)
from tests.gateway.streams import messages, modern_headers, modern_request
from tests.gateway.support import ROOT, access_token, serve_quickstart, stop

PASSWORD = "quickstart-password"  # examples/quickstart/setup.py: sam, avery; and ours
PEOPLE = ("pat", "mallory", "quinn")


def cli(config: Path, *args: str, stdin: str | None = None, refused: bool = False) -> str:
    """A `bastion` command, as an administrator types it, on the quickstart's database: its
    output, or with ``refused`` what it said when it refused."""
    done = subprocess.run(
        [sys.executable, "-m", "bastion.cli", *args, "--config", str(config)],
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
    )
    if refused:
        assert done.returncode == 2, done.stdout
        return done.stderr
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    """The quickstart served by `bastion serve`, with pat, mallory and quinn as users; an agent
    "nightly cleanup" acting as itself, owned by pat, an admin of desk (its deletions held for
    a confirmation); and a key that may change agents' owners and read requests."""
    agent: dict[str, str] = {}

    def prepare(config: Path) -> None:
        for person in PEOPLE:
            cli(config, "users", "create", person, "--password-stdin", stdin=PASSWORD)
        created = json.loads(
            cli(
                config,
                *("clients", "create", "--name", "nightly cleanup", "--confidential"),
                *("--owner", "pat", "--scope", "customers:read customers:write"),
            )
        )
        agent["id"], agent["secret"] = created["client_id"], created["client_secret"]
        # (The facts are checked against the policy in force: the one serve will load.)
        cli(config, "policy", "push", "examples/quickstart/policy.polar")
        admin = f'has_role(User{{"{agent["id"]}"}}, "admin", McpServer{{"desk"}})'
        cli(config, "facts", "insert", admin)
        scopes = ("--scope", "agents:write", "--scope", "approvals")
        agent["key"] = cli(config, "keys", "create", "--name", "owners", *scopes).split()[0]

    directory = tmp_path_factory.mktemp("confirmer")
    server, url = serve_quickstart(
        directory, replace={"wait_seconds = 20": "wait_seconds = 0"}, prepare=prepare
    )
    try:
        with httpx.Client(timeout=20) as http:
            yield Served(url, http, agent, directory / "bastion.toml")
    finally:
        stop(server)


@dataclass
class Served:
    """The running bastion; the agent's id, secret and admin key; the configuration's path."""

    url: str
    http: httpx.Client
    agent: dict[str, str]
    config: Path

    def agent_token(self) -> str:
        answer = self.http.post(
            f"{self.url}/token",
            data={
                "grant_type": "client_credentials",
                "resource": f"{self.url}/mcp/desk",
                "scope": "customers:read customers:write",
            },
            auth=(self.agent["id"], self.agent["secret"]),
        )
        assert answer.status_code == 200, answer.text
        return answer.json()["access_token"]

    def rpc(self, token: str, method: str, params: dict, name: str | None) -> dict:
        response = self.http.post(
            f"{self.url}/mcp/desk",
            json=modern_request(1, method, params),
            headers=modern_headers(token, method, name),
        )
        assert response.status_code == 200, response.text
        return messages(response)[-1]

    def delete(self, token: str, customer: str) -> dict:
        call = {"name": "delete_customer", "arguments": {"customer_id": customer}}
        return self.rpc(token, "tools/call", call, "delete_customer")

    def admin(self, method: str, path: str, **kwargs) -> httpx.Response:
        """The admin API, with the key of scopes agents:write and approvals."""
        headers = {"authorization": f"Bearer {self.agent['key']}"}
        return self.http.request(method, f"{self.url}{path}", headers=headers, **kwargs)

    def status(self, request_id: str) -> str:
        answer = self.admin("GET", f"/v1/approvals/{request_id}")
        assert answer.status_code == 200, answer.text
        return answer.json()["status"]

    def owner(self, person: str) -> None:
        """Replace the agent's owner; answered once this replica applied it."""
        answer = self.admin("PATCH", f"/v1/agents/{self.agent['id']}", json={"owner": person})
        assert answer.status_code == 200, answer.text


def listed(tab: Tab, bastion: Served, person: str) -> set[str]:
    """The requests ``person`` finds on the list page, signed in there in a fresh session."""
    page = tab.page
    page.context.clear_cookies()
    page.goto(f"{bastion.url}/approvals")
    assert urlsplit(page.url).path == "/sign-in"
    page.get_by_label("Username").fill(person)
    page.get_by_label("Password").fill(PASSWORD)
    with page.expect_navigation():
        page.get_by_role("button", name="Sign in").click()
    assert urlsplit(page.url).path == "/approvals"
    assert page.get_by_role("heading", name="Requests waiting for you").is_visible()
    links = page.locator("a[href^='/approvals/']").evaluate_all(
        "links => links.map(link => link.getAttribute('href'))"
    )
    return {href.rsplit("/", 1)[1] for href in links}


def held(answer: dict) -> str:
    data = answer["error"]["data"]
    assert data["reason"] in ("approval_pending", "review_pending"), answer
    return data["approval_id"]


def test_the_owner_of_an_agent_acting_as_itself_finds_its_calls_in_the_list_and_answers_them(
    bastion: Served, tab: Tab
):
    token = bastion.agent_token()
    first = held(bastion.delete(token, "c-101"))
    # sam's reading of the internal notes waits for avery (an admin of desk): another call.
    sams = access_token(
        bastion.http, bastion.url, f"{bastion.url}/mcp/desk", "sam", PASSWORD, "customers:read"
    )
    notes = {"uri": "customers://audit-notes"}
    review = held(bastion.rpc(sams, "resources/read", notes, notes["uri"]))

    assert listed(tab, bastion, "pat") == {first}
    page = tab.page
    with page.expect_navigation():
        page.get_by_role("link", name="approve a call").click()
    assert "No approver is named: pat confirms" in page.locator("body").inner_text()
    with page.expect_navigation() as answered:
        page.get_by_role("button", name="Approve", exact=True).click()
    assert answered.value.status == 200
    assert page.locator("#status").inner_text() == "approved" == bastion.status(first)
    assert bastion.delete(token, "c-101")["result"]["content"][0]["text"] == "deleted c-101"

    second = held(bastion.delete(token, "c-102"))
    assert listed(tab, bastion, "pat") == {second}
    assert listed(tab, bastion, "avery") == {review}  # an approver of other calls only
    assert listed(tab, bastion, "mallory") == set()
    assert listed(tab, bastion, "quinn") == set()


def test_the_agent_itself_sees_no_list(bastion: Served, tab: Tab):
    token = bastion.agent_token()
    request = held(bastion.delete(token, "c-100"))
    # Its token opens no page for people: it is sent to sign in.
    shown = bastion.http.get(
        f"{bastion.url}/approvals", headers={"authorization": f"Bearer {token}"}
    )
    assert shown.status_code == 303 and urlsplit(shown.headers["location"]).path == "/sign-in"
    # Its client id and secret do not sign it in as a person.
    page = tab.page
    page.context.clear_cookies()
    page.goto(f"{bastion.url}/approvals")
    page.get_by_label("Username").fill(bastion.agent["id"])
    page.get_by_label("Password").fill(bastion.agent["secret"])
    with page.expect_navigation():
        page.get_by_role("button", name="Sign in").click()
    assert urlsplit(page.url).path == "/sign-in"
    assert request not in page.content()
    assert page.get_by_role("heading", name="Requests waiting for you").count() == 0
    # Nor can a person be made in its name, to sign in as.
    said = cli(
        bastion.config,
        "users",
        "create",
        bastion.agent["id"],
        "--password-stdin",
        stdin=PASSWORD,
        refused=True,
    )
    assert "is the id of a client: it cannot name a user" in said


def test_an_owner_replaced_meanwhile_no_longer_sees_nor_answers_the_request(
    bastion: Served, tab: Tab
):
    token = bastion.agent_token()
    request = held(bastion.delete(token, "c-102"))
    assert request in listed(tab, bastion, "pat")
    # pat has the request's page open, its form in it.
    page = tab.page
    with page.expect_navigation():
        page.locator(f"a[href='/approvals/{request}']").click()
    assert page.get_by_role("button", name="Approve", exact=True).is_visible()

    bastion.owner("quinn")
    try:
        with page.expect_navigation() as answered:
            page.get_by_role("button", name="Approve", exact=True).click()
        assert answered.value.status == 403
        # Nobody may answer it now (the new owner confirms nothing held before): closed, and
        # the call is asked again when it comes back. Before, it was pending until it expired.
        assert bastion.status(request) == "expired"
        assert request not in listed(tab, bastion, "pat")
        assert request not in listed(tab, bastion, "quinn")
    finally:
        bastion.owner("pat")
