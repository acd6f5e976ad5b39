"""Requests an upstream sends a client: ``sampling/createMessage``, ``elicitation/create``,
``roots/list`` (MCP 2025-11-25, server requests).

Sent while the upstream answers one of a client's requests, they go to that client on the
stream of its request (`bastion.gateway.handlers.Exchange`). Sent on the standing stream of an
upstream session of one user or one client session (`bastion.gateway.upstream_sessions`), they
go to that owner's client on its session's GET stream: ``per_client_session``, that very client
session; ``per_user``, the user's client session used last among those that declared the
capability. Never to another user's client. From an upstream session of one owner, each is
decided by the policy as the action named by its method on the ``McpServer``, for every
principal of the client it would reach, and the client's answer is masked as a result is.
Refused (a JSON-RPC error back to the upstream) when no such client can be asked or the policy
says no. A decided request's record is written once it is known what reached the other side
(`relay_outcome`): refused when bastion withheld the request, or the client's answer, after the
policy allowed it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from bastion.decide.mcp import CLIENT_REQUESTS
from bastion.facts.model import Entity
from bastion.gateway.enforce import Caller, StepUp, Verdict, refused
from bastion.gateway.jsonrpc import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    MODERN_VERSIONS,
    UPSTREAM_UNAVAILABLE,
    RpcError,
    error_parts,
)
from bastion.gateway.masks import Paths, compile_paths, mask_answer
from bastion.gateway.upstream_sessions import SessionOwner

if TYPE_CHECKING:
    from bastion.gateway.gateway import Gateway, UpstreamState
    from bastion.gateway.sessions import Session
    from bastion.gateway.upstream import Upstream

# The capabilities a client declares that bastion relays; a 2025-11-25 session keeps these only,
# in at most this many characters of JSON (`kept_capabilities`).
RELAYED_CAPABILITIES = frozenset(CLIENT_REQUESTS.values())
MAX_KEPT_CAPABILITIES = 16_384
# The kind of bastion's requestState for the questions of an upstream session's input_required
# result (`ClientRequests.seal`).
ASKED_STATE = "bastion-asked.v1."
# Why a request for the client is refused while a call's result is masked: what it carries
# cannot be masked field by field.
MASKED_CALL_ASKS = (
    "a call whose result is masked or held for review cannot ask its client for input"
)
# Puts a request on an event stream the client reads.
Send = Callable[[dict[str, Any]], Awaitable[None]]
log = logging.getLogger("bastion.gateway")
# What the upstream is told of a client's error answer under a mask, instead of its text.
WITHHELD_CLIENT_ERROR = (
    "the client answered with an error; its message is withheld by bastion because a field of"
    " its answer is masked"
)
# What the upstream is told of a client's answer that a mask cannot reach into.
WITHHELD_ANSWER = (
    "the client's answer is withheld by bastion: a field of it is masked and the answer has no"
    " such field"
)


class Unanswered(RpcError):
    """The client did not answer a request bastion relayed to it in time."""


def relay_outcome(
    sent: dict[str, Any] | None = None, error: BaseException | None = None
) -> tuple[str, str]:
    """The result and reason of the record of a request the policy let an upstream send a
    client, from what became of it: ``sent``, what went back to the upstream, or ``error``,
    why nothing did. Refused (``deny``) where bastion withheld the request or the answer:
    ``masked_call`` (the call it came in is masked or held for review), ``answer_withheld``
    (the answer has no field for a mask to reach), the reason of a refusal of bastion's (the
    labels that could not be kept, another question of the same round refused), or ``bastion
    error <code>`` (the client could not be asked: not declared, no stream). Allowed where the
    client had the request: with ``client error <code>`` for its error, ``client did not
    answer`` when it did not in time."""
    if sent is not None:
        if "result" in sent:
            return "allow", ""
        failure = sent.get("error") or {}
        if failure.get("message") == WITHHELD_ANSWER:
            return "deny", "answer_withheld"
        return "allow", f"client error {failure.get('code')}"
    if isinstance(error, Unanswered):
        return "allow", "client did not answer"
    if isinstance(error, RpcError):
        if error.message == MASKED_CALL_ASKS:
            return "deny", "masked_call"
        data = error.data if isinstance(error.data, dict) else {}
        if isinstance(data.get("reason"), str):
            return "deny", data["reason"]
        return "deny", f"bastion error {error.code}"
    if isinstance(error, asyncio.CancelledError):
        return "error", "cancelled"
    return "error", "internal error"


def answer_masks(verdict: Verdict | None) -> Paths:
    """The masks a client's answer goes back to the upstream under (none, undecided)."""
    return compile_paths(verdict.obligations.masks) if verdict is not None else ()


