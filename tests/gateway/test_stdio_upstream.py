"""A misbehaving stdio upstream cannot break bastion's side of the pipe: messages with ids bastion
cannot match, and notifications whose method is not text, are dropped, the real answer still
arrives, and no second process is started."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap

from bastion.gateway.config import UpstreamConfig
from bastion.gateway.upstream import StdioUpstream, say_if_program_missing

# A raw MCP stdio server (no SDK): before each answer it writes messages with crafted ids.
SERVER = textwrap.dedent(
    """
    import json, sys
    for line in sys.stdin:
        message = json.loads(line)
        if "id" not in message:
            continue
        if message["method"] == "initialize":
            result = {"protocolVersion": "2025-11-25", "capabilities": {"tools": {}},
                      "serverInfo": {"name": "raw", "version": "1"}}
        else:
            for crafted in ([message["id"]], {"id": message["id"]}, 1.5, True, None):
                print(json.dumps({"jsonrpc": "2.0", "id": crafted, "result": {}}), flush=True)
            print(json.dumps({"jsonrpc": "2.0", "id": [1], "method": "roots/list"}), flush=True)
            for method in (["x"], 5, {"m": 1}, None):  # a notification's method not text
                print(json.dumps({"jsonrpc": "2.0", "method": method}), flush=True)
            print(json.dumps({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}),
                  flush=True)
            result = {"tools": [{"name": "echo", "inputSchema": {"type": "object"}}]}
        print(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}), flush=True)
    """
)


def test_crafted_ids_from_a_stdio_upstream_are_dropped_and_the_answer_arrives(tmp_path):
    script = tmp_path / "raw_server.py"
    script.write_text(SERVER)

    heard: list = []

    async def scenario() -> tuple[list, int, int, bool]:
        upstream = StdioUpstream(
            UpstreamConfig(name="raw", command=sys.executable, args=(str(script),), timeout=10)
        )

        async def hear(message):
            heard.append(message["method"])

        upstream.on_notification = hear
        try:
            first = await upstream.request("tools/list", {})
            pid = upstream._process.pid
            second = await upstream.request("tools/list", {})
            return (
                [first["result"]["tools"][0]["name"], second["result"]["tools"][0]["name"]],
                pid,
                upstream._process.pid,
                upstream._process.returncode is None,
            )
        finally:
            await upstream.close()

    names, first_pid, second_pid, running = asyncio.run(scenario())
    assert names == ["echo", "echo"]
    assert first_pid == second_pid and running  # the same process throughout, still running
    # Only the notification whose method is text reaches the handler (one per answer).
    assert heard == ["notifications/tools/list_changed"] * 2


def test_a_program_that_is_not_there_is_said_at_start_naming_its_upstream(tmp_path, caplog):
    """A stdio upstream's command or directory that does not exist is logged when bastion
    starts (the gateway says so of each stdio upstream it is given), not met first at a call;
    one that is there says nothing."""
    tool = tmp_path / "bin" / "desk-server"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    cases = {
        "gone": UpstreamConfig(name="gone", command="no-such-mcp-server-7f3a"),
        "nodir": UpstreamConfig(name="nodir", command=sys.executable, cwd=str(tmp_path / "nope")),
        "notexec": UpstreamConfig(name="notexec", command=str(tmp_path / "bin")),
        "relative": UpstreamConfig(name="relative", command="./bin/desk-server", cwd=str(tmp_path)),
        "onpath": UpstreamConfig(
            name="onpath", command="desk-server", env={"PATH": str(tool.parent)}
        ),
        "python": UpstreamConfig(name="python", command=sys.executable),
    }
    said = {}
    for name, config in cases.items():
        caplog.clear()
        with caplog.at_level("WARNING", logger="bastion.gateway"):
            say_if_program_missing(config)
        said[name] = [r.getMessage() for r in caplog.records]
    assert said["gone"] == [
        "upstream gone: its command 'no-such-mcp-server-7f3a' is not found on its PATH;"
        " its calls fail until it is there"
    ]
    assert said["nodir"] and "its directory" in said["nodir"][0] and "nope" in said["nodir"][0]
    assert said["notexec"] and "is not an executable file" in said["notexec"][0]
    assert said["relative"] == said["onpath"] == said["python"] == []


def test_a_stdio_upstream_is_started_off_the_event_loop_and_its_end_is_seen(tmp_path, monkeypatch):
    """Starting the program forks bastion: under uvloop, asyncio's subprocesses fork on the
    event loop (35 to 110 ms of a 600 MB process, every other request waiting). It is started
    in a worker thread; its pipes are the loop's, and its end is noticed (the next call starts
    it again)."""
    from tests.loop import noting_where

    seen: list[str] = []
    monkeypatch.setattr(subprocess, "Popen", noting_where(subprocess.Popen, seen))
    script = tmp_path / "raw_server.py"
    script.write_text(SERVER)

    async def scenario() -> tuple[str, int | None, str]:
        upstream = StdioUpstream(
            UpstreamConfig(name="raw", command=sys.executable, args=(str(script),), timeout=10)
        )
        try:
            first = await upstream.request("tools/list", {})
            process = upstream._process
            process.kill()
            ended = await asyncio.wait_for(process.wait(), 10)
            again = await upstream.request("tools/list", {})
            return (
                first["result"]["tools"][0]["name"],
                ended,
                again["result"]["tools"][0]["name"],
            )
        finally:
            await upstream.close()

    first, ended, again = asyncio.run(scenario())
    assert (first, again) == ("echo", "echo")
    assert ended == -signal.SIGKILL
    assert seen == ["worker thread", "worker thread"]
