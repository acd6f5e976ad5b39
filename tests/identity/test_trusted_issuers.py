"""Access tokens from trusted issuers: a test identity provider (a real HTTP server in this file,
serving OpenID Connect Discovery, RFC 8414 metadata, a JWKS and RFC 7662 introspection, signing
real JWTs) whose tokens call bastion's gateway with the official MCP SDK client, decided as the
user, agent and scopes their claims map to; and every way such a token must be refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
import uuid
from functools import partial

import anyio
import httpx
import httpx2
import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey
from mcp.client.client import Client as McpClient
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from bastion.facts.model import Entity
from bastion.gateway.config import GatewayConfig
from bastion.identity.trusted_issuers import TrustedIssuers, parse_trusted_issuers
from bastion.oauth import registration
from bastion.oauth.errors import InvalidToken
from bastion.oauth.users import create_user
from bastion.policy.parser import parse_fact
from bastion.server.config import ConfigError
from tests.clock import ManualClock
from tests.gateway.streams import (
    listening_to_tools,
    modern_headers,
    modern_request,
    post_in_background,
    traced,
)
from tests.gateway.support import PASSWORD, start
from tests.oauth.support import ANY_KID, free_socket, serve, signed_text
from tests.waits import PATIENCE

INTROSPECTION_ID, INTROSPECTION_SECRET = "bastion-rs", "s3cret-for-tests"
ENVELOPE = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
}
HEADERS = {
    "content-type": "application/json",
    "accept": "application/json",  # JSON however long it takes (httpx's */* takes events)
    "mcp-protocol-version": "2026-07-28",
    "mcp-method": "tools/call",
    "mcp-name": "search_customers",
}
CALL = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "tools/call",
    "params": {"name": "search_customers", "arguments": {"query": "a"}, "_meta": ENVELOPE},
}


class TestIssuer:
    """An identity provider for the tests. Issuer ``a`` is found by OpenID Connect Discovery;
    ``b`` by RFC 8414 metadata, which also names its introspection endpoint."""

    __test__ = False

    def __init__(self) -> None:
        self.keys = {"k1": ECKey.generate_key("P-256", parameters={"kid": "k1"})}
        self.published = ["k1"]
        self.inactive: set[str] = set()  # jtis introspection reports as not active
        # jti -> the introspection answer, as it is sent (bytes: its JSON text as they are)
        self.answers: dict[str, object] = {}
        self.introspections = 0
        self.url = ""
        self.app = Starlette(
            routes=[
                Route("/a/.well-known/openid-configuration", self.discovery),
                Route("/.well-known/oauth-authorization-server/b", self.rfc8414),
                # Issuer f's discovery document names another issuer: not its metadata.
                Route("/f/.well-known/openid-configuration", self.discovery),
                # Issuer m's discovery document names jwks_uri twice.
                Route("/m/.well-known/openid-configuration", self.discovery_naming_twice),
                Route("/jwks", self.jwks),
                Route("/big-jwks", self.big_jwks),
                Route("/introspect", self.introspect, methods=["POST"]),
                Route("/endless-introspect", self.endless_introspect, methods=["POST"]),
            ]
        )

    def issuer(self, name: str) -> str:
        return f"{self.url}/{name}"

    async def discovery(self, request: Request) -> Response:
        return JSONResponse({"issuer": self.issuer("a"), "jwks_uri": f"{self.url}/jwks"})

    async def discovery_naming_twice(self, request: Request) -> Response:
        # A reader that keeps the first value fetches the first key set, one that keeps the
        # last the second: which keys verify the issuer's tokens depends on the parser.
        text = (
            f'{{"issuer": "{self.issuer("m")}", "jwks_uri": "{self.url}/elsewhere",'
            f' "jwks_uri": "{self.url}/jwks"}}'
        )
        return Response(text, media_type="application/json")

    async def rfc8414(self, request: Request) -> Response:
        return JSONResponse(
            {
                "issuer": self.issuer("b"),
                "jwks_uri": f"{self.url}/jwks",
                "introspection_endpoint": f"{self.url}/introspect",
            }
        )

    async def jwks(self, request: Request) -> Response:
        keys = [self.keys[kid].as_dict(private=False) for kid in self.published]
        return JSONResponse({"keys": keys})

    async def big_jwks(self, request: Request) -> Response:
        key = self.keys["k1"].as_dict(private=False)
        return JSONResponse({"keys": [key], "padding": "x" * 100_000})

    async def endless_introspect(self, request: Request) -> Response:
        async def endless():
            yield b'{"active": true, "padding": "'
            while True:
                yield b"x" * 65536
                await anyio.sleep(0)

        return StreamingResponse(endless(), media_type="application/json")

    async def introspect(self, request: Request) -> Response:
        expected = base64.b64encode(f"{INTROSPECTION_ID}:{INTROSPECTION_SECRET}".encode())
        if request.headers.get("authorization") != f"Basic {expected.decode()}":
            return JSONResponse({"error": "invalid_client"}, status_code=401)
        self.introspections += 1
        token = (await request.form())["token"]
        claims = json.loads(_b64decode(token.split(".")[1]))
        if claims["jti"] in self.answers:
            answer = self.answers[claims["jti"]]
            if isinstance(answer, bytes):
                return Response(answer, media_type="application/json")
            return JSONResponse(answer)
        return JSONResponse({"active": claims["jti"] not in self.inactive})

    def token(
        self,
        issuer: str = "a",
        *,
        kid: object = "k1",
        key=None,
        typ: str | None = "at+jwt",
        **claims,
    ) -> str:
        now = int(time.time())
        body = {
            "iss": self.issuer(issuer) if "://" not in issuer else issuer,
            "sub": "sam",
            "aud": f"api://desk-{issuer}",
            "client_id": "helpdesk-agent",
            "scope": "customers:read",
            "iat": now,
            "exp": now + 300,
            "jti": uuid.uuid4().hex,
            **claims,
        }
        body = {k: v for k, v in body.items() if v is not None}
        header = {"alg": "ES256", "kid": kid}
        if typ:
            header["typ"] = typ
        return jwt.encode(header, body, key or self.keys[kid], registry=ANY_KID)


def _b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def idp():
    issuer = TestIssuer()
    with serve(issuer.app, free_socket()) as url:
        issuer.url = url
        yield issuer


@pytest.fixture(scope="module")
def dead_url():
    """A loopback port that refuses connections (bound, never listening)."""
    sock = free_socket()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


@pytest.fixture(scope="module")
def bastion(tmp_path_factory, idp, dead_url):
    trusted = [
        {
            "issuer": idp.issuer("a"),
            "audiences": {"deskhttp": "api://desk-a"},
            "jwks_refetch_seconds": 1,
        },
        {
            "issuer": idp.issuer("b"),
            "audiences": {"deskhttp": "api://desk-b"},
            "introspection_client_id": INTROSPECTION_ID,
            # From the environment, as docs/identity.md writes it: the provider refuses
            # anything but the variable's value.
            "introspection_client_secret": "${BASTION_TEST_INTROSPECTION_SECRET}",
            "introspection_cache_seconds": 1,
            "require_typ": True,
        },
        {
            "issuer": idp.issuer("c"),
            "jwks_uri": f"{idp.url}/jwks",
            "audiences": {"deskhttp": "api://desk-c"},
            "introspection_endpoint": f"{dead_url}/introspect",
            "introspection_client_id": INTROSPECTION_ID,
            "introspection_client_secret": INTROSPECTION_SECRET,
        },
        {
            "issuer": idp.issuer("g"),
            "jwks_uri": f"{idp.url}/jwks",
            "audiences": {"deskhttp": "api://desk-g"},
            "introspection_endpoint": f"{idp.url}/endless-introspect",
            "introspection_client_id": INTROSPECTION_ID,
            "introspection_client_secret": INTROSPECTION_SECRET,
            "max_document_bytes": 4096,
        },
        {"issuer": f"{dead_url}/d", "audiences": {"deskhttp": "api://desk-d"}},
        {"issuer": idp.issuer("f"), "audiences": {"deskhttp": "api://desk-f"}},
        {"issuer": idp.issuer("m"), "audiences": {"deskhttp": "api://desk-m"}},
        {
            "issuer": idp.issuer("h"),
            "jwks_uri": f"{idp.url}/jwks",
            "audiences": {"deskhttp": "api://desk-h"},
            "user_claim": "email",
        },
        # Entra ID's way: sub is pairwise per API app, oid the person's for good.
        {
            "issuer": idp.issuer("o"),
            "jwks_uri": f"{idp.url}/jwks",
            "audiences": {"deskhttp": "api://desk-o"},
            "user_claim": "preferred_username",
            "account_claim": "oid",
        },
        {
            "issuer": idp.issuer("p"),
            "jwks_uri": f"{idp.url}/jwks",
            "audiences": {"deskhttp": "api://desk-p"},
            "user_prefix": "corp:",  # its users are not bastion's local users of the same name
        },
        {
            "issuer": idp.issuer("e"),
            "jwks_uri": f"{idp.url}/big-jwks",
            "audiences": {"labhttp": "api://lab-e"},
            "max_document_bytes": 4096,
        },
        {
            "issuer": idp.issuer("l"),
            "jwks_uri": f"{idp.url}/jwks",
            "audiences": {"labhttp": "api://lab-l"},
        },
    ]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("BASTION_TEST_INTROSPECTION_SECRET", INTROSPECTION_SECRET)
        with start(tmp_path_factory.mktemp("issuers"), gateway={"trusted_issuers": trusted}) as b:
            yield b


def call(bastion, token: str, server: str = "deskhttp") -> httpx.Response:
    return bastion.http.post(
        bastion.mcp_url(server), json=CALL, headers={**HEADERS, "authorization": f"Bearer {token}"}
    )


def refused(response: httpx.Response, status: int = 401) -> str:
    assert response.status_code == status, response.text
    if status == 401:
        assert response.json()["error"] == "invalid_token"
        assert "invalid_token" in response.headers["www-authenticate"]
    return response.json()["error_description"]


def sdk(bastion, token: str, script, mode: str = "auto") -> dict:
    """The official MCP SDK client, the trusted issuer's token sent as its Authorization."""
    seen: dict = {}

    async def main() -> None:
        headers = {"authorization": f"Bearer {token}"}
        async with (
            httpx2.AsyncClient(headers=headers, timeout=20) as http,
            McpClient(
                streamable_http_client(bastion.mcp_url("deskhttp"), http_client=http), mode=mode
            ) as client,
        ):
            await script(client, seen)

    anyio.run(main)
    return seen


