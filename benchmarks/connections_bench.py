"""What a per-user upstream credential costs the gateway per call, in process:
`Connections.access_token` for a connected user whose token is fresh (the connection's row read
in a worker thread, then opened: Fernet's HMAC check and AES decryption), on SQLite and on
PostgreSQL when one is given; the same with ``cache_seconds = 60`` (the opened token reused);
and `Sealer.open` alone.

    .venv/bin/python benchmarks/connections_bench.py [N] [postgresql://...]

Calls to upstreams without ``auth = "per_user"`` pay nothing of it. Prints the median of N calls
each; never asserts a time.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import anyio  # noqa: E402
from cryptography.fernet import Fernet  # noqa: E402

from bastion.connections.sealing import Sealer  # noqa: E402
from bastion.connections.service import Connections  # noqa: E402
from bastion.connections.settings import UpstreamOAuth  # noqa: E402
from bastion.connections.store import ConnectionStore, StoredConnection  # noqa: E402
from bastion.db import Database  # noqa: E402


def median_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


def run(url: str, label: str, n: int) -> None:
    db = Database(url)
    sealer = Sealer([Fernet.generate_key()])
    service = Connections(
        ConnectionStore(db),
        sealer,
        {"tracker": ("https://tracker.example/mcp", UpstreamOAuth())},
        "https://bastion.example",
    )
    cached = Connections(
        service.store,
        sealer,
        {"tracker": ("https://tracker.example/mcp", UpstreamOAuth(cache_seconds=60))},
        "https://bastion.example",
    )
    tokens = {"access_token": "a" * 800, "refresh_token": "r" * 64}  # a JWT-sized token
    for i in range(1000):
        sealed = sealer.seal(f"user{i}", "tracker", tokens)
        row = StoredConnection(f"user{i}", "tracker", sealed, "s", time.time() + 3600, 0.0, 0.0)
        service.store.put(row)
    sealed = service.store.get("user1", "tracker").sealed

    opened = []
    for _ in range(n):
        start = time.perf_counter()
        sealer.open("user1", "tracker", sealed)
        opened.append(time.perf_counter() - start)

    async def calls(connections: Connections) -> list[float]:
        samples = []
        for i in range(n):
            start = time.perf_counter()
            await connections.access_token(f"user{i % 1000}", "tracker")
            samples.append(time.perf_counter() - start)
        return samples

    whole = anyio.run(calls, service)
    anyio.run(calls, cached)  # each user's token read once
    reused = anyio.run(calls, cached)
    print(
        f"{label:<11} Sealer.open {median_us(opened):7.1f} µs   access_token"
        f" {median_us(whole):7.1f} µs   with cache_seconds=60 {median_us(reused):5.1f} µs"
    )
    db.close()


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    with tempfile.TemporaryDirectory() as tmp:
        run(str(Path(tmp) / "bench.db"), "SQLite", n)
    if len(sys.argv) > 2:
        import psycopg

        schema = f"bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(sys.argv[2], autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        try:
            run(f"{sys.argv[2]}?options=-csearch_path%3D{schema}", "PostgreSQL", n)
        finally:
            with psycopg.connect(sys.argv[2], autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA {schema} CASCADE")


if __name__ == "__main__":
    main()
