"""The approver's pages on a real bastion (uvicorn on loopback, a SQLite file, a policy that
names approvers), in Debian's chromium driven by Playwright, and with a plain HTTP client for
what a person's browser would never send (forged answers, another site's form).

Held requests are made as the gateway makes them (`Approvals.hold`); who may answer is the
policy's, and the page is only a way to answer: every refusal is the model's.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit

import httpx
import pytest
from playwright.sync_api import Page

from bastion.approvals.service import Approvals, Call
from bastion.approvals.store import ApprovalRequest
from bastion.facts.model import Entity
from bastion.oauth import registration
from bastion.oauth.sign_in import SESSION_COOKIE
from bastion.oauth.users import create_user
from bastion.policy.parser import parse_fact
from bastion.server.app import create_app
from bastion.server.config import ServerConfig
from bastion.signals.suspensions import resume, suspend, suspension
from tests import clients
from tests.approvals.support import POLICY_HEAD
from tests.browser import ClientSite, Tab, browser_fixture, tab_fixture  # noqa: F401 (fixtures)
from tests.oauth.support import Clock, free_socket, hidden_fields, serve
from tests.waits import PATIENCE, eventually

PASSWORD = "approval-pages-test-password"
POLICY = (
    POLICY_HEAD
    + """
# sam's manager approves sam's emails, for up to 30 minutes at a time.
requires_approval(_user: User, "call", Tool{"desk/send_email"});
approver(boss: User, user: User, "call", Tool{"desk/send_email"}) if manager(user, boss);
approval_window(_user: User, "call", Tool{"desk/send_email"}, 30);
# Nobody is named: the user confirms their own agent's call.
requires_approval(_user: User, "call", Tool{"desk/delete_customer"});
# avery reviews what is read from the audit notes, and sees no social security number.
requires_review(_user: User, "read", McpResource{"desk/customers://audit-notes"});
approver(User{"avery"}, _user: User, "read", McpResource{"desk/customers://audit-notes"});
mask(User{"avery"}, "read", McpResource{"desk/customers://audit-notes"}, "customers.*.ssn");
# A wire needs two distinct approvers.
requires_approval(_user: User, "call", Tool{"desk/wire"});
approver(boss: User, user: User, "call", Tool{"desk/wire"}) if manager(user, boss);
approver(User{"cfo"}, _user: User, "call", Tool{"desk/wire"});
approvals_required(_user: User, "call", Tool{"desk/wire"}, 2);
# sam's manager approves getting the summary prompt (completing its arguments is getting it).
requires_approval(_user: User, "get", Prompt{"desk/summary"});
approver(boss: User, user: User, "get", Prompt{"desk/summary"}) if manager(user, boss);
approval_window(_user: User, "get", Prompt{"desk/summary"}, 30);
"""
)
FACTS = ['manager(User{"sam"}, User{"avery"})']
SEND = Entity("Tool", "desk/send_email")
DELETE = Entity("Tool", "desk/delete_customer")
NOTES = Entity("McpResource", "desk/customers://audit-notes")
WIRE = Entity("Tool", "desk/wire")
HELD_RESULT = {
    "contents": [{"uri": "customers://audit-notes", "mimeType": "application/json", "text": ""}],
    "structuredContent": {
        "customers": [
            {"name": "Ada", "email": "ada@example.com", "ssn": "078-05-1120"},
            {"name": "Bob", "email": "bob@example.com", "ssn": "219-09-9999"},
        ]
    },
}


@dataclass
class Running:
    url: str
    app: object
    clock: Clock
    agent: str  # the client id of the agent whose calls are held

    @property
    def approvals(self) -> Approvals:
        return self.app.state.approvals

    def page_url(self, request: ApprovalRequest) -> str:
        return f"{self.url}/approvals/{request.id}"

    def get(self, request_id: str) -> ApprovalRequest:
        found = self.approvals.get(request_id)
        assert found is not None
        return found


@pytest.fixture(scope="module")
def bastion(tmp_path_factory) -> Iterator[Running]:
    """bastion with its authorization server, a gateway (no upstream is needed to hold calls)
    and approvals; sam, avery, mallory and cfo can sign in. The approvals' clock can be moved."""
    tmp = tmp_path_factory.mktemp("pages")
    policy = tmp / "policy.polar"
    policy.write_text(POLICY)
    sock = free_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = ServerConfig(
        database=str(tmp / "bastion.db"),
        policy_file=str(policy),
        oauth={
            "issuer": base,
            "key_dir": str(tmp / "keys"),
            "resources": [{"uri": f"{base}/mcp/desk", "scopes": ["customers:read"]}],
        },
        gateway={"upstreams": []},
        approvals={"wait_seconds": 0},
    )
    app = create_app(config)
    for name in ("sam", "avery", "mallory", "cfo"):
        create_user(app.state.oauth.store, name, PASSWORD, time.time(), actor="test")
    seq = app.state.store.apply([parse_fact(f) for f in FACTS], actor="test").seq
    values = registration.validate_client_metadata(
        {"client_name": "Support <b>agent</b>", "redirect_uris": ["http://127.0.0.1:9/cb"]},
        app.state.oauth.settings,
    )
    agent = registration.new_client(values, source="dynamic", now=time.time()).client
    app.state.oauth.store.save_client(agent)
    clock = Clock()
    app.state.approvals.clock = clock
    app.state.approvals.store.clock = clock
    with serve(app, sock) as url:
        assert eventually(
            lambda: (
                app.state.replica.applied >= seq and app.state.replica.policy_version is not None
            ),
            every=0.01,
        ), "the replica did not load the policy"
        yield Running(url, app, clock, agent.client_id)


def hold(
    bastion: Running,
    resource: Entity = SEND,
    subject: str = "sam",
    arguments: dict | None = None,
    kind: str = "approval",
    result: dict | None = None,
    agents: tuple[str, ...] = (),
) -> ApprovalRequest:
    """A held call (or result), as the gateway holds it; arguments unique to this call.
    ``agents``: a delegated token's chain, first to calling (ours)."""
    arguments = {"to": "x@example.com", "nonce": uuid.uuid4().hex, **(arguments or {})}
    action = "read" if resource.type == "McpResource" else "call"
    method = "resources/read" if action == "read" else "tools/call"
    call = Call(
        kind,
        subject,
        bastion.agent,
        "desk",
        method,
        action,
        resource,
        arguments,
        uuid.uuid4().hex,
        agents,
    )
    predicate = "requires_review" if kind == "review" else "requires_approval"
    rule = f"{predicate}(User{{{subject!r}}}, {action!r}, {resource!r})"
    return bastion.approvals.hold(call, uuid.uuid4().hex, (rule,), {}, result)