# -- accepted, and decided as the mapped user, agent and scopes ---------------------------------


@pytest.mark.parametrize("mode", ["legacy", "auto"])
def test_a_trusted_issuers_token_is_decided_as_its_user_and_agent(bastion, idp, mode):
    async def script(client, seen):
        seen["search"] = await client.call_tool("search_customers", {"query": "a"})
        try:
            await client.call_tool("delete_customer", {"customer_id": "c-100"})
        except MCPError as e:
            seen["delete_error"] = e

    seen = sdk(bastion, idp.token("a", sub="sam"), script, mode)
    customers = json.loads(seen["search"].content[0].text)["customers"]
    # sam is no admin of desk: the policy's mask applies to this token's user as to bastion's.
    assert customers and {c["email"] for c in customers} == {"[masked]"}
    decision_id = seen["delete_error"].error.data["decision_id"]
    bastion.flush()
    record = bastion.records.get(decision_id)
    assert record.result == "deny"
    assert record.principals[0] == 'User{"sam"}'
    assert record.principals[1] == 'Agent{"helpdesk-agent"}'


def test_an_admins_token_sees_emails(bastion, idp):
    async def script(client, seen):
        seen["search"] = await client.call_tool("search_customers", {"query": "a"})

    seen = sdk(bastion, idp.token("a", sub="avery"), script)
    customers = json.loads(seen["search"].content[0].text)["customers"]
    assert all(c["email"].endswith("@example.com") for c in customers)


def test_the_agent_claim_maps_to_the_agent_the_policy_may_block(bastion, idp):
    bastion.apply(inserts=[("blocked", Entity("Agent", "rogue"))])
    body = call(bastion, idp.token("a", client_id="rogue")).json()
    assert body["error"]["data"]["reason"] == "not_permitted"
    # azp names the agent when client_id is absent (OpenID Connect style).
    body = call(bastion, idp.token("a", client_id=None, azp="rogue")).json()
    assert body["error"]["data"]["reason"] == "not_permitted"
    assert "error" not in call(bastion, idp.token("a", client_id=None, azp="fine")).json()
    # No claim naming an agent: refused outright.
    assert "agent" in refused(call(bastion, idp.token("a", client_id=None)))


