"""Enterprise-managed authorization (MCP's extension over the ID-JAG draft): an enterprise identity
provider started by this test (OpenID Connect Discovery and a JWKS over real HTTP, real signed
JWTs) issues Identity Assertion JWT Authorization Grants; an agent presents one at bastion's
/token with the RFC 7523 jwt-bearer grant, gets an access token with no consent screen, and the
official MCP SDK client uses it on the gateway, decided as the user and agent the ID-JAG names.
Every ID-JAG that must be refused is refused, and issues nothing."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import uuid

import anyio
import httpx
import httpx2
import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, OctKey
from mcp.client.client import Client as McpClient
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bastion.oauth.jwt_bearer import ID_JAG_PROFILE, JWT_BEARER_GRANT_TYPE, IdJagSettings
from bastion.oauth.metadata import authorization_server_metadata
from bastion.oauth.settings import OAuthSettings, SettingsError
from tests.gateway.support import start
from tests.identity.test_dpop import Holder, claims_of
from tests.oauth.support import ANY_KID, free_socket, serve, signed_text

INITIAL_TOKEN = "initial-access-token-for-id-jag-tests"
SCOPES = "customers:read customers:write"


class EnterpriseIdp:
    """Identity providers on one server: ``acme`` (found by OpenID Connect Discovery), ``other``
    (its jwks_uri configured), each with its own key under the same kid, and ``big`` (its
    jwks_uri configured, its key set larger than bastion takes from it), and ``down`` (its
    metadata answers 503 wherever it is asked; ``down_asked`` counts the asking)."""

    __test__ = False

    def __init__(self) -> None:
        self.keys = {
            name: ECKey.generate_key("P-256", parameters={"kid": "k1"})
            for name in ("acme", "other", "big", "mail", "corp", "multi")
        }
        self.url = ""
        self.down_asked = 0
        self.app = Starlette(
            routes=[
                Route("/acme/.well-known/openid-configuration", self.discovery),
                Route("/down/.well-known/openid-configuration", self.down),
                Route("/.well-known/oauth-authorization-server/down", self.down),
                Route("/{name}/jwks", self.jwks),
            ]
        )

    def issuer(self, name: str = "acme") -> str:
        return f"{self.url}/{name}"

    async def discovery(self, request: Request) -> Response:
        return JSONResponse({"issuer": self.issuer(), "jwks_uri": f"{self.issuer()}/jwks"})

    async def down(self, request: Request) -> Response:
        self.down_asked += 1
        return JSONResponse({"error": "down"}, status_code=503)

    async def jwks(self, request: Request) -> Response:
        key = self.keys[request.path_params["name"]]
        return JSONResponse({"keys": [key.as_dict(private=False)]})

    def id_jag(
        self, bastion, agent_id: str, /, *, signer: str = "acme", typ: str | None = "oauth-id-jag+jwt",
        alg: str = "ES256", key=None, kid: object = "k1", **claims,
    ) -> str:  # fmt: skip
        now = int(time.time())
        body = {
            "iss": self.issuer(),
            "sub": "sam",
            "aud": bastion.url,
            "client_id": agent_id,
            "resource": bastion.mcp_url("deskhttp"),
            "scope": SCOPES,
            "iat": now,
            "exp": now + 300,
            "jti": uuid.uuid4().hex,
            **claims,
        }
        header = {"alg": alg, "kid": kid}
        if typ:
            header["typ"] = typ
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(header, body, key or self.keys[signer], registry=ANY_KID)


@pytest.fixture(scope="module")
def idp():
    provider = EnterpriseIdp()
    with serve(provider.app, free_socket()) as url:
        provider.url = url
        yield provider


@pytest.fixture(scope="module")
def bastion(tmp_path_factory, idp):
    oauth = {
        "initial_access_tokens": [INITIAL_TOKEN],
        "id_jag": {
            "issuers": [
                {"issuer": idp.issuer("acme")},
                # users = "any": only the claim's own bounds stand between it and a token.
                {
                    "issuer": idp.issuer("other"),
                    "jwks_uri": f"{idp.issuer('other')}/jwks",
                    "users": "any",
                },
                # Its users are named by email address.
                {
                    "issuer": idp.issuer("mail"),
                    "jwks_uri": f"{idp.issuer('mail')}/jwks",
                    "users": "any",
                    "user_claim": "email",
                },
                # Its users are the people who sign in through it ("corp:<sub>").
                {
                    "issuer": idp.issuer("corp"),
                    "jwks_uri": f"{idp.issuer('corp')}/jwks",
                    "user_prefix": "corp:",
                },
                {
                    "issuer": idp.issuer("big"),
                    "jwks_uri": f"{idp.issuer('big')}/jwks",
                    "max_document_bytes": 64,
                },
                {"issuer": idp.issuer("down"), "jwks_refetch_seconds": 3600},
            ]
        },
    }
    with start(tmp_path_factory.mktemp("id-jag"), oauth=oauth) as b:
        yield b


def register(bastion, scope: str = SCOPES, method: str = "client_secret_basic") -> dict:
    response = bastion.http.post(
        f"{bastion.url}/register",
        json={
            "client_name": "enterprise agent",
            "grant_types": [JWT_BEARER_GRANT_TYPE],
            "token_endpoint_auth_method": method,
            "scope": scope,
        },
        headers={"authorization": f"Bearer {INITIAL_TOKEN}"},
    )
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture(scope="module")
def agent(bastion):
    return register(bastion)


def present(
    bastion, client: dict, assertion: str, dpop: str | None = None, **form
) -> httpx.Response:
    return bastion.http.post(
        f"{bastion.url}/token",
        data={"grant_type": JWT_BEARER_GRANT_TYPE, "assertion": assertion, **form},
        auth=(client["client_id"], client["client_secret"]),
        headers={"DPoP": dpop} if dpop is not None else None,
    )


def refused(response: httpx.Response, error: str = "invalid_grant") -> str:
    assert response.status_code == 400, response.text
    assert response.json()["error"] == error, response.text
    assert "access_token" not in response.json()
    return response.json()["error_description"]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# -- advertised, accepted, and decided by the policy ---------------------------------------------


def test_the_metadata_advertises_the_jwt_bearer_grant_and_the_id_jag_profile(bastion):
    metadata = bastion.http.get(f"{bastion.url}/.well-known/oauth-authorization-server").json()
    assert JWT_BEARER_GRANT_TYPE in metadata["grant_types_supported"]
    assert metadata["authorization_grant_profiles_supported"] == [ID_JAG_PROFILE]


def test_without_identity_providers_the_grant_is_neither_advertised_nor_registered(tmp_path):
    settings = OAuthSettings.from_mapping(
        {
            "issuer": "https://auth.example.com",
            "key_dir": str(tmp_path),
            "resources": [{"uri": "https://mcp.example.com/mcp", "scopes": ["a"]}],
        }
    )
    metadata = authorization_server_metadata(settings)
    assert JWT_BEARER_GRANT_TYPE not in metadata["grant_types_supported"]
    assert "authorization_grant_profiles_supported" not in metadata


@pytest.mark.parametrize("mode", ["legacy", "auto"])
def test_an_id_jag_gets_a_token_the_gateway_decides_as_its_user_and_agent(
    bastion, idp, agent, mode
):
    response = present(bastion, agent, idp.id_jag(bastion, agent["client_id"]))
    assert response.status_code == 200, response.text
    issued = response.json()
    # No consent screen, no refresh token: a fresh ID-JAG from the provider is the way back.
    assert issued["token_type"] == "Bearer" and "refresh_token" not in issued
    assert issued["scope"] == SCOPES
    seen: dict = {}

    async def main() -> None:
        headers = {"authorization": f"Bearer {issued['access_token']}"}
        async with (
            httpx2.AsyncClient(headers=headers, timeout=20) as http,
            McpClient(
                streamable_http_client(bastion.mcp_url("deskhttp"), http_client=http), mode=mode
            ) as client,
        ):
            seen["search"] = await client.call_tool("search_customers", {"query": "a"})
            try:
                await client.call_tool("delete_customer", {"customer_id": "c-100"})
            except MCPError as e:
                seen["delete_error"] = e

    anyio.run(main)
    customers = json.loads(seen["search"].content[0].text)["customers"]
    # sam is no admin of desk: the policy masks emails for this user as for any other token.
    assert customers and {c["email"] for c in customers} == {"[masked]"}
    bastion.flush()
    record = bastion.records.get(seen["delete_error"].error.data["decision_id"])
    assert record.result == "deny"
    assert list(record.principals[:2]) == ['User{"sam"}', f'Agent{{"{agent["client_id"]}"}}']
    issued_events = [
        e for e in bastion.app.state.oauth.audit.events("token.issued")
        if e.detail.get("grant_type") == JWT_BEARER_GRANT_TYPE
    ]  # fmt: skip
    assert issued_events and issued_events[-1].detail["idp"] == idp.issuer()


def test_the_token_holds_the_id_jags_scopes_the_request_and_the_client_may_have(
    bastion, idp, agent
):
    narrow = register(bastion, scope="customers:read")
    response = present(bastion, narrow, idp.id_jag(bastion, narrow["client_id"]))
    assert response.json()["scope"] == "customers:read"
    response = present(
        bastion, agent, idp.id_jag(bastion, agent["client_id"]), scope="customers:read"
    )
    assert response.json()["scope"] == "customers:read"
    # The request may repeat the ID-JAG's resource.
    jag = idp.id_jag(bastion, agent["client_id"])
    assert present(bastion, agent, jag, resource=bastion.mcp_url("deskhttp")).status_code == 200


def test_a_request_for_more_scopes_than_the_id_jag_grants_is_refused(bastion, idp, agent):
    jag = idp.id_jag(bastion, agent["client_id"], scope="customers:read")
    assert "more than the ID-JAG grants" in refused(
        present(bastion, agent, jag, scope=SCOPES), "invalid_scope"
    )
    # Nor does a client registered for other scopes get any.
    other = register(bastion, scope="customers:write")
    jag = idp.id_jag(bastion, other["client_id"], scope="customers:read")
    assert "no scope remains" in refused(present(bastion, other, jag), "invalid_scope")


def test_a_request_for_another_resource_than_the_id_jags_is_refused(bastion, idp, agent):
    jag = idp.id_jag(bastion, agent["client_id"])
    refused(present(bastion, agent, jag, resource=bastion.mcp_url("labhttp")), "invalid_target")


def test_a_provider_whose_metadata_failed_is_not_asked_again_until_jwks_refetch_seconds(
    bastion, idp, agent
):
    """Each ID-JAG naming a provider that is down asked for its metadata again (twice:
    discovery, then RFC 8414), each fetch held up to timeout_seconds."""
    answers = []
    for _ in range(3):
        jag = idp.id_jag(bastion, agent["client_id"], iss=idp.issuer("down"))
        response = present(bastion, agent, jag)
        assert response.status_code == 503, response.text
        answers.append(response.json()["error_description"])
    assert idp.down_asked == 2  # the first ID-JAG's two fetches; none for the next two
    assert all("openid-configuration answered HTTP 503" in a for a in answers)
    assert "([[oauth.id_jag.issuers]] jwks_refetch_seconds)" in answers[-1]


def test_a_replayed_id_jag_is_refused(bastion, idp, agent):
    jag = idp.id_jag(bastion, agent["client_id"])
    assert present(bastion, agent, jag).status_code == 200
    assert "already used" in refused(present(bastion, agent, jag))


def test_a_key_set_larger_than_its_cap_is_refused_naming_the_setting(bastion, idp, agent):
    jag = idp.id_jag(bastion, agent["client_id"], signer="big", iss=idp.issuer("big"))
    response = present(bastion, agent, jag)
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "temporarily_unavailable"
    assert "access_token" not in response.json()
    # The setting to change, as it is spelled in the configuration.
    assert (
        "sent more than 64 bytes ([[oauth.id_jag.issuers]] max_document_bytes)"
        in response.json()["error_description"]
    )


def now() -> int:
    return int(time.time())


# Each builds an ID-JAG (from the idp, bastion and the agent's client_id) that must be refused,
# and names what the refusal must say.
ATTACKS = {
    "unknown issuer": (lambda i, b, c: i.id_jag(b, c, iss=f"{i.url}/stranger"), "not a trusted"),
    "typ JWT": (lambda i, b, c: i.id_jag(b, c, typ="JWT"), "typ"),
    "an access token's typ": (lambda i, b, c: i.id_jag(b, c, typ="at+jwt"), "typ"),
    "wrong aud": (lambda i, b, c: i.id_jag(b, c, aud="https://other-as.example.com"), "(aud)"),
    # The draft's §4.4.1 (Processing Rules): "If the aud claim is an array, it MUST contain
    # exactly one element, and that element MUST be the issuer identifier".
    "aud of several, bastion's among them": (
        lambda i, b, c: i.id_jag(b, c, aud=[b.url, "https://other-as.example.com"]),
        "(aud)",
    ),
    "aud of the resource": (lambda i, b, c: i.id_jag(b, c, aud=b.mcp_url("deskhttp")), "(aud)"),
    "expired": (lambda i, b, c: i.id_jag(b, c, iat=now() - 900, exp=now() - 600), "expired"),
    "issued in the future": (
        lambda i, b, c: i.id_jag(b, c, iat=now() + 600, exp=now() + 900),
        "future",
    ),
    "living too long": (lambda i, b, c: i.id_jag(b, c, exp=now() + 3600), "lives longer"),
    "not valid yet": (lambda i, b, c: i.id_jag(b, c, nbf=now() + 120), "(nbf)"),
    # Not numbers, though Python's own reader takes them as such: NaN is neither before nor
    # after any time, true is 1 (1970).
    "exp NaN": (lambda i, b, c: i.id_jag(b, c, exp=float("nan")), "NaN"),
    "iat -Infinity": (lambda i, b, c: i.id_jag(b, c, iat=float("-inf")), "Infinity"),
    "nbf true": (lambda i, b, c: i.id_jag(b, c, nbf=True), "nbf"),
    "nbf NaN": (lambda i, b, c: i.id_jag(b, c, nbf=float("nan")), "NaN"),
    # RFC 9396's details narrow what the provider authorized; bastion does not read them, so
    # granting the scope alone would grant more than the ID-JAG says.
    "authorization_details": (
        lambda i, b, c: i.id_jag(
            b, c, authorization_details=[{"type": "customer_access", "locations": ["eu"]}]
        ),
        "authorization_details",
    ),
    "no jti": (lambda i, b, c: i.id_jag(b, c, jti=None), "jti"),
    "no sub": (lambda i, b, c: i.id_jag(b, c, sub=None), "sub"),
    "another client's": (
        lambda i, b, c: i.id_jag(b, c, client_id="some-other-client"),
        "the client that authenticated",
    ),
    "no client_id": (
        lambda i, b, c: i.id_jag(b, c, client_id=None),
        "the client that authenticated",
    ),
    "a resource not configured": (
        lambda i, b, c: i.id_jag(b, c, resource="https://mcp.elsewhere.example.com/mcp"),
        "not a protected resource",
    ),
    "a scope the resource lacks": (
        lambda i, b, c: i.id_jag(b, c, scope="customers:read admin"),
        "['admin']",
    ),
    "a kid that is not a string": (lambda i, b, c: i.id_jag(b, c, kid=["k1"]), "kid is not"),
    "a resource that is not a URI": (
        lambda i, b, c: i.id_jag(b, c, resource={"uri": b.mcp_url("deskhttp")}),
        "resource must be a URI or an array of URIs",
    ),
    "an empty array of resources": (
        lambda i, b, c: i.id_jag(b, c, resource=[]),
        "resource must be a URI or an array of URIs",
    ),
    # An actor the provider names would be dropped from the chain the policy decides.
    "an actor (act)": (lambda i, b, c: i.id_jag(b, c, act={"sub": "another-agent"}), "(act)"),
    # A key binding bastion cannot check (a certificate's, RFC 8705) is not ignored.
    "a cnf that is not a DPoP key's": (
        lambda i, b, c: i.id_jag(
            b, c, cnf={"x5t#S256": "bwcK0esc3ACC3DB2Y5_lESsXE8o9ltc05O89jdN-dg2"}
        ),
        "(cnf)",
    ),
    # From the issuer that takes any user: only the claim's bounds refuse these.
    "a user claim over 128 characters": (
        lambda i, b, c: i.id_jag(b, c, iss=i.issuer("other"), signer="other", sub="s" * 129),
        "'sub' claim names no user",
    ),
    "a user claim with a control character": (
        lambda i, b, c: i.id_jag(b, c, iss=i.issuer("other"), signer="other", sub="sam\n"),
        "'sub' claim names no user",
    ),
    "a key from another issuer": (lambda i, b, c: i.id_jag(b, c, signer="other"), "signature"),
    # An address the issuer does not vouch for may be another person's.
    "an email not verified": (
        lambda i, b, c: i.id_jag(b, c, iss=i.issuer("mail"), signer="mail", email="ceo@acme.test"),
        "email_verified is not true",
    ),
    "an email verified only as a string": (
        lambda i, b, c: i.id_jag(
            b, c, iss=i.issuer("mail"), signer="mail", email="ceo@acme.test", email_verified="true"
        ),
        "email_verified is not true",
    ),
    "a user bastion does not know": (lambda i, b, c: i.id_jag(b, c, sub="zed"), "not a user"),
    # The draft's tenant claims (§3.1, "Tenant Relationships"): a provider that names a tenant
    # is a multi-tenant issuer, whose sub names a person only within that tenant; acme lists
    # none, so it takes none. bastion is no tenant of acme's (no aud_tenant), so an ID-JAG for a
    # tenant of the resource side is for another; aud_sub, the user's id at bastion, must be
    # the user the ID-JAG names.
    "a tenant from a provider that lists none": (
        lambda i, b, c: i.id_jag(b, c, tenant="acme-co"),
        "tenant 'acme-co'",
    ),
    "an aud_tenant bastion is not": (
        lambda i, b, c: i.id_jag(b, c, aud_tenant="bastion-1"),
        "aud_tenant 'bastion-1'",
    ),
    "an aud_sub naming another user": (
        lambda i, b, c: i.id_jag(b, c, aud_sub="admin"),
        "aud_sub 'admin'",
    ),
    "an aud_sub that is not a string": (
        lambda i, b, c: i.id_jag(b, c, aud_sub=["sam"]),
        "aud_sub",
    ),
    "an aud_sub missing the user_prefix": (
        lambda i, b, c: i.id_jag(
            b, c, iss=i.issuer("corp"), signer="corp", sub="rui", aud_sub="rui"
        ),
        "aud_sub 'rui'",
    ),
    "alg HS256": (
        lambda i, b, c: i.id_jag(
            b, c, alg="HS256", key=OctKey.import_key(b"a-shared-secret-of-32-bytes-long")
        ),
        "alg 'HS256'",
    ),
}


@pytest.mark.parametrize("attack", ATTACKS)
def test_an_id_jag_that_must_be_refused_is_refused(bastion, idp, agent, attack):
    build, reason = ATTACKS[attack]
    before = len(bastion.app.state.oauth.audit.events("token.issued"))
    assert reason in refused(present(bastion, agent, build(idp, bastion, agent["client_id"])))
    assert len(bastion.app.state.oauth.audit.events("token.issued")) == before


def _claims_text(jag: str) -> str:
    """The JSON text of an ID-JAG's claims, its closing brace left off (for members to follow)."""
    payload = jag.split(".")[1]
    return base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)).decode().rstrip()[:-1]


