"""JSON encoders made once per configuration: `json.JSONEncoder.encode` without its per-call
Python, and `compact`, the same text by orjson where it writes the same; and decoders (`decode`:
`json.loads` of a text) without the two around json's scanner, and `read`, json's value by
orjson where orjson reads the same.

`json.JSONEncoder.encode` runs two Python methods and builds json's C encoder again on every call;
on the gateway's path, which encodes a few messages per call, that was more Python than the
encoding. `encoder` builds the C encoder once and calls it directly: the same text, byte for byte,
and the same errors (TypeError, ValueError for a circular reference or a NaN refused).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from json.decoder import JSONDecoder
from json.encoder import (
    JSONEncoder,
    c_make_encoder,
    encode_basestring,
    encode_basestring_ascii,
)
from typing import Any

import orjson


def encoder(**options: Any) -> Callable[[Any], str]:
    """``json.JSONEncoder(**options).encode``, as fast as json's C encoder allows. Each encoder
    made here is for one thread: its C encoder keeps one set of markers (a call that finds them
    in use, re-entered from ``default``, takes a one-off encoder)."""
    public = JSONEncoder(**options)
    # c_make_encoder is json's private C accelerator (CPython has it): None where it is missing,
    # and it does not indent; then the public encoder, which makes the same choice per call.
    if c_make_encoder is None or public.indent is not None:
        return public.encode
    # The C encoder keeps the containers it is inside of in ``markers`` (check_circular), as
    # JSONEncoder does with a new dict per call; an error leaves them there.
    markers: dict[int, Any] | None = {} if public.check_circular else None
    encode_c = c_make_encoder(
        markers,
        public.default,
        encode_basestring_ascii if public.ensure_ascii else encode_basestring,
        None,
        public.key_separator,
        public.item_separator,
        public.sort_keys,
        public.skipkeys,
        public.allow_nan,
    )
    join = "".join

    if markers is None:

        def encode_unchecked(value: Any) -> str:
            return join(encode_c(value, 0))

        return encode_unchecked

    def encode(value: Any) -> str:
        if markers:
            # The C encoder is in use (called again from ``default``, or by another thread while
            # this one is in ``default``): its markers are not this call's. A one-off encoder.
            return public.encode(value)
        try:
            return join(encode_c(value, 0))
        except BaseException:
            # What the failed call left would make every later call take the one-off encoder.
            markers.clear()
            raise

    return encode


# What json writes only through ``default`` (or refuses without one) orjson hands to ``default``
# too, rather than writing it its own way: a datetime, a dataclass.
_HANDED_ON = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
# What json writes as such, subclasses included, and orjson hands to ``default`` where it is a
# subclass of one (a float whose str is its own, a named tuple).
_JSON_WRITES = (str, int, float, list, tuple, dict)
# A float orjson writes otherwise than Python's repr, which json writes: a negative exponent of
# one digit (``1e-9`` for ``1e-09``), or in full from 1e-5 (``0.00001`` for ``1e-05``).
_SHORT_EXPONENT = re.compile(rb"\de-\d")


class _NotLikeJson(TypeError):
    """orjson would write this value otherwise than json (raised from its ``default``)."""


def compact(
    *, sort_keys: bool = False, default: Callable[[Any], Any] | None = None
) -> Callable[[Any], bytes]:
    """``encoder(separators=(",", ":"), sort_keys=sort_keys, default=default)``'s text in
    bytes, the same byte for byte, written by orjson where it writes that text: a few times
    quicker than json's C encoder on the gateway's messages and records (docs/benchmarks.md).

    orjson writes some values otherwise: text other than ASCII as itself where json writes
    ``\\u`` escapes (DEL too), some small floats (``1e-9``, ``0.00001``), NaN and the
    infinities as ``null``; it refuses an integer past 64 bits, a lone surrogate, a key that is
    not text, nesting past 255 levels and a circular reference; it hands a subclass of float or
    tuple to ``default``. Any of those in a value, and its text (ASCII, without DEL, ``e-``
    after a digit, ``0.0000`` or ``null``) is written by json instead, as it always was (or
    refused with json's error): a few strings cost both encoders, never another text. One
    difference is left: an `enum.Enum` that is neither a str nor an int is its value here, not
    what ``default`` makes of it (bastion has none)."""
    slow = encoder(separators=(",", ":"), sort_keys=sort_keys, default=default)
    option = _HANDED_ON | (orjson.OPT_SORT_KEYS if sort_keys else 0)
    dumps, search = orjson.dumps, _SHORT_EXPONENT.search

    def handed(value: Any) -> Any:
        if default is None or isinstance(value, _JSON_WRITES):
            raise _NotLikeJson
        return default(value)

    def encode(value: Any) -> bytes:
        try:
            text = dumps(value, handed, option)
        except orjson.JSONEncodeError:
            return slow(value).encode()
        # ``find``, not ``in``: ``bytes in bytes`` first tries its operand as an integer and
        # raises (and formats) a TypeError it then clears, a few thousand instructions each.
        if (
            not text.isascii()
            or text.find(b"\x7f") != -1
            or text.find(b"null") != -1
            or text.find(b"0.0000") != -1
            or (text.find(b"e-") != -1 and search(text))
        ):
            return slow(value).encode()
        return text

    return encode


def kept(encode: Callable[[Any], str], size: int = 256) -> Callable[[tuple], str]:
    """``encode`` of a tuple of values that comes again and again (what the decision records of
    one answer share: its principals, target, rules...), encoded once and kept by the values:
    at most ``size`` texts, all let go of when full. Only for values whose equality means the
    same text: text, tuples of text, None (a list among them is encoded each time). Not
    numbers (``1``, ``1.0`` and ``True`` are equal and read differently): a caller that keeps
    one puts its type in the tuple too."""
    texts: dict[tuple, str] = {}

    def encoded(values: tuple) -> str:
        try:
            text = texts.get(values)
        except TypeError:  # a list among them (unhashable): encoded, not kept
            return encode(values)
        if text is None:
            if len(texts) >= size:
                texts.clear()
            text = texts[values] = encode(values)
        return text

    return encoded


def decoder(public: JSONDecoder, slow: Callable[[str], Any] | None = None) -> Callable[[str], Any]:
    """``public.decode``, or ``slow`` if given, for a str: the same value, or the same error.
    Text that is one JSON value and nothing else (what encoders write) is read by the
    decoder's scanner straight away, without `json.JSONDecoder.decode`'s two Python methods
    around it; anything else (whitespace around it, a second value, no value) takes ``slow``,
    for its answer and its error message."""
    scan_once, slow = public.scan_once, slow or public.decode

    def decode(text: str) -> Any:
        try:
            value, end = scan_once(text, 0)
        except StopIteration:
            return slow(text)
        if end != len(text):
            return slow(text)
        return value

    return decode


# Each digit as "0", "e" and "E" as "e", "[" and "{" as "[", any other byte as " ": what a
# number may be is then a `bytes.find` or two in the text so translated, instead of a walk of the
# value read, and how many objects and arrays it opens one `bytes.count`.
_SHAPES = bytes(
    48 if 48 <= b <= 57 else 101 if b in b"eE" else 91 if b in b"[{" else 32 for b in range(256)
)
# 19 digits in a row: perhaps an integer past 64 bits, which orjson reads as a float.
_LONG_RUN = b"0" * 19
# `read`'s answer where orjson might read the text otherwise than json, or not at all.
NOT_READ = object()
# The deepest nesting `read` takes from orjson, which reads 1,024 levels: json's reader recurses
# once per level and refuses (RecursionError) where Python's stack ends, 1,000 frames less the
# caller's; this leaves the caller half of them.
DEEPEST = 512


def read(data: bytes, *, exponents: bool = True, levels: int = DEEPEST) -> Any:
    """The value ``json.loads(data)`` gives, read by orjson (several times quicker than json's
    scanner), or `NOT_READ` where orjson might read it otherwise: the caller then reads it with
    json, for json's value or json's error.

    orjson refuses what json takes that is not JSON or not text (``NaN``, ``Infinity``, a number
    past a float's range, which json reads as an infinity, half of a surrogate pair, a byte
    order mark, bytes that are not UTF-8, which json may read in another encoding, nesting
    past 1,024 levels), and reads an integer past 64 bits as a float, where json reads an
    integer: text with 19 digits in a row is `NOT_READ`. Anything else it reads to the same
    value, float for float (tests/test_json_encoding.py). Without ``exponents``, a digit
    followed by an exponent (a float perhaps past a bound the caller checks) is `NOT_READ`
    too; so may be text that merely holds such characters in a string. A value nested deeper
    than ``levels`` (at most `DEEPEST`), which json may refuse where orjson reads it, is
    `NOT_READ` too."""
    shape = data.translate(_SHAPES)
    if shape.find(_LONG_RUN) != -1 or (not exponents and shape.find(b"0e") != -1):
        return NOT_READ
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return NOT_READ
    # Fewer brackets than the levels cannot nest deeper: most texts skip the check.
    if levels > DEEPEST:  # not min(): a call on every message
        levels = DEEPEST
    if shape.count(b"[") > levels and not _nests_within_quickly(value, levels):
        return NOT_READ
    return value


# orjson writes what nests 254 levels at most (it refuses a deeper value).
_ORJSON_WRITES = 254


def _nests_within_quickly(value: Any, levels: int) -> bool:
    """`nests_within`, for a value orjson read: where ``levels`` is as deep as orjson writes,
    or deeper, a value orjson writes nests within them (its text is written in C, a few times
    quicker than the walk); one it refuses to write is walked."""
    if levels >= _ORJSON_WRITES:
        try:
            orjson.dumps(value)
        except orjson.JSONEncodeError:
            pass
        else:
            return True
    return nests_within(value, levels)


def nests_within(value: Any, levels: int) -> bool:
    """Whether ``value``, decoded JSON, nests at most ``levels`` levels of objects and arrays.

    Depth only, no path: several times faster than a walk that keeps each item's place, which a
    batch of a hundred checks would otherwise spend a tenth of its time in. One level at a
    time, with no call per object or array (twice as fast again as a recursion).
    """
    level = [value] if value.__class__ is dict or value.__class__ is list else []
    while level:
        if levels <= 0:
            return False
        levels -= 1
        below = []
        for container in level:
            for item in container.values() if container.__class__ is dict else container:
                if item.__class__ is dict or item.__class__ is list:
                    below.append(item)
        level = below
    return True


# ``json.loads(text)`` for a str (json.loads also names a byte order mark in its error).
_decode = decoder(JSONDecoder(), json.loads)


def decode(text: str) -> Any:
    """``json.loads(text)`` for a str: the same value, or the same error; read by orjson where
    it reads the same (`read`)."""
    try:
        value = read(text.encode())
    except UnicodeEncodeError:  # half of a surrogate pair, which json keeps
        return _decode(text)
    return _decode(text) if value is NOT_READ else value
