"""`bastion.json_encoding.encoder`: json's C encoder made once writes what
`json.JSONEncoder(...).encode` writes, byte for byte, raises what it raises, and stays right
after an error, when called again from ``default``, and where the C encoder is missing. And
`bastion.json_encoding.decode` reads text as `json.loads` reads it."""

from __future__ import annotations

import json
import math
from collections import namedtuple
from dataclasses import dataclass
from datetime import UTC, datetime
from json.encoder import JSONEncoder

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion import json_encoding
from bastion.json_encoding import compact, decode, decoder, encoder

CONFIGURATIONS = [
    {},
    {"separators": (",", ":")},
    {"ensure_ascii": False, "allow_nan": False, "separators": (",", ":")},
    {"sort_keys": True, "separators": (",", ":"), "default": str},
    {"check_circular": False},
    {"skipkeys": True},
    {"indent": 2},
]

keys = st.one_of(st.text(max_size=6), st.integers(-5, 5), st.floats(), st.booleans(), st.none())
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),  # NaN and the infinities included
    st.text(),  # any code point: escapes, non-ASCII, surrogates
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(keys, inner, max_size=4)
    ),
    max_leaves=30,
)


def outcome(encode, value):
    try:
        return "ok", encode(value)
    except (TypeError, ValueError) as e:
        return type(e).__name__, str(e)


@settings(max_examples=300, deadline=None)
@given(value=values)
@pytest.mark.parametrize("options", CONFIGURATIONS)
def test_the_text_is_byte_for_byte_json_encoders(options, value):
    assert outcome(encoder(**options), value) == outcome(JSONEncoder(**options).encode, value)


@pytest.mark.parametrize("options", CONFIGURATIONS)
def test_errors_are_json_encoders(options):
    encode, public = encoder(**options), JSONEncoder(**options).encode
    loop: list = []
    loop.append(loop)
    cases = [{"a": [1, {2, 3}]}, {(1, 2): 3}, [math.nan], {"x": object()}]
    if options.get("check_circular", True):
        cases.append(loop)
    for value in cases:
        expected = outcome(public, value)
        assert outcome(encode, value)[0] == expected[0]


def test_an_error_leaves_nothing_behind():
    """A failed call leaves the ids of the containers it was in; the same dict, fixed, is
    encoded again (without the markers cleared: 'Circular reference detected')."""
    encode = encoder(separators=(",", ":"))
    inner = {"b": object()}
    value = {"a": inner}
    with pytest.raises(TypeError):
        encode(value)
    inner["b"] = 1
    assert encode(value) == '{"a":{"b":1}}'


def test_after_an_error_the_made_encoder_is_used_again(monkeypatch):
    """Not the one-off encoder for ever after (which a left-over marker would cause)."""
    encode = encoder(separators=(",", ":"))
    with pytest.raises(TypeError):
        encode({"a": [object()]})
    one_offs = []
    real = JSONEncoder.encode
    monkeypatch.setattr(JSONEncoder, "encode", lambda self, o: one_offs.append(o) or real(self, o))
    assert encode({"a": [1]}) == '{"a":[1]}'
    assert one_offs == []


class Node:
    """Encoded by ``default`` with the same encoder, by encoding its parent list again."""

    def __init__(self) -> None:
        self.parent: list = []
        self.busy = False


def test_an_encoder_called_again_from_default_encodes_as_json_does():
    """Inside ``default`` the made encoder is in use (it marks the list it is in): the inner
    call must not see the outer call's markers, as JSONEncoder's own calls never do (with them:
    'Circular reference detected')."""

    def default(o):
        if not isinstance(o, Node):
            raise TypeError("no")
        if o.busy:
            return "again"
        o.busy = True
        try:
            return encode_now(o.parent)
        finally:
            o.busy = False

    node = Node()
    node.parent.append(node)
    expected = json.JSONEncoder(default=default).encode
    encode_now = expected
    want = expected(node.parent)
    made = encoder(default=default)
    encode_now = made
    assert made(node.parent) == want == '["[\\"again\\"]"]'