# -- a person, as a browser with no script (for what a page never sends) ------------------------


@contextmanager
def signed_in(bastion: Running, username: str) -> Iterator[httpx.Client]:
    """An HTTP client with ``username``'s session, by the sign-in page."""
    with clients.client(base_url=bastion.url, follow_redirects=False, timeout=10) as http:
        page = http.get("/sign-in", params={"next": "/approvals"})
        assert page.status_code == 200, page.text
        fields = {**hidden_fields(page.text), "username": username, "password": PASSWORD}
        done = http.post("/sign-in", data=fields)
        assert done.status_code == 303, done.text
        assert done.headers["location"] == "/approvals"
        yield http


def csrf_of(html: str) -> str:
    return hidden_fields(html)["csrf_token"]


# -- a person, in the browser ----------------------------------------------------------------------


def text_of(page: Page) -> str:
    return " ".join(page.locator("body").inner_text().split())


def sign_in(tab: Tab, username: str, password: str = PASSWORD) -> int:
    """Type the username and password on the sign-in page and press the button."""
    page = tab.page
    assert page.title() == "Sign in to bastion"
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    with page.expect_navigation() as navigation:
        page.get_by_role("button", name="Sign in").click()
    return navigation.value.status


def open_signed_in(tab: Tab, bastion: Running, request: ApprovalRequest, username: str) -> int:
    """Open the request's page signed out, sign in where it sends you; the status after."""
    page = tab.page
    response = page.goto(bastion.page_url(request))
    assert response is not None and response.status == 200
    assert urlsplit(page.url).path == "/sign-in"
    status = sign_in(tab, username)
    assert page.url == bastion.page_url(request)
    return status


def press(tab: Tab, name: str) -> int:
    page = tab.page
    with page.expect_navigation() as navigation:
        page.get_by_role("button", name=name, exact=True).click()
    return navigation.value.status


# -- approving, denying ----------------------------------------------------------------------------


def test_sign_in_then_approve_once(bastion: Running, tab: Tab, tmp_path):
    request = hold(bastion, arguments={"subject": "<script>alert(1)</script> & more"})
    page = tab.page
    assert open_signed_in(tab, bastion, request, "avery") == 200
    assert page.get_by_role("heading", name="Approve this call?").is_visible()
    text = text_of(page)
    assert "Signed in as avery" in text
    for shown in ("sam", "desk", "tools/call", 'Tool{"desk/send_email"}', "pending"):
        assert shown in text
    # The agent by the name it gave itself, said to be unverified, and its client id.
    agent = " ".join(page.get_by_role("row", name="Agent").inner_text().split())
    assert agent == (
        f"Agent Support <b>agent</b> (an unverified name: the client registered itself), client"
        f" {bastion.agent}"
    )
    assert "Approvers named by the policy: avery" in text
    assert "requires_approval(User{'sam'}, 'call', Tool{\"desk/send_email\"})" in text
    # The arguments in full, as JSON, escaped: shown as text, never run.
    arguments = page.locator("#arguments").inner_text()
    assert '"subject": "<script>alert(1)</script> & more"' in arguments
    assert request.arguments["nonce"] in arguments
    assert page.locator("script").count() == 0
    assert page.get_by_text("this call only").is_visible()
    page.screenshot(path=tmp_path / "approval.png", full_page=True)

    assert press(tab, "Approve") == 200
    assert page.url == bastion.page_url(request)
    assert page.locator("#status").inner_text() == "approved"
    assert page.get_by_role("button", name="Approve").count() == 0
    answered = bastion.get(request.id)
    assert answered.status == "approved"
    [answer] = answered.answers
    assert (answer.approver, answer.answer, answer.minutes, answer.channel) == (
        "avery",
        "approve",
        0,
        "page",
    )
    assert "avery approved page" in text_of(page)
    assert tab.console_errors == [] and tab.failed_requests == []


def test_a_delegated_call_shows_whom_the_calling_agent_works_for(bastion: Running, tab: Tab):
    coder = "coder <b>one</b>"
    request = hold(bastion, agents=(coder, bastion.agent))
    page = tab.page
    assert open_signed_in(tab, bastion, request, "avery") == 200
    chain = " ".join(page.get_by_role("row", name="For agents").inner_text().split())
    assert chain == f"For agents sam \u2192 {coder} \u2192 {bastion.agent} (delegated)"
    assert page.locator("b").count() == 0
    # A person the request does not involve sees no more of it than before: no chain either.
    with signed_in(bastion, "mallory") as http:
        assert "For agents" not in http.get(urlsplit(bastion.page_url(request)).path).text
    # A direct grant's call has no such row.
    direct = hold(bastion)
    page.goto(bastion.page_url(direct))
    assert page.get_by_role("row", name="For agents").count() == 0


def test_approve_for_minutes_gives_a_grant_that_expires(bastion: Running, tab: Tab):
    request = hold(bastion)
    page = tab.page
    open_signed_in(tab, bastion, request, "avery")
    assert page.get_by_text("minutes (at most 30)").is_visible()
    page.get_by_label('any call of Tool{"desk/send_email"}').check()
    page.get_by_label("Minutes").fill("10")
    assert press(tab, "Approve") == 200
    answered = bastion.get(request.id)
    assert answered.status == "approved"
    assert answered.answers[0].minutes == 10
    grants = list(bastion.app.state.store.get(("approval_grant", None, None, None, None)))
    assert any(
        g.fact[1] == Entity("User", "sam") and g.fact[4] == SEND and g.expires_at is not None
        for g in grants
    )
    assert "approved for 10 minutes" in text_of(page)


def test_approval_for_minutes_says_the_action_and_target_it_covers_as_the_policy_sees_them(
    bastion: Running, tab: Tab
):
    """A prompt's completion is decided as ``get`` of the prompt: a grant for minutes covers
    ``prompts/get`` of it too, with any arguments. Before, the page offered "this tool, any
    arguments" (it is no tool, and its other requests were not named)."""
    call = Call(
        "approval",
        "sam",
        bastion.agent,
        "desk",
        "completion/complete",
        "get",
        Entity("Prompt", "desk/summary"),
        {"argument": {"name": "customer", "value": "A"}, "context": None},
        uuid.uuid4().hex,
    )
    rule = 'requires_approval(User{"sam"}, "get", Prompt{"desk/summary"})'
    request = bastion.approvals.hold(call, uuid.uuid4().hex, (rule,), {}, None)
    page = tab.page
    open_signed_in(tab, bastion, request, "avery")
    option = " ".join(page.locator("label:has(input[value=minutes])").inner_text().split())
    assert "tool" not in option
    assert option == (
        'any get of Prompt{"desk/summary"} by sam through this agent under no task, with any'
        " arguments (prompts/get, and completion/complete of its arguments), for"
    )


