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


@pytest.mark.parametrize("id_", ["alice", "", "é {} : ,"])
def test_an_entity_spelled_without_escapes_is_read_back(id_):
    assert Entity.parse(repr(Entity("Agent", id_))) == Entity("Agent", id_)
