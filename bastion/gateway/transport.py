"""``/mcp/<server>``: MCP Streamable HTTP for clients, in both protocol eras.

- 2025-11-25: ``initialize`` opens a session (``Mcp-Session-Id``, bound to the token's user and
  agent); later POSTs carry it; GET opens the standing SSE stream; DELETE ends the session.
- 2026-07-28: every POST stands alone: the ``MCP-Protocol-Version``, ``Mcp-Method`` and
  ``Mcp-Name`` headers must agree with the body's envelope, method and name.

Answers are JSON, or SSE when the request asked for progress (notifications first, the answer
last) or is still running after a moment. A request is cancelled upstream when its client
cancels it (``notifications/cancelled``) or goes away. Bad input (malformed JSON-RPC, batches, header/body mismatch, unknown sessions, oversized
bodies) is refused here, before anything reaches an upstream.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
from starlette.types import Receive, Scope, Send

from bastion import untrusted_json
from bastion.cors import CrossOrigin
from bastion.db import DatabaseUnavailable
from bastion.decide.mcp import message_action
from bastion.gateway.client_requests import kept_capabilities
from bastion.gateway.enforce import Caller, Held, StepUp
from bastion.gateway.handlers import (
    Exchange,
    admit_and_start,
    handler_for,
    refusal_to_follow,
    refuse_suspended,
)
from bastion.gateway.holds import pending_error
from bastion.gateway.jsonrpc import (
    APPROVAL_PENDING,
    FACTS_STALE,
    HEADER_MISMATCH,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    LEGACY_VERSIONS,
    METHOD_NOT_FOUND,
    MODERN_VERSIONS,
    PARSE_ERROR,
    RATE_LIMIT_UNAVAILABLE,
    RATE_LIMITED,
    REFUSED_BY_POLICY,
    SESSION_NOT_FOUND,
    UNSUPPORTED_PROTOCOL_VERSION,
    Message,
    RpcError,
    encode,
    notification,
    parse_message,
    result,
)
from bastion.gateway.mcp_name import NAME_PARAMS
from bastion.gateway.mcp_name import decode as decode_name
from bastion.gateway.metadata import challenge
from bastion.gateway.sessions import LIST_CHANGED, SUBSCRIPTION_ID, Listener, read_decision
from bastion.gateway.upstream import REVOKED
from bastion.gateway.upstream_credentials import client_declared
from bastion.gateway.uris import resource_uri
from bastion.http_fields import accepts, media_type
from bastion.identity.trusted_issuers import IssuerUnavailable
from bastion.large_json import LargeMessage, written
from bastion.oauth.dpop import NONCE_HEADER, InvalidDPoPProof, UseDPoPNonce, one_proof
from bastion.oauth.errors import InvalidToken
from bastion.signals.step_up import ERROR as SIGN_IN_AGAIN

if TYPE_CHECKING:
    from bastion.gateway.gateway import Gateway
    from bastion.oauth.verifier import VerifiedToken
    from bastion.signals.posture import PostureSettings, RequestPosture

log = logging.getLogger("bastion.gateway")

DPOP_HEADER = b"dpop"
JSON = "application/json"
EVENT_STREAM = "text/event-stream"
# At most this many callers are kept for requests to come (`StreamableHttpEndpoint._caller`).
_CALLERS = 4096
# The longest Mcp-Session-Id or MCP-Protocol-Version a remembered caller is kept with: longer than
# any session id bastion makes (22 characters) or version it speaks, so such a request's caller
# is made again each time rather than its header text kept (up to the 64 KiB of a head).
_REMEMBERED_HEADER = 64
# The DPoP refusals of a verified token that are audited (`_authenticate`).
_AUDITED_DPOP_REFUSALS = frozenset({"invalid_token", "invalid_dpop_proof", "facts_stale"})
CANCELLED = "notifications/cancelled"
_ENVELOPE_VERSION = "io.modelcontextprotocol/protocolVersion"
_ENVELOPE_CAPABILITIES = "io.modelcontextprotocol/clientCapabilities"
# Headers read as one value: who calls, from which page, the body's type, the era, the session
# and (2026-07-28) the routing. Sent twice, one reader (a proxy, a load balancer keeping sessions
# on their replica, a log) could take the first where bastion takes the last, and the request
# reads as two: refused (400, -32020) in every method and era. These two before the token is
# read (whose would it be?), the others once it is, audited as refusals are. So are the device
# and posture headers of a trusted proxy (`PostureSettings.proxy_headers`), whose copy and the
# client's could not be told apart.
_BEFORE_TOKEN = frozenset({"authorization", "origin"})
# CORS (`bastion.cors`) for the pages of the allowed origins: the methods taken here, every
# header bastion reads of a request (and ``Accept``, whose value a browser may not send
# unasked), and the headers of its answers a client must read (the session a 2025-11-25
# ``initialize`` opens, the era, a 401's challenge, a 503's or 429's wait, a DPoP nonce).
_CORS_METHODS = ("GET", "POST", "DELETE")
_CORS_REQUEST_HEADERS = (
    "authorization",
    "content-type",
    "accept",
    "mcp-protocol-version",
    "mcp-session-id",
    "last-event-id",
    "mcp-method",
    "mcp-name",
    "dpop",
)
_CORS_EXPOSED = (
    "mcp-session-id",
    "mcp-protocol-version",
    "www-authenticate",
    "retry-after",
    "dpop-nonce",
)
_READ_ONCE = _BEFORE_TOKEN | {
    "content-type",
    "mcp-protocol-version",
    "mcp-session-id",
    "mcp-method",
    "mcp-name",
}


def cross_origin(origins: frozenset[str], posture: PostureSettings) -> CrossOrigin:
    """The CORS answers of ``/mcp/<server>`` to pages of ``origins``; the device and posture
    headers of ``posture`` (a trusted proxy's) are among what may be sent."""
    return CrossOrigin(
        origins,
        _CORS_METHODS,
        (*_CORS_REQUEST_HEADERS, *sorted(posture.proxy_headers)),
        _CORS_EXPOSED,
    )


class HttpError(Exception):
    """An HTTP answer that is not a JSON-RPC response (401, 403, 405, 413...)."""

    def __init__(
        self, status: int, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None
    ) -> None:
        self.status, self.body, self.headers = status, body, headers or {}


class _Undecided(HttpError):
    """A DPoP-bound call refused by a replica that decides nothing now (stale facts, its clock
    off) before its proof was spent: 503, and audited (``facts_stale``), since no decision
    record holds it."""

    REASON = "facts_stale"

    def __init__(self) -> None:
        super().__init__(
            503,
            {
                "error": "temporarily_unavailable",
                "error_description": "this replica decides nothing now (its facts may be out of"
                " date, or its clock is off): retry, or ask another replica; the DPoP proof is"
                " not spent",
            },
            {"retry-after": "1"},
        )


def _check_routing(message: Message, headers: dict[str, str], required: bool) -> None:
    """The 2026-07-28 routing headers (Mcp-Method, Mcp-Name) agree with the body, or
    HEADER_MISMATCH: ``required`` in that era; in 2025-11-25, where sent (bastion reads the
    body, and a proxy, a load balancer or a log in front may route or count by them). One sent
    twice is refused before, in every era (`_sent_twice`)."""
    method = headers.get("mcp-method")
    if method != message.method and (required or method is not None):
        raise RpcError(
            HEADER_MISMATCH,
            "the Mcp-Method header does not match the body's method",
            http_status=400,
        )
    key = NAME_PARAMS.get(message.method or "")
    name = headers.get("mcp-name")
    if (
        key is not None
        and (required or name is not None)
        and decode_name(name) != message.params.get(key)
    ):
        raise RpcError(
            HEADER_MISMATCH, f"the Mcp-Name header does not match params.{key}", http_status=400
        )


async def send_json(
    send: Send,
    status: int,
    body: Any,
    headers: dict[str, str] | None = None,
    large: bool = False,
) -> int:
    """A whole HTTP response: ``body`` as compact JSON (none if None), with ``headers``; returns
    the length of the body sent. ``large``: ``body`` is made of a large upstream message, and
    is written off the loop (`bastion.large_json`)."""
    if body is None:
        data = b""
    elif large:
        data = await asyncio.to_thread(written, body)
    else:
        data = encode(body)
    if body is not None and not headers:
        # The direct gateway's cycle writes such an answer at once (`GatewayCycle.send_whole_json`).
        whole = getattr(getattr(send, "__self__", None), "send_whole_json", None)
        if whole is not None and whole(status, data):
            return len(data)
    raw = [(b"content-type", b"application/json")] if body is not None else []
    if headers:
        raw += [(k.encode(), v.encode()) for k, v in headers.items()]
    raw.append((b"content-length", b"%d" % len(data)))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})
    return len(data)


