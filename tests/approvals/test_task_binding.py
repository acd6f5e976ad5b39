"""Approvals and reviews bound to the task a token is for (a task grant, docs/delegation.md),
end to end: a real `bastion serve`, tasks opened through /v1/tasks, tokens bound to them by token
exchange (RFC 8693). The same call of the same user and chain under another task, or under
none, is another call to the people in the loop: what they approve, grant for minutes or release
for one is never spent by, let through for, or delivered to the other."""

from __future__ import annotations

import pytest

from tests.delegation.support import ADMIN_KEY, POLICY, SCOPES, start_studio
from tests.delegation.test_held_chains import HELD, answer_as_avery, held
from tests.delegation.test_mission import refusal

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    directory = tmp_path_factory.mktemp("held-tasks")
    policy = directory / "policy.polar"
    policy.write_text(POLICY.read_text() + HELD)
    with start_studio(directory, policy=policy, settings="[approvals]\nwait_seconds = 0\n") as s:
        yield s


def open_task(studio, agent: str, purpose: str) -> str:
    """A task for sam's ``agent``; what it grants (a role on a server of its own) is beside the
    point: the calls made under it are allowed without it."""
    grant = {
        "predicate": "has_role",
        "args": [{"type": "Agent", "id": agent}, "coder", {"type": "McpServer", "id": purpose}],
    }
    answer = studio.http.post(
        f"{studio.url}/v1/tasks",
        json={
            "user": "sam",
            "agent": agent,
            "purpose": purpose,
            "facts": [grant],
            "expires_in": 3600,
        },
        headers=ADMIN,
    )
    assert answer.status_code == 201, answer.text
    return answer.json()["task"]["id"]


def by_task(studio, name: str) -> tuple[dict[str, str], str, str]:
    """Tokens of one sub-agent acting for sam through one coding agent: under the task "T1", the
    task "T2" and none (""), keyed so; and those two tasks' ids."""
    sub = studio.sub_agent(f"{name}-svgbot")
    studio.facts(
        ("has_role", f"Agent:{sub.client_id}", "illustrator", "McpServer:studio"),
        ("may_use_folder", f"Agent:{sub.client_id}", "icons"),
    )
    coder = studio.coding_agent(f"{name}-coder")
    studio.facts(("has_role", f"Agent:{coder.client_id}", "coder", "McpServer:studio"))
    token = studio.user_token(coder, "sam", " ".join(SCOPES))["access_token"]
    t1 = open_task(studio, coder.client_id, f"{name}: the first task")
    t2 = open_task(studio, coder.client_id, f"{name}: the second task")
    tokens = {}
    for key, task in (("T1", t1), ("T2", t2), ("", None)):
        more = {"task": task} if task else {}
        answer = studio.exchange(coder, token, studio.own_token(sub), **more)
        assert answer.status_code == 200, answer.text
        tokens[key] = answer.json()["access_token"]
    return tokens, t1, t2


def test_an_approval_given_under_one_task_is_not_spent_under_another_nor_under_none(studio):
    tokens, t1, _ = by_task(studio, "approval")
    draw = {"folder": "icons", "name": "task.svg", "svg": "<svg/>"}
    request = held(studio, tokens["T1"], "write_svg", draw, "approval_pending")
    answer_as_avery(studio, request)
    written = list(studio.upstream.written)
    assert held(studio, tokens["T2"], "write_svg", draw, "approval_pending") != request
    untasked = held(studio, tokens[""], "write_svg", draw, "approval_pending")
    assert untasked != request
    assert studio.upstream.written == written, "nothing another task sent reached the studio"
    assert refusal(studio.call(tokens["T1"], "write_svg", **draw)) == ("ok",)
    assert studio.upstream.written == [*written, ("write_svg", "icons", "task.svg")]
    # And the other way round: approved for the call under no task, it is not the task's.
    again = {**draw, "name": "untasked.svg"}
    untasked = held(studio, tokens[""], "write_svg", again, "approval_pending")
    answer_as_avery(studio, untasked)
    assert held(studio, tokens["T1"], "write_svg", again, "approval_pending") != untasked
    assert refusal(studio.call(tokens[""], "write_svg", **again)) == ("ok",)
    # The request shows the task it was held under; one held under none shows none.
    shown = studio.http.get(f"{studio.url}/v1/approvals/{request}", headers=ADMIN).json()
    assert shown["task"] == t1
    assert studio.http.get(f"{studio.url}/v1/approvals/{untasked}", headers=ADMIN).json()[
        "task"
    ] == ("")
    listed = studio.http.get(f"{studio.url}/v1/approvals", headers=ADMIN).json()["approvals"]
    assert {r["id"]: r["task"] for r in listed}[request] == t1
    assert t1 in studio.command("approvals", "show", request)
    assert t1 in studio.command("approvals", "list")
    held_events = [
        e for e in studio.events("approval.requested") if e.detail["request_id"] == request
    ]
    assert [e.detail.get("task") for e in held_events] == [t1]


def test_an_approval_for_minutes_given_under_one_task_lets_nothing_through_under_another(studio):
    tokens, _, _ = by_task(studio, "window")
    draw = {"folder": "icons", "name": "window.svg", "svg": "<svg/>"}
    request = held(studio, tokens["T1"], "write_svg", draw, "approval_pending")
    answer_as_avery(studio, request, minutes=15)
    # A fact written through /v1/facts is answered once this replica has applied it, and so the
    # grant written before it.
    studio.facts(("has_role", "User:task-window-witness", "designer", "McpServer:studio"))
    written = list(studio.upstream.written)
    again = {**draw, "name": "again.svg"}
    assert held(studio, tokens["T2"], "write_svg", again, "approval_pending") != request
    assert held(studio, tokens[""], "write_svg", again, "approval_pending") != request
    assert studio.upstream.written == written, "the grant let no other task's call through"
    assert refusal(studio.call(tokens["T1"], "write_svg", **again)) == ("ok",)
    assert studio.upstream.written == [*written, ("write_svg", "icons", "again.svg")]


def test_a_result_released_under_one_task_is_never_delivered_under_another(studio):
    tokens, _, _ = by_task(studio, "review")
    read = {"folder": "icons", "name": "logo.svg"}
    request = held(studio, tokens["T1"], "read_file", read, "review_pending")
    answer_as_avery(studio, request)
    assert held(studio, tokens["T2"], "read_file", read, "review_pending") != request
    assert held(studio, tokens[""], "read_file", read, "review_pending") != request
    assert studio.call(tokens["T1"], "read_file", **read)["result"]["content"][0]["text"] == (
        "<svg/>"
    )
