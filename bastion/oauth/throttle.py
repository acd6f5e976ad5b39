"""Throttles against guessing and flooding at the authorization server, counted per the address a
request comes from (`client_address`; an IPv6 address counts as its /64, `counted_address`).

Login: failures are counted per username and per address in the database, so every process
(replica) sharing it sees the same counts. Past ``max_failures_per_user`` (or ``_per_address``)
failures, each further attempt must wait ``backoff_seconds`` after the last failure, doubled at
each further failure up to ``max_backoff_seconds``; a counter starts again from zero once its last
failure is ``failure_window_seconds`` old, and a user's counter is cleared when they sign in.
A username is counted under its keyed digest (HMAC-SHA-256 under a secret of the deployment),
never as typed: people type their password into the username field.
Attempts that must wait are refused before any password is hashed. An attempt that may go on is
counted as a failure at once, in the same transaction as the check (`begin`), and taken back if
it succeeds or checks nothing: attempts sent in parallel each see those before them, so they
cannot pass a limit together. Password hashes themselves are limited per process
(`PasswordCheckSlots`), so a burst is answered "busy" rather than queued.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
from collections.abc import Callable
from dataclasses import dataclass

from starlette.requests import Request

from bastion.ip_addresses import read_address
from bastion.oauth.settings import LoginSettings
from bastion.oauth.store import OAuthStore


def client_address(request: Request) -> str | None:
    """The address the request came from: the ASGI client, which is the proxy's address unless
    ``bastion serve`` is told to trust the proxy's forwarding headers."""
    return request.client.host if request.client else None


# The longest DNS name; a client address given as a longer text is counted by its digest.
MAX_NAME = 253


def counted_address(address: str | None) -> str:
    """What a per-address counter counts a request under: an IPv4 address (IPv4-mapped IPv6
    included) as itself, an IPv6 address as its /64, which a single host is given whole and
    may send from at any address of; anything else (a name, none) as it is, or by its digest if
    it is longer than a DNS name may be (a forwarding header names what the client sent: a name
    of thousands of characters was a 500 on PostgreSQL, whose indexes take no entry over 2,704
    bytes)."""
    if not address:
        return "unknown"
    ip = read_address(address)
    if ip is None:
        if len(address) <= MAX_NAME:
            return address
        return "sha256:" + hashlib.sha256(address.encode("utf-8", "surrogatepass")).hexdigest()
    if ip.version == 6:
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass(frozen=True)
class Wait:
    """An attempt refused before checking anything: which counter, and for how long."""

    counter: str  # "user" or "address"
    seconds: int


class LoginThrottle:
    """Failure counters per username and per address, and the backoff they impose."""

    def __init__(
        self,
        store: OAuthStore,
        settings: LoginSettings,
        clock: Callable[[], float],
        counter_secret: Callable[[], bytes],
    ) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self._counter_secret = counter_secret  # `read_secret` (`deployment_secret`)
        self._secret: bytes | None = None

    def read_secret(self) -> bytes:
        """The counters' secret, read (made, the first time) unless it was already: a file's
        I/O, done at start by a server and at first use by a command."""
        if self._secret is None:
            self._secret = self._counter_secret()
        return self._secret

    def user_counter(self, username: str) -> str:
        """The key under which failed sign-ins as ``username`` are counted: bounded, and a name
        that is a password typed in the wrong field is not kept (an HMAC under a deployment
        secret)."""
        name = hmac.new(
            self.read_secret(), username.encode("utf-8", "surrogatepass"), hashlib.sha256
        )
        return f"user:{name.hexdigest()}"

    def _counters(self, username: str, address: str | None) -> dict[str, str]:
        return {
            "user": self.user_counter(username),
            "address": f"address:{counted_address(address)}",
        }

    def wait(self, username: str, address: str | None) -> Wait | None:
        """How long this attempt must wait before a password may be checked, or None."""
        settings, now = self.settings, self.clock()
        counters = self._counters(username, address)
        known = self.store.login_failures(
            list(counters.values()), since=now - settings.failure_window_seconds
        )
        longest: Wait | None = None
        for name, limit in (
            ("user", settings.max_failures_per_user),
            ("address", settings.max_failures_per_address),
        ):
            failures, last = known.get(counters[name], (0, 0.0))
            if failures < limit:
                continue
            doublings = min(failures - limit, 30)
            backoff = min(settings.backoff_seconds * 2**doublings, settings.max_backoff_seconds)
            remaining = last + backoff - now
            if remaining > 0 and (longest is None or remaining > longest.seconds):
                longest = Wait(name, math.ceil(remaining))
        return longest

    def begin(self, username: str, address: str | None) -> Wait | None:
        """Check an attempt and, unless it must wait, count it as a failure now, as one step
        for every process on the database; `succeeded` or `take_back` undo the count."""
        db = self.store.db
        with db.transaction():
            db.lock("bastion:login_throttle")
            wait = self.wait(username, address)
            if wait is None:
                self.failed(username, address)
            return wait

    def failed(self, username: str, address: str | None) -> None:
        now = self.clock()
        restart_before = now - self.settings.failure_window_seconds
        with self.store.db.transaction():
            for counter in self._counters(username, address).values():
                self.store.add_login_failure(counter, now, restart_before)

    def take_back(self, username: str, address: str | None) -> None:
        """Undo the failure `begin` counted, for an attempt that checked no password."""
        with self.store.db.transaction():
            for counter in self._counters(username, address).values():
                self.store.take_back_login_failure(counter)

    def succeeded(self, username: str, address: str | None) -> None:
        """The password was right: the user's counter starts again, and the address's failure
        counted by `begin` is taken back."""
        counters = self._counters(username, address)
        with self.store.db.transaction():
            self.store.clear_login_failures(counters["user"])
            self.store.take_back_login_failure(counters["address"])

    def forget_old(self) -> None:
        self.store.forget_login_failures_before(self.clock() - self.settings.failure_window_seconds)


class PasswordCheckSlots:
    """At most ``size`` password hashes at once in this process (Argon2id takes time and about
    64 MiB each). Used from the event loop only: no lock needed."""

    def __init__(self, size: int) -> None:
        self.free = size

    def take(self) -> bool:
        """Take a slot if one is free; False means answer "busy" now rather than queue."""
        if self.free <= 0:
            return False
        self.free -= 1
        return True

    def give_back(self) -> None:
        self.free += 1