def _counted(ex: Exchange, size: int) -> None:
    """Count the answer's bytes in the behaviour counters, if it released a result."""
    if ex.returned_keys is not None:
        ex.gateway.enforcer.behavior.returned(ex.returned_keys, size)


def _event(message: dict[str, Any]) -> bytes:
    return b"event: message\ndata: " + encode(message) + b"\n\n"


def _large_event(message: dict[str, Any]) -> bytes:
    """`_event`, on a worker thread, for a message made of a large upstream message."""
    return b"event: message\ndata: " + written(message) + b"\n\n"


async def _event_of(message: dict[str, Any], large: bool = False) -> bytes:
    """`_event`, written off the loop when ``message`` is made of a large upstream message
    (a `LargeMessage`, or ``large``)."""
    if large or message.__class__ is LargeMessage:
        return await asyncio.to_thread(_large_event, message)
    return _event(message)


async def _start_events(send: Send, headers: dict[str, str] | None = None) -> None:
    raw = [
        (b"content-type", b"text/event-stream"),
        (b"cache-control", b"no-cache, no-transform"),
        (b"x-accel-buffering", b"no"),
    ]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": 200, "headers": raw})


class StreamableHttpEndpoint:
    """What answers at ``/mcp/<server>``."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        # (the token's verified facts, address, protocol version, session, posture, by the
        # identity of the first and last) -> (those two, the `Caller` made of them): see `_caller`.
        self._callers: dict[tuple, tuple[VerifiedToken, RequestPosture, Caller]] = {}
        # Read as one value here: bastion's own, and the device headers of a trusted proxy.
        self._read_once = _READ_ONCE | gateway.posture.proxy_headers

    async def serve(self, server: str, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer one HTTP request (ASGI) for the upstream named ``server``."""
        upstream = self.gateway.upstreams.get(server)
        try:
            # ASGI servers give header names lowercased. (A dict comprehension: map and zip over
            # bytes.decode, or one decode of them joined, split again, run fewer bytecodes but
            # half again as many instructions, by callgrind.)
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            twice: tuple[str, ...] = ()
            if len(headers) != len(scope["headers"]):
                # A name came more than once (the dict kept the last): looked at only then.
                twice = _sent_twice(scope, self._read_once)
                _join_accept(scope, headers)
            if twice and "origin" in twice:
                raise HttpError(400, _twice("origin").body(None))
            origin = headers.get("origin")
            if origin is not None:
                # A request without Origin does not come from a page, and pays nothing more.
                cors = self.gateway.cors
                if not cors.allows(origin):
                    # MCP's transport: a page of another origin (DNS rebinding) gets 403,
                    # whatever it sends, and no CORS headers (its preflight as well).
                    raise HttpError(
                        403,
                        RpcError(
                            INVALID_REQUEST,
                            f"requests from the origin {origin[:100]!r} are not allowed: list"
                            " it in [gateway] allowed_origins",
                        ).body(None),
                    )
                if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
                    # A preflight carries no token: answered before one is asked for.
                    await cors.answer_preflight(origin, send)
                    return
                send = cors.sending(origin, send)
            if twice and "authorization" in twice:
                # Refused before the token is read (whose would it be?), a page's with CORS.
                raise HttpError(400, _twice("authorization").body(None))
            if upstream is None:
                raise HttpError(404, {"error": f"no MCP server named {server!r} behind bastion"})
            # Read before the token is checked: a revocation heard from then on finds this
            # request nowhere until it is under way (`_post`).
            heard = self.gateway.revocations_heard
            caller = await self._authenticate(server, headers, scope)
            method = scope["method"]
            if twice:
                named = None if method == "POST" else method[:20]
                raise await self._refused(_twice(twice[0]), caller, server, named, None)
            if method == "POST":
                await self._post(upstream, caller, headers, scope, receive, send, heard)
            elif method == "GET":
                await self._get(server, caller, headers, receive, send)
            elif method == "DELETE":
                await self._delete(server, caller, headers)
                await send_json(send, 204, None)
            else:
                refusal = RpcError(
                    INVALID_REQUEST,
                    f"{method[:20]} is not taken here: send GET, POST or DELETE",
                    http_status=405,
                )
                raise await self._refused(
                    refusal, caller, server, method[:20], None, {"allow": "GET, POST, DELETE"}
                )
        except HttpError as e:
            await send_json(send, e.status, e.body, e.headers)

    # -- authentication (RFC 6750, RFC 9728) -----------------------------------------------------

    async def _authenticate(self, server: str, headers: dict[str, str], scope: Scope) -> Caller:
        kind, token, _ = _bearer(headers)
        address = (scope.get("client") or ("", 0))[0] or ""
        verified = await self._verified(server, headers, address)
        caller = self._caller(verified, address, headers)
        if verified.jkt is not None or kind == "dpop":
            try:
                await self._check_dpop(server, kind, token, verified.jkt, scope)
            except HttpError as e:
                # A verified token without a proof of its key (not a nonce to retry with, nor
                # a database that is down), or a replica that decides nothing now: audited as
                # other refused requests are.
                body = e.body or {}
                error = _Undecided.REASON if isinstance(e, _Undecided) else body.get("error")
                if error in _AUDITED_DPOP_REFUSALS:
                    description = body.get("error_description", "")
                    await self.gateway.refusals.record(
                        error, caller, server, None, None, description
                    )
                raise
        return caller

    async def _verified(self, server: str, headers: dict[str, str], address: str) -> VerifiedToken:
        """The facts of the request's access token; `HttpError` 401 (``invalid_token``, with the
        challenge to authorize anew) for none, or one not valid now (expired, revoked, of a
        disabled user...), 503 while its state cannot be read. Asked when a request arrives,
        and again while a request waits for people, and before it goes on
        (`Exchange.still_valid`)."""
        gateway = self.gateway
        kind, _, presented = _bearer(headers)
        if kind not in ("bearer", "dpop") or not presented:
            raise HttpError(
                401,
                {
                    "error": "invalid_token",
                    "error_description": "a Bearer access token is required",
                },
                {
                    "www-authenticate": challenge(
                        gateway.metadata_url(server), gateway.challenge_scopes(server)
                    )
                },
            )
        try:
            verified = await gateway.verify_token(presented, server, address or None)
        except InvalidToken as e:
            raise HttpError(
                401,
                {"error": "invalid_token", "error_description": e.reason},
                {
                    "www-authenticate": challenge(
                        gateway.metadata_url(server),
                        gateway.challenge_scopes(server),
                        error="invalid_token",
                        description=e.reason,
                    )
                },
            ) from None
        except (DatabaseUnavailable, IssuerUnavailable) as e:
            # The token's revocation state, or its issuer's keys or introspection, cannot be
            # read: refused until they can (fail closed).
            raise HttpError(
                503,
                {"error": "temporarily_unavailable", "error_description": f"{e}"},
                {"retry-after": "1"},
            ) from None
        return verified

    def _caller(self, verified: VerifiedToken, address: str, headers: dict[str, str]) -> Caller:
        """Who sends the request: a `Caller` (frozen) of the token's verified facts, the address,
        the protocol version, the session and the posture. Made once for each of these and given
        again: a remembered token's facts, as a posture, are the same object from request to
        request. The entry keeps both objects, so their ids are not another's while it is kept."""
        posture = self.gateway.posture.read(
            address, headers, verified.claims, verified.sign_in.acr, verified.sign_in.amr
        )
        version = headers.get("mcp-protocol-version", "")
        session_id = headers.get("mcp-session-id", "")
        key = (id(verified), address, version, session_id, id(posture))
        known = self._callers.get(key)
        if known is not None and known[0] is verified and known[1] is posture:
            return known[2]
        caller = Caller(
            subject=verified.subject,
            client_id=verified.client_id,
            scopes=verified.scopes,
            address=address,
            protocol_version=version,
            grant_id=verified.grant_id,
            session_id=session_id,
            auth_time=verified.auth_time,
            posture=posture,
            # A delegated token's chain (RFC 8693 act), checked by the verifier.
            agents=verified.agents,
            task=verified.task or "",
            labels_task=verified.labels_task,
        )
        if len(session_id) > _REMEMBERED_HEADER or len(version) > _REMEMBERED_HEADER:
            return caller  # no session or era of bastion's: refused later, and not kept
        if len(self._callers) >= _CALLERS:
            self._callers.clear()
        self._callers[key] = (verified, posture, caller)
        return caller

    async def _check_dpop(
        self, server: str, kind: str, token: str, jkt: str | None, scope: Scope
    ) -> None:
        """RFC 9449 §7: a DPoP-bound token is taken only as ``Authorization: DPoP`` with a proof
        of its key made for this very request (method, URL, the token's hash), and the DPoP
        scheme only with a bound token. One signature check and one jti write, off the loop,
        and only on a replica that may decide (`Enforcer.may_decide`): one that will refuse
        the call anyway answers 503 first, its proof unspent."""
        dpop = self.gateway.dpop

        def refused(error: str, description: str) -> HttpError:
            challenge = (
                f'DPoP error="{error}"' if dpop is None else dpop.challenge(error, description)
            )
            body = {"error": error, "error_description": description}
            return HttpError(401, body, {"www-authenticate": challenge})

        if dpop is None:
            raise refused("invalid_token", "this gateway does not accept DPoP-bound tokens")
        if kind != "dpop":
            raise refused(
                "invalid_token",
                "this access token is bound to a DPoP key: send it as 'Authorization: DPoP"
                " <token>' with a DPoP proof",
            )
        if jkt is None:
            raise refused(
                "invalid_token",
                "this access token is not DPoP-bound: send it as 'Authorization: Bearer <token>'",
            )
        if not await self.gateway.enforcer.may_decide():
            raise _Undecided  # before the proof's jti is spent: the request is good elsewhere
        proofs = [v.decode("latin-1") for k, v in scope["headers"] if k == DPOP_HEADER]
        try:
            proof = one_proof(proofs)
            if proof is None:
                raise InvalidDPoPProof("send a proof of the token's key in the DPoP header")
            checked = await anyio.to_thread.run_sync(
                dpop.use, proof, scope["method"], self.gateway.resource(server), token
            )
        except UseDPoPNonce as e:
            error = refused(e.error, e.description)
            error.headers[NONCE_HEADER] = e.nonce
            raise error from None
        except InvalidDPoPProof as e:
            raise refused("invalid_dpop_proof", e.description) from None
        except DatabaseUnavailable as e:
            # The proof's jti cannot be recorded: refused until it can (fail closed).
            raise HttpError(
                503,
                {"error": "temporarily_unavailable", "error_description": f"{e}"},
                {"retry-after": "1"},
            ) from None
        if checked.jkt != jkt:
            raise refused(
                "invalid_dpop_proof",
                "the DPoP proof is made with another key than the one this token is bound to",
            )

    # -- POST --------------------------------------------------------------------------------------

    async def _body(self, headers: dict[str, str], receive: Receive) -> bytes:
        # gateway.max_body_bytes and the body's deadline are enforced while it arrives, by
        # bastion.server.request_limits in front of the gateway (or, for a body held by the
        # protocol, before the cycle is made: `GatewayCycle.take_body` gives it at once).
        take = getattr(getattr(receive, "__self__", None), "take_body", None)
        if take is not None and (whole := take()) is not None:
            return whole
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise HttpError(400, RpcError(INVALID_REQUEST, "the client went away").body(None))
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                return b"".join(chunks)

    async def _post(
        self,
        upstream,
        caller: Caller,
        headers: dict[str, str],
        scope: Scope,
        receive: Receive,
        send: Send,
        heard: int,
    ) -> None:
        """A POSTed message; ``heard``: `Gateway.revocations_heard` when the token of
        ``caller`` was checked."""
        gateway = self.gateway
        content_type = headers.get("content-type", "")
        # What clients send, compared at once; any other spelling read as RFC 9110 reads it.
        if content_type != JSON and media_type(content_type) != JSON:
            refusal = RpcError(
                INVALID_REQUEST, "POST a JSON-RPC message as application/json", http_status=415
            )
            raise await self._refused(refusal, caller, upstream.name, None, None)
        raw = await self._body(headers, receive)
        try:
            # Integers are passed on as sent: only their nesting and finiteness are checked. A
            # member named twice is refused as by every other reader of bastion's.
            value = untrusted_json.loads(
                raw, max_depth=gateway.max_json_depth, bounded_numbers=False, unique_keys=True
            )
        except untrusted_json.JsonRefused as e:
            refusal = RpcError(PARSE_ERROR, f"the body is refused: {e}", http_status=400)
            raise await self._refused(refusal, caller, upstream.name, None, None) from None
        if isinstance(value, list):
            refusal = RpcError(
                INVALID_REQUEST,
                "JSON-RPC batches are not accepted: MCP 2025-06-18 and later send one message"
                " per POST",
                http_status=400,
            )
            raise await self._refused(refusal, caller, upstream.name, None, None)
        try:
            message = parse_message(value)
        except RpcError as e:
            request_id = value.get("id") if isinstance(value, dict) else None
            named = value.get("method") if isinstance(value, dict) else None
            raise await self._refused(
                e,
                caller,
                upstream.name,
                named,
                request_id if isinstance(request_id, str | int) else None,
            ) from None
        method = message.method
        version = headers.get("mcp-protocol-version", "")
        modern = version in MODERN_VERSIONS
        session = None
        kept: dict[str, Any] = {}  # what a new 2025-11-25 session keeps of its capabilities
        response_headers: dict[str, str] = {}
        try:
            if method == "initialize":
                kept = kept_capabilities(message.params.get("capabilities"))
            if modern:
                self._check_modern(message, headers)
            else:
                if version and version not in LEGACY_VERSIONS:
                    raise _unsupported(version)
                if method is not None and ("mcp-method" in headers or "mcp-name" in headers):
                    _check_routing(message, headers, False)
                session = self._legacy_session(upstream.name, caller, method, headers)
        except RpcError as e:
            raise await self._refused(e, caller, upstream.name, method, message.id) from None
        owner = (upstream.name, caller.subject, caller.chain, session and session.id)
        if (
            (method is None or not message.is_request)
            and method != CANCELLED
            and gateway.enforcer.suspended(caller) is not None
        ):
            # Answered 202 with no decision: the kill switch refuses it still, 403 (a
            # cancellation only stops what the caller started, so it stays allowed).
            try:
                await refuse_suspended(Exchange(gateway, upstream, caller, message))
            except RpcError as e:
                raise HttpError(_REFUSAL_STATUS.get(e.code, 403), e.body(None)) from None
        if method is None:
            # A response to what bastion asked this client for an upstream (sampling...).
            try:
                self._answered(owner, message)
            except RpcError as e:
                raise await self._refused(e, caller, upstream.name, None, None) from None
            await send_json(send, 202, None)
            return
        if not message.is_request:
            # Notifications from the client are acknowledged and not forwarded.
            if method == CANCELLED:
                named = message.params.get("requestId")
                # Only an id a request can have (a list or an object is no key: a 500 if tried).
                if isinstance(named, str | int) and not isinstance(named, bool):
                    flight = gateway.in_flight.get((*owner, named))
                    if flight is not None:
                        flight.cancel("cancelled")
            await send_json(send, 202, None)
            return
        if modern and method == "subscriptions/listen":
            await self._listen(upstream, caller, message, headers, receive, send)
            return
        meta = message.params.get("_meta")
        if modern:
            declared = meta.get(_ENVELOPE_CAPABILITIES)  # type: ignore[union-attr]
        else:
            declared = session.capabilities if session is not None else None
        if not isinstance(declared, dict):
            declared = None
        # Per-user credentials: whether a user not connected yet is asked by URL elicitation.
        client_declared(declared)
        exchange = Exchange(
            gateway,
            upstream,
            caller,
            message,
            capabilities=declared if declared is not None else {},
            owner=owner,
            session=session,
            # A request that waits for people has its token checked again before it goes on.
            still_valid=partial(self._verified, upstream.name, headers, caller.address),
        )
        if method == "initialize":
            # 2025-11-25 only (`_check_modern`). Chosen now: a session's own upstream session is
            # opened for it at initialize.
            exchange.opening = gateway.sessions.new_id()
        handler = handler_for(method, gateway.config.pass_methods)
        # A POST is answered as an event stream only for a client that names it (or text/*): an
        # HTTP library's default */* reads JSON, as does a request without Accept (MCP requires
        # the field; RFC 9110 would read its absence as anything).
        wants_events = accepts(headers.get("accept", ""), EVENT_STREAM, anything=False)
        # While bastion waits, the request can be cancelled: by the client's
        # notifications/cancelled (same user, chain and session), or by its going away. A request
        # still running after _WATCH_AFTER seconds gets a task that notices the client leaving
        # and, if the client accepts SSE, starts the answer as an event stream (SDK clients send
        # nothing more, a cancellation included, until an answer has begun). Quicker requests
        # cost one timer.
        key = (*owner, message.id)
        task = asyncio.current_task()
        flight = gateway.in_flight[key] = InFlight(task, exchange)
        # Answered as events once the upstream reports progress or a log message the client
        # asked for (at its level: its session's in 2025-11-25, the request's in 2026-07-28).
        progress = wants_events and (
            (isinstance(meta, dict) and "progressToken" in meta)
            or (exchange.log_level is not None and method not in _ANSWERED_WHOLE)
        )
        early = wants_events and not progress and method not in _ANSWERED_WHOLE
        # The task's loop is the running one (not asked again: a getpid() on Python 3.11).
        loop = task.get_loop() if task is not None else asyncio.get_running_loop()
        timer = loop.call_later(
            _WATCH_AFTER, flight.watch, receive, send if early else None, response_headers
        )
        if early:

            async def emit(event: dict[str, Any]) -> None:
                await flight.emit(send, response_headers, event)

            exchange.emit = emit
        try:
            if gateway.revocations_heard != heard:
                # A revocation was heard after the token was checked (its body still coming,
                # say), and found this request nowhere: its token is checked again (401 if
                # refused) before anything goes on. Any one heard from now on finds it.
                await exchange.still_valid()
            if progress:
                await self._answer_with_events(exchange, handler, send, response_headers, flight)
                return
            body, status, extra = await self._run(exchange, handler)
        except HttpError as e:
            if flight.sending is None:
                raise
            # The answer has begun as events: a refusal can only be a JSON-RPC error now.
            body = _late_refusal(e).body(message.id)
        except asyncio.CancelledError:
            if flight.reason is None:
                raise
            task.uncancel()  # type: ignore[union-attr]
            if flight.refusal is None:
                if flight.reason == "cancelled":
                    await flight.end(send, None)
                return
            # Stopped: its token revoked, or its caller suspended, meanwhile.
            body, status, extra = flight.answer_of_stopped(flight.sending is not None), 200, {}
        finally:
            timer.cancel()
            flight.finish()
            exchange.release()
            if gateway.in_flight.get(key) is flight:
                del gateway.in_flight[key]
        if flight.sending is not None:
            _counted(exchange, await flight.end(send, body, exchange.large))
            return
        if method == "initialize" and "error" not in body:
            opened = gateway.sessions.open(
                upstream.name,
                caller.subject,
                caller.chain,
                exchange.notes["protocol_version"],
                kept,
                session_id=exchange.opening,
            )
            extra["mcp-session-id"] = opened.id
        sent = await send_json(send, status, body, {**response_headers, **extra}, exchange.large)
        _counted(exchange, sent)

    async def _refused(
        self,
        error: RpcError,
        caller: Caller,
        server: str,
        method: Any,
        request_id: Any,
        headers: dict[str, str] | None = None,
    ) -> HttpError:
        """The answer to a client's request refused with ``error`` (and ``headers``): where the
        transport turns every refusal of a request whose token was verified into its answer, the
        HTTP-level ones (405, 406, 415, a GET or DELETE refused) included. A refusal no decision
        record holds is audited first, aggregated (`bastion.gateway.refusals`); nothing is on an
        allowed call's path."""
        await self.gateway.refusals.note(error, caller, server, method)
        return HttpError(error.http_status, error.body(request_id), headers)

    def _answered(self, owner: tuple, message) -> None:
        """Route a client's response to the request bastion sent it; refuse (400, nothing
        forwarded) a response to no such request, or from anyone but the client it was sent to
        (its user, chain and session)."""
        pending = self.gateway.asked.get(message.id)
        if pending is None or pending[0] != owner:
            raise RpcError(
                INVALID_REQUEST, "bastion sent this client no request with that id", http_status=400
            )
        future = pending[1]
        if not future.done():
            future.set_result(message.raw)

    async def _run(self, ex: Exchange, handler) -> tuple[dict[str, Any], int, dict[str, str]]:
        """Run a handler; return (JSON-RPC response, HTTP status, headers)."""
        try:
            body = await handler(ex)
            if ex.caller.protocol_version in MODERN_VERSIONS:
                _modern_result(ex.message.method, body)
            else:
                for key in ("resultType", "ttlMs", "cacheScope"):
                    body.pop(key, None)
            return result(ex.message.id, body), 200, {}
        except StepUp as e:
            raise self._step_up(e, ex.caller, ex.server) from None
        except HttpError:
            raise  # a token revoked while the request waited for people (`Exchange.still_valid`)
        except RpcError as e:
            refused = await self._refused(e, ex.caller, ex.server, ex.message.method, ex.message.id)
            return refused.body, e.http_status, {}
        except Exception:
            log.exception("gateway: %s on %s failed", ex.message.method, ex.server)
            return (
                RpcError(INTERNAL_ERROR, "internal error in bastion").body(ex.message.id),
                200,
                {},
            )

    def _step_up(self, e: StepUp, caller: Caller, server: str) -> HttpError:
        """The answer to a request a decision sent to step up (a POST, a GET stream, a listen
        request alike): 401 to sign in again (RFC 9470) or 403 ``insufficient_scope``, with
        the challenge a client authorizes anew by and the ``decision_id`` whose record says
        why."""
        scopes = sorted(set(caller.scopes) | set(e.scopes))
        gateway = self.gateway
        if e.max_age is not None:
            # RFC 9470: sign in again; an MCP client authorizes anew on any 401.
            description = f"this request needs a sign-in within the last {e.max_age} seconds"
            return HttpError(
                401,
                {
                    "error": SIGN_IN_AGAIN,
                    "error_description": description,
                    "max_age": e.max_age,
                    "decision_id": e.decision_id,
                },
                {
                    "www-authenticate": challenge(
                        gateway.metadata_url(server),
                        scopes,
                        error=SIGN_IN_AGAIN,
                        description=description,
                        max_age=e.max_age,
                    )
                },
            )
        return HttpError(
            403,
            {
                "error": "insufficient_scope",
                "error_description": f"this request needs scope {' '.join(e.scopes)}",
                "decision_id": e.decision_id,
            },
            {
                "www-authenticate": challenge(
                    gateway.metadata_url(server),
                    scopes,
                    error="insufficient_scope",
                    description=f"this request needs scope {' '.join(e.scopes)}",
                )
            },
        )

    async def _answer_with_events(
        self, ex: Exchange, handler, send: Send, headers: dict[str, str], flight: InFlight
    ) -> None:
        """Answer on SSE if the upstream reports progress; else (or if refused) as plain JSON."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        async def progress(message: dict[str, Any]) -> None:
            queue.put_nowait(message)

        ex.progress = progress
        ex.emit = progress
        task = flight.task = asyncio.ensure_future(self._run(ex, handler))
        started = False
        while True:
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                break
            if not started:
                await _start_events(send, headers)
                started = True
            event = await _event_of(getter.result())
            await send({"type": "http.response.body", "body": event, "more_body": True})
        if task.cancelled() and flight.reason is not None and flight.refusal is None:
            if flight.reason == "cancelled":
                if not started:
                    await _start_events(send, headers)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        try:
            if task.cancelled() and flight.refusal is not None:
                # Stopped: its token revoked, or its caller suspended, meanwhile.
                body, status, extra = flight.answer_of_stopped(started), 200, {}
            else:
                body, status, extra = task.result()
        except HttpError as e:
            if not started:
                raise  # answered as HTTP (401, 403), before any event
            # The answer has begun as events: a refusal can only be a JSON-RPC error now.
            body, status, extra = _late_refusal(e).body(ex.message.id), 200, {}
        if not started:
            _counted(ex, await send_json(send, status, body, {**headers, **extra}, ex.large))
            return
        while not queue.empty():
            event = await _event_of(queue.get_nowait())
            await send({"type": "http.response.body", "body": event, "more_body": True})
        event = await _event_of(body, ex.large)
        await send({"type": "http.response.body", "body": event, "more_body": False})
        _counted(ex, len(event))

    # -- era checks --------------------------------------------------------------------------------

    def _check_modern(self, message, headers: dict[str, str]) -> None:
        """2026-07-28: the routing headers must agree with the body (HEADER_MISMATCH if not;
        one sent twice is refused before, in every era: `_sent_twice`)."""
        if "mcp-session-id" in headers:
            raise RpcError(
                INVALID_REQUEST,
                "MCP 2026-07-28 has no sessions; send no Mcp-Session-Id",
                http_status=400,
            )
        if message.method is None:
            return
        if message.method == "initialize":
            # No 2026-07-28 method (versioning: "initialize is an unknown method"): it opened a
            # 2025-11-25 session for a request whose every header said the stateless era.
            raise RpcError(
                METHOD_NOT_FOUND,
                "MCP 2026-07-28 has no initialize: send server/discover, or initialize with"
                f" MCP-Protocol-Version {LEGACY_VERSIONS[0]} to open a session",
                {"supported": [*MODERN_VERSIONS, *LEGACY_VERSIONS]},
                http_status=400,
            )
        _check_routing(message, headers, True)
        if message.is_request:
            meta = message.params.get("_meta")
            if (
                not isinstance(meta, dict)
                or _ENVELOPE_VERSION not in meta
                or _ENVELOPE_CAPABILITIES not in meta
            ):
                raise RpcError(
                    INVALID_PARAMS,
                    f"params._meta must carry {_ENVELOPE_VERSION!r} and {_ENVELOPE_CAPABILITIES!r}",
                    http_status=400,
                )
            if meta[_ENVELOPE_VERSION] != headers.get("mcp-protocol-version"):
                raise RpcError(
                    HEADER_MISMATCH,
                    "the MCP-Protocol-Version header does not match the body's protocol version",
                    http_status=400,
                )

    def _legacy_session(
        self, server: str, caller: Caller, method: str | None, headers: dict[str, str]
    ):
        """The 2025-11-25 session a POST goes in: none for initialize (which opens one) or a
        server/discover that names none; else the one it names, the caller's own."""
        if method == "initialize":
            if "mcp-session-id" in headers:
                raise RpcError(
                    INVALID_REQUEST,
                    "initialize opens a session; send it without Mcp-Session-Id",
                    http_status=400,
                )
            return None
        if method == "server/discover" and "mcp-session-id" not in headers:
            # A probe: answered without a session. One it names is the caller's, or refused,
            # as on any request: its decision record names it (``session``).
            return None
        return self._session(server, caller, headers)

    def _session(self, server: str, caller: Caller, headers: dict[str, str]):
        session_id = headers.get("mcp-session-id")
        if not session_id:
            raise RpcError(
                INVALID_REQUEST,
                "Mcp-Session-Id is required (initialize first, or use MCP 2026-07-28)",
                http_status=400,
            )
        session = self.gateway.sessions.find(session_id, server, caller.subject, caller.chain)
        if session is None:
            raise RpcError(
                SESSION_NOT_FOUND, "unknown or expired session; initialize again", http_status=404
            )
        return session

    # -- GET (standing stream) and DELETE -------------------------------------------------------

    async def _refused_stream(
        self, error: RpcError, caller: Caller, server: str, method: str
    ) -> HttpError:
        """`_refused` for a GET or DELETE, which has no request id."""
        allow = {"allow": "POST"} if error.http_status == 405 else None
        return await self._refused(error, caller, server, method, None, allow)

    async def _get(
        self, server: str, caller: Caller, headers: dict[str, str], receive: Receive, send: Send
    ) -> None:
        try:
            _check_legacy(headers)
            if not accepts(headers.get("accept", ""), EVENT_STREAM):
                raise RpcError(
                    INVALID_REQUEST, "GET needs Accept: text/event-stream", http_status=406
                )
            session = self._session(server, caller, headers)
        except RpcError as e:
            raise await self._refused_stream(e, caller, server, "GET") from None
        gateway = self.gateway
        upstream = gateway.upstreams[server]
        client_declared(None)
        # Decided and recorded as a ``connect``, as a listen request is; then held to the token
        # of this GET and decided again before each notification (`Gateway.may_hear`).
        context = gateway.enforcer.context(caller, server, "GET")
        try:
            with upstream.connection(caller, session.id) as connection:
                await connection.ensure_started()
            verdict = await gateway.enforcer.decide(
                caller, server, "GET", message_action(upstream.entity), upstream.entity, context
            )
        except Held as held:
            # Recorded as held: the id and the approval to answer, as a POST is told them.
            refusal = pending_error(held)
            retry = {"retry-after": str(max(1, round(held.retry_after)))}
            raise HttpError(_REFUSAL_STATUS[refusal.code], refusal.body(None), retry) from None
        except RpcError as e:
            raise HttpError(_REFUSAL_STATUS.get(e.code, 502), e.body(None)) from None
        except StepUp as e:
            raise self._step_up(e, caller, server) from None
        gateway.enforcer.write(verdict.record)
        # Checked after the last await, so nothing can come in between: the session may have
        # ended (DELETE) or got a GET stream while this one was being decided.
        _, _, token = headers.get("authorization", "").partition(" ")
        listener = Listener(
            None,
            server,
            caller,
            token.strip(),
            frozenset(LIST_CHANGED),
            session.subscriptions,
            withheld=session.withheld,
        )
        try:
            if session.closed:
                raise RpcError(
                    SESSION_NOT_FOUND, "the session ended; initialize again", http_status=404
                )
            if session.listener is not None:
                raise RpcError(
                    INVALID_REQUEST, "this session already has a GET stream", http_status=409
                )
            gateway.sessions.listen(listener)
        except RpcError as e:
            raise await self._refused_stream(e, caller, server, "GET") from None
        session.listener = listener
        expiry = _end_at_expiry(listener)
        try:
            following = frozenset(session.subscriptions)
            try:
                with upstream.connection(caller, session.id) as connection:
                    await connection.watch(following)
            except RpcError as e:
                refusal = refusal_to_follow(gateway.enforcer, caller, server, following, context, e)
                raise HttpError(502, refusal.body(None)) from None
            await _start_events(send)
            await send(
                {"type": "http.response.body", "body": b": stream open\n\n", "more_body": True}
            )
            if await _relay(listener.stream, receive, send):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            expiry.cancel()
            gateway.sessions.unlisten(listener)
            if session.listener is listener:
                session.listener = None

    # -- 2026-07-28: subscriptions/listen ------------------------------------------------------

    async def _listen(
        self,
        upstream,
        caller: Caller,
        message,
        headers: dict[str, str],
        receive: Receive,
        send: Send,
    ) -> None:
        """A ``subscriptions/listen`` request: its answer is an SSE stream that opens with
        ``notifications/subscriptions/acknowledged`` (what bastion agreed to send), carries the
        notifications, and ends with the request's result when bastion ends it.

        List changes are granted for the features the upstream has. A resource's updates are granted
        only if every principal may ``read`` it now, and each update is decided again before it
        is sent (see `Gateway.may_hear`)."""
        gateway = self.gateway
        client_declared(None)
        ex = Exchange(gateway, upstream, caller, message)
        try:
            if not accepts(headers.get("accept", ""), EVENT_STREAM):
                raise RpcError(
                    INVALID_REQUEST,
                    "subscriptions/listen is answered as text/event-stream; accept it",
                    http_status=406,
                )
            wanted, uris = _listen_filter(message.params, gateway.config.max_name_chars)
            await admit_and_start(ex)
            offered = ex.connection.init_result.get("capabilities") or {}
        except RpcError as e:
            raise await self._refused(
                e, caller, upstream.name, message.method, message.id
            ) from None
        except StepUp as e:
            raise self._step_up(e, caller, upstream.name) from None
        finally:
            ex.release()  # a stream does not keep its upstream session busy
        methods = frozenset(
            method
            for method, flag in LIST_CHANGED.items()
            # Granted for each feature the upstream has: SDK servers declare
            # ``listChanged: false`` and still announce changes.
            if wanted.get(flag) and flag.removesuffix("ListChanged") in offered
        )
        context = ex.context()
        enforcer = gateway.enforcer
        await enforcer.settled()
        authz, position = enforcer.authorizer(), enforcer.position()
        heard_of = []
        for uri in uris if "resources" in offered else ():
            # Each resource of the filter decided and recorded, as a resources/subscribe is.
            started = time.perf_counter()
            resource, chain, heard = read_decision(
                authz, caller, upstream.name, uri, context, enforcer.clock
            )
            enforcer.record_heard(
                authz, position, caller, upstream.name, message.method, resource,
                {**context, "uri": uri}, chain, heard, started,
            )  # fmt: skip
            if heard:
                heard_of.append(uri)
        readable = frozenset(heard_of)
        _, _, token = headers.get("authorization", "").partition(" ")
        listener = Listener(message.id, upstream.name, caller, token.strip(), methods, readable)
        granted: dict[str, Any] = {
            flag: True for method, flag in LIST_CHANGED.items() if method in methods
        }
        if readable:
            granted["resourceSubscriptions"] = sorted(readable)
        meta = {SUBSCRIPTION_ID: message.id}
        try:
            await gateway.listen(listener)
        except RpcError as e:
            # Refused once ``connect`` was decided (one stream past a user's, one follow past
            # theirs, or one Redis cannot count): no decision names it, so it is audited as a
            # refused request is, as a GET stream refused at this step is.
            raise await self._refused(
                e, caller, upstream.name, message.method, message.id
            ) from None
        expiry = _end_at_expiry(listener)
        try:
            try:
                with upstream.connection(caller, "") as connection:
                    await connection.watch(readable)
            except RpcError as e:
                refusal = refusal_to_follow(enforcer, caller, upstream.name, readable, context, e)
                raise HttpError(refusal.http_status, refusal.body(message.id)) from None
            await _start_events(send)
            acknowledged = notification(
                "notifications/subscriptions/acknowledged",
                {"_meta": meta, "notifications": granted},
            )
            await send(
                {"type": "http.response.body", "body": _event(acknowledged), "more_body": True}
            )
            if await _relay(listener.stream, receive, send):
                end = (
                    b""
                    if listener.refused
                    else _event(result(message.id, {"_meta": meta, "resultType": "complete"}))
                )
                await send({"type": "http.response.body", "body": end, "more_body": False})
        finally:
            expiry.cancel()
            gateway.unlisten(listener)

    async def _delete(self, server: str, caller: Caller, headers: dict[str, str]) -> None:
        try:
            _check_legacy(headers)
            session = self._session(server, caller, headers)
        except RpcError as e:
            raise await self._refused_stream(e, caller, server, "DELETE") from None
        self.gateway.sessions.end(session)


