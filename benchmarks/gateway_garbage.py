"""What a proxied ``tools/call`` leaves to Python's cyclic garbage collector: objects that only a
collection frees (a reference cycle), by type, per call.

    .venv/bin/python benchmarks/gateway_garbage.py [--requests 200] [--top 30]

The setup is gateway_bench.py's (the quickstart's policy and MCP server, sam's support agent
searching customers, emails masked, MCP 2026-07-28). ``bastion serve`` runs with two signal
handlers: SIGUSR1 collects, turns the collector off and has it keep what it finds
(``gc.DEBUG_SAVEALL``); SIGUSR2 collects once and writes what it found, by type. Between them
the load runs, one client. A call whose objects form a cycle costs the collections that free
them (the generation-0 collections they trigger and the walks of what they hold): 2026-12-07,
a request's flight and its exchange held each other, 45 objects a call, +3.4 % of the gateway's
instructions a call. Near zero a call is the aim; what remains (a connection's objects) is
counted per connection, not per call. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gateway_bench import between_signals  # noqa: E402

# Runs in the server process before `bastion serve` (`between_signals`): its handlers.
# Counts go to sys.argv[1].
COUNTED_SERVE = """
import gc, json, signal, sys
from collections import Counter

out, config = sys.argv[1], sys.argv[2]


def start(*_):
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)


def stop(*_):
    found = gc.collect()
    kinds = Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage)
    json.dump({"found": found, "types": kinds.most_common()}, open(out, "w"))
    gc.garbage.clear()
    gc.set_debug(0)
    gc.enable()
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    counts = between_signals(COUNTED_SERVE, args.requests, "gateway-garbage")
    found = json.loads(counts.read_text())
    n = args.requests
    print(
        f"tools/call through the gateway: {found['found'] / n:,.2f} objects a call left to the"
        f" cyclic garbage collector ({found['found']:,} over {n:,} calls)"
    )
    for kind, count in found["types"][: args.top]:
        print(f"{count / n:8.2f}  {kind}")


if __name__ == "__main__":
    main()