def test_without_the_c_encoder_the_public_one(monkeypatch):
    monkeypatch.setattr(json_encoding, "c_make_encoder", None)
    encode = encoder(separators=(",", ":"))
    assert encode({"a": [1, 2.5, None]}) == '{"a":[1,2.5,null]}'
    assert encode.__self__.__class__ is JSONEncoder  # the public encoder's own method


def _read(read, text: str):
    try:
        return "ok", read(text)
    except (ValueError, RecursionError) as e:
        return type(e).__name__, str(e)


json_texts = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=10,
).map(json.dumps)
around = st.sampled_from(["", " ", "\n\t ", "x", "1", "]", "{}", "\u00a0", "\ufeff"])


@settings(max_examples=400, deadline=None)
@given(before=around, text=json_texts | st.text(max_size=10), after=around)
def test_decode_reads_text_as_json_loads_does(before, text, after):
    # The same value, or the same error with the same message: whitespace or anything else
    # around the value, no value, a second value, text that is not JSON.
    whole = before + text + after
    assert _read(decode, whole) == _read(json.loads, whole)
    if _read(json.loads, whole)[0] == "ok":  # read by orjson or not, the same types and bits
        assert same(decode(whole), json.loads(whole))


def test_decode_refuses_what_json_loads_refuses():
    for text in ("", " ", "[1,", '{"a":1}}', "\ufeff{}", "[" * 100_000, "NaNx", '"\\ud800"x'):
        answer = _read(decode, text)
        assert answer[0] != "ok" and answer == _read(json.loads, text), text


@settings(max_examples=200, deadline=None)
@given(before=around, text=json_texts | st.text(max_size=10), after=around)
def test_a_decoder_with_hooks_reads_as_its_own_decode(before, text, after):
    from decimal import Decimal
    from json.decoder import JSONDecoder

    public = JSONDecoder(parse_float=Decimal, parse_int=str, parse_constant=repr)
    whole = before + text + after
    assert _read(decoder(public), whole) == _read(public.decode, whole)


@settings(max_examples=300, deadline=None)
@given(
    tuples=st.lists(
        st.lists(
            st.one_of(st.none(), st.text(max_size=6), st.lists(st.text(max_size=3), max_size=2)),
            max_size=3,
        ).map(tuple),
        max_size=8,
    )
)
def test_a_kept_text_is_the_text_of_the_values_asked(tuples):
    """`kept` gives each tuple its own text, however many were kept before it, or let go of."""
    encode = encoder(separators=(",", ":"))
    kept = json_encoding.kept(encode, size=3)
    for values in tuples + tuples:
        assert kept(values) == encode(values)


# `compact`'s configurations: with the options json is given alike.
COMPACT = [{}, {"sort_keys": True, "default": str}, {"default": repr}]
# Floats of every size, those Python writes with an exponent (below 1e-4, from 1e16) among them.
floats = st.one_of(
    st.floats(),
    st.builds(lambda m, e: m * 10.0**e, st.floats(-10, 10), st.integers(-12, 20)),
)
compact_scalars = st.one_of(scalars, floats, st.integers(-(2**65), 2**65))
compact_values = st.recursive(
    compact_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(keys, inner, max_size=4)
        | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=30,
)


def json_bytes(options):
    public = JSONEncoder(separators=(",", ":"), **options).encode
    return lambda value: public(value).encode()


@settings(max_examples=500, deadline=None)
@given(value=compact_values)
@pytest.mark.parametrize("options", COMPACT)
def test_compact_writes_json_encoders_text_byte_for_byte(options, value):
    assert outcome(compact(**options), value) == outcome(json_bytes(options), value)


Point = namedtuple("Point", "x y")


class Amount(float):
    def __str__(self) -> str:
        return "an amount"


@dataclass
class Made:
    name: str


