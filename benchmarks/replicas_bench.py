"""Throughput of bastion's gateway with one replica, and with two behind HAProxy, in one run.

    .venv/bin/python benchmarks/replicas_bench.py [--clients 4] [--requests 300] [--rounds 2]

Starts what tests/scale/test_load_balancer.py starts (two `bastion serve` replicas on a fresh
PostgreSQL schema of the `test` database and one Redis, HAProxy in front, round robin, the
quickstart's MCP server upstream), then sends the same 2026-07-28 `tools/call` load (concurrent
asyncio clients, one POST per call, the support agent's allowed search) to one replica directly
and to the load balancer, alternating rounds so drift hits both alike. Prints calls per second,
median and p99 latency of each path, and the CPU time the bastion replicas and HAProxy spent
per call (from /proc: steadier than latency on a shared machine).

Every process shares this machine: on two cores the second replica has no core of its own, so
this shows what the extra hop and process cost, not what a second machine gains.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import POSTGRES_URL  # noqa: E402
from tests.gateway.streams import modern_headers, modern_request  # noqa: E402
from tests.gateway.support import PASSWORD, QUICKSTART, access_token  # noqa: E402
from tests.oauth.support import free_socket  # noqa: E402
from tests.scale.balancer import deployment  # noqa: E402

TOOL, ARGUMENTS = "search_customers", {"query": "a"}


async def load(url: str, token: str, clients: int, requests: int) -> tuple[float, list[float]]:
    """``requests`` calls from ``clients`` concurrent clients; (calls per second, latencies)."""
    latencies: list[float] = []
    headers = modern_headers(token, "tools/call", TOOL)
    body = modern_request(1, "tools/call", {"name": TOOL, "arguments": ARGUMENTS})
    left = requests

    async def client() -> None:
        nonlocal left
        async with httpx.AsyncClient(timeout=30) as http:
            while left > 0:
                left -= 1
                started = time.perf_counter()
                response = await http.post(url, json=body, headers=headers)
                latencies.append(time.perf_counter() - started)
                if response.status_code != 200 or "error" in response.text[:200]:
                    raise SystemExit(f"call failed: {response.status_code} {response.text[:300]}")

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return requests / (time.perf_counter() - started), latencies


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for(url: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while process.poll() is None and time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit(f"the upstream at {url} did not come up")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=300, help="calls per round and path")
    parser.add_argument("--rounds", type=int, default=2)
    options = parser.parse_args()
    # The MCP SDK's import turns on INFO logging, and httpx logs every request at INFO: that
    # would be the load generator's CPU, not bastion's.
    logging.getLogger("httpx").setLevel(logging.WARNING)

    schema = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    database = f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    # The upstream in a process of its own, so that it does not share this one's CPU.
    port = free_socket().getsockname()[1]
    upstream = subprocess.Popen(
        [sys.executable, str(QUICKSTART / "server.py"), "--http", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    upstream_url = f"http://127.0.0.1:{port}/mcp"
    try:
        wait_for(upstream_url, upstream)
        with (
            tempfile.TemporaryDirectory() as tmp,
            deployment(Path(tmp), database, upstream=upstream_url) as lb,
        ):
            with httpx.Client(timeout=20) as http:
                token = access_token(http, lb.url, lb.mcp_url(), "sam", PASSWORD, "customers:read")
            paths = {
                "one replica (direct)": f"{lb.replicas['a']}/mcp/deskhttp",
                "two replicas (HAProxy)": lb.mcp_url(),
            }
            # calls per second of each round, latencies, CPU seconds of bastion and of HAProxy
            figures: dict[str, list] = {name: [[], [], 0.0, 0.0] for name in paths}
            bastions = [lb.pids["a"], lb.pids["b"]]
            for url in paths.values():  # warm up each path
                asyncio.run(load(url, token, options.clients, 50))
            for _ in range(options.rounds):
                for name, url in paths.items():
                    before = sum(map(cpu_seconds, bastions)), cpu_seconds(lb.pids["haproxy"])
                    rate, latencies = asyncio.run(
                        load(url, token, options.clients, options.requests)
                    )
                    after = sum(map(cpu_seconds, bastions)), cpu_seconds(lb.pids["haproxy"])
                    figures[name][0].append(rate)
                    figures[name][1].extend(latencies)
                    figures[name][2] += after[0] - before[0]
                    figures[name][3] += after[1] - before[1]
    finally:
        upstream.terminate()
        upstream.wait()
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")

    print(
        f"{options.clients} clients, {options.requests} calls per round and path, "
        f"{options.rounds} rounds, 2026-07-28 tools/call {TOOL}"
    )
    base = statistics.median(figures["one replica (direct)"][0])
    calls = options.requests * options.rounds
    for name, (rates, latencies, bastion_cpu, haproxy_cpu) in figures.items():
        latencies.sort()
        p50 = statistics.median(latencies) * 1000
        p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
        rate = statistics.median(rates)
        print(
            f"{name:24} {rate:7.0f} calls/s ({rate / base:4.0%})  "
            f"p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  "
            f"bastion CPU {bastion_cpu / calls * 1e6:5.0f} us/call  "
            f"HAProxy CPU {haproxy_cpu / calls * 1e6:4.0f} us/call"
        )


if __name__ == "__main__":
    main()