def _held_under(bastion: Running, task: str, customer: str) -> ApprovalRequest:
    """sam's agent's prompts/get of desk/summary for ``customer``, held under ``task``."""
    call = Call(
        "approval",
        "sam",
        bastion.agent,
        "desk",
        "prompts/get",
        "get",
        Entity("Prompt", "desk/summary"),
        {"name": "summary", "arguments": {"customer": customer}},
        uuid.uuid4().hex,
        (),
        task,
    )
    rule = 'requires_approval(User{"sam"}, "get", Prompt{"desk/summary"})'
    return bastion.approvals.hold(call, uuid.uuid4().hex, (rule,), {}, None)


def test_the_page_shows_the_task_the_call_was_held_under(bastion: Running):
    """The approver judges a call made for a task (an approval counts under that task alone):
    the page names it, and says what an approval for minutes lets through under it."""

    in_task, untasked = _held_under(bastion, "t-42", "A"), _held_under(bastion, "", "A")
    with signed_in(bastion, "avery") as http:
        page = http.get(f"/approvals/{in_task.id}").text
        assert "<code id=task>t-42</code>" in page
        assert "through this agent under task <code>t-42</code>, with any arguments" in page
        page = http.get(f"/approvals/{untasked.id}").text
        assert "<span id=task>none (the token is for no task)</span>" in page
        assert "through this agent under no task, with any arguments" in page


def test_a_task_that_would_read_as_another_is_shown_escaped_on_the_page(bastion: Running):
    """bastion names its tasks itself; whatever a task id holds, the page shows it escaped: no
    markup, no direction override, no line break, cut when long."""
    task = "t-1<b>x</b>\u202egnp.exe\n" + "y" * 500
    request = _held_under(bastion, task, "B")
    with signed_in(bastion, "avery") as http:
        page = http.get(f"/approvals/{request.id}").text
    assert "<b>" not in page and "\u202e" not in page and "y" * 500 not in page
    assert "<code id=task>t-1&lt;b&gt;x&lt;/b&gt;\\u202egnp.exe\\u000a" in page


