"""How often bastion retries for a 2025-11-25 client when the upstream's answer asks for input
(``input_required``): after each round of answers, at most ten rounds, then the call is refused;
a 2026-07-28 client gets the question itself, with no retry by bastion."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from bastion.gateway.client_requests import ASKED_STATE, ClientRequests
from bastion.gateway.handlers import Exchange
from bastion.gateway.holds import RequestStates
from bastion.gateway.jsonrpc import UPSTREAM_UNAVAILABLE, Message, RpcError

ASKING = {"resultType": "input_required", "inputRequests": {}}


class Upstream:
    """Answers ``input_required`` the first ``asks`` times, then a plain result."""

    def __init__(self, asks: int) -> None:
        self.asks = asks
        self.sent: list[dict[str, Any]] = []

    async def request(self, method: str, params: dict[str, Any], **options: Any) -> dict:
        self.sent.append(params)
        result = ASKING if len(self.sent) <= self.asks else {"content": []}
        return {"jsonrpc": "2.0", "id": len(self.sent), "result": dict(result)}


def forward(asks: int, version: str) -> tuple[Any, list[dict[str, Any]]]:
    upstream = Upstream(asks)
    gateway = SimpleNamespace(progress_routes={}, states=RequestStates(b"key"))
    gateway.client_requests = ClientRequests(gateway)
    exchange = Exchange(
        gateway=gateway,
        upstream=SimpleNamespace(sessions=None, upstream=upstream, name="lab"),
        caller=SimpleNamespace(
            protocol_version=version, subject="sam", client_id="agent", chain=("agent",)
        ),
        message=Message({}, "tools/call", 1, {"name": "t", "arguments": {}}),
    )
    rounds = iter(range(1, 100))

    async def answers(result: dict[str, Any]) -> dict[str, Any]:
        return {"inputResponses": {"round": next(rounds)}}

    exchange._answers = answers  # type: ignore[method-assign]
    try:
        outcome: Any = asyncio.run(exchange.forward())
    except RpcError as e:
        outcome = e
    return outcome, upstream.sent


def test_a_2025_client_is_retried_for_after_each_round_of_answers():
    result, sent = forward(3, "2025-11-25")
    assert result == {"content": []}
    assert [params.get("inputResponses") for params in sent] == [
        None,
        {"round": 1},
        {"round": 2},
        {"round": 3},
    ]


def test_an_upstream_that_keeps_asking_is_refused_after_ten_rounds():
    refused, sent = forward(100, "2025-11-25")
    assert isinstance(refused, RpcError) and refused.code == UPSTREAM_UNAVAILABLE
    assert refused.message == "upstream lab kept asking"
    assert len(sent) == 11  # the call, and ten retries


def test_ten_rounds_are_enough_for_an_upstream_that_asks_ten_times():
    result, sent = forward(10, "2025-11-25")
    assert result == {"content": []} and len(sent) == 11


@pytest.mark.parametrize("asks", [1, 100])
def test_a_2026_client_gets_the_question_and_bastion_does_not_retry(asks):
    result, sent = forward(asks, "2026-07-28")
    assert result["resultType"] == "input_required" and len(sent) == 1
    # Under a requestState of bastion's, the only one its retry may carry.
    assert result["requestState"].startswith(ASKED_STATE)
