"""Trying to break the trusted-issuer path (`bastion.identity.trusted_issuers`): tokens that must be
refused, against two issuers serving their own key sets and discovery documents over real HTTP,
verified by `TrustedIssuers` as the gateway does (each test with its own, and a clock it moves).
The whole gateway path is in test_trusted_issuers.py."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid

import anyio
import pytest
from joserfc import jws
from joserfc.jwk import ECKey, RSAKey
from joserfc.jws import JWSRegistry
from joserfc.registry import HeaderParameter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bastion.identity.trusted_issuers import TrustedIssuers, parse_trusted_issuers
from bastion.oauth.errors import InvalidToken
from tests.clock import ManualClock
from tests.oauth.support import ANY_KID, free_socket, serve


class Issuers:
    """Issuers ``a`` and ``b`` on one server, each with its discovery document and key set;
    both name a key ``k1`` (different keys)."""

    __test__ = False

    def __init__(self) -> None:
        self.keys = {
            "a": [ECKey.generate_key("P-256", parameters={"kid": "k1"})],
            "b": [
                ECKey.generate_key("P-256", parameters={"kid": "k1"}),
                ECKey.generate_key("P-256", parameters={"kid": "b2"}),
            ],
        }
        self.rsa = RSAKey.generate_key(2048, parameters={"kid": "r1"})
        self.fetches: dict[str, int] = {}
        self.url = ""
        self.app = Starlette(
            routes=[
                Route("/{name}/.well-known/openid-configuration", self.discovery),
                Route("/{name}/jwks", self.jwks),
            ]
        )

    def issuer(self, name: str) -> str:
        return f"{self.url}/{name}"

    async def discovery(self, request: Request) -> Response:
        name = request.path_params["name"]
        return JSONResponse({"issuer": self.issuer(name), "jwks_uri": f"{self.issuer(name)}/jwks"})

    async def jwks(self, request: Request) -> Response:
        name = request.path_params["name"]
        self.fetches[name] = self.fetches.get(name, 0) + 1
        return JSONResponse({"keys": [k.as_dict(private=False) for k in self.keys[name]]})

    def claims(self, name: str = "a", **claims) -> dict:
        now = int(time.time())
        body = {
            "iss": self.issuer(name),
            "sub": "sam",
            "aud": f"api://desk-{name}",
            "client_id": "helpdesk-agent",
            "iat": now,
            "exp": now + 300,
            "jti": uuid.uuid4().hex,
            **claims,
        }
        return {k: v for k, v in body.items() if v is not None}

    def token(
        self, name: str = "a", *, header: dict | None = None, key=None, registry=ANY_KID, **claims
    ) -> str:
        """A token of issuer ``name`` (``claims`` over the usual ones, None drops one), signed
        by its first key unless ``key`` says otherwise, with ``header``."""
        header = header if header is not None else {"alg": "ES256", "kid": "k1"}
        payload = json.dumps(self.claims(name, **claims)).encode()
        return jws.serialize_compact(header, payload, key or self.keys[name][0], registry=registry)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def issuers():
    served = Issuers()
    with serve(served.app, free_socket()) as url:
        served.url = url
        yield served


def trusted(issuers: Issuers, clock: ManualClock, **a_settings) -> TrustedIssuers:
    table = [
        {"issuer": issuers.issuer("a"), "audiences": {"desk": "api://desk-a"}, **a_settings},
        {"issuer": issuers.issuer("b"), "audiences": {"lab": "api://desk-b"}},
    ]
    return TrustedIssuers(parse_trusted_issuers(table, {"desk", "lab"}, {}), clock=clock)


def verify(verifier: TrustedIssuers, token: str, server: str = "desk"):
    return anyio.run(verifier.verify, token, server)


def refused(verifier: TrustedIssuers, token: str, words: str, server: str = "desk") -> None:
    with pytest.raises(InvalidToken) as caught:
        verify(verifier, token, server)
    assert words in str(caught.value), str(caught.value)


@pytest.fixture
def clock():
    return ManualClock(time.time())


def test_the_tokens_the_attacks_start_from_are_taken(issuers, clock):
    verifier = trusted(issuers, clock)
    assert verify(verifier, issuers.token()).subject == "sam"
    b = issuers.token("b", header={"alg": "ES256", "kid": "b2"}, key=issuers.keys["b"][1])
    assert verify(verifier, b, "lab").subject == "sam"


@pytest.mark.parametrize(
    "aud",
    [
        "api://elsewhere",
        ["api://elsewhere", "api://other"],
        "api://desk-b",
        7,
        None,
        ["api://DESK-A"],
    ],
    ids=["another", "a-list-without-it", "the-other-issuers", "a-number", "none", "other-case"],
)
def test_a_token_for_another_audience_is_refused(issuers, clock, aud):
    refused(trusted(issuers, clock), issuers.token(aud=aud), "not for 'api://desk-a'")


def test_a_token_for_a_server_the_issuer_is_not_trusted_for_is_refused(issuers, clock):
    # Issuer b's audience at issuer b's server, sent to a server only issuer a is trusted for.
    refused(trusted(issuers, clock), issuers.token("b"), "not accepted for server 'desk'")


def test_an_expired_token_is_refused_past_the_leeway_only(issuers, clock):
    verifier = trusted(issuers, clock, leeway_seconds=30)
    exp = int(clock.now) - 29
    assert verify(verifier, issuers.token(exp=exp, iat=exp - 60)).subject == "sam"
    refused(trusted(issuers, clock), issuers.token(exp=exp - 2, iat=exp - 60), "expired")
    refused(verifier, issuers.token(exp=None), "'exp' is missing")


@pytest.mark.parametrize("name", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("value", ["9999999999", True, [1], {"t": 1}])
def test_a_time_claim_that_is_not_a_number_is_refused(issuers, clock, name, value):
    refused(trusted(issuers, clock), issuers.token(**{name: value}), f"{name!r} is not a number")


def test_a_token_not_valid_yet_is_refused(issuers, clock):
    verifier = trusted(issuers, clock)
    refused(verifier, issuers.token(nbf=int(clock.now) + 600), "nbf")
    refused(verifier, issuers.token(iat=int(clock.now) + 600), "future")
    # Within the leeway (30 s): another clock's second is not a refusal.
    assert verify(verifier, issuers.token(nbf=int(clock.now) + 20)).subject == "sam"


@pytest.mark.parametrize(
    "iss",
    ["{a}/", "{a}/../a", "{A}", "https://evil.example/a", None],
    ids=["trailing-slash", "dot-segments", "other-case", "another-host", "none"],
)
def test_a_token_whose_iss_is_not_exactly_a_trusted_issuer_is_refused(issuers, clock, iss):
    if iss is not None:
        iss = iss.format(a=issuers.issuer("a"), A=issuers.issuer("a").upper())
    refused(trusted(issuers, clock), issuers.token(iss=iss), "is not a trusted issuer")


def test_an_iss_that_is_a_list_is_refused(issuers, clock):
    refused(trusted(issuers, clock), issuers.token(iss=[issuers.issuer("a")]), "not a trusted")


def test_alg_none_is_refused_with_or_without_a_signature(issuers, clock):
    payload = _b64(json.dumps(issuers.claims()).encode())
    for header in ({"alg": "none"}, {"alg": "none", "kid": "k1"}, {"alg": "None", "kid": "k1"}):
        encoded = _b64(json.dumps(header).encode())
        refused(trusted(issuers, clock), f"{encoded}.{payload}.", "alg")
        signed = issuers.token().split(".")[2]
        refused(trusted(issuers, clock), f"{encoded}.{payload}.{signed}", "alg")


def test_hmac_keyed_with_the_issuers_public_key_is_refused(issuers, clock):
    payload = _b64(json.dumps(issuers.claims()).encode())
    public_key = issuers.keys["a"][0]
    for secret in (
        public_key.as_pem(private=False),
        json.dumps(public_key.as_dict(private=False)).encode(),
    ):
        for alg, digest in (("HS256", hashlib.sha256), ("HS512", hashlib.sha512)):
            header = _b64(json.dumps({"alg": alg, "kid": "k1"}).encode())
            mac = hmac.new(secret, f"{header}.{payload}".encode(), digest).digest()
            refused(trusted(issuers, clock), f"{header}.{payload}.{_b64(mac)}", "alg")


def test_an_alg_the_issuer_is_not_configured_for_is_refused(issuers, clock):
    # Issuer a publishes an RSA key too, but is configured for ES256 alone.
    issuers.keys["a"].append(issuers.rsa)
    try:
        verifier = trusted(issuers, clock, algorithms=["ES256"])
        rs256 = issuers.token(header={"alg": "RS256", "kid": "r1"}, key=issuers.rsa)
        refused(verifier, rs256, "alg 'RS256' is not accepted")
        # The alg named must be the key's: an EC key's signature under another EC alg.
        es512 = trusted(issuers, clock, algorithms=["ES256", "ES512"])
        header = {"alg": "ES512", "kid": "k1"}
        forged = issuers.token(header={"alg": "ES256", "kid": "k1"}).split(".")
        forged[0] = _b64(json.dumps(header).encode())
        refused(es512, ".".join(forged), "signature")
    finally:
        issuers.keys["a"].remove(issuers.rsa)


def test_a_key_of_another_issuer_does_not_sign_for_this_one(issuers, clock):
    verifier = trusted(issuers, clock)
    b_k1, b_b2 = issuers.keys["b"]
    # The same kid at both issuers: a's set is the one that counts.
    refused(verifier, issuers.token(key=b_k1), "signature")
    # b's own kid, unknown at a: a's set is fetched again (once), then refused.
    clock.now += 31
    before = issuers.fetches.get("a", 0)
    for _ in range(3):
        refused(verifier, issuers.token(header={"alg": "ES256", "kid": "b2"}, key=b_b2), "kid")
    assert issuers.fetches["a"] == before + 1


def test_a_token_naming_no_key_is_refused_when_the_issuer_has_several(issuers, clock):
    verifier = trusted(issuers, clock)
    b_k1 = issuers.keys["b"][0]
    token = issuers.token("b", header={"alg": "ES256"}, key=b_k1)
    refused(verifier, token, "several keys", "lab")
    # Issuer a has one key: a token naming none is its.
    assert verify(verifier, issuers.token(header={"alg": "ES256"})).subject == "sam"


def test_a_critical_header_bastion_does_not_understand_is_refused(issuers, clock):
    # RFC 7515 §4.1.11: a recipient that does not understand a crit member must reject the JWS.
    header = {"alg": "ES256", "kid": "k1", "crit": ["urn:example:must"], "urn:example:must": 1}
    understood = HeaderParameter("a test's", lambda value: None)
    registry = JWSRegistry(header_registry={"kid": understood, "urn:example:must": understood})
    token = issuers.token(header=header, registry=registry)
    refused(trusted(issuers, clock), token, "signature")


@pytest.mark.parametrize(
    ("require", "typ", "taken"),
    [
        (True, "at+jwt", True),
        (True, "application/at+jwt", True),
        (True, None, False),
        (True, "JWT", False),
        (True, "oauth-id-jag+jwt", False),
        (True, "at+jwt ", False),
        (False, None, True),
        (False, "JWT", True),
        (False, "at+jwt", True),
        # Typed as another kind of JWT (RFC 8725 §3.11): an ID-JAG, a SET, a DPoP proof, a
        # logout token are never access tokens, whatever require_typ says.
        (False, "oauth-id-jag+jwt", False),
        (False, "secevent+jwt", False),
        (False, "application/dpop+jwt", False),
        (False, "logout+JWT", False),
    ],
)
def test_typ_is_checked_when_require_typ_is_set_or_names_another_kind(
    issuers, clock, require, typ, taken
):
    header = {"alg": "ES256", "kid": "k1", **({"typ": typ} if typ is not None else {})}
    verifier = trusted(issuers, clock, require_typ=require)
    if taken:
        assert verify(verifier, issuers.token(header=header)).subject == "sam"
    else:
        refused(verifier, issuers.token(header=header), "typ")


# An ID token is for the client that signed the person in, not an access token for a server
# (OpenID Connect Core §2, RFC 9068 §1, RFC 8725 §3.11): signed by the same issuer with the same
# keys and typed plain JWT, it is told apart by what only an ID token holds. Keycloak's has
# azp (an agent claim), its client's id as aud (the audience where an audience mapper names
# that client), typ "ID" in its payload and at_hash.
KEYCLOAK_ID_TOKEN = {
    "typ": "ID",
    "azp": "helpdesk-agent",
    "client_id": None,
    "nonce": "n-0S6_WzA2Mj",
    "at_hash": "77QmUPtjPfzWtF2AnpK9RQ",
    "preferred_username": "sam",
}


@pytest.mark.parametrize(
    "claims",
    [
        KEYCLOAK_ID_TOKEN,
        {**KEYCLOAK_ID_TOKEN, "typ": None},
        {**KEYCLOAK_ID_TOKEN, "at_hash": None},
        {**KEYCLOAK_ID_TOKEN, "at_hash": None, "typ": "id"},
        {"at_hash": "77QmUPtjPfzWtF2AnpK9RQ"},
        {"c_hash": "LDktKdoQak3Pk0cnXxCltA"},
        {"s_hash": "x3j6YTRaWcFCZlTZ9rqmOA"},
    ],
    ids=[
        "keycloak",
        "no-typ-claim",
        "no-at-hash",
        "typ-claim-other-case",
        "at-hash",
        "c-hash",
        "s-hash",
    ],
)
@pytest.mark.parametrize("header_typ", [None, "JWT"])
def test_an_id_token_is_not_taken_as_an_access_token(issuers, clock, claims, header_typ):
    header = {"alg": "ES256", "kid": "k1", **({"typ": header_typ} if header_typ else {})}
    refused(trusted(issuers, clock), issuers.token(header=header, **claims), "an ID token")


@pytest.mark.parametrize("typ", ["Bearer", "bearer", 7])
def test_an_access_token_typed_bearer_in_its_claims_is_taken(issuers, clock, typ):
    # Keycloak's access tokens say typ "Bearer" in their payload; a claim that is no string says
    # nothing of the kind.
    assert verify(trusted(issuers, clock), issuers.token(typ=typ)).subject == "sam"