def test_minutes_past_the_policys_window_are_refused_and_change_nothing(bastion: Running):
    request = hold(bastion)
    with signed_in(bastion, "avery") as http:
        page = http.get(f"/approvals/{request.id}")
        for minutes in ("31", "0", "-5", "1e3", "٣", ""):
            answer = http.post(
                f"/approvals/{request.id}",
                data={
                    "csrf_token": csrf_of(page.text),
                    "answer": "approve",
                    "duration": "minutes",
                    "minutes": minutes,
                },
            )
            assert answer.status_code == 400, minutes
            assert "Enter a whole number of minutes from 1 to 30." in answer.text
        # A field sent twice is refused, not read one way or the other.
        twice = http.post(
            f"/approvals/{request.id}",
            content=urlencode(
                [("csrf_token", csrf_of(page.text)), ("answer", "deny"), ("answer", "approve")]
            ),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert twice.status_code == 400 and "more than once" in twice.text
    assert bastion.get(request.id).status == "pending" and bastion.get(request.id).answers == ()


def test_deny_with_a_reason(bastion: Running, tab: Tab):
    request = hold(bastion)
    page = tab.page
    open_signed_in(tab, bastion, request, "avery")
    page.get_by_label("Reason (optional)").fill("not to <this> address")
    assert press(tab, "Deny") == 200
    assert page.locator("#status").inner_text() == "denied"
    answered = bastion.get(request.id)
    assert answered.status == "denied"
    assert answered.answers[0].reason == "not to <this> address"
    assert "not to <this> address" in page.locator("#answers").inner_text()


# -- who may answer --------------------------------------------------------------------------------


def test_a_person_who_is_not_an_approver_gets_403_no_form_and_a_forged_answer_is_refused(
    bastion: Running, tab: Tab
):
    request = hold(bastion, arguments={"secret": "only-for-approvers"})
    page = tab.page
    assert open_signed_in(tab, bastion, request, "mallory") == 403
    text = text_of(page)
    assert "You may not answer this request: mallory is not an approver" in text
    # The only form is the one to sign out.
    assert page.locator("form:not(.sign-out)").count() == 0
    assert page.get_by_role("button").all_inner_texts() == ["Sign out"]
    # The summary, not what the call carries.
    assert "only-for-approvers" not in page.content()
    assert page.locator("#arguments").count() == 0

    with signed_in(bastion, "mallory") as http:
        # A token that is right for mallory's own session and this request changes nothing.
        session = http.cookies[SESSION_COOKIE]
        token = bastion.app.state.oauth.form_tokens.token(f"approval:{request.id}", session)
        forged = http.post(
            f"/approvals/{request.id}", data={"csrf_token": token, "answer": "approve"}
        )
        assert forged.status_code == 403
        assert "not an approver of this request" in forged.text
        assert "name=answer" not in forged.text
    assert bastion.get(request.id).status == "pending" and bastion.get(request.id).answers == ()


def test_a_suspended_approver_gets_403_no_form_and_their_answer_is_refused(bastion: Running):
    """sam's email may be approved by either of his managers, avery or dana: while avery is
    suspended it waits for dana (with avery its only approver it would be closed when shown:
    nobody could answer it, tests/approvals/test_service.py)."""
    second = parse_fact('manager(User{"sam"}, User{"dana"})')
    facts_now(bastion, inserts=[second])
    with signed_in(bastion, "avery") as http:
        try:
            request = hold(bastion)
            assert request.approvers == ("avery", "dana")
            session = http.cookies[SESSION_COOKIE]
            token = bastion.app.state.oauth.form_tokens.token(f"approval:{request.id}", session)
            kill_switch(bastion, suspend)
            shown = http.get(f"/approvals/{request.id}")
            listed = http.get("/approvals")
            answered = http.post(
                f"/approvals/{request.id}", data={"csrf_token": token, "answer": "approve"}
            )
        finally:
            kill_switch(bastion, resume)
            facts_now(bastion, deletes=[second])
        assert shown.status_code == answered.status_code == 403
        for page in (shown, answered):
            assert "avery is suspended" in page.text and "name=answer" not in page.text
        assert request.id not in listed.text
        assert bastion.get(request.id).status == "pending" and bastion.get(request.id).answers == ()
        # Resumed, the same session answers.
        approved = http.post(
            f"/approvals/{request.id}", data={"csrf_token": token, "answer": "approve"}
        )
    assert approved.status_code in (200, 303), approved.text
    assert bastion.get(request.id).status == "approved"


def facts_now(bastion: Running, inserts=(), deletes=()) -> None:
    """Store a fact change and wait until the server decides on it (its replica applied it)."""
    seq = bastion.app.state.store.apply(inserts, deletes, actor="test").seq
    assert eventually(lambda: bastion.app.state.replica.applied >= seq, every=0.01), (
        "the replica did not apply the change"
    )


def test_an_approver_the_policy_removes_after_the_page_was_shown_has_their_answer_refused(
    bastion: Running,
):
    """avery is shown sam's request with its form; the policy stops naming her (she is no longer
    sam's manager) before she presses approve: the answer is refused at post, nothing recorded."""
    request = hold(bastion)
    manager = parse_fact(FACTS[0])
    with signed_in(bastion, "avery") as http:
        shown = http.get(f"/approvals/{request.id}")
        assert shown.status_code == 200 and "name=answer" in shown.text, shown.text
        facts_now(bastion, deletes=[manager])
        try:
            answered = http.post(
                f"/approvals/{request.id}",
                data={"csrf_token": csrf_of(shown.text), "answer": "approve"},
            )
        finally:
            facts_now(bastion, inserts=[manager])
    assert answered.status_code == 403, answered.text
    assert "not an approver" in answered.text and "name=answer" not in answered.text
    assert bastion.get(request.id).status == "pending" and bastion.get(request.id).answers == ()


def test_a_suspended_person_sees_no_more_of_a_request_than_its_summary(bastion: Running):
    """The kill switch holds avery: the requests she is named on, or answered, are shown to her as
    to anyone else (403, the summary), not with the arguments, the rules and the answers that a
    named approver sees. Her session lives on, so before, they were shown to it."""
    pending = hold(bastion, arguments={"secret": "pending-arguments"})
    answered = hold(bastion, arguments={"secret": "answered-arguments"})
    bastion.approvals.answer(answered.id, "avery", "approve", channel="page")
    with signed_in(bastion, "avery") as http:
        kill_switch(bastion, suspend)
        try:
            shown = {r.id: http.get(f"/approvals/{r.id}") for r in (pending, answered)}
        finally:
            kill_switch(bastion, resume)
        for request, secret in ((pending, "pending-arguments"), (answered, "answered-arguments")):
            page = shown[request.id]
            assert page.status_code == 403
            assert "avery is suspended" in page.text
            assert secret not in page.text and "id=arguments" not in page.text
            assert "requires_approval" not in page.text
        # Resumed, she sees them again.
        assert "answered-arguments" in http.get(f"/approvals/{answered.id}").text


def kill_switch(bastion: Running, change) -> None:
    """Suspend or resume avery (`suspend`, `resume`), as the API does; this replica has it."""
    seq = change(bastion.app.state.store, suspension("user", "avery"), "test").seq
    assert eventually(lambda: bastion.app.state.replica.applied >= seq, every=0.01), (
        "the replica did not apply the suspension"
    )


def test_sam_cannot_approve_his_own_call_where_the_policy_names_avery(bastion: Running, tab: Tab):
    request = hold(bastion, subject="sam")
    page = tab.page
    assert open_signed_in(tab, bastion, request, "sam") == 403
    assert "sam may not approve their own call: the policy names its approvers" in text_of(page)
    assert page.locator("form:not(.sign-out)").count() == 0
    with signed_in(bastion, "sam") as http:
        session = http.cookies[SESSION_COOKIE]
        token = bastion.app.state.oauth.form_tokens.token(f"approval:{request.id}", session)
        answer = http.post(
            f"/approvals/{request.id}", data={"csrf_token": token, "answer": "approve"}
        )
        assert answer.status_code == 403
    assert bastion.get(request.id).status == "pending"


def test_a_user_confirms_their_own_agents_call_when_nobody_is_named(bastion: Running, tab: Tab):
    request = hold(bastion, resource=DELETE, subject="sam")
    with signed_in(bastion, "avery") as http:
        assert http.get(f"/approvals/{request.id}").status_code == 403
    page = tab.page
    assert open_signed_in(tab, bastion, request, "sam") == 200
    assert "No approver is named: sam confirms" in text_of(page)
    # The policy gives no window: this call only, no choice of minutes.
    assert page.get_by_label("Minutes").count() == 0
    assert press(tab, "Approve") == 200
    assert bastion.get(request.id).status == "approved"


def test_the_list_shows_only_what_the_person_may_answer(bastion: Running, tab: Tab):
    for old in bastion.approvals.listed(status="pending", limit=1000):
        bastion.approvals.store.resolve(old.id, "expired")  # earlier tests' leftovers
    sams_email = hold(bastion, resource=SEND, subject="sam")
    sams_delete = hold(bastion, resource=DELETE, subject="sam")
    averys_delete = hold(bastion, resource=DELETE, subject="avery")
    answered = hold(bastion, resource=SEND, subject="sam")
    bastion.approvals.answer(answered.id, "avery", "deny", channel="api")

    def listed(username: str) -> set[str]:
        with signed_in(bastion, username) as http:
            page = http.get("/approvals")
            assert page.status_code == 200
            return set(re.findall(r"href='/approvals/([^']+)'", page.text))

    assert listed("avery") == {sams_email.id, averys_delete.id}
    assert listed("sam") == {sams_delete.id}
    assert listed("mallory") == set()

    page = tab.page
    page.goto(f"{bastion.url}/approvals")
    sign_in(tab, "avery")
    assert page.get_by_role("heading", name="Requests waiting for you").is_visible()
    with page.expect_navigation():
        page.get_by_role("link", name="approve a call").first.click()
    assert page.url in (bastion.page_url(sams_email), bastion.page_url(averys_delete))


def test_names_that_would_read_as_others_are_shown_escaped_on_the_pages(bastion: Running, tab: Tab):
    """A user id turned round by a right-to-left override (it reads "mallory" then "exe.png"), an
    agent named ``Trusted Bot`` and a Hangul filler, an agent whose name is longer than a screen:
    the approver reads each escaped, and the long one cut with a mark, on the list and the
    request's page, never as what they pass for."""
    user = "mallory\u202egnp.exe"
    long = "x" * 400 + "-the-real-one"
    fact = parse_fact(f'manager(User{{"{user}"}}, User{{"avery"}})')
    seq = bastion.app.state.store.apply([fact], actor="test").seq
    assert eventually(lambda: bastion.app.state.replica.applied >= seq, every=0.01), (
        "the replica did not apply the fact"
    )
    request = hold(bastion, subject=user, agents=("Trusted Bot\u3164", long, bastion.agent))
    page = tab.page
    page.goto(f"{bastion.url}/approvals")
    sign_in(tab, "avery")
    row = page.get_by_role("row").filter(has=page.get_by_role("link")).filter(has_text="mallory")
    assert " ".join(row.inner_text().split()).startswith("approve a call mallory\\u202egnp.exe")
    page.goto(bastion.page_url(request))
    text = text_of(page)
    for hidden in ("\u202e", "\u3164"):
        assert hidden not in page.content() and hidden not in text
    user_row = " ".join(page.get_by_role("row", name="User").inner_text().split())
    assert user_row == "User mallory\\u202egnp.exe"
    chain = " ".join(page.get_by_role("row", name="For agents").inner_text().split())
    assert chain.startswith("For agents mallory\\u202egnp.exe \u2192 Trusted Bot\\u3164 \u2192 xxx")
    assert (
        long not in chain and "\u2026 (" in chain and chain.endswith(f"{bastion.agent} (delegated)")
    )
    assert tab.console_errors == [] and tab.failed_requests == []


def test_a_user_whose_id_reads_as_the_approvers_own_is_shown_escaped(bastion: Running, tab: Tab):
    """``аvery`` with a Cyrillic а (an id a company provider may hold: bastion takes its ids as
    written) asks to send an email, and avery approves it as their manager: avery reads
    ``\\u0430very`` on the list and the request's page, never her own name. ``Борис``, one
    script, reads as it is."""
    user, boris = "\u0430very", "\u0411\u043e\u0440\u0438\u0441"
    facts = [parse_fact(f'manager(User{{"{u}"}}, User{{"avery"}})') for u in (user, boris)]
    seq = bastion.app.state.store.apply(facts, actor="test").seq
    assert eventually(lambda: bastion.app.state.replica.applied >= seq, every=0.01), (
        "the replica did not apply the facts"
    )
    request = hold(bastion, subject=user)
    hold(bastion, subject=boris)
    page = tab.page
    page.goto(f"{bastion.url}/approvals")
    sign_in(tab, "avery")
    rows = page.get_by_role("row").filter(has=page.get_by_role("link"))
    mixed = " ".join(rows.filter(has_text="\\u0430very").first.inner_text().split())
    assert mixed.startswith("approve a call \\u0430very")
    single = " ".join(rows.filter(has_text=boris).first.inner_text().split())
    assert single.startswith(f"approve a call {boris}")
    assert user not in text_of(page)
    page.goto(bastion.page_url(request))
    assert user not in text_of(page)
    user_row = " ".join(page.get_by_role("row", name="User").inner_text().split())
    assert user_row == "User \\u0430very"
    assert tab.console_errors == [] and tab.failed_requests == []


# What would make the page show one thing while another runs: a right-to-left override, a
# zero-width space, a line separator (a browser breaks the line there, so a value can draw a key
# of its own), a Hangul filler, a Latin word with a Cyrillic letter (a domain that reads as
# paypal.com), and a tag character past U+FFFF. Plain text in other scripts reads as it is.
DECEPTIVE = {
    "to": "ceo@p\u0430ypal.com",
    "path": "/home/sam/report\u202efdp.exe",
    "amount": "100\u200b0",
    "cc": 'ada@example.com\u2028  "bcc": "nobody"',
    "note\u3164": "\U000e0041",
    "name": "\u0411\u043e\u0440\u0438\u0441 caf\u00e9 \u7530\u4e2d",
}
HIDDEN = ("\u202e", "\u200b", "\u2028", "\u3164", "\U000e0041", "p\u0430ypal")


def test_arguments_and_a_held_result_show_what_would_read_as_something_else_escaped(
    bastion: Running, tab: Tab
):
    """Arguments (and a held result) holding characters that show as something else, or as
    nothing, are shown with those characters as JSON escapes: the approver reads exactly what
    will run (the text on the page is JSON that reads back as the arguments), and nothing on the
    page is turned round, hidden or broken onto a line of its own. Text in one script reads as it
    is."""
    request = hold(bastion, arguments=DECEPTIVE)
    review = hold(
        bastion,
        resource=NOTES,
        kind="review",
        result={**HELD_RESULT, "structuredContent": {"customers": [], **DECEPTIVE}},
    )
    page = tab.page
    open_signed_in(tab, bastion, request, "avery")
    shown = page.locator("#arguments").inner_text()
    for hidden in HIDDEN:
        assert hidden not in page.content() and hidden not in shown, repr(hidden)
    assert json.loads(shown) == request.arguments
    assert '"to": "ceo@p\\u0430ypal.com"' in shown
    assert '"path": "/home/sam/report\\u202efdp.exe"' in shown
    assert '"\u0411\u043e\u0440\u0438\u0441 caf\u00e9 \u7530\u4e2d"' in shown
    page.goto(bastion.page_url(review))
    result = page.locator("#result").inner_text()
    for hidden in HIDDEN:
        assert hidden not in page.content() and hidden not in result, repr(hidden)
    assert json.loads(result)["structuredContent"]["path"] == DECEPTIVE["path"]
    assert tab.console_errors == [] and tab.failed_requests == []


def test_with_two_approvers_required_the_first_sees_their_answer_and_the_second_decides(
    bastion: Running, tab: Tab
):
    request = hold(bastion, resource=WIRE)
    page = tab.page
    open_signed_in(tab, bastion, request, "avery")
    assert "2 distinct approvals needed" in text_of(page)
    assert press(tab, "Approve") == 200
    # Still pending: avery sees her answer, and no form to answer twice.
    assert page.locator("#status").inner_text() == "pending"
    assert "avery approved page" in " ".join(page.locator("#answers").inner_text().split())
    assert page.locator("form:not(.sign-out)").count() == 0
    with signed_in(bastion, "avery") as http:
        session = http.cookies[SESSION_COOKIE]
        token = bastion.app.state.oauth.form_tokens.token(f"approval:{request.id}", session)
        again = http.post(
            f"/approvals/{request.id}", data={"csrf_token": token, "answer": "approve"}
        )
        assert again.status_code == 403 and "already answered" in again.text
    assert bastion.get(request.id).status == "pending"

    page.context.clear_cookies()
    open_signed_in(tab, bastion, request, "cfo")
    assert press(tab, "Approve") == 200
    assert page.locator("#status").inner_text() == "approved"
    assert [a.approver for a in bastion.get(request.id).answers] == ["avery", "cfo"]


# -- CSRF ------------------------------------------------------------------------------------------


def test_an_answer_without_the_right_csrf_token_is_refused(bastion: Running, tab: Tab):
    request = hold(bastion)
    other = hold(bastion)
    with signed_in(bastion, "avery") as http, signed_in(bastion, "avery") as second:
        page = http.get(f"/approvals/{request.id}")
        token = csrf_of(page.text)
        for data in (
            {"answer": "approve"},  # none
            {"answer": "approve", "csrf_token": ""},
            {"answer": "approve", "csrf_token": "1.deadbeef"},
            {"answer": "approve", "csrf_token": f"{token}0"},
            # The token of another request's form, of the same session.
            {"answer": "approve", "csrf_token": csrf_of(http.get(f"/approvals/{other.id}").text)},
            {"answer": "approve", "csrf_token": "١٢٣.abc"},
        ):
            refused = http.post(f"/approvals/{request.id}", data=data)
            assert refused.status_code == 403, data
            assert "missing its CSRF token" in refused.text
        # The token of the same person's form in another session (another browser).
        elsewhere = second.post(
            f"/approvals/{request.id}", data={"answer": "approve", "csrf_token": token}
        )
        assert elsewhere.status_code == 403
    # No session at all: refused, and told to sign in.
    anonymous = httpx.post(
        f"{bastion.url}/approvals/{request.id}", data={"answer": "approve", "csrf_token": token}
    )
    assert anonymous.status_code == 403 and "not signed in" in anonymous.text
    assert bastion.get(request.id).status == "pending" and bastion.get(request.id).answers == ()

    # In the browser: the form with its token taken out.
    page = tab.page
    open_signed_in(tab, bastion, request, "avery")
    page.evaluate("document.querySelector('form:not(.sign-out) input[name=csrf_token]').remove()")
    assert press(tab, "Approve") == 403
    assert page.get_by_role("heading", name="Answer refused").is_visible()
    assert bastion.get(request.id).status == "pending"


# -- review ----------------------------------------------------------------------------------------


def test_review_release_with_a_withheld_field(bastion: Running, tab: Tab, tmp_path):
    request = hold(bastion, resource=NOTES, kind="review", result=HELD_RESULT)
    page = tab.page
    assert open_signed_in(tab, bastion, request, "avery") == 200
    assert page.get_by_role("heading", name="Release this result?").is_visible()
    shown = page.locator("#result").inner_text()
    # The reviewer's own view is masked by the policy for the reviewer.
    assert "ada@example.com" in shown and "Ada" in shown
    assert "078-05-1120" not in shown and "219-09-9999" not in shown
    page.screenshot(path=tmp_path / "review.png", full_page=True)

    # Fields typed but the plain release pressed: refused, nothing released.
    page.get_by_label("Fields to withhold").fill("customers.*.email")
    assert press(tab, "Release") == 400
    assert "Release with these fields withheld" in page.get_by_role("alert").inner_text()
    assert bastion.get(request.id).status == "pending"

    page.get_by_label("Fields to withhold").fill("customers.*.email, customers.*.name")
    assert press(tab, "Release with these fields withheld") == 200
    released = bastion.get(request.id)
    assert released.status == "released"
    assert released.withheld_fields == ("customers.*.email", "customers.*.name")
    assert page.locator("#status").inner_text() == "released"


def test_a_mistyped_field_to_withhold_is_refused_naming_it_and_the_form_keeps_what_was_typed(
    bastion: Running, tab: Tab
):
    """Before, ``customers.*.emial`` withheld nothing and the result was released with the
    emails (303, released); now the page says which path matches nothing, keeps the fields and
    the reason as typed, and nothing is released."""
    request = hold(bastion, resource=NOTES, kind="review", result=HELD_RESULT)
    page = tab.page
    assert open_signed_in(tab, bastion, request, "avery") == 200
    page.get_by_label("Fields to withhold").fill("customers.*.name customers.*.emial")
    page.get_by_label("Reason (optional)").fill("no emails")
    assert press(tab, "Release with these fields withheld") == 422
    alert = page.get_by_role("alert").inner_text()
    assert "'customers.*.emial' matches nothing" in alert and "nothing was released" in alert
    assert "'customers.*.name'" not in alert
    assert page.get_by_label("Fields to withhold").input_value() == (
        "customers.*.name customers.*.emial"
    )
    assert page.get_by_label("Reason (optional)").input_value() == "no emails"
    after = bastion.get(request.id)
    assert after.status == "pending" and after.answers == ()
    # Corrected, it is taken.
    page.get_by_label("Fields to withhold").fill("customers.*.name customers.*.email")
    assert press(tab, "Release with these fields withheld") == 200
    released = bastion.get(request.id)
    assert released.status == "released"
    assert released.withheld_fields == ("customers.*.email", "customers.*.name")
    assert released.answers[0].reason == "no emails"


def test_review_withheld(bastion: Running, tab: Tab):
    request = hold(bastion, resource=NOTES, kind="review", result=HELD_RESULT)
    open_signed_in(tab, bastion, request, "avery")
    assert press(tab, "Withhold") == 200
    assert bastion.get(request.id).status == "withheld"
    assert bastion.approvals.held_result(bastion.get(request.id)) is None


def test_a_held_result_is_shown_to_no_one_who_may_not_review_it(bastion: Running):
    request = hold(bastion, resource=NOTES, subject="sam", kind="review", result=HELD_RESULT)
    for username in ("sam", "mallory"):
        with signed_in(bastion, username) as http:
            page = http.get(f"/approvals/{request.id}")
            assert page.status_code == 403
            assert "Ada" not in page.text and "ada@example.com" not in page.text


# -- expiry ----------------------------------------------------------------------------------------


def test_an_expired_request_shows_expired_and_cannot_be_answered(bastion: Running, tab: Tab):
    request = hold(bastion)
    page = tab.page
    open_signed_in(tab, bastion, request, "avery")
    assert page.get_by_role("button", name="Approve").is_visible()
    bastion.clock.advance(601)
    try:
        # The form open before the expiry is sent after it.
        assert press(tab, "Approve") == 403
        assert "this request has expired" in page.get_by_role("alert").inner_text()
        assert page.locator("#status").inner_text() == "expired"
        assert page.get_by_role("button", name="Approve").count() == 0
        page.goto(bastion.page_url(request))
        assert page.locator("#status").inner_text() == "expired"
        assert page.locator("form:not(.sign-out)").count() == 0
    finally:
        bastion.clock.advance(-601)
    assert bastion.get(request.id).status != "approved"
    assert bastion.get(request.id).answers == ()


def test_an_unknown_request_is_404_not_500(bastion: Running):
    with signed_in(bastion, "avery") as http:
        assert http.get("/approvals/no-such-request").status_code == 404
        page = http.get("/approvals")
        token = bastion.app.state.oauth.form_tokens.token(
            "approval:no-such-request", http.cookies[SESSION_COOKIE]
        )
        answer = http.post(
            "/approvals/no-such-request", data={"csrf_token": token, "answer": "approve"}
        )
        assert answer.status_code == 404 and page.status_code == 200


# -- sign-in ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "next_path",
    [
        "//evil.example/approvals",
        "https://evil.example/",
        "http:/evil.example",
        "/\\evil.example",
        "\\\\evil.example",
        "/approvals\\..\\x",
        "javascript:alert(1)",
        "evil.example",
        "/\tevil",
        "/approvals/é",
        "",
    ],
)
def test_sign_in_refuses_a_next_that_is_not_a_local_path(bastion: Running, next_path: str):
    with clients.client(base_url=bastion.url, follow_redirects=False, timeout=10) as http:
        page = http.get("/sign-in", params={"next": next_path})
        assert page.status_code == 400
        assert "must be a page of this server" in page.text
        # Nor after a right password: no redirect, no session.
        good = http.get("/sign-in", params={"next": "/approvals"})
        fields = {**hidden_fields(good.text), "next": next_path}
        done = http.post("/sign-in", data={**fields, "username": "avery", "password": PASSWORD})
        assert done.status_code == 400 and "location" not in done.headers
        assert SESSION_COOKIE not in http.cookies


