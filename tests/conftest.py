"""Shared test fixtures: real services (PostgreSQL, Redis) when reachable.

Tests that need a service skip with a clear reason when it is not reachable, unless
BASTION_REQUIRE_SERVICES=1 (set by .ci/run), in which case they fail instead.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import pytest
from argon2 import PasswordHasher

from bastion.oauth import users
from tests.postgres_outage import Outage

POSTGRES_URL = os.environ.get("BASTION_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("BASTION_TEST_REDIS", "redis://127.0.0.1:6379/0")


# The files that take longest (seconds of pytest's durations, setup, call and teardown, with
# `-n 3 --dist loadfile` on the two-core machine, another test run beside it, 7 December 2026,
# after `make test` compiled bytecode), started first. `make test` hands whole files to its
# three processes (`--dist loadfile`) in collection order (`--no-loadscope-reorder`,
# pyproject.toml): a long file handed out last keeps one core busy while the other has nothing
# left, so the longest go first and the short ones even the processes out at the end. A file
# that grows past the last one here (about 25 s) belongs in the list, in its place; a name no
# longer in the tree is ignored.
LONG_FILES = (
    "tests/security/test_hostile_admin.py",  # 173: 3,000 + 1,000 + 400 draws against a server
    "tests/security/test_hostile_input.py",  # 162: 1,200 + 300 + 400 + 100 draws
    "tests/server/test_openapi.py",  # 140: schemathesis, 60 s each on SQLite and PostgreSQL
    "tests/approvals/test_service.py",  # 86: 246 tests, 113 on a PostgreSQL schema each
    "tests/security/test_policy.py",  # 76
    "tests/server/test_replicas.py",  # 76
    "tests/oso_cloud/test_openapi.py",  # 65: schemathesis, 60 s
    "tests/security/test_storage.py",  # 61
    # 23 and 25 with npm's cache filled; on a clean clone (CI) each installs its pinned npm
    # packages first, a minute or more: early, so that the install is not the run's tail.
    "tests/gateway/test_conformance.py",
    "tests/gateway/test_inspector_cli.py",
    "tests/approvals/test_gateway_holds.py",  # 58
    "tests/test_json_encoding.py",  # 57
    "tests/server/test_replica_heard_decisions.py",  # 49
    "tests/server/test_durable_decision_log.py",  # 47
    "tests/policy/test_fast_paths.py",  # 44
    "tests/audit/test_export.py",  # 41
    "tests/security/test_hostile_transmitter.py",  # 40
    "tests/security/test_edge.py",  # 36: header and body deadlines of 2 s, a server per setting
    "tests/security/test_hostile_decisions.py",  # 33
    "tests/signals/test_alerts.py",  # 30
    "tests/gateway/test_quickstart_client.py",  # 29
    "tests/scale/test_shared_subscriptions.py",  # 27: a lease of 5 s, held and let lapse
    "tests/facts/test_snapshot.py",  # 26
    "tests/security/test_full_disk_postgres.py",  # 26
    "tests/approvals/test_pages.py",  # 25
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`LONG_FILES` first, in their order; every other file after them, as collected. Only
    whole files move: the tests of a file keep their order."""
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.partition("::")[0], len(rank)))


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def drop_redis_keys(prefix: str) -> None:
    """Delete the keys a test wrote under its own ``prefix`` (never the others' keys)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(f"{prefix}:*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def require_service(name: str, host: str, port: int) -> None:
    if _reachable(host, port):
        return
    unavailable(f"{name} is not reachable at {host}:{port}")


def require_program(name: str, path: str) -> None:
    """Like `require_service`, for a program installed on the machine (e.g. a browser)."""
    if os.access(path, os.X_OK):
        return
    unavailable(f"{name} is not installed at {path}")


def unavailable(message: str) -> NoReturn:
    if os.environ.get("BASTION_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{message} and BASTION_REQUIRE_SERVICES=1")
    pytest.skip(f"SKIPPED: {message} (set BASTION_REQUIRE_SERVICES=1 to make this a failure)")


@pytest.fixture(scope="session", autouse=True)
def light_password_hashing():
    """Argon2id with small parameters in every test's process, so each sign-in costs
    milliseconds, not half a second on a shared machine: what the tests check is not Argon2's
    cost (`tests/oauth/conftest.py` gives the marked tests the production parameters back)."""
    saved = users._HASHER
    users._HASHER = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    yield
    users._HASHER = saved


@contextmanager
def postgres_schema() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped after. For a fixture that
    several tests share (scope="module"); a test of its own takes `postgres_url`."""
    require_service("PostgreSQL", "127.0.0.1", 5432)
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped after the test."""
    with postgres_schema() as url:
        yield url


@pytest.fixture
def outage(postgres_url) -> Outage:
    """PostgreSQL taken away from this test's bastion processes, and only from them."""
    taken = Outage(postgres_url, POSTGRES_URL)
    yield taken
    taken.drop()


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return str(tmp_path / "bastion.db")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request) -> str:
    """Runs a test once on a real SQLite file and once on a real PostgreSQL schema."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("postgres_url")
