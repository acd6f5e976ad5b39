"""Connections to the upstream MCP servers: a child process over stdio, or Streamable HTTP.

bastion talks to each upstream as one client of its own, whatever era its own clients use: over
HTTP in 2026-07-28 when the upstream answers ``server/discover`` (no session, one POST per
request), else in 2025-11-25, which every server speaks; over stdio in 2025-11-25. Requests of
all clients share that one connection; ids are bastion's. The client's token never travels
upstream: an HTTP upstream gets only the headers configured for it. A request an HTTP upstream
sends on the stream of one of bastion's requests (sampling, elicitation, roots) goes to that
request's ``ask``, and a log message sent there to its ``hear``. A request on the standing
stream goes to ``on_request`` where the gateway set one (an upstream session of one user or one
client session: `bastion.gateway.upstream_sessions`), whose standing stream is then kept open;
any other (over stdio, on a shared standing stream) names no client: a request is answered with
an error, a log message dropped.

Log levels belong to each client, not to the connection they share: a 2026-07-28 upstream is
told the level of the client behind each request (``_meta``), and a 2025-11-25 upstream, whose
level is one for the whole connection, is asked (``logging/setLevel``) for the most detailed
level any client wants; bastion then relays each message only to a client that wants its level.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from bastion.gateway.config import UpstreamConfig
from bastion.gateway.http1 import (
    MAX_MESSAGE,
    Http1Client,
    HttpClientError,
    HttpConnectError,
    Response,
)
from bastion.gateway.jsonrpc import (
    INTERNAL_ERROR,
    INVALID_REQUEST,
    LOG_LEVELS,
    METHOD_NOT_FOUND,
    UPSTREAM_UNAVAILABLE,
    RpcError,
    encode,
    error_parts,
)
from bastion.gateway.mcp_name import NAME_PARAMS
from bastion.gateway.mcp_name import encode as encode_name
from bastion.http_fields import media_type
from bastion.json_encoding import NOT_READ, decoder, nests_within, read
from bastion.large_json import OFF_LOOP_BYTES, LargeMessage, object_hook
from bastion.retries import Backoff, Outage
from bastion.turns import Turns, full_passes_held
from bastion.whole_numbers import capped

log = logging.getLogger("bastion.gateway.upstream")

# Why bastion itself stopped a request under way (its task's cancellation message:
# `transport.InFlight.stop`): its caller's token revoked, or its caller suspended.
REVOKED = "revoked"
SUSPENDED = "suspended"
# The longest SSE ``retry`` (milliseconds) taken as sent; a longer one, of any number of digits,
# is read as this. The request's timeout ends the wait before either.
MAX_RETRY_MS = 86_400_000

UPSTREAM_PROTOCOL_VERSION = "2025-11-25"
CLIENT_INFO = {"name": "bastion-gateway", "version": "0.1.0"}
# A stdio line (one message) may be this large.
_MAX_LINE = MAX_MESSAGE  # a stdio message, as an HTTP response: at most 64 MiB

Notify = Callable[[dict[str, Any]], Awaitable[None]]
# Relays a request the upstream sent while answering one of bastion's to the client that sent
# that one; returns the client's JSON-RPC response.
Ask = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
# Takes a notification the upstream sent on the stream of one of bastion's requests (a log
# message), for the client that sent that request.
Hear = Callable[[dict[str, Any]], Awaitable[None]]
# Called as a request's own bytes are handed to the transport: from then on the upstream may
# have them. A failure before it is one of a request that never left bastion.
Sent = Callable[[], None]
# The resources bastion asks one upstream connection for the updates of, for all its clients
# together, at most (it never asks the upstream to stop; docs/gateway.md).
MAX_WATCHED = 10_000
LOG_MESSAGE = "notifications/message"
LOG_LEVEL = "io.modelcontextprotocol/logLevel"

MODERN_VERSION = "2026-07-28"
_CAPABILITIES = "io.modelcontextprotocol/clientCapabilities"
_ENVELOPE = {
    "io.modelcontextprotocol/protocolVersion": MODERN_VERSION,
    _CAPABILITIES: {},
    "io.modelcontextprotocol/clientInfo": CLIENT_INFO,
}
_LIST_FLAGS = ("toolsListChanged", "promptsListChanged", "resourcesListChanged")
_ACKNOWLEDGED = "notifications/subscriptions/acknowledged"
# How long `HttpUpstream.watch` waits for its stream to open before it lets the client go on.
_OPEN_WAIT = 5.0
# An HTTP upstream's notification stream that ends or cannot be opened is opened again after
# `STREAM_RETRY_FIRST` seconds, doubled at each failure in a row up to `STREAM_RETRY_LONGEST`
# (each drawn between half and the whole: `Backoff`). An upstream that is down is not asked by
# every upstream connection of every replica once a second for as long as it is down; once it
# is back, its notifications flow again within the longest wait.
STREAM_RETRY_FIRST = 1.0
STREAM_RETRY_LONGEST = 30.0


class UpstreamFailure(RpcError):
    """The upstream failed a request bastion sent it: it did not start or answer in time, went
    away, or answered with what is no JSON-RPC response (-32000, in bastion's words), or it
    answered with an error (`UpstreamError`). Neither a refusal of bastion's nor a failure of
    its own: a decision record names it ``upstream error`` and its code, and where there is no
    decision it is logged (`bastion.gateway.refusals`)."""


@dataclass(slots=True, eq=False)  # an exception: see `bastion.gateway.jsonrpc.RpcError`
class UpstreamUnauthorized(UpstreamFailure):
    """The upstream answered 401 to the user's own token (`HttpUpstream.bearer`).
    ``before_acting``: the 401 answered the message itself (a request's POST, a notification,
    the opening of a stream), which the upstream therefore did not act on (RFC 6750 §3.1), so
    it may be sent again; False when it came after the upstream had taken the request (the
    resumption of its stream, an answer bastion sent on it): sent again, it could run twice."""

    before_acting: bool = field(default=False, kw_only=True)


@dataclass(slots=True, eq=False)  # an exception: see `bastion.gateway.jsonrpc.RpcError`
class UpstreamUnreachable(UpstreamFailure):
    """The upstream could not be reached: its connection was refused or timed out, its name did
    not resolve, its TLS handshake failed, its process could not be started. ``cause``: the
    class of the error behind it, for the record. (Whether a request had left bastion when it
    failed is told by `Sent`, not by the class of the failure.)"""

    cause: str = field(default="", kw_only=True)


class UpstreamError(UpstreamFailure):
    """An error the upstream answered with (a JSON-RPC error, or an HTTP error's text, or its
    refusal of a subscription), relayed as it came unless a mask applies: its message is the
    upstream's free text."""


class _Deadline:
    """The timeout of one request upstream, as `asyncio.timeout` times the await it guards: at
    the deadline the task is cancelled, and that cancellation alone (not the client's) is taken
    back (`end`). Without its state machine, and asking for the running loop once instead of
    three times (Python 3.11 makes a getpid() system call each time): on every call's path."""

    __slots__ = ("_task", "_handle", "_expired")

    def __init__(self, delay: float) -> None:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a request upstream must run in a task")
        self._task = task
        self._expired = False
        self._handle = task.get_loop().call_later(delay, self._expire)

    def _expire(self) -> None:
        self._task.cancel()
        self._expired = True

    def end(self) -> bool:
        """Stop the timer (again: harmless). True, once, if it expired and its cancellation was
        the task's only one, now taken back: the request timed out, and nothing else stops it."""
        self._handle.cancel()
        expired, self._expired = self._expired, False
        return expired and self._task.uncancel() == 0


class Upstream(abc.ABC):
    """What the gateway needs of an upstream: request, notify, and its initialize result."""

    # What bastion declares at initialize (2025-11-25): what it can relay to its clients.
    CLIENT_CAPABILITIES: dict[str, Any] = {}

    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self.name = config.name
        self.init_result: dict[str, Any] = {}
        # Called with every notification the upstream sends (progress, list_changed...).
        self.on_notification: Notify | None = None
        # Answers a request the upstream sends on its standing stream (an upstream session of
        # one user or client session); None: such requests are refused.
        self.on_request: Ask | None = None
        # Calls on this connection now whose result is masked or held for review: what the
        # upstream asks on its standing stream meanwhile is refused (`ClientRequests`).
        self.masked_calls = 0
        self._ids = itertools.count(1)
        self._start_lock = asyncio.Lock()
        self._started = False
        # The resources whose updates bastion asked for (it never asks the upstream to stop).
        self._watched: frozenset[str] = frozenset()
        # Whether requests carry the 2026-07-28 envelope (and a log level each).
        self._modern = False
        # The log level this connection was set to (2025-11-25: one for every client).
        self._log_level: str | None = None

    async def ensure_started(self) -> None:
        """Connect (start the process, do the handshake) unless connected, within the upstream's
        ``timeout``, waiting for the lock included: an upstream that takes a connection and
        never answers fails each call in time, and holds no other call for longer."""
        if self._started:
            return
        timeout = self.config.timeout
        try:
            async with asyncio.timeout(timeout), self._start_lock:
                if not self._started:
                    try:
                        await self._connect()
                    except BaseException:
                        self._discard_start()
                        raise
                    self._started = True
        except TimeoutError:
            raise UpstreamFailure(
                UPSTREAM_UNAVAILABLE, f"upstream {self.name} did not start within {timeout:g}s"
            ) from None

    def _discard_start(self) -> None:  # noqa: B027 - nothing by default: HTTP starts afresh
        """Let go of what a start that failed (or ran out of time) left behind."""

    async def request(
        self,
        method: str,
        params: dict[str, Any] | None,
        *,
        capabilities: dict[str, Any] | None = None,
        ask: Ask | None = None,
        log_level: str | None = None,
        hear: Hear | None = None,
        sent: Sent | None = None,
    ) -> dict[str, Any]:
        """Send one request; return the upstream's JSON-RPC response (with result or error).

        ``capabilities``: what the client behind this request declared (sampling, elicitation,
        roots), told to a 2026-07-28 upstream. ``ask``: where requests the upstream sends while
        answering this one go (else they are refused). ``log_level``: the level of log messages
        that client wants, if any; ``hear`` takes those the upstream sends about this request.
        ``sent`` is called as the request's own bytes are handed to the transport: whatever
        fails before (starting the connection, its handshake, a header bastion will not send,
        connecting) fails a request that never left bastion."""
        if not self._started:
            await self.ensure_started()
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": next(self._ids), "method": method}
        if log_level is not None:
            if self._modern:
                params = dict(params or {})
                params["_meta"] = {**(params.get("_meta") or {}), LOG_LEVEL: log_level}
            else:
                await self._lower_log_level(log_level)
        if params is not None:
            message["params"] = params
        deadline = _Deadline(self.config.timeout)
        try:
            return await self._exchange(
                message, capabilities=capabilities, ask=ask, hear=hear, sent=sent
            )
        except asyncio.CancelledError as e:
            if not deadline.end():
                # Its client cancelled or went away, or bastion stopped it: the upstream may
                # stop working on it (told not why bastion did: a caller's standing is not a
                # third party's to know).
                stopped = len(e.args) == 1 and e.args[0] in (REVOKED, SUSPENDED)
                told = (
                    "bastion stopped the request" if stopped else "the client cancelled the request"
                )
                self._abandon(message["id"], told)
                raise
        except TimeoutError:
            pass
        finally:
            deadline.end()
        self._abandon(message["id"], "bastion stopped waiting")
        raise UpstreamFailure(
            UPSTREAM_UNAVAILABLE,
            f"upstream {self.name} did not answer {method} within {self.config.timeout:g}s",
        ) from None

    async def watch(self, uris: frozenset[str], sent: Sent | None = None) -> None:
        """Make sure the upstream's notifications reach bastion: list changes, and updates of
        the resources ``uris`` (`RpcError` if the upstream refuses to send them). Over stdio
        they always arrive; resources are subscribed to with ``resources/subscribe``. ``sent``
        is called as the first of those is handed to the transport (as `request`'s)."""
        await self.ensure_started()
        new = uris - self._watched
        self._room_for(new)
        await self._subscribe(new, sent)
        self._watched |= new

    def _room_for(self, new: frozenset[str]) -> None:
        """Refuse (`RpcError`) to follow ``new`` resources past `MAX_WATCHED`."""
        if new and len(self._watched) + len(new) > MAX_WATCHED:
            raise RpcError(
                INVALID_REQUEST,
                f"bastion follows the updates of at most {MAX_WATCHED} resources of upstream"
                f" {self.name} for all its clients, and follows {len(self._watched)}",
            )

    def offers_subscribe(self) -> bool:
        """Whether the upstream sends a resource's updates on request."""
        resources = (self.init_result.get("capabilities") or {}).get("resources")
        return isinstance(resources, dict) and resources.get("subscribe") is True

    async def _subscribe(self, uris: frozenset[str], sent: Sent | None = None) -> None:
        """``resources/subscribe`` (2025-11-25) to each of ``uris``, on bastion's connection.
        Called while connecting too, so it sends through `_exchange`, not `request`."""
        if not uris or not self.offers_subscribe():
            return
        for uri in sorted(uris):
            message = {
                "jsonrpc": "2.0",
                "id": next(self._ids),
                "method": "resources/subscribe",
                "params": {"uri": uri},
            }
            try:
                async with asyncio.timeout(self.config.timeout):
                    response = await self._exchange(message, sent=sent)
            except TimeoutError:
                raise UpstreamFailure(
                    UPSTREAM_UNAVAILABLE,
                    f"upstream {self.name} did not answer resources/subscribe",
                ) from None
            if "error" in response:
                code, reason, _ = error_parts(response["error"], INTERNAL_ERROR, "no reason given")
                raise UpstreamError(
                    UPSTREAM_UNAVAILABLE,
                    f"upstream {self.name} refused resources/subscribe for {uri}: {reason}"
                    f" ({code})",
                )

    async def _lower_log_level(self, level: str) -> None:
        """2025-11-25: ask the upstream for log messages down to ``level`` if it was asked for
        less (one level for the whole connection: the most detailed any client wants; bastion
        filters per client). Two clients may ask at once, harmlessly."""
        known = self._log_level
        if known is not None and LOG_LEVELS.index(level) >= LOG_LEVELS.index(known):
            return
        if "logging" not in (self.init_result.get("capabilities") or {}):
            return
        message = {
            "jsonrpc": "2.0",
            "id": next(self._ids),
            "method": "logging/setLevel",
            "params": {"level": level},
        }
        try:
            async with asyncio.timeout(self.config.timeout):
                response = await self._exchange(message)
        except TimeoutError:
            raise UpstreamFailure(
                UPSTREAM_UNAVAILABLE, f"upstream {self.name} did not answer logging/setLevel"
            ) from None
        if "error" in response:
            log.warning(
                "upstream %s refused logging/setLevel %s: %s", self.name, level, response["error"]
            )
        current = self._log_level
        # Remembered even if refused: asked once per level, not again on every call.
        if current is None or LOG_LEVELS.index(level) < LOG_LEVELS.index(current):
            self._log_level = level

    async def _subscribe_again(self) -> None:
        """After a (re)connection: the upstream forgot what bastion subscribed to."""
        try:
            await self._subscribe(self._watched)
        except RpcError as e:
            log.warning("upstream %s: subscribing again: %s", self.name, e.message)

    async def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        await self.ensure_started()
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = params
        await self._send_notification(message)

    async def _handshake(self) -> None:
        response = await self._exchange(
            {
                "jsonrpc": "2.0",
                "id": next(self._ids),
                "method": "initialize",
                "params": {
                    "protocolVersion": UPSTREAM_PROTOCOL_VERSION,
                    "capabilities": self.CLIENT_CAPABILITIES,
                    "clientInfo": CLIENT_INFO,
                },
            }
        )
        if "result" not in response:
            raise UpstreamError(
                UPSTREAM_UNAVAILABLE,
                f"upstream {self.name} refused initialize: {response.get('error')}",
            )
        self.init_result = server_description(response["result"])
        self._log_level = None  # a new connection: its level is the upstream's default again
        await self._send_notification({"jsonrpc": "2.0", "method": "notifications/initialized"})

    async def _deliver(self, message: dict[str, Any]) -> None:
        if self.on_notification is not None:
            try:
                await self.on_notification(message)
            except Exception:
                log.exception("upstream %s: notification handler failed", self.name)

    # Transport-specific parts.
    @abc.abstractmethod
    def _abandon(self, request_id: Any, reason: str) -> None:
        """Tell the upstream that bastion no longer waits for ``request_id`` (no await: this
        runs while the waiting task is being cancelled)."""

    @abc.abstractmethod
    async def _connect(self) -> None:
        """Start the process or open the connection, then do the MCP handshake."""

    @abc.abstractmethod
    async def _exchange(
        self,
        message: dict[str, Any],
        *,
        capabilities: dict[str, Any] | None = None,
        ask: Ask | None = None,
        hear: Hear | None = None,
        sent: Sent | None = None,
    ) -> dict[str, Any]:
        """Send one request; return the response with its id. ``sent``: as in `request`."""

    @abc.abstractmethod
    async def _send_notification(self, message: dict[str, Any]) -> None:
        """Send one message that gets no answer."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop the process or close the connections."""


def say_if_program_missing(config: UpstreamConfig) -> None:
    """At start, log what is missing for a stdio upstream's program to start (`program_missing`),
    rather than have its first call meet it; not refused: it may be installed later."""
    if (missing := program_missing(config)) is not None:
        log.warning("upstream %s: %s; its calls fail until it is there", config.name, missing)


def program_missing(config: UpstreamConfig) -> str | None:
    """What is missing for a stdio upstream's program to start, if found so now: its working
    directory, or its command (a path, from that directory; a name, on the PATH its process
    gets, as the operating system looks it up)."""
    cwd = config.cwd or None
    if cwd is not None and not os.path.isdir(cwd):
        return f"its directory {cwd!r} does not exist"
    command = config.command
    if os.sep in command:
        path = os.path.join(cwd or "", command)
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return f"its command {command!r} is not an executable file"
        return None
    search = {**os.environ, **config.env}.get("PATH", os.defpath)
    if shutil.which(command, path=search) is None:
        return f"its command {command!r} is not found on its PATH"
    return None


class _Child:
    """A child process started off the event loop (`start`): `subprocess.Popen` in a worker
    thread, its pipes then read and written by the loop, its end seen through a pidfd (a thread
    of its own where there is none). Under uvloop, `asyncio.create_subprocess_exec` forks the
    whole process on the loop: 35 to 110 ms of a 600 MB bastion that every other request waited
    out, at each stdio upstream's start. The parts of `asyncio.subprocess.Process` an upstream
    uses: ``pid``, ``stdin``, ``stdout``, ``stderr``, ``returncode``, `kill`, `terminate`, `wait`;
    and `stop`, for a child its upstream lets go of.

    Each child leads a process group of its own, and its signals go to the whole group
    (`_signal_group`): a launcher (``npx``, ``uvx``, ``sh -c``) is stopped with the server it
    started. When the child ends, by itself or asked to, what is left of its group is asked to
    end (SIGTERM) and killed ``grace`` seconds later (SIGKILL): sooner once nothing else is
    left of it, at once if the group was killed already or `kill` is called meanwhile. Only
    then is the child waited for, so that the group's id stays its own while it is signalled;
    a server its launcher left behind never runs on orphaned. `wait` and ``returncode`` tell
    the child's end as soon as it is seen. Being out of bastion's group, the children get no
    SIGINT from a terminal's Ctrl-C: bastion's own close stops them."""

    def __init__(
        self,
        popen: subprocess.Popen,
        stdin: asyncio.StreamWriter,
        transports: list[asyncio.BaseTransport],
        grace: float,
    ) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.stdin = stdin
        self.stdout: asyncio.StreamReader | None = None
        self.stderr: asyncio.StreamReader | None = None
        self._transports = transports
        self._grace = grace
        self._loop = asyncio.get_running_loop()
        self._ended: asyncio.Future[int] = self._loop.create_future()
        # Held to signal the group and to wait for its leader: the group's end (`_end_group`,
        # in a thread) must not let the group's id go (free for another) between a check and
        # a signal of the loop's.
        self._signalling = threading.Lock()
        # Under `_signalling`: the child's end was seen (its group's end is under way); the
        # group was sent SIGTERM. Set: the group was sent SIGKILL (its grace is over).
        self._gone = False
        self._terminated = False
        self._killed = threading.Event()

    @classmethod
    async def start(
        cls, argv: list[str], env: dict[str, str], cwd: str | None, limit: int, grace: float
    ) -> _Child:
        """Start ``argv``; `OSError` if it cannot be. A start given up (cancelled) or failed
        after the process was made leaves none behind: it is killed, its pipes closed, and
        waited for in a worker thread (`_Launch`, `_stop`). ``grace``: how long what the
        process leaves of its group when it ends has between SIGTERM and SIGKILL."""
        pipe = subprocess.PIPE
        launch = _Launch()
        try:
            popen = await asyncio.to_thread(
                launch.run,
                argv,
                stdin=pipe,
                stdout=pipe,
                stderr=pipe,
                env=env,
                cwd=cwd,
                process_group=0,  # a group of its own: `_signal_group`
            )
        except BaseException:
            if (made := launch.give_up()) is not None:  # made, but its handing over cancelled
                _stop_elsewhere(made)
            raise
        loop = asyncio.get_running_loop()
        transports: list[asyncio.BaseTransport] = []
        try:
            transport, protocol = await loop.connect_write_pipe(
                asyncio.streams.FlowControlMixin, _for_transport(loop, popen.stdin, "wb")
            )
            transports.append(transport)
            writer = asyncio.StreamWriter(transport, protocol, None, loop)
            child = cls(popen, writer, transports, grace)
            child.stdout = await _reading(
                loop, _for_transport(loop, popen.stdout, "rb"), limit, transports
            )
            child.stderr = await _reading(
                loop, _for_transport(loop, popen.stderr, "rb"), limit, transports
            )
        except BaseException:
            for transport in transports:
                transport.close()
            _stop_elsewhere(popen)
            raise
        child._watch()
        return child

    def _watch(self) -> None:
        try:
            fd = os.pidfd_open(self.pid)
        except OSError:  # a kernel before 5.3
            threading.Thread(target=self._wait, daemon=True).start()
            return

        def readable() -> None:  # it ended (a pidfd is readable only then)
            if self._seen_ended():
                self._loop.remove_reader(fd)
                os.close(fd)

        self._loop.add_reader(fd, readable)

    def _wait(self) -> None:
        with contextlib.suppress(ChildProcessError):  # its end, not waited for yet
            os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
        self._seen_ended()

    def _seen_ended(self) -> bool:
        """Whether the child has ended; if so, and for the first time, its end told to `wait`
        and its group's end begun: SIGTERM (unless the group was sent one, or SIGKILL,
        already), then `_end_group` in a thread of its own, which outlives the loop if it
        must. The child is not waited for here (WNOWAIT): the group's id stays its own."""
        with self._signalling:
            if self._gone:
                return True
            try:
                seen = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:  # waited for by someone else: as `Popen.poll` reads it
                code = self._popen.poll()
            else:
                if seen is None:
                    return False
                code = seen.si_status if seen.si_code == os.CLD_EXITED else -seen.si_status
            self._gone = True
            if not (self._terminated or self._killed.is_set()):
                self._terminated = True
                _signal_group(self._popen, signal.SIGTERM)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            self._loop.call_soon_threadsafe(self._end, code)
        threading.Thread(target=self._end_group).start()
        return True

    def _end_group(self) -> None:
        """In a thread: once ``grace`` has passed, `kill` was called, or nothing but the child is
        left of its group, SIGKILL to what is left of the group, then the child waited for (no
        zombie)."""
        deadline = time.monotonic() + self._grace
        while _others_in_group(self.pid):
            left = deadline - time.monotonic()
            if left <= 0 or self._killed.wait(min(left, _GROUP_LOOK_SECONDS)):
                break
        with self._signalling:
            self._killed.set()
            _signal_group(self._popen, signal.SIGKILL)
            self._popen.wait()

    def _end(self, code: int) -> None:
        if not self._ended.done():
            self._ended.set_result(code)

    @property
    def returncode(self) -> int | None:
        if self._popen.returncode is None and self._ended.done():
            return self._ended.result()
        return self._popen.returncode

    def kill(self) -> None:
        """SIGKILL to the group, at once; a grace under way (`_seen_ended`) ends with it."""
        with self._signalling:
            self._killed.set()
            _signal_group(self._popen, signal.SIGKILL)

    def terminate(self) -> None:
        with self._signalling:
            self._terminated = True
            _signal_group(self._popen, signal.SIGTERM)

    def stop(self) -> None:
        """Close its pipes, and kill it, its group with it, at once; or, if it has ended, let
        what it left of its group have its grace. Its end is waited for by `_watch` (no
        zombie), as the loop runs on."""
        for transport in self._transports:
            transport.close()
        if not self._seen_ended():
            self.kill()

    async def wait(self) -> int:
        return await asyncio.shield(self._ended)


def _for_transport(loop: asyncio.AbstractEventLoop, pipe: Any, mode: str) -> Any:
    """``pipe`` (a child's stdin, stdout or stderr) as the loop's pipe transport must be given it
    so that its descriptor is closed once. uvloop's transports have libuv close the descriptor,
    and later close the file object as well: a second close of that number, which closes
    another thread's file if it was given the number in between (a worker starting the next
    child: `[Errno 9] Bad file descriptor`). So under uvloop the transport gets a descriptor of
    its own, in an object that never closes it, and the child's object is closed here; asyncio's
    own transports close the object they are given, once."""
    if not loop.__class__.__module__.startswith("uvloop"):
        return pipe
    fd = os.dup(pipe.fileno())
    pipe.close()
    return open(fd, mode, buffering=0, closefd=False)  # noqa: SIM115 - libuv closes it


async def _reading(
    loop: asyncio.AbstractEventLoop, pipe: Any, limit: int, transports: list[asyncio.BaseTransport]
) -> asyncio.StreamReader:
    """A stream the loop reads ``pipe`` (a child's stdout or stderr) into; its transport is
    added to ``transports``."""
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader, loop=loop), pipe
    )
    transports.append(transport)
    return reader