def kept_capabilities(declared: Any) -> dict[str, Any]:
    """What a 2025-11-25 session keeps, for as long as it lives, of the capabilities its client
    declared at initialize: those bastion relays (`RELAYED_CAPABILITIES`), no others. Longer
    than `MAX_KEPT_CAPABILITIES` characters of JSON, they are refused (-32602): a session holds
    a few KiB of them, not a body's worth."""
    if not isinstance(declared, dict):
        return {}
    kept = {k: v for k, v in declared.items() if k in RELAYED_CAPABILITIES}
    if len(json.dumps(kept, separators=(",", ":"))) > MAX_KEPT_CAPABILITIES:
        raise RpcError(
            INVALID_PARAMS,
            f"params.capabilities ({', '.join(sorted(RELAYED_CAPABILITIES))}) are longer than"
            f" {MAX_KEPT_CAPABILITIES} characters of JSON",
            http_status=400,
        )
    return kept


def check_client_request(method: Any, params: Any, capabilities: dict[str, Any]) -> None:
    """Refuse (`RpcError`) a request for a client that did not declare what it needs."""
    capability = CLIENT_REQUESTS.get(method) if isinstance(method, str) else None
    if capability is None or not isinstance(params, dict):
        raise RpcError(METHOD_NOT_FOUND, f"bastion relays no {method!r} requests to clients")
    declared = capabilities.get(capability)
    if not isinstance(declared, dict):
        raise RpcError(METHOD_NOT_FOUND, f"the client did not declare the {capability} capability")
    if capability == "elicitation":
        mode = params.get("mode", "form")
        # MCP: an empty ``elicitation`` capability declares form mode only.
        modes = declared or {"form": {}}
        if not isinstance(mode, str) or mode not in modes:
            raise RpcError(METHOD_NOT_FOUND, f"the client did not declare {mode!r} elicitation")
    elif capability == "sampling":
        # MCP 2025-11-25: a tool loop only for a client that declared ``sampling.tools``; the
        # context of its servers (``includeContext``: its other servers' context would come to
        # this upstream) only for one that declared ``sampling.context``.
        if ("tools" in params or "toolChoice" in params) and not isinstance(
            declared.get("tools"), dict
        ):
            raise RpcError(METHOD_NOT_FOUND, "the client did not declare sampling.tools")
        if params.get("includeContext", "none") != "none" and not isinstance(
            declared.get("context"), dict
        ):
            raise RpcError(METHOD_NOT_FOUND, "the client did not declare sampling.context")


