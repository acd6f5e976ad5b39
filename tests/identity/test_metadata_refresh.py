"""Metadata and key sets read again without a request waiting for them: past its lifetime, within
``metadata_stale_seconds``, the metadata kept is the answer at once while one read runs in the
background; a key set in use is fetched again in the background past half its lifetime, and never
used past it. Both are asked for again conditionally (``If-None-Match``, ``If-Modified-Since``):
a ``304`` renews what is kept. Over real HTTP: the login provider of
test_oidc_login_refusals.py, and a trusted issuer written here that can hang."""

from __future__ import annotations

from dataclasses import replace

import anyio
import pytest
from joserfc import jwt
from joserfc.jwk import ECKey
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
from tests.waits import PATIENCE, eventually, eventually_async

from .test_oidc_id_token_keys import log_in, provider_login, signed_in
from .test_oidc_login_refusals import TestProvider

OLD_KEY = ECKey.generate_key("P-256", parameters={"kid": "old"})
NEW_KEY = ECKey.generate_key("P-256", parameters={"kid": "new"})

# A fetch that must succeed is bounded against a hang only: with the default 5 s (or 1 s), a
# machine that did not run the issuer's server that long refused a token or a login (seen with
# 1 s: 'did not answer within 1 s' for a first fetch that was to succeed).
SETTLED = int(PATIENCE)


@pytest.fixture
def idp():
    provider = TestProvider()
    with serve(provider.app, free_socket()) as url:
        provider.url = url
        yield provider


def test_a_login_past_the_metadata_lifetime_completes_while_the_provider_hangs(tmp_path, idp):
    # A fetch that would wait far longer than any login may: the login must not wait at all.
    settings = {"metadata_cache_seconds": 60, "timeout_seconds": 3600}
    with provider_login(tmp_path, idp, "m", **settings) as (b, client, person):
        assert signed_in(log_in(idp, person, client, "m"))
        metadata = b.server.external_login._metadata["m"]
        idp.hung.add("m")
        try:
            b.clock.advance(61)  # past its lifetime, well within metadata_stale_seconds
            for _ in range(3):  # each login completes while the one read hangs
                response = log_in(idp, person, client, "m")
                assert signed_in(response), response.text
            assert eventually(lambda: idp.hanging == 1)
            assert idp.asked.count("/m/.well-known/openid-configuration") == 2
            assert metadata.reading
        finally:
            idp.hung.discard("m")
        assert eventually(lambda: not metadata.reading)


def test_past_the_stale_window_a_login_waits_for_the_read_and_is_refused(tmp_path, idp):
    settings = {
        "metadata_cache_seconds": 60,
        "metadata_stale_seconds": 120,
        "timeout_seconds": SETTLED,  # refused for the provider's 503, not for its time
    }
    with provider_login(tmp_path, idp, "m", **settings) as (b, client, person):
        assert signed_in(log_in(idp, person, client, "m"))
        metadata = b.server.external_login._metadata["m"]
        idp.discovery_status["m"] = 503
        b.clock.advance(61)
        assert signed_in(log_in(idp, person, client, "m"))  # the background read fails
        assert eventually(lambda: not metadata.reading)
        b.clock.advance(31)  # past jwks_refetch_seconds: read again, in the background
        assert signed_in(log_in(idp, person, client, "m"))
        assert eventually(lambda: not metadata.reading)
        asked = idp.asked.count("/m/.well-known/openid-configuration")
        assert asked == 3
        b.clock.advance(90)  # 181 s: past its lifetime and the 120 s after it
        page = person.open_authorization(client)
        response = person.choose(page, "m")
        assert response.status_code == 503, response.text
        assert "answered HTTP 503" in response.text and "metadata_stale_seconds" in response.text
        assert idp.asked.count("/m/.well-known/openid-configuration") == asked + 1


# -- a trusted issuer: its metadata, its key set, 304s -----------------------------------------