def test_sign_in_goes_back_to_the_local_page_it_was_given(bastion: Running):
    with signed_in(bastion, "avery") as http:
        # Signed in already: straight on.
        again = http.get("/sign-in", params={"next": "/approvals/abc?x=1"})
        assert again.status_code == 303 and again.headers["location"] == "/approvals/abc?x=1"


def test_sign_in_without_its_csrf_token_is_refused(bastion: Running):
    with httpx.Client(base_url=bastion.url, follow_redirects=False, timeout=10) as http:
        page = http.get("/sign-in", params={"next": "/approvals"})
        fields = hidden_fields(page.text)
        for token in ("", "1.00", f"{fields['csrf_token']}0"):
            refused = http.post(
                "/sign-in",
                data={**fields, "csrf_token": token, "username": "avery", "password": PASSWORD},
            )
            assert refused.status_code == 403 and SESSION_COOKIE not in http.cookies
            assert "This form expired or came from another page" in refused.text
    # Another browser's token (a site that signed in its own browser and copied the form).
    with httpx.Client(base_url=bastion.url, follow_redirects=False, timeout=10) as other:
        other.get("/sign-in", params={"next": "/approvals"})
        refused = other.post("/sign-in", data={**fields, "username": "avery", "password": PASSWORD})
        assert refused.status_code == 403 and SESSION_COOKIE not in other.cookies


