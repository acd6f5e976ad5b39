"""No secret reaches what an operator reads: a real `bastion serve` (the quickstart, with a
company OpenID provider and an upstream with per-user credentials) is sent secrets where a client
or a provider puts them, and its output is searched for them afterwards."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.security.test_edge import Served, start_quickstart


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    served = start_quickstart(
        tmp_path_factory.mktemp("secrets"), identity=True, access_log=True, log_level="debug"
    )
    yield served
    served.stop()


def logged_line(served: Served, path: str) -> str:
    """The access log line of the last request to ``path`` (its query string left out)."""
    for _ in range(50):
        lines = [line for line in served.log.splitlines() if f'"GET {path}?' in line]
        if lines:
            return lines[-1]
        time.sleep(0.1)
    raise AssertionError(f"no access log line for {path}:\n{served.log}")


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
