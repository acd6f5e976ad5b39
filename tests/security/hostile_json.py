"""Hostile JSON values, as the text sent, and the one place of a body each takes
(tests/security/test_hostile_sets.py, test_hostile_decisions.py): text beyond ASCII, lone
surrogates and NUL as escapes, numbers JSON allows and Python reads oddly (thousands of digits,
past 64 bits, ``1e999``), ``NaN`` and ``Infinity`` (not JSON, which Python's reader takes),
nesting past the depth limit, a member named twice, and values of every other type. A value
takes the place of one member or item of a well-formed body, or is a member of an object of its
own (a hostile name, when it is a string), or a member of the body is named twice (`twice`). The
same values go percent-encoded in a URL's path or query, or a form (`URL_VALUES`)."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from hypothesis import strategies as st

# json.dumps writes it "\u0001hostile\u0001", found nowhere else in a body.
PLACE = "\x01hostile\x01"
PLACE_TEXT = json.dumps(PLACE)
# A path's last step that adds a member to the object, rather than replacing one.
NEW_MEMBER = "\x01new member\x01"


def deep(levels: int, opening: str = "[", closing: str = "]") -> str:
    return opening * levels + closing * levels


STRINGS = [
    '"é"',
    '"日本"',
    '"\U0001f600"',
    '"\\ud83d\\ude00"',  # a surrogate pair: one character, as escapes
    '"\\ud800"',  # a lone surrogate
    '"\\udcff"',
    '"a\\udfffb"',
    '"\\u0000"',
    '"a\\u0000b"',
    '""',
    '" "',
    '"\\t"',
    '"\\u00a0"',
    '"\\u2028"',
    '"\\r\\n"',
    '"\\u007f"',
    '"\\u0001"',
    '"\\u0663\\u0664"',  # Arabic-Indic digits
    '"\\uff11"',  # a fullwidth digit one
    '"-1"',
    '"1e999"',
    '"NaN"',
    '"null"',
    '"true"',
    '"[]"',
    '"\\\\"',
    '"\'\\"<>"',
    '"../x"',
    '"User:sam"',
    '"User{\\"sam\\"}"',
    '"%ff"',
    '"' + "9" * 5000 + '"',
    '"' + "é" * 3000 + '"',
    '"' + "x" * 20_000 + '"',
]
NUMBERS = [
    "0",
    "-0",
    "-1",
    "1.5",
    "1e3",
    "1E400",
    "1e999",
    "-1e999",
    "1e-999",
    "NaN",
    "Infinity",
    "-Infinity",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775809",
    "18446744073709551616",
    "9" * 5000,
    "-" + "9" * 5000,
    "0." + "1" * 5000,
    "1e" + "9" * 5000,
]
OTHERS = [
    "true",
    "false",
    "null",
    "[]",
    "{}",
    "[null]",
    '[1, "a", {}, []]',
    '{"a": 1, "a": 2}',
    '{"\\u0000": 1}',
    '{"\\ud800": 1}',
    '{"": ""}',
    '{"type": "User", "id": "sam"}',
    '{"type": "User", "id": "sam", "type": "Admin"}',
    deep(40),
    deep(200),
    deep(40, '{"a":', "}").replace('{"a":}', '{"a":1}'),
    deep(200, '{"a":', "}").replace('{"a":}', '{"a":1}'),
    "[" + ",".join(["1"] * 20_000) + "]",
]
JSON_TEXTS = STRINGS + NUMBERS + OTHERS

# A value's JSON text: one of the above, or drawn (any text, escaped as JSON writes it, lone
# surrogates included; any integer; any float, NaN and the infinities included).
VALUES = st.one_of(
    st.sampled_from(JSON_TEXTS),
    st.sampled_from(JSON_TEXTS),
    st.text(max_size=12).map(json.dumps),
    st.integers().map(str),
    st.floats().map(json.dumps),
)


def places(node: Any, path: tuple = ()) -> list[tuple]:
    """Every place of ``node`` a value may take: each member of each object and each item of
    each array, at any depth, and a new member of each object; the paths to them."""
    found: list[tuple] = []
    if isinstance(node, dict):
        found.append((*path, NEW_MEMBER))
        for key, value in node.items():
            found.append((*path, key))
            found.extend(places(value, (*path, key)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found.append((*path, i))
            found.extend(places(value, (*path, i)))
    return found


def placed(node: Any, path: tuple, text: str) -> bytes:
    """``node`` as JSON, with ``text`` (JSON text, sent as it is) at ``path``: for a new member,
    a member named ``text`` if it is a string, else a member "x" holding it."""
    copy = json.loads(json.dumps(node))
    parent = copy
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if last == NEW_MEMBER and text.startswith('"'):
        parent[PLACE] = 1
        return json.dumps(copy).replace(PLACE_TEXT, text, 1).encode()
    parent["x" if last == NEW_MEMBER else last] = PLACE
    return json.dumps(copy).replace(PLACE_TEXT, text, 1).encode()


def twice(node: Any, path: tuple, text: str) -> bytes:
    """``node`` as JSON with the member at ``path`` (an object's) named a second time, after
    the first, holding ``text`` (JSON text, sent as it is)."""
    copy = json.loads(json.dumps(node))
    parent = copy
    for step in path[:-1]:
        parent = parent[step]
    parent[PLACE] = 1
    member = f"{json.dumps(path[-1])}: {text}"
    return json.dumps(copy).replace(f"{PLACE_TEXT}: 1", member, 1).encode()


def members(node: Any, path: tuple = ()) -> list[tuple]:
    """The paths of every member of every object of ``node``, at any depth (what `twice`
    names a second time)."""
    return [p for p in places(node, path) if isinstance(p[-1], str) and p[-1] != NEW_MEMBER]


def percent_encoded(text: str) -> str:
    """``text`` percent-encoded as UTF-8 for a URL's path or query or a form, lone surrogates
    written as UTF-8 would write them (bytes no UTF-8 reader takes)."""
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


# The strings above, and any text and any bytes, percent-encoded: a path's segment, a query's
# or a form's value (``%ff``, ``%ed%a0%80`` and the like included).
URL_VALUES = st.one_of(
    st.sampled_from([percent_encoded(json.loads(s)) for s in STRINGS]),
    st.sampled_from(["%", "%zz", "%ff", "%c3%28", "%ed%a0%80", "+", "a+b%2b", "..", "%2e%2e"]),
    st.text(max_size=12).map(percent_encoded),
    st.binary(min_size=1, max_size=12).map(lambda b: quote(b, safe="")),
    st.integers().map(str),
    st.sampled_from(NUMBERS),
)
