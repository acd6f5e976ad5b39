"""An approval is bound to the call's value, not to how its JSON was spelt: over a real gateway,
with the bytes of each call written by hand (a plain HTTP client, 2026-07-28), the same value
spelt otherwise (members in another order, letters as ``\\u`` escapes, ``1.0`` as ``1e0``) is
the call approved, and goes through once; another value that reads alike (``0`` and ``0.0``,
``-0.0``, a 64-bit integer and the float nearest it, a name in NFC and in NFD) is another
call, held for an approval of its own, and a body naming a member twice is refused before
anything is held. The same tool of another upstream server, and the same call of another
agent of the user, are other calls too."""

from __future__ import annotations

import json
import unicodedata

import pytest

from tests.gateway.streams import messages, modern_headers, modern_request
from tests.gateway.support import start

RULES = """
requires_approval(_user: User, "call", Tool{"labhttp/wait"});
requires_approval(_user: User, "call", Tool{"lab/wait"});
"""


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    with start(
        tmp_path_factory.mktemp("spellings"), approvals={"wait_seconds": 0}, policy_extra=RULES
    ) as running:
        yield running


@pytest.fixture(scope="module")
def token(bastion):
    return bastion.token("sam", "labhttp")


def call(bastion, token: str, arguments: str, server: str = "labhttp") -> dict:
    """tools/call of ``wait`` whose ``arguments`` are the JSON text given, byte for byte."""
    body = json.dumps(modern_request(1, "tools/call", {"name": "wait", "arguments": "ARGS"}))
    body = body.replace('"ARGS"', arguments, 1)
    response = bastion.http.post(
        bastion.mcp_url(server),
        content=body.encode(),
        headers=modern_headers(token, "tools/call", "wait"),
    )
    return {"status": response.status_code, **messages(response)[-1]}


def held(answer: dict) -> str:
    data = answer["error"]["data"]
    assert data["reason"] == "approval_pending", answer
    return data["approval_id"]


def approved(bastion, token: str, arguments: str, server: str = "labhttp") -> str:
    request_id = held(call(bastion, token, arguments, server))
    bastion.app.state.approvals.answer(request_id, "sam", "approve", channel="api")
    return request_id


def status(bastion, request_id: str) -> str:
    return bastion.app.state.approvals.get(request_id).status


@pytest.mark.parametrize(
    ("approved_as", "sent_as"),
    [
        ('{"seconds": 0, "tag": "order"}', '{"tag": "order", "seconds": 0}'),
        ('{"seconds": 0, "tag": "escaped"}', '{"seconds": 0, "tag": "\\u0065scaped"}'),
        ('{"seconds": 1.0, "tag": "exponent"}', '{"seconds": 1e0, "tag": "exponent"}'),
    ],
)
def test_the_same_value_spelt_otherwise_is_the_call_approved_and_runs_once(
    bastion, token, approved_as, sent_as
):
    request_id = approved(bastion, token, approved_as)
    ran = call(bastion, token, sent_as)
    assert "result" in ran, ran
    assert status(bastion, request_id) == "used"
    again = call(bastion, token, sent_as)
    assert held(again) != request_id


NFC = unicodedata.normalize("NFC", "caf\u00e9")
NFD = unicodedata.normalize("NFD", "caf\u00e9")
# The same two names in other words: each case holds a call of its own.
NFC_RAW, NFD_RAW = (unicodedata.normalize(form, "cr\u00e8me") for form in ("NFC", "NFD"))


@pytest.mark.parametrize(
    ("approved_as", "sent_as"),
    [
        ('{"seconds": 0, "tag": "int"}', '{"seconds": 0.0, "tag": "int"}'),
        ('{"seconds": 0.0, "tag": "zero"}', '{"seconds": -0.0, "tag": "zero"}'),
        (
            '{"seconds": 9223372036854775807, "tag": "big"}',
            '{"seconds": 9.223372036854776e18, "tag": "big"}',
        ),
        (json.dumps({"seconds": 0, "tag": NFC}), json.dumps({"seconds": 0, "tag": NFD})),
        (
            json.dumps({"seconds": 0, "tag": NFC_RAW}, ensure_ascii=False),
            json.dumps({"seconds": 0, "tag": NFD_RAW}, ensure_ascii=False),
        ),
    ],
)
def test_another_value_that_reads_alike_is_another_call_held_anew(
    bastion, token, approved_as, sent_as
):
    request_id = approved(bastion, token, approved_as)
    other = held(call(bastion, token, sent_as))
    assert other != request_id
    assert status(bastion, request_id) == "approved"  # not spent by the other call


def test_a_body_naming_an_argument_twice_is_refused_and_nothing_is_held(bastion, token):
    request_id = approved(bastion, token, '{"seconds": 0, "tag": "twice"}')
    pending = held(call(bastion, token, '{"seconds": 0, "tag": "twice-other"}'))
    for twice in (
        '{"seconds": 0, "tag": "twice", "tag": "twice-other"}',
        '{"seconds": 0, "tag": "twice-other", "tag": "twice"}',
    ):
        refused = call(bastion, token, twice)
        assert refused["status"] == 400 and refused["error"]["code"] == -32700, refused
    assert status(bastion, request_id) == "approved"
    assert status(bastion, pending) == "pending"


def test_an_approval_for_one_server_does_not_cover_the_same_tool_of_another(bastion, token):
    request_id = approved(bastion, token, '{"seconds": 0, "tag": "server"}')
    other_token = bastion.token("sam", "lab")
    other = held(call(bastion, other_token, '{"seconds": 0, "tag": "server"}', "lab"))
    assert other != request_id
    assert status(bastion, request_id) == "approved"


def test_an_approval_for_one_agent_of_a_user_does_not_cover_another(bastion, token):
    request_id = approved(bastion, token, '{"seconds": 0, "tag": "agent"}')
    other_agent = bastion.token("sam", "labhttp")  # a client registered of its own
    other = held(call(bastion, other_agent, '{"seconds": 0, "tag": "agent"}'))
    assert other != request_id
    assert status(bastion, request_id) == "approved"
    assert "result" in call(bastion, token, '{"seconds": 0, "tag": "agent"}')
