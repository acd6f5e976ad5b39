"""An upstream's message (an HTTP body, an event, a stdio line) is read exactly as ``json.loads``
reads bytes (the same value, or the same error), though it skips the guess of the encoding for a
body that opens an object; but strictly: ``NaN``, ``Infinity`` and a number past a float's range
are not JSON (RFC 8259 §6), and are refused, never written on to a client."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.gateway.upstream import (
    MAX_MESSAGE_DEPTH,
    _finite,
    _large_message,
    _message,
    _not_json,
)


def outcome(read, data: bytes):
    try:
        return "ok", read(data)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        return type(e).__name__, str(e)


texts = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text() | st.floats(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
).map(json.dumps)


@settings(max_examples=300, deadline=None)
@given(
    data=st.one_of(
        texts.map(str.encode),
        texts.map(lambda t: t.encode("utf-16")),
        texts.map(lambda t: t.encode("utf-32-le")),
        st.binary(max_size=12).map(lambda b: b"{" + b),
        st.binary(max_size=12),
    )
)
def test_a_body_reads_as_json_loads_reads_it(data):
    assert outcome(_message, data) == outcome(strict, data)
    try:  # an event's text, or a body's
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return
    assert outcome(_message, text) == outcome(strict, text)


def strict(data):
    """``json.loads`` refusing what is not JSON's numbers, as `_message` does."""
    return json.loads(data, parse_constant=_not_json, parse_float=_finite)


def test_numbers_json_has_not_are_refused_wherever_they_stand():
    for data in (b'{"n": NaN}', b'{"n": -Infinity}', b'{"n": 1e999}', b"[Infinity]", "[-1e400]"):
        kind, message = outcome(_message, data)
        assert kind == "ValueError" and "a message holds" in message, (data, message)
    # What a float holds, however written, is read as json.loads reads it.
    assert _message(b'{"n": 1e308, "m": -2.5e-320, "k": 1E3}') == {
        "n": 1e308,
        "m": -2.5e-320,
        "k": 1000.0,
    }


def test_bodies_that_open_an_object_in_other_encodings():
    for data in (
        b'{\x00"\x00a\x00"\x00:\x001\x00}\x00',  # UTF-16-LE without a BOM
        b"{\x00\x00\x00}\x00\x00\x00",  # UTF-32-LE
        b'{"a":"\xed\xa0\x80"}',  # a lone surrogate, which json.loads passes
        b'{"a":"\xff"}',  # not UTF-8
        b'{"a":1} trailing',
    ):
        assert outcome(_message, data) == outcome(json.loads, data)


@pytest.mark.parametrize("depth", [MAX_MESSAGE_DEPTH + 1, 700])
@pytest.mark.parametrize("form", ["object", "array", "event", "long integer"])
def test_a_message_nested_past_the_bound_is_refused_by_either_reader(depth, form):
    """json's reader takes ~950 levels from a shallow stack, and the gateway's writer, deeper,
    could not write them back (a 500): past `MAX_MESSAGE_DEPTH`, a message is not read, by
    whichever path (orjson, json for a body that is not an object or holds an integer past 64
    bits, an event's text, a large message's reader); at the bound, it is."""

    def nested(levels: int) -> bytes:
        inner = b"[" * (levels - 1) + b"]" * (levels - 1)
        if form == "array":
            return b"[" + inner + b"]"
        extra = b', "n": 12345678901234567890123' if form == "long integer" else b""
        return b'{"a": ' + inner + extra + b"}"

    deep, shallow = nested(depth), nested(MAX_MESSAGE_DEPTH)
    for data in (deep, shallow) if form != "event" else (deep.decode(), shallow.decode()):
        for read in (_message, _large_message):
            kind, message = outcome(read, data)
            if data in (deep, deep.decode()):
                assert kind == "ValueError" and "nested deeper than 512" in message, read
            else:
                assert kind == "ok", (read, message)