def _sent_twice(scope: Scope, read_once: frozenset[str]) -> tuple[str, ...]:
    """The headers of ``read_once`` that ``scope`` holds more than once (names are lowercased by
    ASGI servers), in the order their second copy came."""
    seen: set[str] = set()
    twice: list[str] = []
    for name, _ in scope["headers"]:
        key = name.decode("latin-1")
        if key in read_once:
            if key in seen and key not in twice:
                twice.append(key)
            seen.add(key)
    return tuple(twice)


def _join_accept(scope: Scope, headers: dict[str, str]) -> None:
    """Read ``Accept`` sent on several lines as one list, their values joined by commas in the
    order they came (RFC 9110 §5.3), rather than as its last line."""
    lines = [value for name, value in scope["headers"] if name == b"accept"]
    if len(lines) > 1:
        headers["accept"] = b", ".join(lines).decode("latin-1")


def _twice(name: str) -> RpcError:
    return RpcError(HEADER_MISMATCH, f"the {name} header is sent twice", http_status=400)


def _unsupported(version: str) -> RpcError:
    """The refusal of an MCP-Protocol-Version bastion does not speak."""
    return RpcError(
        UNSUPPORTED_PROTOCOL_VERSION,
        f"MCP-Protocol-Version {version!r} is not supported",
        {"supported": [*MODERN_VERSIONS, *LEGACY_VERSIONS], "requested": version},
        http_status=400,
    )


