"""A finished call leaves nothing behind that only Python's cyclic garbage collector can free:
its request's `Exchange` is freed by reference counting when the call ends. A cycle through it
(the flight held the exchange, whose ``emit`` closure held the flight) made every call's objects
wait for a collection, which cost 3 % of the gateway's instructions a call."""

from __future__ import annotations

import gc
import weakref

import pytest

from bastion.gateway.transport import InFlight
from tests.waits import eventually

from .streams import call_tool, modern_headers, modern_request


@pytest.mark.parametrize("accept", ["application/json", "application/json, text/event-stream"])
def test_a_finished_calls_exchange_is_freed_without_the_cyclic_collector(
    bastion, monkeypatch, accept
):
    exchanges: list[weakref.ref] = []
    made = InFlight.__init__

    def noted(self, task, exchange=None):
        made(self, task, exchange)
        if exchange is not None:
            exchanges.append(weakref.ref(exchange))

    monkeypatch.setattr(InFlight, "__init__", noted)
    token = bastion.token("sam", "deskhttp")
    assert "result" in call_tool(bastion, token, "deskhttp", "search_customers", {"query": "a"})
    headers = {**modern_headers(token, "tools/call", "search_customers"), "accept": accept}
    body = modern_request(
        2, "tools/call", {"name": "search_customers", "arguments": {"query": "a"}}
    )
    gc.collect()
    gc.disable()
    try:
        exchanges.clear()
        answer = bastion.http.post(bastion.mcp_url("deskhttp"), json=body, headers=headers)
        assert answer.status_code == 200 and "result" in answer.text, answer.text
        assert len(exchanges) == 1
        # Freed once the request's task has ended, by reference counting alone.
        assert eventually(lambda: exchanges[0]() is None)
    finally:
        gc.enable()
