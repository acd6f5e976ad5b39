"""Redis taken away from one test's bastion, and from nothing else.

Other tests use the same Redis server at the same time, so it is never paused, stopped or
flushed: the test's bastion reaches it through a relay of its own (`RedisRelay.url`), which
`cut` makes a Redis that is down (its connections end, new ones are closed at once) and
`restore` brings back.
"""

from __future__ import annotations

from tests.relays import Relay


class RedisRelay(Relay):
    """A `Relay` to ``target`` (the shared Redis)."""

    def __init__(self, target: tuple[str, int] = ("127.0.0.1", 6379)) -> None:
        super().__init__(target)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"