def _check_legacy(headers: dict[str, str]) -> None:
    """A GET or DELETE names a 2025-11-25 session: refused with 405 for a 2026-07-28 client (it
    has no sessions), with 400 for a version bastion does not speak."""
    version = headers.get("mcp-protocol-version", "")
    if version in MODERN_VERSIONS:
        raise RpcError(
            INVALID_REQUEST,
            "MCP 2026-07-28 has no sessions, so no GET stream and no DELETE: POST only",
            http_status=405,
        )
    if version and version not in LEGACY_VERSIONS:
        raise _unsupported(version)


# A request still running after this many seconds gets a task that notices its client leaving.
_WATCH_AFTER = 0.1


# Answered as one JSON body: initialize's answer carries the session's header.
_ANSWERED_WHOLE = frozenset({"initialize", "server/discover", "ping"})


class InFlight:
    """A client's request while bastion works on it: how to cancel it (the task to cancel, and
    why it was: ``"cancelled"`` by the client, ``"disconnect"``, or `stop`'s reason: its
    token was revoked, its caller suspended, and ``refusal`` answers it), and whether its
    answer has begun as an event stream (``sending`` guards that stream's writes).
    ``exchange``: the request, whose caller and token are checked again when their grant is
    revoked or a principal suspended (`Gateway._grant_revoked`, `Gateway._suspended`)."""

    __slots__ = ("task", "reason", "watcher", "sending", "started", "exchange", "refusal")

    def __init__(self, task: asyncio.Future | None, exchange: Exchange | None = None) -> None:
        self.task = task
        self.reason: str | None = None
        self.watcher: asyncio.Task | None = None
        self.sending: asyncio.Lock | None = None
        self.started = False
        self.exchange = exchange
        self.refusal: HttpError | RpcError | None = None

    def cancel(self, reason: str) -> None:
        if self.reason is None and self.task is not None:
            self.reason = reason
            # The reason goes with the cancellation: the call's record says why it has no
            # result (`handlers._unanswered`).
            self.task.cancel(reason)

    def stop(self, reason: str, refusal: HttpError | RpcError) -> None:
        """Cancel the request under way for ``reason`` (`REVOKED`, `SUSPENDED`): its upstream
        is told, what it answers is never released, and the client gets ``refusal``
        (`answer_of_stopped`)."""
        if self.reason is None and self.task is not None:
            self.refusal = refusal
            self.cancel(reason)

    async def check_token(self) -> None:
        """A token of this request's grant, or the grant, was revoked while bastion worked on
        it (waiting for its upstream, or for people): check the request's token again, and
        stop the request if it is refused."""
        still_valid = self.exchange.still_valid if self.exchange is not None else None
        if self.task is None or still_valid is None:
            return
        try:
            await still_valid()
        except HttpError as e:
            self.stop(REVOKED, e)

    def answer_of_stopped(self, started: bool) -> dict[str, Any]:
        """The JSON-RPC answer of a request `stop` cancelled, naming the decision that let it
        through where one did (its record says why it has no result); an `HttpError` refusal
        is raised instead while the answer has not begun (``started``: as events)."""
        refusal = self.refusal
        assert refusal is not None and self.exchange is not None
        if isinstance(refusal, HttpError):
            if not started:
                raise refusal
            refusal = _late_refusal(refusal)
        decided = self.exchange.notes.get("decision_id")
        if decided and refusal.data is not None:
            refusal.data.setdefault("decision_id", decided)
        return refusal.body(self.exchange.message.id)

    def watch(self, receive: Receive, send: Send | None, headers: dict[str, str]) -> None:
        """Still running: watch for the client leaving; begin the answer if ``send`` is given."""
        if self.task is None:
            return
        if send is not None and self.sending is None:
            self.sending = asyncio.Lock()
        self.watcher = asyncio.ensure_future(self._watch(receive, send, headers))

    async def _watch(self, receive: Receive, send: Send | None, headers: dict[str, str]) -> None:
        if send is not None and self.sending is not None:
            async with self.sending:
                await self._begin(send, headers)
        while (await receive())["type"] != "http.disconnect":
            pass
        self.cancel("disconnect")

    async def _begin(self, send: Send, headers: dict[str, str] | None) -> None:
        # Called holding ``sending``.
        if not self.started:
            self.started = True
            await _start_events(send, headers)

    async def emit(self, send: Send, headers: dict[str, str], message: dict[str, Any]) -> None:
        """Put ``message`` on the answer's event stream, beginning it if need be."""
        if self.sending is None:
            self.sending = asyncio.Lock()
        # Written before the lock is taken: the request's own task emits one message at a time.
        event = await _event_of(message)
        async with self.sending:
            await self._begin(send, headers)
            await send({"type": "http.response.body", "body": event, "more_body": True})

    def finish(self) -> None:
        # The exchange's emit holds this flight: let go of it, so that neither waits for the
        # cyclic garbage collector.
        self.task = self.exchange = None
        if self.watcher is not None and not (self.sending and self.sending.locked()):
            self.watcher.cancel()

    async def end(self, send: Send, answer: dict[str, Any] | None, large: bool = False) -> int:
        """Finish the answer as an event stream: ``answer`` (written off the loop if ``large``:
        made of a large upstream message), or nothing for a request the client cancelled (a
        cancelled request is not answered); returns the length of what was sent."""
        body = b"" if answer is None else await _event_of(answer, large)
        if self.sending is None:
            await _start_events(send)
            await send({"type": "http.response.body", "body": body, "more_body": False})
            return len(body)
        async with self.sending:
            await self._begin(send, None)
            await send({"type": "http.response.body", "body": body, "more_body": False})
        if self.watcher is not None:
            self.watcher.cancel()
        return len(body)


