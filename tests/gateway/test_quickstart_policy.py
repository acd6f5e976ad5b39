"""The quickstart's policy closes what a mask alone leaves open: a masked field cannot be
searched by value, the same data read as a resource is masked too, and a user's limit holds
across all their agents (a second OAuth client buys no more)."""

from __future__ import annotations

import json

import pytest

from .streams import messages, modern_headers, modern_request

EMAIL = {"to": "a@example.com", "subject": "s", "body": "b"}


def ask(bastion, token: str, server: str, method: str, params: dict) -> dict:
    name = params.get("name") or params.get("uri")
    response = bastion.http.post(
        bastion.mcp_url(server),
        json=modern_request(1, method, params),
        headers=modern_headers(token, method, name),
    )
    assert response.status_code == 200, response.text
    return messages(response)[-1]


def search(bastion, token: str, server: str, **arguments) -> dict:
    return ask(
        bastion, token, server, "tools/call", {"name": "search_customers", "arguments": arguments}
    )


def traced_queries(bastion) -> list:
    return (
        [json.loads(line) for line in bastion.trace.read_text().splitlines()]
        if bastion.trace.exists()
        else []
    )


@pytest.mark.parametrize("server", ["desk", "deskhttp"])
def test_a_non_admin_cannot_confirm_a_guessed_email_by_searching_for_it(bastion, server):
    token = bastion.token("sam", server)
    before = len(bastion.recorder.requests), len(traced_queries(bastion))
    refused = search(bastion, token, server, query="alan@example.com", field="email")
    assert refused["error"]["data"]["reason"] == "not_permitted"
    # The search never ran upstream: a hit and a miss look the same.
    calls = [r for r in bastion.recorder.requests[before[0] :] if b'"tools/call"' in r["body"]]
    assert calls == [] and traced_queries(bastion)[before[1] :] == []
    # By name, the search still works (and its emails are masked).
    found = json.loads(search(bastion, token, server, query="alan")["result"]["content"][0]["text"])
    assert found == {
        "customers": [{"id": "c-101", "name": "Alan Turing", "email": "[masked]", "plan": "team"}]
    }
    # A field the server does not know is refused by the server itself, not searched.
    odd = search(bastion, token, server, query="alan@", field="EMAIL")["result"]
    assert odd.get("isError") is True and "alan@example.com" not in json.dumps(odd)


@pytest.mark.parametrize("server", ["desk", "deskhttp"])
def test_an_admin_searches_by_email_and_sees_it(bastion, server):
    token = bastion.token("avery", server)
    found = search(bastion, token, server, query="alan@", field="email")["result"]
    assert json.loads(found["content"][0]["text"])["customers"][0]["email"] == "alan@example.com"


@pytest.mark.parametrize("server", ["desk", "deskhttp"])
def test_the_customer_directory_resource_is_masked_for_non_admins(bastion, server):
    read = {"uri": "customers://directory"}
    sam = ask(bastion, bastion.token("sam", server), server, "resources/read", read)["result"]
    avery = ask(bastion, bastion.token("avery", server), server, "resources/read", read)["result"]
    assert "@example.com" not in json.dumps(sam)
    assert {c["email"] for c in json.loads(sam["contents"][0]["text"])["customers"]} == {"[masked]"}
    assert "ada@example.com" in avery["contents"][0]["text"]


def test_two_clients_of_one_user_share_the_users_rate_limit(bastion):
    # Each agent may send 5 emails a minute, and a user 8 across all their agents.
    first, second = bastion.token("sam", "desk"), bastion.token("sam", "desk")  # two clients
    outcomes = []
    for token in [first] * 5 + [second] * 4:
        answer = ask(
            bastion, token, "desk", "tools/call", {"name": "send_email", "arguments": EMAIL}
        )
        outcomes.append("ok" if "result" in answer else answer["error"]["data"]["reason"])
    # The second client is refused at its fourth email: the user's 8 are spent, not its own 5.
    assert outcomes == ["ok"] * 8 + ["rate_limited"]
    # Another user is not affected.
    other = ask(
        bastion,
        bastion.token("avery", "desk"),
        "desk",
        "tools/call",
        {"name": "send_email", "arguments": EMAIL},
    )
    assert "result" in other
