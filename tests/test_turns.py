"""Work in turns (`bastion.turns`): what it makes is what the same work without pauses makes."""

from __future__ import annotations

import json
import sys
import threading

import pytest

from bastion import turns
from bastion.turns import Turns, in_turns, loads_in_turns

DOCUMENTS = [
    '{"insert":[{"predicate":"p","args":[{"type":"T","id":"x"},1,true]}],"delete":[]}',
    ' { "insert" : [ 1 , [2, [3]] , {"a": [4]} ] ,\n "delete" : [ ] , "n" : null } ',
    '{"a":[],"b":{},"c":"[not an array]","d":[""],"a":[1]}',
    '{"insert":[1,2, 3,\n4 ,"x",{"y":[5,6]}],"delete":[]}',
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
    '{"a":[1,,2]}',
    '{"a":[1,\n]}',
    '{"a":[1,2',
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


@pytest.mark.parametrize("piece", [1, 2, 3, 5, 65536])
def test_text_split_into_lines_in_turns_is_split_as_splitlines_splits_it(piece, monkeypatch):
    """`Turns.lines` splits a piece at a time, each cut after a newline, carrying what follows a
    chunk's last newline to the next: the lines are those of ``splitlines`` of the chunks
    joined, whatever the piece's size and wherever the chunks are cut (in a ``\\r\\n``, in a
    line, into empty chunks), with every kind of line end, blank lines, a first or last line
    without one, and a pause after each line."""
    import random

    pauses: list[float] = []
    monkeypatch.setattr(turns, "TURN", 0.0)
    monkeypatch.setattr(turns.time, "sleep", pauses.append)
    monkeypatch.setattr(turns, "PIECE", piece)
    texts = [b"", b"\n", b"\r\n", b"\r", b"a", b"a\nb", b"a\r\nb\r\n", b"a\rb\r", b"\n\na\n\n\nb"]
    pick = random.Random(7)
    texts += [
        b"".join(pick.choice([b"x", b'{"a":1}', b"\n", b"\r", b"\r\n", b" "]) for _ in range(60))
        for _ in range(200)
    ]
    for text in texts:
        cuts = sorted(pick.randint(0, len(text)) for _ in range(pick.randint(0, 6)))
        for chunks in (
            [text],
            [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)],
        ):
            pauses[:] = []
            assert list(Turns().lines(chunks)) == text.splitlines(), chunks
            assert len(pauses) == len(text.splitlines())
    # Cut inside a "\r\n": one line end, not two.
    assert list(Turns().lines([b"a\r", b"\nb"])) == [b"a", b"b"]


def test_a_list_a_dict_and_a_set_are_let_go_of_a_part_at_a_time(monkeypatch):
    """`Turns.empty`: a pause after each `CHUNK` items, until nothing is left."""
    pauses: list[float] = []
    monkeypatch.setattr(turns, "TURN", 0.0)
    monkeypatch.setattr(turns.time, "sleep", pauses.append)
    monkeypatch.setattr(turns, "CHUNK", 2)
    each = [list(range(5)), dict.fromkeys(range(5)), set(range(5)), []]
    for items in each:
        Turns().empty(items)
    assert each == [[], {}, set(), []]
    assert pauses == [turns.PAUSE] * (3 + 3 + 3)


def test_the_collectors_full_passes_are_held_and_its_young_ones_go_on():
    """`full_passes_held`: while it holds, the collector walks what was made lately (its young
    passes) but never everything (a full pass); two holders at once (nested here, or on two
    threads) put the thresholds back only when the last one ends."""
    import gc

    before = gc.get_threshold()
    passes: list[int] = []

    def seen(phase: str, info: dict) -> None:
        if phase == "start":
            passes.append(info["generation"])

    gc.callbacks.append(seen)
    try:
        with turns.full_passes_held():
            held = gc.get_threshold()
            assert held[:2] == before[:2] and held[2] >= 2**31 - 1
            with turns.full_passes_held():
                kept = [[i] for i in range(200_000)]  # long-lived containers, as facts are
            assert gc.get_threshold() == held  # the outer one holds still
        assert gc.get_threshold() == before
    finally:
        gc.callbacks.remove(seen)
    assert len(kept) == 200_000
    assert 0 in passes and 2 not in passes


def test_a_pause_hands_the_gil_to_a_thread_that_waits_for_it(monkeypatch):
    """What the pauses are for: a thread that wakes (as the event loop does, for a timer or a
    socket) while work in turns holds the GIL runs at the work's next pause, not when the
    interpreter forces a switch. The switch interval is made long, so that only a pause can
    hand the GIL over; the waiting thread then runs after most pauses (38 of 40 seen here),
    and after none where the pause does not release the GIL long enough.

    On a machine busier than it has cores (the suite's three workers on two cores) the woken
    thread may wait for a core, not for the GIL, through a pause: it ran after 7 of 40 there
    once. So the 40 pauses are tried up to three times, and the best counts; pauses that did
    not hand the GIL over would leave it waiting every time (the switch interval is 10 s)."""
    monkeypatch.setattr(turns, "TURN", 0.0)
    pauses = 40

    def handed_over() -> list[bool]:
        """After which of ``pauses`` pauses the waiting thread had run."""
        woke, done = [0], threading.Event()
        after: list[bool] = []

        def work() -> None:
            clock = Turns()
            for _ in range(pauses):
                sum(range(20_000))  # a step that holds the GIL
                before = woke[0]
                clock.tick()
                after.append(woke[0] != before)
            done.set()

        worker = threading.Thread(target=work)
        worker.start()
        while not done.wait(0.0002):  # wakes every 0.2 ms, and then needs the GIL
            woke[0] += 1
        worker.join()
        return after

    interval = sys.getswitchinterval()
    sys.setswitchinterval(10.0)
    try:
        tries: list[list[bool]] = []
        while len(tries) < 3 and not any(sum(after) >= pauses // 4 for after in tries):
            tries.append(handed_over())
    finally:
        sys.setswitchinterval(interval)
    assert all(len(after) == pauses for after in tries)
    assert max(map(sum, tries)) >= pauses // 4, tries
