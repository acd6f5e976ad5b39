"""Each user's connections to upstream MCP servers that need their own OAuth token.

A person connects once, at bastion's page (`bastion.connections.pages`): bastion runs the
authorization code flow with the upstream's authorization server for them
(`bastion.connections.upstream_oauth`), keeps the tokens sealed (`bastion.connections.sealing`)
in the database (`bastion.connections.store`), refreshes the access token before it expires or
once the upstream refuses it (one refresh at a time per user and upstream, across replicas;
a connection that can no longer be refreshed is dropped), and hands it out only for that
user's calls to that upstream (`access_token`). A flow finishes only for the person who started
it, in the browser session that started it (RFC 9700 §4.7), and only at the redirect URI of the
upstream it was started for: each upstream has its own
(``<issuer>/connections/<upstream>/callback``), so an authorization server cannot have the code
another one issued redeemed at its own token endpoint (the mix-up of RFC 9700 §4.4.2.2), and an
``iss`` in the answer (RFC 9207) must name the flow's server. A flow and a connection keep the
authorization server they were made with, and their code, verifier and tokens go to no other
(`upstream_oauth.IssuerChanged`: another process, or a restart, may read another server in the
upstream's metadata). Revoking deletes the tokens here and, where the server has RFC 7009
revocation, there too: the tokens to revoke are put in an outbox (`store.PendingRevocation`) in
the transaction that deletes the connection, tried at once, and tried again with backoff, by
any process, until the server has answered or ``revocation_retry_seconds`` has passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from urllib.parse import quote

import anyio

from bastion.connections.errors import ConnectionUnavailable
from bastion.connections.sealing import Sealer, Unsealable
from bastion.connections.settings import UpstreamOAuth
from bastion.connections.store import (
    ConnectionStore,
    PendingRevocation,
    RevocationHold,
    StoredConnection,
    StoredFlow,
)
from bastion.connections.upstream_oauth import (
    IssuerChanged,
    ServerMetadata,
    TokenSet,
    UpstreamOAuthClient,
    UpstreamOAuthError,
    pkce_pair,
)
from bastion.constant_time import same
from bastion.db import first_line, round_failed
from bastion.names import readable
from bastion.retries import Outage

log = logging.getLogger("bastion.connections")

PATH = "/connections"
CLIENT_NAME = "bastion (per-user connections)"
# Opened access tokens a process keeps at most (with cache_seconds > 0); the oldest go first.
MAX_CACHED = 100_000
# How many times a refresh's tokens are written again over the same tokens sealed anew (a
# `rekey` under way) before the call gives up.
_RESEALS = 5
# A process claims a connection's refresh for this many times its ``timeout_seconds`` (the
# metadata, a registration and the token request each have that long); the other processes
# look at the row every `_REFRESH_POLL_SECONDS` for what the refresh brought back.
_CLAIMED_TIMEOUTS = 3
_REFRESH_POLL_SECONDS = 0.05
# How many times its upstream's ``timeout_seconds`` one attempt at a revocation may take (it may
# read its server's metadata and revoke two tokens), and `Connections.close` waits for those
# still under way (the longest ``timeout_seconds``).
_REVOCATION_TIMEOUTS = 3
# A process holds a revocation it tries that long (with the longest ``timeout_seconds``) and this
# many seconds more, so that no other takes it up while it may still be under way; a process
# that died holds it no longer.
_REVOCATION_LEASE_MARGIN = 60.0
# How often each server process reads the outbox for revocations due (a failed one's next try,
# one a stopped or dead process left), and how many one pass takes at most.
REVOCATION_SWEEP_SECONDS = 30.0
_REVOCATION_SWEEP_LIMIT = 100
# A revocation the server could not answer is tried again after this, doubling each time up to
# the second figure (until its upstream's ``revocation_retry_seconds`` has passed).
_REVOCATION_BACKOFF = (60.0, 3600.0)


class FlowRefused(Exception):
    """A connection that cannot be finished: ``status`` and a sentence for the person."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True, slots=True)
class Connection:
    """One user's connection to one upstream, as people and administrators see it (no token)."""

    subject: str
    upstream: str
    scope: str
    expires_at: float
    created_at: float
    refreshed_at: float

    def to_json(self) -> dict:
        return {
            "subject": self.subject,
            "upstream": self.upstream,
            "scope": self.scope,
            "access_token_expires_at": self.expires_at,
            "created_at": self.created_at,
            "refreshed_at": self.refreshed_at,
        }


def _shown(row: StoredConnection) -> Connection:
    return Connection(
        row.subject, row.upstream, row.scope, row.expires_at, row.created_at, row.refreshed_at
    )