HEADER = '{"alg": "ES256", "kid": "k1", "typ": "oauth-id-jag+jwt"}'
# Per member named twice: the keywords of `EnterpriseIdp.id_jag`, the JSON text appended to its
# claims (ISSUER and DESK: bastion's issuer and the desk server's URL) and the JSON text of its
# header. A reader that keeps the first value sees an ID-JAG bastion refuses, one that keeps
# the last (Python's json, joserfc) an ID-JAG it takes.
TWICE = {
    "sub": ({"sub": "zed"}, ', "sub": "sam"', HEADER),
    "aud": ({"aud": "https://other-as.example.com"}, ', "aud": "ISSUER"', HEADER),
    "resource": ({"resource": "https://mcp.elsewhere.example/mcp"}, ', "resource": "DESK"', HEADER),
    "kid": ({}, "", '{"alg": "ES256", "kid": "k9", "typ": "oauth-id-jag+jwt", "kid": "k1"}'),
    "alg": ({}, "", '{"alg": "none", "kid": "k1", "typ": "oauth-id-jag+jwt", "alg": "ES256"}'),
    "typ": ({}, "", '{"alg": "ES256", "kid": "k1", "typ": "JWT", "typ": "oauth-id-jag+jwt"}'),
}


@pytest.mark.parametrize("member", TWICE)
def test_an_id_jag_that_names_a_member_twice_is_refused_and_spends_nothing(
    bastion, idp, agent, member
):
    """An ID-JAG signed by its provider whose claims (``sub``, ``aud``, ``resource``) or JOSE
    header (``kid``, ``alg``, ``typ``) name a member twice: which user, audience or key it
    means depends on the parser (RFC 7515 §5.2, RFC 7519 §4 let a reader refuse it). Refused
    with invalid_grant naming the member, nothing issued, and its jti not spent."""
    overrides, more, header = TWICE[member]
    more = more.replace("ISSUER", bastion.url).replace("DESK", bastion.mcp_url("deskhttp"))
    jti = uuid.uuid4().hex
    claims = _claims_text(idp.id_jag(bastion, agent["client_id"], jti=jti, **overrides))
    jag = signed_text(idp.keys["acme"], header, claims + more + "}")
    before = len(bastion.app.state.oauth.audit.events("token.issued"))
    described = refused(present(bastion, agent, jag))
    assert f"member '{member}' twice" in described, described
    assert len(bastion.app.state.oauth.audit.events("token.issued")) == before
    # Its jti was not spent: an ID-JAG of the same jti, each member once, is taken.
    answer = present(bastion, agent, idp.id_jag(bastion, agent["client_id"], jti=jti))
    assert answer.status_code == 200, answer.text


