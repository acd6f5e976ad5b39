"""Instructions per HTTP decision, counted by valgrind's callgrind in a real ``bastion serve``: a
figure that does not move with the machine's load, for comparing two trees on a shared machine.

    .venv/bin/python benchmarks/server_instructions.py [--requests 150] [--batch 1] [--tree DIR]

Starts this tree's ``bastion serve`` under ``valgrind --tool=callgrind`` on a 2,000-fact SQLite
store (the change-log poll slowed to 30 s, so that it adds nothing), warms it, then zeroes the
counters (``callgrind_control -z``), sends N requests on one httpx connection and dumps them
(``callgrind_control -d``); the same with 2 N. Per request: the difference divided by N
(user-space instructions of the whole server process; system calls are not counted), and how
many of the requests were answered in the protocol (the others went through the application).
``--tree`` serves another checkout's bastion with the same client. Starting Python under
valgrind takes minutes. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gateway_bench import wait_until_ok  # noqa: E402
from server_bench import ADMIN_KEY, POLICY, checks, free_port, gitclub_facts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def direct_answers(http: httpx.Client) -> int:
    """Requests the server answered in the protocol so far (`bastion.server.direct`); the others
    went through the application (a key not verified within the key cache's second: under
    valgrind a second holds a few dozen requests)."""
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("bastion_direct_answers_total "):
            return int(float(line.split()[1]))
    return 0


def counted(pid: int, out: Path, send) -> int:
    """Instructions the server ran while ``send()`` ran."""
    subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)
    before = set(out.parent.glob(out.name + "*"))
    send()
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    for _ in range(100):
        new = set(out.parent.glob(out.name + "*")) - before
        if new:
            dump = max(new, key=os.path.getmtime)
            for line in dump.read_text().splitlines():
                if line.startswith(("summary:", "totals:")):
                    return int(line.split()[1])
        time.sleep(0.1)
    raise SystemExit("callgrind wrote no dump")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=150)
    parser.add_argument("--batch", type=int, default=1, help="checks per request (1: single)")
    parser.add_argument(
        "--tree",
        default=str(ROOT),
        help="the checkout whose bastion serves (default: this one), e.g. a worktree of main",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the store, the log and callgrind's dumps"
    )
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from bastion.facts.store import FactStore

    tmp = Path(tempfile.mkdtemp(prefix="server-instructions-"))
    facts = gitclub_facts(2000)
    bodies = checks(facts, (3 * args.requests + 20) * args.batch)
    store = FactStore.open(str(tmp / "b.db"))
    store.put_policy(POLICY, source="bench.polar")
    store.apply(facts)
    store.close()
    port = free_port()
    out = tmp / "callgrind.out"
    env = {**os.environ, "BASTION_ADMIN_KEY": ADMIN_KEY, "BASTION_CONFIG": "/nonexistent"}
    env |= {"BASTION_POLL_INTERVAL": "30", "BASTION_MAX_STALENESS_SECONDS": "3600"}
    env |= {"PYTHONPATH": args.tree, "PYTHONMALLOC": "malloc"}
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p", sys.executable]
    cmd += ["-m", "bastion.cli", "serve", "--database", str(tmp / "b.db"), "--port", str(port)]
    log = open(tmp / "serve.log", "wb")  # noqa: SIM115 - closed in the finally below
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=args.tree)
    url = f"http://127.0.0.1:{port}"
    headers = {"authorization": f"Bearer {ADMIN_KEY}"}
    try:
        wait_until_ok(f"{url}/readyz", server, 1800, tmp / "serve.log")
        with httpx.Client(base_url=url, headers=headers, timeout=600) as http:
            queue = iter(range(len(bodies)))

            def send(n: int) -> None:
                for _ in range(n):
                    if args.batch == 1:
                        r = http.post("/v1/authorize", json=bodies[next(queue)])
                    else:
                        chunk = [bodies[next(queue)] for _ in range(args.batch)]
                        r = http.post("/v1/authorize/batch", json={"checks": chunk})
                    r.raise_for_status()

            send(20)  # the key remembered, the connection open, the code warm
            before = direct_answers(http)
            one = counted(server.pid, out, lambda: send(args.requests))
            between = direct_answers(http)
            two = counted(server.pid, out, lambda: send(2 * args.requests))
            direct = [between - before, direct_answers(http) - between]
        what = "single /v1/authorize" if args.batch == 1 else f"/v1/authorize/batch of {args.batch}"
        what += f" ({args.tree})"
        per = (two - one) / args.requests
        line = f"{what}: {per:,.0f} instructions per request"
        if args.batch > 1:
            line += f" ({per / args.batch:,.0f} per decision)"
        print(json.dumps({"n": args.requests, "counted": [one, two], "direct": direct}))
        print(line)
    finally:
        server.terminate()
        server.wait(60)
        log.close()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
