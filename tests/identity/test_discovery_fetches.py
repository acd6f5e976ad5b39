"""An issuer's or provider's metadata (OpenID Connect Discovery, RFC 8414), which bastion reads
before it can check anything a request carries, over real HTTP: requests that need it while it
is being fetched wait for that one fetch, and a fetch that failed is not tried again for
``jwks_refetch_seconds``. Anyone can send a token naming a trusted issuer, or press a provider's
login button: while the issuer is down or slow, each such request was a fetch of its own (two,
for a trusted issuer: discovery, then RFC 8414), each held up to ``timeout_seconds``."""

from __future__ import annotations

import asyncio
import time

import anyio
import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import ECKey
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from bastion.identity.trusted_issuers import (
    IssuerUnavailable,
    TrustedIssuers,
    parse_trusted_issuers,
)
from bastion.oauth.jwks import CoalescedFetches
from tests.clock import ManualClock
from tests.oauth.support import ANY_KID, free_socket, hidden_fields, serve
from tests.waits import PATIENCE

KEY = ECKey.generate_key("P-256", parameters={"kid": "k1"})


@pytest.fixture
def down(monkeypatch):
    """An issuer whose metadata answers 503 once ``state["together"]`` requests have asked
    bastion for it (`CoalescedFetches.once`, entered on the event loop before it waits for a
    fetch under way): requests that came together then all overlap, however busy the machine.
    It counts the requests it gets."""
    state = {"asked": 0, "entered": 0, "together": 1}
    once = CoalescedFetches.once

    async def counted(self, key, fetch, kept):
        state["entered"] += 1
        return await once(self, key, fetch, kept)

    monkeypatch.setattr(CoalescedFetches, "once", counted)

    async def metadata(request):
        state["asked"] += 1
        with anyio.fail_after(PATIENCE):  # a deadline, not a timing
            while state["entered"] < state["together"]:
                await anyio.sleep(0.01)
        return JSONResponse({"error": "down"}, status_code=503)

    app = Starlette(routes=[Route("/{path:path}", metadata)])
    with serve(app, free_socket()) as url:
        state["url"] = url
        yield state


def test_a_trusted_issuers_metadata_is_fetched_once_for_tokens_that_come_together(down):
    clock = ManualClock()
    issuer = f"{down['url']}/idp"
    table = {"issuer": issuer, "audiences": {"desk": "api://desk"}, "jwks_refetch_seconds": 30}
    trusted = TrustedIssuers(parse_trusted_issuers([table], {"desk"}, {}), clock=clock)
    now = int(time.time())
    claims = {"iss": issuer, "sub": "sam", "aud": "api://desk", "iat": now, "exp": now + 300}
    token = jwt.encode({"alg": "ES256", "kid": "k1"}, claims, KEY, registry=ANY_KID)

    down["together"] = 10

    async def scenario() -> list[str]:
        outcomes: list[str] = []

        async def one() -> None:
            try:
                await trusted.verify(token, "desk")
            except IssuerUnavailable as e:
                outcomes.append(str(e))

        await asyncio.gather(*(one() for _ in range(10)))
        # One fetch of each place the metadata may be (discovery, RFC 8414), for all ten.
        assert down["asked"] == 2, outcomes
        clock.now += 29  # within jwks_refetch_seconds of the failure: not asked again
        await one()
        assert down["asked"] == 2
        clock.now += 2
        await one()
        assert down["asked"] == 4
        return outcomes

    outcomes = anyio.run(scenario)
    assert len(outcomes) == 12
    assert all("openid-configuration answered HTTP 503" in o for o in outcomes)
    assert "jwks_refetch_seconds" in outcomes[10]  # the reason, and when it is asked again


def test_a_login_providers_discovery_is_fetched_once_for_logins_that_come_together(tmp_path, down):
    from .oidc_support import bastion_with_providers

    provider = {
        "id": "down",
        "name": "Down Provider",
        "issuer": f"{down['url']}/down",
        "client_id": "bastion-down",
        "client_secret": "secret-of-down",
        "jwks_refetch_seconds": 30,
    }
    identity = {"local_passwords": True, "providers": [provider]}
    with bastion_with_providers(
        str(tmp_path / "bastion.db"), str(tmp_path / "keys"), free_socket(), identity
    ) as b:
        page = b.http.get(f"{b.url}/sign-in?next=/approvals")
        form = hidden_fields(page.text)

        async def press(http: httpx.AsyncClient) -> httpx.Response:
            return await http.post(f"{b.url}/login/down", data=form)

        async def scenario() -> list[httpx.Response]:
            async with httpx.AsyncClient(cookies=b.http.cookies, timeout=20) as http:
                return list(await asyncio.gather(*(press(http) for _ in range(10))))

        down["together"] = 10
        answers = anyio.run(scenario)
        assert [a.status_code for a in answers] == [503] * 10
        assert down["asked"] == 1
        again = b.http.post(f"{b.url}/login/down", data=form)
        assert again.status_code == 503
        assert "jwks_refetch_seconds" in again.text
        assert down["asked"] == 1