# Values orjson writes otherwise than json, or refuses: each written by json, as json writes it.
NOT_LIKE_JSON = [
    {"name": "Jos\u00e9"},
    ["\u2028"],
    {"del": "\x7f"},
    {"small": 1e-05},
    {"smaller": 1.5e-09},
    {"nan": math.nan},
    [math.inf, -math.inf],
    {"big": 2**64},
    ["\ud800"],
    {1: "a key that is a number"},
    Point(1, 2),
    {"amount": Amount(1.5)},
]
# Values orjson writes as json does: not written by json.
LIKE_JSON = [
    {"b": [1, 2.5, -0.0, 1e16, 0.0001, True, False], "a": {"c": 'text " \\ \n \x01'}},
    [1796648035.7695863, 2**63 - 1, -(2**63), (1, "two")],
    {"id": "4e24a99f0e15", "note": "one-time re-run", "at": "10.000", "n": "nullable"[1:]},
    "plain",
    {"when": datetime(2026, 12, 7, tzinfo=UTC), "made": Made("x")},  # through ``default``
]


@pytest.mark.parametrize("options", COMPACT)
@pytest.mark.parametrize("value", NOT_LIKE_JSON + LIKE_JSON)
def test_compact_writes_json_encoders_text_for_what_orjson_writes_otherwise(options, value):
    assert outcome(compact(**options), value) == outcome(json_bytes(options), value)


def test_compact_uses_json_only_where_orjson_would_write_another_text(monkeypatch):
    """Each value orjson would write otherwise goes to json's encoder; the others never do."""
    asked = []

    def noted(**options):
        made = encoder(**options)

        def encode(value):
            asked.append(value)
            return made(value)

        return encode

    monkeypatch.setattr(json_encoding, "encoder", noted)
    encode = compact(sort_keys=True, default=str)
    for value in LIKE_JSON:
        encode(value)
    assert asked == []
    for value in NOT_LIKE_JSON:
        encode(value)
    assert asked == NOT_LIKE_JSON


def test_compact_refuses_what_json_refuses():
    loop: list = []
    loop.append(loop)
    deep: list = []
    for _ in range(300):
        deep = [deep]
    for options in COMPACT:
        for value in [loop, {"x": object()}, {"a": {1, 2}}, deep]:
            assert outcome(compact(**options), value) == outcome(json_bytes(options), value)


# `read`: json's value, by orjson where orjson reads the same.


def same(a, b) -> bool:
    """Whether two decoded values are the same: types at every depth (``1`` is not ``1.0``
    nor ``True``), floats bit for bit (``-0.0`` is not ``0.0``), members in the same order."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a.hex() == b.hex()
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(map(same, a, b))
    return a == b


def read_as_json(data: bytes) -> None:
    """`read` gives json's value, or leaves ``data`` to json (which may read it or refuse it)."""
    value = json_encoding.read(data)
    if value is not json_encoding.NOT_READ:
        assert same(value, json.loads(data)), data
    bounded = json_encoding.read(data, exponents=False)
    assert bounded is json_encoding.NOT_READ or same(bounded, value), data


digits = st.text("0123456789", min_size=1, max_size=26)
# Numbers as text: any count of digits, a fraction, an exponent of any size (past a float's
# range either way, halfway cases, subnormals), as a client or an upstream writes them.
number_texts = st.builds(
    lambda sign, whole, fraction, exponent: sign + whole + fraction + exponent,
    st.sampled_from(["", "-"]),
    digits.map(lambda d: d.lstrip("0") or "0"),
    st.sampled_from([""]) | digits.map(lambda d: "." + d),
    st.sampled_from([""])
    | st.builds(
        lambda e, sign, n: f"{e}{sign}{n}",
        st.sampled_from("eE"),
        st.sampled_from(["", "+", "-"]),
        st.integers(0, 400),
    ),
)
HARD_NUMBERS = [
    "2.4703282292062328e-324",  # just above half the smallest subnormal
    "2.4703282292062327e-324",  # just below: 0.0
    "4.9e-324",
    "2.2250738585072011e-308",
    "2.2250738585072012e-308",
    "1.7976931348623157e308",
    "1.7976931348623158e308",  # rounds to the largest float
    "1.7976931348623159e308",  # past it: infinity for json, refused by orjson
    "9007199254740993.0",  # halfway between two floats: to the even one
    "9007199254740993",
    "0.1",
    "1e23",
    "-0",
    "-0.0",
    "-1e-400",
    "9223372036854775807",
    "9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",  # past 64 bits: orjson reads a float
    "-9223372036854775809",
    "123456789012345678901234567890",
]


