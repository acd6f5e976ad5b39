"""What a DPoP proof costs the gateway per call, in process: `DPoPProofs.check` (parse, import
the proof's key, verify its signature, the claims) and `DPoPProofs.use` (that, plus the jti's
single-use write), for ES256 and PS256 proofs, on SQLite and on PostgreSQL when one is given.

    .venv/bin/python benchmarks/dpop_bench.py [N] [postgresql://...]

The gateway runs `use` once per call of a DPoP-bound token, in a worker thread; Bearer calls
pay nothing of it. Prints the median of N calls each; never asserts a time.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from joserfc import jwt  # noqa: E402
from joserfc.jwk import ECKey, RSAKey  # noqa: E402

from bastion.db import Database  # noqa: E402
from bastion.oauth.dpop import DPoPProofs, access_token_hash  # noqa: E402
from bastion.oauth.settings import DPoPSettings  # noqa: E402

URL = "https://bastion.example/mcp/desk"
TOKEN = "header.payload.signature-of-an-access-token"


def proofs(key, alg: str, n: int) -> list[str]:
    header = {"typ": "dpop+jwt", "alg": alg, "jwk": key.as_dict(private=False)}
    return [
        jwt.encode(
            header,
            {
                "jti": uuid.uuid4().hex,
                "htm": "POST",
                "htu": URL,
                "iat": int(time.time()),
                "ath": access_token_hash(TOKEN),
            },
            key,
            algorithms=[alg],
        )
        for _ in range(n)
    ]


def median_us(work, items) -> float:
    times = []
    for item in items:
        start = time.perf_counter()
        work(item)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    databases = {"sqlite": f"{tempfile.mkdtemp()}/dpop.db"}
    if len(sys.argv) > 2:
        databases["postgresql"] = sys.argv[2]
    keys = {"ES256": ECKey.generate_key("P-256"), "PS256": RSAKey.generate_key(2048)}
    for name, url in databases.items():
        checker = DPoPProofs(DPoPSettings(), Database(url), leeway_seconds=30)
        for alg, key in keys.items():
            check = median_us(
                lambda p, c=checker: c.check(p, "POST", URL, TOKEN), proofs(key, alg, n)
            )
            use = median_us(lambda p, c=checker: c.use(p, "POST", URL, TOKEN), proofs(key, alg, n))
            print(f"{name:10} {alg}: check {check:7.0f} µs   check + jti write {use:7.0f} µs")


if __name__ == "__main__":
    main()