class _Launch:
    """One `subprocess.Popen` in a worker thread, for a start that may be given up meanwhile
    (cancelled: its client went away, its call's deadline or the upstream's start timeout
    passed, the server is stopping). `asyncio.to_thread` runs on after its caller is cancelled,
    and the process it then makes would have no owner: running on, its pipes open. So the
    thread hands the process over only while the start still waits for it, and otherwise
    stops it itself (`_stop`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._given_up = False
        self._made: subprocess.Popen | None = None

    def run(self, argv: list[str], **options: Any) -> subprocess.Popen | None:
        """The process started; None only to a start given up, which never reads it."""
        popen = subprocess.Popen(argv, **options)
        with self._lock:
            if not self._given_up:
                self._made = popen
                return popen
        _stop(popen)
        return None

    def give_up(self) -> subprocess.Popen | None:
        """No one takes the process any more; the process if the thread handed it over
        already (the start was cancelled as it was being given it): the caller stops it."""
        with self._lock:
            self._given_up = True
            return self._made


# How often the group's end (`_Child._end_group`) looks whether anything is left of the group.
_GROUP_LOOK_SECONDS = 0.05


def _others_in_group(pgid: int) -> bool:
    """Whether a process other than ``pgid`` itself runs in process group ``pgid`` (a zombie
    does not run); True where /proc cannot tell."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True
    for entry in entries:
        if not entry.isdigit() or int(entry) == pgid:
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                # After the command's closing parenthesis: state, ppid, pgrp.
                state, _, group = stat.read().rpartition(b")")[2].split(None, 3)[:3]
        except (OSError, ValueError):
            continue  # ended meanwhile
        if int(group) == pgid and state != b"Z":
            return True
    return False