def test_a_providers_user_cannot_take_the_name_of_one_of_bastions_clients(bastion, idp):
    """A subject that is the id of one of bastion's clients is the User{<client id>} of that
    agent acting as itself (client credentials): a provider's person of that name would share
    its roles and state. Refused on every call, as a disabled user is."""
    client_id = bastion.register("customers:read").client_id
    for token in (
        idp.token("a", sub=client_id),
        idp.token("a", sub=client_id, client_id=client_id),  # "itself", under bastion's id
    ):
        assert "is the id of a client" in refused(call(bastion, token))


def test_a_user_or_an_agent_longer_than_any_index_takes_is_refused(bastion, idp):
    """The user and the agent a token names are stored in indexed columns (a refusal burst's
    alert, an approval): PostgreSQL indexes no entry over 2,704 bytes, so an alert for a `sub`
    of 3,000 characters was never stored. They are bounded where the token is read."""
    assert "longer than 255" in refused(call(bastion, idp.token("a", sub="s" * 256)))
    assert "longer than 1024" in refused(call(bastion, idp.token("a", client_id="c" * 1025)))
    assert "longer than 1024" in refused(
        call(bastion, idp.token("a", client_id=None, azp="c" * 1025))
    )
    # Counted in UTF-8 bytes: 257 emoji are 1,028 (and 3,084 characters in a fact's key).
    assert "longer than 1024 bytes" in refused(
        call(bastion, idp.token("a", client_id="\N{GRINNING FACE}" * 257))
    )
    # At the bounds, the token is taken: the call is decided (this user has no grant).
    answer = call(bastion, idp.token("a", sub="s" * 255, client_id="c" * 1024))
    assert answer.status_code == 200, answer.text
    assert answer.json()["error"]["data"]["reason"] == "not_permitted"


@pytest.mark.parametrize("verified", [None, False, "true"])
def test_an_email_the_issuer_does_not_vouch_for_names_no_user(bastion, idp, verified):
    """With ``user_claim = "email"`` the address must be one the issuer verified
    (``email_verified`` true): otherwise it is what somebody typed, perhaps another's address."""
    token = idp.token("h", sub="typed-7", email="avery@corp.example", email_verified=verified)
    assert "email_verified is not true" in refused(call(bastion, token))
    # Vouched for, the address names the user and the call is decided (this user has no grant).
    token = idp.token("h", sub="typed-7", email="avery@corp.example", email_verified=True)
    answer = call(bastion, token)
    assert answer.status_code == 200, answer.text
    assert answer.json()["error"]["data"]["reason"] == "not_permitted"


def test_scopes_come_from_scope_or_scp_and_drive_step_up(bastion, idp):
    delete = {
        **CALL,
        "params": {
            "name": "delete_customer",
            "arguments": {"customer_id": "c-1"},
            "_meta": ENVELOPE,
        },
    }
    headers = {**HEADERS, "mcp-name": "delete_customer"}

    def delete_with(token: str) -> httpx.Response:
        auth = {"authorization": f"Bearer {token}"}
        return bastion.http.post(
            bastion.mcp_url("deskhttp"), json=delete, headers={**headers, **auth}
        )

    # destructiveHint needs customers:write: a token without it is asked to step up (403).
    response = delete_with(idp.token("a", sub="avery"))
    assert response.status_code == 403, response.text
    assert "insufficient_scope" in response.headers["www-authenticate"]
    # Entra ID and Okta send scopes as scp, a list (or a space-separated string).
    for scp in (["customers:read", "customers:write"], "customers:read customers:write"):
        token = idp.token("a", sub="avery", scope=None, scp=scp)
        response = delete_with(token)
        assert response.status_code == 200, response.text
        assert "deleted c-1" in response.text


def test_the_resource_metadata_lists_the_issuers_of_each_server(bastion, idp, dead_url):
    servers = bastion.http.get(f"{bastion.url}/.well-known/oauth-protected-resource/mcp/deskhttp")
    assert servers.json()["authorization_servers"] == [
        bastion.url,
        idp.issuer("a"),
        idp.issuer("b"),
        idp.issuer("c"),
        idp.issuer("g"),
        f"{dead_url}/d",
        idp.issuer("f"),
        idp.issuer("m"),
        idp.issuer("h"),
        idp.issuer("o"),
        idp.issuer("p"),
    ]
    lab = bastion.http.get(f"{bastion.url}/.well-known/oauth-protected-resource/mcp/labhttp")
    assert lab.json()["authorization_servers"] == [bastion.url, idp.issuer("e"), idp.issuer("l")]
    desk = bastion.http.get(f"{bastion.url}/.well-known/oauth-protected-resource/mcp/desk")
    assert desk.json()["authorization_servers"] == [bastion.url]


def test_bastions_own_tokens_still_work_next_to_trusted_issuers(bastion):
    assert "error" not in call(bastion, bastion.token("sam", "deskhttp")).json()


def test_bastions_introspection_answers_only_for_its_own_tokens(bastion, idp):
    """RFC 7662 introspection is of the tokens this server issued: a trusted issuer's token the
    gateway accepts is not one, and is answered inactive (its issuer answers for it)."""
    oauth = bastion.app.state.oauth
    values = registration.validate_client_metadata(
        {
            "client_name": "resource server",
            "token_endpoint_auth_method": "client_secret_basic",
            "grant_types": ["client_credentials"],
        },
        oauth.settings,
    )
    made = registration.new_client(
        values, source="admin", now=time.time(), introspection_resources=("*",)
    )
    oauth.store.save_client(made.client)
    auth = (made.client.client_id, made.client_secret)
    theirs = idp.token("a", sub="sam", amr=["mfa"])
    assert "error" not in call(bastion, theirs).json()  # accepted by the gateway

    def introspect(token: str) -> dict:
        answer = bastion.http.post(f"{bastion.url}/introspect", data={"token": token}, auth=auth)
        assert answer.status_code == 200, answer.text
        return answer.json()

    assert introspect(theirs) == {"active": False}
    assert introspect(bastion.token("sam", "deskhttp"))["active"] is True