def _sealed_value(tokens: TokenSet) -> dict[str, str]:
    """What a connection keeps of ``tokens``: them, and the server that issued them (the only
    one its refresh token and its revocation go to)."""
    return {
        "access_token": tokens.access_token,
        "refresh_token": tokens.refresh_token,
        "issuer": tokens.issuer,
    }


def _browser_digest(session: str) -> str:
    """What a flow keeps of the browser session that started it: a digest (the session id is
    a credential of its own, and a flow's sealed value should hold none it does not need)."""
    return hashlib.sha256(f"bastion connection flow\0{session}".encode()).hexdigest()


def _new_tokens(fresh: TokenSet, old: Mapping) -> dict[str, str]:
    """What a refresh brought back that the connection did not hold already (a server that
    does not rotate refresh tokens sends none, and bastion keeps the one it had)."""
    new = {"access_token": fresh.access_token, "issuer": fresh.issuer}
    if fresh.refresh_token != old.get("refresh_token"):
        new["refresh_token"] = fresh.refresh_token
    return new


class Connections:
    """The connections of every user to the upstreams configured with ``auth = "per_user"``."""

    def __init__(
        self,
        store: ConnectionStore,
        sealer: Sealer,
        upstreams: Mapping[str, tuple[str, UpstreamOAuth]],
        issuer: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.sealer = sealer
        self.settings = {name: oauth for name, (_, oauth) in upstreams.items()}
        self.clients = {
            name: UpstreamOAuthClient(url, oauth, name, clock=clock)
            for name, (url, oauth) in upstreams.items()
        }
        self.issuer = issuer.rstrip("/")
        self.clock = clock
        self._refreshing: dict[tuple[str, str], asyncio.Lock] = {}
        # (subject, upstream) -> (access token, its expiry, when read): `cache_seconds`.
        self._cached: dict[tuple[str, str], tuple[str, float, float]] = {}
        # Called with (subject, upstream) when a connection is revoked in this process.
        self._on_revoke: list[Callable[[str, str], None]] = []
        # Moves at each revocation in this process, before and after its delete: a token read
        # while it was under way is used by the call that read it, and never cached.
        self._revocations = 0
        # The revocations under way off the calls' path (of the connections this process
        # dropped, and those its sweep took up: `_revoke_later`); waited for, then cancelled, by
        # `close`.
        self._revoking: set[asyncio.Task[None]] = set()
        # This process's name on the outbox's revocations it holds (`store.PendingRevocation`).
        self.owner = secrets.token_hex(8)
        longest = max((oauth.timeout_seconds for oauth in self.settings.values()), default=10.0)
        self._lease_seconds = _REVOCATION_TIMEOUTS * longest + _REVOCATION_LEASE_MARGIN

    def on_revoke(self, callback: Callable[[str, str], None]) -> None:
        self._on_revoke.append(callback)

    def redirect_uri(self, upstream: str) -> str:
        """Where ``upstream``'s authorization server sends the person back: a URI of its own,
        registered there for bastion's client and for no other server's (RFC 9700 §4.4.2.2)."""
        return f"{self.issuer}{PATH}/{quote(upstream, safe='')}/callback"

    def connect_url(self, subject: str, upstream: str) -> str:
        """The page where ``subject`` connects to ``upstream`` (the URL an elicitation opens)."""
        return (
            f"{self.issuer}{PATH}/{quote(upstream, safe='')}/connect?user={quote(subject, safe='')}"
        )

    # -- the token of a call ----------------------------------------------------------------------

    async def access_token(self, subject: str, upstream: str) -> str | None:
        """``subject``'s access token for ``upstream``, refreshed first if it expires soon; None
        if they have no usable connection (never connected, revoked, refresh refused, or sealed
        tokens that cannot be opened: fail closed). `ConnectionUnavailable` if the refresh could
        not reach the authorization server, or it refused with another error than
        ``invalid_grant`` (the connection is kept)."""
        settings = self.settings[upstream]
        ahead = settings.refresh_ahead_seconds
        key = (subject, upstream)
        epoch = self._revocations
        cached = self._cached.get(key)
        if cached is not None:
            now = self.clock()
            if now - cached[2] < settings.cache_seconds and cached[1] - now > ahead:
                return cached[0]
            del self._cached[key]
        row = await anyio.to_thread.run_sync(self.store.get, subject, upstream)
        if row is None:
            return None
        if row.expires_at - self.clock() > ahead:
            return self._remember(row, self._open(row).get("access_token"), epoch)
        return await self._refreshed(subject, upstream, epoch)

    async def access_token_refused(self, subject: str, upstream: str, refused: str) -> str | None:
        """The upstream answered 401 to ``refused``, ``subject``'s access token for it: their
        token refreshed once, or the one another call or replica got meanwhile (one refresh at
        a time per connection, across replicas, as before expiry: N calls refused at once make
        one refresh). None if they have no usable connection (the refresh was refused, or there
        is nothing to refresh with): connect again. `ConnectionUnavailable` as `access_token`."""
        self._cached.pop((subject, upstream), None)
        return await self._refreshed(subject, upstream, self._revocations, refused)

    async def _refreshed(
        self, subject: str, upstream: str, epoch: int, refused: str | None = None
    ) -> str | None:
        """The connection's access token once it is neither about to expire nor ``refused``:
        as it is if another call made it so meanwhile, else refreshed (`_refresh_once`)."""
        key = (subject, upstream)
        lock = self._refreshing.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                # Another call may have refreshed it while this one waited.
                row = await anyio.to_thread.run_sync(self.store.get, subject, upstream)
                if row is None:
                    return None
                token = self._usable(row, refused)
                if token is not None:
                    return self._remember(row, token, epoch)
                return await self._refresh_once(row, epoch, refused)
        finally:
            if not lock.locked() and self._refreshing.get(key) is lock:
                del self._refreshing[key]

    def _usable(self, row: StoredConnection, refused: str | None) -> str | None:
        """``row``'s access token if it can be sent without a refresh: further from its expiry
        than ``refresh_ahead_seconds``, and not the token the upstream ``refused``."""
        if row.expires_at - self.clock() <= self.settings[row.upstream].refresh_ahead_seconds:
            return None
        token = self._open(row).get("access_token")
        return token if token != refused else None

    def _remember(self, row: StoredConnection, token: str | None, epoch: int) -> str | None:
        """``token``, cached when ``cache_seconds`` says so and no revocation in this process
        overlapped the read of ``row`` (begun at ``epoch``)."""
        cache = self.settings[row.upstream].cache_seconds > 0
        if token and cache and epoch == self._revocations:
            self._cached[(row.subject, row.upstream)] = (token, row.expires_at, self.clock())
            if len(self._cached) > MAX_CACHED:
                del self._cached[next(iter(self._cached))]  # the oldest
        return token

    def forget_token(self, subject: str, upstream: str) -> None:
        """Read ``subject``'s connection again on their next call (the upstream refused it)."""
        self._cached.pop((subject, upstream), None)

    def _open(self, row: StoredConnection) -> dict:
        try:
            return self.sealer.open(row.subject, row.upstream, row.sealed)
        except Unsealable as e:
            log.warning("connection of %s to %s refused: %s", row.subject, row.upstream, e)
            return {}

    async def _refresh_once(
        self, row: StoredConnection, epoch: int, refused: str | None = None
    ) -> str | None:
        """Refresh ``row`` if this process claims its refresh in the database; else another
        process (replica) is refreshing it: wait for what it brings back, and use that (unless
        it is the ``refused`` token still). A server that rotates refresh tokens and revokes
        the grant when one comes back twice then never sees the same one from two replicas. A
        claim lasts `_CLAIMED_TIMEOUTS` times ``timeout_seconds`` (a process that died while
        refreshing holds it that long)."""
        settings = self.settings[row.upstream]
        claim = _CLAIMED_TIMEOUTS * settings.timeout_seconds
        give_up = time.monotonic() + claim + settings.timeout_seconds
        while True:
            now = self.clock()
            if await anyio.to_thread.run_sync(self.store.claim_refresh, row, now, now + claim):
                try:
                    return await self._refresh(row, epoch)
                finally:
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(self.store.release_refresh, row)
            if time.monotonic() > give_up:
                raise ConnectionUnavailable(
                    f"the connection to {row.upstream} is being refreshed by another process"
                    " that has not finished; retry"
                )
            await asyncio.sleep(_REFRESH_POLL_SECONDS)
            current = await anyio.to_thread.run_sync(self.store.get, row.subject, row.upstream)
            if current is None:
                return None  # revoked, or the refresh was refused: connect again
            if current.sealed != row.sealed:
                token = self._usable(current, refused)
                if token is not None:
                    return self._remember(current, token, epoch)
                row = current  # sealed again (`rekey`) or connected again, still to refresh

    async def _refresh(self, row: StoredConnection, epoch: int) -> str | None:
        tokens = self._open(row)
        refresh_token = tokens.get("refresh_token")
        if not refresh_token:
            return None  # expired, and nothing to refresh it with: connect again
        now = self.clock()
        oauth = self.clients[row.upstream]
        try:
            meta = await oauth.metadata_of(tokens.get("issuer"))
            client = await self._client(row.upstream, meta)
            fresh = await oauth.refresh(meta, client, refresh_token, now)
        except IssuerChanged as e:
            # The upstream names another server now: its refresh token goes there never, and
            # the connection can never be refreshed again. Dropped (recorded): connect again.
            # Its tokens are revoked at the server that issued them, if the drop is this
            # process's (another replica dropping it at once revokes them there), after the
            # call has its answer: that server may be slow or away.
            log.warning("connection of %s to %s dropped: %s", row.subject, row.upstream, e)
            reason = f"its authorization server changed: {e.description}"
            hold = self._hold(row.upstream)
            if await anyio.to_thread.run_sync(self.store.drop, row, reason, hold):
                self._revoke_later(hold.pending(row, "bastion"))
            return None
        except UpstreamOAuthError as e:
            if e.error == "unavailable":
                raise ConnectionUnavailable(
                    f"the connection to {row.upstream} cannot be refreshed now: {e.description}"
                ) from None
            if e.error != "invalid_grant":
                # About bastion's client or the server's state (invalid_client after a secret
                # changed, a rate limit, ...), not this user's grant: deleting would cost every
                # user their connection. Kept; the call fails until the server takes it again.
                raise ConnectionUnavailable(
                    f"the connection to {row.upstream} cannot be refreshed now: its"
                    f" authorization server refused bastion's refresh ({e}); the connection is"
                    " kept"
                ) from None
            # The grant is gone at the upstream (revoked, expired): forget it; connect again.
            # Only the row refreshed: a connection made meanwhile is not the refused grant's.
            log.info("refresh of %s's connection to %s refused: %s", row.subject, row.upstream, e)
            await anyio.to_thread.run_sync(self.store.drop, row, f"its refresh was refused: {e}")
            return None
        return await self._keep(row, tokens, fresh, now, epoch)

    async def _keep(
        self, row: StoredConnection, tokens: dict, fresh: TokenSet, now: float, epoch: int
    ) -> str | None:
        """Store the tokens a refresh of ``row`` brought back, in its place only: a connection
        revoked while the refresh was under way stays revoked (here or on another replica), and
        the tokens are revoked at the upstream; one connected again or refreshed elsewhere
        meanwhile is kept, and this call uses it."""
        sealed = self.sealer.seal(row.subject, row.upstream, _sealed_value(fresh))
        updated = StoredConnection(
            row.subject, row.upstream, sealed, fresh.scope, fresh.expires_at, row.created_at, now
        )
        current = row
        for _ in range(_RESEALS):
            if await anyio.to_thread.run_sync(self.store.replace, current, updated):
                return self._remember(updated, fresh.access_token, epoch)
            current = await anyio.to_thread.run_sync(self.store.get, row.subject, row.upstream)
            if current is None or current.created_at != row.created_at:
                # Revoked (and perhaps connected again) while it was refreshed: what came
                # back belongs to the revoked grant.
                await self._revoke_upstream(row.subject, row.upstream, _new_tokens(fresh, tokens))
                if current is None:
                    return None
                return self._remember(current, self._open(current).get("access_token"), epoch)
            if self._open(current) != tokens:
                # Refreshed by another replica meanwhile, the same grant: its tokens are kept
                # and used; this refresh's are left to expire (revoking them could revoke the
                # grant, theirs with it).
                return self._remember(current, self._open(current).get("access_token"), epoch)
            # The same tokens sealed again (`rekey`): the fresh ones still replace them.
        raise ConnectionUnavailable(
            f"the connection to {row.upstream} was sealed again while it was refreshed; retry"
        )

    # -- connecting (the pages) -------------------------------------------------------------------

    async def start(self, subject: str, upstream: str, *, browser: str) -> str:
        """Begin ``subject``'s connection to ``upstream`` in the browser session ``browser``
        (bastion's session id; only that session finishes it): the URL of the upstream's
        authorization page to send their browser to."""
        oauth = self.clients[upstream]
        meta = await oauth.metadata()
        client = await self._client(upstream, meta)
        verifier, challenge = pkce_pair()
        state = secrets.token_urlsafe(32)
        now = self.clock()
        flow = StoredFlow(
            state,
            subject,
            upstream,
            self.sealer.seal(
                subject,
                upstream,
                {
                    "verifier": verifier,
                    "issuer": meta.issuer,
                    "browser": _browser_digest(browser),
                },
            ),
            now,
        )
        older = now - self.settings[upstream].flow_seconds
        await anyio.to_thread.run_sync(self.store.add_flow, flow, older)
        return oauth.authorization_url(
            meta, client["client_id"], self.redirect_uri(upstream), state, challenge
        )

    async def finish(
        self,
        subject: str,
        upstream: str,
        state: str,
        code: str,
        iss: str | None = None,
        *,
        browser: str,
    ) -> Connection:
        """The authorization server sent ``subject``'s browser (session ``browser``) back to
        ``upstream``'s redirect URI with ``code`` for ``state`` (and ``iss``, RFC 9207, when it
        sends one): exchange it and keep the tokens. Refused (`FlowRefused`) for an unknown or
        used state, a flow older than ``flow_seconds``, a person other than the one who started
        it or another browser session than the one that started it, an answer at another
        upstream's redirect URI than the flow's, an ``iss`` other than the flow's server (or
        none from a server that says it sends it), or an upstream that names another server
        now than the one the flow was started with: the flow is then spent, nobody can finish
        it, and the code is sent nowhere."""
        flow = await anyio.to_thread.run_sync(self.store.take_flow, state)
        if flow is None or flow.upstream not in self.clients:
            raise FlowRefused("This connection link is unknown or was already used.", 400)
        if flow.subject != subject:
            raise FlowRefused(
                "This connection was started by another user: it is not yours to finish.", 403
            )
        if flow.upstream != upstream:
            # Mix-up: a server other than the flow's sent the person back with a code it issued;
            # redeemed at the flow's server, the code (and the PKCE verifier) would be its.
            raise FlowRefused(
                f"This answer came back for {readable(upstream)}, but the connection was started"
                f" with {flow.upstream}: nothing was connected. Start again from the application.",
                400,
            )
        now = self.clock()
        if now - flow.created_at > self.settings[flow.upstream].flow_seconds:
            raise FlowRefused("This connection took too long; start again.", 400)
        try:
            opened = self.sealer.open(subject, flow.upstream, flow.sealed)
            verifier, started_with = opened["verifier"], opened.get("issuer")
        except (Unsealable, KeyError):
            raise FlowRefused("This connection cannot be finished; start again.", 400) from None
        started_in = opened.get("browser")
        if not isinstance(started_in, str) or not same(started_in, _browser_digest(browser)):
            # Sent through another browser's flow (one signed in as its starter by a login
            # CSRF), the person would attach their own upstream account to its starter.
            raise FlowRefused(
                "This connection was started in another browser session: nothing was connected."
                " Start again from the application, in this browser.",
                403,
            )
        try:
            meta = await self.clients[flow.upstream].metadata_of(started_with)
            # The client too: after a restart its registration (or the metadata) is read again.
            client = await self._client(flow.upstream, meta)
            if iss is not None and iss.rstrip("/") != meta.issuer:
                raise FlowRefused(
                    f"This answer comes from {readable(iss)}, not from {flow.upstream}'s"
                    " authorization server: nothing was connected. Start again from the"
                    " application.",
                    400,
                )
            if iss is None and meta.sends_iss:
                raise FlowRefused(
                    f"This answer lacks the iss that {flow.upstream}'s authorization server"
                    " always sends (RFC 9207): nothing was connected. Start again.",
                    400,
                )
            tokens = await self.clients[flow.upstream].exchange_code(
                client, code, verifier, self.redirect_uri(flow.upstream), now, meta.issuer
            )
        except IssuerChanged as e:
            raise FlowRefused(
                f"This connection was started with the authorization server"
                f" {readable(e.issued_by)}, and"
                f" {flow.upstream} now names another: nothing was connected. Start again from"
                " the application.",
                400,
            ) from None
        except UpstreamOAuthError as e:
            raise FlowRefused(
                f"{flow.upstream} refused the connection: {e.description}", 502
            ) from None
        except ConnectionUnavailable as e:
            raise FlowRefused(f"{flow.upstream} cannot be connected now: {e}", 502) from None
        sealed = self.sealer.seal(subject, flow.upstream, _sealed_value(tokens))
        row = StoredConnection(
            subject, flow.upstream, sealed, tokens.scope, tokens.expires_at, now, now
        )
        await anyio.to_thread.run_sync(self.store.put, row)
        self._cached.pop((subject, flow.upstream), None)
        return _shown(row)

    # -- seeing and revoking ----------------------------------------------------------------------

    def listed(self, subject: str | None = None, upstream: str | None = None) -> list[Connection]:
        """Blocking: the connections, without their tokens."""
        return [_shown(r) for r in self.store.listed(subject, upstream)]

    async def revoke(self, subject: str, upstream: str, *, actor: str) -> bool:
        """Forget ``subject``'s connection to ``upstream`` (False if there was none), and revoke
        its tokens at the upstream's authorization server when it offers RFC 7009 revocation: at
        once, and, if the server cannot answer now, again later from the outbox the transaction
        that deletes the row puts them in (`_revoke_recorded`): the tokens are gone from
        bastion either way.

        Audited: ``connection.revoked`` (naming ``actor``) in the transaction that deletes the
        row, then ``connection.upstream_revocation`` with what the upstream made of this first
        attempt, which is asked only once the tokens are gone from here (and one more for each
        later attempt)."""
        self._revocations += 1
        self._cached.pop((subject, upstream), None)
        hold = self._hold(upstream)
        try:
            row = await anyio.to_thread.run_sync(self.store.revoke, subject, upstream, actor, hold)
        finally:
            self._revocations += 1
            self._cached.pop((subject, upstream), None)
        if row is None:
            return False
        for callback in self._on_revoke:
            callback(subject, upstream)
        await self._revoke_recorded(hold.pending(row, actor))
        return True

    def _hold(self, upstream: str) -> RevocationHold:
        """How this process puts a connection's tokens in the revocations' outbox as it deletes
        the connection: held by it (it tries them at once), given up after ``upstream``'s
        ``revocation_retry_seconds``."""
        now = self.clock()
        retry = self.settings.get(upstream, UpstreamOAuth()).revocation_retry_seconds
        return RevocationHold(
            secrets.token_urlsafe(16), self.owner, now, now + self._lease_seconds, now + retry
        )

    def _revoke_later(self, pending: PendingRevocation) -> asyncio.Task[None]:
        """Try ``pending``, which this process holds (`_revoke_recorded`), in a task of its own:
        the call that dropped a connection is told to connect again at once, not after the
        former server's metadata and two revocations (each up to ``timeout_seconds``). Kept in
        ``_revoking`` until it ends; a failure the revocation does not record itself (its record
        cannot be written: the outbox keeps it for a later attempt) is logged."""
        task = asyncio.get_running_loop().create_task(self._revoke_recorded(pending))
        self._revoking.add(task)
        task.add_done_callback(self._revoked)
        return task

    def _revoked(self, task: asyncio.Task[None]) -> None:
        self._revoking.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error(
                "the revocation of a dropped connection's tokens failed: %s",
                first_line(error),
                exc_info=error,
            )

    async def close(self) -> None:
        """At shutdown, once no call can drop a connection any more (and the sweep is
        stopped): wait for the revocations still under way, as long as one may take
        (`_REVOCATION_TIMEOUTS` times the longest ``timeout_seconds``), then cancel those left,
        logged, and let go of every revocation this process holds in the outbox: the next
        process to sweep it (another replica, or this one started again) tries them."""
        if self._revoking:
            longest = max(oauth.timeout_seconds for oauth in self.settings.values())
            _, left = await asyncio.wait(
                set(self._revoking), timeout=_REVOCATION_TIMEOUTS * longest
            )
            if left:
                log.warning(
                    "%d revocations of connections' tokens cancelled at shutdown: they stay in"
                    " the outbox, for the next process to try",
                    len(left),
                )
                for task in left:
                    task.cancel()
                await asyncio.gather(*left, return_exceptions=True)
        try:
            await anyio.to_thread.run_sync(self.store.release_revocations, self.owner)
        except Exception as e:
            log.warning(
                "connections: the revocations this process holds could not be let go (%s);"
                " another process takes them when their lease ends",
                first_line(e),
            )

    async def sweep_revocations(self) -> int:
        """One pass of the revocations' outbox: give up those whose ``revocation_retry_seconds``
        ran out (recorded), then take up to `_REVOCATION_SWEEP_LIMIT` that are due, of the
        upstreams configured here, that no process holds (claimed in the database: of two
        replicas, one takes each), and try them (`_revoke_later`); return once those are
        done, with how many it took."""
        now = self.clock()
        why = "not revoked within revocation_retry_seconds"
        for pending in await anyio.to_thread.run_sync(
            self.store.give_up_revocations, now, why, _REVOCATION_SWEEP_LIMIT
        ):
            log.warning(
                "revocation of %s's tokens at %s given up after %d attempts: %s",
                pending.subject,
                pending.upstream,
                pending.attempts,
                why,
            )
        claimed = await anyio.to_thread.run_sync(
            self.store.claim_revocations,
            list(self.settings),
            self.owner,
            now,
            now + self._lease_seconds,
            _REVOCATION_SWEEP_LIMIT,
        )
        if claimed:
            await asyncio.wait([self._revoke_later(pending) for pending in claimed])
        return len(claimed)

    async def sweep_revocations_forever(self, every: float = REVOCATION_SWEEP_SECONDS) -> None:
        """`sweep_revocations` every ``every`` seconds, until cancelled. A failure (the database
        away, most likely: the next pass tries) is logged once for as long as it stays the same
        (`round_failed`), and once that the outbox is swept again."""
        outage = Outage(log)
        while True:
            try:
                await self.sweep_revocations()
            except Exception as e:
                round_failed(outage, e, "connections: the revocations' outbox could not be swept")
            else:
                outage.ended("connections: the revocations' outbox is swept again")
            await asyncio.sleep(every)

    async def _revoke_recorded(self, pending: PendingRevocation) -> None:
        """Make one attempt at ``pending``, which this process holds (`_revoke_upstream`, at
        most `_REVOCATION_TIMEOUTS` times its upstream's ``timeout_seconds``), and record
        ``connection.upstream_revocation`` with what came of it and the attempts so far, naming
        the actor who ended the connection (``bastion`` for one it dropped). Done, or refused
        for good: deleted from the outbox. Not answered (unreachable, 5xx, no answer in time):
        left there for its next attempt (``retry_at``), after a backoff, by whichever process
        sweeps it then; or deleted, if that would come after ``give_up_at``."""
        settings = self.settings.get(pending.upstream, UpstreamOAuth())
        bound = _REVOCATION_TIMEOUTS * settings.timeout_seconds
        try:
            tokens = self.sealer.open(pending.subject, pending.upstream, pending.sealed)
        except Unsealable as e:
            outcome, again = f"failed: {e}", False
        else:
            try:
                async with asyncio.timeout(bound):
                    outcome, again = await self._revoke_upstream(
                        pending.subject, pending.upstream, tokens
                    )
            except TimeoutError:
                outcome, again = f"failed: not answered within {bound:g} s", True
        now = self.clock()
        recorded: dict[str, object] = {"outcome": outcome, "attempts": pending.attempts}
        first, longest = _REVOCATION_BACKOFF
        retry_at = now + min(first * 2 ** min(pending.attempts - 1, 32), longest)
        if again and retry_at < pending.give_up_at:
            await anyio.to_thread.run_sync(
                lambda: self.store.retry_revocation(
                    pending, self.owner, retry_at, **recorded, retry_at=retry_at
                )
            )
            return
        if again:
            log.warning(
                "revocation of %s's tokens at %s given up after %d attempts",
                pending.subject,
                pending.upstream,
                pending.attempts,
            )
        await anyio.to_thread.run_sync(
            lambda: self.store.finish_revocation(pending, self.owner, **recorded)
        )

    async def _revoke_upstream(
        self, subject: str, upstream: str, tokens: Mapping
    ) -> tuple[str, bool]:
        """Revoke ``tokens`` at the authorization server that issued them, if it offers RFC
        7009 revocation: the upstream's, or the one it named before (read from that server's
        own metadata; never the one it names now), with bastion's client there. A failure is
        logged. Says what came of it (``revoked``, ``not offered`` or ``failed: <why>``), and
        whether trying again may do better: the server could not be reached or answered no
        OAuth refusal (``unavailable``: 5xx, a timeout, no JSON); not after its refusal (RFC
        7009 §2.2.1: ``unsupported_token_type``, ``invalid_client``...) or when bastion holds no
        client there."""
        oauth = self.clients.get(upstream)
        if oauth is None or not tokens:
            return "not offered", False
        try:
            try:
                meta = await oauth.metadata_of(tokens.get("issuer"))
                client = await self._client(upstream, meta)
            except IssuerChanged as e:
                client = await self._former_client(upstream, e.issued_by)
                meta = await oauth.former_server(e.issued_by)
            offered = False
            for hint in ("refresh_token", "access_token"):
                if tokens.get(hint):
                    offered = await oauth.revoke(meta, client, tokens[hint], hint)
        except UpstreamOAuthError as e:
            log.warning("revocation of %s's tokens at %s failed: %s", subject, upstream, e)
            return f"failed: {first_line(e)}", e.error == "unavailable"
        except ConnectionUnavailable as e:
            log.warning("revocation of %s's tokens at %s failed: %s", subject, upstream, e)
            return f"failed: {first_line(e)}", False
        return ("revoked" if offered else "not offered"), False

    def rekey(self) -> int:
        """Blocking: seal every stored value again under the first key (the connections, the
        revocations still to make, bastion's registrations at the authorization servers and
        the connections being made), so that a key removed afterwards opens nothing still
        needed; return how many connections."""
        done = 0
        for row in self.store.listed(limit=10**9):
            try:
                new = self.sealer.rotate(row.sealed)
            except Unsealable:
                log.warning("connection of %s to %s cannot be re-sealed", row.subject, row.upstream)
                continue
            done += self.store.replace(row, replace(row, sealed=new), refreshed=False)
        for pending in self.store.revocations():
            try:
                self.store.reseal_revocation(pending, self.sealer.rotate(pending.sealed))
            except Unsealable:
                log.warning(
                    "revocation of %s's tokens at %s cannot be re-sealed",
                    pending.subject,
                    pending.upstream,
                )
        for upstream, issuer, sealed in self.store.clients():
            # Left under a key then removed, it would fail every refresh and new connection of
            # the upstream ("cannot be opened"): nothing registers again in its place.
            try:
                self.store.add_client(upstream, issuer, self.sealer.rotate(sealed), sealed)
            except Unsealable:
                log.warning("bastion's registration with %s cannot be re-sealed", issuer)
        for flow in self.store.flows():
            # One no key opens cannot be finished either way: its person starts again.
            with contextlib.suppress(Unsealable):
                self.store.reseal_flow(flow, self.sealer.rotate(flow.sealed))
        return done

    # -- bastion's client at each upstream ------------------------------------------------------

    async def _client(self, upstream: str, meta: ServerMetadata) -> dict[str, str]:
        """bastion's client at ``upstream``'s authorization server, whose metadata the caller
        read (``meta``: the one it sends the client to, though the metadata may have been read
        again meanwhile): the configured one, or the one registered there for ``upstream``'s
        own redirect URI (a registration made for another URI, as the one callback all
        upstreams once shared, is made again)."""
        settings = self.settings[upstream]
        if settings.client_id:
            return {"client_id": settings.client_id, "client_secret": settings.client_secret}
        oauth = self.clients[upstream]
        issuer = meta.issuer
        name = f"{upstream} {issuer}"
        redirect_uri = self.redirect_uri(upstream)
        sealed = await anyio.to_thread.run_sync(self.store.client, upstream, issuer)
        kept = self._registration(name, issuer, sealed) if sealed is not None else None
        if kept is None or kept.get("redirect_uri") != redirect_uri:
            registered = await oauth.register(meta, redirect_uri, CLIENT_NAME)
            fresh = self.sealer.seal("", name, {**registered, "redirect_uri": redirect_uri})
            sealed = await anyio.to_thread.run_sync(
                self.store.add_client, upstream, issuer, fresh, sealed
            )
            kept = self._registration(name, issuer, sealed)
        return {"client_id": kept["client_id"], "client_secret": kept.get("client_secret", "")}

    async def _former_client(self, upstream: str, issuer: str) -> dict[str, str]:
        """bastion's client at ``issuer``, a server ``upstream`` named before: the one bastion
        registered there, if it still has it (`ConnectionUnavailable` if not). A configured
        ``client_id`` is taken as the current server's: its secret goes to no other."""
        sealed = await anyio.to_thread.run_sync(self.store.client, upstream, issuer)
        if sealed is None or self.settings[upstream].client_id:
            raise ConnectionUnavailable(
                f"bastion holds no client registered at {readable(issuer)}, the server that"
                " issued them"
            )
        kept = self._registration(f"{upstream} {issuer}", issuer, sealed)
        return {"client_id": kept["client_id"], "client_secret": kept.get("client_secret", "")}

    def _registration(self, name: str, issuer: str, sealed: str) -> dict[str, str]:
        try:
            return self.sealer.open("", name, sealed)
        except Unsealable:
            raise ConnectionUnavailable(
                f"bastion's registration with {issuer} cannot be opened with the connection keys"
            ) from None


def connections_from_config(
    db,
    upstreams: Mapping[str, tuple[str, UpstreamOAuth]],
    key_dir: str,
    issuer: str,
    make_keys: bool = True,
) -> Connections:
    """The connections of a deployment: its database, the keys (`bastion.connections.sealing`;
    ``make_keys``: whether a missing key file is made) and the upstreams configured with
    ``auth = "per_user"`` (name -> (URL, oauth table))."""
    from bastion.connections.sealing import load_keys

    store = ConnectionStore(db)
    return Connections(
        store,
        Sealer(load_keys(key_dir, in_use=store.holds_connections, make=make_keys)),
        upstreams,
        issuer,
    )
