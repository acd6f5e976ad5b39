"""Gateway overhead: the same ``tools/call`` workload, directly against an upstream MCP server over
Streamable HTTP and through bastion's gateway to that same upstream, in one run.

    .venv/bin/python benchmarks/gateway_bench.py [--clients 4] [--requests 1500] [--rounds 3] [--chain]
        [--floor] [--session shared|per_user|per_client_session] [--records N]
        [--python PATH] [--proxy-headers] [--pin] [--refused]

The upstream is the quickstart's MCP server (official SDK) in its own process; bastion runs
``bastion serve`` in another, with the quickstart policy (the support agent's search, with emails
masked). Clients are concurrent asyncio tasks in this process, speaking MCP 2026-07-28 (one POST
per call, no session). Rounds alternate direct and gateway so drift hits both alike. Prints the
median and p99 latency of each path, the added latency, the throughput ratio, and the CPU time
bastion and the upstream spent per call (from /proc: steadier than latency on a shared machine),
and how long per call the upstream's and bastion's threads were ready to run but had no CPU
(their run-queue wait, from /proc's schedstat: on two shared cores, the CPU other threads held
meanwhile; the floor's in bastion's column on its path).
With ``--chain``, a third path calls through the gateway with a delegated token (RFC 8693 token
exchange): a chain of three principals (the user, their agent, a sub-agent), each decided on
every call, against the plain token's two. With ``--floor``, another path calls through a bare
proxy on bastion's stack (``floor_proxy.py``: uvloop, httptools, bastion's HTTP/1.1 client; no
token, policy, record or mask), its CPU shown in bastion's column: what any proxy written this
way costs, beside what bastion costs. ``--session`` sets the upstream's ``session`` (an
upstream session per user or per client session instead of one shared): run it once with each
value, alternating, to compare them. ``--records`` fills the decision log with that many
records first (`records_bench.py`), so that recording is measured on a log of a server that has
run a while, not on an empty one. ``--python`` runs ``bastion serve`` on the interpreter of
another environment where bastion is installed (with ``PYTHONPATH`` set to the tree, the tree's
code), to compare interpreters: the upstream and the clients stay on this one.
``--proxy-headers`` configures bastion as behind a reverse proxy or a load balancer
(``proxy_headers``, the clients' loopback address trusted to name the client).
``--pin`` (Linux) gives the upstream the first CPU this process may use and bastion, the floor
and the clients the others, on every path alike (an upstream and bastion on one machine set
apart, as `taskset` or a container's CPU set would): without it the kernel places them.
With ``--refused``, another path calls through bastion with arguments the policy refuses (a
search by email, which the quickstart denies to non-admins): a refused call's cost, decided and
recorded, never sent upstream, its answer a JSON-RPC error.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import uvloop

from bastion.gateway.http1 import Http1Client

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart"
PASSWORD = "benchmark-password"
# The SDK's server runs uvicorn inside anyio.run, on asyncio's own loop; `bastion serve` runs
# uvicorn on uvloop. The same loop on both sides keeps the comparison fair.
UPSTREAM = (
    "import runpy, sys, uvloop; uvloop.install(); sys.argv = sys.argv[1:];"
    " runpy.run_path(sys.argv[0], run_name='__main__')"
)
REDIRECT = "http://127.0.0.1:9/callback"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{url}: the process exited with {process.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def wait_until_ok(url: str, process: subprocess.Popen, seconds: float, log: Path) -> None:
    """Until ``url`` answers 200 (a slow start, under valgrind say, may take ``seconds``); exit
    naming ``log`` if ``process`` ends first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"bastion serve exited: see {log}")
        try:
            if httpx.get(url, timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not answer 200 within {seconds:g} s: see {log}")


EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
# --chain: the quickstart policy, and any agent may delegate the read scope to any other.
DELEGATION_RULES = """
may_delegate(_from: Agent, _to: Agent, _server: McpServer);
delegated_scope(_user: User, _from: Agent, _to: Agent, _server: McpServer, "customers:read");
"""


def access_token(base: str, resource: str, delegates: bool = False) -> tuple[str, str]:
    """The user's token for their agent (a public client), and the agent's client_id."""
    http = httpx.Client(timeout=10)
    grant_types = ["authorization_code", "refresh_token"] + ([EXCHANGE] if delegates else [])
    client = http.post(
        f"{base}/register",
        json={
            "client_name": "bench",
            "redirect_uris": [REDIRECT],
            "token_endpoint_auth_method": "none",
            "grant_types": grant_types,
        },
    ).json()
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=")
    params = {
        "response_type": "code",
        "client_id": client["client_id"],
        "redirect_uri": REDIRECT,
        "state": "s",
        "code_challenge": challenge.decode(),
        "code_challenge_method": "S256",
        "resource": resource,
        "scope": "customers:read",
    }
    page = http.get(f"{base}/authorize?{urlencode(params)}")
    fields = dict(re.findall(r"<input type=hidden name=(\w+) value='([^']*)'>", page.text))
    page = http.post(
        f"{base}/authorize/login", data={**fields, "username": "sam", "password": PASSWORD}
    )
    fields = dict(re.findall(r"<input type=hidden name=(\w+) value='([^']*)'>", page.text))
    done = http.post(f"{base}/authorize/consent", data={**fields, "decision": "allow"})
    code = parse_qs(urlsplit(done.headers["location"]).query)["code"][0]
    tokens = http.post(
        f"{base}/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "code_verifier": verifier,
            "client_id": client["client_id"],
        },
    )
    return tokens.json()["access_token"], client["client_id"]


