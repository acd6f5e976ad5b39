"""The resources a user follows on a server, counted across bastion processes through Redis
(``gateway.max_subscriptions_per_user`` with ``gateway.redis_url``).

Without Redis each process counts its own sessions' subscriptions and listen streams
(`SessionTable.room_to_follow`). With it, each follow is also a leased entry of a sorted set per
(server, user), ``<redis_prefix>:follows:{<tag>}:<server>|<user>``: one member per (process,
session or listen stream, resource), scored by when its lease ends on Redis's clock. One Lua
script drops lapsed entries, counts and adds, so two processes cannot both take the last place.
The holding process renews its entries every third of ``gateway.subscription_lease_seconds``
while the session or stream lives and removes them when it ends; a process that dies without
removing them frees their places when their lease lapses. A follow that cannot be counted
(Redis unreachable, or slower than ``redis_timeout_seconds``) is refused; an end that cannot be
told to Redis ends locally, and its entries lapse.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from bastion.gateway.jsonrpc import RATE_LIMIT_UNAVAILABLE, RpcError
from bastion.redaction import safe_url
from bastion.redis_client import CLUSTER_SCHEMES, RedisAway, connect, run_script
from bastion.retries import Outage

log = logging.getLogger("bastion.gateway.follows")

# A lease's default length (``gateway.subscription_lease_seconds``).
LEASE_SECONDS = 60.0

# Users (per server) whose follows one round trip renews.
RENEW_BATCH = 500

# One entry: (server, user, holder, uri); the holder is a session id or a listen stream's own id.
Follow = tuple[str, str, str, str]

# KEYS[1]: the (server, user) set. ARGV: the lease (ms), the most it may hold, then the members
# to add. Returns {1, held} once added, {0, held} if they would take it past the most (nothing
# added); held counts live entries, the members given among them once added.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
local new = 0
for i = 3, #ARGV do
  if not redis.call('ZSCORE', KEYS[1], ARGV[i]) then new = new + 1 end
end
if held + new > tonumber(ARGV[2]) then
  return {0, held}
end
for i = 3, #ARGV do
  redis.call('ZADD', KEYS[1], now + lease, ARGV[i])
end
if redis.call('PTTL', KEYS[1]) < lease then
  redis.call('PEXPIRE', KEYS[1], lease)
end
return {1, held + new}
"""