def test_an_aud_sub_that_is_the_user_is_taken(bastion, idp, agent):
    jag = idp.id_jag(bastion, agent["client_id"], aud_sub="sam")
    answer = present(bastion, agent, jag)
    assert answer.status_code == 200, answer.text
    assert claims_of(answer.json()["access_token"])["sub"] == "sam"


# -- a multi-tenant provider ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tenanted(tmp_path_factory, idp):
    """A bastion that takes the ID-JAGs of one issuer for many tenants ("multi"), of two of its
    tenants, and is itself tenant "bastion-1" at it; and of "corp", which lists one tenant and
    names its users by email."""
    oauth = {
        "initial_access_tokens": [INITIAL_TOKEN],
        "id_jag": {
            "issuers": [
                {
                    "issuer": idp.issuer("multi"),
                    "jwks_uri": f"{idp.issuer('multi')}/jwks",
                    "users": "any",
                    "tenants": ["acme-co", "beta-co"],
                    "aud_tenant": "bastion-1",
                },
                {
                    "issuer": idp.issuer("corp"),
                    "jwks_uri": f"{idp.issuer('corp')}/jwks",
                    "users": "any",
                    "user_claim": "email",
                    "tenants": ["corp-co"],
                },
            ]
        },
    }
    with start(tmp_path_factory.mktemp("id-jag-tenants"), oauth=oauth) as b:
        b.agent = register(b)
        yield b