def test_a_sign_in_form_sent_after_ten_minutes_is_refused_and_a_fresh_one_works(
    bastion: Running, monkeypatch
):
    tokens = bastion.app.state.oauth.form_tokens
    clock = Clock()
    monkeypatch.setattr(tokens, "clock", clock)
    with httpx.Client(base_url=bastion.url, follow_redirects=False, timeout=10) as http:
        page = http.get("/sign-in", params={"next": "/approvals"})
        clock.advance(601)
        late = http.post(
            "/sign-in",
            data={**hidden_fields(page.text), "username": "avery", "password": PASSWORD},
        )
        assert late.status_code == 403 and SESSION_COOKIE not in http.cookies
        assert "This form expired" in late.text
        # The page shown again is a fresh form: it signs in.
        done = http.post(
            "/sign-in",
            data={**hidden_fields(late.text), "username": "avery", "password": PASSWORD},
        )
        assert done.status_code == 303 and SESSION_COOKIE in http.cookies


def test_a_wrong_password_on_the_sign_in_page_is_counted_by_the_login_throttle(
    bastion: Running, tab: Tab
):
    page = tab.page
    page.goto(f"{bastion.url}/sign-in?next=/approvals")
    assert sign_in(tab, "avery", "not the password") == 401
    assert page.get_by_role("alert").inner_text() == "Wrong username or password."
    assert page.get_by_label("Username").input_value() == "avery"
    assert SESSION_COOKIE not in {c["name"] for c in page.context.cookies()}
    oauth = bastion.app.state.oauth
    counter = oauth.login_throttle.user_counter("avery")
    assert oauth.store.login_failures([counter], since=0)[counter][0] >= 1
    assert sign_in(tab, "avery") == 200
    assert page.get_by_role("heading", name="Requests waiting for you").is_visible()


