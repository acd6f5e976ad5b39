"""An HTTP upstream's JSON body is read exactly as ``json.loads`` reads bytes (the same value, or
the same error), though it skips the guess of the encoding for a body that opens an object."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.gateway.upstream import _json_body


def outcome(read, data: bytes):
    try:
        return "ok", read(data)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        return type(e).__name__, str(e)


texts = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
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
    assert outcome(_json_body, data) == outcome(json.loads, data)


def test_bodies_that_open_an_object_in_other_encodings():
    for data in (
        b'{\x00"\x00a\x00"\x00:\x001\x00}\x00',  # UTF-16-LE without a BOM
        b"{\x00\x00\x00}\x00\x00\x00",  # UTF-32-LE
        b'{"a":"\xed\xa0\x80"}',  # a lone surrogate, which json.loads passes
        b'{"a":"\xff"}',  # not UTF-8
        b'{"a":1} trailing',
    ):
        assert outcome(_json_body, data) == outcome(json.loads, data)