def _signal_group(popen: subprocess.Popen, number: int) -> None:
    """Send signal ``number`` to the process group ``popen`` leads (`_Child.start` starts each
    child in a group of its own): the child and whatever it started that stayed in its group.
    Only until the child is waited for: till then its pid, the group's id, is no one else's;
    after, with the group empty, another process may take it. Never to bastion's own group."""
    if popen.returncode is not None or popen.pid == os.getpgrp():
        return
    with contextlib.suppress(ProcessLookupError):  # the whole group ended meanwhile
        os.killpg(popen.pid, number)


def _stop(popen: subprocess.Popen) -> None:
    """Kill a child nobody owns, its group with it, close its pipes and wait for its end (no
    zombie): in a worker thread, as the wait blocks. A child that never got a message has
    nothing to finish."""
    _signal_group(popen, signal.SIGKILL)  # nothing if it was waited for already
    for pipe in (popen.stdin, popen.stdout, popen.stderr):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()
    popen.wait()


def _stop_elsewhere(popen: subprocess.Popen) -> None:
    """`_stop` ``popen`` in a worker thread of the loop's (which its end waits for), or in a
    thread of its own once the loop no longer takes work."""
    _signal_group(popen, signal.SIGKILL)
    try:
        asyncio.get_running_loop().run_in_executor(None, _stop, popen)
    except RuntimeError:  # the loop's executor is shut down: the loop is ending
        threading.Thread(target=_stop, args=(popen,), daemon=True).start()


