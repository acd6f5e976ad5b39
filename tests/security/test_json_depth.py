"""The JSON reader's depth limit (`bastion.untrusted_json`), tried with any shape of nesting:
objects and arrays mixed, siblings of every depth, brackets inside strings. A body nested
deeper than the limit is refused, whatever its shape; one within it is read."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion import untrusted_json

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-1000, 1000), st.sampled_from(["a", "[{", "}]", '"\\]'])
)
# Keys of any text but the NUL that every route refuses (tests/security/test_nul.py), and
# Unicode text: `characters` with no codec also makes half of a surrogate pair, which the reader
# refuses too (tests/security/test_lone_surrogates.py), and this test sometimes drew.
keys = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=3)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=40,
)


def depth(value) -> int:
    """Levels of objects and arrays, counted the plain way."""
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    return 0


@settings(max_examples=150, deadline=None)
@given(value=values, limit=st.integers(1, 6))
def test_a_body_is_refused_exactly_when_it_nests_deeper_than_the_limit(value, limit):
    text = json.dumps(value)
    if depth(value) > limit:
        with pytest.raises(untrusted_json.JsonRefused, match="max_json_depth"):
            untrusted_json.loads(text, max_depth=limit)
    else:
        assert untrusted_json.loads(text, max_depth=limit) == value


@pytest.mark.parametrize("opening", ["[", '{"k": '])
def test_one_deep_branch_among_many_shallow_ones_is_found(opening):
    closing = "]" if opening == "[" else "}"
    deep = opening * 65 + "1" + closing * 65
    text = "[" + ", ".join(["[1, {}]"] * 200 + [deep] + ["[2]"] * 200) + "]"
    with pytest.raises(untrusted_json.JsonRefused, match="max_json_depth"):
        untrusted_json.loads(text, max_depth=64)
    within = opening * 62 + "1" + closing * 62
    assert untrusted_json.loads("[" + within + ", [[]]]", max_depth=64)


def test_with_unique_keys_a_name_twice_in_any_object_is_refused_and_otherwise_nothing_changes():
    # I-JSON and AuthZEN ask for it: the default, for every reader of another party's JSON.
    for text in ('{"a": 1, "a": 2}', '{"x": [{"b": 1, "c": {"d": 1, "d": 1}}]}'):
        assert isinstance(untrusted_json.loads(text, unique_keys=False), dict)
        with pytest.raises(untrusted_json.JsonRefused, match="twice"):
            untrusted_json.loads(text)
    # A refused number and a repeated name in one body: refused either way, never a crash.
    for text in ('{"n": 1e999, "a": 1, "a": 2}', '{"a": 1, "a": 2, "n": NaN}'):
        with pytest.raises(untrusted_json.JsonRefused):
            untrusted_json.loads(text, unique_keys=True)
    body = '{"a": {"b": [1, 2.5, "c"]}, "d": null}'
    assert untrusted_json.loads(body, unique_keys=True) == json.loads(body)


def test_a_refused_number_in_a_member_named_again_is_refused_without_unique_keys():
    # The later member replaces the refused number, so its place is gone: refused all the
    # same, with its reason (it was an AssertionError from the reader, found by
    # tests/security/test_json_read_by_orjson.py).
    for text, reason in (
        ('{"n": 1e999, "n": 1}', "too large"),
        ('{"a": {"n": NaN}, "a": 2}', "not a JSON number"),
    ):
        with pytest.raises(untrusted_json.JsonRefused, match=reason):
            untrusted_json.loads(text, unique_keys=False)
