"""Work in turns (`bastion.turns`): what it makes is what the same work without pauses makes."""

from __future__ import annotations

import json

import pytest

from bastion import turns
from bastion.turns import Turns, in_turns, loads_in_turns

DOCUMENTS = [
    '{"insert":[{"predicate":"p","args":[{"type":"T","id":"x"},1,true]}],"delete":[]}',
    ' { "insert" : [ 1 , [2, [3]] , {"a": [4]} ] ,\n "delete" : [ ] , "n" : null } ',
    '{"a":[],"b":{},"c":"[not an array]","d":[""],"a":[1]}',
    "{}",
    " {\t} ",
    '{"é\\u2028":["\\ud800", 1.5e300, -0.0]}',
    "[1, 2, 3]",
    '"text"',
    "7",
]
MALFORMED = [
    "",
    "{",
    '{"a":[1,]}',
    '{"a":[1 2]}',
    '{"a":[1}',
    '{"a" [1]}',
    '{"a":1,}',
    '{"a":1 "b":2}',
    "{1:2}",
    '{"a":[1]} x',
    '{"a":[1]}}',
    '{"a":[',
    "[1,]",
]


@pytest.mark.parametrize("text", DOCUMENTS)
def test_a_document_decoded_in_turns_is_the_one_json_loads_makes(text, monkeypatch):
    pauses: list[float] = []
    monkeypatch.setattr(turns, "TURN", 0.0)
    monkeypatch.setattr(turns.time, "sleep", pauses.append)
    assert loads_in_turns(text, Turns()) == json.loads(text)
    if text.lstrip().startswith("{") and "[1" in text:
        assert pauses  # a pause after each element of an array


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_text_is_refused_in_turns_as_json_loads_refuses_it(text):
    with pytest.raises(ValueError):
        json.loads(text)
    with pytest.raises(ValueError):
        loads_in_turns(text, Turns())


def test_the_items_made_in_turns_are_those_made_at_once(monkeypatch):
    pauses: list[float] = []
    monkeypatch.setattr(turns, "TURN", 0.0)
    monkeypatch.setattr(turns.time, "sleep", pauses.append)
    assert in_turns(str, range(5)) == ["0", "1", "2", "3", "4"]
    assert list(Turns().each("abc")) == ["a", "b", "c"]
    monkeypatch.setattr(turns, "CHUNK", 2)
    assert list(Turns().chunks(range(5))) == [[0, 1], [2, 3], [4]]
    assert [(start, list(part)) for start, part in Turns().slices(list(range(5)))] == [
        (0, [0, 1]),
        (2, [2, 3]),
        (4, [4]),
    ]
    assert pauses == [turns.PAUSE] * (5 + 3 + 3 + 3)