def multi_jag(idp, b, **claims) -> str:
    claims = {"tenant": "acme-co", "aud_tenant": "bastion-1", **claims}
    return idp.id_jag(b, b.agent["client_id"], iss=idp.issuer("multi"), signer="multi", **claims)


TENANT_ATTACKS = {
    "a tenant not listed": (lambda i, b: multi_jag(i, b, tenant="evil-co"), "tenant 'evil-co'"),
    "no tenant": (lambda i, b: multi_jag(i, b, tenant=None), "names no tenant"),
    "a tenant that is not a string": (
        lambda i, b: multi_jag(i, b, tenant=["acme-co"]),
        "tenant must be a string",
    ),
    "another aud_tenant": (
        lambda i, b: multi_jag(i, b, aud_tenant="bastion-2"),
        "aud_tenant 'bastion-2'",
    ),
    "no aud_tenant": (lambda i, b: multi_jag(i, b, aud_tenant=None), "names no aud_tenant"),
    "an aud_sub naming another user": (
        lambda i, b: multi_jag(i, b, sub="sam", aud_sub="root"),
        "aud_sub 'root'",
    ),
}


@pytest.mark.parametrize("attack", TENANT_ATTACKS)
def test_an_id_jag_of_a_tenant_bastion_does_not_take_is_refused(tenanted, idp, attack):
    build, reason = TENANT_ATTACKS[attack]
    before = len(tenanted.app.state.oauth.audit.events("token.issued"))
    assert reason in refused(present(tenanted, tenanted.agent, build(idp, tenanted)))
    assert len(tenanted.app.state.oauth.audit.events("token.issued")) == before


