"""API key routes (scope ``admin``): create, list, revoke."""

from __future__ import annotations

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bastion.server.auth import require
from bastion.server.keys import KeyNameError, KeyStore
from bastion.server.problems import Problem, bad_request, read_json, unprocessable
from bastion.server.problems import field as get_field


async def create(request: Request) -> JSONResponse:
    caller = await require(request, "admin")
    body = await read_json(request)
    name = get_field(body, "name", str)
    scopes = get_field(body, "scopes", list)
    if not all(isinstance(s, str) for s in scopes):
        raise bad_request("scopes must be an array of strings")
    # Bounded by KeyStore.create, which the CLI goes through too.
    expires_in = get_field(body, "expires_in", (int, float), required=False)
    keys: KeyStore = request.app.state.keys
    try:
        key, record = await anyio.to_thread.run_sync(
            lambda: keys.create(name, scopes, expires_in=expires_in, created_by=caller.principal)
        )
    except KeyNameError as e:  # of the type and length the document says: refused by the store
        raise unprocessable(str(e)) from None
    except ValueError as e:
        raise bad_request(str(e)) from None
    # The only time the key itself is shown.
    return JSONResponse({**record.to_json(), "key": key}, status_code=201)


async def list_keys(request: Request) -> JSONResponse:
    await require(request, "admin")
    keys: KeyStore = request.app.state.keys
    found = await anyio.to_thread.run_sync(keys.list)
    return JSONResponse({"keys": [k.to_json() for k in found]})


async def revoke(request: Request) -> JSONResponse:
    caller = await require(request, "admin")
    keys: KeyStore = request.app.state.keys
    key_id = request.path_params["key_id"]
    if not await anyio.to_thread.run_sync(lambda: keys.revoke(key_id, actor=f"key:{caller.id}")):
        raise Problem(404, "Unknown key", f"no active key with id {key_id!r} (see GET /v1/keys)")
    return JSONResponse({"id": key_id, "revoked": True})


routes = [
    Route("/v1/keys", list_keys, methods=["GET"]),
    Route("/v1/keys", create, methods=["POST"]),
    Route("/v1/keys/{key_id}", revoke, methods=["DELETE"]),
]
