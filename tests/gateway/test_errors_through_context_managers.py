"""The gateway's errors keep their kind when they pass through a ``with`` block: the standard
library's context managers made from generators set the ``__traceback__`` of what passes
through them, and a frozen dataclass with slots refused that assignment with a TypeError
(Python 3.11), so an upstream's failure raised inside ``with upstream.connection(...)`` (a
GET stream's start, a lease of a user's upstream session) was no longer the error the gateway
answers with but a crash of the request."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from bastion.gateway.enforce import Held, StepUp
from bastion.gateway.jsonrpc import RpcError
from bastion.gateway.upstream import (
    UpstreamError,
    UpstreamFailure,
    UpstreamUnauthorized,
    UpstreamUnreachable,
)

ERRORS = [
    RpcError(-32000, "failed"),
    UpstreamFailure(-32000, "failed"),
    UpstreamUnauthorized(-32000, "refused"),
    UpstreamUnauthorized(-32000, "refused", before_acting=True),
    UpstreamUnreachable(-32000, "unreachable", cause="ConnectError"),
    UpstreamError(-32001, "its own error"),
    StepUp(("mail:send",), "d-1"),
    Held(None, "d-1", "https://bastion.test/approvals/x", 5.0, "approval_pending", "desk/x"),  # type: ignore[arg-type]
]


@contextlib.contextmanager
def lease():
    try:
        yield
    finally:
        pass


@contextlib.asynccontextmanager
async def async_lease():
    try:
        yield
    finally:
        pass


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_an_error_raised_in_a_with_block_comes_out_as_itself(error):
    with pytest.raises(type(error)) as raised, lease():
        raise error
    assert raised.value is error

    async def main() -> None:
        async with async_lease():
            raise error

    with pytest.raises(type(error)) as raised:
        asyncio.run(main())
    assert raised.value is error


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_an_error_keeps_its_cause_and_notes(error):
    try:
        try:
            raise ValueError("underneath")
        except ValueError as e:
            raise error from e
    except type(error) as caught:
        assert isinstance(caught.__cause__, ValueError)
        caught.add_note("seen")
        assert caught.__notes__ == ["seen"]