class StdioUpstream(Upstream):
    """A child process speaking newline-delimited JSON-RPC on stdin/stdout (MCP stdio transport)."""

    def __init__(self, config: UpstreamConfig) -> None:
        super().__init__(config)
        self._process: _Child | None = None
        self._pending: dict[Any, asyncio.Future] = {}
        self._write_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        # Set by `close`: no process is started again, and one a start made meanwhile is stopped.
        self._closed = False

    async def _connect(self) -> None:
        self._refuse_if_closed()
        env = {**os.environ, **self.config.env}
        try:
            process = await _Child.start(
                [self.config.command, *self.config.args],
                env,
                self.config.cwd or None,
                _MAX_LINE,
                self.config.stop_grace_seconds,
            )
        except OSError as e:
            raise UpstreamUnreachable(
                UPSTREAM_UNAVAILABLE,
                f"upstream {self.name}: cannot start {self.config.command}: {e}",
                cause=type(e).__name__,
            ) from None
        if self._closed:  # while it started: nobody else would stop it
            process.stop()
            self._refuse_if_closed()
        self._process = process
        self._tasks = [
            asyncio.create_task(self._read(self._process)),
            asyncio.create_task(self._drain_stderr(self._process)),
        ]
        await self._handshake()
        await self._subscribe_again()

    def _refuse_if_closed(self) -> None:
        if self._closed:
            raise UpstreamFailure(UPSTREAM_UNAVAILABLE, f"upstream {self.name} is closed")

    async def _read(self, process: _Child) -> None:
        assert process.stdout is not None
        try:
            while line := await process.stdout.readline():
                try:
                    # Read before the next line is: messages keep their order, large or not.
                    if len(line) < OFF_LOOP_BYTES:
                        message = _message(line)
                    else:
                        message = await asyncio.to_thread(_large_message, line)
                except (ValueError, RecursionError):  # not JSON, or nested past Python's stack
                    log.warning("upstream %s wrote a line that is not JSON", self.name)
                    continue
                if _is_message(message, self.name):
                    await self._dispatch(message)
        except (ValueError, ConnectionError) as e:
            log.warning("upstream %s: stdout unreadable: %s", self.name, e)
        finally:
            self._lost(f"upstream {self.name} exited")
            # Nothing reads it any more: stop it, or the next start would leave it running.
            process.stop()

    async def _dispatch(self, message: dict[str, Any]) -> None:
        request_id = message.get("id")
        if "id" in message and not _plain_id(request_id):
            log.warning(
                "upstream %s sent a message whose id is neither text nor a number", self.name
            )
            return
        if "method" in message:
            if "id" in message:  # a request from the server: not relayed
                await self._write(
                    RpcError(METHOD_NOT_FOUND, "bastion does not relay server requests").body(
                        request_id
                    )
                )
            else:
                await self._deliver(message)
            return
        future = self._pending.pop(request_id, None)
        if future is not None and not future.done():
            future.set_result(message)

    async def _drain_stderr(self, process: _Child) -> None:
        assert process.stderr is not None
        while line := await process.stderr.readline():
            log.debug("upstream %s: %s", self.name, line.decode(errors="replace").rstrip())

    def _lost(self, reason: str) -> None:
        self._started = False
        for future in self._pending.values():
            if not future.done():
                future.set_exception(UpstreamFailure(UPSTREAM_UNAVAILABLE, reason))
        self._pending.clear()

    async def _write(self, message: dict[str, Any], sent: Sent | None = None) -> None:
        process = self._process
        if process is None or process.stdin is None or process.returncode is not None:
            raise UpstreamFailure(UPSTREAM_UNAVAILABLE, f"upstream {self.name} is not running")
        data = encode(message) + b"\n"
        async with self._write_lock:
            if process.stdin.is_closing():  # a write now would be dropped: not sent
                raise UpstreamFailure(UPSTREAM_UNAVAILABLE, f"upstream {self.name} closed stdin")
            if sent is not None:
                sent()
            try:
                process.stdin.write(data)
                await process.stdin.drain()
            except (ConnectionError, BrokenPipeError):
                raise UpstreamFailure(
                    UPSTREAM_UNAVAILABLE, f"upstream {self.name} closed stdin"
                ) from None

    async def _exchange(
        self,
        message: dict[str, Any],
        *,
        capabilities: dict[str, Any] | None = None,
        ask: Ask | None = None,
        hear: Hear | None = None,
        sent: Sent | None = None,
    ) -> dict[str, Any]:
        # A request or a log message the server sends over stdio names no request of ours:
        # never relayed.
        future = asyncio.get_running_loop().create_future()
        self._pending[message["id"]] = future
        try:
            await self._write(message, sent)
            return await future
        finally:
            self._pending.pop(message["id"], None)

    async def _send_notification(self, message: dict[str, Any]) -> None:
        await self._write(message)

    async def _lower_log_level(self, level: str) -> None:
        """A log message over stdio names no request, so none is relayed: none is asked for."""

    def _abandon(self, request_id: Any, reason: str) -> None:
        process = self._process
        if process is None or process.stdin is None or process.returncode is not None:
            return
        # One write of a whole line: it cannot land inside another message (no await between).
        process.stdin.write(encode(_cancelled(request_id, reason)) + b"\n")

    def _discard_start(self) -> None:
        # The process may hang in its handshake: it is killed, not asked to stop.
        process, self._process = self._process, None
        if process is not None:
            process.stop()
        for task in self._tasks:
            task.cancel()
        self._tasks = []

    async def close(self) -> None:
        """Stop the process: its stdin closed, then SIGTERM after ``stop_grace_seconds``, SIGKILL
        after as long again (what it leaves of its group then has its own grace: `_Child`).
        Stopped at once if this is cancelled meanwhile; a start under way stops its own."""
        process, self._process = self._process, None
        self._started = False
        self._closed = True
        if process is not None:
            try:
                await self._ask_to_end(process, self.config.stop_grace_seconds)
            finally:
                process.stop()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    @staticmethod
    async def _ask_to_end(process: _Child, grace: float) -> None:
        if process.returncode is not None:
            return
        if process.stdin is not None:
            process.stdin.close()
        try:
            async with asyncio.timeout(grace):
                await process.wait()
        except TimeoutError:
            process.terminate()
            try:
                async with asyncio.timeout(grace):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