@pytest.mark.parametrize("number", HARD_NUMBERS)
def test_read_gives_jsons_number_or_leaves_it_to_json(number):
    for text in (number, f"[{number}]", f'{{"n":{number}}}'):
        read_as_json(text.encode())


@settings(max_examples=1500, deadline=None)
@given(number=number_texts)
def test_read_gives_jsons_float_bit_for_bit(number):
    read_as_json(number.encode())
    read_as_json(f'{{"a":[{number},1]}}'.encode())


readable_values = st.recursive(
    st.none() | st.booleans() | st.integers() | floats | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=25,
)
WRITINGS = [
    json.dumps,
    lambda v: json.dumps(v, separators=(",", ":")),
    lambda v: json.dumps(v, ensure_ascii=False, indent=1),
]


@settings(max_examples=500, deadline=None)
@given(value=readable_values, writing=st.sampled_from(WRITINGS))
def test_read_gives_json_loads_value(value, writing):
    # ``surrogatepass``: half of a surrogate pair written as it is (no UTF-8), which json reads.
    read_as_json(writing(value).encode("utf-8", "surrogatepass"))


# Text that is JSON, or nearly, or not at all: members named twice, escapes, constants,
# whitespace of every kind, a byte order mark, and bytes that are not UTF-8.
json_alphabet = st.sampled_from(
    list('{}[]",:0123456789.eE+-')
    + ["true", "false", "null", "NaN", "Infinity", '"a"']
    + [" ", "\t", "\n", "\r", "\x0c", "\x00", "\\u0041", "\\ud800", "\\u0000", "\xa0", "\ufeff"]
)


@settings(max_examples=1500, deadline=None)
@given(
    text=st.lists(json_alphabet, max_size=24).map("".join),
    tail=st.sampled_from([b"", b"\xff", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80"]),
)
def test_read_never_takes_what_json_refuses_nor_reads_it_otherwise(text, tail):
    data = text.encode("utf-8", "surrogatepass") + tail
    value = json_encoding.read(data)
    try:
        expected = json.loads(data)
    except (ValueError, RecursionError):
        assert value is json_encoding.NOT_READ, data
        return
    assert value is json_encoding.NOT_READ or same(value, expected), data


@pytest.mark.parametrize("depth", [json_encoding.DEEPEST + 1, 1000, 1024])
def test_read_leaves_to_json_what_nests_deeper_than_python_surely_reads(depth):
    # orjson reads 1,024 levels; json.loads recurses once per level and refuses (RecursionError)
    # wherever Python's stack ends, 1,000 frames less the caller's: from ~950 levels in the
    # gateway. Read by orjson, such an answer then failed where it was written (a 500).
    for text in (b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth):
        assert json_encoding.read(text) is json_encoding.NOT_READ


@pytest.mark.parametrize("depth", [2, 254, 255, json_encoding.DEEPEST])
def test_read_reads_what_nests_within_its_levels_however_many_brackets_it_holds(depth):
    # More brackets than levels, side by side: orjson's, whether it writes the value (254
    # levels at most) or not (walked).
    deep = b"[" * (depth - 1) + b"]" * (depth - 1)
    wide = b"[" + deep + b"," + b",".join([b"[]", b"{}"] * 300) + b"]"
    assert json_encoding.read(wide) == json.loads(wide)
    assert json_encoding.read(wide, levels=depth) == json.loads(wide)
    assert json_encoding.read(wide, levels=depth - 1) is json_encoding.NOT_READ


def test_read_reads_the_gateways_messages_itself():
    # What the SDK and the benchmark send and answer: never left to json.
    for message in (
        b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"search",'
        b'"arguments":{"query":"a","limit":10,"ratio":0.25}}}',
        json.dumps(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "result": {
                    "content": [
                        {
                            "type": "text",
                            "text": json.dumps(
                                {"customers": [{"name": "Ada", "since": 1815}]}, indent=2
                            ),
                        }
                    ]
                },
            }
        ).encode(),
        '{"name": "Zoë", "n": -12.5e-3}'.encode(),
    ):
        assert same(json_encoding.read(message), json.loads(message))
    assert json_encoding.read(b"[1e5]", exponents=False) is json_encoding.NOT_READ
