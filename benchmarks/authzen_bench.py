"""AuthZEN benchmark: single and batched decisions over HTTP, beside `/v1/authorize` and its
batch in the same run, on a real ``bastion serve`` holding the certification fixture's policy
(examples/authzen) and generated facts.

    .venv/bin/python benchmarks/authzen_bench.py --facts 100000 --requests 2000 --batch 100
    .venv/bin/python benchmarks/authzen_bench.py --tls      # the same over HTTPS

Prints figures; asserts nothing. The client is one keep-alive httpx connection, one request at
a time, in this process; the server is its own process on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
ADMIN_KEY = "bench-admin-key-" + "k" * 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def facts(n: int) -> list[dict]:
    """About ``n`` facts: users with roles on records, some records archived."""
    rng = random.Random(7)
    users, records = max(10, n // 10), max(10, n // 2)
    out = {}
    while len(out) < n:
        r = rng.randrange(records)
        if rng.random() < 0.1:
            fact = ("has_attribute", ("record", f"r{r}"), "status", "archived")
        else:
            fact = (
                "has_role",
                ("user", f"u{rng.randrange(users)}"),
                rng.choice(["viewer", "editor"]),
                ("record", f"r{r}"),
            )
        out[fact] = None
    return [
        {
            "predicate": f[0],
            "args": [{"type": a[0], "id": a[1]} if isinstance(a, tuple) else a for a in f[1:]],
        }
        for f in out
    ]


def questions(loaded: list[dict], count: int) -> list[tuple[str, str, str]]:
    """(user, action, record): half granted roles (mostly allowed), half random pairs."""
    rng = random.Random(11)
    roles = [f for f in loaded if f["predicate"] == "has_role"]
    out = []
    for i in range(count):
        if i % 2 == 0:
            f = rng.choice(roles)
            out.append((f["args"][0]["id"], rng.choice(["read", "write"]), f["args"][2]["id"]))
        else:
            out.append((f"u{rng.randrange(1000)}", "read", f"r{rng.randrange(1000)}"))
    return out


def certificate(directory: Path) -> tuple[Path, Path]:
    sys.path.insert(0, str(ROOT))
    from tests.authzen.conftest import self_signed

    made = self_signed(directory)
    return made.cert, made.key


def timed(send, items) -> list[float]:
    seconds = []
    for item in items:
        started = time.perf_counter()
        send(item)
        seconds.append(time.perf_counter() - started)
    return seconds


def report(name: str, seconds: list[float], per: int = 1) -> None:
    median = statistics.median(seconds) * 1e6
    p99 = sorted(seconds)[int(len(seconds) * 0.99) - 1] * 1e6
    line = f"{name:<44} median {median:9.0f} µs  p99 {p99:9.0f} µs"
    if per > 1:
        line += f"  = {median / per:6.1f} µs per decision"
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--tls", action="store_true", help="serve and ask over HTTPS")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="authzen-bench-"))
    port = free_port()
    cmd = [sys.executable, "-m", "bastion.cli", "serve", "--database", str(tmp / "b.db")]
    cmd += ["--port", str(port), "--policy-file", str(ROOT / "examples/authzen/policy.polar")]
    verify: object = True
    scheme = "http"
    if args.tls:
        cert, key = certificate(tmp)
        cmd += ["--tls-cert", str(cert), "--tls-key", str(key)]
        import ssl

        verify, scheme = ssl.create_default_context(cafile=str(cert)), "https"
    env = {**os.environ, "BASTION_ADMIN_KEY": ADMIN_KEY, "BASTION_CONFIG": "/nonexistent"}
    env["PYTHONPATH"] = str(ROOT)
    log = open(tmp / "serve.log", "wb")  # noqa: SIM115 - closed in the finally below
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"{scheme}://127.0.0.1:{port}"
    headers = {"authorization": f"Bearer {ADMIN_KEY}"}
    try:
        with httpx.Client(base_url=url, headers=headers, verify=verify, timeout=600) as http:
            for _ in range(600):
                try:
                    if http.get("/readyz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
            loaded = facts(args.facts)
            lines = "".join(json.dumps(f) + "\n" for f in loaded)
            started = time.perf_counter()
            response = http.post(
                "/v1/facts/import",
                content=lines.encode(),
                headers={"content-type": "application/x-ndjson"},
            )
            response.raise_for_status()
            print(
                f"{len(loaded)} facts imported in {time.perf_counter() - started:.1f} s;"
                f" {args.requests} requests each, batches of {args.batch}, over {scheme}",
                flush=True,
            )
            asked = questions(loaded, args.requests)
            single = [
                {
                    "subject": {"type": "user", "id": u},
                    "action": {"name": a},
                    "resource": {"type": "record", "id": r},
                }
                for u, a, r in asked
            ]
            checks = [
                {"actor": f"user:{u}", "action": a, "resource": f"record:{r}"} for u, a, r in asked
            ]
            for body in single[:200]:  # warm up: connections, compiled shapes
                http.post("/access/v1/evaluation", json=body)
            report(
                "POST /v1/authorize",
                timed(lambda b: http.post("/v1/authorize", json=b).raise_for_status(), checks),
            )
            report(
                "POST /access/v1/evaluation",
                timed(
                    lambda b: http.post("/access/v1/evaluation", json=b).raise_for_status(), single
                ),
            )
            n = args.batch
            batches = [single[i : i + n] for i in range(0, len(single) - n + 1, n)]
            report(
                f"POST /v1/authorize/batch ({n} checks)",
                timed(
                    lambda b: http.post(
                        "/v1/authorize/batch",
                        json={
                            "checks": [
                                {
                                    "actor": f"user:{e['subject']['id']}",
                                    "action": e["action"]["name"],
                                    "resource": f"record:{e['resource']['id']}",
                                }
                                for e in b
                            ]
                        },
                    ).raise_for_status(),
                    batches * 5,
                ),
                per=n,
            )
            report(
                f"POST /access/v1/evaluations ({n} evaluations)",
                timed(
                    lambda b: http.post(
                        "/access/v1/evaluations", json={"evaluations": b}
                    ).raise_for_status(),
                    batches * 5,
                ),
                per=n,
            )
            users = [{"type": "user", "id": u} for u, _, _ in asked[: args.requests // 10]]
            report(
                "POST /access/v1/search/resource (read)",
                timed(
                    lambda s: http.post(
                        "/access/v1/search/resource",
                        json={
                            "subject": s,
                            "action": {"name": "read"},
                            "resource": {"type": "record"},
                        },
                    ).raise_for_status(),
                    users,
                ),
            )
    finally:
        server.terminate()
        server.wait(10)
        log.close()


if __name__ == "__main__":
    main()
