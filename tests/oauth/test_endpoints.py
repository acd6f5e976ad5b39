"""Metadata, registration, client authentication, client credentials, revocation and
introspection: what they answer, and the RFC error (changing nothing) for bad input."""

from __future__ import annotations

import base64

import httpx
import pytest

from bastion.oauth import InvalidToken

from .support import Bastion, allow_introspection, running_bastion

IAT = {"Authorization": "Bearer initial-access-token-for-tests"}


def assert_oauth_error(response: httpx.Response, error: str, status: int = 400) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error
    assert body["error_description"]
    assert response.headers["cache-control"] == "no-store"


def confidential(bastion: Bastion, **metadata) -> dict:
    body = {
        "client_name": "Nightly agent",
        "token_endpoint_auth_method": "client_secret_basic",
        "grant_types": ["client_credentials"],
        "redirect_uris": [],
        "scope": "tools:read",
        **metadata,
    }
    response = bastion.http.post(f"{bastion.url}/register", json=body, headers=IAT)
    assert response.status_code == 201, response.text
    return response.json()


def basic(client: dict) -> dict[str, str]:
    raw = f"{client['client_id']}:{client['client_secret']}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


# RFC 8414 metadata


def test_metadata_lists_what_mcp_clients_need(bastion: Bastion):
    metadata = bastion.http.get(f"{bastion.url}/.well-known/oauth-authorization-server").json()
    assert metadata["issuer"] == bastion.url
    assert metadata["code_challenge_methods_supported"] == ["S256"]
    assert metadata["authorization_response_iss_parameter_supported"] is True
    assert metadata["client_id_metadata_document_supported"] is True
    assert set(metadata["grant_types_supported"]) == {
        "authorization_code",
        "refresh_token",
        "client_credentials",
        "urn:openid:params:grant-type:ciba",
        "urn:ietf:params:oauth:grant-type:token-exchange",
    }
    for name in ("authorization", "token", "registration", "revocation", "introspection"):
        assert metadata[f"{name}_endpoint"].startswith(bastion.url + "/")
    assert metadata["jwks_uri"] == f"{bastion.url}/jwks.json"


def test_metadata_is_path_inserted_when_the_issuer_has_a_path(sqlite_url, tmp_path):
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from bastion.db import Database
    from bastion.oauth import AuthorizationServer

    from .support import make_settings

    settings = make_settings(
        "https://auth.example.com/tenant1",
        "https://mcp.example.com/mcp",
        "https://x.example/mcp",
        str(tmp_path / "keys"),
    )
    server = AuthorizationServer(settings, Database(sqlite_url))
    http = TestClient(Starlette(routes=server.routes()), base_url="https://auth.example.com")
    metadata = http.get("/.well-known/oauth-authorization-server/tenant1").json()
    assert metadata["issuer"] == "https://auth.example.com/tenant1"
    assert metadata["token_endpoint"] == "https://auth.example.com/tenant1/token"
    assert http.get("/tenant1/jwks.json").status_code == 200


# RFC 7591 registration


@pytest.mark.parametrize(
    ("metadata", "error"),
    [
        ({"redirect_uris": ["http://example.com/cb"]}, "invalid_redirect_uri"),
        ({"redirect_uris": ["https://example.com/cb#frag"]}, "invalid_redirect_uri"),
        ({"redirect_uris": ["javascript:alert(1)"]}, "invalid_redirect_uri"),
        ({"redirect_uris": []}, "invalid_redirect_uri"),
        ({"redirect_uris": "https://example.com/cb"}, "invalid_redirect_uri"),
        ({"token_endpoint_auth_method": "private_key_jwt"}, "invalid_client_metadata"),
        ({"grant_types": ["implicit"]}, "invalid_client_metadata"),
        (
            {"grant_types": ["authorization_code"], "response_types": ["token"]},
            "invalid_client_metadata",
        ),
        ({"scope": "tools:read admin"}, "invalid_client_metadata"),
        ({"client_name": 7}, "invalid_client_metadata"),
        # a right-to-left override would turn round the consent page's warning after the name
        ({"client_name": "Claude\u202eDesktop"}, "invalid_client_metadata"),
        ({"client_name": "Claude\nDesktop"}, "invalid_client_metadata"),
        # printable to Python, yet blank: each would read as "Trusted Bot" beside the real one
        ({"client_name": "Trusted Bot\u3164"}, "invalid_client_metadata"),
        ({"client_name": "Trusted\u034fBot"}, "invalid_client_metadata"),
        ({"client_name": "Trusted Bot\ufe0f"}, "invalid_client_metadata"),
        ({"client_name": "Trusted  Bot"}, "invalid_client_metadata"),
        # visible, yet each reads as "Trusted Bot": a Cyrillic В, fullwidth letters
        ({"client_name": "Trusted \u0412ot"}, "invalid_client_metadata"),
        ({"client_name": "\uff34rusted Bot"}, "invalid_client_metadata"),
        ({"logo_uri": "javascript:x"}, "invalid_client_metadata"),
    ],
)
def test_bad_client_metadata_is_refused_and_registers_nothing(bastion: Bastion, metadata, error):
    body = {
        "redirect_uris": ["https://example.com/cb"],
        "token_endpoint_auth_method": "none",
        **metadata,
    }
    before = bastion.rows()
    assert_oauth_error(bastion.http.post(f"{bastion.url}/register", json=body), error)
    assert bastion.rows() == before