# -- every page ------------------------------------------------------------------------------------


def test_every_page_forbids_framing_and_caching(bastion: Running):
    request = hold(bastion)
    with (
        signed_in(bastion, "avery") as avery,
        signed_in(bastion, "mallory") as mallory,
        httpx.Client(base_url=bastion.url, follow_redirects=False) as anonymous,
    ):
        responses = {
            "sign-in": anonymous.get("/sign-in", params={"next": "/approvals"}),
            "sign-in refused": anonymous.get("/sign-in", params={"next": "//x"}),
            "to sign-in": anonymous.get(f"/approvals/{request.id}"),
            "list": avery.get("/approvals"),
            "request": avery.get(f"/approvals/{request.id}"),
            "not an approver": mallory.get(f"/approvals/{request.id}"),
            "unknown": avery.get("/approvals/nothing"),
            "csrf refused": avery.post(f"/approvals/{request.id}", data={"answer": "deny"}),
        }
    expected = {200, 303, 400, 403, 404}
    for name, response in responses.items():
        assert response.status_code in expected, name
        assert response.headers["x-frame-options"] == "DENY", name
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"], name
        assert response.headers["cache-control"] == "no-store", name
    assert responses["to sign-in"].status_code == 303
    location = responses["to sign-in"].headers["location"]
    assert location == f"/sign-in?{urlencode({'next': f'/approvals/{request.id}'})}"


def test_a_signed_in_approvers_page_stays_empty_in_a_frame(bastion: Running, tab: Tab):
    request = hold(bastion)
    page = tab.page
    open_signed_in(tab, bastion, request, "avery")
    assert page.get_by_role("button", name="Approve").is_visible()
    # Another site puts it in a frame, to have the approver click through it (clickjacking).
    url = bastion.page_url(request)
    site = ClientSite()
    try:
        tab.console_errors.clear()
        page.goto(f"{site.url}/frame?{urlencode({'target': url, 'control': f'{site.url}/plain'})}")
        frames = {f.name: f for f in page.frames}
        assert (
            frames["control"].get_by_role("heading", name="A page that may be framed").is_visible()
        )
        target = frames["target"]
        assert (url, "net::ERR_BLOCKED_BY_RESPONSE") in tab.failed_requests
        assert target.url.startswith("chrome-error://")
        assert target.locator("button, input[name=csrf_token]").count() == 0
        assert any("frame-ancestors 'none'" in e for e in tab.console_errors)
    finally:
        site.close()
    assert bastion.get(request.id).status == "pending"


