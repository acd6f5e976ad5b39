"""Who is calling the `/v1` API: a Bearer API key, checked for the scope each route needs."""

from __future__ import annotations

from collections.abc import Iterable

import anyio
from starlette.requests import Request

from bastion.server.keys import ApiKey, KeyStore
from bastion.server.problems import Problem
from bastion.signals import suspensions


async def require(request: Request, scope: str) -> ApiKey:
    """The caller's key if it is valid and grants ``scope``; 401 or 403 otherwise.

    A key checked in the last second is answered from memory; any other is read from the
    database off the event loop (`DatabaseUnavailable` there is a 503, never a 401). A request
    with more than one Authorization header is a 400: one reader taking the first and another
    the last would read two callers into one request (`bastion.server.direct` hands it here).
    """
    sent = request.headers.getlist("authorization")
    if len(sent) > 1:
        raise Problem(
            400, "Bad request", f"send one Authorization header, not {len(sent)}: 'Bearer <key>'"
        )
    header = sent[0] if sent else ""
    kind, _, token = header.partition(" ")
    if kind.lower() != "bearer" or not token.strip():
        raise Problem(401, "Unauthorized", "send an API key as 'Authorization: Bearer <key>'")
    keys: KeyStore = request.app.state.keys
    token = token.strip()
    known, key = keys.remembered(token)
    if not known:
        key = await anyio.to_thread.run_sync(keys.verify, token)
    if key is None:
        raise Problem(401, "Unauthorized", "the API key is unknown, expired or revoked")
    require_scope(key, scope)
    return key


def require_scope(key: ApiKey, scope: str, needed_for: str = "") -> None:
    """403 unless ``key`` grants ``scope``: a route's own, or (``needed_for``) one that a part
    of what the route answers needs besides it."""
    if not key.allows(scope):
        raise lacking(scope, needed_for)


def lacking(scope: str, needed_for: str = "") -> Problem:
    """The 403 of a key without ``scope``, saying what needs it (``needed_for``) when that is
    not the route itself."""
    why = f" ({needed_for})" if needed_for else ""
    return Problem(
        403,
        "Forbidden",
        f"this key lacks the scope {scope!r}{why}; create a key with it (bastion keys create)",
    )


def require_for_facts(key: ApiKey, facts: Iterable[tuple]) -> None:
    """403 unless ``key`` may write these facts (or delete what these patterns match) through
    a fact API, which its route's scope allowed: a suspension, the kill switch, needs the
    ``suspensions`` scope too, so that the key of an application whose agents are suspended
    cannot lift their suspension (`bastion.signals.suspensions.names_suspensions`)."""
    if not key.allows(suspensions.SCOPE) and suspensions.names_suspensions(facts):
        raise Problem(
            403,
            "Forbidden",
            f"'{suspensions.PREDICATE}' facts are the kill switch: writing or deleting them"
            f" needs a key with the scope {suspensions.SCOPE!r} too; suspend and resume"
            " through /v1/suspensions (or bastion agents suspend), which also audits it",
        )