def test_a_client_name_that_reads_as_another_is_refused_saying_why(bastion: Bastion):
    body = {"redirect_uris": ["https://example.com/cb"], "token_endpoint_auth_method": "none"}
    response = bastion.http.post(
        f"{bastion.url}/register", json={**body, "client_name": "Trusted \u0412ot"}
    )
    assert response.json()["error_description"] == (
        "client_name mixes scripts in one word (Latin and Cyrillic: \\u0412ot)"
    )
    response = bastion.http.post(
        f"{bastion.url}/register", json={**body, "client_name": "Cafe\u0301 Bot"}
    )
    assert "client_name is not in Unicode's normal form NFC" in response.text
    # A name in one script, or in two words of two scripts, is a name.
    for name in ("Помощник Бориса", "Борис's helper", "東京 Bot", "Café Bot"):
        registered = bastion.http.post(
            f"{bastion.url}/register", json={**body, "client_name": name}
        )
        assert registered.status_code == 201, registered.text
        assert registered.json()["client_name"] == name


def test_registration_body_must_be_a_json_object(bastion: Bastion):
    before = bastion.rows()
    for content in (b"not json", b"[1, 2]", b"x" * 70_000):
        response = bastion.http.post(
            f"{bastion.url}/register", content=content, headers={"content-type": "application/json"}
        )
        assert_oauth_error(response, "invalid_client_metadata")
    assert bastion.rows() == before


def test_open_registration_is_for_public_clients_only(bastion: Bastion):
    before = bastion.rows()
    body = {
        "redirect_uris": ["https://example.com/cb"],
        "token_endpoint_auth_method": "client_secret_post",
    }
    assert_oauth_error(
        bastion.http.post(f"{bastion.url}/register", json=body), "invalid_token", 401
    )
    wrong = {"Authorization": "Bearer not-the-initial-access-token"}
    response = bastion.http.post(f"{bastion.url}/register", json=body, headers=wrong)
    assert_oauth_error(response, "invalid_token", 401)
    assert bastion.rows() == before
    registered = bastion.http.post(f"{bastion.url}/register", json=body, headers=IAT).json()
    assert (
        registered["client_secret"]
        and registered["token_endpoint_auth_method"] == "client_secret_post"
    )
    stored = bastion.db.execute("SELECT secret_digest FROM oauth_clients")[0][0]
    assert registered["client_secret"] not in stored


def test_public_registration_response(bastion: Bastion):
    client = bastion.register()
    assert client["token_endpoint_auth_method"] == "none"
    assert "client_secret" not in client
    assert client["redirect_uris"] == ["http://127.0.0.1:9/callback"]


def test_registration_policies(sqlite_url, tmp_path):
    body = {"redirect_uris": ["https://example.com/cb"], "token_endpoint_auth_method": "none"}
    with running_bastion(sqlite_url, tmp_path, registration="initial_access_token") as bastion:
        assert_oauth_error(
            bastion.http.post(f"{bastion.url}/register", json=body), "invalid_token", 401
        )
        # A token beyond ASCII (a header's bytes read as Latin-1) is a wrong one, not a 500.
        latin = [(b"authorization", b"Bearer initial-access-token-for-t\xe9sts")]
        assert_oauth_error(
            bastion.http.post(f"{bastion.url}/register", json=body, headers=latin),
            "invalid_token",
            401,
        )
        assert (
            bastion.http.post(f"{bastion.url}/register", json=body, headers=IAT).status_code == 201
        )
    with running_bastion(
        str(tmp_path / "closed.db"), tmp_path / "closed", registration="closed"
    ) as bastion:
        assert_oauth_error(
            bastion.http.post(f"{bastion.url}/register", json=body), "access_denied", 403
        )
        metadata = bastion.http.get(f"{bastion.url}/.well-known/oauth-authorization-server").json()
        assert "registration_endpoint" not in metadata


