"""Fake peers of bastion's per-user connections, served by uvicorn over the loopback: an
upstream's authorization server (RFC 8414 metadata, RFC 7591 registration, an authorization
endpoint, a token endpoint for codes and refresh tokens, RFC 7009 revocation), the upstream's
protected-resource metadata (RFC 9728), a 2025-11-25 MCP server that takes only the tokens it
is told to, and a bystander that records whatever reaches it. Each test module sets the behaviour it needs (refusals, rotation, a held refresh,
PKCE checks...) instead of writing its own server again."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import socket
import threading
from collections.abc import Iterable
from urllib.parse import urlencode

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from tests.waits import PATIENCE


def loopback_base(sock: socket.socket) -> str:
    """The http URL of a server on the loopback socket ``sock``."""
    return f"http://127.0.0.1:{sock.getsockname()[1]}"


class AuthorizationServer:
    """An upstream's authorization server at ``base`` that records every form posted to its
    token endpoint and its revocation endpoint (``posted``, in order; ``revocations``, those of
    the revocation endpoint alone), and counts the reads of its metadata (``metadata_reads``).

    By default it authorizes at once, whatever the client, and its token endpoint answers any
    code or refresh token with fresh tokens named after the server and a count
    (``access-of-<name>-<n>``, ``refresh-of-<name>-<n>``). The switches:

    - ``registration`` and ``revocation``: whether its metadata names those endpoints;
      ``sends_iss`` (RFC 9207): whether it says it sends ``iss`` with every code (and does);
      ``metadata_overrides``: fields of its metadata set to other values (other endpoints, an
      issuer that is no string); ``issuer``: the issuer its metadata names (by default the one
      asked, as RFC 8414 §3.3 wants); ``pkce_methods``: the PKCE methods it advertises (None:
      the field is left out);
    - ``under_paths``: it also serves metadata for any issuer under ``base`` (``{base}/<path>``,
      read at ``/.well-known/oauth-authorization-server/<path>``, RFC 8414 §3.1), each naming
      the issuer asked unless ``issuer`` says otherwise;
    - ``client_id``: the client id its registration endpoint gives (None: a new random one each
      time); the redirect URIs of each registered client are kept in ``clients``;
    - ``checks_codes``: the authorization endpoint takes only a registered client and redirect
      URI, and the token endpoint redeems only a code it issued, for that client and redirect
      URI, with the PKCE verifier of its challenge (``issued`` records whom it issued tokens
      to); by default any code is taken;
    - ``grant_types``: the grants its token endpoint takes (others: ``unsupported_grant_type``);
    - ``refusal``: ``(status, body)`` the token endpoint answers to everything (`refuse`);
      ``answer_text``: the JSON text (bytes, as they are) it answers with 200 instead;
    - ``rotates``: each refresh token is good once; a used one coming back revokes the whole
      grant (RFC 9700 §4.14.2), and ``revoked_grant`` says it happened;
    - ``issues_refresh_tokens``: whether an answer carries a refresh token; ``token_type``: the
      ``token_type`` its answers carry (None: the field is left out);
    - ``token_paths``: the path each request to its token endpoint came to: ``/token``, or
      ``/moved/token`` (served too, for a server whose metadata moves it there);
    - ``holds``: the token endpoint sets ``arrived`` and waits for ``release`` before answering
      (``"each"`` request, or only ``"first"``: a second request then lets the first go at once);
    - ``revoking``: the revocation endpoint answers once it is set (it is, unless a test clears
      it), each answer then noted in ``happened`` as ``("revoked", hint)``, where a test notes
      what happened meanwhile; ``revocation_refusal``: ``(status, body)`` it answers instead
      (``(503, {})``: a server away for a while), the form recorded all the same.
    """

    def __init__(
        self,
        name: str = "as",
        base: str = "",
        *,
        registration: bool = True,
        revocation: bool = True,
        sends_iss: bool = False,
        client_id: str | None = None,
        checks_codes: bool = False,
        grant_types: Iterable[str] = ("authorization_code", "refresh_token"),
        rotates: bool = False,
        issues_refresh_tokens: bool = True,
        holds: str | None = None,
        under_paths: bool = False,
    ) -> None:
        self.name = name
        self.base = base
        self.issuer: str | None = None
        self.registration = registration
        self.revocation = revocation
        self.sends_iss = sends_iss
        self.metadata_overrides: dict[str, object] = {}
        self.pkce_methods: object = ["S256"]
        self.under_paths = under_paths
        self.client_id = client_id
        self.checks_codes = checks_codes
        self.grant_types = frozenset(grant_types)
        self.rotates = rotates
        self.issues_refresh_tokens = issues_refresh_tokens
        self.token_type: str | None = "Bearer"
        assert holds in (None, "each", "first"), holds
        self.holds = holds
        self.refusal: tuple[int, dict] | None = None
        self.answer_text: bytes | None = None
        self.revocation_refusal: tuple[int, dict] | None = None
        self.clients: dict[str, list[str]] = {}  # client_id -> its redirect URIs
        self.codes: dict[str, dict] = {}  # with checks_codes: what each code was issued for
        self.issued: list[dict] = []  # with checks_codes: each grant redeemed, client and user
        self.posted: list[dict[str, str]] = []  # every form, token and revocation endpoints
        self.revocations: list[dict[str, str]] = []  # the revocation endpoint's forms
        self.metadata_reads = 0
        self.token_paths: list[str] = []
        self.token_requests = 0
        self.tokens_issued = 0
        self.live: set[str] = set()  # with rotates: the refresh tokens good now
        self.used: set[str] = set()
        self.revoked_grant = False
        self.arrived = threading.Event()
        self.release = threading.Event()
        self.revoking = threading.Event()
        self.revoking.set()
        self.happened: list[tuple[str, str | None]] = []

    @property
    def revoked(self) -> list[str]:
        """Each token sent to the revocation endpoint, in order."""
        return [form["token"] for form in self.revocations]

    def refuse(self, error: str, status: int = 400, **more: str) -> None:
        """From now on the token endpoint answers the OAuth ``error`` (RFC 6749 §5.2)."""
        self.refusal = (status, {"error": error, **more})

    def metadata_document(self, asked: str = "") -> dict:
        """Its RFC 8414 metadata as the issuer ``asked`` (``base`` unless one under it), as its
        switches make it now (tests change them mid-way)."""
        document: dict[str, object] = {
            "issuer": (asked or self.base) if self.issuer is None else self.issuer,
            "authorization_endpoint": f"{self.base}/authorize",
            "token_endpoint": f"{self.base}/token",
            "authorization_response_iss_parameter_supported": self.sends_iss,
        }
        if self.pkce_methods is not None:
            document["code_challenge_methods_supported"] = self.pkce_methods
        if self.registration:
            document["registration_endpoint"] = f"{self.base}/register"
        if self.revocation:
            document["revocation_endpoint"] = f"{self.base}/revoke"
        return {**document, **self.metadata_overrides}

    async def metadata(self, request: Request) -> Response:
        self.metadata_reads += 1
        path = request.path_params.get("path")
        return JSONResponse(self.metadata_document(f"{self.base}/{path}" if path else ""))

    async def register(self, request: Request) -> Response:
        body = await request.json()
        client_id = self.client_id or secrets.token_urlsafe(8)
        self.clients[client_id] = list(body.get("redirect_uris", []))
        return JSONResponse({**body, "client_id": client_id}, status_code=201)

    async def authorize(self, request: Request) -> Response:
        q = request.query_params
        if self.checks_codes and q.get("redirect_uri") not in self.clients.get(
            q.get("client_id", ""), []
        ):
            return Response("unknown client or redirect URI", status_code=400)
        code = f"code-of-{self.name}-{secrets.token_urlsafe(8)}"
        self.codes[code] = {
            "client_id": q.get("client_id"),
            "redirect_uri": q.get("redirect_uri"),
            "challenge": q.get("code_challenge"),
            "user": f"alice@{self.name}",  # the person signed in here, authorized at once
        }
        answer = {"code": code, "state": q["state"]}
        if self.sends_iss:
            answer["iss"] = self.base
        return RedirectResponse(f"{q['redirect_uri']}?{urlencode(answer)}", status_code=302)

    async def token(self, request: Request) -> Response:
        """RFC 6749 §3.2: held, refused, or redeemed as the switches say (in that order)."""
        form = {k: str(v) for k, v in (await request.form()).items()}
        self.posted.append(form)
        self.token_paths.append(request.url.path)
        self.token_requests += 1
        if self.holds == "each" or (self.holds == "first" and self.token_requests == 1):
            self.arrived.set()
            await anyio.to_thread.run_sync(self.release.wait, PATIENCE)
        elif self.holds == "first":
            self.release.set()  # a second request at once: the race is on
        if self.refusal is not None:
            status, body = self.refusal
            return JSONResponse(body, status_code=status)
        if self.answer_text is not None:
            return Response(self.answer_text, media_type="application/json")
        grant_type = form.get("grant_type", "")
        if grant_type not in self.grant_types:
            return _invalid("unsupported_grant_type")
        if grant_type == "authorization_code" and self.checks_codes:
            refused = self._redeem(form)
            if refused is not None:
                return refused
        if grant_type == "refresh_token" and self.rotates:
            refused = self._rotate(form.get("refresh_token", ""))
            if refused is not None:
                return refused
        self.tokens_issued += 1
        n = self.tokens_issued
        answer: dict[str, object] = {
            "access_token": f"access-of-{self.name}-{n}",
            "expires_in": 3600,
        }
        if self.token_type is not None:
            answer["token_type"] = self.token_type
        if self.issues_refresh_tokens:
            answer["refresh_token"] = refresh = f"refresh-of-{self.name}-{n}"
            self.live.add(refresh)
        return JSONResponse(answer)

    def _redeem(self, form: dict[str, str]) -> Response | None:
        """A code redeemed by its client, at its redirect URI, with its PKCE verifier (None),
        or the refusal."""
        grant = self.codes.pop(form.get("code", ""), None)
        verifier = form.get("code_verifier", "").encode()
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier).digest())
        if (
            grant is None
            or form.get("client_id") != grant["client_id"]
            or form.get("redirect_uri") != grant["redirect_uri"]
            or challenge.rstrip(b"=").decode() != grant["challenge"]
        ):
            return _invalid("invalid_grant")
        self.issued.append({"client_id": grant["client_id"], "user": grant["user"]})
        return None

    def _rotate(self, presented: str) -> Response | None:
        """A refresh token used once (None), or the refusal: reuse revokes the grant."""
        if presented in self.used or self.revoked_grant:
            self.revoked_grant = True
            self.live.clear()
            return _invalid("invalid_grant")
        if presented not in self.live:
            return _invalid("invalid_grant")
        self.live.discard(presented)
        self.used.add(presented)
        return None

    async def revoke(self, request: Request) -> Response:
        """RFC 7009: every token is taken (200) unless ``revocation_refusal`` says otherwise, and
        the form recorded for the test."""
        form = {k: str(v) for k, v in (await request.form()).items()}
        self.posted.append(form)
        self.revocations.append(form)
        await anyio.to_thread.run_sync(self.revoking.wait, PATIENCE)
        if self.revocation_refusal is not None:
            status, body = self.revocation_refusal
            return JSONResponse(body, status_code=status)
        self.happened.append(("revoked", form.get("token_type_hint")))
        return Response(status_code=200)

    def routes(self) -> list[Route]:
        """Its routes, to serve alone (`app`) or beside an upstream's on one host."""
        under = "/.well-known/oauth-authorization-server/{path:path}"
        return [
            Route("/.well-known/oauth-authorization-server", self.metadata),
            *([Route(under, self.metadata)] if self.under_paths else []),
            Route("/register", self.register, methods=["POST"]),
            Route("/authorize", self.authorize),
            Route("/token", self.token, methods=["POST"]),
            Route("/moved/token", self.token, methods=["POST"]),
            Route("/revoke", self.revoke, methods=["POST"]),
        ]

    def app(self) -> Starlette:
        return Starlette(routes=self.routes())


