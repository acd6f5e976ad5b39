"""A provider's OpenID Connect Discovery metadata is read again when its lifetime ends (its
``Cache-Control`` or ``Expires``, within ``jwks_refetch_seconds`` and ``metadata_cache_seconds``),
in the background while the kept one still answers (`read_again` waits for that read): a provider
that moves its token endpoint or ``jwks_uri`` is followed without a restart. A refetch
that fails, or brings a document that fails the checks the first one passed (another issuer),
keeps the last good metadata in use for ``metadata_stale_seconds`` past its lifetime, then signs
nobody in until a good one is read. The provider is the real HTTP server of
test_oidc_login_refusals.py; the trusted issuer's is written here."""

from __future__ import annotations

import json

import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bastion.identity.trusted_issuers import (
    IssuerUnavailable,
    TrustedIssuers,
    parse_trusted_issuers,
)
from bastion.oauth.errors import InvalidToken
from tests.clock import ManualClock
from tests.oauth.support import ANY_KID, free_socket, serve
from tests.waits import eventually, run_settled

from .test_oidc_id_token_keys import log_in, provider_login, signed_in
from .test_oidc_login_refusals import TestProvider, refused

MOVED_KEY = RSAKey.generate_key(2048, parameters={"kid": "k2"})
MOVED = ({"alg": "RS256", "kid": "k2"}, MOVED_KEY)


@pytest.fixture
def idp():
    provider = TestProvider()
    with serve(provider.app, free_socket()) as url:
        provider.url = url
        yield provider


def press(person, client, name: str):
    """The person presses the provider's button: bastion reads its metadata to send them there."""
    return person.choose(person.open_authorization(client), name)


def move(idp: TestProvider, name: str) -> None:
    """The provider serves its token endpoint and key set elsewhere (the key set with a new
    key), its discovery document says so, and the old places answer 404."""
    idp.metadata[name] = {
        "token_endpoint": f"{idp.issuer(name)}/moved/token",
        "jwks_uri": f"{idp.issuer(name)}/moved/jwks",
    }
    idp.published[f"{name}/moved"] = [MOVED_KEY]
    idp.retired |= {f"/{name}/token", f"/{name}/jwks"}


def read_again(b, person, client, name: str) -> None:
    """A login pressed past the metadata's lifetime is sent on with the metadata kept, and has
    it read again in the background: until that read has ended."""
    assert press(person, client, name).status_code == 303
    metadata = b.server.external_login._metadata[name]
    assert eventually(lambda: not metadata.reading)


def test_a_provider_that_moves_its_endpoints_is_followed_once_its_metadata_expires(tmp_path, idp):
    with provider_login(tmp_path, idp, "m", metadata_cache_seconds=60) as (b, client, person):
        assert signed_in(log_in(idp, person, client, "m"))
        move(idp, "m")
        b.clock.advance(30)  # the metadata read is still in its lifetime: the old endpoints
        refused(log_in(idp, person, client, "m", signer=MOVED), 503, "answered HTTP 404")
        b.clock.advance(31)
        read_again(b, person, client, "m")
        response = log_in(idp, person, client, "m", signer=MOVED)
        assert signed_in(response), response.text
        assert {"/m/moved/token", "/m/moved/jwks"} <= set(idp.asked)


def test_the_lifetime_the_discovery_documents_headers_give_is_kept(tmp_path, idp):
    idp.discovery_headers["m"] = {"Cache-Control": "public, max-age=45"}
    with provider_login(tmp_path, idp, "m") as (b, client, person):  # 3600 s at most
        assert signed_in(log_in(idp, person, client, "m"))
        move(idp, "m")
        b.clock.advance(44)
        refused(log_in(idp, person, client, "m", signer=MOVED), 503, "answered HTTP 404")
        b.clock.advance(2)
        read_again(b, person, client, "m")
        response = log_in(idp, person, client, "m", signer=MOVED)
        assert signed_in(response), response.text


def test_a_discovery_that_fails_keeps_the_last_good_metadata_for_a_bounded_time(tmp_path, idp):
    settings = {"metadata_cache_seconds": 60, "metadata_stale_seconds": 120}
    with provider_login(tmp_path, idp, "m", **settings) as (b, client, person):
        assert signed_in(log_in(idp, person, client, "m"))
        idp.discovery_status["m"] = 503
        asked = idp.asked.count("/m/.well-known/openid-configuration")
        b.clock.advance(61)
        # A short outage of the discovery document: people still sign in, and it was asked.
        assert signed_in(log_in(idp, person, client, "m"))
        metadata = b.server.external_login._metadata["m"]
        assert eventually(lambda: not metadata.reading)
        assert idp.asked.count("/m/.well-known/openid-configuration") == asked + 1
        b.clock.advance(120)  # 181 s: past its lifetime and the 120 s after it
        response = press(person, client, "m")
        refused(response, 503, "cannot be reached now")
        assert "answered HTTP 503" in response.text and "metadata_stale_seconds" in response.text
        [(detail,)] = b.db.execute("SELECT detail FROM audit_events WHERE kind = 'login.refused'")
        recorded = json.loads(detail)
        assert recorded["reason"] == "provider_unavailable"
        assert "metadata_stale_seconds" in recorded["description"]
        idp.discovery_status.pop("m")
        b.clock.advance(31)  # past jwks_refetch_seconds since the last failed read
        assert signed_in(log_in(idp, person, client, "m"))


