"""`bastion.http_caching`: how long an answer from another party says it may be reused (RFC 9111
§4.2.1: ``Cache-Control`` max-age, no-store, no-cache, then ``Expires`` less ``Date``; less its
``Age``), and the bounds bastion keeps it within whatever it says (`kept_seconds`)."""

from __future__ import annotations

from email.utils import formatdate

import httpx
import pytest

from bastion.http_caching import (
    KeptAnswer,
    KeptAnswers,
    freshness_lifetime,
    kept_seconds,
    validators,
)

NOW = 1_800_000_000.0


def lifetime(*fields: tuple[str, str]) -> float | None:
    return freshness_lifetime(httpx.Headers(list(fields)), NOW)


def http_date(at: float) -> str:
    return formatdate(at, usegmt=True)


@pytest.mark.parametrize(
    ("fields", "seconds"),
    [
        ([], None),  # says nothing: the configured time applies
        ([("Cache-Control", "public")], None),
        ([("Cache-Control", "max-age=60")], 60),
        ([("Cache-Control", "public, MAX-AGE=60, must-revalidate")], 60),
        ([("Cache-Control", 'max-age="60"')], 60),
        ([("Cache-Control", "max-age=60"), ("Age", "45")], 15),
        ([("Cache-Control", "max-age=60"), ("Age", "600")], 0),
        # s-maxage is for shared caches; bastion's is its own.
        ([("Cache-Control", "s-maxage=5, max-age=60")], 60),
        ([("Cache-Control", "no-store")], 0),
        ([("Cache-Control", "max-age=60, no-store")], 0),
        ([("Cache-Control", "no-cache")], 0),  # kept the least time, then asked for again
        ([("Cache-Control", 'no-cache="set-cookie", max-age=60')], 0),
        # Two answers at once: the shorter (RFC 9111 §4.2.1 allows taking it as stale).
        ([("Cache-Control", "max-age=600"), ("Cache-Control", "max-age=60")], 60),
        ([("Cache-Control", "max-age=600, max-age=60")], 60),
        # A value that is no number of seconds: stale, never the configured (longer) time.
        ([("Cache-Control", "max-age=soon")], 0),
        ([("Cache-Control", "max-age=-1")], 0),
        ([("Cache-Control", "max-age=")], 0),
        # Past 2^31 is 2^31 (§1.2.2); digits no int() should be asked to read.
        ([("Cache-Control", "max-age=" + "9" * 5000)], 2**31),
        ([("Expires", http_date(NOW + 90)), ("Date", http_date(NOW))], 90),
        ([("Expires", http_date(NOW + 90)), ("Date", http_date(NOW - 30))], 120),
        ([("Expires", http_date(NOW + 90))], 90),  # no Date: now
        ([("Expires", http_date(NOW - 90))], 0),
        ([("Expires", "0")], 0),  # invalid: already expired (§5.3)
        ([("Expires", http_date(NOW + 90)), ("Expires", http_date(NOW + 900))], 0),
        # max-age wins over Expires (§5.3).
        ([("Cache-Control", "max-age=60"), ("Expires", http_date(NOW + 900))], 60),
        ([("Expires", http_date(NOW + 90)), ("Age", "30")], 60),
    ],
)
def test_an_answer_says_how_long_it_may_be_reused(fields, seconds):
    assert lifetime(*fields) == seconds


@pytest.mark.parametrize(
    ("said", "kept"),
    [(None, 300), (0, 5), (3, 5), (60, 60), (300, 300), (86_400, 300)],
)
def test_what_an_answer_says_is_kept_within_the_configured_bounds(said, kept):
    assert kept_seconds(said, least=5, most=300) == kept


def test_the_configured_most_wins_over_the_least():
    """``cache_seconds`` below the least (0: nothing kept) is the operator's choice, kept."""
    assert kept_seconds(0, least=5, most=0) == 0
    assert kept_seconds(None, least=5, most=2) == 2


# -- validators sent back in a conditional request (RFC 9110 §8.8, §13.1) -----------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ([], ("", "")),
        ([("ETag", '"v1"')], ('"v1"', "")),
        ([("ETag", 'W/"v1"')], ('W/"v1"', "")),
        ([("ETag", "v1")], ("", "")),  # not quoted: no entity-tag
        ([("ETag", '"a"b"')], ("", "")),
        ([("ETag", '"' + "x" * 257 + '"')], ("", "")),  # longer than bastion sends back
        ([("ETag", '"v1"'), ("ETag", '"v2"')], ("", "")),  # which one?
        (
            [("Last-Modified", "Wed, 01 Jan 2025 00:00:00 GMT")],
            ("", "Wed, 01 Jan 2025 00:00:00 GMT"),
        ),
        ([("Last-Modified", "yesterday")], ("", "")),
    ],
)
def test_only_well_formed_validators_are_sent_back(fields, expected):
    assert validators(httpx.Headers(fields)) == expected


def test_kept_answers_ask_conditionally_and_keep_only_answers_with_a_validator():
    kept = KeptAnswers(most=2)
    kept.keep("https://a/", KeptAnswer(b"{}", "", "", 60))
    assert kept.conditions("https://a/") == {}  # no validator: nothing to ask with
    kept.keep("https://a/", KeptAnswer(b"{}", '"v1"', "Wed, 01 Jan 2025 00:00:00 GMT", 60))
    assert kept.conditions("https://a/") == {
        "If-None-Match": '"v1"',
        "If-Modified-Since": "Wed, 01 Jan 2025 00:00:00 GMT",
    }
    kept.keep("https://b/", KeptAnswer(b"{}", '"b"', "", None))
    kept.keep("https://c/", KeptAnswer(b"{}", '"c"', "", None))  # the oldest makes room
    assert kept.get("https://a/") is None and kept.conditions("https://c/")
