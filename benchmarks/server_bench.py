"""Decision service benchmark: HTTP decisions beside in-process ones, writes, replica catch-up.

    .venv/bin/python benchmarks/server_bench.py --facts 1000000
    .venv/bin/python benchmarks/server_bench.py --facts 100000 --http-only --rounds 3
    .venv/bin/python benchmarks/server_bench.py --facts 100000 --http-only --rounds 2 \
        --client both --compare ../main-worktree

Prints figures; asserts nothing. The load runs in a separate process (one keep-alive connection,
one request at a time: httpx, the SDK's client, or ``--client raw``, a lean socket client whose
own cost is a small part of httpx's) against a real ``bastion serve`` on 127.0.0.1; the server's
CPU per request is read from /proc around each timed load. ``--compare`` serves another checkout
on a copy of the same store too (so that one which migrates a table does not stop the other),
its rounds interleaved with this one's (A B B A A B ...). PostgreSQL figures need the
server at 127.0.0.1:5432 (as for the tests); they are skipped with a note otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADMIN_KEY = "bench-admin-key-" + "k" * 32
POSTGRES_URL = os.environ.get("BASTION_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")

POLICY = """
actor User {}
resource Org {
  roles = ["member", "admin"];
  permissions = ["read"];
  "read" if "member";
  "member" if "admin";
}
resource Repo {
  roles = ["reader", "maintainer"];
  permissions = ["read", "push"];
  relations = { parent: Org };
  "read" if "reader";
  "push" if "maintainer";
  "reader" if "maintainer";
  "reader" if "member" on "parent";
}
allow(actor, action, resource) if has_permission(actor, action, resource);
"""


def gitclub_facts(n: int) -> list[tuple]:
    """About ``n`` facts: repos in orgs, org members, and direct repo roles."""
    from bastion.facts.model import Entity

    rng = random.Random(7)
    orgs = max(10, n // 1000)
    repos = max(100, n // 4)
    users = max(100, n // 10)
    facts: list[tuple] = []
    for r in range(repos):
        facts.append(
            ("has_relation", Entity("Repo", f"r{r}"), "parent", Entity("Org", f"o{r % orgs}"))
        )
    for u in range(users // 10):
        facts.append(("has_role", Entity("User", f"u{u}"), "member", Entity("Org", f"o{u % orgs}")))
    while len(facts) < n:
        u, r = rng.randrange(users), rng.randrange(repos)
        facts.append(
            (
                "has_role",
                Entity("User", f"u{u}"),
                rng.choice(["reader", "maintainer"]),
                Entity("Repo", f"r{r}"),
            )
        )
    return list(dict.fromkeys(facts))


def checks(facts: list[tuple], count: int) -> list[dict]:
    """Half are direct grants that exist (allowed), half random pairs (mostly denied)."""
    rng = random.Random(11)
    roles = [f for f in facts if f[0] == "has_role" and f[3].type == "Repo"]
    users = {f[1].id for f in roles}
    repos = {f[3].id for f in roles}
    users_l, repos_l = sorted(users), sorted(repos)
    out = []
    for i in range(count):
        if i % 2 == 0:
            f = rng.choice(roles)
            user, repo = f[1].id, f[3].id
        else:
            user, repo = rng.choice(users_l), rng.choice(repos_l)
        out.append(
            {
                "actor": {"type": "User", "id": user},
                "action": "read",
                "resource": {"type": "Repo", "id": repo},
            }
        )
    return out


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def fmt_latency(samples: list[float]) -> str:
    us = [s * 1e6 for s in samples]
    return f"p50 {pct(us, 0.5):,.0f} µs  p90 {pct(us, 0.9):,.0f} µs  p99 {pct(us, 0.99):,.0f} µs"


# -- the load process --------------------------------------------------------------------------


class RawClient:
    """A lean keep-alive HTTP/1.1 client on one socket: a request's bytes built once, the
    answer read by its Content-Length. What it costs per request is a small part of httpx's, so
    the rate shows the server more than the client (both share the machine's cores)."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        host, _, port = url.removeprefix("http://").partition(":")
        self.host = f"{host}:{port}"
        self.sock = socket.create_connection((host, int(port)))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.headers = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.buffer = b""

    def post(self, path: str, body: bytes) -> bytes:
        """The answer's body; a status other than 200 stops the run."""
        self.sock.sendall(
            f"POST {path} HTTP/1.1\r\nhost: {self.host}\r\n{self.headers}"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        while b"\r\n\r\n" not in self.buffer:
            self._read()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        status = head[9:12]
        if status != b"200":
            raise SystemExit(f"the server answered {head.decode(errors='replace')!r}")
        length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
        while len(self.buffer) < length:
            self._read()
        answer, self.buffer = self.buffer[:length], self.buffer[length:]
        return answer

    def _read(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise SystemExit("the server closed the connection")
        self.buffer += data

    def close(self) -> None:
        self.sock.close()


def load_worker(
    url: str, bodies_file: str, requests: int, batch: int, pid: int, client: str = "httpx"
) -> None:
    """Runs in its own process; prints one JSON line of results, with the CPU time the server
    (process ``pid``) spent during the timed part. ``client``: httpx (the SDK's), or raw
    (`RawClient`)."""
    import httpx
    from gateway_bench import cpu_seconds

    bodies = json.loads(Path(bodies_file).read_text())[: requests * batch]
    headers = {"authorization": f"Bearer {ADMIN_KEY}"}
    if client == "raw":
        raw = RawClient(url, headers)

        def post(path: str, body: object) -> dict:
            return json.loads(raw.post(path, json.dumps(body, separators=(",", ":")).encode()))

    else:
        http = httpx.Client(base_url=url, headers=headers, timeout=60)

        def post(path: str, body: object) -> dict:
            r = http.post(path, json=body)
            r.raise_for_status()
            return r.json()

    for b in bodies[:50]:  # warm up the connection and the server
        post("/v1/authorize", b)
    samples = []
    allowed = 0
    cpu_before = cpu_seconds(pid)
    started = time.perf_counter()
    if batch == 1:
        for b in bodies:
            t = time.perf_counter()
            answer = post("/v1/authorize", b)
            samples.append(time.perf_counter() - t)
            allowed += answer["allowed"]
    else:
        for i in range(0, len(bodies), batch):
            t = time.perf_counter()
            answer = post("/v1/authorize/batch", {"checks": bodies[i : i + batch]})
            samples.append(time.perf_counter() - t)
            allowed += sum(x["allowed"] for x in answer["results"])
    elapsed = time.perf_counter() - started
    server_cpu = cpu_seconds(pid) - cpu_before
    out = {"samples": samples, "elapsed": elapsed, "decisions": len(bodies), "allowed": allowed}
    out["server_cpu"] = server_cpu
    (raw if client == "raw" else http).close()
    print(json.dumps(out))


# -- helpers -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    database: str, log: Path, tree: str | None = None
) -> tuple[subprocess.Popen, str, float]:
    """``bastion serve`` on ``database``, from the checkout ``tree`` (this one by default)."""
    import httpx

    port = free_port()
    env = {**os.environ, "BASTION_ADMIN_KEY": ADMIN_KEY, "BASTION_CONFIG": "/nonexistent"}
    tree = tree or str(ROOT)
    env["PYTHONPATH"] = tree
    cmd = [
        sys.executable,
        "-m",
        "bastion.cli",
        "serve",
        "--database",
        database,
        "--port",
        str(port),
    ]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env, cwd=tree)
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"bastion serve exited: see {log}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return proc, url, time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.1)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def postgres_schema() -> str | None:
    try:
        import psycopg

        schema = f"bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=2) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        return schema
    except Exception as e:
        print(f"  (PostgreSQL unavailable: {e}; its figures are skipped)")
        return None


def drop_schema(schema: str) -> None:
    import psycopg

    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


def pg_url(schema: str) -> str:
    return f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"


# -- sections ----------------------------------------------------------------------------------


def bench_in_process(facts: list[tuple], bodies: list[dict]) -> None:
    from bastion import Authorizer, Entity

    authz = Authorizer(POLICY, source="bench.polar")
    t = time.perf_counter()
    authz.facts.apply(facts, [])
    print(f"  in-process load: {len(facts):,} facts in {time.perf_counter() - t:.1f} s")
    args = [
        (
            Entity(b["actor"]["type"], b["actor"]["id"]),
            b["action"],
            Entity(b["resource"]["type"], b["resource"]["id"]),
        )
        for b in bodies
    ]
    for a in args[:200]:
        authz.authorize(*a)
    samples = []
    for a in args:
        t = time.perf_counter()
        authz.authorize(*a)
        samples.append(time.perf_counter() - t)
    print(f"  in-process authorize: {fmt_latency(samples)}  ({len(samples) / sum(samples):,.0f}/s)")
    del authz


def bench_http(
    url: str, bodies_file: Path, requests: int, batches: int, pid: int, clients: list[str]
) -> None:
    """Single requests and batches of 100, through each load client; the server's CPU per
    request read from /proc around the timed load (steadier than latency on a shared machine,
    but in ticks of 10 ms: a figure needs a few hundred ms of the server's CPU)."""

    for client in clients:
        for batch, count in ((1, requests), (100, batches)):
            cmd = [sys.executable, __file__, "--load-worker", url, str(bodies_file)]
            cmd += [str(count), str(batch), str(pid), client]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            result = json.loads(done.stdout)
            rate = result["decisions"] / result["elapsed"]
            cpu = result["server_cpu"] / len(result["samples"]) * 1e6
            what = "single requests" if batch == 1 else f"batches of {batch}"
            per_decision = f" ({cpu / batch:,.1f} per decision)" if batch > 1 else ""
            print(
                f"  HTTP {what} ({client}): {rate:,.0f} decisions/s; per request"
                f" {fmt_latency(result['samples'])}; server CPU {cpu:,.0f} µs per request"
                f"{per_decision}  ({result['decisions']:,} decisions, {result['allowed']:,} allowed)"
            )


def bench_writes(label: str, url: str, facts: list[tuple]) -> None:
    from bastion.facts.store import FactStore

    store = FactStore.open(url)
    singles = facts[:500]
    t = time.perf_counter()
    for f in singles:
        store.apply([f])
    single = len(singles) / (time.perf_counter() - t)
    bulk = facts[500 : 500 + 50_000]
    t = time.perf_counter()
    for i in range(0, len(bulk), 1000):
        store.apply(bulk[i : i + 1000])
    batched = len(bulk) / (time.perf_counter() - t)
    print(
        f"  {label} writes: {single:,.0f} single-fact transactions/s;"
        f" {batched:,.0f} facts/s in batches of 1000"
    )
    store.close()


def bench_catch_up(label: str, url: str, facts: list[tuple], tmp: Path) -> None:
    """A running replica follows 100 thousand facts written by someone else."""
    import httpx

    from bastion.facts.store import FactStore

    store = FactStore.open(url)
    store.put_policy(POLICY, source="bench.polar")
    proc, server, _ = start_server(url, tmp / f"catchup-{label}.log")
    try:
        writes = facts[:100_000]
        t0 = time.perf_counter()
        for i in range(0, len(writes), 1000):
            head = store.apply(writes[i : i + 1000]).seq
        written = time.perf_counter() - t0
        while httpx.get(f"{server}/readyz").json()["sequence"] < head:
            time.sleep(0.005)
        caught = time.perf_counter() - t0
        print(
            f"  {label} replica catch-up, {len(writes):,} facts in {len(writes) // 1000} writes of 1000:"
            f" written in"
            f" {written:.2f} s, replica current {caught - written:.2f} s after the last commit"
            f" ({len(writes) / caught:,.0f} facts/s end to end)"
        )
        singles = facts[100_000:102_000] or facts[:2000]
        t0 = time.perf_counter()
        for f in singles:
            head = store.apply([f]).seq
        written = time.perf_counter() - t0
        while httpx.get(f"{server}/readyz").json()["sequence"] < head:
            time.sleep(0.005)
        caught = time.perf_counter() - t0
        print(
            f"  {label} replica catch-up, {len(singles):,} single-fact writes: written in"
            f" {written:.2f} s, replica current {caught - written:.2f} s after the last commit"
        )
    finally:
        stop(proc)
        store.close()


def _copy_of(db: str, path: Path) -> str:
    """A copy of the SQLite store ``db`` at ``path`` (SQLite's online backup: the WAL too)."""
    import sqlite3

    source, copy = sqlite3.connect(db), sqlite3.connect(path)
    try:
        source.backup(copy)
    finally:
        source.close()
        copy.close()
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--facts", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=5000, help="single requests per round")
    parser.add_argument(
        "--batches", type=int, default=200, help="batches of 100 per round (20,000 decisions)"
    )
    parser.add_argument(
        "--client",
        choices=["httpx", "raw", "both"],
        default="httpx",
        help="the load client: httpx (the SDK's), raw (a lean socket client), or both in turn",
    )
    parser.add_argument("--skip-postgres", action="store_true")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of the HTTP decisions")
    parser.add_argument(
        "--http-only", action="store_true", help="stop after the HTTP decisions (no writes)"
    )
    parser.add_argument(
        "--compare",
        metavar="TREE",
        help="also serve from this checkout (e.g. a worktree of main), on a copy of the same"
        " store, its rounds interleaved with this tree's",
    )
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from bastion.facts.store import FactStore

    print(
        f"bastion server benchmark: {args.facts:,} facts, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs"
    )
    t = time.perf_counter()
    facts = gitclub_facts(args.facts)
    print(f"  generated {len(facts):,} facts in {time.perf_counter() - t:.1f} s")
    bodies = checks(facts, max(20_000, args.requests, 100 * args.batches))
    bench_in_process(facts, bodies)

    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        db = str(tmp / "bench.db")
        store = FactStore.open(db)
        store.put_policy(POLICY, source="bench.polar")
        t = time.perf_counter()
        for i in range(0, len(facts), 100_000):
            store.apply(facts[i : i + 100_000])
        elapsed = time.perf_counter() - t
        print(
            f"  SQLite bulk load: {len(facts):,} facts in {elapsed:.1f} s ({len(facts) / elapsed:,.0f} facts/s)"
        )
        store.close()
        servers = []
        try:
            for n, tree in enumerate([None] if args.compare is None else [args.compare, None]):
                # Each tree on a copy of its own: one that migrates a table (a new column of
                # decision_log, say) would make the other refuse to decide (schema_newer).
                served = _copy_of(db, tmp / f"bench-{n}.db")
                proc, url, startup = start_server(served, tmp / "serve.log", tree)
                servers.append((tree or str(ROOT), proc, url))
                print(
                    f"  server ({tree or ROOT}) start with {len(facts):,} facts (snapshot load,"
                    f" ready): {startup:.1f} s"
                )
            bodies_file = tmp / "checks.json"
            bodies_file.write_text(json.dumps(bodies))
            clients = ["httpx", "raw"] if args.client == "both" else [args.client]
            for round_ in range(args.rounds):
                # A B, then B A: neither tree always runs second (on a warmer, or busier, machine).
                for tree, proc, url in servers if round_ % 2 == 0 else servers[::-1]:
                    if len(servers) > 1:
                        print(f"  round {round_ + 1}, {tree}:")
                    bench_http(url, bodies_file, args.requests, args.batches, proc.pid, clients)
        finally:
            for _, proc, _ in servers:
                stop(proc)
        if args.http_only:
            return

        bench_writes("SQLite", str(tmp / "writes.db"), facts)
        bench_catch_up("SQLite", str(tmp / "catchup.db"), facts, tmp)
        if not args.skip_postgres:
            for section in (bench_writes, bench_catch_up):
                schema = postgres_schema()
                if schema is None:
                    break
                try:
                    if section is bench_writes:
                        bench_writes("PostgreSQL", pg_url(schema), facts)
                    else:
                        bench_catch_up("PostgreSQL", pg_url(schema), facts, tmp)
                finally:
                    drop_schema(schema)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--load-worker":
        url, file, requests, batch = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
        load_worker(url, file, requests, batch, int(sys.argv[6]), sys.argv[7])
    else:
        main()