@pytest.fixture
def issuer():
    """An issuer whose discovery document and key set carry an ETag and answer 304 to a request
    naming it; each can hang (``state["hung"]``). It counts what it was asked."""
    state = {
        "keys": [OLD_KEY, NEW_KEY],
        "hung": set(),
        "asked": [],
        "not_modified": [],
        "metadata_etag": '"m1"',
    }

    async def hang(name: str) -> None:
        with anyio.move_on_after(PATIENCE):  # a bound against a hang of the test itself
            while name in state["hung"]:
                await anyio.sleep(0.01)

    async def discovery(request: Request) -> Response:
        state["asked"].append("metadata")
        await hang("metadata")
        etag = state["metadata_etag"]
        if request.headers.get("if-none-match") == etag:
            state["not_modified"].append("metadata")
            return Response(status_code=304, headers={"ETag": etag})
        document = {"issuer": state["url"], "jwks_uri": state["url"] + "/jwks"}
        return JSONResponse(document, headers={"ETag": etag})

    async def jwks(request: Request) -> Response:
        state["asked"].append("jwks")
        await hang("jwks")
        etag = '"' + "-".join(k.kid for k in state["keys"]) + '"'
        if request.headers.get("if-none-match") == etag:
            state["not_modified"].append("jwks")
            return Response(status_code=304, headers={"ETag": etag})
        keys = {"keys": [k.as_dict(private=False) for k in state["keys"]]}
        return JSONResponse(keys, headers={"ETag": etag})

    app = Starlette(
        routes=[
            Route("/.well-known/openid-configuration", discovery),
            Route("/jwks", jwks),
        ]
    )
    with serve(app, free_socket()) as url:
        state["url"] = url
        yield state


def _trusted(issuer: dict, clock: ManualClock, **settings) -> TrustedIssuers:
    table = {
        "issuer": issuer["url"],
        "audiences": {"desk": "api://desk"},
        "timeout_seconds": SETTLED,
        **settings,
    }
    return TrustedIssuers(parse_trusted_issuers([table], {"desk"}, {}), clock=clock)


async def _verify(trusted: TrustedIssuers, issuer: dict, key, clock: ManualClock) -> str:
    now = int(clock())
    claims = {
        "iss": issuer["url"],
        "sub": "sam",
        "client_id": "agent",
        "aud": "api://desk",
        "iat": now,
        "exp": now + 3600,
    }
    token = jwt.encode({"alg": "ES256", "kid": key.kid}, claims, key, registry=ANY_KID)
    try:
        return (await trusted.verify(token, "desk")).subject
    except (IssuerUnavailable, InvalidToken) as e:
        return str(e)


def test_a_token_past_the_metadata_lifetime_is_checked_while_the_issuer_hangs(issuer):
    clock = ManualClock()
    trusted = _trusted(issuer, clock, metadata_cache_seconds=60, timeout_seconds=3600)
    metadata = trusted._metadata[issuer["url"]]

    async def scenario() -> None:
        assert await _verify(trusted, issuer, OLD_KEY, clock) == "sam"
        issuer["hung"].add("metadata")
        clock.now += 61
        checks = [anyio.Event() for _ in range(5)]

        async def check(done: anyio.Event) -> None:
            assert await _verify(trusted, issuer, OLD_KEY, clock) == "sam"
            done.set()

        async with anyio.create_task_group() as tasks:
            for done in checks:
                tasks.start_soon(check, done)
            # Every check ends while the one read of the metadata hangs.
            assert await eventually_async(lambda: all(d.is_set() for d in checks))
            assert metadata.reading
            # The read began in the background; its request reaches the issuer when it does
            # (after the checks, on a busy machine), and is the only one.
            assert await eventually_async(lambda: issuer["asked"].count("metadata") >= 2)
            assert issuer["asked"].count("metadata") == 2
            issuer["hung"].clear()
        assert await eventually_async(lambda: not metadata.reading)

    anyio.run(scenario)


