"""Large answers and everyone else: how long the gateway's small calls take while an upstream's
large answers pass through bastion, against the same calls with nothing large under way.

    .venv/bin/python benchmarks/large_answer_bench.py [--customers 40000] [--rounds 4]
        [--calls 1000]

One bastion (``bastion serve``, the quickstart policy: customer emails masked for sam) in front
of one upstream, a plain Streamable HTTP JSON-RPC server in its own process that answers from
bytes made before the run (`UPSTREAM`), so that the upstream spends next to nothing on either
call and what the small calls wait for is bastion. The small call is the quickstart's
``search_customers`` (a few hundred bytes, masked); the large one, ``export_customers``,
answers ``--customers`` customers as structured content and as the JSON text of a text block
(7.6 MB from the upstream at 40,000, its text block 3.6 MB), both masked: read, masked and
written on a worker thread in turns where bastion does so (`bastion.large_json`), in one C
call each on the event loop where it does not. Each round runs ``--calls`` small calls one at
a time, alone, then again while one client calls ``export_customers`` over and over on a
connection of its own. Prints the small calls' median, p99 and longest latency in each phase,
the large call's median latency, and bastion's CPU per large call (from /proc, the phase's CPU
less the small calls' share measured alone). Compare trees by running it in each, interleaved
(docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop
from gateway_bench import (
    access_token,
    cpu_seconds,
    prepare,
    start_bastion,
    stop,
    wait_until_up,
)

from bastion.facts.store import FactStore
from bastion.gateway.http1 import Http1Client
from bastion.policy.parser import parse_fact

# The upstream: its answers to tools/call are the bytes it was given at its start, the request's
# id put in; tools/list names both tools read-only (the quickstart policy lets sam call those).
UPSTREAM = r"""
import json, sys, uvicorn

customers = int(sys.argv[2])
def answer(value):
    return json.dumps({"jsonrpc": "2.0", "id": 0, "result": value}, separators=(",", ":"))
def result(payload):
    return {"content": [{"type": "text", "text": json.dumps(payload)}],
            "structuredContent": payload, "isError": False}
people = [{"id": f"c-{i}", "name": f"Customer {i}", "email": f"c{i}@example.com",
           "plan": "team"} for i in range(customers)]
canned = {
    "search_customers": answer(result({"customers": people[:2]})).split('"id":0', 1),
    "export_customers": answer(result({"customers": people})).split('"id":0', 1),
}
schema = {"type": "object", "properties": {"query": {"type": "string"}}}
tools = [{"name": n, "inputSchema": schema, "annotations": {"readOnlyHint": True}} for n in canned]

