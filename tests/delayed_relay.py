"""PostgreSQL's answers reaching one test's client late.

A notice PostgreSQL sends after a commit can be on its way to another process when the committing
call returns: under load, tens of milliseconds. `DelayedRelay` makes that moment long and certain
for the connections made through it (`DelayedRelay.url`): every byte from the server reaches
the client ``delay`` seconds after it left, in order; what the client sends goes at once. The
delay can be set once the processes under test are up (`delay`): each round trip of their start
(connections, schema checks) would otherwise wait it too, for nothing the tests look at.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from tests.relays import Relay


class DelayedRelay(Relay):
    """A `Relay` to ``target`` (the shared PostgreSQL) that delivers its answers late."""

    def __init__(self, delay: float = 0.0, target: tuple[str, int] = ("127.0.0.1", 5432)) -> None:
        super().__init__(target, delay)

    def url(self, postgres_url: str) -> str:
        """``postgres_url`` (same database, user and options) through the relay."""
        parts = urlsplit(postgres_url)
        user = f"{parts.username}@" if parts.username else ""
        return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{self.port}"))