class ResourceMetadata:
    """An upstream MCP server's protected-resource metadata (RFC 9728) for ``{base}/mcp``,
    naming ``authorization_servers``; ``reads`` counts how often it was read (counted as each
    read arrives).

    ``holds``: each read waits for ``release`` before it is answered; ``down``: it is answered
    503 (a server that cannot say who its authorization servers are)."""

    def __init__(
        self,
        base: str = "",
        authorization_servers: list[str] | None = None,
        *,
        holds: bool = False,
    ) -> None:
        self.base = base
        self.authorization_servers = [] if authorization_servers is None else authorization_servers
        self.holds = holds
        self.down = False
        self.release = threading.Event()
        self.reads = 0

    async def metadata(self, request: Request) -> Response:
        self.reads += 1
        if self.holds:
            await anyio.to_thread.run_sync(self.release.wait, PATIENCE)
        if self.down:
            return JSONResponse({}, status_code=503)
        return JSONResponse(
            {"resource": f"{self.base}/mcp", "authorization_servers": self.authorization_servers}
        )

    def routes(self) -> list[Route]:
        return [Route("/.well-known/oauth-protected-resource/mcp", self.metadata)]

    def app(self) -> Starlette:
        return Starlette(routes=self.routes())


class McpUpstream:
    """A 2025-11-25 MCP server at ``url`` (``{base}/mcp``) that takes only the access tokens in
    ``accepted`` (401 ``invalid_token`` to any other, on a POST or a GET), and records every
    request (``requests``: HTTP method, JSON-RPC method, Authorization header).

    ``refuses_streams``: the GET of the standing stream is refused (401) whatever the token;
    ``resource_metadata``: the URL its refusals name (RFC 9728 §5.1), if any; ``greeting``: the
    ``instructions`` its ``initialize`` answers, ``{token}`` in it the token asked with (an
    upstream that tells each user something of their own). Its tool ``slow``
    takes the call, stops taking the token it came with, and ends its stream before answering:
    the answer is to come on the stream's resumption (SEP-1699); any other tool answers
    ``done with <token>``. A GET it takes is answered 405 (it offers no standing stream)."""

    def __init__(self, url: str = "", refuses_streams: bool = False) -> None:
        self.url = url
        self.accepted: set[str] = set()
        self.refuses_streams = refuses_streams
        self.resource_metadata = ""
        self.greeting = ""
        self.requests: list[tuple[str, str, str]] = []

    def calls(self) -> list[str]:
        """The token of each ``tools/call`` that reached the upstream, in order."""
        return [_bearer(header) for _, method, header in self.requests if method == "tools/call"]

    def _refused(self) -> Response:
        challenge = 'Bearer error="invalid_token"'
        if self.resource_metadata:
            challenge += f', resource_metadata="{self.resource_metadata}"'
        return Response(status_code=401, headers={"www-authenticate": challenge})

    async def post(self, request: Request) -> Response:
        message = json.loads(await request.body())
        header = request.headers.get("authorization", "")
        self.requests.append(("POST", str(message.get("method")), header))
        token = _bearer(header)
        if token not in self.accepted:
            return self._refused()
        if "id" not in message:
            return Response(status_code=202)
        if message["method"] == "initialize":
            result = {
                "protocolVersion": "2025-11-25",
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "tracker", "version": "1"},
            }
            if self.greeting:
                result["instructions"] = self.greeting.format(token=token)
            answer = {"jsonrpc": "2.0", "id": message["id"], "result": result}
            return JSONResponse(answer, headers={"mcp-session-id": "s-1"})
        if message["method"] != "tools/call":
            error = {"code": -32601, "message": "no such method"}
            return JSONResponse({"jsonrpc": "2.0", "id": message["id"], "error": error})
        if message["params"]["name"] == "slow":
            self.accepted.discard(token)  # revoked at the upstream once it took the call
            primed = "id: e-1\nretry: 10\ndata: \n\n"
            return Response(primed, media_type="text/event-stream")
        result = {"content": [{"type": "text", "text": f"done with {token}"}]}
        return JSONResponse({"jsonrpc": "2.0", "id": message["id"], "result": result})

    async def get(self, request: Request) -> Response:
        header = request.headers.get("authorization", "")
        self.requests.append(("GET", "", header))
        if self.refuses_streams or _bearer(header) not in self.accepted:
            return self._refused()
        return Response(status_code=405)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/mcp", self.post, methods=["POST"]),
                Route("/mcp", self.get, methods=["GET"]),
            ]
        )


class Bystander:
    """A service bastion has no business reaching (another host, an internal service): it
    records every request it gets (``got``: path and body, in order) and answers 404, for a
    test to say that nothing reached it, or what did."""

    def __init__(self) -> None:
        self.got: list[tuple[str, str]] = []

    async def record(self, request: Request) -> Response:
        self.got.append((request.url.path, (await request.body()).decode()))
        return JSONResponse({"error": "nothing here"}, status_code=404)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/{path:path}", self.record, methods=["GET", "POST"])])


def _bearer(header: str) -> str:
    return header.removeprefix("Bearer ")


def _invalid(error: str) -> Response:
    return JSONResponse({"error": error}, status_code=400)
