"""No secret reaches what an operator reads: a real `bastion serve` (the quickstart, with a
company OpenID provider and an upstream with per-user credentials) is sent secrets where a client
or a provider puts them, and its output is searched for them afterwards."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.ports import free_port
from tests.security.test_edge import Served, start_quickstart
from tests.waits import eventually


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    served = start_quickstart(
        tmp_path_factory.mktemp("secrets"), identity=True, access_log=True, log_level="debug"
    )
    yield served
    served.stop()


def logged_line(served: Served, path: str) -> str:
    """The access log line of the last request to ``path`` that had a query string."""

    def lines() -> list[str]:
        return [line for line in served.log.splitlines() if f'"GET {path}?' in line]

    assert eventually(lines, every=0.1), f"no access log line for {path}:\n{served.log}"
    return lines()[-1]


def test_a_secret_in_a_query_string_is_not_written_to_the_access_log(served):
    """An authorization code and its state come back in the query of bastion's callbacks (a
    company provider's, an upstream's), and a client may send its access token there (RFC 6750
    §2.3, refused): uvicorn's access log line of each request keeps the path, not the secrets."""
    sent: dict[str, dict[str, str]] = {
        "/login/company/callback": {"code": "", "state": ""},
        "/connections/tracker/callback": {"code": "", "state": "", "iss": "http://127.0.0.1:9/"},
        "/mcp/desk": {"access_token": ""},
        "/token": {"refresh_token": "", "client_secret": "", "code_verifier": ""},
        "/v1/facts": {"api_key": ""},
    }
    values = []
    for path, query in sent.items():
        for name in query:
            if not query[name]:
                query[name] = f"{name}-{secrets.token_urlsafe(24)}"
                values.append(query[name])
        httpx.get(f"{served.url}{path}", params=query, timeout=30)
    for path, query in sent.items():
        line = logged_line(served, path)
        assert all(f"{name}=" in line for name in query), line
    assert "iss=http" in logged_line(served, "/connections/tracker/callback")
    log = served.log
    leaked = [value for value in values if value in log]
    assert not leaked, f"{leaked} in the log:\n{log}"


def test_serve_never_prints_the_database_password(postgres_url, tmp_path):
    """With no API key yet, `bastion serve` prints the command that makes the first: the
    database it names is shown without its password (the server trusts any, as in the tests)."""
    password = secrets.token_urlsafe(16)
    database = postgres_url.replace("://postgres@", f"://postgres:{password}@", 1)
    assert password in database
    env = {k: v for k, v in os.environ.items() if k != "BASTION_ADMIN_KEY"}
    command = [sys.executable, "-m", "bastion.cli", "serve", "--database", database]
    command += ["--port", str(free_port())]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**env, "BASTION_CONFIG": "/nonexistent"},
    )
    printed = []
    try:
        for line in process.stdout:
            printed.append(line)
            if "Uvicorn running" in line:
                break
    finally:
        process.terminate()
        printed.append(process.communicate(timeout=30)[0])
    printed = "".join(printed)
    assert "bastion keys create --database postgresql://postgres:***@127.0.0.1" in printed, printed
    assert password not in printed


def refused_start(tmp_path: Path, config: str) -> str:
    """What `bastion serve` printed when it refused to start with ``config``."""
    path = tmp_path / "bastion.toml"
    path.write_text(config)
    done = subprocess.run(
        [sys.executable, "-m", "bastion.cli", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "BASTION_CONFIG": "/nonexistent"},
    )
    assert done.returncode != 0
    return done.stdout + done.stderr


GATEWAY = """
[oauth]
issuer = "http://127.0.0.1:9"
key_dir = "{keys}"
[[oauth.resources]]
uri = "http://127.0.0.1:9/mcp/a"
[gateway]
redis_url = "{url}"
[[gateway.upstreams]]
name = "a"
url = "http://127.0.0.1:9/mcp"
"""


@pytest.mark.parametrize(
    ("setting", "url", "named"),
    [
        ("database", "mysql://bastion:{password}@db.internal/bastion", "mysql://bastion:***@"),
        ("database", "mysql://db.internal/bastion?password={password}", "password=[redacted]"),
        ("redis", "http://:{password}@cache.internal:6379/0", "http://:***@cache.internal"),
        # libpq quotes a URL it cannot parse, or the token of it it stopped at.
        ("database", "postgresql://bastion:{password}@[::1/bastion", "IPv6 host address"),
        ("database", "postgresql://bastion:%zz{password}@db.internal/bastion", "percent-encoded"),
    ],
)
def test_a_refused_url_is_named_without_its_password(tmp_path, setting, url, named):
    password = secrets.token_urlsafe(16)
    url = url.format(password=password)
    if setting == "database":
        config = f'[server]\ndatabase = "{url}"\n'
    else:
        database = tmp_path / "bastion.db"
        config = f'[server]\ndatabase = "{database}"\n'
        config += GATEWAY.format(keys=tmp_path / "keys", url=url)
    printed = refused_start(tmp_path, config)
    assert named in printed, printed
    assert password not in printed
