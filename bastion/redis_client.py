"""The Redis client every shared store uses (rate limits, behaviour counters, session labels).

``redis://``, ``rediss://`` and ``unix://`` URLs name one server; ``redis+cluster://`` (or
``rediss+cluster://``) any node of a Redis Cluster. Every call is bounded by ``timeout``, so a
Redis that does not answer fails the caller (which fails closed) instead of holding it.
"""

from __future__ import annotations

from typing import Any

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


def connect(url: str, timeout: float = 1.0) -> tuple[Any, tuple[type[BaseException], ...]]:
    """An asyncio client for ``url``, and the exceptions that mean Redis cannot be used (a
    cluster that cannot be reached raises RedisClusterException, not a RedisError)."""
    import redis.asyncio as redis
    from redis.exceptions import RedisClusterException

    errors = (redis.RedisError, RedisClusterException, OSError)
    scheme, sep, rest = url.partition("://")
    timeouts = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if scheme in CLUSTER_SCHEMES:
        plain = scheme.removesuffix("+cluster") + sep + rest
        return redis.RedisCluster.from_url(plain, **timeouts), errors
    return redis.Redis.from_url(url, **timeouts), errors