class HttpUpstream(Upstream):
    """A Streamable HTTP server; its JSON or SSE responses are both read."""

    # A request the server sends on the stream of one of bastion's requests belongs to that
    # request's client, and is relayed to it (if that client declared the capability).
    CLIENT_CAPABILITIES = {"sampling": {}, "elicitation": {"form": {}, "url": {}}, "roots": {}}

    def __init__(self, config: UpstreamConfig) -> None:
        super().__init__(config)
        self._http = Http1Client(config.url, connect_timeout=min(10.0, config.timeout))
        self._session_id: str | None = None
        self._protocol_version: str | None = None
        self._watcher: asyncio.Task | None = None
        # Set once the current notification stream is open (or the upstream has none).
        self._opened = asyncio.Event()
        # The waits before the stream is opened again, after it ended or could not be opened.
        self.stream_retries = Backoff(STREAM_RETRY_FIRST, STREAM_RETRY_LONGEST)
        self._stream_outage = Outage(log)
        self._chores: set[asyncio.Task] = set()  # notifications/cancelled being sent
        # The access token of the one user this upstream session serves (per-user credentials,
        # `bastion.gateway.upstream_credentials`); None: only the configured headers.
        self.bearer: str | None = None
        # The last POST head (`_post_head`), and what it was made for.
        self._head = b""
        self._head_key: tuple | None = None

    def _headers(self) -> dict[str, str]:
        headers = {
            "content-type": "application/json",
            "accept": "application/json, text/event-stream",
            **self.config.headers,
        }
        if self.bearer is not None:
            headers["authorization"] = f"Bearer {self.bearer}"
        if self._protocol_version:
            headers["mcp-protocol-version"] = self._protocol_version
        if self._session_id:
            headers["mcp-session-id"] = self._session_id
        return headers

    async def _connect(self) -> None:
        self._session_id = None
        self._protocol_version = None
        self._modern = False
        if not await self._discover():
            await self._handshake()
            await self._subscribe_again()
        if self.on_request is not None:
            await self._keep_standing_stream()

    async def _keep_standing_stream(self) -> None:
        """Open the standing stream of a session whose requests reach a client (`on_request`),
        and wait a moment for it: the upstream may ask on it during the very first call."""
        if self._watcher is None or self._watcher.done():
            self._opened = asyncio.Event()
            self._watcher = asyncio.create_task(self._watch_forever(self._watched, self._opened))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(self.config.timeout, _OPEN_WAIT)):
                await self._opened.wait()

    async def _discover(self) -> bool:
        """Use 2026-07-28 (one POST per request, no session: cheaper) if the upstream has it."""
        self._protocol_version = MODERN_VERSION
        self._modern = True
        try:
            response = await self._exchange(
                {
                    "jsonrpc": "2.0",
                    "id": next(self._ids),
                    "method": "server/discover",
                    "params": {},
                },
                retry=False,
            )
        except UpstreamUnauthorized:
            raise  # the user's token refused: no era answers it
        except RpcError:
            response = {}
        found = response.get("result") if isinstance(response, dict) else None
        if isinstance(found, dict) and MODERN_VERSION in (found.get("supportedVersions") or ()):
            meta = found.get("_meta")
            info = (
                meta.get("io.modelcontextprotocol/serverInfo") if isinstance(meta, dict) else None
            )
            self.init_result = server_description(
                {**found, "protocolVersion": MODERN_VERSION, "serverInfo": info}
            )
            return True
        self._protocol_version = None
        self._modern = False
        return False

    async def _handshake(self) -> None:
        await super()._handshake()
        self._protocol_version = self.init_result.get("protocolVersion", UPSTREAM_PROTOCOL_VERSION)

    def _check_authorized(self, status: int, *, before_acting: bool = False) -> None:
        """`UpstreamUnauthorized` if ``status`` is the upstream's 401 to the user's own token,
        wherever it answers (a request, a notification, the standing stream, a stream resumed):
        never a failure to try again with the same token (`UserTokenUpstream` refreshes it
        once). ``before_acting``: ``status`` answers the message itself, not the stream of a
        request the upstream took. Nothing of its ``WWW-Authenticate`` is followed (nor a
        ``resource_metadata`` URL)."""
        if status == 401 and self.bearer is not None:
            raise UpstreamUnauthorized(
                UPSTREAM_UNAVAILABLE,
                f"upstream {self.name} no longer accepts the user's token",
                before_acting=before_acting,
            )

    def _post_head(self, method: str | None = None, name: str | None = None) -> bytes:
        """The head of a POST (with 2026-07-28's Mcp-Method and Mcp-Name for ``method`` and
        ``name``): made again only when it would differ from the last one (another user's token,
        protocol version, session, method or name)."""
        key = (self.bearer, self._protocol_version, self._session_id, method, name)
        if key != self._head_key:
            headers = self._headers()
            if method is not None:
                headers["mcp-method"] = method
            if name is not None:
                headers["mcp-name"] = encode_name(name)
            self._head = self._http.head("POST", headers)
            self._head_key = key
        return self._head

    async def _post(
        self,
        message: dict[str, Any],
        capabilities: dict[str, Any] | None = None,
        sent: Sent | None = None,
    ) -> Response:
        try:
            if self._modern and "method" in message:
                method = message["method"]
                params = dict(message.get("params") or {})
                params["_meta"] = {**(params.get("_meta") or {}), **_ENVELOPE}
                if capabilities:
                    params["_meta"][_CAPABILITIES] = capabilities
                message = {**message, "params": params}
                name = params.get(NAME_PARAMS.get(method, ""))
                head = self._post_head(method, name if isinstance(name, str) else None)
            else:
                head = self._post_head()
            return await self._http.send(head, encode(message), sent)
        except HttpConnectError as e:  # nothing of the message was written
            raise UpstreamUnreachable(
                UPSTREAM_UNAVAILABLE, f"upstream {self.name}: {e}", cause=e.cause
            ) from None
        except HttpClientError as e:
            raise UpstreamFailure(UPSTREAM_UNAVAILABLE, f"upstream {self.name}: {e}") from None

    async def _exchange(
        self,
        message: dict[str, Any],
        *,
        capabilities: dict[str, Any] | None = None,
        ask: Ask | None = None,
        hear: Hear | None = None,
        sent: Sent | None = None,
        retry: bool = True,
    ) -> dict[str, Any]:
        response = await self._post(message, capabilities, sent)
        status = response.status_code
        try:
            if status == 404 and self._session_id and retry:
                # The upstream forgot our session (restart): open a new one, once.
                response.close()
                await self._connect()
                return await self._exchange(
                    message, capabilities=capabilities, ask=ask, hear=hear, retry=False
                )
            self._check_authorized(status, before_acting=True)
            if message.get("method") == "initialize" and "mcp-session-id" in response.headers:
                self._session_id = response.headers["mcp-session-id"]
            kind = _media_type(response)
            if status >= 400 and kind != _JSON:
                text = (await response.read()).decode(errors="replace")[:200]
                raise UpstreamError(
                    UPSTREAM_UNAVAILABLE,
                    f"upstream {self.name} answered HTTP {status}: {text}",
                )
            if kind == _EVENT_STREAM:
                try:
                    return await self._from_events(response, message["id"], ask, hear)
                except UpstreamUnauthorized as e:
                    # Refused on the stream of a request the upstream took (an answer bastion
                    # sent there, the stream resumed): the request itself was not refused.
                    raise UpstreamUnauthorized(e.code, e.message) from None
            body = await response.read()
            if len(body) < OFF_LOOP_BYTES:
                data = _message(body)
            else:
                data = await asyncio.to_thread(_large_message, body)
            if not isinstance(data, dict):
                raise UpstreamFailure(
                    UPSTREAM_UNAVAILABLE, f"upstream {self.name} sent a non-object"
                )
            return data
        except (HttpClientError, ValueError, RecursionError) as e:
            raise UpstreamFailure(UPSTREAM_UNAVAILABLE, f"upstream {self.name}: {e}") from None
        except asyncio.CancelledError:
            # In 2026-07-28 closing the stream is how a request is cancelled; in 2025-11-25 the
            # notification follows (`_abandon`), and the connection is not reused either way.
            response.abort()
            raise
        finally:
            response.close()

    def _abandon(self, request_id: Any, reason: str) -> None:
        if self._modern:
            return
        task = asyncio.ensure_future(self._send_notification(_cancelled(request_id, reason)))
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)
        task.add_done_callback(_log_failure)

    async def _from_events(
        self, response: Response, request_id: Any, ask: Ask | None = None, hear: Hear | None = None
    ) -> dict[str, Any]:
        """The answer to ``request_id`` from its event stream, relaying what comes before it.

        A 2025-11-25 upstream may end the stream before it answers, having numbered its events
        (SEP-1699: it asks its client to come back, after ``retry``): bastion then resumes the
        stream with a GET carrying ``Last-Event-ID``, as often as it is asked to, within the
        upstream's ``timeout`` like the rest of the request."""
        stream = EventStream()
        resumed: Response | None = None
        try:
            while True:
                async for message in _events(response, stream):
                    if "method" in message and "id" in message and ask is not None:
                        answer = await ask(message)
                        await self._send_notification(
                            {**answer, "jsonrpc": "2.0", "id": message["id"]}
                        )
                    elif (
                        hear is not None
                        and message.get("method") == LOG_MESSAGE
                        and "id" not in message
                    ):
                        await hear(message)
                    elif "method" in message:
                        await self._from_server(message)
                    elif message.get("id") == request_id:
                        return message
                if self._modern or stream.last_id is None:
                    raise UpstreamFailure(
                        UPSTREAM_UNAVAILABLE,
                        f"upstream {self.name} ended the stream without an answer",
                    )
                await asyncio.sleep(stream.retry)
                if resumed is not None:
                    resumed.close()
                response = resumed = await self._resume(stream.last_id)
        except asyncio.CancelledError:
            if resumed is not None:
                resumed.abort()
            raise
        finally:
            if resumed is not None:
                resumed.close()

    async def _resume(self, last_event_id: str) -> Response:
        """The GET that resumes a stream after its event ``last_event_id`` (2025-11-25)."""
        headers = self._stream_headers()
        headers["last-event-id"] = last_event_id
        response = await self._http.request("GET", headers)
        if response.status_code != 200 or not _is_event_stream(response):
            response.close()
            self._check_authorized(response.status_code)
            raise UpstreamFailure(
                UPSTREAM_UNAVAILABLE,
                f"upstream {self.name} answered HTTP {response.status_code} when asked to resume"
                " a stream",
            )
        return response

    def _stream_headers(self) -> dict[str, str]:
        """The headers of a GET for an event stream (2025-11-25)."""
        headers = self._headers()
        del headers["content-type"]
        headers["accept"] = "text/event-stream"
        return headers

    async def _from_server(self, message: dict[str, Any]) -> None:
        """A request or notification the upstream sent on a stream. A request goes to
        `on_request` if set, in a task of its own: the stream goes on while the client thinks."""
        if "id" in message and self.on_request is not None:
            task = asyncio.ensure_future(self._answer(self.on_request, message))
            self._chores.add(task)
            task.add_done_callback(self._chores.discard)
            task.add_done_callback(_log_failure)
        elif "id" in message:
            await self._send_notification(
                RpcError(METHOD_NOT_FOUND, "bastion does not relay server requests").body(
                    message["id"]
                )
            )
        else:
            await self._deliver(message)

    async def _answer(self, ask: Ask, message: dict[str, Any]) -> None:
        answer = await ask(message)
        await self._send_notification({**answer, "jsonrpc": "2.0", "id": message["id"]})

    # -- the standing stream: notifications that belong to no request ----------------------------

    async def watch(self, uris: frozenset[str], sent: Sent | None = None) -> None:
        """One notification stream from the upstream, shared by every client: in 2026-07-28 a
        ``subscriptions/listen`` for every list and the resources ``uris`` (opened again when
        they grow), in 2025-11-25 the GET stream, and ``resources/subscribe`` for new ``uris``
        (``sent``: as the base class's). Returns once the stream is open (or after a few
        seconds: it keeps trying)."""
        await self.ensure_started()
        watcher = self._watcher
        running = watcher is not None and not watcher.done()
        if self._modern:
            if running and uris <= self._watched:
                return
            self._room_for(uris - self._watched)
            self._watched |= uris
            if watcher is not None:
                watcher.cancel()
            running = False
        if not running:
            self._opened = asyncio.Event()
            self._watcher = asyncio.create_task(self._watch_forever(self._watched, self._opened))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(self.config.timeout, _OPEN_WAIT)):
                await self._opened.wait()
        if not self._modern:
            new = uris - self._watched
            self._room_for(new)
            await self._subscribe(new, sent)
            self._watched |= new

    async def _watch_forever(self, uris: frozenset[str], opened: asyncio.Event) -> None:
        """Keep a stream of notifications open from the upstream; open it again after it ends
        or fails, unless the upstream has no such stream. The waits back off while it cannot be
        opened (`stream_retries`), and that is logged once, and once that it is open again."""
        while True:
            try:
                if not await self._watch_once(uris, opened):
                    opened.set()  # none to wait for
                    return
            except (HttpClientError, RpcError, ValueError) as e:
                why = e.message if isinstance(e, RpcError) else str(e)
                self._stream_outage.failed(
                    "upstream %s: notification stream: %s; retrying, at longer and longer waits",
                    self.name,
                    why,
                )
            await asyncio.sleep(self.stream_retries.after_failure())
            with contextlib.suppress(RpcError):
                await self.ensure_started()

    def _stream_open(self, opened: asyncio.Event) -> None:
        opened.set()
        self.stream_retries.succeeded()
        self._stream_outage.ended("upstream %s: notification stream open again", self.name)

    async def _watch_once(self, uris: frozenset[str], opened: asyncio.Event) -> bool:
        """One stream: ``subscriptions/listen`` in 2026-07-28 (every list change and the updates
        of ``uris``; open once acknowledged), the GET stream in 2025-11-25. False if the
        upstream offers none."""
        if self._modern:
            wanted: dict[str, Any] = {flag: True for flag in _LIST_FLAGS}
            if uris:
                wanted["resourceSubscriptions"] = sorted(uris)
            response = await self._post(
                {
                    "jsonrpc": "2.0",
                    "id": f"bastion-listen-{next(self._ids)}",
                    "method": "subscriptions/listen",
                    "params": {"notifications": wanted},
                }
            )
        else:
            response = await self._http.request("GET", self._stream_headers())
        try:
            if response.status_code == 405:
                return False
            self._check_authorized(response.status_code, before_acting=True)
            if response.status_code != 200 or not _is_event_stream(response):
                raise UpstreamFailure(
                    UPSTREAM_UNAVAILABLE,
                    f"upstream {self.name} answered HTTP {response.status_code} to its stream",
                )
            if not self._modern:
                self._stream_open(opened)
            async for message in _events(response):
                if message.get("method") == _ACKNOWLEDGED:
                    self._stream_open(opened)
                elif "method" in message:
                    await self._from_server(message)
            return True
        finally:
            response.abort()

    async def _send_notification(self, message: dict[str, Any]) -> None:
        if self._modern:
            return  # 2026-07-28 has no client-to-server notifications over HTTP
        response = await self._post(message)
        try:
            self._check_authorized(response.status_code, before_acting=True)
            await response.read()
        finally:
            response.close()

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        if self._session_id:
            with contextlib.suppress(HttpClientError):
                response = await self._http.request("DELETE", self._headers())
                response.close()
        self._started = False
        await self._http.aclose()