class ClientRequests:
    """Asks clients on upstreams' behalf, and remembers what it asked (`Gateway.asked`)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def ask(
        self, owner: tuple, send: Send, method: str, params: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        """Send a client a request (``send`` puts it on a stream it reads) under an id of
        bastion's; return its JSON-RPC response. Only ``owner`` (the server, user, agent and
        session it was sent to) may answer (`StreamableHttpEndpoint._answered`)."""
        request_id = f"bastion-{secrets.token_urlsafe(12)}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        pending = self.gateway.asked
        pending[request_id] = (owner, future)
        try:
            await send({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
            try:
                async with asyncio.timeout(timeout):
                    return await future
            except TimeoutError:
                raise Unanswered(
                    UPSTREAM_UNAVAILABLE, f"the client did not answer {method} within {timeout:g}s"
                ) from None
        finally:
            pending.pop(request_id, None)

    async def decide(self, caller: Caller, server: str, method: str) -> Verdict:
        """May the upstream ``server`` send ``caller``'s client ``method``? Decided as the
        action ``method`` on ``McpServer{server}``: a refusal is recorded and raised; an allowed
        one is recorded by `settle`, once what reached the other side is known (its answer goes
        back under the masks of `answer_masks`). An approval, a review or a step-up cannot be
        waited for here (the upstream is waiting for the answer, on a call or a stream):
        refused, recorded so (``requires_approval``, ``review_required``), and no person is
        asked (``holds=False``: no approval request filed, looked up or spent)."""
        enforcer = self.gateway.enforcer
        context = enforcer.context(caller, server, method)
        resource = Entity("McpServer", server)
        try:
            return await enforcer.decide(
                caller, server, method, method, resource, context, holds=False
            )
        except StepUp as e:
            raise refused(server, e.decision_id, "insufficient_scope") from None

    def settle(self, verdict: Verdict | None, result: str, reason: str) -> None:
        """Write the record of an allowed request (`decide`; None: not decided, no record)
        with what became of it (`relay_outcome`)."""
        if verdict is not None:
            self.gateway.enforcer.write(verdict.record, result=result, reason=reason)

    async def relayed(
        self, verdict: Verdict | None, method: str, asking: Awaitable[dict[str, Any]]
    ) -> dict[str, Any]:
        """The client's answer to ``method`` (``asking`` asks it) as it goes back upstream
        (`answer_for_upstream`), the record of ``verdict`` written with what became of it."""
        try:
            answer = await asking
        except BaseException as e:
            self.settle(verdict, *relay_outcome(error=e))
            raise
        sent = answer_for_upstream(answer, answer_masks(verdict), method)
        self.settle(verdict, *relay_outcome(sent))
        return sent

    def seal(
        self, caller: Caller, server: str, result: dict[str, Any], methods: dict[str, str]
    ) -> None:
        """Give a 2026-07-28 client an upstream's ``input_required`` ``result`` with a
        requestState of bastion's: the upstream's own and the method of each question, signed
        for this caller and server, so that the answers in its retry go upstream as answers to
        these questions (decided and masked as they are, `answered`) and in no other way.
        Signed, not encrypted: the client saw the questions, and the upstream's state was
        meant for it."""
        sealed: dict[str, Any] = {"server": server, "methods": methods}
        if "requestState" in result:
            sealed["state"] = result["requestState"]
        text = json.dumps(sealed, separators=(",", ":")).encode()
        value = base64.urlsafe_b64encode(text).decode().rstrip("=")
        states = self.gateway.states
        result["requestState"] = states.sign(value, caller.subject, caller.chain, ASKED_STATE)

    def sealed(self, caller: Caller, server: str, params: dict[str, Any]) -> dict[str, Any] | None:
        """What bastion sealed (`seal`) for the questions a retry's ``params`` answer; None for
        params with neither ``requestState`` nor ``inputResponses``. Anything else is refused
        (-32602): either one from a 2025-11-25 client (bastion asks it the upstream's questions
        itself), a requestState that is not bastion's for this caller and server (the
        upstream's own, lifted from bastion's, included), answers without one."""
        if "requestState" not in params and "inputResponses" not in params:
            return None
        if caller.protocol_version not in MODERN_VERSIONS:
            raise RpcError(
                INVALID_PARAMS,
                "a 2025-11-25 client sends no requestState or inputResponses: bastion asks it"
                " an upstream's questions itself",
                http_status=400,
            )
        state = params.get("requestState")
        value = (
            self.gateway.states.read(state, caller.subject, caller.chain, ASKED_STATE)
            if isinstance(state, str)
            else None
        )
        if value is None:
            raise RpcError(
                INVALID_PARAMS,
                "requestState was not issued by bastion to this user and chain of agents: answers"
                " (inputResponses) go upstream only with the requestState of bastion's"
                " input_required result, as it was given",
                http_status=400,
            )
        sealed = json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
        if sealed["server"] != server:
            raise RpcError(
                INVALID_PARAMS, "requestState was issued for another server", http_status=400
            )
        if not isinstance(params.get("inputResponses", {}), dict):
            raise RpcError(INVALID_PARAMS, "inputResponses must be an object", http_status=400)
        return sealed

    async def answered(
        self, caller: Caller, server: str, params: dict[str, Any], decides: bool
    ) -> dict[str, Any]:
        """The params of a 2026-07-28 retry as they go upstream, its answers checked (`sealed`):
        each answer decided (when ``decides``: from an upstream session of one owner) and masked
        as the question it answers (a refusal or a withheld answer refuses the retry), answers
        to no question left out, and the upstream's own requestState back in place."""
        sealed = self.sealed(caller, server, params)
        if sealed is None:
            return params
        upstream = {k: v for k, v in params.items() if k not in ("requestState", "inputResponses")}
        if "state" in sealed:
            upstream["requestState"] = sealed["state"]
        given = params.get("inputResponses", {})
        answers = {}
        # The answers let through so far: none goes upstream if a later one is refused.
        decided: list[Verdict | None] = []
        try:
            for key, method in sealed["methods"].items():
                if key not in given:
                    continue
                if not isinstance(given[key], dict):
                    raise RpcError(INVALID_PARAMS, f"inputResponses[{key!r}] must be an object")
                verdict = await self.decide(caller, server, method) if decides else None
                answer = answer_for_upstream({"result": given[key]}, answer_masks(verdict), method)
                if "result" not in answer:
                    self.settle(verdict, *relay_outcome(answer))
                    raise RpcError(answer["error"]["code"], answer["error"]["message"])
                decided.append(verdict)
                answers[key] = answer["result"]
        except BaseException:
            for verdict in decided:
                self.settle(verdict, "deny", "another_answer_refused")
            raise
        for verdict in decided:
            self.settle(verdict, "allow", "")
        if answers:
            upstream["inputResponses"] = answers
        return upstream

    async def from_standing_stream(
        self,
        state: UpstreamState,
        owner: SessionOwner,
        upstream: Upstream,
        message: dict[str, Any],
    ) -> dict[str, Any]:
        """A request on the standing stream of ``owner``'s upstream session ``upstream``: the
        answer (a result or an error) to send back to the upstream. Refused while a call on that
        session is masked or held for review: the request names no call, and could carry what
        that call's result may not show (SDK servers ask on this stream by default)."""
        method, params = message.get("method"), message.get("params")
        params = params if isinstance(params, dict) else {}
        try:
            if upstream.masked_calls:
                raise RpcError(INVALID_REQUEST, MASKED_CALL_ASKS)
            session = self._client_session(state.name, owner, method, params)
            listener = session.listener
            assert listener is not None
            # The token of its stream must still be good, and ``connect`` still allowed.
            if not await self.gateway.may_hear(listener, str(method)):
                raise RpcError(INVALID_REQUEST, "the client's stream was closed: ask again later")
            verdict = await self.decide(listener.caller, state.name, str(method))

            async def send(request: dict[str, Any]) -> None:
                listener.ask(request)

            owner_key = (state.name, session.subject, session.chain, session.id)
            timeout = state.upstream.config.timeout
            asking = self.ask(owner_key, send, str(method), params, timeout)
            return await self.relayed(verdict, str(method), asking)
        except RpcError as e:
            return {"error": e.body(None)["error"]}
        except Exception:
            log.exception("relaying %s from upstream %s failed", method, state.name)
            return {"error": {"code": INTERNAL_ERROR, "message": "internal error in bastion"}}

    def _client_session(
        self, server: str, owner: SessionOwner, method: Any, params: dict[str, Any]
    ) -> Session:
        """The owner's client session to ask: open, with a GET stream, and that declared the
        capability (the one used last, for a user's)."""
        if owner.chain and not owner.client_session:
            raise RpcError(
                INVALID_REQUEST,
                "this upstream session serves an MCP 2026-07-28 client, which has no standing"
                " stream: it can be asked only within a call (an input_required result)",
            )
        sessions = self.gateway.sessions
        if owner.client_session:
            found = sessions.get(owner.client_session)
            candidates = [found] if found is not None else []
        else:
            candidates = sessions.sessions_of(server, owner.user)
        live = [
            s
            for s in candidates
            if owner.covers(s.subject, s.chain, s.id)
            and s.server == server
            and not s.closed
            and s.listener is not None
            and not s.listener.refused
        ]
        if not live:
            raise RpcError(
                INVALID_REQUEST,
                "no client of this session can be asked now: that needs an MCP 2025-11-25"
                " client session with its GET stream open (a 2026-07-28 client has no standing"
                " stream, and is asked only within a call)",
            )
        refusal: RpcError | None = None
        willing = []
        for session in live:
            try:
                check_client_request(method, params, session.capabilities)
                willing.append(session)
            except RpcError as e:
                refusal = e
        if not willing:
            assert refusal is not None
            raise refusal
        return max(willing, key=lambda s: s.last_seen)


def answer_for_upstream(answer: dict[str, Any], masks: Paths, method: str) -> dict[str, Any]:
    """A client's JSON-RPC response to ``method``, as bastion sends it on to the upstream: its
    result (masked), or its error in JSON-RPC's shape (under a mask, its code alone: the message and
    data are the client's free text, which could hold what is masked); anything else is an
    error."""
    if isinstance(answer.get("result"), dict):
        result = mask_answer(answer["result"], masks, method)
        if result is None:
            return {"error": {"code": INVALID_REQUEST, "message": WITHHELD_ANSWER}}
        return {"result": result}
    error = answer.get("error")
    if not isinstance(error, dict):
        return {"error": {"code": INTERNAL_ERROR, "message": "the client sent no result"}}
    code, message, data = error_parts(error, INTERNAL_ERROR, "the client answered with an error")
    if masks:
        return {"error": {"code": code, "message": WITHHELD_CLIENT_ERROR}}
    return {"error": {"code": code, "message": message, **({} if data is None else {"data": data})}}
