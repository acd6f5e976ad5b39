"""Session labels: what an agent's chain has been shown, so that it cannot pass it on.

A target (tool, resource, prompt) carries labels through ``label(<target>, "<label>")`` facts or
rules. When the gateway releases a result of that target to a caller, it first adds the
target's labels to the caller's **label set**, keyed by (user, first agent of the chain, task):
a sub-agent the first agent delegated to shares its set (no laundering through a sub-agent),
and each task has its own. They go, in the same write, into the **own set** of every agent of
the chain too (user and first agent: the agent's client id, no task), the set it reads when it
acts as itself: no laundering through its own token. The policy reads the set as
``context.session.labels`` (a sorted list of strings) on every decision, e.g. to refuse a sink
once ``"pii"`` was seen.

`LocalLabels` keeps the sets in this process (the default); `RedisLabels` shares them through
the gateway's Redis (``gateway.redis_url``). Labels are written before the result leaves: a
result whose labels cannot be recorded is withheld (`LabelsUnavailable`, or `LabelsFull` when the
set is at ``gateway.label_max``). They are read only for a policy whose rules read
``context.session``; when Redis cannot be read, a decision whose rules read them is refused with
reason ``labels_unavailable`` (fail closed), others go on; when Redis may have lost sets
(`bastion.redis_state`: flushed, restarted, failed over, evicting), with ``labels_lost``, for
``gateway.label_ttl_seconds`` after it was noticed. A set is forgotten
``gateway.label_ttl_seconds`` after its last label was recorded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

from bastion.policy.errors import EvaluationLimit
from bastion.redis_client import CLUSTER_SCHEMES, RedisAway, connect, run_script
from bastion.redis_state import RedisState

log = logging.getLogger("bastion.delegation.labels")

# The context field the labels are read as (``context.session.labels``).
CONTEXT_FIELD = "session"


class LabelKey(NamedTuple):
    """Whose label set: the user, the first agent of the chain (the one the user let act),
    and the task the token is bound to ("" for none)."""

    user: str
    agent: str
    task: str = ""

    @classmethod
    def of(cls, subject: str, agents: tuple[str, ...], client_id: str, task: str) -> LabelKey:
        return cls(subject, agents[0] if agents else client_id, task)

    @classmethod
    def own(cls, agent: str) -> LabelKey:
        """The set of ``agent`` acting as itself (client_credentials: the agent is its token's
        subject), in no task: what it was shown in any chain it took part in."""
        return cls(agent, agent)

    def digest(self) -> str:
        text = json.dumps([self.user, self.agent, self.task], separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:32]


class LabelsUnavailable(EvaluationLimit):
    """The label store cannot be read or written: a decision whose rules read the labels is
    refused, and a labelled result is withheld."""

    reason = "labels_unavailable"

    def __init__(self, detail: str = "Redis cannot be reached") -> None:
        Exception.__init__(self, f"the session labels are unavailable ({detail})")
        self.limit = "labels_unavailable"
        self.value = 0


class LabelsLost(EvaluationLimit):
    """The Redis holding the label sets may have lost some (`bastion.redis_state`): a decision
    whose rules read the labels is refused until ``label_ttl_seconds`` after the loss."""

    reason = "labels_lost"

    def __init__(self, detail: str) -> None:
        Exception.__init__(self, f"the session labels may have been lost ({detail})")
        self.limit = "labels_lost"
        self.value = 0


class LabelsFull(Exception):
    """The label set holds ``gateway.label_max`` labels: a result that would add another is
    withheld (forgetting a label would let what it marks leak)."""

    reason = "labels_full"


class SessionView(dict):
    """``context.session``: ``labels`` is read from the store when a rule first reads it (as
    the policy's field lookup does, with `get`), then kept, in the decision record too. Without
    a source (the shared store could not be read), reading it raises `LabelsUnavailable`."""

    __slots__ = ("key", "_source", "_refusal")

    def __init__(self, key: LabelKey, source: Callable[[LabelKey], list[str]] | None) -> None:
        super().__init__()
        self.key = key
        self._source = source
        # Without a source, why (`LabelsLost`); None: the store could not be read.
        self._refusal: EvaluationLimit | None = None

    def get(self, name: Any, default: Any = None) -> Any:
        if name != "labels":
            return default
        if dict.__contains__(self, name):
            return dict.__getitem__(self, name)
        if self._source is None:
            raise self._refusal or LabelsUnavailable()
        labels = self._source(self.key)
        dict.__setitem__(self, name, labels)
        return labels

    def __getitem__(self, name: Any) -> Any:
        if name != "labels":
            raise KeyError(name)
        return self.get(name)


@dataclass(frozen=True, slots=True)
class LabelSettings:
    """The ``gateway.label_*`` settings."""

    ttl_seconds: int = 86_400
    max_labels: int = 256
    max_sets: int = 100_000


class LocalLabels:
    """The label sets of this process (the default): gone when it stops."""

    def __init__(
        self, settings: LabelSettings | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.settings = settings or LabelSettings()
        self.clock = clock
        # key -> (labels, forgotten at); insertion order is the order of last recording.
        self._sets: dict[LabelKey, tuple[frozenset[str], float]] = {}
        self._current = self.current  # bound once: each view refers to it

    async def labels(self, key: LabelKey) -> list[str]:
        """``key``'s labels, sorted."""
        return self.current(key)

    def current(self, key: LabelKey) -> list[str]:
        found = self._sets.get(key)
        if found is None:
            return []
        if found[1] <= self.clock():
            del self._sets[key]
            return []
        return sorted(found[0])

    def view(self, key: LabelKey) -> SessionView:
        return SessionView(key, self._current)

    async def prepare(self, view: SessionView) -> None:
        """Nothing to fetch: the sets are in this process."""

    async def record(self, keys: Sequence[LabelKey], labels: Iterable[str]) -> None:
        """Add ``labels`` to the set of each of ``keys`` (distinct), and keep each another
        ``ttl_seconds``; `LabelsFull` or `LabelsUnavailable` (no room for another set) when
        they cannot all be kept, and then no set changes."""
        new = frozenset(labels)
        if not new:
            return
        now = self.clock()
        merged: list[tuple[LabelKey, frozenset[str]]] = []
        fresh = 0
        for key in keys:
            found = self._sets.get(key)
            current = found[0] if found is not None and found[1] > now else frozenset()
            union = current | new if not new <= current else current
            if len(union) > self.settings.max_labels:
                raise LabelsFull()
            merged.append((key, union))
            fresh += found is None
        max_sets = self.settings.max_sets
        if fresh and len(self._sets) + fresh > max_sets:
            self._purge(now)
            fresh = sum(key not in self._sets for key in keys)
            if len(self._sets) + fresh > max_sets:
                raise LabelsUnavailable(f"{max_sets} label sets already kept")
        until = now + self.settings.ttl_seconds
        for key, union in merged:
            self._sets.pop(key, None)
            self._sets[key] = (union, until)

    async def clear(self, key: LabelKey) -> bool:
        """Forget ``key``'s set; whether there was one."""
        return self._sets.pop(key, None) is not None

    async def wipe_task(self, task: str) -> int:
        """Forget every set of ``task`` (its users' and agents'); how many there were."""
        if not task:
            raise ValueError("wipe_task needs a task id")
        doomed = [key for key in self._sets if key.task == task]
        for key in doomed:
            del self._sets[key]
        return len(doomed)

    def _purge(self, now: float) -> None:
        for key in [k for k, (_, until) in self._sets.items() if until <= now]:
            del self._sets[key]

    async def close(self) -> None:
        pass


# KEYS: label sets of one task (one hash slot), then that task's index. ARGV: time to live (s),
# max labels, then the labels to add. Returns 1 when any of the sets would go over max labels
# (nothing added), else 0.
_RECORD = """
local ttl = tonumber(ARGV[1])
local max = tonumber(ARGV[2])
local index = KEYS[#KEYS]
for k = 1, #KEYS - 1 do
  local new = 0
  for i = 3, #ARGV do
    if redis.call('SISMEMBER', KEYS[k], ARGV[i]) == 0 then new = new + 1 end
  end
  if new > 0 and redis.call('SCARD', KEYS[k]) + new > max then return 1 end
end
for k = 1, #KEYS - 1 do
  for i = 3, #ARGV do redis.call('SADD', KEYS[k], ARGV[i]) end
  redis.call('EXPIRE', KEYS[k], ttl)
  redis.call('SADD', index, KEYS[k])
end
redis.call('EXPIRE', index, ttl)
return 0
"""

# KEYS: a task's index. Deletes the sets it names and itself; returns how many sets it named.
_WIPE = """
local sets = redis.call('SMEMBERS', KEYS[1])
for _, key in ipairs(sets) do redis.call('DEL', key) end
redis.call('DEL', KEYS[1])
return #sets
"""


class RedisLabels:
    """Label sets shared through Redis by every bastion process configured with the same URL.

    A set is a Redis set under ``<prefix>:labels:{<task digest>}:<key digest>``; the sets of a
    task are listed in ``<prefix>:labels:{<task digest>}:task`` (one hash slot per task, so a
    cluster wipes a task in one script)."""

    def __init__(
        self,
        url: str,
        prefix: str = "bastion",
        settings: LabelSettings | None = None,
        timeout: float = 1.0,
        audit: Any = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.settings = settings or LabelSettings()
        state: list[RedisState] = []  # the connection hook needs it, it needs the client
        self._redis, self._errors = connect(url, timeout, lambda c: state[0].on_connect(c))
        self.state = RedisState(
            self._redis, self._errors, url, prefix, self.settings.ttl_seconds, audit, clock
        )
        state.append(self.state)
        self._record = self._redis.register_script(_RECORD)
        self._wipe = self._redis.register_script(_WIPE)
        self._cluster = url.partition("://")[0] in CLUSTER_SCHEMES
        self._away = RedisAway(log, url, "session labels")

    def _task_base(self, task: str) -> str:
        tag = hashlib.sha256(task.encode()).hexdigest()[:16]
        return f"{self.prefix}:labels:{{{tag}}}"

    def _keys(self, key: LabelKey) -> tuple[str, str]:
        base = self._task_base(key.task)
        return f"{base}:{key.digest()}", f"{base}:task"

    def view(self, key: LabelKey) -> SessionView:
        return SessionView(key, None)

    async def prepare(self, view: SessionView) -> None:
        """Fetch ``view``'s set in one round trip, with the marker that says whether Redis
        kept it (`RedisState`); if Redis cannot be read, the view stays unavailable, and if it
        may have lost sets, refused (`LabelsLost`): a rule that reads it refuses the decision."""
        try:
            await self.state.start()  # once: the first use
            generation = self.state.generation
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.get(self.state.key)
                pipe.smembers(self._keys(view.key)[0])
                marker, members = await pipe.execute()
            lost = await self.state.check(marker, generation)
        except self._errors as e:
            self._away.failed("session labels cannot be read", e)
            return
        except Exception as e:  # the database, asked once whether Redis was marked
            log.error("session labels cannot be trusted yet: %s", e)
            return
        self._away.answered()
        if lost is not None:
            view._refusal = LabelsLost(lost)
            return
        labels = sorted(m.decode() if isinstance(m, bytes) else m for m in members)
        view._source = lambda _key: labels

    async def labels(self, key: LabelKey) -> list[str]:
        """``key``'s labels, sorted; `LabelsUnavailable` when Redis cannot be read."""
        view = self.view(key)
        await self.prepare(view)
        return view["labels"]

    async def record(self, keys: Sequence[LabelKey], labels: Iterable[str]) -> None:
        """Add ``labels`` to the set of each of ``keys`` (distinct) in one round trip: one
        script per task among them (a hash slot each), checking all its sets before it adds to
        any. Sets of two tasks (a chain's set in a task, its agents' own sets in none) are two
        scripts: when one refuses (`LabelsFull`) the other may have added the labels, which
        only ever labels more than was released (the safe side)."""
        new = sorted(set(labels))
        if not new:
            return
        s = self.settings
        by_task: dict[str, list[str]] = {}
        for key in keys:
            set_key, index = self._keys(key)
            by_task.setdefault(index, []).append(set_key)
        args = [s.ttl_seconds, s.max_labels, *new]
        calls = [([*sets, index], args) for index, sets in by_task.items()]
        try:
            await self.state.start()  # marked before the first label: its loss is seen
            full = await run_script(self._redis, self._record, calls, self._cluster)
        except self._errors as e:
            self._away.failed("session labels cannot be written", e)
            raise LabelsUnavailable() from None
        except Exception as e:  # the database, asked once whether Redis was marked
            log.error("session labels cannot be written yet: %s", e)
            raise LabelsUnavailable("the database cannot be read") from None
        self._away.answered()
        if any(int(f) for f in full):
            raise LabelsFull()

    async def clear(self, key: LabelKey) -> bool:
        set_key, index = self._keys(key)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.delete(set_key)
                pipe.srem(index, set_key)
                deleted, _ = await pipe.execute()
        except self._errors as e:
            raise LabelsUnavailable(str(e)) from None
        return bool(deleted)

    async def wipe_task(self, task: str) -> int:
        if not task:
            raise ValueError("wipe_task needs a task id")
        try:
            return int(await self._wipe(keys=[f"{self._task_base(task)}:task"]))
        except self._errors as e:
            raise LabelsUnavailable(str(e)) from None

    async def close(self) -> None:
        await self._redis.aclose()


def task_wiper(
    store: LocalLabels | RedisLabels, loop: asyncio.AbstractEventLoop
) -> Callable[[str], None]:
    """A `Tasks.on_end` subscriber: wipe the ended task's label sets, on ``loop`` (the store's;
    the subscriber may be called from any thread, and does not wait)."""

    def wipe(task_id: str) -> None:
        future = asyncio.run_coroutine_threadsafe(store.wipe_task(task_id), loop)
        future.add_done_callback(partial(_wiped, task_id))

    return wipe


def _wiped(task_id: str, future: concurrent.futures.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        # The task's tokens are revoked already; its sets expire after label_ttl_seconds.
        log.error("the label sets of ended task %s were not wiped: %s", task_id, future.exception())


def labels_from_config(
    redis_url: str = "",
    redis_prefix: str = "bastion",
    settings: LabelSettings | None = None,
    redis_timeout: float = 1.0,
    audit: Any = None,
) -> LocalLabels | RedisLabels:
    """The label sets a gateway keeps: in Redis when it has one (``audit``, an `AuditLog`,
    remembers that it was marked and records its losses), else in this process."""
    if redis_url:
        return RedisLabels(redis_url, redis_prefix, settings, redis_timeout, audit)
    return LocalLabels(settings)
