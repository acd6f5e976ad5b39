"""Whether a Redis still holds what bastion wrote to it (docs/operations.md, "What Redis must
keep").

A Redis can lose keys and still answer: restarted without persistence or from an older snapshot,
flushed (``FLUSHDB``, ``FLUSHALL``), a failover to a replica that had not received the last
writes, or eviction under ``maxmemory``. An empty answer then looks like "nothing recorded".
`RedisState` tells the two apart for the data it guards (the session labels):

- **a marker key**, ``<prefix>:state``, holding ``"<random token> <refused until>"``, written
  when a process first finds none. Its caller reads it in the round trip that reads the data it
  guards (`key`), and hands the value to `check`: gone, or another value than this process
  knows, means the data may be gone too.
- **the database** remembers (audit event ``labels.redis_marked``, kept fresh) that this
  deployment marked its Redis: a process that starts against a Redis without the marker knows it
  lost it, though no process was connected then (a host rebooted with Redis and bastion on it).
- **Redis's run_id**, read (``INFO``) on each new connection: another one is another run of
  Redis (a restart, from whatever it kept on disk; a replica promoted), whose data may be behind
  what was written before, unless it keeps an append-only file (a routine restart of a
  persistent Redis is not a loss; its marker still tells one that came back empty). Restarting
  or failing over drops the connections, so a new run is always seen on a new connection, and
  the check costs nothing per call.
- **its eviction policy**, from the same ``INFO``: with a ``maxmemory`` and any policy but
  ``noeviction`` a key may go at any time, unseen (bastion's keys all have a time to live, so
  ``volatile-*`` evicts them as ``allkeys-*`` does). While that is so, `check` refuses; once it
  is fixed, keys evicted meanwhile count as a loss.

A loss refuses for ``hold_seconds`` (the label time to live: by then every set written before
it would have expired anyway) from when it was noticed, in every process: the "refused until" is
written in the marker, which the others find changed. It is logged and audited once
(``labels.lost``). An operator who knows nothing was lost lifts it by writing a marker that
refuses nothing, ``SET <prefix>:state "<any new token> 0"``: each process finds it changed and
adopts it. A Redis whose ``INFO`` is refused (some managed ones rename it) is judged by the
marker alone.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from bastion import redis_client
from bastion.redaction import safe_url

log = logging.getLogger("bastion.redis_state")

MARKED = "labels.redis_marked"
LOST = "labels.lost"
# The database's memory of the marker is written again when its latest is older than this, so
# that audit retention (days) never prunes it while the marker lives.
REMARK_SECONDS = 86_400.0
# While Redis may evict, how often its policy is read again (only by calls refused meanwhile).
RECHECK_SECONDS = 10.0


def parse_info(text: bytes | str) -> dict[str, str]:
    """``INFO``'s ``field:value`` lines as a dict."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    fields = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and not name.startswith("#"):
            fields[name.strip()] = value.strip()
    return fields


def _keeps_its_writes(info: dict[str, str]) -> bool:
    """Whether a Redis with ``info`` logs each write to an append-only file that it can write:
    then a new run of it (a restart) came back with what it had (up to the last second, with
    ``appendfsync everysec``)."""
    return (
        info.get("aof_enabled") == "1"
        and info.get("aof_last_write_status", "ok") == "ok"
        and info.get("aof_last_bgrewrite_status", "ok") == "ok"
    )


def evicting(info: dict[str, str]) -> str | None:
    """Why a Redis with ``info`` may evict bastion's keys, or None."""
    policy = info.get("maxmemory_policy", "noeviction")
    if info.get("maxmemory", "0") in ("0", "") or policy == "noeviction":
        return None
    return (
        f"Redis may evict keys (maxmemory-policy {policy}, maxmemory {info['maxmemory']}):"
        " give it maxmemory-policy noeviction"
    )