def test_an_id_jag_of_a_listed_tenant_for_bastions_tenant_gets_a_token(tenanted, idp):
    answer = present(tenanted, tenanted.agent, multi_jag(idp, tenanted, sub="ana", aud_sub="ana"))
    assert answer.status_code == 200, answer.text
    assert claims_of(answer.json()["access_token"])["sub"] == "ana"
    issued = tenanted.app.state.oauth.audit.events("token.issued")[-1]
    assert issued.detail["idp_tenant"] == "acme-co"


def test_the_same_sub_in_another_tenant_is_another_person(tenanted, idp):
    """The draft: a multi-tenant issuer's ``sub`` is unique only with its tenant (``iss`` +
    ``tenant`` + ``sub``). Two tenants' people of one ``sub`` would be one bastion user; the user
    stays the first one's, as an address given to another person does."""
    first = present(tenanted, tenanted.agent, multi_jag(idp, tenanted, sub="u-7"))
    assert first.status_code == 200, first.text
    said = refused(
        present(tenanted, tenanted.agent, multi_jag(idp, tenanted, sub="u-7", tenant="beta-co"))
    )
    assert "belongs to another account" in said, said
    again = present(tenanted, tenanted.agent, multi_jag(idp, tenanted, sub="u-7"))
    assert again.status_code == 200, again.text


