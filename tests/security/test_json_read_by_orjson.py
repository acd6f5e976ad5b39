"""`bastion.untrusted_json.loads` reads the usual body (bytes without a ``\\u`` escape) with
orjson: every refusal and every value stays what json's reader, with its hooks, gives. Tried
with texts made to break it: members named twice (their values holding colons, objects,
more members named twice), escaped colons, NUL and surrogates, numbers of every size, nesting
near the limit, whitespace, and bytes that are not UTF-8. The reference is the same call with
the text as a str, which orjson never reads."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion import untrusted_json
from tests.test_json_encoding import number_texts, same

MODES = [
    {"bounded_numbers": b, "unique_keys": u, "max_depth": d}
    for b in (True, False)
    for u in (True, False)
    for d in (2, 64)
]


def outcome(data, options):
    try:
        return "ok", untrusted_json.loads(data, **options)
    except untrusted_json.JsonRefused as e:
        return "refused", str(e)


def as_json_reads_it(data: bytes) -> None:
    """The body as bytes (orjson, where it may) and as a str (json alone): the same outcome,
    value for value (types and float bits too), refusal for refusal (message and place)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        for options in MODES:
            kind, message = outcome(data, options)
            assert kind == "refused" and "not UTF-8" in message
        return
    for options in MODES:
        fast, reference = outcome(data, options), outcome(text, options)
        assert fast[0] == reference[0], (data, options, fast, reference)
        if fast[0] == "ok":
            assert same(fast[1], reference[1]), (data, options)
        else:
            assert fast == reference, (data, options)


# Keys from a small set, so that an object often names one twice; strings with colons (as they
# are, and escaped), quotes, NUL and surrogates (escaped), non-ASCII text.
keys = st.sampled_from(["a", "b", "a:b", ":", "é", "\\u0061", "\\u003a", 'c\\"d'])
strings = st.sampled_from(
    [
        "",
        "x",
        "a:b",
        "::",
        "\\u003a",
        "\\u003A",
        "\\\\u003a",
        "\\u0000",
        "\\ud800",
        "\\ud83d\\ude00",
        "ünï",
        '\\"',
        "\\\\",
        '{\\"k\\":1,\\"k\\":2}',
    ]
)
scalars = st.one_of(
    st.sampled_from(["true", "false", "null", "NaN", "-Infinity", "1e400", "0", "-0.0"]),
    number_texts,
    strings.map(lambda s: f'"{s}"'),
)
separators = st.sampled_from([(",", ":"), (", ", ": "), ("\n,", " :\t")])


def _object(pairs, sep):
    return "{" + sep[0].join(f'"{k}"{sep[1]}{v}' for k, v in pairs) + "}"


def _array(items, sep):
    return "[" + sep[0].join(items) + "]"


texts = st.recursive(
    scalars,
    lambda inner: (
        st.builds(_object, st.lists(st.tuples(keys, inner), max_size=4), separators)
        | st.builds(_array, st.lists(inner, max_size=4), separators)
    ),
    max_leaves=14,
)


@settings(max_examples=1500, deadline=None)
@given(text=texts, around=st.sampled_from(["", " ", "\n", "\ufeff", "x"]))
def test_a_body_is_read_and_refused_as_by_json(text, around):
    as_json_reads_it((around + text + around.strip("\ufeff")).encode("utf-8"))


@pytest.mark.parametrize(
    "body",
    [
        b'{"a":1,"a":1}',
        b'{"a":"x:y","a":"x:y"}',
        b'{"a":{"b":1},"a":{"b":1}}',
        b'{"a":{"b":1,"b":1}}',
        b'[{"k":":"},{"k":":","k":":"}]',
        b'{"a:b":1,"a:b":2}',
        b'{"\\u0061":1,"a":2}',
        b'{"a":1,"\\u003a":2,"a":3}',
        b'{"x":{"a":[1,{"c":2}],"a":null},"y":"::::"}',
    ],
)
def test_a_member_named_twice_is_refused_whatever_its_value_holds(body):
    with pytest.raises(untrusted_json.JsonRefused, match="twice"):
        untrusted_json.loads(body)
    with pytest.raises(untrusted_json.JsonRefused, match="twice"):
        untrusted_json.loads(body, bounded_numbers=False)
    as_json_reads_it(body)