# -- refused -----------------------------------------------------------------------------------


def test_a_token_for_another_audience_is_refused(bastion, idp):
    assert "api://desk-a" in refused(call(bastion, idp.token("a", aud="api://elsewhere")))
    # Issuer b's audience for the same server is not issuer a's.
    assert "not for" in refused(call(bastion, idp.token("a", aud="api://desk-b")))
    # A server the issuer is not configured for accepts none of its tokens.
    assert "not accepted for server" in refused(call(bastion, idp.token("a"), "labhttp"))


def test_an_expired_or_not_yet_valid_token_is_refused(bastion, idp):
    now = int(time.time())
    assert "expired" in refused(call(bastion, idp.token("a", iat=now - 900, exp=now - 600)))
    assert "nbf" in refused(call(bastion, idp.token("a", nbf=now + 600)))
    assert "future" in refused(call(bastion, idp.token("a", iat=now + 600)))
    assert "exp" in refused(call(bastion, idp.token("a", exp=None)))
    # Not numbers, though Python's own reader takes them as such: an exp of NaN is never past,
    # true is 1. A payload holding NaN is not JSON: refused as the claims are read, naming the
    # place (refused() checks the 401 and invalid_token).
    assert "exp: NaN" in refused(call(bastion, idp.token("a", exp=float("nan"))))
    assert "exp: Infinity" in refused(call(bastion, idp.token("a", exp=float("inf"))))
    assert "nbf" in refused(call(bastion, idp.token("a", nbf=True)))
    assert "exp" in refused(call(bastion, idp.token("a", exp=True)))


def _claims_text(idp, **claims) -> str:
    """The JSON text of a token's claims as `TestIssuer.token` makes them, without the braces."""
    return json.dumps(json.loads(_b64decode(idp.token("a", **claims).split(".")[1])))[1:-1]


def test_a_token_that_names_a_claim_twice_is_refused(bastion, idp):
    """``{"sub": "sam", ..., "sub": "avery"}``, signed by the issuer: a reader that keeps the
    first value (a proxy, a log, the issuer's own) sees sam, one that keeps the last avery, an
    admin. RFC 7519 §4 lets a JWT parser refuse it, and bastion does, naming the claim."""
    header = '{"alg": "ES256", "kid": "k1", "typ": "at+jwt"}'
    token = signed_text(idp.keys["k1"], header, "{" + _claims_text(idp) + ', "sub": "avery"}')
    described = refused(call(bastion, token))
    assert "'sub' twice" in described, described


@pytest.mark.parametrize(
    ("header", "member"),
    [
        ('{"alg": "ES256", "kid": "k1", "typ": "at+jwt", "kid": "k-unpublished"}', "kid"),
        ('{"alg": "none", "kid": "k1", "typ": "at+jwt", "alg": "ES256"}', "alg"),
        ('{"alg": "ES256", "kid": "k1", "typ": "JWT", "typ": "at+jwt"}', "typ"),
    ],
)
def test_a_token_whose_header_names_a_member_twice_is_refused(bastion, idp, header, member):
    """A JOSE header read one way by bastion and another by joserfc (or by whoever else reads
    the token) is refused before any key is looked up (RFC 7515 §5.2)."""
    token = signed_text(idp.keys["k1"], header, "{" + _claims_text(idp) + "}")
    described = refused(call(bastion, token))
    assert f"'{member}' twice" in described and "header" in described, described


def test_a_token_whose_claims_bastion_would_drop_is_refused(bastion, idp):
    """An actor (RFC 8693 ``act``) would be left out of the chain every call is decided for, and
    RFC 9396 details narrow the scope bastion would grant whole: refused, not ignored."""
    assert "(act)" in refused(call(bastion, idp.token("a", act={"sub": "another-agent"})))
    details = [{"type": "customer_access", "locations": ["eu"]}]
    assert "authorization_details" in refused(
        call(bastion, idp.token("a", authorization_details=details))
    )
    assert "error" not in call(bastion, idp.token("a", authorization_details=[])).json()
    # A confirmation bastion cannot check beside the DPoP key's (RFC 8705's certificate): taken
    # with the DPoP proof alone, the certificate binding would be dropped.
    both = {"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I", "x5t#S256": "bwcK0esc3ACC3DB2Y"}
    assert "cnf" in refused(call(bastion, idp.token("a", cnf=both)))


def test_a_remembered_token_is_refused_once_it_expires(idp):
    """A verified token is remembered so its next calls skip the signature; the memory does
    not outlive the token: past exp and the leeway it is refused, as a new token would be."""
    clock = ManualClock(int(time.time()))
    issuers = parse_trusted_issuers(
        [{"issuer": idp.issuer("a"), "audiences": {"deskhttp": "api://desk-a"}}], {"deskhttp"}, {}
    )
    trusted = TrustedIssuers(issuers, clock=clock)
    token = idp.token("a", exp=clock.now + 60)
    verify = partial(trusted.verify, token, "deskhttp")
    assert anyio.run(verify).claims["sub"] == "sam"
    clock.now += 60 + issuers[0].leeway_seconds  # the last second it may be used
    assert anyio.run(verify).claims["sub"] == "sam"
    clock.now += 1
    with pytest.raises(InvalidToken, match="expired"):
        anyio.run(verify)


def test_a_trusted_issuers_dpop_bound_token_is_not_taken_as_a_bearer_token(bastion, idp):
    # RFC 9449 §7.1: whoever issued it, a token bound to a key needs a proof of that key.
    bound = idp.token("a", cnf={"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"})
    assert "DPoP" in refused(call(bastion, bound))
    assert "cnf" in refused(call(bastion, idp.token("a", cnf={"x5t#S256": "abc"})))


def test_a_token_of_an_issuer_not_configured_is_refused(bastion, idp):
    # Signed by a key the configured issuers publish, but naming an issuer nobody trusts.
    stranger = idp.token("a", iss=idp.issuer("z"), aud="api://desk-a")
    refused(call(bastion, stranger))
    other = idp.token("a", iss="https://evil.example.com", aud="api://desk-a")
    refused(call(bastion, other))


