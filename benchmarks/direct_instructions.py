"""Instructions per decision request answered in the protocol, counted by valgrind's callgrind
in process: `bastion.server.direct.DirectDecisions.answer` alone (key check, JSON in and out,
the routes' checks, the decision, its record and counts), without the HTTP protocol, the event
loop or the load client.

    .venv/bin/python benchmarks/direct_instructions.py [--requests 200] [--batch 1] [--tree DIR]

Builds the server's application on a 2,000-fact SQLite store (as server_instructions.py), starts
it, remembers the key, warms the path, then runs under ``valgrind --tool=callgrind
--instr-atstart=no``: the answers alone are counted (``callgrind_control --instr=on`` and
``off`` around them), once for N requests and once for 3 N; per request is the difference
divided by 2 N. ``--tree`` counts another checkout's bastion (e.g. a worktree of main) with the
same bodies. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def answers(tree: str, batch: int, n: int) -> None:
    """In the counted process: answer n requests, counting only them."""
    sys.path.insert(0, tree)
    sys.path.insert(1, str(ROOT / "benchmarks"))
    from server_bench import ADMIN_KEY, POLICY, checks, gitclub_facts

    from bastion.facts.store import FactStore
    from bastion.server.app import create_app
    from bastion.server.config import ServerConfig
    from bastion.server.direct import DirectDecisions

    async def run() -> None:
        tmp = Path(tempfile.mkdtemp(prefix="direct-instructions-"))
        try:
            facts = gitclub_facts(2000)
            store = FactStore.open(str(tmp / "b.db"))
            store.put_policy(POLICY, source="bench.polar")
            store.apply(facts)
            store.close()
            config = ServerConfig(
                database=str(tmp / "b.db"),
                admin_key=ADMIN_KEY,
                poll_interval=30,
                max_staleness_seconds=3600,
            )
            app = create_app(config)
            async with app.router.lifespan_context(app):
                direct = DirectDecisions(app)
                keys = app.state.keys
                bodies = checks(facts, 2000)
                if batch == 1:
                    route = direct.routes[b"/v1/authorize"]
                    raw = [json.dumps(b).encode() for b in bodies]
                else:
                    route = direct.routes[b"/v1/authorize/batch"]
                    raw = [
                        json.dumps({"checks": bodies[i : i + batch]}).encode()
                        for i in range(0, len(bodies) - batch + 1, batch)
                    ]
                # As httpx sends them.
                headers = [
                    (b"host", b"127.0.0.1:8000"),
                    (b"accept", b"*/*"),
                    (b"accept-encoding", b"gzip, deflate"),
                    (b"connection", b"keep-alive"),
                    (b"user-agent", b"python-httpx/0.28.1"),
                    (b"authorization", f"Bearer {ADMIN_KEY}".encode()),
                    (b"content-type", b"application/json"),
                ]

                def send(count: int) -> None:
                    for i in range(count):
                        if direct.answer(route, headers, raw[i % len(raw)]) is None:
                            raise SystemExit("not answered in the protocol")

                # Remembered for the whole run, not the key cache's second: under valgrind a
                # second holds a few requests, and the others would go to the application.
                keys._cache_seconds = 3600
                keys.verify(ADMIN_KEY)
                send(50)
                control("on")
                send(n)
                control("off")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    asyncio.run(run())


def control(state: str) -> None:
    if os.environ.get("DIRECT_INSTRUCTIONS_COUNTED"):
        subprocess.run(
            ["callgrind_control", f"--instr={state}", str(os.getpid())],
            check=True,
            capture_output=True,
        )


def counted(tree: str, batch: int, n: int, tmp: Path) -> int:
    out = tmp / f"callgrind.{n}"
    # Switching the instrumentation off writes the counts so far as a part of their own.
    env = {**os.environ, "PYTHONMALLOC": "malloc", "PYTHONHASHSEED": "0"}
    env |= {"DIRECT_INSTRUCTIONS_COUNTED": "1", "PYTHONPATH": tree}
    cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}.%p"]
    cmd += [sys.executable, __file__, "--answers", tree, str(batch), str(n)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tree, env=env)
    if done.returncode != 0:
        raise SystemExit(f"the counted process failed:\n{done.stderr[-3000:]}")
    total = 0
    for part in tmp.glob(f"{out.name}.*"):
        for line in part.read_text().splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
    if not total:
        raise SystemExit("callgrind counted nothing")
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--batch", type=int, default=1, help="checks per request (1: single)")
    parser.add_argument("--tree", default=str(ROOT), help="the checkout whose bastion answers")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="direct-instructions-"))
    try:
        one = counted(args.tree, args.batch, args.requests, tmp)
        three = counted(args.tree, args.batch, 3 * args.requests, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    per = (three - one) / (2 * args.requests)
    what = "single /v1/authorize" if args.batch == 1 else f"/v1/authorize/batch of {args.batch}"
    line = f"{what} ({args.tree}): {per:,.0f} instructions per request answered in the protocol"
    if args.batch > 1:
        line += f" ({per / args.batch:,.0f} per decision)"
    print(json.dumps({"n": args.requests, "counted": [one, three]}))
    print(line)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--answers":
        answers(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