# KEYS[1]: the (server, user) set. ARGV: the lease (ms), "renew" or "restore", then members this
# process holds. "renew" extends the lease of those still there and returns the others (ended
# meanwhile, or lost); "restore" adds them whatever the count (they are followed already).
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local missing = {}
for i = 3, #ARGV do
  if ARGV[2] == 'restore' or redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], now + lease, ARGV[i])
  else
    missing[#missing + 1] = ARGV[i]
  end
end
if redis.call('PTTL', KEYS[1]) < lease then
  redis.call('PEXPIRE', KEYS[1], lease)
end
return missing
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class FollowsUnavailable(Exception):
    """Redis cannot be reached: a follow cannot be counted, so it is refused."""


def follows_unavailable() -> RpcError:
    """The refusal of a follow that cannot be counted (the code a rate limit that cannot be
    counted refuses with)."""
    return RpcError(
        RATE_LIMIT_UNAVAILABLE,
        "bastion refused this subscription: the resources a user follows are counted in Redis"
        " (gateway.redis_url, for gateway.max_subscriptions_per_user), which cannot be reached"
        " right now; try again later",
        {"reason": "subscriptions_unavailable"},
    )


class FollowLeases:
    """This process's follows in Redis, shared with every bastion process using the same URL
    and prefix."""

    def __init__(
        self,
        url: str,
        prefix: str = "bastion",
        timeout: float = 1.0,
        lease_seconds: float = LEASE_SECONDS,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.lease_seconds = lease_seconds
        # Names this process's members: another process's entries are never this one's.
        self.process = secrets.token_hex(8)
        self._redis, self._errors = connect(url, timeout)
        self._cluster = url.partition("://")[0] in CLUSTER_SCHEMES
        self._take = self._redis.register_script(_TAKE)
        self._renew = self._redis.register_script(_RENEW)
        self._pending: set[asyncio.Task] = set()
        # Redis away, said once while renewals fail, and once that they work again.
        self._outage = Outage(log)
        # The same, for the counts and removals asked at each subscribe, listen and end.
        self._away = RedisAway(log, url, "subscriptions")

    def key(self, server: str, subject: str) -> str:
        # The hash tag (in braces): a check's one key, on one node of a cluster.
        tag = hashlib.sha256(f"{server}|{subject}".encode()).hexdigest()[:16]
        return f"{self.prefix}:follows:{{{tag}}}:{server}|{subject}"

    def member(self, holder: str, uri: str) -> str:
        # A digest: neither a session id (which finds the session) nor a URI is written out.
        digest = hashlib.sha256(f"{holder}|{uri}".encode()).hexdigest()[:24]
        return f"{self.process}:{digest}"

    @property
    def _lease_ms(self) -> int:
        return max(1, int(self.lease_seconds * 1000))

    async def take(
        self, server: str, subject: str, holder: str, uris: Iterable[str], most: int
    ) -> int | None:
        """Count ``holder``'s follows of ``uris`` for ``subject`` on ``server``, unless that
        would take them past ``most``: None once counted, else how many they follow.
        `FollowsUnavailable` if Redis cannot be reached (nothing counted)."""
        members = sorted({self.member(holder, uri) for uri in uris})
        if not members:
            return None
        try:
            taken, held = await self._take(
                keys=[self.key(server, subject)], args=[self._lease_ms, most, *members]
            )
        except self._errors as e:
            self._away.failed("subscriptions cannot be counted", e)
            raise FollowsUnavailable() from None
        self._away.answered()
        return None if int(taken) else int(held)

    async def drop(self, server: str, subject: str, holder: str, uris: Iterable[str]) -> None:
        """Remove ``holder``'s follows of ``uris``; if Redis cannot be told, they lapse with
        their lease (logged)."""
        members = [self.member(holder, uri) for uri in uris]
        if not members:
            return
        try:
            await self._redis.zrem(self.key(server, subject), *members)
        except self._errors as e:
            self._away.failed(
                "ended subscriptions not removed (they count until their lease lapses,"
                " subscription_lease_seconds)",
                e,
                logging.WARNING,
            )
        else:
            self._away.answered()

    def release(self, server: str, subject: str, holder: str, uris: Iterable[str]) -> None:
        """`drop`, in the background (a session or stream ended where nothing can wait)."""
        uris = list(uris)
        if not uris:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (the process is stopping): the lease lapses
            return
        task = loop.create_task(self.drop(server, subject, holder, uris))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def renew(self, held: Callable[[], Iterable[Follow]]) -> int:
        """Extend the lease of every follow this process holds (``held()``: one script call
        per user and server, pipelined). Entries found missing (lost by Redis, or lapsed while
        it could not be reached) are counted again if ``held()`` still has them once Redis has
        answered (one that ended meanwhile is not brought back), whatever the count: they are
        followed, and new follows are refused until the user is under the bound again.
        Returns how many were counted again; a Redis that cannot be reached is logged."""
        asked = self._by_key(held())
        if not asked:
            return 0
        try:
            missing = await self._run([(k, "renew", list(m)) for k, m in asked.items()])
            now = self._by_key(held())
            calls = [
                (key, "restore", back)
                for key, found in zip(asked, missing, strict=True)
                if (back := [m for m in map(_text, found) if m in now.get(key, ())])
            ]
            if calls:
                await self._run(calls)
        except self._errors as e:
            self._outage.failed(
                "subscriptions cannot be renewed: Redis at %s: %s; they lapse after"
                " gateway.subscription_lease_seconds unless it answers again",
                safe_url(self.url),
                e,
                level=logging.ERROR,
            )
            return 0
        self._outage.ended("subscriptions are renewed in Redis again")
        restored = sum(len(members) for _, _, members in calls)
        if restored:
            log.warning(
                "%d subscriptions of this process were missing from Redis at %s (it lost them,"
                " or their lease lapsed while it could not be reached): counted again; their"
                " users may be over max_subscriptions_per_user until they follow fewer",
                restored,
                safe_url(self.url),
            )
        return restored

    def _by_key(self, held: Iterable[Follow]) -> dict[str, set[str]]:
        by_key: dict[str, set[str]] = defaultdict(set)
        for server, subject, holder, uri in held:
            by_key[self.key(server, subject)].add(self.member(holder, uri))
        return by_key

    async def _run(self, calls: list[tuple[str, str, list[str]]]) -> list[Any]:
        """The renew script for each (key, mode, members) of ``calls``, `RENEW_BATCH` keys a
        round trip (a cluster: as many calls at once)."""
        results: list[Any] = []
        for start in range(0, len(calls), RENEW_BATCH):
            batch = calls[start : start + RENEW_BATCH]
            results += await run_script(
                self._redis,
                self._renew,
                [([key], [self._lease_ms, mode, *members]) for key, mode, members in batch],
                self._cluster,
            )
        return results

    async def close(self) -> None:
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=2)
        await self._redis.aclose()
