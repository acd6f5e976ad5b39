"""What the HTTP layers cost a gateway call, apart from the gateway: the same ``POST /mcp/desk``
through `bastion serve`'s protocol, taken from the protocol (`bastion.server.direct_gateway`)
or through the ASGI application (uvicorn's cycle, Starlette, the body limits, `GatewayFirst`).

    .venv/bin/python benchmarks/gateway_protocol_bench.py [--requests 5000] [--rounds 5]
    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p .venv/bin/python \
        benchmarks/gateway_protocol_bench.py --instructions /tmp/cg --requests 1000

The gateway's transport is replaced by one that reads the body and answers a fixed JSON-RPC
result as the transport writes one (`send_json`), so that only the way to it differs. Requests
are fed to the protocol on one kept-alive connection (a transport in memory), on uvloop as
`bastion serve` runs; each round times both paths in turn (CPU time of this process, which
excludes what other processes take of the machine). Prints the per-request figures of each
round and their medians; asserts only that each path was the one taken. With
``--instructions``, under callgrind: the instructions per request of each path (N requests, then
2 N, counters zeroed and dumped around each; the difference divided by N), a figure that does
not move with the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gateway_bench import prepare  # noqa: E402
from server_instructions import counted  # noqa: E402

RESULT = {"content": [{"type": "text", "text": '{"customers": []}'}], "isError": False}
BODY = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "search_customers", "arguments": {"query": "alan"}},
    }
).encode()
REQUEST = (
    b"POST /mcp/desk HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer x\r\n"
    b"content-type: application/json\r\naccept: application/json, text/event-stream\r\n"
    b"mcp-protocol-version: 2026-07-28\r\nmcp-method: tools/call\r\n"
    b"mcp-name: search_customers\r\ncontent-length: %d\r\n\r\n%s" % (len(BODY), BODY)
)


class MemoryTransport(asyncio.Transport):
    """A connection in memory: counts what is written, and says when an answer is whole."""

    def __init__(self) -> None:
        super().__init__()
        self.answered: asyncio.Future | None = None
        self.seen = 0

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(
            name, default
        )

    def write(self, data) -> None:
        self.seen += 1
        if data.endswith(b"}") and self.answered is not None and not self.answered.done():
            self.answered.set_result(None)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        raise AssertionError("the connection was closed")

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--instructions", help="callgrind's --callgrind-out-file, without .%%p")
    args = parser.parse_args()
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    import uvicorn
    from uvicorn.server import ServerState

    from bastion.gateway.transport import StreamableHttpEndpoint, send_json
    from bastion.server.app import create_app
    from bastion.server.config import ServerConfig
    from bastion.server.connections import BoundedHttpProtocol
    from bastion.server.direct_gateway import DirectGateway

    async def answer(self, server, scope, receive, send) -> None:
        await receive()
        await send_json(send, 200, {"jsonrpc": "2.0", "id": 1, "result": RESULT})

    StreamableHttpEndpoint.serve = answer  # type: ignore[method-assign]
    bench = prepare(Path(tempfile.mkdtemp(prefix="gateway-protocol-")))
    config = ServerConfig.load(str(bench.config))
    app = create_app(config)

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    uv = uvicorn.Config(
        app, access_log=False, log_level="warning", proxy_headers=False, timeout_keep_alive=3600
    )
    uv.load()
    # uvicorn's access log writes a line when its logger has a handler: none here, as with
    # `bastion serve` and access_log off.
    logging.getLogger("uvicorn.access").handlers = []
    logging.getLogger("uvicorn.access").propagate = False
    paths = {"protocol": DirectGateway(app), "application": None}
    connections = {}
    for name, gateway in paths.items():
        protocol = BoundedHttpProtocol(
            config=uv,
            server_state=ServerState(),
            app_state={},
            _loop=loop,
            header_timeout=30,
            max_header_bytes=65536,
            linger_timeout=config.linger_timeout,
            max_linger_bytes=config.max_linger_bytes,
            gateway=gateway,
        )
        transport = MemoryTransport()
        protocol.connection_made(transport)
        connections[name] = (protocol, transport)

    async def requests(name: str, n: int) -> None:
        protocol, transport = connections[name]
        for _ in range(n):
            transport.answered = loop.create_future()
            protocol.data_received(REQUEST)
            await transport.answered

    def load(name: str, n: int) -> float:
        """CPU µs per request of ``n`` requests by the path ``name``."""
        start = time.process_time()
        loop.run_until_complete(requests(name, n))
        return (time.process_time() - start) / n * 1e6

    for name in paths:
        load(name, 200)  # warm
    if args.instructions:
        out = Path(f"{args.instructions}.{os.getpid()}")
        for name in paths:
            n = args.requests
            one = counted(os.getpid(), out, lambda: load(name, n))  # noqa: B023
            two = counted(os.getpid(), out, lambda: load(name, 2 * n))  # noqa: B023
            print(f"{name}: {(two - one) / n:,.0f} instructions per request")
        return
    before = app.state.metrics._decisions.direct_gateway
    figures: dict[str, list[float]] = {name: [] for name in paths}
    for round_ in range(args.rounds):
        for name in paths if round_ % 2 == 0 else reversed(list(paths)):
            figures[name].append(load(name, args.requests))
        print(
            f"round {round_ + 1}: "
            + ", ".join(f"{n} {figures[n][-1]:.1f} µs" for n in paths)
            + " of CPU per request"
        )
    taken = app.state.metrics._decisions.direct_gateway - before
    assert taken == args.rounds * args.requests, taken
    for name in paths:
        print(f"{name}: median {statistics.median(figures[name]):.1f} µs of CPU per request")


if __name__ == "__main__":
    main()
