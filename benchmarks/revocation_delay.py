"""How long after a revocation commits in process B does process A refuse the remembered token?

    .venv/bin/python benchmarks/revocation_delay.py [rounds]     # needs PostgreSQL

A: an AuthorizationServer + VerifiedTokens (listener up), remembers one fresh token per round and
polls `remembered()` every ~0.1 ms. B: a separate process with its own Database/OAuthStore that
revokes the token's grant on request and reports time.time() just before the call and just after
it returned (since revoking calls wait for every process to confirm, after A's listener has
written that it heard). Same machine, same clock.
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import psycopg

from bastion.db import Database
from bastion.oauth import AuthorizationServer, OAuthSettings
from bastion.oauth.access_token import mint_access_token
from bastion.oauth.store import Grant
from bastion.oauth.users import create_user
from bastion.oauth.verifier import VerifiedTokens

BASE = os.environ.get("BASTION_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 200
RESOURCE = "https://mcp.example.com/mcp/x"

REVOKER = r"""
import sys, time
from bastion.db import Database
from bastion.oauth.store import OAuthStore
store = OAuthStore(Database(sys.argv[1]))
print("ready", flush=True)
for line in sys.stdin:
    grant_id = line.strip()
    before = time.time()
    store.revoke_grant(grant_id, time.time(), "measured", actor="benchmark")
    after = time.time()
    print(f"{before} {after}", flush=True)
"""

schema = f"m_{uuid.uuid4().hex[:10]}"
with psycopg.connect(BASE, autocommit=True) as c:
    c.execute(f"CREATE SCHEMA {schema}")
url = f"{BASE}?options=-csearch_path%3D{schema}"
keys = tempfile.mkdtemp()
try:
    settings = OAuthSettings.from_mapping(
        {
            "issuer": "http://127.0.0.1:9",
            "key_dir": keys,
            "resources": [{"uri": RESOURCE, "scopes": ["a"]}],
        }
    )
    server = AuthorizationServer(settings, Database(url))
    create_user(server.store, "alice", "a long password for alice", time.time(), actor="benchmark")
    tokens = VerifiedTokens(server.verifier, url)
    while not tokens.local:
        time.sleep(0.01)
    b = subprocess.Popen(
        [sys.executable, "-c", REVOKER, url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert b.stdout.readline().strip() == "ready"

    def fresh():
        now = time.time()
        grant_id = uuid.uuid4().hex
        server.store.create_grant(
            Grant(grant_id, "c", "alice", RESOURCE, "a", now, now + 3600, None)
        )
        access = mint_access_token(
            server.keys,
            issuer=settings.issuer,
            subject="alice",
            client_id="c",
            resource=RESOURCE,
            scope="a",
            now=now,
            seconds=300,
        )
        server.store.save_access_token(
            access.jti, grant_id, access.expires_at, access.token, access.kid
        )
        tokens.verify(access.token, RESOURCE)
        return access.token, grant_id

    # per-call cost of a remembered token on PostgreSQL: in memory vs a database read
    token, _ = fresh()
    n = 20000
    t = time.perf_counter()
    for _ in range(n):
        assert tokens.remembered(token, RESOURCE)
    in_memory = (time.perf_counter() - t) / n
    # as the gateway asks, on its event loop
    t = time.perf_counter()
    for _ in range(n):
        assert tokens.remembered(token, RESOURCE, on_loop=True) != "off_loop"
    on_loop = (time.perf_counter() - t) / n

    from_start, from_commit, calls = [], [], []
    for _ in range(ROUNDS):
        token, grant_id = fresh()
        time.sleep(0.02)
        b.stdin.write(grant_id + "\n")
        b.stdin.flush()
        while tokens.remembered(token, RESOURCE) is not None:
            time.sleep(0.0001)
        seen = time.time()
        before, after = map(float, b.stdout.readline().split())
        from_start.append(seen - before)
        from_commit.append(seen - after)
        calls.append(after - before)

    def show(name, xs):
        xs = sorted(x * 1000 for x in xs)
        q = statistics.quantiles(xs, n=100, method="inclusive")  # within the values seen
        print(
            f"{name}: median {statistics.median(xs):.2f} ms, p90 {q[89]:.2f}, p99 {q[98]:.2f}, max {xs[-1]:.2f} (n={len(xs)})"
        )

    print(
        f"remembered() on PostgreSQL, listener healthy: {in_memory * 1e6:.2f} us per call (in memory)"
    )
    print(f"remembered(on_loop=True), as the gateway asks: {on_loop * 1e6:.2f} us per call")
    show("refused after the revoking call started", from_start)
    show("refused after the revoking call returned in B (negative: before)", from_commit)
    show("the revoking call in B", calls)

    tokens.listener.stop()
    token, _ = fresh()
    n = 2000
    t = time.perf_counter()
    for _ in range(n):
        assert tokens.remembered(token, RESOURCE)
    print(
        f"remembered() on PostgreSQL, listener down: {(time.perf_counter() - t) / n * 1e6:.1f} us per call (one database read)"
    )
    b.stdin.close()
    b.wait()
    tokens.close()
finally:
    shutil.rmtree(keys, ignore_errors=True)
    with psycopg.connect(BASE, autocommit=True) as c:
        c.execute(f"DROP SCHEMA {schema} CASCADE")