def test_an_answer_past_the_body_limit_is_refused_before_it_is_read(bastion: Running):
    request = hold(bastion)
    limit = bastion.app.state.config.max_oauth_body_bytes
    with signed_in(bastion, "avery") as http:
        token = csrf_of(http.get(f"/approvals/{request.id}").text)
        answer = http.post(
            f"/approvals/{request.id}",
            data={"csrf_token": token, "answer": "deny", "reason": "x" * (limit + 1)},
        )
        assert answer.status_code == 413
        assert "max_oauth_body_bytes" in answer.text
    assert bastion.get(request.id).status == "pending"


def test_the_pages_answer_503_while_the_database_is_unreachable(outage, tmp_path):
    """On PostgreSQL taken away from this bastion: the page says to try again, never a 500,
    and nothing is answered; back, the page works."""
    role = outage.role()
    policy = tmp_path / "policy.polar"
    policy.write_text(POLICY)
    sock = free_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = ServerConfig(
        database=outage.url(role),
        policy_file=str(policy),
        oauth={
            "issuer": base,
            "key_dir": str(tmp_path / "keys"),
            "resources": [{"uri": f"{base}/mcp/desk", "scopes": ["customers:read"]}],
        },
        gateway={"upstreams": []},
        approvals={"wait_seconds": 0},
    )
    app = create_app(config)
    create_user(app.state.oauth.store, "avery", PASSWORD, time.time(), actor="test")
    app.state.store.apply([parse_fact(f) for f in FACTS], actor="test")
    with serve(app, sock) as url:
        assert eventually(lambda: app.state.replica.policy_version is not None, every=0.01), (
            "the replica did not load the policy"
        )
        running = Running(url, app, Clock(), "agent-1")
        request = hold(running)
        with signed_in(running, "avery") as http:
            token = csrf_of(http.get(f"/approvals/{request.id}").text)
            outage.block(role)
            try:
                for answer in (
                    http.get(f"/approvals/{request.id}"),
                    http.get("/approvals"),
                    http.post(
                        f"/approvals/{request.id}",
                        data={"csrf_token": token, "answer": "approve"},
                    ),
                ):
                    assert answer.status_code == 503, answer.text
                    assert answer.headers["retry-after"] == "1"
                    assert "Try again" in answer.text
                    assert answer.headers["x-frame-options"] == "DENY"
            finally:
                outage.unblock(role)
            deadline = time.monotonic() + PATIENCE
            while (page := http.get(f"/approvals/{request.id}")).status_code != 200:
                assert time.monotonic() < deadline, page.text
                time.sleep(0.1)
            assert "Approve this call?" in page.text
        assert running.get(request.id).status == "pending"


def test_under_an_issuer_with_a_path_the_pages_are_where_the_request_urls_point(tmp_path):
    policy = tmp_path / "policy.polar"
    policy.write_text(POLICY)
    sock = free_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = ServerConfig(
        database=str(tmp_path / "bastion.db"),
        policy_file=str(policy),
        oauth={
            "issuer": f"{base}/auth",
            "key_dir": str(tmp_path / "keys"),
            "resources": [{"uri": f"{base}/mcp/desk", "scopes": ["customers:read"]}],
        },
        gateway={"upstreams": []},
    )
    app = create_app(config)
    with serve(app, sock), httpx.Client(follow_redirects=False, timeout=10) as http:
        url = app.state.approvals.url("abc")
        assert url == f"{base}/auth/approvals/abc"
        to_sign_in = http.get(url)
        assert to_sign_in.status_code == 303
        location = to_sign_in.headers["location"]
        assert location == f"/auth/sign-in?{urlencode({'next': '/auth/approvals/abc'})}"
        page = http.get(f"{base}{location}")
        assert page.status_code == 200 and "action='/auth/sign-in'" in page.text
        # The session cookie is for the issuer's path, which the pages are under.
        cookie = page.headers["set-cookie"]
        assert "Path=/auth" in cookie
        big = http.post(url, content=b"x" * (config.max_oauth_body_bytes + 1))
        assert big.status_code == 413


def test_an_agents_request_for_access_ahead_of_time_waits_on_the_same_list(bastion: Running):
    """OpenID CIBA: a request addressed to avery is on avery's list, with its page; not sam's."""
    from bastion.oauth.ciba import CIBA_GRANT_TYPE

    values = registration.validate_client_metadata(
        {
            "client_name": "Night agent",
            "token_endpoint_auth_method": "client_secret_basic",
            "grant_types": [CIBA_GRANT_TYPE],
            "redirect_uris": [],
            "scope": "customers:read",
        },
        bastion.app.state.oauth.settings,
    )
    registered = registration.new_client(values, source="admin", now=time.time())
    bastion.app.state.oauth.store.save_client(registered.client)
    asked = httpx.post(
        f"{bastion.url}/bc-authorize",
        data={
            "login_hint": "avery",
            "scope": "customers:read",
            "resource": f"{bastion.url}/mcp/desk",
            "binding_message": "night run 7",
        },
        auth=(registered.client.client_id, registered.client_secret),
    )
    assert asked.status_code == 200, asked.text
    [pending] = bastion.app.state.oauth.ciba.pending_for("avery")
    with signed_in(bastion, "avery") as http:
        page = http.get("/approvals").text
    assert pending["url"].removeprefix(bastion.url) in page and "Night agent" in page
    with signed_in(bastion, "sam") as http:
        assert "Night agent" not in http.get("/approvals").text


def test_a_held_results_page_is_written_off_the_event_loop(bastion: Running, monkeypatch):
    """A held result can be as large as an upstream's message (64 MiB): its page is written in a
    worker thread, never on the event loop that serves every other request."""
    from bastion.approvals import pages
    from tests.loop import noting_where

    seen: list[str] = []
    monkeypatch.setattr(pages, "_request_page", noting_where(pages._request_page, seen))
    request = hold(bastion, resource=NOTES, kind="review", result=HELD_RESULT)
    with signed_in(bastion, "avery") as http:
        assert http.get(f"/approvals/{request.id}").status_code == 200
    assert seen == ["worker thread"]