def _cancelled(request_id: Any, reason: str) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "method": "notifications/cancelled",
        "params": {"requestId": request_id, "reason": reason},
    }


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("upstream: a message to the upstream was not sent: %s", task.exception())


@dataclass(slots=True)
class EventStream:
    """Where a text/event-stream is: the id of its last event, and how long its server asked a
    client to wait before resuming it (the ``retry`` field; 1 s when it names none)."""

    last_id: str | None = None
    retry: float = 1.0


_EVENT_STREAM = "text/event-stream"
_JSON = "application/json"
# As upstreams usually write them: taken without being parsed.
_PLAIN = frozenset({_JSON, _EVENT_STREAM})


def _media_type(response: Response) -> str:
    """The media type of ``response``'s body (`bastion.http_fields.media_type`)."""
    value = response.headers.get("content-type", "")
    return value if value in _PLAIN else media_type(value)


def _is_event_stream(response: Response) -> bool:
    return _media_type(response) == _EVENT_STREAM


def _not_json(constant: str) -> Any:
    raise ValueError(f"a message holds {constant}, which is not JSON (RFC 8259 §6)")


def _finite(text: str) -> float:
    number = float(text)
    if number in _INFINITE:
        raise ValueError(f"a message holds {text[:40]}, a number past what a float holds")
    return number


