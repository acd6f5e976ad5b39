"""bastion's outbound fetches share the process's one TLS context (`bastion.tls.trust`): making one reads the trust
store (tens of milliseconds) on the event loop, which a fetch from each new host would do again
(a client metadata document from any host is fetched for anyone who names it)."""

from __future__ import annotations

import ssl

import anyio
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from bastion.gateway.http1 import Http1Client
from bastion.oauth.jwks import FetchLimits, fetch_json
from bastion.tls import trust
from tests.oauth.support import free_socket, serve


def test_fetches_make_no_tls_context_of_their_own(monkeypatch):
    trust()  # made once, for the process
    made = []
    create = ssl.create_default_context

    def counted(*args, **kwargs):
        made.append(args or kwargs)
        return create(*args, **kwargs)

    monkeypatch.setattr(ssl, "create_default_context", counted)

    async def document(request):
        return JSONResponse({"ok": True})

    with serve(Starlette(routes=[Route("/doc", document)]), free_socket()) as url:
        for _ in range(3):
            assert anyio.run(fetch_json, f"{url}/doc", FetchLimits()) == {"ok": True}
    for _ in range(3):
        Http1Client("https://upstream.example/mcp")  # an upstream session's own client
    assert made == []
