"""Key sets fetched from a ``jwks_uri`` (`bastion.oauth.jwks.RemoteKeySets`, behind private_key_jwt
clients, trusted issuers, ID-JAG and login providers, SSF transmitters), over real HTTP: a fetch
that failed is not tried again for ``refetch_seconds``, so the requests that need the set meanwhile
are refused at once with its reason, and one fetch serves requests that came together."""

from __future__ import annotations

import asyncio
import json

import anyio
import pytest
from joserfc.jwk import ECKey
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bastion.oauth.client_assertion import jwks_problem
from bastion.oauth.jwks import CoalescedFetches, FetchLimits, RemoteDocumentError, RemoteKeySets
from tests.clock import ManualClock
from tests.oauth.support import free_socket, serve
from tests.waits import PATIENCE

KEY = ECKey.generate_key("P-256", parameters={"kid": "k1"}).as_dict(private=False)


@pytest.fixture
def issuer(monkeypatch):
    """A ``jwks_uri`` that answers once ``state["together"]`` requests have asked for a key set
    (`CoalescedFetches.once`, entered on the event loop before it waits for a fetch under way):
    requests that came together then all overlap, however busy the machine."""
    state = {"fetches": 0, "down": True, "entered": 0, "together": 1}
    once = CoalescedFetches.once

    async def counted(self, key, fetch, kept):
        state["entered"] += 1
        return await once(self, key, fetch, kept)

    monkeypatch.setattr(CoalescedFetches, "once", counted)

    async def jwks(request):
        state["fetches"] += 1
        with anyio.fail_after(PATIENCE):  # a deadline, not a timing
            while state["entered"] < state["together"]:
                await anyio.sleep(0.01)
        if state["down"]:
            return JSONResponse({"error": "down"}, status_code=503)
        return JSONResponse({"keys": [KEY]})

    with serve(Starlette(routes=[Route("/jwks", jwks)]), free_socket()) as url:
        state["uri"] = f"{url}/jwks"
        yield state


def test_a_failed_fetch_is_not_tried_again_until_refetch_seconds(issuer):
    clock = ManualClock()
    limits = FetchLimits(refetch_seconds=30, refetch_setting="[t] jwks_refetch_seconds")
    sets = RemoteKeySets(limits, check=jwks_problem, clock=clock)
    issuer["together"] = 5

    async def scenario() -> list:
        outcomes: list = []

        async def one() -> None:
            try:
                outcomes.append(await sets.keys(issuer["uri"], "k1"))
            except RemoteDocumentError as e:
                outcomes.append(str(e))

        await asyncio.gather(*(one() for _ in range(5)))  # together: one fetch for all
        assert issuer["fetches"] == 1, outcomes
        issuer["down"] = False
        clock.now += 29  # up again, but within refetch_seconds of the failure: not asked
        await one()
        assert issuer["fetches"] == 1
        clock.now += 2
        await one()
        return outcomes

    outcomes = anyio.run(scenario)
    assert outcomes[0] == "answered HTTP 503"
    assert all("answered HTTP 503" in o and "[t] jwks_refetch_seconds" in o for o in outcomes[1:6])
    assert not isinstance(outcomes[-1], str) and issuer["fetches"] == 2


def test_key_sets_asked_of_many_uris_keep_at_most_max_cached_of_each(issuer):
    """A registered client names its own ``jwks_uri``, so the URIs asked for are as many as
    clients make them: what is kept for them, fetched sets, failures, and the locks of fetches,
    stays within ``max_cached`` however many are asked for (here 10 URIs, 2 kept)."""
    sets = RemoteKeySets(FetchLimits(max_cached=2), check=jwks_problem, clock=ManualClock())

    for n in range(5):  # the issuer is down: failures
        with pytest.raises(RemoteDocumentError):
            anyio.run(sets.keys, f"{issuer['uri']}?client={n}", "k1")
    issuer["down"] = False
    for n in range(5, 10):
        anyio.run(sets.keys, f"{issuer['uri']}?client={n}", "k1")
    assert issuer["fetches"] == 10
    assert len(sets._fetched) <= 2 and len(sets._failed) <= 2
    assert len(sets._fetching) == 0  # no fetch is in progress: no lock is kept for one


