"""Behaviour counters' cost per call, in process: what the gateway adds to each ``tools/call``
(the view in its context, counting the decision, counting the answer's bytes: the transport gives
their number as it encodes the answer), and what a policy
that reads one scope's figures adds on top.

    .venv/bin/python benchmarks/behavior_bench.py [--calls 200000] [--agents 1000]

Complements gateway_bench.py (end to end, noisy on a shared machine) with the counters alone.
"""

from __future__ import annotations

import argparse
import time

from bastion.signals.behavior import LocalBehavior, scope_keys

ANSWER_BYTES = 260  # a 200-character text result in its JSON-RPC answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--agents", type=int, default=1000)
    args = parser.parse_args()
    counters = LocalBehavior()
    record = {"result": "allow", "target": 'Tool{"desk/search"}', "arguments_digest": "d"}
    context = {"annotations": {"destructiveHint": True}}
    agents = [f"agent-{n}" for n in range(args.agents)]

    def one(n: int, read: bool) -> None:
        agent = agents[n % len(agents)]
        view = counters.view("sam", agent, 'Tool{"desk/search"}')
        if read:
            view.get("agent").get("destructive").get("minute")
        counters.observe_decision(record, {**context, "behavior": view})
        counters.returned(scope_keys("sam", agent, 'Tool{"desk/search"}'), ANSWER_BYTES)

    for read in (False, True):
        for n in range(10_000):
            one(n, read)
        started = time.perf_counter()
        for n in range(args.calls):
            one(n, read)
        per_call = (time.perf_counter() - started) / args.calls * 1e6
        what = "counting, and the policy reads one scope" if read else "counting only"
        print(f"{what:45s} {per_call:6.1f} us per call ({args.calls} calls, {args.agents} agents)")


if __name__ == "__main__":
    main()
