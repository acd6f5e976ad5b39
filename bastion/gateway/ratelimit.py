"""The ``rate_limit`` obligation: at most ``max`` calls per ``seconds``, per principal and target.

Without Redis, counters live in this process (`RateLimiter`: a sliding window of call times per
key), so replicas behind a load balancer each count on their own. With ``gateway.redis_url``,
`RedisRateLimiter` keeps the windows in Redis, shared by every bastion process that uses it: one
Lua script checks and counts all the limits of a call atomically, on Redis's clock. If Redis
cannot be reached, calls that carry a rate limit are refused (fail closed), never let through;
the log says so once per outage (an error), not at every call, and once that Redis answers again.

A call counted and then refused for another reason (an approval another run spent meanwhile) is
given back (`give_back`): its entry, named by the call, leaves every window it was counted in.

A ``redis+cluster://`` (or ``rediss+cluster://``) URL names any node of a Redis Cluster. A
script may only touch keys of one hash slot, so every key of a call carries the same hash tag,
made from the call's target: the limits of one call (the user's, the agent's) are counted on
one node, atomically, and different targets spread over the cluster.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Sequence

from bastion.decide.contract import RateLimit
from bastion.facts.model import Entity
from bastion.redis_client import RedisAway, connect

log = logging.getLogger("bastion.gateway.ratelimit")


class LimitsUnavailable(Exception):
    """The shared counters cannot be reached: the call cannot be checked, so it is refused."""


# The in-process counters are swept of windows with no call left in them once they hold more
# than this many, or twice as many as the last sweep kept (amortised: each sweep at least halves
# what it walks, or walks no more than this).
SWEEP_AT = 4096


class RateLimiter:
    """In-process counters (the default). A window whose calls have all left it is forgotten
    (`SWEEP_AT`): memory holds the windows with a call in them, as Redis's expiring keys do.
    Each entry is a call's time and the name it was counted under (for `give_back`)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._calls: dict[tuple, deque[tuple[float, str]]] = {}
        self._sweep_at = SWEEP_AT

    async def admit(
        self, limits: Sequence[RateLimit], action: str, resource: Entity, call: str = ""
    ) -> float | None:
        """Count one call against every limit; return None if admitted, else seconds to wait.
        ``call``: a name of this call alone (its decision id), to give it back by.

        A refused call is not counted.
        """
        if not limits:
            return None
        now = self.clock()
        if len(self._calls) > self._sweep_at:
            self._sweep(now)
        windows = []
        wait = 0.0
        for limit in limits:
            window = self._calls.setdefault(_key(limit, action, resource), deque())
            while window and window[0][0] <= now - limit.seconds:
                window.popleft()
            if len(window) >= limit.max:
                wait = max(wait, window[0][0] + limit.seconds - now) if window else limit.seconds
            windows.append(window)
        if wait > 0 or any(limit.max <= 0 for limit in limits):
            return max(wait, 0.001)
        for window in windows:
            window.append((now, call))
        return None

    async def give_back(
        self, limits: Sequence[RateLimit], action: str, resource: Entity, call: str
    ) -> bool:
        """Take the call admitted as ``call`` out of every window it was counted in (refused
        after it was counted); True once it is out of all of them."""
        for limit in limits:
            window = self._calls.get(_key(limit, action, resource), ())
            # Newest last: a call given back was counted a moment ago.
            for i in range(len(window) - 1, -1, -1):
                if window[i][1] == call:
                    del window[i]
                    break
        return True

    def _sweep(self, now: float) -> None:
        """Forget the windows whose last call is older than the window (key: ..., seconds)."""
        self._calls = {k: w for k, w in self._calls.items() if w and w[-1][0] > now - k[4]}
        self._sweep_at = max(SWEEP_AT, 2 * len(self._calls))

    async def close(self) -> None:
        pass


def _key(limit: RateLimit, action: str, resource: Entity) -> tuple:
    """The window of ``limit`` for one call's action and target, in process."""
    return (limit.principal, action, resource, limit.max, limit.seconds)


# KEYS: one sorted set per limit (members: calls, scores: their times in ms).
# ARGV: a member id unique to this call, then max and window (ms) per key.
# Returns 0 if the call was admitted (and counted under every key), else the ms to wait.
_SLIDING_WINDOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local wait = 0
for i, key in ipairs(KEYS) do
  local max = tonumber(ARGV[2 * i])
  local window = tonumber(ARGV[2 * i + 1])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  if max <= 0 then
    wait = math.max(wait, 1)
  elseif redis.call('ZCARD', key) >= max then
    local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    wait = math.max(wait, tonumber(oldest[2]) + window - now, 1)
  end
end
if wait > 0 then
  return wait
end
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now, ARGV[1])
  redis.call('PEXPIRE', key, tonumber(ARGV[2 * i + 1]))
end
return 0
"""
# KEYS: the sorted sets a call was counted in; ARGV: the member it was counted as.
_GIVE_BACK = """
for _, key in ipairs(KEYS) do
  redis.call('ZREM', key, ARGV[1])
end
return 0
"""


class RedisRateLimiter:
    """Counters shared through Redis by every bastion process configured with the same URL."""

    def __init__(self, url: str, prefix: str = "bastion", timeout: float = 1.0) -> None:
        self.url = url
        self.prefix = prefix
        self._redis, self._errors = connect(url, timeout)
        self._script = self._redis.register_script(_SLIDING_WINDOW)
        self._give_back = self._redis.register_script(_GIVE_BACK)
        self._away = RedisAway(log, url, "rate limits")

    def key(self, limit: RateLimit, action: str, resource: Entity) -> str:
        # The hash tag (in braces) is the target's digest: all keys of one call share a slot.
        target = f"{action}|{resource!r}"
        tag = hashlib.sha256(target.encode()).hexdigest()[:16]
        return (
            f"{self.prefix}:ratelimit:{{{tag}}}:{limit.principal!r}|{target}"
            f"|{limit.max}|{limit.seconds:g}"
        )

    async def admit(
        self, limits: Sequence[RateLimit], action: str, resource: Entity, call: str = ""
    ) -> float | None:
        """As `RateLimiter.admit`, across processes; `LimitsUnavailable` if Redis is not there.
        The call is counted as ``call`` (a decision id, unique), or a random name."""
        if not limits:
            return None
        keys = [self.key(limit, action, resource) for limit in limits]
        args: list[object] = [call or secrets.token_hex(8)]
        for limit in limits:
            args += [limit.max, max(1, int(limit.seconds * 1000))]
        try:
            wait_ms = await self._script(keys=keys, args=args)
        except self._errors as e:
            self._away.failed("rate limits cannot be checked", e)
            raise LimitsUnavailable() from None
        self._away.answered()
        return None if int(wait_ms) == 0 else int(wait_ms) / 1000

    async def give_back(
        self, limits: Sequence[RateLimit], action: str, resource: Entity, call: str
    ) -> bool:
        """As `RateLimiter.give_back`, in Redis (the keys of one call share a slot: one
        script). False if Redis cannot be reached: the call stays counted (at most one call
        fewer in the window than allowed, never one more)."""
        keys = [self.key(limit, action, resource) for limit in limits]
        try:
            await self._give_back(keys=keys, args=[call])
        except self._errors as e:
            self._away.failed("a refused call's count cannot be given back (it stays counted)", e)
            return False
        self._away.answered()
        return True

    async def close(self) -> None:
        await self._redis.aclose()
