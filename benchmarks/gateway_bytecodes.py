"""Python bytecodes bastion runs per proxied ``tools/call``, by function: where the gateway's
own call path spends its Python, in a minute instead of callgrind's several.

    .venv/bin/python benchmarks/gateway_bytecodes.py [--requests 200] [--top 40] [--json out.json]

The setup is gateway_bench.py's (the quickstart's policy and MCP server, sam's support agent
searching customers, emails masked, MCP 2026-07-28). ``bastion serve`` runs with a tracer that
is off until the warm-up is done (SIGUSR1 turns it on, SIGUSR2 off and writes the counts); while
on, it counts every bytecode (``f_trace_opcodes``) of every thread, per function: its own
(self) and with what it calls (inclusive, per resumption for a coroutine). Prints the total per
call (the event loop's thread and the others apart) and the functions with the most inclusive
bytecodes. C work (JSON, SQLite, the HTTP parsers, uvloop) is not counted: use
gateway_instructions.py for the whole cost. Tracing slows the server tenfold; the counts do not
depend on the machine's load, but a periodic task that happens to run during the calls adds a
little (runs of one tree differ by up to 2 %). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gateway_bench import between_signals  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# Runs in the server process before `bastion serve` (`between_signals`): the tracer and its
# handlers. Counts go to sys.argv[1].
TRACED_SERVE = """
import json, signal, sys, threading
from collections import defaultdict

out, config = sys.argv[1], sys.argv[2]
own, inclusive, calls = defaultdict(int), defaultdict(int), defaultdict(int)
total = {"loop": 0, "threads": 0}
on = [False]
loop_thread = threading.get_ident()
stacks = defaultdict(list)
ran = defaultdict(int)  # bytecodes per thread: a function's inclusive count is its own thread's


def tracer(frame, event, arg):
    if not on[0] or event != "call":
        return None
    frame.f_trace_opcodes = True
    thread = threading.get_ident()
    stacks[thread].append((frame.f_code, ran[thread]))
    calls[frame.f_code] += 1
    return step


def step(frame, event, arg):
    thread = threading.get_ident()
    if event == "opcode":
        total["loop" if thread == loop_thread else "threads"] += 1
        ran[thread] += 1
        own[frame.f_code] += 1
    elif event == "return":
        stack = stacks[thread]
        while stack:
            code, start = stack.pop()
            if code is frame.f_code:
                inclusive[code] += ran[thread] - start
                break
    return step


def start(*_):
    for table in (own, inclusive, calls, stacks, ran):
        table.clear()
    total.update(loop=0, threads=0)
    on[0] = True
    sys.settrace(tracer)


def stop(*_):
    on[0] = False
    sys.settrace(None)
    name = lambda c: f"{c.co_filename}:{c.co_firstlineno}({c.co_name})"  # noqa: E731
    found = {name(c): [calls[c], own[c], inclusive[c]] for c in set(own) | set(calls)}
    json.dump({"total": total, "functions": found}, open(out, "w"))


threading.settrace(tracer)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--json", help="also write the counts per function here")
    args = parser.parse_args()
    counts = between_signals(TRACED_SERVE, args.requests, "gateway-bytecodes")
    found = json.loads(counts.read_text())
    n = args.requests
    total = found["total"]
    print(
        f"tools/call through the gateway: {(total['loop'] + total['threads']) / n:,.0f} bytecodes"
        f" per call ({total['loop'] / n:,.0f} on the event loop's thread,"
        f" {total['threads'] / n:,.0f} in others)"
    )
    print(f"{'calls':>6} {'self':>8} {'inclusive':>10}  function (per tools/call)")
    rows = sorted(found["functions"].items(), key=lambda item: -item[1][2])
    for name, (calls, own, inclusive) in rows[: args.top]:
        shown = name.replace(str(ROOT) + "/", "")
        print(f"{calls / n:6.1f} {own / n:8.1f} {inclusive / n:10.1f}  {shown}")
    if args.json:
        Path(args.json).write_text(json.dumps(found))


if __name__ == "__main__":
    main()
