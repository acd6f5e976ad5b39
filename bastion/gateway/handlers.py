"""One handler per JSON-RPC method family: lifecycle, lists, tools, resources, prompts.

Each handler decides before it forwards and applies obligations before it answers. A handler
returns the ``result`` object or raises `RpcError` / `StepUp`; the transport frames the answer.
Holds for human approval (a later issue) slot in at `Enforcer.decide`, before forwarding.
`Exchange.forward` also carries what the upstream asks the client on the way (sampling,
elicitation, roots: MCP 2025-11-25 server requests, 2026-07-28 ``input_required`` results).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from bastion import untrusted_json
from bastion.approvals.service import NoApprover
from bastion.decide.mcp import message_action
from bastion.facts.model import Entity
from bastion.gateway import holds
from bastion.gateway.client_requests import (
    MASKED_CALL_ASKS,
    RELAYED_CAPABILITIES,
    check_client_request,
    relay_outcome,
)
from bastion.gateway.enforce import Caller, Enforcer, Held, Verdict, refused
from bastion.gateway.input_types import type_refused
from bastion.gateway.jsonrpc import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    LEGACY_VERSIONS,
    LOG_LEVELS,
    METHOD_NOT_FOUND,
    MODERN_VERSIONS,
    REFUSED_BY_POLICY,
    UPSTREAM_UNAVAILABLE,
    Message,
    RpcError,
    error_parts,
    notification,
)
from bastion.gateway.masks import WHOLE, Paths, compile_paths, mask_notification, mask_result
from bastion.gateway.sessions import read_decision
from bastion.gateway.tool_pins import PROMPT, TOOL, PinChange
from bastion.gateway.upstream import (
    LOG_LEVEL,
    LOG_MESSAGE,
    REVOKED,
    SUSPENDED,
    UpstreamError,
    UpstreamFailure,
    UpstreamUnreachable,
)
from bastion.gateway.uris import plain_name, resource_uri, spelling_refused, tool_or_prompt_name
from bastion.large_json import LargeMessage
from bastion.signals.behavior import scope_keys
from bastion.signals.read_only import is_read_only_tool

if TYPE_CHECKING:
    from bastion.gateway.gateway import Gateway, UpstreamState
    from bastion.gateway.sessions import Session
    from bastion.gateway.upstream import Upstream
    from bastion.gateway.upstream_sessions import UpstreamSession

Progress = Callable[[dict[str, Any]], Awaitable[None]]
# Puts one message on the event stream that answers the client's request (starting it if need be).
Emit = Callable[[dict[str, Any]], Awaitable[None]]
# A 2026-07-28 result that asks the client for input first (SEP-2322; the draft says
# "incomplete", the SDK "input_required").
INPUT_REQUIRED = ("input_required", "incomplete")
_MAX_INPUT_ROUNDS = 10
# The record's reason for a request bastion stopped under way, by the cancellation's message
# (`transport.InFlight.stop`): its token revoked, or its agent, user or session suspended.
_STOPPED = {
    REVOKED: "its token was revoked while it ran",
    SUSPENDED: "its caller was suspended while it ran",
}


def suspended_meanwhile() -> RpcError:
    """The answer of a request stopped because its agent, user or session was suspended while
    bastion worked on it (as a suspended caller's next request is refused, reason
    ``suspended``; the decision that let it through is named by `InFlight.answer_of_stopped`)."""
    return RpcError(
        REFUSED_BY_POLICY,
        "bastion refused this request: its agent, user or session was suspended while it ran",
        {"reason": "suspended"},
    )


_tokens = itertools.count(1)
log = logging.getLogger("bastion.gateway")
# The 2026-07-28 per-request envelope; bastion speaks the 2025-11-25 era upstream.
_ENVELOPE_PREFIX = "io.modelcontextprotocol/"


@dataclass
class Exchange:
    """One request being handled: who sent it, to which upstream, and where progress goes."""

    gateway: Gateway
    upstream: UpstreamState
    caller: Caller
    message: Message
    progress: Progress | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    # What the client declared it can do (2025-11-25: at initialize; 2026-07-28: per request).
    capabilities: dict[str, Any] = field(default_factory=dict)
    # (server, user, chain of agents, session id or None): who may answer what bastion asks
    # this client.
    owner: tuple = ()
    # The answer's event stream, where requests to the client go; None if the client does not
    # accept text/event-stream.
    emit: Emit | None = None
    # The 2025-11-25 session the request came in (None in 2026-07-28, and at initialize).
    session: Session | None = None
    # At initialize (2025-11-25): the id of the session it opens.
    opening: str = ""
    # The mask obligation on the result, once decided: also applied to what is relayed during
    # the call (progress, log messages), and no request may go to the client under it.
    masks: Paths = ()
    # The behaviour counters' keys the answer's bytes count under, once a result is released
    # (the transport counts the answer as it encodes it: one encoding, not two).
    returned_keys: tuple[str, ...] | None = None
    _context: dict[str, Any] | None = None
    # The client's progress token, while its progress is relayed.
    _progress_token: Any = None
    # The caller's own upstream session while this request uses it (not ``shared``).
    _lease: UpstreamSession | None = None
    # Whether the request's own bytes were handed to the upstream's transport (`forward`): a
    # failure before that is one of a request that never left bastion.
    sent: bool = False
    # The decision whose target's labels go into the caller's set before anything the upstream
    # says of it reaches the client (`labelled`): its result, and before that what it relays
    # during the call (progress, log messages, questions) or the error it answers with.
    labels_due: Verdict | None = None
    _labelling: asyncio.Future | None = None
    # Whether the upstream's answer was large, read off the loop (a `LargeMessage`): masked and
    # written off the loop too (`bastion.large_json`).
    large: bool = False
    # Checks the request's token again (`StreamableHttpEndpoint._verified`), raising the 401
    # (or 503) its arrival would have got: asked while the request waits for people and before
    # it goes on after them, so that a token revoked meanwhile (by its client, by a Shared
    # Signals event, its user disabled) sends nothing upstream and is delivered nothing.
    still_valid: Callable[[], Awaitable[Any]] | None = None

    @property
    def connection(self) -> Upstream:
        """The upstream connection this request goes on: the upstream's shared session, or
        the caller's own (per user, per client session), held busy until `release`. Raises
        `RpcError` when the upstream has no room for one more session."""
        if self.upstream.sessions is None:
            return self.upstream.upstream
        if self._lease is None:
            self._lease = self.upstream.lease(self.caller, self._session_id)
        assert self._lease is not None
        return self._lease.upstream

    @property
    def _session_id(self) -> str:
        """The client session whose upstream session this request goes on."""
        return self.session.id if self.session is not None else self.opening

    def known_annotations(self, tool: str) -> dict[str, Any]:
        """The annotations of the tool ``tool`` as its upstream listed them last on the
        connection this request would go on, where bastion has heard them; none otherwise. For a
        message refused at ``connect``: nothing is read of the upstream, and no upstream session
        opened, for it."""
        sessions = self.upstream.sessions
        if sessions is None:
            connection = self.upstream.upstream
        elif self._lease is not None:
            connection = self._lease.upstream
        else:
            owner = sessions.owner(self.caller.subject, self.caller.chain, self._session_id)
            found = sessions.find(owner)
            if found is None:
                return {}
            connection = found.upstream
        return self.upstream.listed_annotations(tool, connection)

    def release(self) -> None:
        """This request no longer uses its upstream session."""
        lease, self._lease = self._lease, None
        if lease is not None and self.upstream.sessions is not None:
            self.upstream.sessions.release(lease)

    @property
    def decides_client_requests(self) -> bool:
        """Whether what the upstream asks the client is decided by the policy: from an upstream
        session of one user or client session (a shared session's are bounded by the client's
        capabilities and the call's masks only)."""
        return self.upstream.sessions is not None

    @property
    def server(self) -> str:
        return self.upstream.name

    def context(self, **extra: Any) -> dict[str, Any]:
        """The ``context`` the policy sees for this message, with ``extra`` (built once: every
        decision about one message sees the same time)."""
        if self._context is None:
            self._context = self.gateway.enforcer.context(
                self.caller, self.server, self.message.method or ""
            )
        return {**self._context, **extra} if extra else self._context

    @property
    def log_level(self) -> str | None:
        """The level of log messages the client wants for this request, if any: its session's
        (``logging/setLevel``, 2025-11-25) or the request's own (``_meta``, 2026-07-28)."""
        if self.session is not None:
            return self.session.log_level
        meta = self.message.params.get("_meta")
        level = meta.get(LOG_LEVEL) if isinstance(meta, dict) else None
        return level if level in LOG_LEVELS else None

    async def hear(self, message: dict[str, Any]) -> None:
        """A notification the upstream sent about this request: relayed to its client, if it
        asked for it (progress; a log message at its level or above), masked as the result is."""
        if self.progress is None:
            return
        method = message.get("method")
        params = message.get("params")
        params = params if isinstance(params, dict) else {}
        if method == "notifications/progress":
            params = {**params, "progressToken": self._progress_token}
        elif method == LOG_MESSAGE:
            wanted, level = self.log_level, params.get("level")
            if wanted is None or level not in LOG_LEVELS:
                return
            if LOG_LEVELS.index(level) < LOG_LEVELS.index(wanted):
                return
        else:
            return
        large = message.__class__ is LargeMessage
        if self.masks:
            if large:
                masked = await asyncio.to_thread(mask_notification, method, params, self.masks)
            else:
                masked = mask_notification(method, params, self.masks)
            if masked is None:
                return
            params = masked
        try:
            await self.labelled()
        except RpcError:
            return  # withheld: its labels cannot be kept (the result will be too)
        relayed = notification(method, params)
        # Written off the loop by the transport, as it was read.
        await self.progress(LargeMessage(relayed) if large else relayed)

    async def labelled(self) -> None:
        """Put the labels of the target of `labels_due` in the caller's label set, once per
        request, before the first thing the upstream says of that target reaches the client.
        Raises the refusal (recorded once: `Enforcer.record_labels`) when they cannot be kept,
        each time it is asked again: nothing more of the target may reach the client then."""
        if self._labelling is None:
            # A target without labels (most calls) costs two attribute reads, no task.
            if self.labels_due is None or not self.labels_due.obligations.labels:
                return
            record = self.gateway.enforcer.record_labels(self.caller, self.labels_due)
            self._labelling = asyncio.ensure_future(record)
        # Shielded: a message relayed meanwhile, or the request's cancellation, does not cancel
        # the recording others wait for (more labels than needed is the safe side).
        await asyncio.shield(self._labelling)

    async def forward(self, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send this request upstream (bastion's own connection) and return its result."""
        params = dict(self.message.params if params is None else params)
        if "requestState" in params or "inputResponses" in params:
            # Answers go upstream only as answers to questions bastion relayed (`seal`).
            params = await self.gateway.client_requests.answered(
                self.caller, self.server, params, self.decides_client_requests
            )
        connection = self.connection
        meta = params.get("_meta")
        route = None
        if isinstance(meta, dict):
            meta = {k: v for k, v in meta.items() if not k.startswith(_ENVELOPE_PREFIX)}
            token = meta.get("progressToken")
            if token is not None and self.progress is not None:
                # Tokens are the client's; upstream they must be unique across all clients.
                # Heard only from the connection the request goes on: another upstream, or
                # another user's upstream session, naming this token reaches no one.
                route = f"bastion-{next(_tokens)}"
                meta["progressToken"] = route
                self._progress_token = token
                self.gateway.progress_routes[route] = (connection, self.hear)
            elif token is not None:
                meta.pop("progressToken")
            if meta:
                params["_meta"] = meta
            else:
                params.pop("_meta")
        modern = self.caller.protocol_version in MODERN_VERSIONS
        asks = (
            {k: v for k, v in self.capabilities.items() if k in RELAYED_CAPABILITIES}
            if self.capabilities
            else None
        )
        # Log messages only for a client that asked for them and reads the answer's stream.
        level = (self.log_level if self.progress is not None else None) or None
        hear = self.hear if level else None
        request = partial(
            connection.request,
            self.message.method,
            capabilities=asks,
            ask=self._relay_request,
            log_level=level,
            hear=hear,
            sent=self._sent,
        )
        # What the upstream asks on its standing stream meanwhile names no call: refused
        # while this one is masked (`ClientRequests.from_standing_stream`).
        masked = bool(self.masks)
        if masked:
            connection.masked_calls += 1
        try:
            response = await request(params)
            result = _result(response)
            asking = result.get("resultType") in INPUT_REQUIRED
            rounds = 0
            while asking and not modern and rounds < _MAX_INPUT_ROUNDS:
                # A 2025-11-25 client: ask it each question, then retry for it.
                rounds += 1
                params = {**params, **await self._answers(result)}
                response = await request(params)
                result = _result(response)
                asking = result.get("resultType") in INPUT_REQUIRED
            # Of the answers, the last is the one the client is given.
            self.large = response.__class__ is LargeMessage
        finally:
            if masked:
                connection.masked_calls -= 1
            if route is not None:
                self.gateway.progress_routes.pop(route, None)
        if asking:
            if not modern:
                raise UpstreamFailure(UPSTREAM_UNAVAILABLE, f"upstream {self.server} kept asking")
            # A 2026-07-28 client answers the questions itself and retries (a new request,
            # decided again): each question must be one it may be asked.
            questions = result.get("inputRequests") or {}
            if not isinstance(questions, dict):
                raise UpstreamFailure(
                    UPSTREAM_UNAVAILABLE, f"upstream {self.server}: bad inputRequests"
                )
            for question in questions.values():
                self._check_question(question)
            methods = {key: question["method"] for key, question in questions.items()}
            client_requests = self.gateway.client_requests
            decided: list[Verdict | None] = []
            try:
                for method in methods.values():
                    decided.append(await self._decide_question(method))
                # The questions are the upstream's text about the target: labelled before
                # they leave, withheld (and recorded so) if they cannot be.
                await self.labelled()
            except BaseException as e:
                for verdict in decided:
                    client_requests.settle(verdict, *relay_outcome(error=e))
                raise
            for verdict in decided:
                client_requests.settle(verdict, "allow", "")
            # Its answers come back in a retry, taken only as answers to these questions.
            client_requests.seal(self.caller, self.server, result, methods)
        return result

    # -- requests to the client (sampling, elicitation, roots) ----------------------------------

    def _check_question(self, question: Any) -> None:
        """Refuse (RpcError) a request for the client that bastion may not relay to it."""
        if self.masks:
            # What would travel to the client cannot be masked field by field: fail closed,
            # before reading it (a refusal naming the upstream's method or mode would carry it).
            raise RpcError(INVALID_REQUEST, MASKED_CALL_ASKS)
        method = question.get("method") if isinstance(question, dict) else None
        params = question.get("params") if isinstance(question, dict) else None
        check_client_request(method, params, self.capabilities)

    async def ask_client(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """Send the client a request on its answer's event stream; return its response
        (``result`` or ``error``). Only this request's user, chain and session may answer."""
        self._check_question({"method": method, "params": params})
        # What the upstream asks the client (a question to its model, a form) is its own text
        # about the target: labelled before it leaves, refused if it cannot be.
        await self.labelled()
        if self.caller.protocol_version in MODERN_VERSIONS:
            # 2026-07-28 has no requests to the client mid-request (only input_required results),
            # and a 2025-11-25 upstream's pending call cannot wait for a retry.
            raise RpcError(
                METHOD_NOT_FOUND,
                "a 2026-07-28 client can be asked only by an input_required result",
            )
        if self.emit is None:
            raise RpcError(
                INVALID_REQUEST, "the client's request does not accept text/event-stream"
            )
        timeout = self.upstream.upstream.config.timeout
        return await self.gateway.client_requests.ask(
            self.owner, self.emit, method, params, timeout
        )

    def _sent(self) -> None:
        self.sent = True

    async def _relay_request(self, message: dict[str, Any]) -> dict[str, Any]:
        """A request from a 2025-11-25 upstream, sent while it answers ours: the answer (result
        or error) to send back to it."""
        method, params = str(message.get("method")), message.get("params")
        client_requests = self.gateway.client_requests
        try:
            verdict = await self._decide_question(method)
            asking = self.ask_client(method, params or {})
            return await client_requests.relayed(verdict, method, asking)
        except RpcError as e:
            return {"error": e.body(None)["error"]}

    async def _decide_question(self, method: str) -> Verdict | None:
        """The decision that lets the upstream ask the client ``method``
        (`decides_client_requests`; else None), its record written once the request is
        relayed or withheld (`ClientRequests.settle`)."""
        if not self.decides_client_requests:
            return None
        return await self.gateway.client_requests.decide(self.caller, self.server, method)

    async def _answers(self, result: dict[str, Any]) -> dict[str, Any]:
        """A 2026-07-28 upstream's questions, asked of a 2025-11-25 client one by one; the
        params to retry with."""
        questions = result.get("inputRequests") or {}
        if not isinstance(questions, dict):
            raise UpstreamFailure(
                UPSTREAM_UNAVAILABLE, f"upstream {self.server}: bad inputRequests"
            )
        answers: dict[str, Any] = {}
        client_requests = self.gateway.client_requests
        for key, question in questions.items():
            self._check_question(question)
            method = question["method"]
            verdict = await self._decide_question(method)
            asking = self.ask_client(method, question["params"])
            answer = await client_requests.relayed(verdict, method, asking)
            if not isinstance(answer.get("result"), dict):
                code, message, _ = error_parts(
                    answer.get("error"), INVALID_REQUEST, "the client did not answer"
                )
                raise RpcError(code, message)
            answers[key] = answer["result"]
        retry: dict[str, Any] = {"inputResponses": answers}
        if "requestState" in result:
            retry["requestState"] = result["requestState"]
        return retry


def _result(response: dict[str, Any]) -> dict[str, Any]:
    """The result of an upstream's JSON-RPC response, or its error raised as `UpstreamError`,
    without a ``decision_id`` of the upstream's in its data: only bastion names decisions (an
    upstream could send an agent, or the auditor it asks, to another record, or to none)."""
    if "error" in response:
        code, message, data = error_parts(response["error"], INTERNAL_ERROR, "upstream error")
        if isinstance(data, dict) and "decision_id" in data:
            data = {k: v for k, v in data.items() if k != "decision_id"}
        raise UpstreamError(code, message, data)
    result = response.get("result")
    return result if isinstance(result, dict) else {}


def nameable(value: Any) -> bool:
    """Whether ``value`` is a name a client can send in a request: a non-empty string that
    `untrusted_json` takes (no NUL, no lone surrogate)."""
    return isinstance(value, str) and value != "" and untrusted_json.is_text(value)


def listed_once(items: Any, field: str) -> list[dict[str, Any]]:
    """The objects of ``items`` (a list page as an upstream sent it) whose ``field`` is a
    `nameable` name no other object of the page has. A name listed twice is taken as neither:
    the upstream says two things of it (two descriptions, a hint true and false), and which
    one it runs when called is its own choice, so neither is offered, believed for the
    read-only downgrade, or held against a pin (docs/gateway.md, "Tool pins")."""
    named = [
        item
        for item in (items if isinstance(items, list) else ())
        if isinstance(item, dict) and nameable(item.get(field))
    ]
    counts = Counter(item[field] for item in named)
    return [item for item in named if counts[item[field]] == 1]


def _name(ex: Exchange, params: dict[str, Any], key: str, where: str = "params") -> str:
    return tool_or_prompt_name(params.get(key), ex.gateway.config.max_name_chars, f"{where}.{key}")


def _uri(ex: Exchange, value: Any, where: str = "params.uri", template: bool = False) -> str:
    return resource_uri(value, ex.gateway.config.max_name_chars, where, template)


def _arguments(params: dict[str, Any], where: str = "params") -> dict[str, Any]:
    """The ``arguments`` of a request as they are decided, recorded and bound to approvals: an
    object, or none (absent or null, decided as ``{}``; MCP servers read both as no
    arguments). Any other value is refused: read as ``{}`` while it went upstream as sent, it
    was decided as other arguments than the upstream got."""
    arguments = params.get("arguments")
    if arguments is None:
        return {}
    if not isinstance(arguments, dict):
        raise RpcError(INVALID_PARAMS, f"{where}.arguments must be an object", http_status=400)
    return arguments


def server_capabilities(ex: Exchange) -> dict[str, Any]:
    """The upstream's capabilities, less what bastion does not relay."""
    upstream = ex.connection.init_result.get("capabilities") or {}
    passes = ex.gateway.config.pass_methods
    caps: dict[str, Any] = {}
    for key in ("tools", "prompts", "resources"):
        if key in upstream:
            caps[key] = dict(upstream[key] or {})
    if "resources" in caps and not ex.connection.offers_subscribe():
        caps["resources"].pop("subscribe", None)
    if "completions" in upstream and "completion/complete" in passes:
        caps["completions"] = upstream["completions"]
    if "logging" in upstream and "logging/setLevel" in passes:
        caps["logging"] = upstream["logging"]
    return caps


# -- lifecycle ---------------------------------------------------------------------------------


async def admit_and_start(ex: Exchange) -> None:
    """``connect`` decided and recorded, and the upstream connection started: the caller's own
    upstream session only once it is admitted (none is opened for a refused client)."""
    if ex.upstream.sessions is None:
        await ex.connection.ensure_started()
        await ex.gateway.admit(ex, record=True)
    else:
        await ex.gateway.admit(ex, record=True)
        await ex.connection.ensure_started()


async def initialize(ex: Exchange) -> dict[str, Any]:
    await admit_and_start(ex)
    info = ex.connection.init_result
    requested = ex.message.params.get("protocolVersion")
    version = requested if requested in LEGACY_VERSIONS else LEGACY_VERSIONS[0]
    result = {
        "protocolVersion": version,
        "capabilities": server_capabilities(ex),
        "serverInfo": info.get("serverInfo") or {"name": ex.server, "version": ""},
    }
    if info.get("instructions"):
        result["instructions"] = info["instructions"]
    ex.notes["protocol_version"] = version
    return result


async def discover(ex: Exchange) -> dict[str, Any]:
    await admit_and_start(ex)
    info = ex.connection.init_result
    result: dict[str, Any] = {
        "supportedVersions": list(MODERN_VERSIONS),
        "capabilities": server_capabilities(ex),
        "resultType": "complete",
        "_meta": {
            "io.modelcontextprotocol/serverInfo": info.get("serverInfo")
            or {"name": ex.server, "version": ""}
        },
    }
    if info.get("instructions"):
        result["instructions"] = info["instructions"]
    return result


async def ping(ex: Exchange) -> dict[str, Any]:
    """Answered by bastion, with no decision of its own; the kill switch refuses it still."""
    await refuse_suspended(ex)
    return {}


async def refuse_suspended(ex: Exchange) -> None:
    """Refuse (reason ``suspended``, recorded as the message's ``connect``) a message no policy
    decides (``ping``, a client's notification or response) if its caller's agent, user or
    session is suspended: every message of a suspended principal is refused. One lookup in
    memory while nothing is suspended."""
    enforcer = ex.gateway.enforcer
    if enforcer.suspended(ex.caller) is None:
        return
    server = ex.upstream.entity
    method = ex.message.method or "(response)"
    context = enforcer.context(ex.caller, ex.server, method)
    await enforcer.refuse_suspended(
        ex.caller, ex.server, method, message_action(server), server, context
    )


# -- lists -------------------------------------------------------------------------------------

# method -> (key of the items, entity type, field naming the item)
LISTS = {
    "tools/list": ("tools", "Tool", "name"),
    "resources/list": ("resources", "McpResource", "uri"),
    "resources/templates/list": ("resourceTemplates", "McpResource", "uriTemplate"),
    "prompts/list": ("prompts", "Prompt", "name"),
}


# The lists whose items are pinned (``pin_tools``, ``pin_prompts``), and what each item is.
_PINNED = {"tools": TOOL, "prompts": PROMPT}


async def list_items(ex: Exchange) -> dict[str, Any]:
    await ex.gateway.admit(ex)
    key, kind, field_name = LISTS[ex.message.method]
    result = await ex.forward()
    await ex.gateway.enforcer.settled()
    # An item a client could not name back (a name that is not text it may send, or that the
    # page gives twice, a resource URI in a spelling bastion refuses, a tool or prompt name
    # that could pass for another) is not offered.
    items = [
        i
        for i in listed_once(result.get(key), field_name)
        if (key != "resources" or spelling_refused(i[field_name]) is None)
        and (key not in ("tools", "prompts") or plain_name(i[field_name]))
    ]
    if (pinned := _PINNED.get(key)) is not None:
        whole = not ex.message.params.get("cursor") and not result.get("nextCursor")
        await ex.upstream.learn(pinned, items, ex.connection, complete=whole)
        # Under pins, one not as accepted is not offered (docs/gateway.md, Tool pins).
        connection = ex.connection
        items = [i for i in items if ex.upstream.listed_as_pinned(pinned, i["name"], connection)]
    if key == "tools" and ex.gateway.enforcer.read_only(ex.caller, ex.context()):
        # Downgraded: a tool it may not call is not offered (fail closed; see signals docs).
        items = [i for i in items if is_read_only_tool(i.get("annotations"))]
    entities = [Entity(kind, f"{ex.server}/{i[field_name]}") for i in items]
    shown = ex.gateway.enforcer.visible(ex.caller, entities, ex.context())
    result[key] = [item for item, ok in zip(items, shown, strict=True) if ok]
    return result


# -- tools, resources, prompts -----------------------------------------------------------------


async def _decide_and_forward(
    ex: Exchange,
    resource: Entity,
    extra: dict[str, Any],
    arguments: Any,
    annotations_now: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    unpinned: PinChange | None = None,
) -> dict[str, Any]:
    """Decide a message on ``resource`` its handler has admitted (`Gateway.admit`: ``connect``,
    before it read anything of the upstream for it), as the MCP mapping's action on it
    (`message_action`), and forward it if allowed."""
    if "task" in ex.message.params:
        # MCP 2025-11-25 tasks: the upstream would answer with a task, its result fetched later
        # (tasks/result), as a method passed through fetches it: as it comes, past this
        # message's masks, review and labels. bastion does not offer tasks (`server_capabilities`).
        raise RpcError(
            INVALID_PARAMS,
            "params.task: bastion does not relay task-augmented requests (a task's result would"
            " reach the client past the obligations on this request); send it without task",
            http_status=400,
        )
    enforcer = ex.gateway.enforcer
    action = message_action(resource)
    request_id, params = holds.retried(ex)
    # Refused before the call is decided (and counted, or spends an approval).
    ex.gateway.client_requests.sealed(ex.caller, ex.server, params)
    context = ex.context(**extra)
    # Decided again each time people answer a hold while the client waits: approval, then
    # (when the result is held for review) release.
    for waits_left in (2, 1, 0):
        try:
            verdict = await enforcer.decide(
                ex.caller,
                ex.server,
                ex.message.method,
                action,
                resource,
                context,
                arguments,
                retried=request_id,
                annotations_now=annotations_now,
                unpinned=unpinned,
                runs_for=ex.upstream.run_seconds,
            )
        except Held as held:
            if not waits_left:
                raise holds.pending_error(held) from None
            answer = await holds.answer_held(ex, held, retry=request_id is not None)
            if answer is not None:
                return answer
            request_id = held.request.id
            continue
        if verdict.review_step == "release":
            return await _released(ex, verdict, extra.get("uri"))
        # An approval this run spent says it is in progress until it has ended (renewed while
        # it is in flight here): its result held first, where it is reviewed, so that a retry
        # finds one or the other. Not on a cancellation once sent: the upstream may still be
        # acting; the mark then lapses at its bound. A run that fails (or is cancelled before it
        # was sent) has ended in `_forward`. A call that spent none renews nothing.
        lease = (
            enforcer.keep_running(verdict, ex.upstream.run_seconds)
            if verdict.spent is not None
            else None
        )
        try:
            result = await _forward(ex, verdict, params, extra.get("uri"))
            if verdict.review_step == "hold":
                try:
                    held = await _held_for_review(ex, verdict, result, context, resource)
                except Exception:
                    await enforcer.run_ended(verdict)
                    raise
        finally:
            if lease is not None:
                lease.cancel()
        await enforcer.run_ended(verdict)
        if verdict.review_step != "hold":
            return result
        if not waits_left:
            raise holds.pending_error(held)
        answer = await holds.answer_held(ex, held, retry=True)
        if answer is not None:
            return answer
        request_id = held.request.id
    raise AssertionError("unreachable: the last round raises or returns")


async def _held_for_review(
    ex: Exchange, verdict: Verdict, result: Any, context: dict[str, Any], resource: Entity
) -> Held:
    """The upstream answered; a reviewer releases the answer, or not: the result held, and
    recorded so."""
    enforcer = ex.gateway.enforcer
    if ex.large:  # sealed in turns on its worker thread (`bastion.approvals.store.Sealed`)
        result = LargeMessage(result)
    try:
        held = await enforcer.hold_result(verdict, result, context)
    except NoApprover as why:  # nobody could review it any more (owner changed, reviewer disabled)
        record = verdict.record
        unheld = {**record["obligations"], "approval": _review_of(verdict)}
        if why.suspended is not None:
            # Stored, though this replica's view had not heard of it yet: withheld as the kill
            # switch refuses where it has (its reason, who it notes suspended, its alert).
            asked = (verdict.decision_id, record["server"], record["method"], resource)
            noted, error = await enforcer.suspension_refusal(
                why.suspended, *asked, record["context"], tuple(record["principals"])
            )
            enforcer.write(
                record, result="deny", reason="suspended", context=noted, obligations=unheld
            )
            raise error from None
        enforcer.write(record, result="deny", reason=why.reason, obligations=unheld)
        raise refused(resource.id, verdict.decision_id, why.reason, why.meaning) from None
    except Exception:
        holds.log.exception("the approval store cannot be written: result withheld")
        enforcer.write(verdict.record, result="deny", reason="approval_unavailable")
        raise refused(resource.id, verdict.decision_id, "approval_unavailable") from None
    enforcer.write(
        verdict.record,
        result="held",
        reason="review_pending",
        obligations={
            **verdict.record["obligations"],
            "approval": {"id": held.request.id, **_review_of(verdict)},
        },
    )
    return held


def _review_of(verdict: Verdict) -> dict[str, str]:
    """What the record of a result held for review (or that nobody could review) says of the
    hold: a review, and the approval its run spent, where a person's approval let it run
    (``approval_id``: the review is there because that person approved)."""
    if verdict.spent is None:
        return {"kind": "review"}
    return {"kind": "review", "approval_id": verdict.spent.id}


async def _forward(
    ex: Exchange, verdict: Verdict, params: dict[str, Any], uri: str | None
) -> dict[str, Any]:
    """Send the decided request upstream and apply its obligations to the answer. A run that
    fails (but for a cancellation once sent) has ended (`Enforcer.run_ended`); one that failed
    or was cancelled before its own bytes were handed to the upstream's transport
    (`Exchange.sent`: a session with no room, a connection or handshake that failed or was
    still under way, a header bastion will not send) gives back the approval it spent."""
    ex.masks = compile_paths(verdict.obligations.masks)
    reviewed = verdict.review_step == "hold"
    if reviewed:
        # Nothing the upstream says reaches the client before a reviewer releases its result:
        # what it sends during the call is masked whole, and it may not ask the client.
        ex.masks = (*ex.masks, WHOLE)
    else:
        ex.labels_due = verdict
    try:
        result = await ex.forward(params)
        if reviewed:
            return result  # masked when it is released, under the masks in force then
        await ex.labelled()
        return await _release(ex, verdict, result, uri)
    except (Exception, asyncio.CancelledError) as e:
        # An upstream's error is its free text: it could name what is masked.
        withheld = (WITHHELD_REVIEW_ERROR if reviewed else WITHHELD_ERROR) if ex.masks else None
        raise await _failed(ex, verdict, e, withheld) from None


async def _failed(
    ex: Exchange, verdict: Verdict, error: BaseException, withheld: str | None
) -> BaseException:
    """What to raise for a run ``verdict`` let through that failed (`_ended`), once it has
    ended (`Enforcer.run_ended`): the approval it spent given back if nothing of it left
    bastion (`Exchange.sent`), a cancelled run's too (`Enforcer.run_cancelled`). Not on a
    cancellation once sent: the upstream may still be acting."""
    if isinstance(error, UpstreamError) and withheld is None:
        # The upstream's own error, relayed as it came: its free text about the target (a
        # customer it did not find) reaches the client, so the target's labels go first.
        ex.labels_due = ex.labels_due or verdict
        try:
            await ex.labelled()
        except RpcError as refusal:
            error = refusal  # withheld: its labels cannot be kept
    ended = _ended(ex, verdict, error, withheld)
    if not isinstance(error, asyncio.CancelledError):
        await ex.gateway.enforcer.run_ended(verdict, None if ex.sent else _unsent(error))
    elif not ex.sent and verdict.spent is not None:
        await ex.gateway.enforcer.run_cancelled(verdict, _unsent(error))
    return ended


def _unsent(error: BaseException) -> tuple[str, str]:
    """What failed a call before it left bastion, for its approval's ``approval.unspent``
    event: the class of the error (for a connection not made or a program not started, that of
    the error behind it: ``ConnectionRefusedError``, ``FileNotFoundError``) and bastion's
    message."""
    if isinstance(error, UpstreamUnreachable):
        return error.cause, error.message
    if isinstance(error, RpcError):
        return type(error).__name__, error.message
    if isinstance(error, asyncio.CancelledError):
        return type(error).__name__, "cancelled before it was sent"
    return type(error).__name__, "internal error in bastion"


def _ended(
    ex: Exchange, verdict: Verdict, error: BaseException, withheld: str | None = None
) -> BaseException:
    """What to raise for a call ``verdict`` let through that ended in ``error`` with no result,
    once its record says how (`_unanswered`): the error its client is answered with, naming in
    ``data.decision_id`` the decision that let it through, so that the id leads to the record
    (`bastion audit show`) and the error is not audited as a refusal before any decision
    (`RequestRefusals.note`). A cancellation is raised as it is. bastion's own failure is
    logged with its traceback and answered -32603. A refusal of bastion's that names this
    decision has recorded it already (labels that cannot be kept); one that names another
    (a question of the upstream's that bastion refused to relay) keeps its id. An upstream's
    error keeps its code, message and data (data that is not an object under
    ``data.upstream``); with ``withheld`` (a mask applies) its message is that and its data,
    free text that could name what is masked, is left out."""
    decision_id = verdict.decision_id
    named = _decision_named(error)
    if named != decision_id:
        ex.gateway.enforcer.write(verdict.record, reason=_unanswered(error))
    if not isinstance(error, RpcError):
        if isinstance(error, asyncio.CancelledError):
            ex.notes["decision_id"] = decision_id  # named by a stopped call's answer
            return error
        log.error(
            "gateway: %s on %s failed after decision %s",
            ex.message.method,
            ex.server,
            decision_id,
            exc_info=error,
        )
        return RpcError(INTERNAL_ERROR, "internal error in bastion", {"decision_id": decision_id})
    if named is not None:
        return error
    if withheld is not None and isinstance(error, UpstreamError):
        return RpcError(error.code, withheld, {"decision_id": decision_id}, error.http_status)
    data = error.data
    if data is None:
        given: dict[str, Any] = {}
    elif isinstance(data, dict):
        given = dict(data)
    else:
        given = {"upstream": data}
    given["decision_id"] = decision_id
    # bastion's answer now, naming its decision: no longer the upstream's error as it came.
    return RpcError(error.code, error.message, given, error.http_status)


def _decision_named(error: BaseException) -> str | None:
    """The decision a refusal of bastion's names in ``data.decision_id``, if it names one."""
    if isinstance(error, RpcError) and not isinstance(error, UpstreamFailure) and error.data:
        return error.data.get("decision_id")
    return None


def _unanswered(error: BaseException) -> str:
    """The reason an allowed call's record gives for its having no result: the upstream failed
    it, bastion refused to go on (a limit, a question it would not relay; its code), the client
    cancelled it (or went away), its token was revoked or its caller suspended meanwhile, or
    bastion failed."""
    if isinstance(error, UpstreamFailure):
        return f"upstream error {error.code}"
    if isinstance(error, RpcError):
        return f"bastion error {error.code}"
    if isinstance(error, asyncio.CancelledError):
        stopped = _STOPPED.get(error.args[0]) if len(error.args) == 1 else None
        return stopped or "cancelled by the client"
    return "internal error"


async def _released(ex: Exchange, verdict: Verdict, uri: str | None) -> dict[str, Any]:
    """A result a reviewer released for this very call: delivered once, without calling the
    upstream again, masked as the policy says now and as the reviewer withheld."""
    enforcer = ex.gateway.enforcer
    assert verdict.review is not None and verdict.call is not None
    # Its labels before it is spent: spending deletes the held result, so one whose labels
    # then could not be recorded (Redis away, the set full) would be withheld and lost. A
    # refusal here leaves it held for the next try.
    try:
        await enforcer.record_labels(ex.caller, verdict)
        result, refusal = await enforcer.release(verdict)
        if refusal is not None:
            enforcer.write(verdict.record, result="deny", reason=refusal)
            raise refused(verdict.call.resource.id, verdict.decision_id, refusal)
        withheld = verdict.review.withheld_fields
        ex.masks = compile_paths(tuple(sorted({*verdict.obligations.masks, *withheld})))
        # Opened in turns when large: masked and written off the loop, as a large upstream
        # answer is.
        ex.large = result.__class__ is LargeMessage
        return await _release(ex, verdict, result, uri)
    except (Exception, asyncio.CancelledError) as e:
        raise _ended(ex, verdict, e) from None


async def _release(ex: Exchange, verdict: Verdict, result: dict[str, Any], uri: str | None):
    """The result as the client receives it: masked, counted and recorded. Its target's labels
    are in the caller's label set already (withheld if they cannot be): `_forward` records them
    once the upstream has answered, `_released` before the held result is spent."""
    if ex.large and ex.masks:
        result, masked = await asyncio.to_thread(mask_result, result, ex.masks, uri)
    else:
        result, masked = mask_result(result, ex.masks, uri)
    ex.returned_keys = scope_keys(ex.caller.subject, ex.caller.client_id, verdict.record["target"])
    obligations = dict(verdict.record["obligations"])
    obligations["masked_fields"] = masked
    ex.gateway.enforcer.write(verdict.record, obligations=obligations)
    return result


WITHHELD_ERROR = (
    "the upstream answered with an error; its message is withheld by bastion because a field of"
    " this result is masked"
)
WITHHELD_REVIEW_ERROR = (
    "the upstream answered with an error; its message is withheld by bastion because this"
    " call's result is held for review"
)
WITHHELD_SUBSCRIBE_ERROR = (
    "the upstream refused the subscription; its reason is withheld by bastion because a field of"
    " this resource is masked"
)


def refusal_to_follow(
    enforcer: Enforcer,
    caller: Caller,
    server: str,
    uris: Iterable[str],
    context: dict[str, Any],
    error: RpcError,
) -> RpcError:
    """``error``, raised as the upstream was asked for the updates of ``uris`` (`Upstream.watch`:
    a listen filter's resources, a GET stream's subscriptions), as the client gets it: an
    upstream's refusal names one of them with its reason, the upstream's free text, which is
    withheld, as a refused ``resources/subscribe``'s is, when reading any of them is masked for
    the caller, or refused now (`read_decision`, decided only when the upstream refused)."""
    if not isinstance(error, UpstreamError):
        return error
    authz = enforcer.authorizer()
    for uri in uris:
        _, chain, heard = read_decision(authz, caller, server, uri, context, enforcer.clock)
        if not heard or chain.obligations.masks:
            return RpcError(error.code, WITHHELD_SUBSCRIBE_ERROR, None, error.http_status)
    return error


async def call_tool(ex: Exchange) -> dict[str, Any]:
    params = ex.message.params
    name = _name(ex, params, "name")
    arguments = _arguments(params)
    tool = Entity("Tool", f"{ex.server}/{name}")
    extra: dict[str, Any] = {"tool": name, "arguments": arguments}
    # `connect` first: a caller refused it makes bastion read nothing of the upstream.
    await ex.gateway.admit(ex, then=(tool, extra))
    extra["annotations"] = await ex.upstream.annotations(name, ex.connection)
    # Arguments the tool would convert to its declared types are refused: decided as sent, they
    # would run as something else (bastion.gateway.input_types).
    refused_type = type_refused(
        ex.upstream.input_schema(name, ex.connection),
        arguments,
        ex.gateway.config.max_argument_checks,
    )
    if refused_type is not None:
        raise RpcError(INVALID_PARAMS, refused_type, http_status=400)
    # Under pin_tools: a tool listed otherwise than accepted is refused (two dict lookups; the
    # database is asked again only then, in case an operator accepted it meanwhile).
    unpinned = None
    pins = ex.upstream.tool_pins
    if pins is not None and (unpinned := pins.change(name, ex.connection)) is not None:
        unpinned = await pins.now(name, unpinned, ex.connection)
    return await _decide_and_forward(
        ex,
        tool,
        extra,
        arguments,
        # Asked only for a caller downgraded to read-only (`Enforcer.decide`).
        partial(ex.upstream.annotations, name, ex.connection, fresh=True),
        unpinned,
    )


async def read_resource(ex: Exchange) -> dict[str, Any]:
    uri = _uri(ex, ex.message.params.get("uri"))
    resource, extra = Entity("McpResource", f"{ex.server}/{uri}"), {"uri": uri}
    await ex.gateway.admit(ex, then=(resource, extra))
    return await _decide_and_forward(ex, resource, extra, None)


async def get_prompt(ex: Exchange) -> dict[str, Any]:
    params = ex.message.params
    name = _name(ex, params, "name")
    arguments = _arguments(params)
    prompt = Entity("Prompt", f"{ex.server}/{name}")
    extra = {"prompt": name, "arguments": arguments}
    await ex.gateway.admit(ex, then=(prompt, extra))
    return await _decide_and_forward(
        ex, prompt, extra, arguments, unpinned=await _prompt_unpinned(ex, name)
    )


async def _prompt_unpinned(ex: Exchange, name: str) -> PinChange | None:
    """Under pin_prompts: why the prompt ``name`` is not as accepted, or None (as for a tool's
    call: two dict lookups, and the database asked again only when it is not)."""
    pins = ex.upstream.prompt_pins
    if pins is None or (unpinned := pins.change(name, ex.connection)) is None:
        return None
    return await pins.now(name, unpinned, ex.connection)


# A session may subscribe to this many resources at most.
MAX_SUBSCRIPTIONS = 1000


async def subscribe(ex: Exchange) -> dict[str, Any]:
    """``resources/subscribe`` (2025-11-25): decided as ``read`` on the resource; its updates then
    go on the session's GET stream, each decided again (`Gateway.may_hear`)."""
    session = _subscriber(ex)
    uri = _uri(ex, ex.message.params.get("uri"))
    _room_to_subscribe(ex, session, uri)
    enforcer = ex.gateway.enforcer
    resource, extra = Entity("McpResource", f"{ex.server}/{uri}"), {"uri": uri}
    await ex.gateway.admit(ex, then=(resource, extra))
    try:
        verdict = await enforcer.decide(
            ex.caller,
            ex.server,
            ex.message.method,
            message_action(resource),
            resource,
            ex.context(**extra),
        )
    except Held as held:
        # Approved, the retry subscribes (2025-11-25: no requestState; found by its binding).
        raise holds.pending_error(held) from None
    try:
        # One stream of notifications from the upstream serves every client (Upstream.watch).
        await ex.connection.watch(frozenset((uri,)), sent=ex._sent)
        # Checked again: other subscriptions of this user were made while this one was decided
        # and its upstream answered. With Redis, then counted with other processes' at once.
        _room_to_subscribe(ex, session, uri)
        if uri not in session.subscriptions:
            await ex.gateway.follow(session.server, session.subject, session.id, (uri,))
    except (Exception, asyncio.CancelledError) as e:
        # The upstream's reason is its free text: it could name what the mask covers.
        withheld = WITHHELD_SUBSCRIBE_ERROR if verdict.obligations.masks else None
        raise await _failed(ex, verdict, e, withheld) from None
    enforcer.write(verdict.record)
    session.subscriptions.add(uri)
    session.withheld.discard(uri)  # granted again, recorded: heard of from here
    if session.closed and ex.gateway.follows is not None:  # it ended while Redis counted
        ex.gateway.follows.release(session.server, session.subject, session.id, (uri,))
    return {}


def _room_to_subscribe(ex: Exchange, session: Session, uri: str) -> None:
    """`RpcError` (-32602) unless ``session`` may follow ``uri`` too: `MAX_SUBSCRIPTIONS` per
    session, ``gateway.max_subscriptions_per_user`` per user and server."""
    if uri in session.subscriptions:
        return
    if len(session.subscriptions) >= MAX_SUBSCRIPTIONS:
        raise RpcError(
            INVALID_PARAMS,
            f"a session may subscribe to at most {MAX_SUBSCRIPTIONS} resources",
            http_status=400,
        )
    ex.gateway.sessions.room_to_follow(session.server, session.subject, 1)


async def unsubscribe(ex: Exchange) -> dict[str, Any]:
    """``resources/unsubscribe``: no more updates of the resource for this session. The upstream
    is not told (other clients may want them)."""
    session = _subscriber(ex)
    uri = _uri(ex, ex.message.params.get("uri"))
    await ex.gateway.admit(ex)
    if uri in session.subscriptions:
        session.subscriptions.discard(uri)
        session.withheld.discard(uri)
        if ex.gateway.follows is not None:
            # Ended here whatever Redis answers: its entry lapses if it cannot be removed.
            await ex.gateway.follows.drop(session.server, session.subject, session.id, (uri,))
    return {}


def _subscriber(ex: Exchange) -> Session:
    if ex.session is None:
        raise RpcError(
            METHOD_NOT_FOUND,
            "2026-07-28 clients ask for a resource's updates with subscriptions/listen",
        )
    if not ex.connection.offers_subscribe():
        raise RpcError(
            METHOD_NOT_FOUND, f"upstream {ex.server} does not offer resource subscriptions"
        )
    return ex.session


async def set_log_level(ex: Exchange) -> dict[str, Any]:
    """``logging/setLevel`` (2025-11-25), decided as ``connect``: the level of log messages this
    session's client wants. bastion keeps it for that session and relays to it only what it asked
    for; the upstream, shared by every client, is never set to one client's level as it is (see
    `Upstream.request`)."""
    if ex.session is None:
        raise RpcError(
            METHOD_NOT_FOUND,
            "2026-07-28 has no logging/setLevel: ask for log messages in each request's"
            f" _meta[{LOG_LEVEL!r}]",
        )
    level = ex.message.params.get("level")
    if level not in LOG_LEVELS:
        raise RpcError(
            INVALID_PARAMS, f"params.level must be one of: {', '.join(LOG_LEVELS)}", http_status=400
        )
    await ex.connection.ensure_started()
    if "logging" not in (ex.connection.init_result.get("capabilities") or {}):
        raise RpcError(METHOD_NOT_FOUND, f"upstream {ex.server} does not offer logging")
    await ex.gateway.admit(ex)
    ex.session.log_level = level
    return {}


async def complete(ex: Exchange) -> dict[str, Any]:
    """``completion/complete``, decided as ``connect`` and, since completions are values of
    the thing completed, as ``get`` of the prompt or ``read`` of the resource template whose
    argument it completes (its obligations included: a mask withholds the values)."""
    params = ex.message.params
    ref = params.get("ref")
    argument = params.get("argument")
    if not isinstance(ref, dict) or ref.get("type") not in ("ref/prompt", "ref/resource"):
        raise RpcError(
            INVALID_PARAMS,
            "params.ref must be a ref/prompt (with name) or a ref/resource (with uri)",
            http_status=400,
        )
    if not isinstance(argument, dict) or not isinstance(argument.get("name"), str):
        raise RpcError(
            INVALID_PARAMS, "params.argument must be an object with a name", http_status=400
        )
    context = params.get("context")
    if context is not None and not isinstance(context, dict):
        raise RpcError(INVALID_PARAMS, "params.context must be an object", http_status=400)
    extra: dict[str, Any] = {
        "argument": argument["name"],
        "arguments": _arguments(context or {}, "params.context"),
    }
    if ref["type"] == "ref/prompt":
        name = _name(ex, ref, "name", "params.ref")
        resource = Entity("Prompt", f"{ex.server}/{name}")
        extra["prompt"] = name
    else:
        uri = _uri(ex, ref.get("uri"), "params.ref.uri", template=True)
        resource = Entity("McpResource", f"{ex.server}/{uri}")
        extra["uri"] = uri
    await ex.gateway.admit(ex, then=(resource, extra))
    # Completing an argument of a prompt not as accepted is refused as getting it is.
    unpinned = await _prompt_unpinned(ex, extra["prompt"]) if "prompt" in extra else None
    # What is bound (to an approval, a review, the record's digest) is all the upstream gets
    # to complete: the argument and the context of the prompt's other arguments, which the
    # policy sees too. The argument alone let an approval of one context complete another.
    bound = {"argument": argument, "context": context}
    return await _decide_and_forward(ex, resource, extra, bound, unpinned=unpinned)


async def pass_through(ex: Exchange) -> dict[str, Any]:
    """Methods configured in ``gateway.pass_methods``: forwarded after the connect check, which
    refuses them to a caller downgraded to read-only (bastion cannot tell what they change)."""
    await ex.gateway.admit(ex, passed_through=True)
    return await ex.forward()


async def unknown(ex: Exchange) -> dict[str, Any]:
    raise RpcError(
        METHOD_NOT_FOUND,
        f"bastion does not forward {ex.message.method!r}; an administrator may list it in"
        " gateway.pass_methods",
    )


HANDLERS: dict[str, Callable[[Exchange], Awaitable[dict[str, Any]]]] = {
    "initialize": initialize,
    "server/discover": discover,
    "ping": ping,
    **dict.fromkeys(LISTS, list_items),
    "tools/call": call_tool,
    "resources/read": read_resource,
    "prompts/get": get_prompt,
    "resources/subscribe": subscribe,
    "resources/unsubscribe": unsubscribe,
}


# Served when listed in ``gateway.pass_methods`` (they are by default), by these handlers.
OFFERED: dict[str, Callable[[Exchange], Awaitable[dict[str, Any]]]] = {
    "logging/setLevel": set_log_level,
    "completion/complete": complete,
}


def handler_for(method: str, pass_methods: tuple[str, ...]):
    if method in HANDLERS:
        return HANDLERS[method]
    if method in pass_methods:
        return OFFERED.get(method, pass_through)
    return unknown
