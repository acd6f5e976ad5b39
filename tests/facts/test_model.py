"""Entities as the policy and the records spell them: ``Type{"id"}``, quotes and backslashes
escaped as in a Polar string, read back by `Entity.parse`."""

from __future__ import annotations

import pytest

from bastion.facts.model import Entity, format_arg

IDS = ["alice", "", 'say "hi"', "back\\slash", '\\"', "é {} : ,", "\n\t"]


@pytest.mark.parametrize("id_", IDS)
def test_an_entity_is_spelled_with_its_id_quoted_as_a_polar_string(id_):
    quoted = '"' + id_.replace("\\", "\\\\").replace('"', '\\"') + '"'
    entity = Entity("User", id_)
    assert repr(entity) == format_arg(entity) == f"User{{{quoted}}}"
    assert format_arg(id_) == quoted


@pytest.mark.parametrize("id_", IDS)
def test_an_entity_is_read_back_as_itself_its_escapes_undone(id_):
    """What is kept as text (an approval request's target) is that entity read back, never one
    whose id holds the escapes: ``Tool{"a\\\\b"}`` was read as a tool named with two
    backslashes, and who may answer for it, its grant and its masks were another tool's."""
    assert Entity.parse(repr(Entity("Agent", id_))) == Entity("Agent", id_)


def test_a_backslash_typed_by_hand_before_another_character_is_kept():
    assert Entity.parse('Tool{"C:\\tools"}') == Entity("Tool", "C:\\tools")


@pytest.mark.parametrize(
    "value",
    [
        {"type": "User"},
        {"id": "alice"},
        {},
        {"type": "User", "id": "alice", "extra": "x"},
        {"type": "User", "id": 7},
        {"type": 7, "id": "alice"},
        {"type": "User", "id": None},
        {"type": None, "id": None},
        {"kind": "User", "id": "alice"},
        {"type": "User", "ID": "alice"},
        {"type": ["User"], "id": "alice"},
    ],
)
def test_an_entity_that_is_not_exactly_a_type_and_an_id_as_text_is_refused(value):
    """`arg_from_json` (every fact and pattern the API and the store read): an entity is an
    object of exactly ``type`` and ``id``, both strings; anything else is refused with the
    shape it must have, and the fact that holds it with it."""
    from bastion.facts.model import FactError, arg_from_json, fact_from_json

    for pattern in (False, True):
        with pytest.raises(FactError, match="an entity is"):
            arg_from_json(value, pattern=pattern)
        with pytest.raises(FactError, match="an entity is"):
            fact_from_json({"predicate": "member", "args": [value, "admin"]}, pattern=pattern)


def test_a_fact_read_from_json_is_the_fact_it_spells():
    from bastion.facts.model import arg_from_json, fact_from_json, fact_to_json

    fact = ("member", Entity("User", "a\"l'ice"), "admin", 3, True, Entity("Org", ""))
    assert fact_from_json(fact_to_json(fact)) == fact
    assert fact_from_json({"predicate": "stars", "args": [3.0]}) == ("stars", 3)
    assert arg_from_json({"id": "x", "type": "T"}) == Entity("T", "x")
    assert arg_from_json(None, pattern=True) is None
    assert [a.__class__ for a in fact_from_json(fact_to_json(fact))[1:]] == [
        Entity,
        str,
        int,
        bool,
        Entity,
    ]


def test_a_fact_with_a_key_it_does_not_have_is_refused_naming_the_key():
    """A misspelt ``expires_at`` ignored would store a grant that never expires: every key
    other than ``predicate``, ``args`` and those the caller takes is refused."""
    from bastion.facts.model import FactError, fact_from_json

    fact = {"predicate": "member", "args": ["alice"], "expires": 1.0}
    for pattern in (False, True):
        with pytest.raises(FactError, match="unknown key 'expires'"):
            fact_from_json(fact, pattern=pattern)
    with pytest.raises(FactError, match="unknown key 'expires_at'"):
        fact_from_json({"predicate": "member", "args": ["alice"], "expires_at": 1.0})
    with pytest.raises(FactError, match="unknown key 'expires'"):
        fact_from_json(fact, also=("expires_at",))
    taken = {"predicate": "member", "args": ["alice"], "expires_at": 1.0}
    assert fact_from_json(taken, also=("expires_at",)) == ("member", "alice")
