"""Fact routes: insert, delete by pattern, get (paginated), batch, and bulk import/export as JSON lines.

Every write is checked against the policy in force before anything is stored, commits as one
transaction, and returns its change-log sequence (the consistency token).
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Iterator
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from bastion.facts.model import FactError, fact_from_json
from bastion.facts.store import FactStore, StoredFact, WriteResult, epoch, fact_key
from bastion.server.auth import require, require_for_facts
from bastion.server.problems import bad_request, fact_problem, page_limit, parse_json, read_json
from bastion.server.problems import field as get_field
from bastion.server.replica import ConsistencyTimeout, Replica
from bastion.signals.suspensions import apply_facts
from bastion.turns import Turns, full_passes_held

MAX_PAGE = 1000
NDJSON = "application/x-ndjson"


def _stored_fact(request: Request, obj: Any, index: int | None, what: str = "fact") -> StoredFact:
    """A fact from its JSON form, checked against the policy in force."""
    replica: Replica = request.app.state.replica
    try:
        if not isinstance(obj, dict):
            raise FactError('a fact is {"predicate": str, "args": [...], "expires_at"?: number}')
        fact = replica.authz.facts.usable(fact_from_json(obj, also=("expires_at",)))  # checked once
        return StoredFact(fact, epoch(obj.get("expires_at")))
    except FactError as e:
        raise fact_problem(e, index, what) from None


def _pattern(obj: Any, index: int | None = None) -> tuple:
    try:
        return fact_from_json(obj, pattern=True)
    except FactError as e:
        raise fact_problem(e, index, "pattern") from None


async def _write(request: Request, inserts: list[StoredFact], deletes: list[tuple]) -> dict:
    """Commit the write, wait (bounded) until this replica reflects it, return the counts."""
    store: FactStore = request.app.state.store
    key = request.state.key

    def write() -> WriteResult:
        # In the worker thread too: an import holds hundreds of thousands of facts.
        require_for_facts(key, itertools.chain((f.fact for f in inserts), deletes))
        return apply_facts(store, inserts, deletes, key.principal)

    try:
        result: WriteResult = await anyio.to_thread.run_sync(write)
    except FactError as e:  # a fact too large to store (`bastion.facts.store.MAX_FACT_KEY`)
        raise fact_problem(e) from None
    request.app.state.metrics.writes.labels("facts").inc()
    replica: Replica = request.app.state.replica
    # Committed either way; on a timeout the returned sequence lets the caller ask for it later.
    with contextlib.suppress(ConsistencyTimeout):
        await replica.wait_for(result.seq, request.app.state.config.consistency_timeout)
    return {"sequence": result.seq, "inserted": result.inserted, "deleted": result.deleted}


def _fact_list(body: dict, name: str) -> list:
    return get_field(body, name, list, required=False) or []


async def insert(request: Request) -> JSONResponse:
    """Insert facts; a top-level ``expires_at`` applies to those that name none."""
    request.state.key = await require(request, "facts:write")
    body = await read_json(request)
    default_expiry = get_field(body, "expires_at", (int, float), required=False)
    facts = get_field(body, "facts", list)
    inserts = []
    for i, obj in enumerate(facts):
        if isinstance(obj, dict) and default_expiry is not None and "expires_at" not in obj:
            obj = {**obj, "expires_at": default_expiry}
        inserts.append(_stored_fact(request, obj, i))
    return JSONResponse(await _write(request, inserts, []))


async def delete(request: Request) -> JSONResponse:
    """Delete every fact matching any of the patterns (``null`` matches any value)."""
    request.state.key = await require(request, "facts:write")
    body = await read_json(request)
    patterns = [_pattern(p, i) for i, p in enumerate(get_field(body, "patterns", list))]
    return JSONResponse(await _write(request, [], patterns))


async def batch(request: Request) -> JSONResponse:
    """Deletes (patterns) then inserts, together or not at all."""
    request.state.key = await require(request, "facts:write")
    body = await read_json(request)
    deletes = [_pattern(p, i) for i, p in enumerate(_fact_list(body, "delete"))]
    inserts = [_stored_fact(request, f, i) for i, f in enumerate(_fact_list(body, "insert"))]
    if not deletes and not inserts:
        raise bad_request("a batch needs 'insert' or 'delete' (arrays of facts and patterns)")
    return JSONResponse(await _write(request, inserts, deletes))


async def get(request: Request) -> JSONResponse:
    """Stored facts matching ``pattern`` (JSON in the query string), a page at a time."""
    await require(request, "facts:read")
    params = request.query_params
    pattern = None
    if "pattern" in params:
        depth = request.app.state.config.max_json_depth
        pattern = _pattern(parse_json(params["pattern"], depth, "the query parameter 'pattern'"))
    limit = page_limit(request, MAX_PAGE)
    cursor = params.get("cursor", "")
    store: FactStore = request.app.state.store
    page = await anyio.to_thread.run_sync(lambda: store.get(pattern, after=cursor, limit=limit + 1))
    more = len(page) > limit
    page = page[:limit]
    return JSONResponse(
        {
            "facts": [f.to_json() for f in page],
            "next_cursor": fact_key(page[-1].fact) if more and page else None,
        }
    )


async def import_lines(request: Request) -> JSONResponse:
    """Bulk import: one fact per line (JSON); the whole body is one transaction."""
    request.state.key = await require(request, "facts:write")
    # Kept as the chunks that came: joined, tens of megabytes would hold the event loop.
    chunks = [chunk async for chunk in request.stream()]
    depth = request.app.state.config.max_json_depth

    def parse() -> list[StoredFact]:
        inserts = []
        for n, line in enumerate(Turns().lines(chunks), start=1):
            if not line.strip():
                continue
            obj = parse_json(line, depth, f"line {n}")
            inserts.append(_stored_fact(request, obj, n, what="line"))
        return inserts

    # A large import is checked off the event loop, in turns, so decisions go on meanwhile; the
    # collector's full passes are held until its facts are let go of (each pass would walk all
    # of them, more each time, holding the GIL), and they are let go of in turns too.
    with full_passes_held():
        inserts = await anyio.to_thread.run_sync(parse)
        if not inserts:
            raise bad_request("the body holds no facts; send one JSON fact per line")
        written = await _write(request, inserts, [])
        await anyio.to_thread.run_sync(Turns().empty, inserts)
    return JSONResponse(written)


async def export_lines(request: Request) -> StreamingResponse:
    """Every live fact, one JSON object per line."""
    await require(request, "facts:read")
    store: FactStore = request.app.state.store

    def lines() -> Iterator[bytes]:
        for f in store.iter_all():
            yield (json.dumps(f.to_json(), separators=(",", ":")) + "\n").encode()

    return StreamingResponse(lines(), media_type=NDJSON)


routes = [
    Route("/v1/facts", get, methods=["GET"]),
    Route("/v1/facts", insert, methods=["POST"]),
    Route("/v1/facts/delete", delete, methods=["POST"]),
    Route("/v1/facts/batch", batch, methods=["POST"]),
    Route("/v1/facts/import", import_lines, methods=["POST"]),
    Route("/v1/facts/export", export_lines, methods=["GET"]),
]
