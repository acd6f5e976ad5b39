"""How long an answer from another party may be reused, as its headers say (RFC 9111 §4.2.1:
``Cache-Control`` max-age, else ``Expires`` less ``Date``; §4.2.3: less its ``Age``), and the
bounds bastion keeps every remote document within whatever they say (`kept_seconds`).

Read for the documents bastion fetches and keeps: client ID metadata documents, key sets. The
headers are the document host's choice: a lifetime is never longer than the operator's
``cache_seconds`` nor shorter than a least time, so ``no-store`` cannot turn every request into
a fetch. Whatever cannot be read is stale (the least time), never the longer configured one.

A document read again is asked for conditionally (RFC 9111 §4.3.1: ``If-None-Match`` with its
``ETag``, ``If-Modified-Since`` with its ``Last-Modified``, RFC 9110 §13.1), so an unchanged one
costs a ``304 Not Modified``, which renews the kept answer (`KeptAnswers`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime

import httpx

# RFC 9111 §1.2.2: a delta-seconds (max-age, Age) past 2^31 is read as 2^31. A longer run of
# digits is not handed to int() at all (Python refuses past 4,300 of them, with a ValueError).
MAX_DELTA_SECONDS = 2**31
_DIGITS = len(str(MAX_DELTA_SECONDS))


def _delta_seconds(value: str) -> int | None:
    """A delta-seconds (§1.2.2; a quoted one too, §5.2), or None when ``value`` is none."""
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    if not value or not value.isascii() or not value.isdigit():
        return None
    return MAX_DELTA_SECONDS if len(value) > _DIGITS else min(int(value), MAX_DELTA_SECONDS)


def _directives(headers: httpx.Headers) -> list[tuple[str, str | None]]:
    """The ``Cache-Control`` directives of every field line, names lowercased (§5.2)."""
    found = []
    for item in headers.get_list("cache-control", split_commas=True):
        name, equals, argument = item.strip().partition("=")
        if name:
            found.append((name.strip().lower(), argument if equals else None))
    return found


def freshness_lifetime(headers: httpx.Headers | Mapping[str, str], now: float) -> float | None:
    """The seconds from ``now`` an answer with ``headers`` may be reused (0: not at all), or
    None when its headers say nothing of it. ``no-store`` and ``no-cache`` are 0 (kept the least
    time, then asked for again: conditionally, `KeptAnswers`); of several max-ages or an unreadable
    one, the shortest, an unreadable one being 0; ``s-maxage`` is for shared caches, not read;
    an ``Expires`` that is no date, or given twice, is in the past (§5.3)."""
    headers = httpx.Headers(headers)
    directives = _directives(headers)
    if any(name in ("no-store", "no-cache") for name, _ in directives):
        return 0
    ages = [_delta_seconds(arg or "") for name, arg in directives if name == "max-age"]
    if ages:
        lifetime: float = min(0 if age is None else age for age in ages)
    else:
        expires = headers.get_list("expires")
        if not expires:
            return None
        start = _date(headers.get_list("date")) or now
        end = _date(expires) if len(expires) == 1 else None
        lifetime = 0 if end is None else end - start
    age = _delta_seconds(headers.get("age", ""))
    return max(0.0, lifetime - (age or 0))


def _date(values: list[str]) -> float | None:
    """The one HTTP-date among ``values`` (§5.6.7 of RFC 9110), as a POSIX time, or None."""
    if len(values) != 1:
        return None
    try:
        date = parsedate_to_datetime(values[0])
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    # An HTTP-date is GMT; a "-0000" zone reads as none (naive), which is not local time.
    return (date if date.tzinfo else date.replace(tzinfo=UTC)).timestamp()


def kept_seconds(lifetime: float | None, least: float, most: float) -> float:
    """How long to keep a document whose headers gave ``lifetime`` (`freshness_lifetime`):
    that, but at least ``least`` and at most ``most``; ``most`` when they gave none. ``most``
    (the operator's ``cache_seconds``) wins over ``least``: 0 keeps nothing, as it always did."""
    said = most if lifetime is None else lifetime
    return min(most, max(least, said))


# RFC 9110 §8.8.3: entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE, etagc = %x21 / %x23-7E / obs-text
# (obs-text left out: sent back in a header field, only visible ASCII is). A longer one is not
# kept: nothing a document host needs, and each is sent back on every read.
_ENTITY_TAG = re.compile(r'(W/)?"[\x21\x23-\x7e]{0,256}"')


@dataclass(frozen=True)
class KeptAnswer:
    """A document's body as last answered with 200, the validators its headers gave, and the
    lifetime they gave (None: they said nothing)."""

    body: bytes
    etag: str
    last_modified: str
    lifetime: float | None


def validators(headers: httpx.Headers) -> tuple[str, str]:
    """The ``ETag`` (an entity-tag, RFC 9110 §8.8.3) and ``Last-Modified`` (an HTTP-date,
    §8.8.2) of an answer's ``headers`` that may be sent back in a conditional request; "" for
    one absent, given twice, or not of its form."""
    etags = headers.get_list("etag")
    etag = etags[0].strip() if len(etags) == 1 else ""
    if not _ENTITY_TAG.fullmatch(etag):
        etag = ""
    modified = headers.get_list("last-modified")
    last_modified = modified[0].strip() if _date(modified) is not None else ""
    return etag, last_modified


class KeptAnswers:
    """The last 200 answer of each of a few URIs that gave a validator, to ask for them again
    conditionally (RFC 9111 §4.3.1) and take a ``304 Not Modified`` as that answer renewed
    (§4.3.4: the 304's lifetime, else the kept one's). One per peer (its metadata, its key
    set), at most ``most`` URIs, the oldest making room."""

    def __init__(self, most: int = 4) -> None:
        self.most = most
        self._answers: dict[str, KeptAnswer] = {}

    def conditions(self, uri: str) -> dict[str, str]:
        """The request header fields that ask for ``uri`` only if it changed; none when no
        answer of it is kept."""
        kept = self._answers.get(uri)
        if kept is None:
            return {}
        fields = {}
        if kept.etag:
            fields["If-None-Match"] = kept.etag
        if kept.last_modified:
            fields["If-Modified-Since"] = kept.last_modified
        return fields

    def get(self, uri: str) -> KeptAnswer | None:
        return self._answers.get(uri)

    def keep(self, uri: str, answer: KeptAnswer) -> None:
        """Keep ``answer`` of ``uri`` (forget it when it gave no validator)."""
        self._answers.pop(uri, None)
        if not (answer.etag or answer.last_modified):
            return
        if len(self._answers) >= self.most:
            self._answers.pop(next(iter(self._answers)))
        self._answers[uri] = answer
