"""An HTTP upstream whose notification stream cannot be opened (it is down, or refuses the
stream) is tried again after a wait that backs off, and the outage is logged once when it begins
and once when the stream is open again, not at every attempt. A real MCP server (the lab's, in
either era) is reached through a relay the test cuts: the server itself never stops."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from bastion.gateway.config import UpstreamConfig
from bastion.gateway.upstream import HttpUpstream
from bastion.retries import Backoff
from tests.oauth.support import Servers, free_socket
from tests.relays import Relay
from tests.waits import PATIENCE

from .support import LegacyOnly, MemoryEvents, fresh_module

LAB = Path(__file__).parent / "lab_server.py"
UPSTREAM_LOG = "bastion.gateway.upstream"


def about_the_stream(caplog, level: int = logging.DEBUG) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == UPSTREAM_LOG and r.levelno >= level and "notification stream" in r.getMessage()
    ]


@pytest.mark.parametrize("era", ["2025-11-25", "2026-07-28"])
def test_a_stream_that_cannot_be_opened_backs_off_and_is_said_once_and_once_again(era, caplog):
    """Before, each upstream connection opened its stream again every second for as long as the
    upstream was away, and logged a warning at each attempt."""
    caplog.set_level(logging.DEBUG, logger=UPSTREAM_LOG)
    lab = fresh_module("lab_server", LAB)
    app = LegacyOnly(
        lab.server.streamable_http_app(streamable_http_path="/mcp", event_store=MemoryEvents()),
        legacy=era == "2025-11-25",
    )
    with Servers() as servers:
        base = servers.serve(app, free_socket())
        port = int(base.rsplit(":", 1)[1])
        with Relay(("127.0.0.1", port)) as relay:
            upstream = HttpUpstream(
                UpstreamConfig(name="lab", url=f"http://127.0.0.1:{relay.port}/mcp")
            )
            upstream.stream_retries = Backoff(0.01, 0.05)  # many attempts soon

            async def scenario() -> tuple[list[str], int, int]:
                try:
                    await upstream.watch(frozenset())
                    assert upstream._opened.is_set()
                    assert (upstream._modern, about_the_stream(caplog)) == (era != "2025-11-25", [])
                    relay.cut()
                    async with asyncio.timeout(PATIENCE):
                        # Attempts, each said (at DEBUG once the outage was said).
                        while len(about_the_stream(caplog)) < 6:
                            await asyncio.sleep(0.01)
                    during = about_the_stream(caplog, logging.WARNING)
                    failures = upstream.stream_retries.failures
                    relay.restore()
                    async with asyncio.timeout(PATIENCE):
                        while len(about_the_stream(caplog, logging.WARNING)) < 2:
                            await asyncio.sleep(0.01)
                    return during, failures, upstream.stream_retries.failures
                finally:
                    await upstream.close()

            during, failures, after = asyncio.run(scenario())
    assert len(during) == 1, during
    assert failures >= 5  # its waits backed off, from the first up
    lines = about_the_stream(caplog, logging.WARNING)
    assert len(lines) == 2 and "open again" in lines[1] and "open again" not in lines[0], lines
    assert after == 0  # open again: the next outage waits the first wait again
