"""Session labels' cost per call, in process: what the enforcement step adds to a ``tools/call``
when the policy reads ``context.session.labels`` (the view in the context, the read, recording a
released result's labels), against the same step for a policy that does not read them.

    .venv/bin/python benchmarks/labels_bench.py [--calls 20000] [--agents 1000]
        [--redis-url redis://127.0.0.1:6379/0]

Recording is timed for a person's agent, a chain of two agents (a sub-agent), and a chain in a
task, in this process and, with ``--redis-url``, in Redis (one round trip each, mostly waiting).

Complements gateway_bench.py (end to end, noisy on a shared machine) with the labels alone.
"""

from __future__ import annotations

import argparse
import time
import uuid

import anyio

from bastion import Authorizer, Entity
from bastion.delegation.labels import LocalLabels, RedisLabels
from bastion.gateway.enforce import Caller, Enforcer

BASE = """
actor User {}
actor Agent {}
resource Tool {}
declare label(Tool, String);
allow(_actor, "call", _tool: Tool);
deny(_actor, "call", Tool{"d/send_email"}) if context.arguments.to = "blocked@example.com";
"""
READS = """
deny(_actor, "call", Tool{"d/send_email"}) if
  "pii" in context.session.labels and
  lower(context.arguments.to, to) and not ends_with(to, "@acme.example");
"""


def enforcer(policy: str, labels: LocalLabels | RedisLabels | None = None) -> Enforcer:
    authz = Authorizer(policy)
    authz.facts.insert(("label", Entity("Tool", "d/search"), "pii"))
    return Enforcer(lambda: authz, None, labels=labels)


RECORDED = {
    "a person's agent": Caller("sam", "agent-0", frozenset(), "127.0.0.1", "2026-07-28"),
    "a chain of two agents": Caller(
        "sam", "sub-0", frozenset(), "127.0.0.1", "2026-07-28", agents=("agent-0", "sub-0")
    ),
    "a chain of two agents, in a task": Caller(
        "sam", "sub-0", frozenset(), "127.0.0.1", "2026-07-28", agents=("agent-0", "sub-0"),
        task="t-0",
    ),
}  # fmt: skip


async def recording(e: Enforcer, verdict, calls: int) -> None:
    """Print the time to record a released result's label, for each caller of `RECORDED`."""
    for name, caller in RECORDED.items():
        await e.record_labels(caller, verdict)  # made once: what follows adds nothing new
        rounds = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(calls):
                await e.record_labels(caller, verdict)
            rounds.append((time.perf_counter() - started) / calls * 1e6)
        print(f"{'  recording, ' + name:45s} {min(rounds):8.2f} us (best of 5 rounds)")


async def run(e: Enforcer, callers: list[Caller], calls: int) -> float:
    """Microseconds per call: context, decision, and releasing the result (labels recorded)."""
    tools = [
        (Entity("Tool", "d/search"), {}),
        (Entity("Tool", "d/send_email"), {"to": "a@acme.example"}),
    ]
    started = time.perf_counter()
    for n in range(calls):
        caller = callers[n % len(callers)]
        tool, arguments = tools[n % 2]
        context = e.context(caller, "d", "tools/call", tool=tool.id, arguments=arguments)
        verdict = await e.decide(caller, "d", "tools/call", "call", tool, context, arguments)
        await e.record_labels(caller, verdict)
    return (time.perf_counter() - started) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--redis-url", default="", help="also time recording in this Redis")
    args = parser.parse_args()
    callers = [
        Caller("sam", f"agent-{n}", frozenset(), "127.0.0.1", "2026-07-28")
        for n in range(args.agents)
    ]

    async def main_() -> None:
        plain, reading = enforcer(BASE), enforcer(BASE + READS)
        for e in (plain, reading):  # warm up: compiled shapes, label sets made
            await run(e, callers, 2 * args.agents)
        rounds = [
            (await run(plain, callers, args.calls), await run(reading, callers, args.calls))
            for _ in range(5)
        ]
        base = min(r[0] for r in rounds)
        with_labels = min(r[1] for r in rounds)
        print(f"enforcement step, policy not reading labels: {base:8.1f} us/call")
        print(f"enforcement step, policy reading labels:     {with_labels:8.1f} us/call")
        print(f"difference (noisy: whole decisions):         {with_labels - base:8.1f} us/call")
        # The parts labels add, each timed alone (the figure to compare with the 50 us budget).
        caller, n = callers[0], args.calls
        verdict = await reading.decide(
            caller,
            "d",
            "tools/call",
            "call",
            Entity("Tool", "d/search"),
            reading.context(caller, "d", "tools/call"),
            {},
        )
        parts = {
            "context with the session view": lambda: reading.context(caller, "d", "tools/call"),
            "context without it (policy not reading)": lambda: plain.context(
                caller, "d", "tools/call"
            ),
            "reading context.session.labels": lambda: reading.context(caller, "d", "tools/call")[
                "session"
            ].get("labels"),
        }
        for name, fn in parts.items():
            started = time.perf_counter()
            for _ in range(n):
                fn()
            print(f"{name:45s} {(time.perf_counter() - started) / n * 1e6:8.2f} us")
        print("recording a released result with a label, in this process:")
        await recording(reading, verdict, n)
        if args.redis_url:
            prefix = f"bastion-bench-{uuid.uuid4().hex[:12]}"
            store = RedisLabels(args.redis_url, prefix)
            try:
                print("recording a released result with a label, in Redis:")
                await recording(enforcer(BASE + READS, store), verdict, max(n // 10, 1))
            finally:
                keys = [k async for k in store._redis.scan_iter(f"{prefix}:*")]
                if keys:
                    await store._redis.delete(*keys)
                await store.close()

    anyio.run(main_)


if __name__ == "__main__":
    main()
