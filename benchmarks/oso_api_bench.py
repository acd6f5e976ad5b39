"""Oso Cloud's API (/api) through the official ``oso-cloud`` SDK against a real ``bastion serve``:
single and batched decisions, beside the same questions through /v1 with httpx.

    .venv/bin/python benchmarks/oso_api_bench.py --facts 100000 --requests 2000

Prints figures; asserts nothing. One client, one request at a time, on 127.0.0.1, SQLite. The
SDK (``requests``, JSON through dataclasses) adds its own client cost to each request; the /v1
lines show the server's side of the same questions with a leaner client. "Batched" through the
SDK is one ``build_query(("allow", user, "read", repo)).in_(repo, ids).evaluate(repo)``: one
request answers a decision for each id (the SDK has no bulk authorize).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from server_bench import (  # noqa: E402
    ADMIN_KEY,
    POLICY,
    fmt_latency,
    gitclub_facts,
    start_server,
    stop,
)


def load(url: str, facts: list[tuple]) -> None:
    import httpx

    from bastion.facts.model import fact_to_json

    headers = {"authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(base_url=url, headers=headers, timeout=600) as http:
        http.put("/v1/policy", json={"text": POLICY}).raise_for_status()
        lines = "\n".join(json.dumps(fact_to_json(f)) for f in facts)
        http.post(
            "/v1/facts/import", content=lines, headers={"content-type": "application/x-ndjson"}
        ).raise_for_status()


def key(url: str) -> str:
    import httpx

    headers = {"authorization": f"Bearer {ADMIN_KEY}"}
    r = httpx.post(
        f"{url}/v1/keys", json={"name": "bench", "scopes": ["oso:read"]}, headers=headers
    )
    r.raise_for_status()
    return r.json()["key"]


def timed(label: str, calls: list, per: int = 1) -> None:
    for call in calls[:50]:  # warm up the connection and the server
        call()
    samples = []
    started = time.perf_counter()
    for call in calls:
        t = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - started
    rate = len(calls) * per / elapsed
    print(f"  {label:<46} {fmt_latency(samples)}  {rate:>9,.0f} decisions/s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--facts", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args()

    import httpx
    from oso_cloud import Oso, Value, typed_var

    facts = gitclub_facts(args.facts)
    rng = random.Random(3)
    roles = [f for f in facts if f[0] == "has_role" and f[3].type == "Repo"]
    repos = sorted({f[1].id for f in facts if f[0] == "has_relation"})
    pairs = [(f[1].id, f[3].id) for f in rng.sample(roles, min(len(roles), args.requests // 2))]
    pairs += [(f"u{rng.randrange(1000)}", rng.choice(repos)) for _ in range(len(pairs))]
    rng.shuffle(pairs)

    with tempfile.TemporaryDirectory() as tmp:
        proc, url, _ = start_server(str(Path(tmp) / "bench.db"), Path(tmp) / "serve.log")
        try:
            load(url, facts)
            oso = Oso(url=url, api_key=key(url))
            print(f"{len(facts):,} facts, {len(pairs):,} checks, one client, one at a time")
            print("through the oso-cloud SDK (/api):")
            timed(
                "authorize, single",
                [
                    lambda u=u, r=r: oso.authorize(Value("User", u), "read", Value("Repo", r))
                    for u, r in pairs
                ],
            )
            repo = typed_var("Repo")
            batches = [
                (pairs[i][0], [r for _, r in pairs[i : i + args.batch]])
                for i in range(0, len(pairs), args.batch)
            ]
            timed(
                f"authorize, batched ({args.batch} per query)",
                [
                    lambda u=u, ids=ids: (
                        oso.build_query(("allow", Value("User", u), "read", repo))
                        .in_(repo, ids)
                        .evaluate(repo)
                    )
                    for u, ids in batches
                ],
                per=args.batch,
            )
            timed(
                "actions (one resource)",
                [
                    lambda u=u, r=r: oso.actions(Value("User", u), Value("Repo", r))
                    for u, r in pairs
                ],
            )
            timed(
                "list (a user's readable repos)",
                [lambda u=u: oso.list(Value("User", u), "read", "Repo") for u, _ in pairs[:200]],
            )
            print("the same through /v1 (httpx, for comparison):")
            headers = {"authorization": f"Bearer {ADMIN_KEY}"}
            with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
                bodies = [
                    {"actor": f"User:{u}", "action": "read", "resource": f"Repo:{r}"}
                    for u, r in pairs
                ]
                timed(
                    "/v1/authorize, single",
                    [lambda b=b: http.post("/v1/authorize", json=b) for b in bodies],
                )
                timed(
                    f"/v1/authorize/batch ({args.batch} per request)",
                    [
                        lambda i=i: http.post(
                            "/v1/authorize/batch", json={"checks": bodies[i : i + args.batch]}
                        )
                        for i in range(0, len(bodies), args.batch)
                    ],
                    per=args.batch,
                )
        finally:
            stop(proc)


if __name__ == "__main__":
    main()