def test_a_user_named_by_email_binds_to_the_tenant_and_sub(tenanted, idp):
    def jag(sub: str, tenant: str = "corp-co") -> str:
        return idp.id_jag(
            tenanted, tenanted.agent["client_id"], iss=idp.issuer("corp"), signer="corp",
            sub=sub, tenant=tenant, email="al@corp.test", email_verified=True,
        )  # fmt: skip

    assert present(tenanted, tenanted.agent, jag("a-1")).status_code == 200
    assert "belongs to another" in refused(present(tenanted, tenanted.agent, jag("a-2")))
    assert "tenant 'other-co'" in refused(present(tenanted, tenanted.agent, jag("a-1", "other-co")))


def test_an_aud_of_one_element_is_bastions_issuer_alone(bastion, idp, agent):
    jag = idp.id_jag(bastion, agent["client_id"], aud=[bastion.url])
    assert present(bastion, agent, jag).status_code == 200


def test_a_key_bound_id_jag_is_redeemed_only_with_a_proof_of_its_key(bastion, idp, agent):
    """The draft's "ID-JAG Contains cnf Claim but DPoP Proof is Not Presented": the Resource
    Authorization Server "MUST reject the request with an invalid_grant error"; with a proof,
    the two thumbprints "MUST match exactly"."""
    holder, stranger = Holder(), Holder()
    url = f"{bastion.url}/token"

    def bound() -> str:
        return idp.id_jag(bastion, agent["client_id"], cnf={"jkt": holder.jkt})

    assert "DPoP" in refused(present(bastion, agent, bound()))
    assert "DPoP" in refused(present(bastion, agent, bound(), dpop=stranger.proof("POST", url)))
    answer = present(bastion, agent, bound(), dpop=holder.proof("POST", url))
    assert answer.status_code == 200, answer.text
    assert answer.json()["token_type"] == "DPoP"
    assert claims_of(answer.json()["access_token"])["cnf"] == {"jkt": holder.jkt}


def test_an_id_jag_for_several_resources_gets_a_token_for_the_one_asked_for(bastion, idp, agent):
    """The draft's ``resource`` claim is "either a single URI or an array of URIs", and the
    granted resources "MAY be a subset"; a bastion token is for one, which the response names
    (the draft: the server "MUST include the granted resource ... in the access token
    response")."""
    desk, lab = bastion.mcp_url("deskhttp"), bastion.mcp_url("labhttp")
    one = present(bastion, agent, idp.id_jag(bastion, agent["client_id"], resource=[desk]))
    assert one.status_code == 200, one.text
    assert one.json()["resource"] == desk

    def both() -> str:
        return idp.id_jag(bastion, agent["client_id"], resource=[desk, lab])

    assert "name one" in refused(present(bastion, agent, both()), "invalid_target")
    answer = present(bastion, agent, both(), resource=lab)
    assert answer.status_code == 200, answer.text
    assert answer.json()["resource"] == lab
    assert claims_of(answer.json()["access_token"])["aud"] == lab
    refused(present(bastion, agent, both(), resource=bastion.mcp_url("desk")), "invalid_target")


