"""Behaviour counters and baselines: what each user, agent and agent-on-a-target has done lately.

The gateway counts, per user, per agent and per (agent, target), the messages it decided
(``calls``), those it refused (``refusals``), destructive tool calls it let through
(``destructive``: tools annotated ``destructiveHint: true``), the bytes of the results it returned
(``bytes``) and the distinct targets (``targets``: tools, resources and prompts for a user or an
agent; distinct arguments for an agent on one target). Each is kept over three sliding windows
(``minute``, ``ten_minutes``, ``hour``), estimated in O(1) from the current and the previous
fixed window (the previous one weighted by how much of it the sliding window still covers), with
a baseline per window: the exponentially weighted moving average of the completed windows.

The policy reads them as ``context.behavior.<scope>.<counter>.<window>``, an object with
``count`` (the sliding figure), ``baseline`` and ``ratio`` (count / max(baseline, 1)); e.g.
``context.behavior.agent.destructive.minute.count > 10``. They are computed only when a rule
reads them.

`LocalBehavior` keeps them in this process (the default). `RedisBehavior` shares them through
Redis (``gateway.redis_url``): one pipelined round trip reads a call's figures before it is
decided, and what the call did is written after it, off the call path (one pipelined round trip
on a server; on a Redis Cluster, whose pipelines take no scripts, one script call per counter key,
at once). When Redis cannot be read,
a decision whose rules read ``context.behavior`` is refused with reason ``behavior_unavailable``
(fail closed); decisions whose rules do not read it go on. The log says so once per outage, not
at every call (`bastion.redis_client.RedisAway`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import repeat
from operator import contains
from typing import Any

from bastion.policy.errors import EvaluationLimit
from bastion.redis_client import CLUSTER_SCHEMES, RedisAway, connect, run_script

log = logging.getLogger("bastion.signals.behavior")

SCOPES = ("user", "agent", "tool")
COUNTERS = ("calls", "refusals", "destructive", "bytes", "targets")
WINDOWS = (("minute", 60.0), ("ten_minutes", 600.0), ("hour", 3600.0))
# The messages counted: those that act on a target (not connect, lists or subscriptions).
COUNTED_METHODS = frozenset({"tools/call", "resources/read", "prompts/get"})

_CALLS, _REFUSALS, _DESTRUCTIVE, _BYTES, _TARGETS = range(5)
_N = len(COUNTERS)


@dataclass(frozen=True, slots=True)
class BehaviorSettings:
    """``[signals.behavior]``: how the counters learn and how much they may hold."""

    # The weight of the latest completed window in the baseline (0 < w <= 1).
    baseline_weight: float = 0.2
    # Keys (users, agents, agent-on-target pairs) kept per process; the oldest go first.
    max_keys: int = 100_000
    # Distinct targets remembered per key and window; beyond, every call counts as new.
    max_targets: int = 1_000

    @classmethod
    def from_table(cls, table: dict[str, Any]) -> BehaviorSettings:
        if not isinstance(table, dict):
            raise ValueError("[signals.behavior] must be a table")
        unknown = set(table) - {"baseline_weight", "max_keys", "max_targets"}
        if unknown:
            raise ValueError(f"signals.behavior: unknown setting(s) {sorted(unknown)}")
        defaults = cls()
        weight = table.get("baseline_weight", defaults.baseline_weight)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not 0 < weight <= 1:
            raise ValueError("signals.behavior.baseline_weight must be a number in (0, 1]")
        values = {}
        for name in ("max_keys", "max_targets"):
            value = table.get(name, getattr(defaults, name))
            if type(value) is not int or value < 1:
                raise ValueError(f"signals.behavior.{name} must be a positive integer")
            values[name] = value
        return cls(float(weight), **values)


class BehaviorUnavailable(EvaluationLimit):
    """The shared counters cannot be read: a decision whose rules read them is refused."""

    reason = "behavior_unavailable"

    def __init__(self) -> None:
        Exception.__init__(self, "the behaviour counters are unavailable (Redis cannot be reached)")
        self.limit = "behavior_unavailable"
        self.value = 0


def scope_keys(subject: str, agent: str, target: str) -> tuple[str, str, str]:
    """The counter keys of one message: its user, its agent, its agent on its target.

    The agent's name in the last is escaped (`\\` and `|` after a `\\`), so the first bare `|`
    after ``tool|`` ends it: agent ``a|b`` on ``c`` and agent ``a`` on ``b|c`` are counted
    apart, where they shared a key and a baseline. A target is the rest of its key, and each
    other key holds one name after its scope: those need no escaping. A key whose names hold
    neither character is spelt as before, so the baselines learned under it carry over an
    upgrade, in memory and in Redis alike."""
    named = agent
    if "|" in agent or "\\" in agent:
        named = agent.replace("\\", "\\\\").replace("|", "\\|")
    return (f"user|{subject}", f"agent|{agent}", f"tool|{named}|{target}")


class _Counted:
    """One key's counters: the running totals of those every window counts alike (calls,
    refusals, destructive, bytes), and its windows. A message adds to the totals once, not
    once per window: a window's count is how far the totals went since it began. ``end``: when
    its first window (the minute, the first to end) ends; ``seen``: its windows' sets of the
    targets seen (each window's own set, for good: a window that rolls empties it)."""

    __slots__ = ("totals", "windows", "end", "seen")

    def __init__(self, now: float) -> None:
        self.totals = [0] * _TARGETS  # the counters before targets, in `COUNTERS` order
        self.windows = [_Window(now, s, self.totals) for _, s in WINDOWS]
        self.end = self.windows[0].end
        self.seen = tuple(window.seen for window in self.windows)


class _Window:
    """One key's counters over one window length: fixed windows, rolled lazily. ``start``: the
    key's totals when the current fixed window began; ``targets``: the distinct targets in it;
    ``share``: how much of the current window the key has been counted in (less than all of
    its first window, then 1)."""

    __slots__ = (
        "index",
        "end",
        "start",
        "targets",
        "previous",
        "baseline",
        "learned",
        "share",
        "seen",
    )

    def __init__(self, now: float, seconds: float, totals: list[int]) -> None:
        self.index = int(now // seconds)
        self.end = (self.index + 1) * seconds
        self.start = list(totals)
        self.targets = 0
        self.previous = [0] * _N
        self.baseline = [0.0] * _N
        self.learned = False
        self.share = first_share(now, seconds)
        self.seen: set[str] = set()

    def current(self, totals: list[int]) -> list[int]:
        """The counts of the current fixed window, in `COUNTERS` order."""
        return [t - s for t, s in zip(totals, self.start, strict=True)] + [self.targets]

    def roll(self, now: float, seconds: float, weight: float, totals: list[int]) -> None:
        index = int(now // seconds)
        gap = index - self.index
        self.end = (index + 1) * seconds
        if gap <= 0:
            return
        current = self.current(totals)
        self.baseline = fold(self.baseline, current, gap, weight, self.learned, self.share)
        self.learned = learns(self.learned, self.share, gap)
        self.share = 1.0
        self.previous = current if gap == 1 else [0] * _N
        self.start = list(totals)
        self.targets = 0
        self.seen.clear()  # the same set: `_Counted.seen` holds it
        self.index = index


# A key's first window seeds its baseline only if the key was counted in at least this share of
# it: a key first seen a moment before a window ends would seed it with that moment's count,
# and then its usual rate would read as a spike (a baseline of 0 is not judged far above).
SEEDING_SHARE = 0.5


def first_share(now: float, seconds: float) -> float:
    """The share of its first window of ``seconds`` a key first counted at ``now`` is in."""
    return ((now // seconds) + 1) - now / seconds


def fold(
    baseline: list[float],
    completed: list[int],
    gap: int,
    weight: float,
    learned: bool,
    share: float = 1.0,
) -> list[float]:
    """The baseline after ``gap`` windows completed: the first with ``completed``, the others
    empty (an idle key's baseline decays toward zero). Not ``learned`` yet, ``completed`` seeds
    it, as a whole window's worth of the ``share`` the key was counted in (`SEEDING_SHARE` at
    least; less seeds nothing: the next window does)."""
    if learned:
        out = [weight * c + (1 - weight) * b for b, c in zip(baseline, completed, strict=True)]
    elif share >= SEEDING_SHARE:
        out = [c / share for c in completed]
    else:
        out = [0.0] * len(completed)
    if gap > 1:
        decay = (1 - weight) ** min(gap - 1, 1000)
        out = [b * decay for b in out]
    return out


def learns(learned: bool, share: float, gap: int) -> bool:
    """Whether the baseline is learned once ``gap`` windows completed (`fold`): a window seeded
    it (the first, if counted in enough of it; else the next, empty when ``gap`` > 1)."""
    return learned or share >= SEEDING_SHARE or gap > 1


class _Lazy(dict):
    """A dict that makes each entry when it is first read (`get`, as the policy's field lookup
    reads, or ``[]``): only the figures a rule reads are computed, and kept in the decision
    record. Each kind of entry says how it is made (`_make`, None for a name that has none);
    no entry is None."""

    __slots__ = ()
    # How an entry is made; every kind of `_Lazy` defines it (checked as each is defined).
    _make: Callable[[Any], Any]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not callable(getattr(cls, "_make", None)):
            raise TypeError(f"{cls.__name__} must say how its entries are made (_make)")

    def get(self, name: Any, default: Any = None) -> Any:
        value = dict.get(self, name)
        if value is None:
            value = self._make(name)
            if value is None:
                return default
            self[name] = value
        return value

    def __missing__(self, name: Any) -> Any:
        # ``[]`` of an entry not made yet (one made is found by dict itself, at C speed).
        value = self._make(name)
        if value is None:
            raise KeyError(name)
        self[name] = value
        return value


_COUNTER_INDEX = {name: i for i, name in enumerate(COUNTERS)}
_WINDOW_INDEX = {name: i for i, (name, _) in enumerate(WINDOWS)}
# (key, now, counter index, window index) -> {"count", "baseline", "ratio"}
Source = Callable[[str, float, int, int], dict]


class BehaviorView(_Lazy):
    """``context.behavior``: scope -> counter -> window -> figures, each made when first read.
    Without a source (the shared counters could not be read), reading a scope raises
    `BehaviorUnavailable`: the decision that needs it is refused."""

    __slots__ = ("_source", "counter_keys", "_now")

    def __init__(self, source: Source | None, keys: tuple[str, str, str], now: float):
        # Empty already (dict.__new__): dict.__init__ would have nothing to do.
        self._source = source
        # The user's, the agent's and the agent-on-target key (`scope_keys`), counted under.
        self.counter_keys = keys
        self._now = now

    def _make(self, scope: Any) -> _Counters | None:
        try:
            key = self.counter_keys[SCOPES.index(scope)]
        except ValueError:
            return None
        if self._source is None:
            raise BehaviorUnavailable()
        return _Counters(self._source, key, self._now)

    def peek(self, scope: str, counter: str, window: str) -> dict:
        """What ``self[scope][counter][window]`` reads, without keeping it in the view, and so
        out of the decision record that holds the view: for a check that most often finds
        nothing to say (`bastion.signals.alerts.Alerts.behavior_alerts`), which reads it
        through the view where it does."""
        counters = dict.get(self, scope)
        windows = dict.get(counters, counter) if counters is not None else None
        if windows is not None and window in windows:
            return dict.__getitem__(windows, window)
        if self._source is None:
            raise BehaviorUnavailable()
        key = self.counter_keys[SCOPES.index(scope)]
        return self._source(key, self._now, _COUNTER_INDEX[counter], _WINDOW_INDEX[window])


class _Counters(_Lazy):
    """One scope's counters: counter -> window -> figures."""

    __slots__ = ("_source", "_key", "_now")

    def __init__(self, source: Source, key: str, now: float) -> None:
        self._source = source
        self._key = key
        self._now = now

    def _make(self, name: Any) -> _Windows | None:
        c = _COUNTER_INDEX.get(name)
        return None if c is None else _Windows(self._source, self._key, self._now, c)


class _Windows(_Lazy):
    """One counter of one scope: window -> figures."""

    __slots__ = ("_source", "_key", "_now", "_counter")

    def __init__(self, source: Source, key: str, now: float, counter: int) -> None:
        self._source = source
        self._key = key
        self._now = now
        self._counter = counter

    def _make(self, name: Any) -> dict | None:
        w = _WINDOW_INDEX.get(name)
        return None if w is None else self._source(self._key, self._now, self._counter, w)


def figure(current: int, previous: int, baseline: float, covered: float) -> dict[str, Any]:
    """One counter over one window: the sliding count (the current fixed window plus the part
    of the previous one it still covers, ``covered`` 0..1), the baseline, and their ratio."""
    count = math.ceil(current + previous * covered - 1e-9)
    # `round` with digits goes through the float's decimal text (13,000 instructions a call for
    # the two figures a gateway call reads): left out where it cannot change the value, a
    # baseline of 0.0 (none yet, the usual case) and a ratio to 1 (a whole number).
    base = baseline if baseline == 0.0 else round(baseline, 3)
    ratio = count / 1.0 if base <= 1.0 else round(count / base, 3)
    return {"count": count, "baseline": base, "ratio": ratio}


class _Counting(ABC):
    """What both kinds of counters do with a decided message and a returned result."""

    @abstractmethod
    def observe(
        self, keys: tuple[str, ...], refused: bool, destructive: bool, target: str, detail: str
    ) -> None:
        """Count one decided message under each of ``keys``."""

    @abstractmethod
    def returned(self, keys: tuple[str, ...], size: int) -> None:
        """Count ``size`` bytes returned under each of ``keys``."""

    def observe_decision(self, record: dict[str, Any], context: dict[str, Any]) -> None:
        """Count a decision (its record, and the context it was decided in)."""
        view = context.get("behavior")
        if not isinstance(view, BehaviorView):
            return
        annotations = context.get("annotations")
        allowed = record["result"] == "allow"
        destructive = (
            allowed and isinstance(annotations, dict) and annotations.get("destructiveHint") is True
        )
        self.observe(
            view.counter_keys,
            not allowed,
            destructive,
            record["target"],
            record["arguments_digest"],
        )


class LocalBehavior(_Counting):
    """The counters of this process (the default)."""

    def __init__(
        self,
        settings: BehaviorSettings | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings or BehaviorSettings()
        self.clock = clock
        self._keys: dict[str, _Counted] = {}
        # The keys in the order they came, for `max_keys` to let go of the oldest in O(1): a
        # dict's first key is found past the slots of those deleted before it (25 µs a new key
        # at 100,000), and an OrderedDict's lookups, on every call, cost more than a dict's.
        self._order: deque[str] = deque()

    # -- reading ------------------------------------------------------------------------------

    def view(self, subject: str, agent: str, target: str) -> BehaviorView:
        return BehaviorView(self.figure, scope_keys(subject, agent, target), self.clock())

    async def prepare(self, view: Any) -> None:
        """Nothing to fetch: the figures are in this process."""

    def figure(self, key: str, now: float, c: int, w: int) -> dict[str, Any]:
        """Counter ``c`` of ``key`` over window ``w`` at ``now`` (read as rolled, not rolled)."""
        counted = self._keys.get(key)
        if counted is None:
            return figure(0, 0, 0.0, 0.0)
        window, seconds = counted.windows[w], WINDOWS[w][1]
        index = int(now // seconds)
        cur = window.targets if c == _TARGETS else counted.totals[c] - window.start[c]
        prev, base = window.previous[c], window.baseline[c]
        if index > window.index:
            gap = index - window.index
            base = fold(
                [base], [cur], gap, self.settings.baseline_weight, window.learned, window.share
            )[0]
            prev, cur = (cur if gap == 1 else 0), 0
        return figure(cur, prev, base, 1 - (now - index * seconds) / seconds)

    def figures(self, key: str, now: float) -> dict[str, dict[str, dict[str, Any]]]:
        """Every figure of ``key``: {counter: {window: figure}} (for tests and tools)."""
        return {
            name: {wn: self.figure(key, now, c, w) for w, (wn, _) in enumerate(WINDOWS)}
            for c, name in enumerate(COUNTERS)
        }

    # -- counting -----------------------------------------------------------------------------

    def observe(
        self,
        keys: tuple[str, ...],
        refused: bool,
        destructive: bool,
        target: str,
        detail: str,
    ) -> None:
        """Count one decided message: under each key, a call (and a refusal, a destructive
        call), and its target (its arguments, for the agent-on-target key) if new."""
        now = self.clock()
        known = self._keys
        flagged = refused or destructive
        for key in keys:
            # `_counted`, inline while the key's windows need neither making nor rolling.
            counted = known.get(key)
            if counted is None or now >= counted.end:
                counted = self._counted(key, now)
            totals = counted.totals
            totals[_CALLS] += 1
            if flagged:
                if refused:
                    totals[_REFUSALS] += 1
                if destructive:
                    totals[_DESTRUCTIVE] += 1
            seen = detail if key[0] == "t" else target
            # Mostly seen already in every window: asked of the three sets at once.
            if not all(map(contains, counted.seen, repeat(seen))):
                self._new_target(counted, seen)

    def _new_target(self, counted: _Counted, seen: str) -> None:
        """Count ``seen`` in each of ``counted``'s windows that has not seen it yet (and keep
        it, while the window keeps fewer than ``max_targets``)."""
        max_targets = self.settings.max_targets
        for window in counted.windows:
            targets = window.seen
            if seen not in targets:
                window.targets += 1
                if len(targets) < max_targets:
                    targets.add(seen)

    def returned(self, keys: tuple[str, ...], size: int) -> None:
        """Count the bytes of a result returned."""
        now = self.clock()
        known = self._keys
        for key in keys:
            counted = known.get(key)  # `_counted`, inline as in `observe`
            if counted is None or now >= counted.end:
                counted = self._counted(key, now)
            counted.totals[_BYTES] += size

    def _counted(self, key: str, now: float) -> _Counted:
        """``key``'s counters at ``now``: made if new (the oldest key goes if there are too
        many), their windows rolled if the minute ended."""
        counted = self._keys.get(key)
        if counted is None:
            if len(self._keys) >= self.settings.max_keys:
                del self._keys[self._order.popleft()]
            counted = self._keys[key] = _Counted(now)
            self._order.append(key)
            return counted
        windows = counted.windows
        if now >= counted.end:  # the minute ends first: nothing else can have ended before
            weight, totals = self.settings.baseline_weight, counted.totals
            for window, (_, seconds) in zip(windows, WINDOWS, strict=True):
                if now >= window.end:
                    window.roll(now, seconds, weight, totals)
            counted.end = windows[0].end
        return counted

    async def close(self) -> None:
        pass


# One key's counters for one window, in a hash: i (the fixed window's index), l (learned),
# s (the share of its first window the key is counted in, until that window ends), c0..c4
# (current), p0..p4 (previous), b0..b4 (baseline). KEYS: the three windows' hashes, then their
# sets of targets seen in the current window. ARGV: weight, member (the target seen, or ""),
# max_targets, the four increments (calls, refusals, destructive, bytes), then per window its
# index, its time to live in seconds and the share of it from now (`first_share`). As `fold`.
_COUNT = """
local weight = tonumber(ARGV[1])
local member = ARGV[2]
local max_targets = tonumber(ARGV[3])
local seeding = SEEDING_SHARE
for w = 1, 3 do
  local key = KEYS[w]
  local index = tonumber(ARGV[5 + 3 * w])
  local ttl = tonumber(ARGV[6 + 3 * w])
  local at = tonumber(redis.call('HGET', key, 'i') or index)
  local gap = index - at
  if gap > 0 then
    local learned = redis.call('HGET', key, 'l') == '1'
    local share = tonumber(redis.call('HGET', key, 's') or '1')
    for n = 0, 4 do
      local c = tonumber(redis.call('HGET', key, 'c' .. n) or '0')
      local b = tonumber(redis.call('HGET', key, 'b' .. n) or '0')
      if learned then
        b = weight * c + (1 - weight) * b
      elseif share >= seeding then
        b = c / share
      else
        b = 0
      end
      local p = c
      if gap > 1 then
        b = b * (1 - weight) ^ math.min(gap - 1, 1000)
        p = 0
      end
      redis.call('HSET', key, 'b' .. n, tostring(b), 'p' .. n, p, 'c' .. n, 0)
    end
    if learned or share >= seeding or gap > 1 then redis.call('HSET', key, 'l', '1') end
    redis.call('HSET', key, 'i', index)
    redis.call('HDEL', key, 's')
  elseif gap == 0 then
    if redis.call('HSETNX', key, 'i', index) == 1 then
      redis.call('HSET', key, 's', ARGV[7 + 3 * w])
    end
  end
  for n = 0, 3 do
    local add = tonumber(ARGV[4 + n])
    if add ~= 0 then redis.call('HINCRBY', key, 'c' .. n, add) end
  end
  if member ~= '' then
    local seen = KEYS[3 + w]
    if redis.call('SCARD', seen) >= max_targets or redis.call('SADD', seen, member) == 1 then
      redis.call('HINCRBY', key, 'c4', 1)
    end
    redis.call('EXPIRE', seen, ttl)
  end
  redis.call('EXPIRE', key, ttl)
end
return 0
""".replace("SEEDING_SHARE", repr(SEEDING_SHARE))


class RedisBehavior(_Counting):
    """Counters shared through Redis by every bastion process configured with the same URL.

    Window boundaries come from each process's clock (keep replicas on NTP). Reading a call's
    figures is one pipelined round trip before it is decided; what it did is written after, in
    the background, off the call path: one pipelined round trip per message on a server, one
    script call per counter key (each to its node, at once) on a cluster."""

    # Writes waiting for Redis; beyond, new ones are dropped (and logged): counts never hold
    # the event loop or its memory hostage to a slow Redis.
    MAX_PENDING = 10_000

    def __init__(
        self,
        url: str,
        prefix: str = "bastion",
        settings: BehaviorSettings | None = None,
        clock: Callable[[], float] = time.time,
        timeout: float = 1.0,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.settings = settings or BehaviorSettings()
        self.clock = clock
        self._redis, self._errors = connect(url, timeout)
        self._cluster = url.partition("://")[0] in CLUSTER_SCHEMES
        self._script = self._redis.register_script(_COUNT)
        self._pending: set[asyncio.Task] = set()
        # Counts dropped since the writes waiting for Redis reached MAX_PENDING: said once as
        # they begin, once with their number as writes are taken again.
        self._dropped = 0
        self._away = RedisAway(log, url, "behaviour counters")

    def _hashes(self, key: str) -> tuple[str, list[str]]:
        # One hash tag per counter key: its windows live on one node of a cluster.
        tag = hashlib.sha256(key.encode()).hexdigest()[:16]
        base = f"{self.prefix}:behavior:{{{tag}}}"
        return base, [f"{base}:{name}" for name, _ in WINDOWS]

    # -- reading ------------------------------------------------------------------------------

    def view(self, subject: str, agent: str, target: str) -> BehaviorView:
        return BehaviorView(None, scope_keys(subject, agent, target), self.clock())

    async def prepare(self, view: BehaviorView) -> None:
        """Fetch the figures of ``view``'s keys in one round trip; if Redis cannot be read,
        the view stays unavailable (a rule that reads it refuses the decision)."""
        keys = view.counter_keys
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    for name in self._hashes(key)[1]:
                        pipe.hgetall(name)
                rows = await pipe.execute()
        except self._errors as e:
            self._away.failed("behaviour counters cannot be read", e)
            return
        self._away.answered()
        n = len(WINDOWS)
        fetched = {key: rows[i * n : (i + 1) * n] for i, key in enumerate(keys)}
        weight = self.settings.baseline_weight

        def source(key: str, now: float, c: int, w: int) -> dict:
            return _figure_of(fetched[key][w], now, c, w, weight)

        view._source = source

    # -- counting -----------------------------------------------------------------------------

    def observe(
        self, keys: tuple[str, ...], refused: bool, destructive: bool, target: str, detail: str
    ) -> None:
        writes = [
            (key, (1, int(refused), int(destructive), 0), detail if key[0] == "t" else target)
            for key in keys
        ]
        self._write(writes)

    def returned(self, keys: tuple[str, ...], size: int) -> None:
        self._write([(key, (0, 0, 0, size), "") for key in keys])

    def _write(self, writes: list[tuple[str, tuple[int, int, int, int], str]]) -> None:
        if len(self._pending) >= self.MAX_PENDING:
            self._dropped += 1
            if self._dropped == 1:
                log.error(
                    "behaviour counts dropped: %d writes already wait for Redis (said again"
                    " once they are taken)", len(self._pending),
                )  # fmt: skip
            return
        if self._dropped:
            log.warning(
                "behaviour counts are written again; %d dropped while writes waited for Redis",
                self._dropped,
            )
            self._dropped = 0
        task = asyncio.get_running_loop().create_task(self._send(writes, self.clock()))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _send(self, writes: list, now: float) -> None:
        s = self.settings
        calls = []
        for key, adds, member in writes:
            base, hashes = self._hashes(key)
            args: list[Any] = [s.baseline_weight, member, s.max_targets, *adds]
            sets = []
            for name, seconds in WINDOWS:
                index = int(now // seconds)
                args += [index, int(seconds * 2) + 60, first_share(now, seconds)]
                sets.append(f"{base}:{name}:seen:{index}")
            calls.append(([*hashes, *sets], args))
        try:
            # One round trip (a cluster: one script call per key, each to its node, at once).
            await run_script(self._redis, self._script, calls, self._cluster)
        except self._errors as e:
            self._away.failed("behaviour counts lost", e)
        else:
            self._away.answered()

    async def close(self) -> None:
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=2)
        await self._redis.aclose()


def _figure_of(row: dict, now: float, c: int, w: int, weight: float) -> dict[str, Any]:
    """Counter ``c`` over window ``w`` from that window's hash, rolled to ``now`` as the
    script would roll it."""
    seconds = WINDOWS[w][1]
    index = int(now // seconds)
    at = int(row.get(b"i", index))
    cur, prev = int(row.get(b"c%d" % c, 0)), int(row.get(b"p%d" % c, 0))
    base = float(row.get(b"b%d" % c, 0))
    if index > at:
        learned, share = row.get(b"l") == b"1", float(row.get(b"s", 1.0))
        base = fold([base], [cur], index - at, weight, learned, share)[0]
        prev, cur = (cur if index - at == 1 else 0), 0
    return figure(cur, prev, base, 1 - (now - index * seconds) / seconds)


def behavior_from_config(
    table: dict[str, Any],
    redis_url: str = "",
    redis_prefix: str = "bastion",
    redis_timeout: float = 1.0,
) -> LocalBehavior | RedisBehavior:
    """The counters a gateway keeps: in Redis when it has one, else in this process."""
    settings = BehaviorSettings.from_table(table)
    if redis_url:
        return RedisBehavior(redis_url, redis_prefix, settings, timeout=redis_timeout)
    return LocalBehavior(settings)