# The HTTP status of a GET stream that is refused when it opens.
_REFUSAL_STATUS = {
    REFUSED_BY_POLICY: 403,
    APPROVAL_PENDING: 403,
    RATE_LIMITED: 429,
    RATE_LIMIT_UNAVAILABLE: 503,
    FACTS_STALE: 503,
}


def _end_at_expiry(listener: Listener) -> asyncio.TimerHandle:
    """Cut ``listener``'s stream off when its token expires, whether a notification comes or
    not. The token was verified for the request that opened the stream: its ``exp`` is read,
    not checked again."""
    try:
        payload = listener.token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        left = float(claims["exp"]) - time.time()
    except (IndexError, KeyError, TypeError, ValueError):
        left = 0.0  # cannot tell: fail closed
    return asyncio.get_running_loop().call_later(max(left, 0.0), listener.close, True)


def _bearer(headers: dict[str, str]) -> tuple[str, str, str]:
    """The Authorization header's scheme (lower case), credentials as sent, and credentials
    stripped (the token presented)."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return scheme.lower(), token, token.strip()


def _late_refusal(error: HttpError) -> RpcError:
    """An HTTP refusal (a step-up, a token revoked while the request waited for people) as the
    JSON-RPC error of an answer begun as events: its ``error`` as the ``reason``, and the
    decision that refused it, where one did, as the HTTP answer would have named them."""
    body = error.body or {}
    text = f"bastion refused this request: {body.get('error_description') or body.get('error')}"
    decided = body.get("decision_id")
    data = {"reason": body.get("error"), **({"decision_id": decided} if decided else {})}
    return RpcError(INVALID_REQUEST, text, data)


async def _relay(
    stream: asyncio.Queue[dict[str, Any] | None], receive: Receive, send: Send
) -> bool:
    """Send what comes on ``stream`` as SSE events until None comes (True: end the response) or
    the client disconnects (False)."""

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        while True:
            getter = asyncio.ensure_future(stream.get())
            done, _ = await asyncio.wait({watcher, getter}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                return False
            message = getter.result()
            if message is None:
                return True
            await send({"type": "http.response.body", "body": _event(message), "more_body": True})
    finally:
        watcher.cancel()


_LISTEN_FLAGS = frozenset(LIST_CHANGED.values())
_MAX_LISTEN_URIS = 1000


def _listen_filter(
    params: dict[str, Any], max_name_chars: int
) -> tuple[dict[str, bool], list[str]]:
    """The ``notifications`` filter of a listen request, checked: its flags and resource URIs
    (each of at most ``max_name_chars`` characters)."""
    wanted = params.get("notifications")
    if not isinstance(wanted, dict):
        raise RpcError(INVALID_PARAMS, "params.notifications must be an object", http_status=400)
    flags: dict[str, bool] = {}
    for key, value in wanted.items():
        if key in _LISTEN_FLAGS:
            if not isinstance(value, bool):
                raise RpcError(
                    INVALID_PARAMS, f"params.notifications.{key} must be a boolean", http_status=400
                )
            flags[key] = value
    uris = wanted.get("resourceSubscriptions", [])
    if (
        not isinstance(uris, list)
        or len(uris) > _MAX_LISTEN_URIS
        or not all(isinstance(u, str) and u for u in uris)
    ):
        raise RpcError(
            INVALID_PARAMS,
            "params.notifications.resourceSubscriptions must be a list of at most"
            f" {_MAX_LISTEN_URIS} resource URIs",
            http_status=400,
        )
    for i, uri in enumerate(uris):
        resource_uri(uri, max_name_chars, f"params.notifications.resourceSubscriptions[{i}]")
    return flags, uris


_CACHEABLE = {
    "server/discover",
    "tools/list",
    "prompts/list",
    "resources/list",
    "resources/templates/list",
    "resources/read",
}


def _modern_result(method: str, body: dict[str, Any]) -> None:
    """2026-07-28 results carry ``resultType``; cacheable ones carry caching directives. What
    bastion answers was decided for this caller on live facts: never shared, never reused."""
    body.setdefault("resultType", "complete")
    if method in _CACHEABLE:
        body["ttlMs"] = 0
        body["cacheScope"] = "private"
