"""``[oauth] allowed_origins``: CORS for the OAuth endpoints a browser-based client calls (the
RFC 8414 metadata, the keys, /register, /token, /revoke) to the pages of the origins listed,
with no ``[gateway]`` table: bastion as the authorization server of other resource servers,
whose browser clients sign in with it (docs/oauth.md, Browser-based clients). Read at start
like ``[gateway] allowed_origins``; without either, no answer carries CORS, as before.
tests/gateway/test_cors.py has the gateway's, and the two lists together."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.testclient import TestClient

from bastion.server.app import create_app
from bastion.server.config import ConfigError, ServerConfig

# A single-page application of another origin, and a page of none listed.
APP = "https://app.example.com"
EVIL = "https://evil.example.com"
PATHS = {
    "metadata": ("GET", "/.well-known/oauth-authorization-server"),
    "keys": ("GET", "/jwks.json"),
    "register": ("POST", "/register"),
    "token": ("POST", "/token"),
    "revoke": ("POST", "/revoke"),
}


def _config(tmp_path: Path, **oauth) -> ServerConfig:
    policy = tmp_path / "policy.polar"
    policy.write_text("actor User {}\n")
    table = {
        "issuer": "http://127.0.0.1:9",
        "key_dir": str(tmp_path / "keys"),
        "resources": [{"uri": "https://api.example.com/", "scopes": ["tools:read"]}],
        **oauth,
    }
    return ServerConfig(database=str(tmp_path / "bastion.db"), policy_file=str(policy), oauth=table)


def _cors(response) -> dict[str, str]:
    return {k.lower(): v for k, v in response.headers.items() if k.lower().startswith("access-")}


def _preflight(client: TestClient, path: str, origin: str, method: str):
    return client.options(
        path,
        headers={
            "origin": origin,
            "access-control-request-method": method,
            "access-control-request-headers": "content-type, authorization, dpop",
        },
    )


@pytest.fixture
def listing(tmp_path):
    app = create_app(_config(tmp_path, allowed_origins=[APP, "http://LocalHost:6274"]))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def test_the_oauth_endpoints_answer_the_pages_oauth_allowed_origins_lists(listing):
    for name, (method, path) in PATHS.items():
        for origin in (APP, "http://localhost:6274"):
            answer = _preflight(listing, path, origin, method)
            assert answer.status_code == 204, name
            assert answer.headers["access-control-allow-origin"] == origin, name
            assert method in answer.headers["access-control-allow-methods"], name
            assert "dpop" in answer.headers["access-control-allow-headers"], name
            assert "access-control-allow-credentials" not in answer.headers, name
        refused = _preflight(listing, path, EVIL, method)
        assert refused.status_code == 403 and _cors(refused) == {}, name
        assert "[oauth] allowed_origins" in refused.json()["error_description"], name
    metadata = listing.get(PATHS["metadata"][1], headers={"origin": APP})
    assert metadata.status_code == 200
    assert metadata.headers["access-control-allow-origin"] == APP
    assert "Origin" in metadata.headers["vary"]
    refused = listing.post("/token", data={"grant_type": "password"}, headers={"origin": APP})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == APP
    assert "www-authenticate" in refused.headers["access-control-expose-headers"]
    foreign = listing.get(PATHS["metadata"][1], headers={"origin": EVIL})
    assert foreign.status_code == 200 and _cors(foreign) == {}


def test_a_fault_is_answered_to_a_listed_page_with_cors(listing, monkeypatch):
    def failing():
        raise RuntimeError("a fault of the test's")

    monkeypatch.setattr(listing.app.state.oauth.keys, "jwks", failing)
    failed = listing.get("/jwks.json", headers={"origin": APP})
    assert failed.status_code == 500 and failed.json()["error"] == "server_error"
    assert failed.headers["access-control-allow-origin"] == APP
    foreign = listing.get("/jwks.json", headers={"origin": EVIL})
    assert foreign.status_code == 500 and _cors(foreign) == {}


def test_the_pages_and_the_other_apis_do_no_cors(listing):
    for path in ("/authorize", "/sign-in", "/introspect", "/v1/authorize", "/healthz"):
        answer = _preflight(listing, path, APP, "POST")
        assert answer.status_code != 204 and _cors(answer) == {}, path
        assert _cors(listing.get(path, headers={"origin": APP})) == {}, path


def test_without_allowed_origins_no_answer_carries_cors(tmp_path):
    with TestClient(create_app(_config(tmp_path)), raise_server_exceptions=False) as client:
        for name, (method, path) in PATHS.items():
            answer = _preflight(client, path, APP, method)
            assert answer.status_code == 405 and _cors(answer) == {}, name
        metadata = client.get(PATHS["metadata"][1], headers={"origin": APP})
        assert metadata.status_code == 200 and _cors(metadata) == {}
        assert "origin" not in metadata.headers.get("vary", "").lower()


@pytest.mark.parametrize(
    "origins",
    [
        ["*"],
        ["https://app.example.com/"],
        ["https://app.example.com/callback"],
        ["https://app.example.com:443"],
        ["null"],
        ["app.example.com"],
        ["https://user@app.example.com"],
        [1],
        "https://app.example.com",
    ],
)
def test_an_allowed_origin_that_is_no_origin_stops_the_start_naming_it(tmp_path, origins):
    with pytest.raises(ConfigError, match="oauth.allowed_origins") as refused:
        create_app(_config(tmp_path, allowed_origins=origins))
    assert repr(origins) in str(refused.value)