_INFINITE = (math.inf, -math.inf)
# An upstream's message as JSON reads it: ``NaN``, ``Infinity`` and a number a float cannot hold
# (which Python's reader takes as infinity) are refused as not JSON, never written on to a
# client that could not read them. The C scanner calls neither hook for the usual numbers.
_decode_message = decoder(json.JSONDecoder(parse_constant=_not_json, parse_float=_finite))


# How deep an upstream's message may nest (objects and arrays). What the gateway passes on it
# writes with json's encoder past 255 levels, which recurses once per level on the stack of the
# call that writes, deeper than the one that read: an answer json's reader took ~950 levels deep
# failed where it was written (a 500). Far past any tool's result, far below Python's stack.
MAX_MESSAGE_DEPTH = 512


def _within_depth(value: Any, data: bytes | str) -> Any:
    """``value``, read from ``data``, or `ValueError` if it nests past `MAX_MESSAGE_DEPTH`.
    Fewer brackets than that cannot nest deeper: most messages skip the walk."""
    if isinstance(data, str):
        brackets = data.count("[") + data.count("{")
    else:
        brackets = data.count(b"[") + data.count(b"{")
    if brackets > MAX_MESSAGE_DEPTH and not nests_within(value, MAX_MESSAGE_DEPTH):
        raise ValueError(
            f"a message nested deeper than {MAX_MESSAGE_DEPTH} levels of objects and arrays"
        )
    return value


