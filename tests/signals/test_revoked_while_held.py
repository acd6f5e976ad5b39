"""A call waiting for a person when its token is taken back: a Shared Signals event (CAEP
session-revoked, RISC account-disabled) pushed by a real transmitter while the client waits in
its request for an approval, or for the review of its result, ends the wait refused, and what
the approver or reviewer then says sends nothing upstream and delivers nothing. The same for a
token revoked by its client (RFC 7009) and in both protocol eras."""

from __future__ import annotations

import base64
import json
import os
import threading

import pytest

from tests.gateway.streams import legacy_session, messages, modern_headers, modern_request
from tests.gateway.support import start
from tests.oauth.support import free_socket, serve
from tests.waits import PATIENCE, eventually

from .transmitter import BEARER, CAEP, RISC, Transmitter

AUDIENCE = "https://bastion.test/ssf"
PUSH_TOKEN = "push-credential-of-the-held-calls-idp"
RULES = """
declare approval_grant(User, Agent, String, Tool);
requires_approval(_user: User, "call", Tool{"deskhttp/search_customers"}) if
  context.arguments.query = "held";
requires_review(_user: User, "call", Tool{"deskhttp/search_customers"}) if
  context.arguments.query = "reviewed";
approver(User{"avery"}, _user: User, "call", Tool{"deskhttp/search_customers"});
"""


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    os.environ["BASTION_TEST_HELD_SSF_PUSH"] = PUSH_TOKEN
    os.environ["BASTION_TEST_HELD_SSF_BEARER"] = BEARER
    idp = Transmitter(AUDIENCE)
    with serve(idp.app(), free_socket()) as idp_url:
        idp.url = idp_url
        table = {
            "ssf": {
                "transmitters": [
                    {
                        "name": "idp",
                        "issuer": idp_url,
                        "audience": AUDIENCE,
                        "delivery": "push",
                        "bearer_env": "BASTION_TEST_HELD_SSF_BEARER",
                        "push_token_env": "BASTION_TEST_HELD_SSF_PUSH",
                        "users": {"email:sam@example.com": "sam"},
                    }
                ]
            }
        }
        # A held request waits for its answer as long as the test may take.
        with start(
            tmp_path_factory.mktemp("revoked-while-held"),
            policy_extra=RULES,
            signals=table,
            approvals={"wait_seconds": PATIENCE},
        ) as running:
            running.idp = idp
            signals = running.app.state.signals.store
            assert eventually(lambda: any(s.status == "verified" for s in signals.streams())), (
                "the transmitter's stream was never verified"
            )
            yield running


def revoke_by_signal(bastion, token: str) -> None:
    response = bastion.idp.push(
        bastion.idp.set_token(
            CAEP + "session-revoked", sub_id={"format": "email", "email": "sam@example.com"}
        )
    )
    assert response.status_code == 202, response.text


def disable_by_signal(bastion, token: str) -> None:
    response = bastion.idp.push(
        bastion.idp.set_token(
            RISC + "account-disabled", sub_id={"format": "email", "email": "sam@example.com"}
        )
    )
    assert response.status_code == 202, response.text
    # Back as it was for the next test: sam signs in again.
    assert bastion.app.state.oauth.store.enable_user("sam", actor="test")


def revoke_by_client(bastion, token: str) -> None:
    """RFC 7009, as the agent that holds the token would (its client id is public)."""
    payload = token.split(".")[1]
    client_id = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))[
        "client_id"
    ]
    response = bastion.http.post(
        f"{bastion.url}/revoke", data={"token": token, "client_id": client_id}
    )
    assert response.status_code == 200, response.text


TAKEN_BACK = {
    "session-revoked": revoke_by_signal,
    "account-disabled": disable_by_signal,
    "revoked by its client": revoke_by_client,
}


def searched(bastion, query: str) -> int:
    return bastion.recorder.count("tools/call", name="search_customers", arguments={"query": query})


# How the client waits: its era, and how it reads the answer (events begun by bastion while
# the request waits; plain JSON, answered whole; events carrying the held call's progress).
WAYS = ["legacy", "modern", "modern-json", "legacy-progress"]


def call_in_thread(bastion, token: str, way: str, query: str) -> tuple[threading.Thread, dict]:
    """search_customers with ``query``, sent in a thread that waits for its answer."""
    answer: dict = {}
    params: dict = {"name": "search_customers", "arguments": {"query": query}}
    if way.startswith("legacy"):
        headers = legacy_session(bastion, token, "deskhttp")
        if way == "legacy-progress":
            params["_meta"] = {"progressToken": "p1"}
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}
    else:
        headers = modern_headers(token, "tools/call", "search_customers")
        if way == "modern-json":
            headers["accept"] = "application/json"
        body = modern_request(1, "tools/call", params)

    def send() -> None:
        response = bastion.http.post(
            bastion.mcp_url("deskhttp"), json=body, headers=headers, timeout=PATIENCE * 2
        )
        answer["status"] = response.status_code
        answer["challenge"] = response.headers.get("www-authenticate", "")
        answer["message"] = messages(response)[-1] if response.status_code == 200 else None
        answer["body"] = response.json() if response.status_code != 200 else None

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread, answer


def refused_for_its_token(answer: dict) -> bool:
    """Refused as a revoked token is: 401 invalid_token with the challenge to authorize anew,
    or, once the answer has begun as events, a JSON-RPC error saying so."""
    if answer["status"] == 401:
        return answer["body"]["error"] == "invalid_token" and "invalid_token" in answer["challenge"]
    message = answer["message"]
    return (
        answer["status"] == 200
        and "error" in message
        and (message["error"].get("data") or {}).get("reason") == "invalid_token"
    )


def pending(bastion, kind: str):
    found = [
        r
        for r in bastion.app.state.approvals.listed(status="pending")
        if r.kind == kind and r.subject == "sam"
    ]
    return found[0] if found else None


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("how", sorted(TAKEN_BACK))
def test_a_call_waiting_for_approval_is_not_run_once_its_token_is_taken_back(bastion, how, way):
    token = bastion.token("sam", "deskhttp")
    before = searched(bastion, "held")
    thread, answer = call_in_thread(bastion, token, way, "held")
    assert eventually(lambda: pending(bastion, "approval")), "the call was never held"
    request = pending(bastion, "approval")
    TAKEN_BACK[how](bastion, token)
    bastion.app.state.approvals.answer(request.id, "avery", "approve", channel="api")
    thread.join(PATIENCE * 2)
    assert not thread.is_alive()
    assert searched(bastion, "held") == before, "the revoked token's call ran upstream"
    assert refused_for_its_token(answer), answer
    assert bastion.app.state.approvals.get(request.id).status == "approved"  # not spent


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("how", sorted(TAKEN_BACK))
def test_a_result_waiting_for_review_is_not_delivered_once_its_token_is_taken_back(
    bastion, how, way
):
    token = bastion.token("sam", "deskhttp")
    thread, answer = call_in_thread(bastion, token, way, "reviewed")
    assert eventually(lambda: pending(bastion, "review")), "the result was never held"
    request = pending(bastion, "review")
    TAKEN_BACK[how](bastion, token)
    bastion.app.state.approvals.answer(request.id, "avery", "approve", channel="api")
    thread.join(PATIENCE * 2)
    assert not thread.is_alive()
    assert refused_for_its_token(answer), answer
    assert bastion.app.state.approvals.get(request.id).status != "delivered"