@pytest.mark.parametrize(
    "body",
    [
        b'{"n":9223372036854775808}',
        b'{"n":-9223372036854775809}',
        b'{"n":18446744073709551616}',
        b'{"n":1e19}',
        b'{"n":-9.3E18}',
        b'{"n":1e400}',
        b'{"n":NaN}',
        b'{"s":"\\u0000"}',
        b'{"s":"\\ud800"}',
        b'{"s":"\xed\xa0\x80"}',
        b"\xef\xbb\xbf{}",
        b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]"
        b"]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
    ],
)
def test_what_json_refuses_or_reads_otherwise_is_refused_or_read_as_ever(body):
    as_json_reads_it(body)


@pytest.mark.parametrize("depth", [256, 513, 1000, 1020])
@pytest.mark.parametrize("unique_keys", [True, False])
def test_a_body_nested_past_pythons_stack_is_refused_under_a_limit_above_it(depth, unique_keys):
    # A limit set above what json's reader recurses to: the body as a str is refused (json's
    # RecursionError); as bytes, orjson read it (1,024 levels) and, without the colon count's
    # own limit (orjson writes 254 levels), it was taken.
    body = b"[" * depth + b"]" * depth
    options = {"max_depth": 100_000, "unique_keys": unique_keys}
    assert outcome(body, options) == outcome(body.decode(), options)


@pytest.mark.parametrize(
    "body",
    [
        b'{"a":"\x01"}',  # a control character as it is, in a string
        b'{"a":"\t"}',
        b'{"a":"\x7f"}',  # DEL, which JSON allows
        b'{"a":"\xc2\x85"}',  # NEL (C1)
        b'{"a":"\xe2\x80\xae"}',  # a right-to-left override
        b'{"a":"\x00"}',  # NUL as it is, not escaped
        b"{}\x00",
        b"\x00{}",
        b"\x0c{}",  # form feed, vertical tab, no-break space: not JSON's whitespace
        b'{"a":1}\x0b',
        b"\xc2\xa0{}",
        b"\r\n\t {} \r\n",
        b'["\\x"]',  # escapes JSON has not
        b'["\\\'"]',
        b'["\\/"]',
        b'"\xc0\xaf"',  # an overlong encoding, a code point past U+10FFFF
        b'"\xf4\x90\x80\x80"',
        b'"\xef\xbf\xbe"',  # a noncharacter: Unicode text all the same
        b"[-0]",
        b"[-0.0]",
        b"[123456789012345678]",
        b"[-123456789012345678]",
        b"[1e-400]",
        b"[4.9e-324]",
        b"[2.4703282292062327e-324]",
        b"[1.7976931348623157e308]",
        b"[1.7976931348623159e308]",
        b"[01]",
        b"[1.]",
        b"[.5]",
        b"[+1]",
        b'{"a":1,}',
        b"[1,]",
        b"[tru]",
    ],
)
def test_bytes_near_json_are_read_and_refused_as_by_json(body):
    as_json_reads_it(body)


def test_the_usual_body_is_read_by_orjson(monkeypatch):
    # json's readers taken away: the usual bodies are read all the same, and a body that needs
    # json still reaches it (so the refusals above went through the path they name).
    def unread(text):
        raise AssertionError("read by json")

    monkeypatch.setattr(untrusted_json, "_FAST", {mode: unread for mode in untrusted_json._FAST})
    body = (
        b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"search",'
        b'"arguments":{"query":"a:b","limit":10,"ratio":0.25,"tags":["x","y"]}}}'
    )
    assert untrusted_json.loads(body)["params"]["arguments"]["query"] == "a:b"
    assert untrusted_json.loads(body, bounded_numbers=False, unique_keys=True)["id"] == 7
    with pytest.raises(AssertionError, match="read by json"):
        untrusted_json.loads(b'{"a":1,"a":2}')
