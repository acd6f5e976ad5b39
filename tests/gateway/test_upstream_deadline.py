"""The timeout of a request upstream (`Upstream.request`) behaves as ``asyncio.timeout`` around
the exchange: past it the request is abandoned and answered UPSTREAM_UNAVAILABLE, and the task
is left as if it had never been cancelled; any other cancellation (the client's, an outer
timeout's, both at once) goes on as a cancellation and is never taken for the timeout."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bastion.gateway.config import UpstreamConfig
from bastion.gateway.jsonrpc import UPSTREAM_UNAVAILABLE, RpcError
from bastion.gateway.upstream import REVOKED, SUSPENDED, Upstream


class Scripted(Upstream):
    """An upstream whose exchange takes ``delay`` seconds, then answers or raises ``error``."""

    def __init__(self, timeout: float, delay: float, error: BaseException | None = None) -> None:
        super().__init__(UpstreamConfig(name="scripted", command="unused", timeout=timeout))
        self.delay, self.error = delay, error
        self.abandoned: list[tuple[Any, str]] = []

    async def _connect(self) -> None:
        pass

    async def _exchange(self, message, *, capabilities=None, ask=None, hear=None, sent=None):
        await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return {"jsonrpc": "2.0", "id": message["id"], "result": {}}

    def _abandon(self, request_id: Any, reason: str) -> None:
        self.abandoned.append((request_id, reason))

    async def _send_notification(self, message: dict[str, Any]) -> None:
        pass

    async def close(self) -> None:
        pass


def test_an_answer_within_the_timeout_leaves_no_timer_and_no_cancellation():
    async def scenario():
        upstream = Scripted(timeout=0.2, delay=0)
        # In time however slow the machine: the answer's step is queued before the deadline's
        # timer can be (asyncio runs what is ready before the timers that came due meanwhile).
        answer = await upstream.request("tools/list", {})
        await asyncio.sleep(0.3)  # past the timeout: a timer left behind would cancel this
        return answer, asyncio.current_task().cancelling(), upstream.abandoned

    answer, cancelling, abandoned = asyncio.run(scenario())
    assert answer["result"] == {} and cancelling == 0 and abandoned == []


def test_past_the_timeout_the_request_is_abandoned_and_refused_and_the_task_goes_on():
    async def scenario():
        upstream = Scripted(timeout=0.05, delay=10)
        with pytest.raises(RpcError) as refused:
            await upstream.request("tools/call", {"name": "slow"})
        task = asyncio.current_task()
        await asyncio.sleep(0.01)  # not cancelled: the deadline's cancellation was taken back
        return refused.value, task.cancelling(), upstream.abandoned

    error, cancelling, abandoned = asyncio.run(scenario())
    assert error.code == UPSTREAM_UNAVAILABLE
    assert error.message == "upstream scripted did not answer tools/call within 0.05s"
    assert error.__suppress_context__
    assert cancelling == 0
    assert abandoned == [(1, "bastion stopped waiting")]


def test_a_timeout_error_from_the_exchange_is_answered_as_the_timeout():
    async def scenario():
        upstream = Scripted(timeout=5, delay=0, error=TimeoutError())
        with pytest.raises(RpcError) as refused:
            await upstream.request("ping", None)
        return refused.value, upstream.abandoned

    error, abandoned = asyncio.run(scenario())
    assert "did not answer ping within 5s" in error.message
    assert abandoned == [(1, "bastion stopped waiting")]


def test_the_clients_cancellation_is_a_cancellation():
    async def scenario():
        upstream = Scripted(timeout=5, delay=10)
        task = asyncio.ensure_future(upstream.request("tools/call", {"name": "slow"}))
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return upstream.abandoned

    assert asyncio.run(scenario()) == [(1, "the client cancelled the request")]


@pytest.mark.parametrize("reason", [REVOKED, SUSPENDED])
def test_a_request_bastion_stops_is_told_so_and_not_why(reason):
    """Stopped because its caller's token was revoked or its caller suspended (`InFlight.stop`):
    the upstream is told bastion stopped it, not that the client cancelled, nor why (a third
    party is not told of a caller's standing)."""

    async def scenario():
        upstream = Scripted(timeout=5, delay=10)
        task = asyncio.ensure_future(upstream.request("tools/call", {"name": "slow"}))
        await asyncio.sleep(0.02)
        task.cancel(reason)
        with pytest.raises(asyncio.CancelledError):
            await task
        return upstream.abandoned

    assert asyncio.run(scenario()) == [(1, "bastion stopped the request")]


def test_an_outer_timeout_shorter_than_the_upstreams_is_the_outer_ones():
    async def scenario():
        upstream = Scripted(timeout=5, delay=10)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await upstream.request("tools/call", {"name": "slow"})
        return asyncio.current_task().cancelling(), upstream.abandoned

    cancelling, abandoned = asyncio.run(scenario())
    assert cancelling == 0
    assert abandoned == [(1, "the client cancelled the request")]


def test_a_cancellation_at_the_deadline_is_not_taken_for_the_timeout():
    """The client cancels in the very turn the deadline cancels too: the task had two
    cancellations, one is the client's, so the request ends cancelled, not timed out."""

    async def scenario():
        upstream = Scripted(timeout=0.05, delay=10)
        loop = asyncio.get_running_loop()
        # The timers the request sets as it starts (its deadline, its exchange's sleep), seen as
        # they are set, so that the client's cancellation can be set for the deadline's very
        # moment: two timers due at once run in one turn of the loop, before the task resumes
        # (0.05 s after, as before, depended on the machine: a loaded one ran them apart).
        timers, call_later = [], loop.call_later

        def recorded(delay, callback, *args, **kwargs):
            timers.append(call_later(delay, callback, *args, **kwargs))
            return timers[-1]

        loop.call_later = recorded
        try:
            task = asyncio.ensure_future(upstream.request("tools/call", {"name": "slow"}))
            await asyncio.sleep(0)  # the request starts: its deadline is set
        finally:
            del loop.call_later
        deadline = min(timers, key=lambda timer: timer.when())
        loop.call_at(deadline.when(), task.cancel)
        with pytest.raises(asyncio.CancelledError):
            await task
        return upstream.abandoned

    assert asyncio.run(scenario()) == [(1, "the client cancelled the request")]


def test_an_error_past_the_deadline_is_that_error():
    """The exchange turns the deadline's cancellation into its own error: that error goes on,
    and the task is not left cancelling."""

    class Converts(Scripted):
        async def _exchange(self, message, *, capabilities=None, ask=None, hear=None, sent=None):
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                raise RpcError(-32001, "converted") from None
            return {}

    async def scenario():
        upstream = Converts(timeout=0.05, delay=0)
        with pytest.raises(RpcError) as raised:
            await upstream.request("ping", None)
        return raised.value.message, asyncio.current_task().cancelling(), upstream.abandoned

    assert asyncio.run(scenario()) == ("converted", 0, [])