def test_a_refetched_discovery_naming_another_issuer_never_replaces_the_good_one(tmp_path, idp):
    settings = {"metadata_cache_seconds": 60, "metadata_stale_seconds": 120}
    with provider_login(tmp_path, idp, "m", **settings) as (b, client, person):
        assert signed_in(log_in(idp, person, client, "m"))
        # Another issuer's metadata, naming endpoints of its own, at the provider's address.
        idp.metadata["m"] = {
            "issuer": "https://evil.example/m",
            "token_endpoint": f"{idp.issuer('m')}/moved/token",
        }
        b.clock.advance(61)
        assert signed_in(log_in(idp, person, client, "m"))
        assert "/m/moved/token" not in idp.asked  # the good metadata's token endpoint was used
        b.clock.advance(120)
        response = press(person, client, "m")
        refused(response, 503, "is not the metadata of")
        assert "/m/moved/token" not in idp.asked


# -- a trusted issuer (the gateway's) -----------------------------------------------------------

OLD_KEY = ECKey.generate_key("P-256", parameters={"kid": "old"})
NEW_KEY = ECKey.generate_key("P-256", parameters={"kid": "new"})


@pytest.fixture
def issuer():
    """An issuer whose discovery document names ``/old-jwks`` until ``state["jwks"]`` says
    otherwise, or answers ``state["status"]``."""
    state = {"jwks": "/old-jwks", "status": 200, "issuer": None}

    async def discovery(request: Request) -> Response:
        if state["status"] != 200:
            return JSONResponse({"error": "down"}, status_code=state["status"])
        return JSONResponse(
            {"issuer": state["issuer"] or state["url"], "jwks_uri": state["url"] + state["jwks"]}
        )

    def jwks(key):
        async def answer(request: Request) -> Response:
            return JSONResponse({"keys": [key.as_dict(private=False)]})

        return answer

    app = Starlette(
        routes=[
            Route("/.well-known/openid-configuration", discovery),
            Route("/old-jwks", jwks(OLD_KEY)),
            Route("/new-jwks", jwks(NEW_KEY)),
        ]
    )
    with serve(app, free_socket()) as url:
        state["url"] = url
        yield state


def _verify(trusted: TrustedIssuers, issuer: str, key, clock: ManualClock) -> str:
    now = int(clock())
    claims = {
        "iss": issuer,
        "sub": "sam",
        "client_id": "agent",
        "aud": "api://desk",
        "iat": now,
        "exp": now + 3600,
    }
    token = jwt.encode({"alg": "ES256", "kid": key.kid}, claims, key, registry=ANY_KID)
    try:
        return run_settled(trusted.verify, token, "desk").subject
    except (IssuerUnavailable, InvalidToken) as e:
        return str(e)


def test_a_trusted_issuer_that_moves_its_jwks_uri_is_followed_and_an_outage_is_bounded(issuer):
    clock = ManualClock()
    table = {
        "issuer": issuer["url"],
        "audiences": {"desk": "api://desk"},
        "metadata_cache_seconds": 60,
        "metadata_stale_seconds": 120,
    }
    trusted = TrustedIssuers(parse_trusted_issuers([table], {"desk"}, {}), clock=clock)
    assert _verify(trusted, issuer["url"], OLD_KEY, clock) == "sam"
    issuer["jwks"] = "/new-jwks"
    clock.now += 61
    # The token that finds the metadata past its lifetime is checked with it (the old key set),
    # while it is read again; the next, with the jwks_uri read.
    assert "kid 'new'" in _verify(trusted, issuer["url"], NEW_KEY, clock)
    assert _verify(trusted, issuer["url"], NEW_KEY, clock) == "sam"
    # Metadata naming another issuer, then none at all: the last good one is kept for a while.
    issuer["issuer"] = "https://evil.example"
    clock.now += 61
    assert _verify(trusted, issuer["url"], NEW_KEY, clock) == "sam"
    issuer["issuer"], issuer["status"] = None, 503
    clock.now += 31
    assert _verify(trusted, issuer["url"], NEW_KEY, clock) == "sam"
    clock.now += 90  # 182 s after the last good read: 60 s its lifetime, 120 s after it
    refusal = _verify(trusted, issuer["url"], NEW_KEY, clock)
    assert "answered HTTP 503" in refusal and "metadata_stale_seconds" in refusal, refusal