def test_alg_none_is_refused(bastion, idp, agent):
    signed = idp.id_jag(bastion, agent["client_id"])
    header = _b64(json.dumps({"alg": "none", "typ": "oauth-id-jag+jwt", "kid": "k1"}).encode())
    assert "alg" in refused(present(bastion, agent, f"{header}.{signed.split('.')[1]}."))


def test_an_email_the_issuer_vouches_for_names_the_user(bastion, idp, agent):
    jag = idp.id_jag(
        bastion, agent["client_id"], iss=idp.issuer("mail"), signer="mail",
        email="lee@acme.test", email_verified=True,
    )  # fmt: skip
    answer = present(bastion, agent, jag)
    assert answer.status_code == 200, answer.text
    payload = answer.json()["access_token"].split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["sub"] == "lee@acme.test"


def test_a_user_named_by_email_stays_bound_to_its_first_sub_on_either_database(
    database_url, tmp_path, idp
):
    """With ``user_claim = "email"`` the user of an address stays the person's whose ``sub``
    first got a token for it: when the provider moves that person to another address and gives
    the old one to a new hire, the new hire's ID-JAG gets no token for the old user (its
    grants, facts, approvals and upstream connections) until an administrator unlinks it. An
    ID-JAG's ``sub`` binds per provider: another provider's ``sub`` of that name is another
    person's."""
    oauth = {
        "initial_access_tokens": [INITIAL_TOKEN],
        "id_jag": {
            "issuers": [
                {
                    "issuer": idp.issuer("mail"),
                    "jwks_uri": f"{idp.issuer('mail')}/jwks",
                    "users": "any",
                    "user_claim": "email",
                },
                # Okta's way: sub is the login (an email), uid the person's for good.
                {
                    "issuer": idp.issuer("corp"),
                    "jwks_uri": f"{idp.issuer('corp')}/jwks",
                    "users": "any",
                    "account_claim": "uid",
                },
            ]
        },
    }
    old, new = "jo.doe@acme.test", "jo.roe@acme.test"
    with start(tmp_path, oauth=oauth, database=database_url) as b:
        agent = register(b)

        def token(sub: str, email: str) -> httpx.Response:
            jag = idp.id_jag(
                b, agent["client_id"], iss=idp.issuer("mail"), signer="mail",
                sub=sub, email=email, email_verified=True,
            )  # fmt: skip
            return present(b, agent, jag)

        assert token("jo-1", old).status_code == 200
        assert token("jo-1", new).status_code == 200  # the same person, renamed
        assert "belongs to another" in refused(token("new-hire-9", old))
        assert token("jo-1", old).status_code == 200  # still theirs
        done = subprocess.run(
            [sys.executable, "-m", "bastion.cli", "users", "unlink", old, "--database",
             b.app.state.oauth.store.db.url],
            capture_output=True, text=True, env=os.environ, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert token("new-hire-9", old).status_code == 200  # released: the new person's now
        assert "belongs to another" in refused(token("jo-1", old))

        def by_login(uid: str | None) -> httpx.Response:
            jag = idp.id_jag(
                b, agent["client_id"], iss=idp.issuer("corp"), signer="corp", sub=old, uid=uid
            )
            return present(b, agent, jag)

        assert by_login("u-1").status_code == 200
        said = refused(by_login("u-2"))
        assert "belongs to another account" in said and "another uid" in said, said
        assert "'uid' claim names no account" in refused(by_login(None))


def test_a_disabled_user_gets_no_token(bastion, idp, agent):
    store = bastion.app.state.oauth.store
    store.create_user("kim", "not-a-real-hash", time.time(), actor="test")
    assert present(bastion, agent, idp.id_jag(bastion, agent["client_id"], sub="kim")).is_success
    store.disable_user("kim", time.time(), actor="test")
    assert "disabled" in refused(
        present(bastion, agent, idp.id_jag(bastion, agent["client_id"], sub="kim"))
    )


def test_a_user_prefix_keeps_the_providers_users_apart_from_bastions_own(bastion, idp, agent):
    """Without ``user_prefix`` an ID-JAG's ``sub`` "rui" is bastion's local user "rui", who may
    be another realm's person; with ``user_prefix = "corp:"`` it names ``corp:rui`` only."""
    store = bastion.app.state.oauth.store
    store.create_user("rui", "not-a-real-hash", time.time(), actor="test")

    def jag() -> str:
        return idp.id_jag(
            bastion, agent["client_id"], iss=idp.issuer("corp"), signer="corp", sub="rui"
        )

    assert "'corp:rui'" in refused(present(bastion, agent, jag()))  # not a user of bastion
    store.create_user("corp:rui", "not-a-real-hash", time.time(), actor="test")
    answer = present(bastion, agent, jag())
    assert answer.status_code == 200, answer.text
    payload = answer.json()["access_token"].split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["sub"] == "corp:rui"


def test_an_id_jag_cannot_name_a_client_as_its_user(bastion, idp, agent):
    """A token whose subject is a client id is that agent acting as itself (client
    credentials): an ID-JAG naming its own client, or another, as the user is refused."""
    other = register(bastion)
    for user in (agent["client_id"], other["client_id"]):
        jag = idp.id_jag(
            bastion, agent["client_id"], iss=idp.issuer("other"), signer="other", sub=user
        )
        assert "is the id of a client" in refused(present(bastion, agent, jag))


def test_the_client_must_authenticate_and_be_confidential(bastion, idp, agent):
    jag = idp.id_jag(bastion, agent["client_id"])
    wrong = bastion.http.post(
        f"{bastion.url}/token",
        data={"grant_type": JWT_BEARER_GRANT_TYPE, "assertion": jag},
        auth=(agent["client_id"], "not-the-secret"),
    )
    assert wrong.status_code == 401 and wrong.json()["error"] == "invalid_client"
    public = bastion.http.post(
        f"{bastion.url}/register",
        json={
            "client_name": "public agent",
            "grant_types": [JWT_BEARER_GRANT_TYPE],
            "token_endpoint_auth_method": "none",
        },
        headers={"authorization": f"Bearer {INITIAL_TOKEN}"},
    )
    assert public.status_code == 400 and "confidential" in public.json()["error_description"]
    # A client not registered for the grant cannot use it either.
    plain = bastion.http.post(
        f"{bastion.url}/register",
        json={
            "client_name": "plain agent",
            "grant_types": ["client_credentials"],
            "token_endpoint_auth_method": "client_secret_basic",
            "scope": SCOPES,
        },
        headers={"authorization": f"Bearer {INITIAL_TOKEN}"},
    ).json()
    response = present(bastion, plain, idp.id_jag(bastion, plain["client_id"]))
    assert response.status_code == 400 and response.json()["error"] == "unauthorized_client"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"issuers": [{"issuer": "http://idp.example.com"}]}, "https"),
        ({"issuers": [{"issuer": "https://idp.example.com", "algorithms": ["HS256"]}]}, "asym"),
        ({"issuers": [{"issuer": "https://idp.example.com", "users": "all"}]}, "users"),
        ({"issuers": [{"issuer": "https://idp.example.com", "audience": "x"}]}, "unknown key"),
        (
            {"issuers": [{"issuer": "https://idp.example.com", "user_prefix": "a\tb"}]},
            "user_prefix",
        ),
        ({"issuers": [{"issuer": "https://idp.example.com", "account_claim": ""}]}, "account"),
        ({"max_lifetime_seconds": 0}, "max_lifetime_seconds"),
        (
            {"issuers": [{"issuer": "https://idp.example.com", "tenants": "acme"}]},
            "tenants must be",
        ),
        ({"issuers": [{"issuer": "https://idp.example.com", "tenants": []}]}, "tenants must be"),
        (
            {"issuers": [{"issuer": "https://idp.example.com", "tenants": ["a", "a"]}]},
            "more than once",
        ),
        ({"issuers": [{"issuer": "https://idp.example.com", "tenants": [""]}]}, "tenants must be"),
        (
            {"issuers": [{"issuer": "https://idp.example.com", "tenants": ["a\nb"]}]},
            "tenants must be",
        ),
        (
            {"issuers": [{"issuer": "https://idp.example.com", "aud_tenant": ""}]},
            "aud_tenant must be",
        ),
        (
            {"issuers": [{"issuer": "https://idp.example.com", "aud_tenant": 7}]},
            "aud_tenant must be",
        ),
    ],
)
def test_a_wrong_id_jag_setting_names_its_key(tmp_path, table, message):
    with pytest.raises(SettingsError, match=message):
        OAuthSettings.from_mapping(
            {
                "issuer": "https://auth.example.com",
                "key_dir": str(tmp_path),
                "resources": [{"uri": "https://mcp.example.com/mcp", "scopes": ["a"]}],
                "id_jag": table,
            }
        )


@pytest.mark.parametrize(
    ("user_claim", "account_claim"), [("sub", "sub"), ("email", "sub"), ("uid", "uid")]
)
def test_an_unset_account_claim_binds_only_a_claim_a_provider_may_give_to_another(
    user_claim, account_claim
):
    """Unset, ``account_claim`` is ``sub`` for a ``user_claim`` a provider may give to another
    person (an address, a login name), and the ``user_claim`` itself (nothing bound) for one that
    names an account for good: an existing configuration by ``uid`` keeps working."""
    table = {"issuers": [{"issuer": "https://idp.example.com", "user_claim": user_claim}]}
    assert IdJagSettings.from_mapping(table).issuers[0].account_claim == account_claim