# client authentication and client_credentials


def test_client_credentials_gives_the_agent_a_token_as_itself(bastion: Bastion):
    agent = confidential(bastion)
    response = bastion.http.post(
        f"{bastion.url}/token",
        data={"grant_type": "client_credentials", "resource": bastion.resource},
        headers=basic(agent),
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert "refresh_token" not in body
    verified = bastion.server.verifier.verify(body["access_token"], bastion.resource)
    assert verified.subject == agent["client_id"] and verified.scopes == {"tools:read"}


def test_client_credentials_refusals(bastion: Bastion):
    agent = confidential(bastion)
    public = bastion.register()
    before = bastion.rows()
    post = lambda headers=None, **form: bastion.http.post(  # noqa: E731
        f"{bastion.url}/token", data={"grant_type": "client_credentials", **form}, headers=headers
    )
    assert_oauth_error(post(basic(agent)), "invalid_target")
    assert_oauth_error(
        post(basic(agent), resource="https://elsewhere.example/mcp"), "invalid_target"
    )
    assert_oauth_error(
        post(basic(agent), resource=bastion.resource, scope="tools:call"), "invalid_scope"
    )
    assert_oauth_error(
        post(client_id=public["client_id"], resource=bastion.resource), "unauthorized_client"
    )
    assert bastion.rows() == before


def test_client_authentication_refusals(bastion: Bastion):
    agent = confidential(bastion)
    before = bastion.rows()
    form = {"grant_type": "client_credentials", "resource": bastion.resource}
    url = f"{bastion.url}/token"
    wrong_secret = basic({**agent, "client_secret": "wrong"})
    response = bastion.http.post(url, data=form, headers=wrong_secret)
    assert_oauth_error(response, "invalid_client", 401)
    assert response.headers["www-authenticate"].startswith("Basic")
    # Registered for client_secret_basic: the same secret in the body is refused.
    body_auth = {**form, "client_id": agent["client_id"], "client_secret": agent["client_secret"]}
    assert_oauth_error(bastion.http.post(url, data=body_auth), "invalid_client", 401)
    # No secret at all.
    assert_oauth_error(
        bastion.http.post(url, data={**form, "client_id": agent["client_id"]}),
        "invalid_client",
        401,
    )
    assert_oauth_error(
        bastion.http.post(url, data={**form, "client_id": "nobody"}), "invalid_client", 401
    )
    assert_oauth_error(bastion.http.post(url, data=form), "invalid_client", 401)
    assert bastion.rows() == before


def test_basic_credentials_beyond_ascii_are_refused_as_invalid_base64(bastion: Bastion):
    """A header's bytes are read as Latin-1: ``Basic \\x80`` is text beyond ASCII, which
    b64decode refuses with a ValueError of its own (a 500 at every endpoint that authenticates
    a client, before)."""
    before = bastion.rows()
    form = {"grant_type": "client_credentials", "resource": bastion.resource}
    for path in ("/token", "/revoke", "/introspect", "/bc-authorize"):
        for value in (b"Basic \x80", b"Basic \xe9t\xe9", "Basic é".encode()):
            response = bastion.http.post(
                f"{bastion.url}{path}",
                data={**form, "token": "t"},
                headers=[(b"authorization", value)],
            )
            assert_oauth_error(response, "invalid_client", 401)
            assert "not valid base64" in response.json()["error_description"], response.text
    assert bastion.rows() == before


def test_basic_credentials_with_another_client_id_in_the_body_are_refused(bastion: Bastion):
    agent, other = confidential(bastion), confidential(bastion)
    before = bastion.rows()
    form = {"grant_type": "client_credentials", "resource": bastion.resource}
    response = bastion.http.post(
        f"{bastion.url}/token", data={**form, "client_id": other["client_id"]}, headers=basic(agent)
    )
    assert_oauth_error(response, "invalid_request")
    assert "differs from the Basic credentials" in response.json()["error_description"]
    assert bastion.rows() == before
    # The same client_id in the body as in the header is taken.
    same = {**form, "client_id": agent["client_id"]}
    response = bastion.http.post(f"{bastion.url}/token", data=same, headers=basic(agent))
    assert response.status_code == 200, response.text


def test_token_endpoint_bad_requests_change_nothing(bastion: Bastion):
    client = bastion.register()
    before = bastion.rows()
    url = f"{bastion.url}/token"
    cid = client["client_id"]
    assert_oauth_error(
        bastion.http.post(url, json={"grant_type": "authorization_code"}), "invalid_request"
    )
    assert_oauth_error(bastion.http.post(url, data={"client_id": cid}), "invalid_request")
    assert_oauth_error(
        bastion.http.post(url, data={"client_id": cid, "grant_type": "password"}),
        "unsupported_grant_type",
    )
    assert_oauth_error(
        bastion.http.post(url, data={"client_id": cid, "grant_type": "client_credentials"}),
        "unauthorized_client",
    )
    assert_oauth_error(
        bastion.http.post(url, data={"client_id": cid, "grant_type": "authorization_code"}),
        "invalid_request",
    )
    assert_oauth_error(
        bastion.http.post(
            url,
            data={
                "client_id": cid,
                "grant_type": "authorization_code",
                "code": "made-up",
                "redirect_uri": client["redirect_uris"][0],
                "code_verifier": "v" * 43,
            },
        ),
        "invalid_grant",
    )
    assert_oauth_error(
        bastion.http.post(
            url, data={"client_id": cid, "grant_type": "refresh_token", "refresh_token": "x"}
        ),
        "invalid_grant",
    )
    repeated = f"client_id={cid}&grant_type=refresh_token&grant_type=refresh_token"
    response = bastion.http.post(
        url, content=repeated, headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert_oauth_error(response, "invalid_request")
    assert bastion.rows() == before
    # Nothing proves who sent them: aggregated per address, error and client, none lost.
    bastion.server.refusals.flush(everything=True)
    refusals = bastion.server.audit.events("token.refused")
    assert sum(e.detail.get("repeats", 1) for e in refusals) == 8
    assert {e.detail["reason"] for e in refusals} == {
        "invalid_request",
        "unsupported_grant_type",
        "unauthorized_client",
        "invalid_grant",
    }


def test_revoked_client_is_refused_everywhere(bastion: Bastion):
    client = bastion.register()
    tokens = bastion.tokens_for(client)
    assert bastion.server.store.revoke_client(client["client_id"], bastion.clock(), actor="test")
    with pytest.raises(InvalidToken, match="revoked"):
        bastion.server.verifier.verify(tokens["access_token"], bastion.resource)
    response = bastion.token(
        grant_type="refresh_token",
        refresh_token=tokens["refresh_token"],
        client_id=client["client_id"],
    )
    assert_oauth_error(response, "invalid_client", 401)


# RFC 7009 revocation


def test_revoking_an_access_token_refuses_it_on_next_use(bastion: Bastion):
    client = bastion.register()
    tokens = bastion.tokens_for(client)
    response = bastion.http.post(
        f"{bastion.url}/revoke",
        data={
            "token": tokens["access_token"],
            "token_type_hint": "access_token",
            "client_id": client["client_id"],
        },
    )
    assert response.status_code == 200
    with pytest.raises(InvalidToken, match="revoked"):
        bastion.server.verifier.verify(tokens["access_token"], bastion.resource)
    # The refresh token (another token of the grant) still works: only the jti was revoked.
    refreshed = bastion.token(
        grant_type="refresh_token",
        refresh_token=tokens["refresh_token"],
        client_id=client["client_id"],
    )
    assert refreshed.status_code == 200
    assert "token.revoked" in [e.kind for e in bastion.server.audit.events()]


def test_revoking_a_refresh_token_revokes_its_grant(bastion: Bastion):
    client = bastion.register()
    tokens = bastion.tokens_for(client)
    response = bastion.http.post(
        f"{bastion.url}/revoke",
        data={"token": tokens["refresh_token"], "client_id": client["client_id"]},
    )
    assert response.status_code == 200
    with pytest.raises(InvalidToken, match="revoked"):
        bastion.server.verifier.verify(tokens["access_token"], bastion.resource)


def test_a_client_cannot_revoke_another_clients_tokens(bastion: Bastion):
    client = bastion.register()
    other = bastion.register()
    tokens = bastion.tokens_for(client)
    before = bastion.rows()
    for token in (tokens["access_token"], tokens["refresh_token"], "unknown"):
        response = bastion.http.post(
            f"{bastion.url}/revoke", data={"token": token, "client_id": other["client_id"]}
        )
        assert response.status_code == 200  # RFC 7009 §2.2: no oracle
    assert bastion.rows() == before
    bastion.server.verifier.verify(tokens["access_token"], bastion.resource)


def test_revocation_bad_requests(bastion: Bastion):
    client = bastion.register()
    before = bastion.rows()
    url = f"{bastion.url}/revoke"
    assert_oauth_error(
        bastion.http.post(url, data={"client_id": client["client_id"]}), "invalid_request"
    )
    assert_oauth_error(bastion.http.post(url, data={"token": "x"}), "invalid_client", 401)
    assert bastion.rows() == before


# RFC 7662 introspection


def test_introspection(bastion: Bastion):
    resource_server = confidential(bastion, grant_types=["client_credentials"])
    allow_introspection(bastion, resource_server["client_id"])
    client = bastion.register()
    tokens = bastion.tokens_for(client)
    url = f"{bastion.url}/introspect"
    introspect = lambda token: bastion.http.post(  # noqa: E731
        url, data={"token": token}, headers=basic(resource_server)
    ).json()
    active = introspect(tokens["access_token"])
    assert active["active"] is True
    assert active["sub"] == "alice" and active["client_id"] == client["client_id"]
    assert active["aud"] == bastion.resource and active["scope"] == "tools:read"
    assert introspect(tokens["refresh_token"])["active"] is True
    assert introspect("unknown") == {"active": False}
    bastion.http.post(
        f"{bastion.url}/revoke",
        data={"token": tokens["refresh_token"], "client_id": client["client_id"]},
    )
    assert introspect(tokens["access_token"]) == {"active": False}
    assert introspect(tokens["refresh_token"]) == {"active": False}
    fresh = bastion.tokens_for(client)
    bastion.clock.advance(3600)
    assert introspect(fresh["access_token"]) == {"active": False}


def test_introspection_reports_a_used_expired_or_revoked_refresh_token_inactive(bastion: Bastion):
    resource_server = confidential(bastion)
    allow_introspection(bastion, resource_server["client_id"])
    introspect = lambda token: bastion.http.post(  # noqa: E731
        f"{bastion.url}/introspect", data={"token": token}, headers=basic(resource_server)
    ).json()
    client = bastion.register()
    first = bastion.tokens_for(client)["refresh_token"]
    rotated = bastion.token(
        grant_type="refresh_token", refresh_token=first, client_id=client["client_id"]
    )
    second = rotated.json()["refresh_token"]
    assert introspect(first) == {"active": False}  # used: rotated out
    assert introspect(second)["active"] is True
    revoked = bastion.tokens_for(client)["refresh_token"]
    grant_id = bastion.server.store.refresh_token(revoked)[0]
    bastion.server.store.revoke_grant(grant_id, bastion.clock(), "test", actor="test")
    assert introspect(revoked) == {"active": False}
    bastion.clock.advance(bastion.server.settings.refresh_token_seconds + 1)
    assert introspect(second) == {"active": False}  # expired


def test_introspection_is_for_allowed_confidential_clients_only(bastion: Bastion):
    agent = confidential(bastion)
    public = bastion.register()
    url = f"{bastion.url}/introspect"
    assert_oauth_error(
        bastion.http.post(url, data={"token": "x"}, headers=basic(agent)),
        "unauthorized_client",
        403,
    )
    assert_oauth_error(
        bastion.http.post(url, data={"token": "x", "client_id": public["client_id"]}),
        "unauthorized_client",
        403,
    )
    assert_oauth_error(bastion.http.post(url, data={"token": "x"}), "invalid_client", 401)


def test_spent_client_credentials_grants_are_forgotten(bastion: Bastion):
    agent = confidential(bastion)
    form = {"grant_type": "client_credentials", "resource": bastion.resource}
    bastion.http.post(f"{bastion.url}/token", data=form, headers=basic(agent))
    assert len(bastion.rows()["oauth_grants"]) == 1
    bastion.clock.advance(2 * 3600)
    bastion.server.housekeeping()
    assert bastion.rows()["oauth_grants"] == []
