"""An upstream's message (an HTTP body, an event, a stdio line) is read exactly as ``json.loads``
reads bytes (the same value, or the same error), though it skips the guess of the encoding for a
body that opens an object; but strictly: ``NaN``, ``Infinity`` and a number past a float's range
are not JSON (RFC 8259 §6), and are refused, never written on to a client."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.gateway.upstream import _finite, _message, _not_json


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