def test_a_kid_not_in_the_jwks_is_refused(bastion, idp):
    unpublished = ECKey.generate_key("P-256", parameters={"kid": "k-unpublished"})
    token = idp.token("a", kid="k-unpublished", key=unpublished)
    assert "kid" in refused(call(bastion, token))
    # The right kid with another key's signature.
    forged = idp.token("a", key=ECKey.generate_key("P-256", parameters={"kid": "k1"}))
    assert "signature" in refused(call(bastion, forged))


def test_a_kid_that_is_not_a_string_is_refused(bastion, idp):
    token = idp.token("a", kid=["k1"], key=idp.keys["k1"])
    assert "the header's kid is not a string" in refused(call(bastion, token))


def test_alg_none_and_hmac_keyed_with_the_public_key_are_refused(bastion, idp):
    claims = json.loads(_b64decode(idp.token("a").split(".")[1]))
    payload = _b64(json.dumps(claims).encode())
    none = f"{_b64(json.dumps({'alg': 'none', 'kid': 'k1'}).encode())}.{payload}."
    assert "alg" in refused(call(bastion, none))
    public = idp.keys["k1"].as_pem(private=False)
    header = _b64(json.dumps({"alg": "HS256", "kid": "k1", "typ": "at+jwt"}).encode())
    mac = hmac.new(public, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    assert "alg" in refused(call(bastion, f"{header}.{payload}.{_b64(mac)}"))


def test_a_token_claiming_bastions_issuer_signed_by_another_key_is_refused(bastion, idp):
    resource = bastion.mcp_url("deskhttp")
    token = idp.token("a", iss=bastion.url, aud=resource)
    refused(call(bastion, token))
    # Nor can a trusted issuer's token slip in under bastion's issuer with a bastion-like kid.
    own_kid = json.loads(_b64decode(bastion.token("sam", "deskhttp").split(".")[0]))["kid"]
    key = ECKey.generate_key("P-256", parameters={"kid": own_kid})
    refused(call(bastion, idp.token("a", iss=bastion.url, aud=resource, kid=own_kid, key=key)))


def test_bastions_issuer_cannot_be_configured_as_a_trusted_issuer(tmp_path, idp):
    with (
        pytest.raises(ConfigError, match="bastion's own issuer"),
        start(
            tmp_path,
            gateway={
                "trusted_issuers": [
                    {"issuer": "http://127.0.0.1:1", "audiences": {"deskhttp": "x"}}
                ]
            },
            oauth={"issuer": "http://127.0.0.1:1"},
        ),
    ):
        pass


def test_typ_is_required_only_where_configured(bastion, idp):
    assert "error" not in call(bastion, idp.token("a", typ=None)).json()
    assert "typ" in refused(call(bastion, idp.token("b", typ=None)))
    assert "error" not in call(bastion, idp.token("b", typ="at+jwt")).json()
    # A media type (RFC 7515 §4.1.9): without case, application/ written or not.
    assert "error" not in call(bastion, idp.token("b", typ="application/AT+JWT")).json()
    for other in ("JWT", "application/at+jwt; x=1", "text/at+jwt"):
        assert "typ" in refused(call(bastion, idp.token("b", typ=other)))


# -- bastion's disabled users ---------------------------------------------------------------------


def users_command(bastion, command: str, username: str) -> None:
    """`bastion users <command>`, run as an administrator would: another process."""
    done = subprocess.run(
        [sys.executable, "-m", "bastion.cli", "users", command, username, "--database",
         bastion.app.state.oauth.store.db.url],
        capture_output=True, text=True, env=os.environ, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def users_disable(bastion, username: str) -> None:
    users_command(bastion, "disable", username)


def test_a_user_bastion_has_disabled_is_refused_on_the_next_call(bastion, idp):
    """The provider's token is valid until it expires; a user disabled in bastion (who holds no
    grant of bastion's to revoke) is refused all the same, on the next call."""
    create_user(bastion.app.state.oauth.store, "lee", PASSWORD, time.time(), actor="test")
    token = idp.token("a", sub="lee")
    for _ in range(3):
        assert call(bastion, token).status_code == 200  # the token is taken (the policy decides)

    users_disable(bastion, "lee")

    assert "'lee' is disabled" in refused(call(bastion, token))
    assert "'lee' is disabled" in refused(call(bastion, idp.token("a", sub="lee")))
    refusals = [
        e
        for e in bastion.app.state.oauth.verifier.audit.events("token.refused")
        if e.detail.get("reason") == "disabled"
    ]
    assert refusals, "the refusal was not audited"
    # Other users, and users bastion does not hold (the provider's to vouch for), are served.
    assert "error" not in call(bastion, idp.token("a", sub="sam")).json()
    assert call(bastion, idp.token("a", sub="not-a-user-of-bastion")).status_code == 200


def test_a_call_under_way_when_its_user_is_disabled_is_stopped(bastion, idp):
    """A user disabled in bastion refuses a trusted issuer's token on its next call; a call of
    theirs already at its upstream ran on, and its result reached the agent. Now the user's
    standing changing (`USERS_CHANGED`, which tokens of trusted issuers rest on: they have no
    grant of bastion's to revoke) has each such call's token checked again, and the call is
    cancelled at its upstream and answered 401 invalid_token. Another user's call goes on."""
    create_user(bastion.app.state.oauth.store, "rue", PASSWORD, time.time(), actor="test")
    member = parse_fact('has_role(User{"rue"}, "member", Team{"support"})')
    bastion.apply(inserts=[member])
    try:
        tag, kept = uuid.uuid4().hex, uuid.uuid4().hex

        def waiting(sub: str, tag: str, seconds: float, request_id: int) -> dict:
            token = idp.token("l", sub=sub, aud="api://lab-l")
            headers = {**modern_headers(token, "tools/call", "wait"), "accept": "application/json"}
            wait = {"name": "wait", "arguments": {"seconds": seconds, "tag": tag}}
            return post_in_background(
                bastion, "labhttp", headers, modern_request(request_id, "tools/call", wait)
            )

        answer, untouched = waiting("rue", tag, 30, 1), waiting("sam", kept, 1.5, 2)
        assert traced(bastion, "wait-started", tag) and traced(bastion, "wait-started", kept)
        bastion.app.state.oauth.store.disable_user("rue", time.time(), actor="test")
        assert traced(bastion, "wait-cancelled", tag)
        answer["thread"].join(PATIENCE)
        assert answer["status"] == 401, answer
        assert "'rue' is disabled" in json.loads(answer["text"])["error_description"]
        untouched["thread"].join(PATIENCE)
        assert untouched["status"] == 200 and "waited 1.5s" in untouched["text"], untouched
    finally:
        bastion.apply(deletes=[member])


def test_a_stream_open_when_its_user_is_disabled_ends(bastion, idp):
    """A revocation ends the streams of the grant it names; a trusted issuer's token rests on no
    grant of bastion's, so its user disabled left its stream open (relaying nothing) until its
    next notification. Now the user's standing changing has each such stream's token checked
    again, and the disabled user's stream ends at once; another user's stays."""
    store = bastion.app.state.oauth.store
    create_user(store, "ria", PASSWORD, time.time(), actor="test")
    member = parse_fact('has_role(User{"ria"}, "member", Team{"support"})')
    bastion.apply(inserts=[member])
    try:
        token = idp.token("l", sub="ria", aud="api://lab-l")
        other = idp.token("l", sub="sam", aud="api://lab-l")
        with (
            listening_to_tools(bastion, token) as frames,
            listening_to_tools(bastion, other),
        ):
            store.disable_user("ria", time.time(), actor="test")
            assert list(frames) == []  # ended (a client read timeout would fail the test)
            listeners = bastion.app.state.gateway.sessions.listeners_of("labhttp")
            assert [listener.token for listener in listeners] == [other]
    finally:
        bastion.apply(deletes=[member])


def test_a_user_prefix_keeps_the_issuers_users_apart_from_bastions_own(bastion, idp):
    """Without ``user_prefix`` the issuer's ``sub`` "quinn" is bastion's local user "quinn",
    another realm's person; with ``user_prefix = "corp:"`` it is ``User{"corp:quinn"}``, which
    the local user's roles and standing do not reach."""
    create_user(bastion.app.state.oauth.store, "quinn", PASSWORD, time.time(), actor="test")
    users_disable(bastion, "quinn")
    assert "'quinn' is disabled" in refused(call(bastion, idp.token("a", sub="quinn")))
    body = call(bastion, idp.token("p", sub="quinn")).json()
    bastion.flush()
    record = bastion.records.get(body["error"]["data"]["decision_id"])
    assert record.principals[0] == 'User{"corp:quinn"}'
    # An agent acting as itself (sub = its client id) keeps the agent's name: its owners bound it.
    body = call(bastion, idp.token("p", sub="quinn-build", client_id="quinn-build")).json()
    bastion.flush()
    record = bastion.records.get(body["error"]["data"]["decision_id"])
    assert record.principals[:2] == ('User{"quinn-build"}', 'Agent{"quinn-build"}')
    # The prefixed name is the one bastion holds a standing for.
    create_user(bastion.app.state.oauth.store, "corp:quinn", PASSWORD, time.time(), actor="test")
    users_disable(bastion, "corp:quinn")
    assert "'corp:quinn' is disabled" in refused(call(bastion, idp.token("p", sub="quinn")))


def test_a_providers_agent_acting_as_itself_cannot_take_the_name_of_one_of_bastions_users(
    bastion, idp
):
    """An agent acting as itself (``sub`` = its client id) is ``User{"<client id>"}`` without the
    issuer's ``user_prefix``: a provider's client registered as "wren" would be bastion's person
    wren, with her roles, label sets and per-user upstream connections (her own token toward a
    ``per_user`` upstream sent on the agent's calls). Refused on every call, as a person named
    like one of bastion's clients is, whichever prefix the issuer has; also when the person is
    made after the token was first taken."""
    token = idp.token("p", sub="wren", client_id="wren")
    assert call(bastion, token).status_code == 200  # no such person yet: an agent like any
    create_user(bastion.app.state.oauth.store, "wren", PASSWORD, time.time(), actor="test")
    for refused_token in (
        token,
        idp.token("p", sub="wren", client_id="wren"),
        idp.token("a", sub="wren", client_id="wren"),  # no prefix: the same rule
    ):
        said = refused(call(bastion, refused_token))
        assert "names one of bastion's users" in said, said
    # wren herself, through an agent of the provider's, is served as before.
    body = call(bastion, idp.token("a", sub="wren")).json()
    bastion.flush()
    record = bastion.records.get(body["error"]["data"]["decision_id"])
    assert record.principals[:2] == ('User{"wren"}', 'Agent{"helpdesk-agent"}')


def test_an_issuers_user_id_is_taken_as_written_even_one_that_reads_as_another(bastion, idp):
    """The issuer vouches for its ids, and bastion cannot tell whether it holds two people whose
    ids differ only in their Unicode spelling: ``аvery`` (a Cyrillic а) is served, never
    refused, and ``José`` in NFC and in NFD stay two users (one in NFC, they would share roles,
    standing and approvals). People read them apart: `bastion.names.readable` escapes the
    second spelling and the Cyrillic а."""
    principals = []
    for sub in ("\u0430very", "Jos\u00e9", "Jose\u0301"):
        body = call(bastion, idp.token("p", sub=sub)).json()
        bastion.flush()
        principals.append(bastion.records.get(body["error"]["data"]["decision_id"]).principals[0])
    assert principals == [
        'User{"corp:\u0430very"}',
        'User{"corp:Jos\u00e9"}',
        'User{"corp:Jose\u0301"}',
    ]


def test_a_user_named_by_email_stays_bound_to_its_first_sub_on_either_database(
    database_url, tmp_path, idp
):
    """With ``user_claim = "email"`` a person whose address changes at the issuer (``jo.doe@``
    to ``jo.roe@``) keeps the user of the old address: the issuer giving ``jo.doe@`` to a new
    hire (another ``sub``) does not give the new hire that user's grants, facts, approvals and
    upstream connections. Refused on every call, until an administrator unlinks the user; a
    token with no ``sub`` to bind is refused."""
    trusted = [
        {
            "issuer": idp.issuer("h"),
            "jwks_uri": f"{idp.url}/jwks",
            "audiences": {"deskhttp": "api://desk-h"},
            "user_claim": "email",
        }
    ]
    old, new = "jo.doe@corp.example", "jo.roe@corp.example"

    def token(sub: str | None, email: str) -> str:
        return idp.token("h", sub=sub, email=email, email_verified=True)

    with start(tmp_path, gateway={"trusted_issuers": trusted}, database=database_url) as b:
        assert call(b, token("jo-1", old)).status_code == 200
        assert call(b, token("jo-1", new)).status_code == 200  # the same person, renamed
        taken = token("new-hire-9", old)
        for _ in range(2):  # every call: a refused token is not remembered
            assert "belongs to another" in refused(call(b, taken))
        assert call(b, token("jo-1", old)).status_code == 200  # still theirs
        assert "'sub'" in refused(call(b, token(None, "nobody@corp.example")))
        users_command(b, "unlink", old)
        assert call(b, taken).status_code == 200  # released: the new person's now
        assert "belongs to another" in refused(call(b, token("jo-1", old)))
        assert "belongs to another" in refused(call(b, token("new-hire-9", new)))


def test_a_user_is_bound_to_the_account_claim_the_issuer_names(bastion, idp):
    """``account_claim = "oid"`` (Entra ID, whose ``sub`` is pairwise per API app): the user
    ``preferred_username`` names is bound to the first ``oid``, whatever the ``sub``; another
    ``oid`` is refused, and a token without one too."""

    def token(oid: str | None, sub: str) -> str:
        return idp.token("o", sub=sub, oid=oid, preferred_username="kai@corp.example")

    assert call(bastion, token("oid-1", "pairwise-app-1")).status_code == 200
    assert call(bastion, token("oid-1", "pairwise-app-2")).status_code == 200
    said = refused(call(bastion, token("oid-2", "pairwise-app-1")))
    assert "belongs to another account" in said and "another oid" in said, said
    assert "claim 'oid' is missing" in refused(call(bastion, token(None, "pairwise-app-1")))


def test_a_user_enabled_again_is_served_only_with_tokens_issued_after_the_disable(bastion, idp):
    """The provider's token from before the disable is still valid at the provider; bastion
    keeps refusing it once the user is enabled, and serves one issued after."""
    create_user(bastion.app.state.oauth.store, "rae", PASSWORD, time.time(), actor="test")
    before = idp.token("a", sub="rae")
    assert call(bastion, before).status_code == 200
    users_disable(bastion, "rae")
    users_command(bastion, "enable", "rae")

    assert "'rae' was revoked after this token was issued" in refused(call(bastion, before))
    after = idp.token("a", sub="rae", iat=int(time.time()) + 1)
    assert call(bastion, after).status_code == 200


def test_a_providers_agent_acting_as_itself_stops_while_its_owner_is_disabled(bastion, idp):
    """A provider's token for an agent acting as itself (its subject is its own client id) rests
    on no grant of bastion's to revoke: its owner's standing is checked on every call instead,
    from what this replica holds in memory."""
    from bastion.agents.identity import owner_fact

    create_user(bastion.app.state.oauth.store, "noor", PASSWORD, time.time(), actor="test")
    bastion.apply([owner_fact("noor-build-agent", "noor")])
    token = idp.token("a", sub="noor-build-agent", client_id="noor-build-agent")
    for_a_person = idp.token("a", sub="sam", client_id="noor-build-agent")
    assert call(bastion, token).status_code == 200
    users_disable(bastion, "noor")
    try:
        said = refused(call(bastion, token))
        person = call(bastion, for_a_person)
    finally:
        users_command(bastion, "enable", "noor")
    assert "'noor'" in said and "owner" in said and "disabled" in said
    # Acting for a person, the agent is that person's to bound, not its owner's.
    assert person.status_code == 200 and "error" not in person.json()
    # Enabled again, the owner's agent is served.
    assert call(bastion, token).status_code == 200


# -- revocation through introspection, and keys rotating ------------------------------------------


def test_introspection_saying_inactive_refuses_the_token_after_its_short_cache(bastion, idp):
    deadline = time.monotonic() + PATIENCE
    while True:
        # Three calls within the cache's second (introspection_cache_seconds): on a machine too
        # busy for that, a new token (another cache entry) is tried until they are.
        token, before, started = idp.token("b"), idp.introspections, time.time()
        for _ in range(3):
            assert "error" not in call(bastion, token).json()
        if time.time() < started + 1 or time.monotonic() > deadline:
            break
    assert idp.introspections == before + 1  # the answer is cached
    idp.inactive.add(json.loads(_b64decode(token.split(".")[1]))["jti"])
    time.sleep(1.1)  # past the cache's second: the next call asks again
    assert "not active" in refused(call(bastion, token))
    assert "not active" in refused(call(bastion, token))


@pytest.mark.parametrize(
    "answer",
    [{"active": "true"}, {"active": 1}, {"scope": "customers:read"}, [{"active": True}]],
    ids=["the string true", "the number 1", "no active", "not an object"],
)
def test_introspection_must_answer_active_true_exactly(bastion, idp, answer):
    # RFC 7662 §2.2: active is a boolean; anything but true is a token not active.
    token = idp.token("b")
    idp.answers[json.loads(_b64decode(token.split(".")[1]))["jti"]] = answer
    assert "not active" in refused(call(bastion, token))


def test_an_introspection_answer_naming_a_member_twice_fails_closed(bastion, idp):
    """``{"active": false, "active": true}``: a revoked token to a reader that keeps the first
    value, an active one to a reader that keeps the last (Python's json). Whether a revoked
    token is served may not depend on the parser (I-JSON, RFC 7493 §2.3): the answer is
    refused, naming the member, and the call is not served."""
    token = idp.token("b")
    idp.answers[json.loads(_b64decode(token.split(".")[1]))["jti"]] = (
        b'{"active": false, "active": true}'
    )
    response = call(bastion, token)
    assert response.status_code == 503, response.text
    described = response.json()["error_description"]
    assert "introspection endpoint" in described and "'active' twice" in described, described


def test_an_unreachable_introspection_endpoint_fails_closed(bastion, idp):
    response = call(bastion, idp.token("c"))
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "temporarily_unavailable"
    assert "introspection" in response.json()["error_description"]


def test_an_introspection_answer_past_its_cap_is_not_read_further(bastion, idp):
    # The endpoint answers without end: read no further than max_document_bytes, not until the
    # deadline (nor into memory whole before its size was checked).
    response = call(bastion, idp.token("g", aud="api://desk-g"))
    assert response.status_code == 503, response.text
    described = response.json()["error_description"]
    assert "more than 4096 bytes ([[gateway.trusted_issuers]] max_document_bytes)" in described


def test_an_issuer_whose_metadata_cannot_be_fetched_fails_closed(bastion, idp, dead_url):
    token = idp.token(f"{dead_url}/d", aud="api://desk-d")
    for _ in range(2):  # a failure is not remembered as an answer
        response = call(bastion, token)
        assert response.status_code == 503, response.text
        assert "openid-configuration" in response.json()["error_description"]


def test_metadata_naming_another_issuer_is_not_used(bastion, idp):
    response = call(bastion, idp.token("f"))
    assert response.status_code == 503, response.text
    assert "is not the metadata of" in response.json()["error_description"]


def test_metadata_naming_a_member_twice_is_not_used(bastion, idp):
    """Which key set verifies the issuer's tokens may not depend on which of two ``jwks_uri``
    a parser keeps (I-JSON, RFC 7493 §2.3): the document is refused whole."""
    response = call(bastion, idp.token("m", aud="api://desk-m"))
    assert response.status_code == 503, response.text
    described = response.json()["error_description"]
    assert "'jwks_uri' twice" in described, described


def test_a_key_set_larger_than_its_cap_is_not_read(bastion, idp):
    response = call(bastion, idp.token("e", aud="api://lab-e"), "labhttp")
    assert response.status_code == 503, response.text
    described = response.json()["error_description"]
    assert "more than 4096 bytes ([[gateway.trusted_issuers]] max_document_bytes)" in described


def test_a_rotated_key_is_fetched_when_a_token_names_its_new_kid(bastion, idp):
    assert "error" not in call(bastion, idp.token("a")).json()  # the key set is cached now
    idp.keys["k2"] = RSAKey.generate_key(2048, parameters={"kid": "k2"})
    idp.published = ["k2"]
    try:
        time.sleep(1.1)  # jwks_refetch_seconds
        token = jwt.encode(
            {"alg": "RS256", "kid": "k2", "typ": "at+jwt"},
            json.loads(_b64decode(idp.token("a").split(".")[1])),
            idp.keys["k2"],
        )
        assert "error" not in call(bastion, token).json()
    finally:
        idp.published = ["k1"]


def test_the_configuration_refuses_unknown_keys_and_symmetric_algorithms():
    base = {"name": "desk", "url": "http://127.0.0.1:9/mcp"}

    def config(**issuer):
        table = {"issuer": "https://idp.example.com", "audiences": {"desk": "api://desk"}}
        return {"upstreams": [base], "trusted_issuers": [{**table, **issuer}]}

    assert GatewayConfig.from_mapping(config()).trusted_issuers[0].user_claim == "sub"
    with pytest.raises(ConfigError, match="unknown key gateway.trusted_issuers\\[0\\].audience"):
        GatewayConfig.from_mapping(config(audience="x"))
    for algorithms in (["HS256"], ["none"], ["RS256", "HS512"]):
        with pytest.raises(ConfigError, match="asymmetric"):
            GatewayConfig.from_mapping(config(algorithms=algorithms))
    with pytest.raises(ConfigError, match="not a gateway upstream"):
        GatewayConfig.from_mapping(config(audiences={"nowhere": "x"}))
    with pytest.raises(ConfigError, match="https"):
        GatewayConfig.from_mapping(config(issuer="http://idp.example.com"))
    with pytest.raises(ConfigError, match="both"):
        GatewayConfig.from_mapping(config(introspection_client_id="x"))
    assert GatewayConfig.from_mapping(config()).trusted_issuers[0].account_claim == "sub"
    # Unset, a user_claim an issuer may give to another person is bound to sub; one that names
    # an account for good (Entra's oid) is bound to nothing new: a configuration of before the
    # binding, several API apps each with its pairwise sub, keeps working.
    for user_claim, account_claim in [("email", "sub"), ("upn", "sub"), ("oid", "oid")]:
        read = GatewayConfig.from_mapping(config(user_claim=user_claim)).trusted_issuers[0]
        assert read.account_claim == account_claim, user_claim
    set_ = GatewayConfig.from_mapping(config(user_claim="oid", account_claim="sub"))
    assert set_.trusted_issuers[0].account_claim == "sub"
    with pytest.raises(ConfigError, match="account_claim must be a non-empty string"):
        GatewayConfig.from_mapping(config(account_claim=""))
    assert GatewayConfig.from_mapping(config()).trusted_issuers[0].user_prefix == ""
    for prefix in ("corp\n", "x" * 65, 7):
        with pytest.raises(ConfigError, match="user_prefix"):
            GatewayConfig.from_mapping(config(user_prefix=prefix))


def test_an_introspection_secret_written_as_a_variable_is_read_from_the_environment():
    # docs/identity.md writes introspection_client_secret = "${OKTA_INTROSPECTION_SECRET}": the
    # file holds no secret, and the secret sent to the provider is the variable's value.
    table = {
        "upstreams": [{"name": "desk", "url": "http://127.0.0.1:9/mcp"}],
        "trusted_issuers": [
            {
                "issuer": "https://idp.example.com",
                "audiences": {"desk": "api://desk"},
                "introspection_client_id": "bastion",
                "introspection_client_secret": "${IDP_SECRET}",
            }
        ],
    }
    read = GatewayConfig.from_mapping(table, {"IDP_SECRET": "from-the-environment"})
    assert read.trusted_issuers[0].introspection_client_secret == "from-the-environment"
    with pytest.raises(ConfigError, match="introspection_client_secret names \\$\\{IDP_SECRET\\}"):
        GatewayConfig.from_mapping(table, {})


def test_a_refused_tokens_audit_row_is_written_off_the_event_loop(bastion, idp, monkeypatch):
    """Anyone can send a token naming a trusted issuer; its refusal's row is a database write,
    which must not hold the event loop (on SQLite it may wait for another writer's lock)."""
    from tests.loop import noting_where

    refusals = bastion.app.state.gateway.trusted.refusals
    seen: list[str] = []
    monkeypatch.setattr(refusals, "record", noting_where(refusals.record, seen))
    assert "typ" in refused(call(bastion, idp.token("b", typ=None)))
    assert seen == ["worker thread"]