class RedisState:
    """One process's view of whether the Redis at ``url`` kept bastion's data under
    ``prefix``. ``audit`` (an `AuditLog`, or None) remembers the marker and records losses."""

    def __init__(
        self,
        redis: Any,
        errors: tuple[type[BaseException], ...],
        url: str,
        prefix: str,
        hold_seconds: float,
        audit: Any = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self._errors = errors
        self.url = url
        self.prefix = prefix
        self.key = f"{prefix}:state"
        self.hold_seconds = hold_seconds
        self.audit = audit
        self.clock = clock
        self._known: bytes | None = None  # the marker's value this process knows
        self._until = 0.0  # refused until then (a loss)
        self._lost_at: float | None = None  # when this process noticed it (None: another did)
        self._why = ""  # what it noticed
        self._unwritten = False  # the marker of a loss could not be written yet
        self._started = False
        self._lock = asyncio.Lock()
        self._runs: dict[str, str] = {}  # address -> run_id of the Redis answering there
        self._new_run: str | None = None  # a loss seen by INFO, not yet acted on
        # Counts what this process learned of the marker: a value read before the last change
        # is older than what it knows (`check`).
        self.generation = 0
        self._evicting: str | None = None  # why Redis may evict, as its last INFO said
        self._checked = 0.0  # when the policy was last read while evicting

    # -- on each new connection (redis_client.connect's on_connect) ---------------------------

    async def on_connect(self, connection: Any) -> None:
        """Read the server's run_id and eviction policy on a new connection."""
        try:
            await connection.send_command("INFO")
            info = parse_info(await connection.read_response())
        except (
            redis_client.exceptions().ResponseError
        ) as e:  # INFO renamed or refused: the marker alone judges
            log.warning("Redis at %s refuses INFO (%s): run_id not checked", self._at(), e)
            return
        address = getattr(connection, "path", None) or f"{connection.host}:{connection.port}"
        self.seen(address, info)

    def seen(self, address: str, info: dict[str, str]) -> None:
        run = info.get("run_id")
        known = self._runs.get(address)
        if run and known is not None and run != known:
            if _keeps_its_writes(info):
                # A restart of a Redis that logs every write (a patch, a new host) is routine:
                # refusing for a day after each would stop the service. Its marker still says
                # whether it came back empty.
                log.warning(
                    "Redis at %s is another run (run_id %s then %s) with its append-only file:"
                    " session labels are trusted as it kept them",
                    address,
                    known[:8],
                    run[:8],
                )
            else:
                self._new_run = (
                    f"Redis at {address} is another run (run_id {known[:8]} then {run[:8]}):"
                    " restarted or failed over without an append-only file, its data may be"
                    " behind"
                )
        if run:
            if known is None and info.get("aof_enabled") == "0":
                log.warning(
                    "Redis at %s keeps no append-only file: a restart loses what it held since"
                    " its last snapshot, and labels are refused for label_ttl_seconds after it"
                    " (docs/operations.md, 'What Redis must keep')",
                    address,
                )
            self._runs[address] = run
        self._observe_eviction(info)

    def _observe_eviction(self, info: dict[str, str]) -> None:
        why = evicting(info)
        evicted = int(info.get("evicted_keys", "0") or 0)
        if why is not None:
            if self._evicting is None:
                log.error("%s at %s: session labels are refused meanwhile", why, self._at())
            self._evicting = why
        elif self._evicting is not None:
            self._evicting = None
            if evicted > 0:  # evicted while it could: any of them may have been labels
                self._new_run = f"Redis evicted {evicted} keys under its former policy"
        self._checked = self.clock()

    # -- with the data it guards --------------------------------------------------------------

    async def start(self) -> None:
        """On first use: know the marker, or write it (a Redis this deployment never marked),
        or notice it gone (a Redis the database says was marked). Raises what Redis or the
        database raise; the next use tries again."""
        if self._started:
            return
        async with self._lock:
            if self._started:
                return
            raw = await self._redis.get(self.key)
            marked_at = await asyncio.to_thread(self._marked_at)
            if raw is not None:
                self._adopt(raw)
                if self.clock() - marked_at > REMARK_SECONDS:
                    await self._audit(MARKED, again=marked_at > 0)
            elif marked_at > 0:
                await self._lost(
                    f"its marker {self.key} is gone, which the database says was written:"
                    " Redis lost its data while no bastion process was connected"
                )
            elif await self._redis.set(self.key, f"{secrets.token_hex(16)} 0", nx=True):
                self._known = await self._redis.get(self.key)
                await self._audit(MARKED, again=False)
            else:  # another process marked it first
                self._adopt(await self._redis.get(self.key))
            self._started = True

    async def check(self, raw: bytes | None, generation: int) -> str | None:
        """Given the marker's value read with the guarded data, by a read that began at
        ``generation``: why that data cannot be trusted (refuse what needs it), or None."""
        if raw != self._known or self._new_run is not None:
            async with self._lock:
                if generation == self.generation or self._new_run is not None:
                    await self._reconcile(raw)
                # else: another read of the same moment reconciled it already
        if self._evicting is not None and self.clock() - self._checked >= RECHECK_SECONDS:
            await self._recheck()
        if self._evicting is not None:
            return self._evicting
        if self._until > self.clock():
            until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self._until))
            return f"{self._noticed()}; what reads the labels is refused until {until}"
        return None

    async def _reconcile(self, raw: bytes | None) -> None:
        if self._new_run is not None:
            why, self._new_run = self._new_run, None
            await self._lost(why)
        elif raw is None and self._unwritten:  # our loss's marker never got there: again
            await self._mark(self._known)
        elif raw is None:
            await self._lost(
                f"its marker {self.key} is gone: Redis was flushed, restarted without"
                " persistence, or evicted it"
            )
        elif raw != self._known:  # another process noticed a loss, or an operator lifted it
            self._adopt(raw)

    async def _recheck(self) -> None:
        try:
            answer = await self._redis.info()  # parsed; a cluster's: per node
        except self._errors:
            return
        nodes = (
            [answer] if not all(isinstance(v, dict) for v in answer.values()) else answer.values()
        )
        infos = [{k: str(v) for k, v in node.items()} for node in nodes]
        # The nodes as one: evicting if any may, the keys all of them evicted.
        info = next((i for i in infos if evicting(i) is not None), infos[0] if infos else {})
        info = {**info, "evicted_keys": str(sum(int(i.get("evicted_keys", 0)) for i in infos))}
        self._observe_eviction(info)
        if self._new_run is not None:
            async with self._lock:
                await self._reconcile(self._known)

    async def _lost(self, why: str) -> None:
        """Refuse for ``hold_seconds`` from now, here and (through the marker) everywhere."""
        until = int(self.clock() + self.hold_seconds)
        value = f"{secrets.token_hex(16)} {until}".encode()
        self._until, self._known = until, value
        self.generation += 1
        self._lost_at, self._why = self.clock(), why
        log.error(
            "Redis at %s lost data: %s; what reads the session labels is refused for %d s",
            self._at(),
            why,
            self.hold_seconds,
        )
        await self._mark(value)
        await self._audit(LOST, why=why, refused_until=until)

    async def _mark(self, value: bytes | None) -> None:
        """Write the marker of a loss, for the other processes (refused here anyway)."""
        try:
            await self._redis.set(self.key, value)
            self._unwritten = False
        except self._errors as e:  # a full Redis (noeviction): tried again by the next read
            log.error("the loss could not be marked in Redis at %s: %s", self._at(), e)
            self._unwritten = True

    def _adopt(self, raw: bytes | None) -> None:
        self._known = raw
        self.generation += 1
        try:
            self._until = float(raw.split()[1]) if raw else 0.0
        except (IndexError, ValueError):
            self._until = self.clock() + self.hold_seconds  # unreadable: not trusted
        self._lost_at = None

    def _noticed(self) -> str:
        if self._lost_at is None:
            return "a loss of Redis data, noticed by another bastion process"
        return f"{self._why} (noticed {self.clock() - self._lost_at:.0f} s ago)"

    # -- the database's memory ----------------------------------------------------------------

    def _marked_at(self) -> float:
        """When the database last recorded that this deployment's Redis had its marker; 0
        for never (or no database)."""
        if self.audit is None:
            return 0.0
        for event in self.audit.events(kind=MARKED, limit=1000):
            if event.detail.get("prefix") == self.prefix:
                return event.at
        return 0.0

    async def _audit(self, kind: str, **detail: Any) -> None:
        if self.audit is None:
            return
        detail = {"prefix": self.prefix, "redis": safe_url(self.url), **detail}
        try:
            await asyncio.to_thread(lambda: self.audit.record(kind, **detail))
        except Exception as e:  # the refusal holds without its record
            log.error("audit event %s not recorded: %s", kind, e)

    def _at(self) -> str:
        return safe_url(self.url)
