"""Stopping `bastion serve` ends the streams clients hold open (a 2025-11-25 GET stream, a
2026-07-28 listen stream), cleanly, instead of waiting for their clients to leave."""

from __future__ import annotations

import json
import signal
import subprocess
import threading

import httpx

from tests.waits import PATIENCE

from .streams import legacy_session, modern_headers, modern_request
from .support import Running, serve_quickstart

QUICKSTART_PASSWORD = "quickstart-password"  # examples/quickstart/setup.py


def _hold(open_stream, seen: dict, opened: threading.Event) -> threading.Thread:
    """Read a stream in a thread until it ends; note how it ended."""

    def read():
        try:
            with open_stream() as response:
                seen["status"] = response.status_code
                frames = []
                for line in response.iter_lines():
                    opened.set()
                    frames.append(line)
                seen["lines"] = frames
                seen["end"] = "clean"
        except httpx.HTTPError as e:
            seen["end"] = f"broken: {e!r}"
        finally:
            opened.set()

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def test_sigterm_ends_the_open_streams_cleanly_and_bastion_exits(tmp_path):
    server, url = serve_quickstart(tmp_path)
    try:
        with httpx.Client(timeout=httpx.Timeout(10, read=60)) as http:
            running = Running(url, None, None, None, http, None, password=QUICKSTART_PASSWORD)
            token = running.token("sam", "desk")
            session = legacy_session(running, token, "desk")
            get_seen, get_open = {}, threading.Event()
            get = _hold(
                lambda: http.stream(
                    "GET",
                    running.mcp_url("desk"),
                    headers={**session, "accept": "text/event-stream"},
                ),
                get_seen,
                get_open,
            )
            listen_seen, listen_open = {}, threading.Event()
            listen = _hold(
                lambda: http.stream(
                    "POST",
                    running.mcp_url("desk"),
                    json=modern_request(
                        "held",
                        "subscriptions/listen",
                        {"notifications": {"toolsListChanged": True}},
                    ),
                    headers=modern_headers(token, "subscriptions/listen"),
                ),
                listen_seen,
                listen_open,
            )
            assert get_open.wait(PATIENCE) and listen_open.wait(PATIENCE)
            assert get_seen.get("end") is None and listen_seen.get("end") is None  # both held

            server.send_signal(signal.SIGTERM)
            try:
                server.wait(PATIENCE)
            except subprocess.TimeoutExpired:
                raise AssertionError("bastion serve still waits on the open streams") from None
            get.join(PATIENCE)
            listen.join(PATIENCE)
        assert server.returncode in (0, -signal.SIGTERM)
        # Both streams ended as HTTP allows (their last chunk sent), not cut off.
        assert get_seen["status"] == 200 and get_seen["end"] == "clean"
        assert listen_seen["status"] == 200 and listen_seen["end"] == "clean"
        # The listen stream's last event is its request's result: a deliberate end.
        last = json.loads(
            [line for line in listen_seen["lines"] if line.startswith("data:")][-1][5:]
        )
        assert last["id"] == "held" and last["result"]["resultType"] == "complete"
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