def test_a_fetched_key_set_is_checked_and_read_off_the_event_loop(issuer):
    """Checking a key set reads every key in it (`jwks_problem` imports them all, as many as
    the caller's bound allows): CPU work, done in a worker thread with the reading of the keys,
    never on the event loop that serves every other request meanwhile."""
    from tests.loop import noting_where

    seen: list[str] = []
    sets = RemoteKeySets(FetchLimits(), check=noting_where(jwks_problem, seen), clock=ManualClock())
    issuer["down"] = False
    assert anyio.run(sets.keys, issuer["uri"], "k1")
    assert seen == ["worker thread"]


OTHER_KEY = ECKey.generate_key("P-256", parameters={"kid": "k2"}).as_dict(private=False)


@pytest.fixture
def rotating():
    """A key set whose keys and headers the test changes between fetches, or (``text``) the
    JSON text it sends as it is."""
    state: dict = {"fetches": 0, "keys": [KEY, OTHER_KEY], "headers": {}, "text": None}

    async def jwks(request):
        state["fetches"] += 1
        if state["text"] is not None:
            return Response(state["text"], media_type="application/json")
        return JSONResponse({"keys": state["keys"]}, headers=state["headers"])

    with serve(Starlette(routes=[Route("/jwks", jwks)]), free_socket()) as url:
        state["uri"] = f"{url}/jwks"
        yield state


def kids(keys) -> list[str]:
    return sorted(k.kid for k in keys.keys)


def test_a_key_removed_from_the_set_is_not_honoured_past_the_sets_max_age(rotating):
    """A key the issuer withdrew (leaked, rotated out) was trusted for ``cache_seconds`` (300 s)
    after the set that still held it, whatever that set's Cache-Control said."""
    clock = ManualClock()
    sets = RemoteKeySets(
        FetchLimits(cache_seconds=300, refetch_seconds=5), check=jwks_problem, clock=clock
    )
    rotating["headers"] = {"Cache-Control": "max-age=60"}
    assert kids(anyio.run(sets.keys, rotating["uri"], "k2")) == ["k1", "k2"]
    rotating["keys"] = [KEY]
    clock.now += 50
    assert kids(anyio.run(sets.keys, rotating["uri"], "k2")) == ["k1", "k2"]
    assert rotating["fetches"] == 1
    clock.now += 11
    assert kids(anyio.run(sets.keys, rotating["uri"], "k2")) == ["k1"]
    assert rotating["fetches"] == 2


@pytest.mark.parametrize("cache_control", ["no-store", "no-cache", "max-age=0"])
def test_a_set_not_to_be_kept_is_still_kept_refetch_seconds(rotating, cache_control):
    """Whoever serves a ``jwks_uri`` (a registered client's own) chooses its headers: a set
    sent with no-store is fetched again at most once every ``refetch_seconds``, as a set
    lacking a kid is, never for every token."""
    clock = ManualClock()
    sets = RemoteKeySets(
        FetchLimits(cache_seconds=300, refetch_seconds=5), check=jwks_problem, clock=clock
    )
    rotating["headers"] = {"Cache-Control": cache_control}
    for _ in range(3):
        anyio.run(sets.keys, rotating["uri"], "k1")
    assert rotating["fetches"] == 1
    rotating["keys"] = [OTHER_KEY]
    clock.now += 6
    assert kids(anyio.run(sets.keys, rotating["uri"], "k1")) == ["k2"]
    assert rotating["fetches"] == 2


def test_a_max_age_past_cache_seconds_is_cut_to_it(rotating):
    clock = ManualClock()
    sets = RemoteKeySets(
        FetchLimits(cache_seconds=300, refetch_seconds=5), check=jwks_problem, clock=clock
    )
    rotating["headers"] = {"Cache-Control": "max-age=86400"}
    anyio.run(sets.keys, rotating["uri"], "k2")
    rotating["keys"] = [KEY]
    clock.now += 301
    assert kids(anyio.run(sets.keys, rotating["uri"], "k2")) == ["k1"]
    assert rotating["fetches"] == 2


def test_a_key_set_naming_a_member_twice_is_refused(rotating):
    """A key whose ``x`` is given twice (another key's, then k1's): which public key verifies
    the tokens may not depend on the parser (I-JSON, RFC 7493 §2.3). The set is refused,
    naming the member, and no key of it is used."""
    sets = RemoteKeySets(FetchLimits(), check=jwks_problem, clock=ManualClock())
    text = json.dumps({**KEY, "x": OTHER_KEY["x"]})[:-1] + f', "x": {json.dumps(KEY["x"])}}}'
    rotating["text"] = '{"keys": [' + text + "]}"
    with pytest.raises(RemoteDocumentError, match="member 'x' twice"):
        anyio.run(sets.keys, rotating["uri"], "k1")