async def app(scope, receive, send):
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["method"] != "POST":
        await send({"type": "http.response.start", "status": 405, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    request = json.loads(body)
    if "id" not in request:
        await send({"type": "http.response.start", "status": 202, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    method, ident = request["method"], json.dumps(request["id"])
    if method == "tools/call":
        head, tail = canned[request["params"]["name"]]
        data = f'{head}"id":{ident}{tail}'.encode()
    else:
        if method == "initialize":
            value = {"protocolVersion": request["params"]["protocolVersion"],
                     "capabilities": {"tools": {}}, "serverInfo": {"name": "canned", "version": "1"}}
        elif method == "tools/list":
            value = {"tools": tools}
        else:
            value = {}
        data = json.dumps({"jsonrpc": "2.0", "id": request["id"], "result": value}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": data})

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", loop="uvloop",
            lifespan="off")
"""

META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
}


def headers_for(token: str, tool: str) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "accept": "application/json, text/event-stream",
        "mcp-protocol-version": "2026-07-28",
        "mcp-method": "tools/call",
        "mcp-name": tool,
        "authorization": f"Bearer {token}",
    }


async def call(http: Http1Client, token: str, tool: str, i: int) -> bytes:
    params = {"name": tool, "arguments": {"query": "c"}, "_meta": META}
    body = {"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": params}
    response = await http.request("POST", headers_for(token, tool), json.dumps(body).encode())
    data = await response.read()
    response.close()
    if response.status_code != 200 or b'"result"' not in data[:200]:
        raise SystemExit(f"{tool}: {response.status_code} {data[:300]!r}")
    if b"example.com" in data:
        raise SystemExit(f"{tool}: an email came back unmasked")
    return data


async def phase(url: str, token: str, calls: int, beside: bool) -> tuple[list[float], list[float]]:
    """``calls`` small calls one at a time, with (``beside``) large calls meanwhile on another
    connection: the small calls' latencies and the large calls'."""
    small_http, large_http = Http1Client(url), Http1Client(url)
    small: list[float] = []
    large: list[float] = []
    done = asyncio.Event()

    async def large_calls() -> None:
        i = 0
        while not done.is_set():
            started = time.perf_counter()
            await call(large_http, token, "export_customers", i)
            large.append(time.perf_counter() - started)
            i += 1

    try:
        task = asyncio.create_task(large_calls()) if beside else None
        if task is not None:
            while not large and not task.done():  # one large call through first: in its stride
                await asyncio.sleep(0.01)
        for i in range(calls):
            started = time.perf_counter()
            await call(small_http, token, "search_customers", i)
            small.append(time.perf_counter() - started)
        done.set()
        if task is not None:
            await task
    finally:
        await small_http.aclose()
        await large_http.aclose()
    return small, large


def ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=40_000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--calls", type=int, default=1000, help="small calls per phase")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bastion-large-answer-bench-"))
    bench = prepare(work)
    store = FactStore.open(str(work / "bastion.db"))
    try:  # export_customers is the desk's, and holds customers (their emails masked for sam)
        store.apply(
            [
                parse_fact(
                    'has_relation(Tool{"desk/export_customers"}, "server", McpServer{"desk"})'
                ),
                parse_fact('has_attribute(Tool{"desk/export_customers"}, "holds", "customers")'),
            ],
            actor="benchmark",
        )
    finally:
        store.close()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    upstream = subprocess.Popen(
        [sys.executable, "-c", UPSTREAM, str(bench.upstream_port), str(args.customers)],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    server = start_bastion(bench.config, env)
    url = f"{bench.base}/mcp/desk"
    results = {"alone": ([], []), "beside": ([], [])}
    cpu = {"alone": [], "beside": []}
    try:
        wait_until_up(bench.upstream_url, upstream)
        wait_until_up(f"{bench.base}/healthz", server)
        token, _ = access_token(bench.base, url)
        uvloop.run(phase(url, token, 1, True))  # warm up: both calls, their connections
        for _ in range(args.rounds):
            for name in ("alone", "beside"):
                before = cpu_seconds(server.pid)
                small, large = uvloop.run(phase(url, token, args.calls, name == "beside"))
                cpu[name].append((cpu_seconds(server.pid) - before, len(small), len(large)))
                results[name][0].extend(small)
                results[name][1].extend(large)
    finally:
        stop(server, upstream)

    # CPU per small call, measured alone; what a beside phase spent past its small calls' share
    # is its large calls'.
    alone_cpu = sum(c for c, _, _ in cpu["alone"]) / sum(n for _, n, _ in cpu["alone"])
    large_cpu = [(c - n * alone_cpu) / m for c, n, m in cpu["beside"] if m]
    print(
        f"large answer benchmark: export_customers of {args.customers} customers (structured and"
        f" as JSON text, emails masked) beside search_customers one at a time, {args.rounds}"
        f" rounds x {args.calls} small calls a phase, MCP 2026-07-28 over HTTP"
    )
    print(
        f"{'phase':<7} {'small median ms':>16} {'p99 ms':>8} {'longest ms':>11} {'large calls':>12}"
    )
    for name, (small, large) in results.items():
        print(
            f"{name:<7} {ms(small, 0.5):>16.3f} {ms(small, 0.99):>8.2f}"
            f" {1000 * max(small):>11.2f} {len(large):>12}"
        )
    large = results["beside"][1]
    print(
        f"large call: median {1000 * statistics.median(large):.1f} ms;"
        f" bastion CPU per large call: median {1000 * statistics.median(large_cpu):.1f} ms"
    )
    print(
        "small calls beside large ones, against alone: median"
        f" x{ms(results['beside'][0], 0.5) / ms(results['alone'][0], 0.5):.2f},"
        f" p99 x{ms(results['beside'][0], 0.99) / ms(results['alone'][0], 0.99):.2f}"
    )


if __name__ == "__main__":
    main()
