"""An issuer's metadata (OpenID Connect Discovery 1.0, RFC 8414) kept while its headers say
(RFC 9111 through `bastion.http_caching`, within ``jwks_refetch_seconds`` and
``metadata_cache_seconds``), then read again: an issuer that moves its ``jwks_uri``, token or
introspection endpoint is followed without a restart. Read again conditionally (RFC 9111 §4.3:
``If-None-Match``, ``If-Modified-Since``): a ``304`` renews the kept document.

Past its lifetime, the metadata kept is still the answer, at once, for ``metadata_stale_seconds``
while it is read again in the background (stale-while-revalidate, as RFC 5861 names it): one
read at a time for every request, and one that failed is not tried again for
``jwks_refetch_seconds`` (`CoalescedFetches`), so no login or token check waits for an issuer
that is down or slow. A read that fails, or brings a document the caller's checks refuse
(another ``issuer``, an unusable endpoint), never replaces the last good metadata; past that
window the requests wait for a read, and are refused with the failure's reason rather than
answered with metadata that old. The very first read, with nothing kept, is waited for.
A caller that doubts the metadata it holds (a grant names another issuer) asks for a read now
(`read_again`), at most so often, and is never answered with stale metadata.
Used by login providers, trusted issuers, ID-JAG providers, Shared Signals transmitters (SSF 1.0
§7) and upstream MCP servers' authorization servers (RFC 9728, RFC 8414).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from bastion.http_caching import KeptAnswers, kept_seconds
from bastion.oauth.jwks import CoalescedFetches, FetchLimits, RemoteDocumentError

_T = TypeVar("_T")

log = logging.getLogger("bastion.oauth.remote_metadata")

# The defaults of ``metadata_cache_seconds`` and ``metadata_stale_seconds`` wherever an issuer
# is configured (docs/security.md's limits).
METADATA_CACHE_SECONDS = 3600
METADATA_STALE_SECONDS = 24 * 3600


@dataclass(frozen=True)
class _Read(Generic[_T]):
    value: _T
    read_at: float
    # How long it is used before it is read again (`bastion.http_caching.kept_seconds`).
    kept_seconds: float


class RemoteMetadata(Generic[_T]):
    """One peer's metadata, as the caller's ``read(answers)`` makes it from the document: (what
    is kept, the lifetime the answer's headers gave or None); ``answers`` is the peer's
    `KeptAnswers`, for each `bastion.oauth.jwks.fetch_json_answer` it makes (conditional
    requests). ``read`` raises `RemoteDocumentError` for a document that cannot be had or fails
    its checks. ``table`` and ``peer`` name the peer's settings for the log and the refusals."""

    def __init__(
        self,
        limits: FetchLimits,
        read: Callable[[KeptAnswers], Awaitable[tuple[_T, float | None]]],
        *,
        cache_seconds: float,
        stale_seconds: float,
        table: str,
        clock: Callable[[], float],
        peer: str = "",
    ) -> None:
        self.limits = limits
        self.read = read
        self.cache_seconds = cache_seconds
        self.stale_seconds = stale_seconds
        self.table = table
        self.peer = peer
        self.clock = clock
        self.answers = KeptAnswers()
        self._fetches = CoalescedFetches(limits, clock)
        self._good: _Read[_T] | None = None
        # When `read_again` last started a read, and why it failed ("" when it did not).
        self._again_at = -math.inf
        self._again_failure = ""

    @classmethod
    def of(
        cls,
        settings: Any,
        limits: FetchLimits,
        read: Callable[[KeptAnswers], Awaitable[tuple[_T, float | None]]],
        *,
        table: str,
        peer: str,
        clock: Callable[[], float],
    ) -> RemoteMetadata[_T]:
        """The metadata of the peer whose ``settings`` (a table of ``table``) name its
        ``metadata_cache_seconds`` and ``metadata_stale_seconds``, as every peer's do."""
        return cls(
            limits,
            read,
            cache_seconds=settings.metadata_cache_seconds,
            stale_seconds=settings.metadata_stale_seconds,
            table=table,
            peer=peer,
            clock=clock,
        )

    @property
    def last_good(self) -> _T | None:
        """The last good metadata read, however old; None before one was read. For code that
        cannot wait for a read (a worker thread) and only refines what a read allowed."""
        return self._good.value if self._good is not None else None

    async def get(self) -> _T:
        """The metadata: the last good read while young; past its lifetime, within
        ``stale_seconds``, still that, at once, while it is read again in the background (one
        read at a time; one that failed not tried again for ``refetch_seconds``). With none, or
        past that window, a read waited for (requests that come meanwhile wait for the same
        one); `RemoteDocumentError` when it fails."""
        good = self._good
        if good is not None:
            age = self.clock() - good.read_at
            if age < good.kept_seconds:
                return good.value
            if age - good.kept_seconds < self.stale_seconds:
                self._fetches.in_background("metadata", self._refresh, self._read_since(good))
                return good.value
        try:
            return await self._fetches.once("metadata", self._read, self._read_since(good))
        except RemoteDocumentError as exc:
            if good is None:
                raise
            late = self.clock() - good.read_at - good.kept_seconds
            raise RemoteDocumentError(
                f"its last good metadata ended {late:.0f} s ago, past {self.table}"
                f" metadata_stale_seconds ({self.stale_seconds:g} s), and cannot be read again:"
                f" {exc}"
            ) from None

    @property
    def reading(self) -> bool:
        """Whether a read `get` started in the background is under way."""
        return self._fetches.under_way("metadata")

    async def read_again(self, known: _T, every: float) -> _T:
        """Metadata read after ``known`` (the caller doubts it: a grant names another issuer
        than it): the last good read when it is not ``known`` (read meanwhile), else a read now,
        one at a time. At most one such read is started every ``every`` seconds (those of
        `get` do not count): until then ``known`` is the answer, or the failure of that read. A
        read that fails raises `RemoteDocumentError`; the stale metadata is never the answer
        here."""

        def read_lately() -> _T | None:
            good = self._good
            if good is not None and good.value is not known:
                return good.value
            if self.clock() - self._again_at >= every:
                return None
            if self._again_failure:
                raise RemoteDocumentError(self._again_failure)
            return known

        async def read() -> _T:
            self._again_at = self.clock()
            try:
                value = await self._read()
            except RemoteDocumentError as exc:
                self._again_failure = f"{exc} (read again at most every {every:g} s)"
                raise
            self._again_failure = ""
            return value

        return await self._fetches.once("metadata", read, read_lately)

    def _read_since(self, good: _Read[_T] | None) -> Callable[[], _T | None]:
        """What another request read after ``good`` was had, if one did (`CoalescedFetches`)."""

        def read_meanwhile() -> _T | None:
            again = self._good
            return again.value if again is not None and again is not good else None

        return read_meanwhile

    async def _refresh(self) -> _T:
        """`_read` in the background, its failure logged (the kept metadata is in use)."""
        try:
            return await self._read()
        except RemoteDocumentError as exc:
            good = self._good
            late = self.clock() - good.read_at - good.kept_seconds if good is not None else 0.0
            log.warning(
                "%s%s: its metadata could not be read again, the last good one is used"
                " (%.0f s past its lifetime, at most %g s: metadata_stale_seconds; read again"
                " after %g s): %s",
                self.table,
                f" {self.peer}" if self.peer else "",
                late,
                self.stale_seconds,
                self.limits.refetch_seconds,
                exc,
            )
            raise

    async def _read(self) -> _T:
        value, lifetime = await self.read(self.answers)
        kept = kept_seconds(lifetime, least=self.limits.refetch_seconds, most=self.cache_seconds)
        self._good = _Read(value, self.clock(), kept)
        return value
