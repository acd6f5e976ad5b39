"""The Redis client every shared store uses (rate limits, behaviour counters, session labels,
subscription counts).

``redis://``, ``rediss://`` and ``unix://`` URLs name one server; ``redis+cluster://`` (or
``rediss+cluster://``) any node of a Redis Cluster. Every call is bounded by ``timeout``, so a
Redis that does not answer fails the caller (which fails closed) instead of holding it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import Any

from bastion.redaction import safe_url
from bastion.retries import Outage

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")

# redis-py's exceptions (``redis.exceptions``), imported by `connect`: redis-py is loaded at
# start where a setting names Redis (a server without one never loads it, 126 ms), and never
# by a coroutine on the event loop.
_exceptions: ModuleType | None = None


def exceptions() -> ModuleType:
    """``redis.exceptions``, for code that runs on a client `connect` made."""
    assert _exceptions is not None, "redis_client.connect imports redis-py first"
    return _exceptions


def connect(
    url: str,
    timeout: float = 1.0,
    on_connect: Callable[[Any], Awaitable[None]] | None = None,
) -> tuple[Any, tuple[type[BaseException], ...]]:
    """An asyncio client for ``url``, and the exceptions that mean Redis cannot be used (a
    cluster that cannot be reached raises RedisClusterException, not a RedisError).
    ``on_connect`` is awaited with each new connection to one server, once it is ready for
    commands (a cluster's node connections are redis-py's own: not called for them)."""
    global _exceptions
    import redis.asyncio as redis
    from redis import exceptions as redis_exceptions

    _exceptions = redis_exceptions
    errors = (redis.RedisError, redis_exceptions.RedisClusterException, OSError)
    scheme, sep, rest = url.partition("://")
    options: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if scheme in CLUSTER_SCHEMES:
        plain = scheme.removesuffix("+cluster") + sep + rest
        return redis.RedisCluster.from_url(plain, **options), errors
    if on_connect is not None:

        async def ready(connection: Any) -> None:
            await connection.on_connect()  # authenticate, select the database
            await on_connect(connection)

        options["redis_connect_func"] = ready
    return redis.Redis.from_url(url, **options), errors


class RedisAway:
    """What a store on Redis logs of Redis failing its calls (`bastion.retries.Outage`): the
    first failure of an outage as an error naming the Redis (without its password), the
    failures after it at DEBUG, and once that Redis answers again. Told of every call, so a
    gateway under load says an outage once, not once per call (each refused call has its
    decision record)."""

    def __init__(self, log: logging.Logger, url: str, store: str) -> None:
        self._outage = Outage(log)
        self.url = safe_url(url)
        self.store = store

    def failed(self, what: str, error: BaseException, level: int = logging.ERROR) -> None:
        """Redis failed a step (``what``: what could not be done); said at ``level`` if it
        begins an outage or fails with another kind of error than the failures before (a
        timeout after refused connections). The kind is the error's class: a Redis stopped
        fails a connection open as "Connection closed by server" and the next ones as
        "Error 111 connecting", one outage."""
        self._outage.failed(
            "%s: Redis at %s: %s",
            what,
            self.url,
            error,
            kind=type(error).__qualname__,
            level=level,
            stacklevel=2,
        )

    def answered(self) -> None:
        """Redis answered a step: said once if it was failing."""
        if self._outage.failing:
            self._outage.ended("%s: Redis at %s answers again", self.store, self.url)


async def run_script(
    redis: Any, script: Any, calls: list[tuple[list[str], list[Any]]], cluster: bool
) -> list[Any]:
    """Run ``script`` (registered on ``redis``) once per call of ``calls`` (its keys, its
    arguments), in one round trip: pipelined by its digest (EVALSHA) on one server, a server
    without it (restarted, or its scripts flushed) having it loaded and the calls it missed sent
    once more; on a cluster, whose pipelines refuse scripts, each call to its own node at once.
    Their results, in order; the first error is raised."""
    no_script = exceptions().NoScriptError
    if cluster:
        return list(await asyncio.gather(*(script(keys=k, args=a) for k, a in calls)))
    results: list[Any] = [None] * len(calls)
    todo = list(range(len(calls)))
    for _ in range(2):
        async with redis.pipeline(transaction=False) as pipe:
            for i in todo:
                keys, args = calls[i]
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            answers = await pipe.execute(raise_on_error=False)
        missing = []
        for i, answer in zip(todo, answers, strict=True):
            if isinstance(answer, no_script):
                missing.append(i)
            elif isinstance(answer, Exception):
                raise answer
            else:
                results[i] = answer
        if not missing:
            return results
        await redis.script_load(script.script)
        todo = missing
    raise no_script("a script could not be loaded")
