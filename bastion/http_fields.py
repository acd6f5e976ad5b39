"""HTTP field (header) names and values as RFC 9110 §5 allows them: the one check for a header
bastion sends, used where a setting is read (so a bad one stops the start) and where the gateway
encodes a request's head; and the one reading of the fields bastion takes media types from
(``Content-Type``, §8.3; ``Accept``, §12.5.1).

A field name is a token (§5.1, §5.6.2). A field value (§5.5) is visible ASCII and obs-text
(the bytes 0x80-0xFF, here the characters U+0080-U+00FF that encode to them in Latin-1), with
spaces and horizontal tabs between them: no CR, LF, NUL or other control character, which
would end the header early or start another one. Leading and trailing spaces and tabs are not
part of a value (a recipient strips them); `field_value_problem` allows them, so that what the
gateway relays is checked as it is, and a setting is stripped of them where it is read.
"""

from __future__ import annotations

import functools
import re

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
# RFC 9110 §8.3.1: type "/" subtype, each a token.
_MEDIA_TYPE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+/[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# application/json, or a more specific application/<name>+json (RFC 6839 §3.1).
_JSON_MEDIA_TYPE = re.compile(r"application/(?:json|[a-z0-9!#$&^_.+-]+\+json)")
# A quoted-string (RFC 9110 §5.6.4), or one that never ends, to the end of the value. It always
# matches from a '"' (never tried again from a later one), so a value is read once: linear.
_QUOTED_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_DIGITS = frozenset("0123456789")
# Accept values at most this long are remembered with their answers (`accepts`), the last
# `_REMEMBERED` of them: a client sends the same one with every request. A longer one is read
# each time, so what is kept stays small whatever clients send.
_REMEMBERED_LENGTH = 256
_REMEMBERED = 256


def field_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be an HTTP field name, or None."""
    if _TOKEN.fullmatch(name):
        return None
    return "is not an HTTP field name (letters, digits and !#$%&'*+-.^_`|~ only, RFC 9110 §5.1)"


def field_value_problem(value: str) -> str | None:
    """Why ``value`` cannot be an HTTP field value, or None. The message does not hold the value
    (it is often a credential)."""
    if _VALUE.fullmatch(value):
        return None
    return (
        "holds a character HTTP does not allow in a header value: a line break, NUL or other"
        " control character, or one beyond Latin-1 (RFC 9110 §5.5)"
    )


def media_type(content_type: str) -> str:
    """The media type of a ``Content-Type`` value (RFC 9110 §8.3.1): its ``type/subtype``,
    lowercased (the names are case-insensitive), without the parameters after ``;`` or the
    spaces around it; ``""`` when that is no type/subtype of two tokens. Compared whole, never
    by its start: ``application/jsonp`` is not ``application/json``."""
    media = content_type.partition(";")[0].strip(" \t")
    # Checked before it is lowercased: str.lower maps some letters beyond ASCII into it.
    return media.lower() if _MEDIA_TYPE.fullmatch(media) else ""


def is_json_media(content_type: str) -> bool:
    """Whether a ``Content-Type`` names JSON: ``application/json`` or ``application/<name>+json``,
    its parameters (``charset``) aside."""
    return _JSON_MEDIA_TYPE.fullmatch(media_type(content_type)) is not None


def accepts(accept: str, media: str, anything: bool = True) -> bool:
    """`read_accept`, its answer remembered for a short ``accept`` (a client's every request
    names the same): on the gateway's path of every call."""
    if len(accept) <= _REMEMBERED_LENGTH:
        return _remembered(accept, media, anything)
    return read_accept(accept, media, anything)


def read_accept(accept: str, media: str, anything: bool = True) -> bool:
    """Whether an ``Accept`` field value (RFC 9110 §12.5.1) accepts ``media``, a lowercase
    ``type/subtype``. The value is a list of media ranges; the most specific range that covers
    ``media`` decides (``media`` itself, then ``type/*``, then ``*/*``), and accepts it when its
    weight is above 0 (``q=0`` means "not acceptable"). Names are compared in any case, and a
    range whole, never by a part (``text/event-streamx`` is not ``text/event-stream``).
    Parameters other than ``q`` do not narrow a range (bastion's answers carry none); where
    equally specific ranges disagree, the highest weight counts. A malformed element (no
    ``type/subtype``, a weight that is no qvalue) is skipped and the rest read; a quoted-string
    that never ends runs to the end of the value. An empty value accepts nothing: a caller
    passes ``""`` for a request without the field where that should mean nothing rather than
    RFC 9110's anything. ``anything=False``: ``*/*`` ranges are skipped, so only a range that
    names ``media``'s type takes it (where ``media`` is one choice of several and a client that
    names none, as most HTTP libraries' default ``*/*``, should get the other). Linear in the
    value's length."""
    if '"' in accept:
        accept = _without_quoted_strings(accept)
    kind = media.partition("/")[0] + "/*"
    best = -1  # how specific the deciding range is: 2 media, 1 type/*, 0 */*
    weight = 0  # its weight, in thousandths
    for element in accept.split(","):
        media_range, _, parameters = element.partition(";")
        media_range = media_range.strip(" \t")
        # Checked before it is lowercased: str.lower maps some letters beyond ASCII into ASCII.
        if not media_range.isascii():
            continue
        media_range = media_range.lower()
        if media_range == media:
            specific = 2
        elif media_range == kind:
            specific = 1
        elif media_range == "*/*" and anything:
            specific = 0
        else:
            continue
        if specific < best:
            continue
        q = _weight(parameters) if parameters else 1000
        if q is None:
            continue
        weight = max(weight, q) if specific == best else q
        best = specific
    return weight > 0


_remembered = functools.lru_cache(maxsize=_REMEMBERED)(read_accept)


def _weight(parameters: str) -> int | None:
    """The weight (``q``, RFC 9110 §12.4.2) among a media range's parameters, in thousandths:
    1000 when there is none, None when it is no qvalue (``0`` to ``1`` with at most three
    decimals)."""
    for parameter in parameters.split(";"):
        name, _, value = parameter.partition("=")
        if name.strip(" \t").lower() != "q":
            continue
        whole, _, fraction = value.strip(" \t").partition(".")
        if len(fraction) > 3 or not _DIGITS.issuperset(fraction):
            return None
        if whole == "0":
            return int(fraction.ljust(3, "0"))
        if whole == "1" and fraction.strip("0") == "":
            return 1000
        return None
    return 1000


def _without_quoted_strings(value: str) -> str:
    """``value`` with each quoted-string (RFC 9110 §5.6.4, in a parameter's value) emptied to
    ``""``, so that the commas and semicolons inside one split nothing."""
    return _QUOTED_STRING.sub('""', value)