def delegated_token(base: str, resource: str, config: Path, subject: str, agent: str) -> str:
    """A token for a sub-agent (a confidential client made by `bastion clients create`), by
    token exchange of the agent's token: the chain user -> agent -> sub-agent."""
    created = subprocess.run(
        [str(Path(sys.executable).parent / "bastion"), "clients", "create", "--name", "sub-agent"]
        + ["--confidential", "--grant-type", "client_credentials", "--scope", "customers:read"]
        + ["--config", str(config)],
        capture_output=True,
        text=True,
        check=True,
    )
    sub = json.loads(created.stdout)
    http = httpx.Client(timeout=10)
    auth = (sub["client_id"], sub["client_secret"])
    own = http.post(
        f"{base}/token",
        data={"grant_type": "client_credentials", "resource": resource},
        auth=auth,
    )
    own.raise_for_status()
    answer = http.post(
        f"{base}/token",
        data={
            "grant_type": EXCHANGE,
            "client_id": agent,
            "subject_token": subject,
            "subject_token_type": ACCESS_TOKEN,
            "actor_token": own.json()["access_token"],
            "actor_token_type": ACCESS_TOKEN,
        },
    )
    if answer.status_code != 200:
        raise SystemExit(f"token exchange refused: {answer.text}")
    return answer.json()["access_token"]


# Each call searches for another letter: arguments vary, as an agent's do, and so do the answers
# (one to three customers each, emails masked through bastion).
QUERIES = "acdeghilmnoprtuv"


def call_body(i: int, refused: bool = False) -> dict:
    arguments = {"query": QUERIES[i % len(QUERIES)]}
    if refused:
        arguments["field"] = "email"
    return {
        "jsonrpc": "2.0",
        "id": i,
        "method": "tools/call",
        "params": {
            "name": "search_customers",
            "arguments": arguments,
            "_meta": {
                "io.modelcontextprotocol/protocolVersion": "2026-07-28",
                "io.modelcontextprotocol/clientCapabilities": {},
            },
        },
    }


