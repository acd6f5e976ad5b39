"""The gateway's paths (``/mcp/<server>`` and its RFC 9728 metadata) are served ahead of the
API's routes: what they answer, and what the rest of the server still answers beside them."""

from __future__ import annotations

from .test_bad_input import call, post


def test_protected_resource_metadata_names_the_server_and_the_issuer(bastion):
    url = f"{bastion.url}/.well-known/oauth-protected-resource/mcp/deskhttp"
    response = bastion.http.get(url)
    assert response.status_code == 200
    metadata = response.json()
    assert metadata["resource"] == bastion.mcp_url("deskhttp")
    assert metadata["authorization_servers"] == [bastion.url]
    assert metadata["bearer_methods_supported"] == ["header"]
    assert "customers:read" in metadata["scopes_supported"]
    assert bastion.http.post(url).status_code == 405
    unknown = f"{bastion.url}/.well-known/oauth-protected-resource/mcp/nosuch"
    assert bastion.http.get(unknown).status_code == 404


def test_a_path_under_mcp_that_names_no_server_is_refused_and_nothing_is_forwarded(bastion):
    token = bastion.token("sam", "deskhttp")
    before = len(bastion.recorder.requests)
    for path in ("/mcp/nosuch", "/mcp/deskhttp/more", "/mcp/"):
        response = bastion.http.post(
            f"{bastion.url}{path}",
            json=call(),
            headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
        )
        assert response.status_code == 404, path
    assert len(bastion.recorder.requests) == before


def test_the_api_and_the_authorization_server_still_answer_beside_the_gateway(bastion):
    assert bastion.http.get(f"{bastion.url}/healthz").json() == {"status": "ok"}
    assert bastion.http.get(f"{bastion.url}/.well-known/oauth-authorization-server").is_success
    missing = bastion.http.get(f"{bastion.url}/mcpx")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"


def test_an_unexpected_failure_on_the_gateways_path_is_a_500(bastion, monkeypatch):
    endpoint = bastion.app.state.gateway._endpoint

    async def broken(*args, **kwargs):
        raise RuntimeError("a bug in the gateway")

    monkeypatch.setattr(endpoint, "_authenticate", broken)
    before = len(bastion.recorder.requests)
    response = post(bastion, "any-token", body=call())
    assert response.status_code == 500
    assert len(bastion.recorder.requests) == before