def test_a_304_renews_the_kept_metadata_and_key_set(issuer):
    clock = ManualClock()
    settings = {"metadata_cache_seconds": 60, "jwks_cache_seconds": 40}
    trusted = _trusted(issuer, clock, **settings)
    metadata = trusted._metadata[issuer["url"]]
    key_set = trusted._key_sets[issuer["url"]]
    jwks_uri = issuer["url"] + "/jwks"

    async def scenario() -> None:
        assert await _verify(trusted, issuer, OLD_KEY, clock) == "sam"
        assert issuer["asked"] == ["metadata", "jwks"]
        clock.now += 41  # the key set past its lifetime: fetched again, waited for
        assert await _verify(trusted, issuer, OLD_KEY, clock) == "sam"
        assert issuer["not_modified"] == ["jwks"]
        clock.now += 20  # 61 s: the metadata past its lifetime, read again in the background
        assert await _verify(trusted, issuer, OLD_KEY, clock) == "sam"
        assert await eventually_async(lambda: not metadata.reading)
        assert issuer["not_modified"] == ["jwks", "metadata"]
        reads = issuer["asked"].count("metadata")
        clock.now += 19  # the 304 renewed it: not asked for in its new lifetime
        assert await _verify(trusted, issuer, OLD_KEY, clock) == "sam"
        assert issuer["asked"].count("metadata") == reads, issuer["asked"]
        # (the key set, past half its lifetime, is fetched again in the background: a 304 too)
        assert await eventually_async(lambda: not key_set.under_way(jwks_uri))
        assert issuer["not_modified"] == ["jwks", "metadata", "jwks"]
        # A changed document (another ETag) is read whole again.
        issuer["metadata_etag"] = '"m2"'
        clock.now += 42
        assert await _verify(trusted, issuer, OLD_KEY, clock) == "sam"
        assert await eventually_async(lambda: not metadata.reading)
        assert await eventually_async(lambda: not key_set.under_way(jwks_uri))
        assert issuer["not_modified"].count("metadata") == 1

    anyio.run(scenario)


def test_a_key_removed_from_the_set_is_refused_once_the_set_is_read_again(issuer):
    clock = ManualClock()
    trusted = _trusted(issuer, clock, jwks_cache_seconds=60)
    key_set = trusted._key_sets[issuer["url"]]
    jwks_uri = issuer["url"] + "/jwks"

    async def scenario() -> None:
        assert await _verify(trusted, issuer, OLD_KEY, clock) == "sam"
        issuer["keys"] = [NEW_KEY]  # the issuer withdraws the old key
        issuer["hung"].add("jwks")
        clock.now += 31  # past half the set's lifetime: fetched again in the background
        assert await _verify(trusted, issuer, OLD_KEY, clock) == "sam"  # still in its lifetime
        assert key_set.under_way(jwks_uri)
        issuer["hung"].clear()
        assert await eventually_async(lambda: not key_set.under_way(jwks_uri))
        refusal = await _verify(trusted, issuer, OLD_KEY, clock)
        assert "kid 'old'" in refusal, refusal
        assert await _verify(trusted, issuer, NEW_KEY, clock) == "sam"
        # A key the set does not hold yet is still fetched for at once (rotation).
        issuer["keys"] = [NEW_KEY, OLD_KEY]
        clock.now += 31
        assert await _verify(trusted, issuer, OLD_KEY, clock) == "sam"

    anyio.run(scenario)


def test_a_key_set_past_its_lifetime_is_never_used_while_the_issuer_is_down(issuer):
    clock = ManualClock()
    trusted = _trusted(issuer, clock, jwks_cache_seconds=60)
    key_set = trusted._key_sets[issuer["url"]]
    jwks_uri = issuer["url"] + "/jwks"

    async def scenario() -> None:
        assert await _verify(trusted, issuer, OLD_KEY, clock) == "sam"
        # The set's fetches bounded at 1 s once it is in use: the first, which must succeed,
        # waited out a hang only. The issuer then hangs until the refusal is seen.
        key_set.limits = replace(key_set.limits, timeout_seconds=1)
        issuer["hung"].add("jwks")
        clock.now += 31
        assert await _verify(trusted, issuer, OLD_KEY, clock) == "sam"
        # The background fetch fails (timeout_seconds): the set is still used in its lifetime,
        assert await eventually_async(lambda: not key_set.under_way(jwks_uri))
        clock.now += 20
        assert await _verify(trusted, issuer, OLD_KEY, clock) == "sam"
        # and refused past it, with the failure's reason.
        clock.now += 10
        refusal = await _verify(trusted, issuer, OLD_KEY, clock)
        assert "did not answer within 1 s" in refusal, refusal
        issuer["hung"].clear()

    anyio.run(scenario)