async def run_load(
    url: str, headers: dict, clients: int, requests: int, refused: bool = False
) -> tuple[list[float], float]:
    headers = {
        "content-type": "application/json",
        "accept": "application/json, text/event-stream",
        "mcp-protocol-version": "2026-07-28",
        "mcp-method": "tools/call",
        "mcp-name": "search_customers",
        **headers,
    }
    latencies: list[float] = []
    counter = iter(range(requests))
    # The load generator shares the machine's two cores with bastion and the upstream, so it
    # uses bastion's own lean HTTP/1.1 client (keep-alive, one write per request): httpx spent
    # more CPU per call than bastion or the upstream did, on both paths alike.
    http = Http1Client(url)

    async def worker() -> None:
        for i in counter:
            started = time.perf_counter()
            sent = json.dumps(call_body(i, refused)).encode()
            response = await http.request("POST", headers, sent)
            body = await response.read()
            response.close()
            latencies.append(time.perf_counter() - started)
            # A refused call must be refused by the policy (not, say, rate limited).
            answered = (
                b'"reason":"not_permitted"' in body if refused else b'"error"' not in body[:200]
            )
            if response.status_code != 200 or not answered:
                raise SystemExit(f"{url}: {response.status_code} {body[:300]!r}")

    try:
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - started
    finally:
        await http.aclose()
    return latencies, requests / elapsed


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def waited_seconds(pid: int) -> float:
    """Time the threads of a process now running have spent ready to run but without a CPU
    (Linux ``/proc/<pid>/task/*/schedstat``, its second field; 0 elsewhere). A thread that
    ended between two readings takes its share with it."""
    total = 0
    for task in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            total += int(task.read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


def times(proxy: int, upstream: int) -> tuple[float, ...]:
    """The seconds so far, in the order the summary reads them: the proxy's CPU, the upstream's
    CPU, this process's CPU (the clients'), the upstream's run-queue wait, the proxy's."""
    return (
        cpu_seconds(proxy),
        cpu_seconds(upstream),
        time.process_time(),
        waited_seconds(upstream),
        waited_seconds(proxy),
    )


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass(frozen=True)
class Bench:
    """A prepared run: bastion's URL, the upstream's, and the configuration to serve."""

    base: str
    upstream_url: str
    upstream_port: int
    config: Path


# `[server]` settings of a bastion behind a reverse proxy on this machine (--proxy-headers).
BEHIND_PROXY = 'proxy_headers = true\nforwarded_allow_ips = "127.0.0.1"\n'


def prepare(
    work: Path,
    *,
    chain: bool = False,
    session: str = "shared",
    server_settings: str = "",
    traced: bool = False,
    records: int = 0,
) -> Bench:
    """Write ``work/bastion.toml`` (the quickstart policy, one upstream ``desk``) and its
    database with the quickstart's facts and users (sam's password: `PASSWORD`). ``traced``:
    for a server run under a tracer or valgrind, many times slower: tokens that outlive the
    run, and no change-log poll during it. ``records``: decision records already in the log
    (as a server that has run a while has), written as the gateway writes them."""
    upstream_port, bastion_port = free_port(), free_port()
    base = f"http://127.0.0.1:{bastion_port}"
    upstream_url = f"http://127.0.0.1:{upstream_port}/mcp"
    database = str(work / "bastion.db")
    policy = QUICKSTART / "policy.polar"
    lifetimes = ""
    if traced:
        server_settings += "\npoll_interval = 30\nmax_staleness_seconds = 3600\n"
        lifetimes = "access_token_seconds = 3600\n"
    if chain:
        policy = work / "policy.polar"
        policy.write_text((QUICKSTART / "policy.polar").read_text() + DELEGATION_RULES)
        # Tokens that outlive the longest run (a delegated token never outlives its subject).
        lifetimes = "access_token_seconds = 3600\nexchanged_token_seconds = 3600\n"
    config = work / "bastion.toml"
    config.write_text(
        f"""
[server]
database = "{database}"
policy_file = "{policy}"
port = {bastion_port}
log_level = "warning"
{server_settings}
[oauth]
issuer = "{base}"
key_dir = "{work / "keys"}"
{lifetimes}[[oauth.resources]]
uri = "{base}/mcp/desk"
scopes = ["customers:read", "customers:write"]

[gateway]
[[gateway.upstreams]]
name = "desk"
url = "{upstream_url}"
scopes = ["customers:read"]
{f'session = "{session}"' if session != "shared" else ""}
"""
    )
    sys.path.insert(0, str(QUICKSTART))
    from setup import setup  # the quickstart's facts and users

    import bastion.oauth.users as users

    setup(database)
    from bastion.db import Database
    from bastion.oauth.store import OAuthStore

    db = Database(database)
    OAuthStore(db).change_password(
        "sam", users.hash_password(PASSWORD), time.time(), actor="benchmark"
    )
    if records:
        from records_bench import fill

        from bastion.audit.decisions import DecisionRecords

        fill(DecisionRecords(db), records)
    db.close()
    return Bench(base, upstream_url, upstream_port, config)


def start_upstream(port: int, env: dict[str, str]) -> subprocess.Popen:
    """The quickstart's MCP server (official SDK, Streamable HTTP) on uvloop, on ``port``."""
    return subprocess.Popen(
        [sys.executable, "-c", UPSTREAM, str(QUICKSTART / "server.py"), "--http", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def start_bastion(config: Path, env: dict[str, str], python: str | None = None) -> subprocess.Popen:
    """``bastion serve`` with ``config``, its output discarded; ``python``: the interpreter of
    the environment whose ``bastion`` runs (this one's by default)."""
    return subprocess.Popen(
        [str(Path(python or sys.executable).parent / "bastion"), "serve", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop(*processes: subprocess.Popen) -> None:
    """Stop ``processes`` as Ctrl-C would, killing one that takes more than 10 s."""
    for process in processes:
        process.send_signal(signal.SIGINT)
    for process in processes:
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


# What `between_signals` runs after its script: the script's ``start`` and ``stop`` on the two
# signals, then `bastion serve` with the configuration (``config``).
_SERVE_BETWEEN_SIGNALS = """
signal.signal(signal.SIGUSR1, start)
signal.signal(signal.SIGUSR2, stop)
sys.argv = ["bastion", "serve", "--config", config]
from bastion.cli import main

main()
"""


def signed_in(
    bench: Bench, upstream: subprocess.Popen, server: subprocess.Popen, up_within: float, log: Path
) -> dict[str, str]:
    """Once the upstream and bastion (within ``up_within`` seconds; ``log``, its output) answer:
    the headers of calls with a token of the benchmark's agent."""
    wait_until_up(bench.upstream_url, upstream)
    wait_until_ok(f"{bench.base}/healthz", server, up_within, log)
    token, _ = access_token(bench.base, f"{bench.base}/mcp/desk")
    return {"authorization": f"Bearer {token}"}


def between_signals(script: str, requests: int, name: str) -> Path:
    """Run ``bastion serve`` under ``script`` (``python -c``; its arguments: where it writes
    what it measured, then the configuration; it defines ``start`` and ``stop``, run on SIGUSR1
    and SIGUSR2), on this benchmark's setup: warmed by 50 calls, then SIGUSR1, ``requests``
    calls of one client, SIGUSR2. The file ``script`` wrote (in a new folder named after
    ``name``), once it is there; the processes are stopped."""
    work = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    bench = prepare(work, traced=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    upstream = start_upstream(bench.upstream_port, env)
    out = work / "measured.json"
    log = open(work / "serve.log", "wb")  # noqa: SIM115 - closed in the finally below
    server = subprocess.Popen(
        [sys.executable, "-c", script + _SERVE_BETWEEN_SIGNALS, str(out), str(bench.config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"{bench.base}/mcp/desk"
    try:
        headers = signed_in(bench, upstream, server, 120, work / "serve.log")
        uvloop.run(run_load(url, headers, 1, 50))  # the token remembered, the code warm
        time.sleep(0.5)
        server.send_signal(signal.SIGUSR1)
        time.sleep(0.5)
        uvloop.run(run_load(url, headers, 1, requests))
        time.sleep(0.5)
        server.send_signal(signal.SIGUSR2)
        for _ in range(100):
            if out.exists() and out.stat().st_size:
                break
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        for process in (server, upstream):
            process.terminate()
            process.wait(60)
        log.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=1500, help="per round and path")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--chain",
        action="store_true",
        help="also call with a delegated token: user -> agent -> sub-agent (token exchange)",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also call through a bare proxy on the same stack (floor_proxy.py): the floor",
    )
    parser.add_argument(
        "--session",
        choices=("shared", "per_user", "per_client_session"),
        default="shared",
        help="the upstream's session setting (docs/gateway.md, Upstream sessions)",
    )
    parser.add_argument(
        "--python",
        help="the Python of another environment with bastion installed, to run `bastion serve`"
        " on another interpreter (the upstream and the clients stay on this one)",
    )
    parser.add_argument(
        "--records",
        type=int,
        default=0,
        help="decision records in the log before the run, as after a while in service",
    )
    parser.add_argument(
        "--proxy-headers",
        action="store_true",
        help="bastion behind a reverse proxy: proxy_headers on, the clients' loopback trusted"
        " (forwarded_allow_ips), as a deployment behind a load balancer is configured",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="the upstream on the first CPU, bastion, the floor and the clients on the others",
    )
    parser.add_argument(
        "--refused",
        action="store_true",
        help="also call through bastion with arguments the policy refuses (a search by email)",
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bastion-gateway-bench-"))
    bench = prepare(
        work,
        chain=args.chain,
        session=args.session,
        records=args.records,
        server_settings=BEHIND_PROXY if args.proxy_headers else "",
    )
    base, upstream_url = bench.base, bench.upstream_url
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cpus = sorted(os.sched_getaffinity(0)) if args.pin else []
    if args.pin:
        if len(cpus) < 2:
            raise SystemExit("--pin needs two CPUs or more")
        os.sched_setaffinity(0, cpus[:1])  # the upstream inherits it
    upstream = start_upstream(bench.upstream_port, env)
    if args.pin:
        os.sched_setaffinity(0, cpus[1:])  # bastion, the floor and the clients
    server = start_bastion(bench.config, env, args.python)
    floor = None
    if args.floor:
        floor_port = free_port()
        floor = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "benchmarks" / "floor_proxy.py"),
                str(floor_port),
                upstream_url,
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    try:
        wait_until_up(upstream_url, upstream)
        wait_until_up(f"{base}/healthz", server)
        token, agent = access_token(base, f"{base}/mcp/desk", delegates=args.chain)
        paths = {
            "direct": (upstream_url, {}),
            "gateway": (f"{base}/mcp/desk", {"authorization": f"Bearer {token}"}),
        }
        if args.chain:
            chained = delegated_token(base, f"{base}/mcp/desk", bench.config, token, agent)
            paths["chain"] = (f"{base}/mcp/desk", {"authorization": f"Bearer {chained}"})
        if args.refused:
            paths["refused"] = paths["gateway"]
        # The proxy whose CPU is counted on each path: bastion's, or the floor's.
        proxies = dict.fromkeys(paths, server)
        if floor is not None:
            floor_url = f"http://127.0.0.1:{floor_port}/mcp"
            wait_until_up(floor_url, floor)
            paths["floor"] = (floor_url, {})
            proxies["floor"] = floor
        for name, (url, headers) in paths.items():  # warm up each (connections, stdio, caches)
            uvloop.run(run_load(url, headers, args.clients, 100, name == "refused"))
        results: dict[str, dict[str, list]] = {k: {"lat": [], "tput": [], "cpu": []} for k in paths}
        for _ in range(args.rounds):
            for name, (url, headers) in paths.items():
                proxy = proxies[name].pid
                before = times(proxy, upstream.pid)
                latencies, throughput = uvloop.run(
                    run_load(url, headers, args.clients, args.requests, name == "refused")
                )
                after = times(proxy, upstream.pid)
                results[name]["lat"] += latencies
                results[name]["tput"].append(throughput)
                results[name]["cpu"].append([b - a for a, b in zip(before, after, strict=True)])
    finally:
        stop(server, upstream, *([floor] if floor is not None else []))

    print(
        f"gateway benchmark: tools/call search_customers, {args.clients} concurrent clients,"
        f" {args.rounds} rounds x {args.requests} calls per path, MCP 2026-07-28 over HTTP,"
        f" upstream session {args.session}"
        + (f", upstream on CPU {cpus[0]}, the rest on {cpus[1:]}" if args.pin else "")
    )
    print(
        f"{'path':<8} {'median ms':>10} {'p99 ms':>8} {'calls/s':>9}"
        f" {'bastion CPU us/call':>20} {'upstream CPU us/call':>21} {'client CPU us/call':>19}"
        f" {'upstream waited us/call':>24} {'bastion waited us/call':>23}"
    )
    summary = {}
    calls = args.rounds * args.requests
    for name, data in results.items():
        median = statistics.median(data["lat"]) * 1000
        p99 = p(data["lat"], 0.99) * 1000
        tput = statistics.median(data["tput"])
        server_cpu, upstream_cpu, client_cpu, upstream_waited, server_waited = (
            sum(c[i] for c in data["cpu"]) / calls * 1e6 for i in range(5)
        )
        summary[name] = (median, p99, tput)
        print(
            f"{name:<8} {median:>10.3f} {p99:>8.3f} {tput:>9.0f}"
            f" {server_cpu:>20.0f} {upstream_cpu:>21.0f} {client_cpu:>19.0f}"
            f" {upstream_waited:>24.0f} {server_waited:>23.0f}"
        )
    d, g = summary["direct"], summary["gateway"]
    print(f"added latency: median {g[0] - d[0]:.3f} ms, p99 {g[1] - d[1]:.3f} ms")
    # The machine's speed drifts from minute to minute; divided by what the upstream spent on
    # the direct round just before, a proxy's CPU per call moves much less.
    for name in ("gateway", "floor", "refused"):
        if name in results:
            ratios = [
                mine[0] / direct[1]
                for mine, direct in zip(results[name]["cpu"], results["direct"]["cpu"], strict=True)
                if direct[1] > 0
            ]
            if ratios:
                print(
                    f"{name} CPU per call / the upstream's on the direct path, by round: median"
                    f" {statistics.median(ratios):.3f} ({', '.join(f'{r:.3f}' for r in ratios)})"
                )
    print(f"throughput through bastion: {g[2] / d[2]:.0%} of direct")
    if "floor" in summary:
        f = summary["floor"]
        print(
            f"the floor (a bare proxy on bastion's stack, its CPU in the bastion column): median"
            f" {f[0] - d[0]:+.3f} ms over direct; throughput {f[2] / d[2]:.0%} of direct"
        )
    if "refused" in summary:
        r = summary["refused"]
        print(
            f"refused calls (decided, recorded, not sent upstream): median {r[0]:.3f} ms,"
            f" {r[0] - g[0]:+.3f} ms against an allowed call through bastion; throughput"
            f" {r[2] / d[2]:.0%} of direct"
        )
    if "chain" in summary:
        c = summary["chain"]
        print(
            f"chain of three principals (user, agent, sub-agent): median {c[0] - g[0]:+.3f} ms,"
            f" p99 {c[1] - g[1]:+.3f} ms over the gateway's two; throughput {c[2] / d[2]:.0%}"
            " of direct"
        )


if __name__ == "__main__":
    main()