def _message(data: bytes | str) -> Any:
    """An upstream's message (a line of a stdio upstream, an event, a JSON body) as
    ``json.loads`` reads it (the same value, or the same error), but strictly: ``NaN``,
    ``Infinity`` and a number past a float's range raise `ValueError` (`_decode_message`), and
    so does nesting past `MAX_MESSAGE_DEPTH`. A body that opens an object is read as UTF-8
    without ``json.loads``'s guess of the encoding (which reads it so too: no BOM, no UTF-16 or
    UTF-32). orjson reads it (an event's text too) where it reads the same (`read`; it refuses
    ``NaN``, ``Infinity`` and such numbers too, and takes no nesting past 512 levels)."""
    if data.__class__ is not str:
        if data[:1] != b"{" or data[1:2] == b"\0":
            value = json.loads(data, parse_constant=_not_json, parse_float=_finite)
            return _within_depth(value, data)
        if data.__class__ is bytes:
            value = read(data)
            if value is not NOT_READ:
                return value
        data = data.decode("utf-8", "surrogatepass")
    else:
        try:
            value = read(data.encode())
        except UnicodeEncodeError:  # half of a surrogate pair: json's to read
            value = NOT_READ
        if value is not NOT_READ:
            return value
    return _within_depth(_decode_message(data), data)


def _large_message(data: bytes | str) -> Any:
    """`_message` of a message of `OFF_LOOP_BYTES` or more, on a worker thread: the same value
    or the same error, read in turns (a tick after each object; the collector's full passes
    held meanwhile: `bastion.large_json`); an object comes back as a
    `LargeMessage`."""
    hooks = {
        "object_hook": object_hook(Turns()),
        "parse_constant": _not_json,
        "parse_float": _finite,
    }
    with full_passes_held():
        if data.__class__ is not str:
            if data[:1] != b"{" or data[1:2] == b"\0":
                message = _within_depth(json.loads(data, **hooks), data)
                return LargeMessage(message) if message.__class__ is dict else message
            data = data.decode("utf-8", "surrogatepass")
        message = _within_depth(decoder(json.JSONDecoder(**hooks))(data), data)
    return LargeMessage(message) if message.__class__ is dict else message


async def _events(response: Response, stream: EventStream | None = None):
    """The JSON-RPC messages of a text/event-stream body (objects only); an event larger than
    `MAX_MESSAGE` is an `HttpClientError`, one that is not JSON is skipped (with a warning). An
    event with empty data is skipped silently: SDK servers open each stream with one (a priming
    event, which only carries the id to resume from, as the 2025-11-25 transport allows).
    ``stream`` follows the ``id`` and ``retry`` fields, as the SSE standard reads them."""
    data: list[str] = []
    size = 0
    event_id: str | None = None
    async for line in response.lines():
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
            size += len(data[-1])
            if size > MAX_MESSAGE:
                raise HttpClientError(
                    f"an event of the response is larger than {MAX_MESSAGE} bytes"
                )
            continue
        if line:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "id" and "\0" not in value:
                event_id = value
            elif field == "retry" and stream is not None:
                retry = capped(value, MAX_RETRY_MS)
                if retry is not None:
                    stream.retry = min(retry, MAX_RETRY_MS) / 1000
            continue
        if stream is not None and event_id is not None:
            # An event without data counts too (SSE's dispatch); an empty id means none.
            stream.last_id = event_id or None
        if not data:
            continue
        text, data, size = "\n".join(data), [], 0
        if not text.strip():
            continue
        try:
            # Read before the next event is: messages keep their order, large or not.
            if len(text) < OFF_LOOP_BYTES:
                message = _message(text)
            else:
                message = await asyncio.to_thread(_large_message, text)
        except (ValueError, RecursionError):  # not JSON, or nested past Python's stack
            log.warning("an upstream sent an event that is not JSON")
            continue
        if _is_message(message):
            yield message


def open_upstream(config: UpstreamConfig) -> Upstream:
    """The upstream's own connection (``auth = "per_user"``: never used to connect; each user's
    session is a `bastion.gateway.upstream_credentials.UserTokenUpstream`)."""
    return StdioUpstream(config) if config.transport == "stdio" else HttpUpstream(config)


def server_description(result: Any) -> dict[str, Any]:
    """What an upstream said of itself (the result of ``initialize``, or of ``server/discover``
    put in its shape), in the shapes bastion reads it in: ``capabilities`` an object of objects,
    ``serverInfo`` an object, ``protocolVersion`` and ``instructions`` text; a member of another
    shape is left out (read as an object, a list there was bastion's own failure)."""
    said = result if isinstance(result, dict) else {}
    capabilities = said.get("capabilities")
    described: dict[str, Any] = {
        "capabilities": {k: v for k, v in capabilities.items() if isinstance(v, dict)}
        if isinstance(capabilities, dict)
        else {}
    }
    for key, kind in (("protocolVersion", str), ("serverInfo", dict), ("instructions", str)):
        if isinstance(said.get(key), kind):
            described[key] = said[key]
    return described


def _is_message(message: Any, upstream: str = "?") -> bool:
    """Whether ``message`` (read from the upstream so named) can be a JSON-RPC message: an
    object whose ``method``, if it has one, is text. Any other is dropped, with a warning for one
    whose method is not text (it failed in the notification handler before)."""
    if not isinstance(message, dict):
        return False
    if "method" in message and not isinstance(message["method"], str):
        log.warning("upstream %s sent a message whose method is not text", upstream)
        return False
    return True


def _plain_id(value: Any) -> bool:
    """A JSON-RPC id bastion can match: a string or an integer (not a boolean)."""
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))
