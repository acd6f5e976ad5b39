"""A name someone else chose (a user or agent id, a client's name, a tool, a target) is shown to
people by one function, `bastion.names.readable`, on pages, in chat text and on a terminal: what
does not show as itself is shown escaped, never dropped, so two different names never read the
same (unless both are cut, which the mark says), and a long name cannot push the rest away."""

from __future__ import annotations

import itertools

import pytest

from bastion.names import SHOWN_CHARS, check_name, readable, visible

# Each reads as "Trusted Bot" or "mallory.exe" where shown as it is.
HIDDEN = [
    "mallory\u202egnp.exe",  # right-to-left override: reads "mallory" + "exe.png"
    "Trusted Bot\u200b",  # zero-width space
    "Trusted\u200cBot",  # zero-width non-joiner
    "Trusted\u200dBot",  # zero-width joiner
    "Trusted\u2060Bot",  # word joiner
    "\ufeffTrusted Bot",  # byte order mark
    "Trusted\u2066Bot\u2069",  # isolates
    "Trusted\u061cBot",  # Arabic letter mark
    "Trusted\u00adBot",  # soft hyphen
    "Trusted Bot\U000e0041",  # a tag character (invisible ASCII)
    "Trusted Bot\u3164",  # Hangul filler: a letter to Unicode, printable to Python, blank
    "Trusted Bot\u115f",
    "Trusted Bot\uffa0",
    "Trusted\u034fBot",  # combining grapheme joiner
    "Trusted Bot\ufe0f",  # a variation selector
    "Trusted Bot\U000e0100",
    "Trusted Bot\u180b",
    "Trusted Bot\u2800",  # Braille blank
    "Trusted\u00a0Bot",  # no-break space
    "Trusted\u3000Bot",
    "Trusted Bot\n",
    "Trusted\tBot",
    "Trusted Bot\x1b[2K",  # a terminal's erase-line
    "Trusted Bot\ud800",  # half of a surrogate pair (JSON can carry one)
    "Trusted Bot ",
    " Trusted Bot",
    "Trusted  Bot",
    "Trusted\u2028Bot",
]


@pytest.mark.parametrize("name", HIDDEN)
def test_a_character_that_does_not_show_as_itself_is_shown_escaped(name):
    shown = readable(name)
    assert shown != name
    assert all(visible(c) for c in shown), ascii(shown)
    assert "\\u" in shown or "\\U" in shown


def test_the_escape_names_the_code_point():
    assert readable("mallory\u202egnp.exe") == "mallory\\u202egnp.exe"
    assert readable("Trusted Bot\u200b") == "Trusted Bot\\u200b"
    assert readable("Trusted Bot\U000e0041") == "Trusted Bot\\U000e0041"
    assert readable("a\nb") == "a\\u000ab"
    assert readable("Trusted Bot ") == "Trusted Bot\\u0020"


def test_what_shows_as_itself_is_shown_as_it_is():
    for name in ("alice", "alice@example.com", "Émile Zola", "東京", "desk/send_email", "a b c"):
        assert readable(name) == name


def test_no_two_different_names_read_the_same():
    # A backslash is doubled, so a name that spells an escape is not the character it names.
    names = [*HIDDEN, "mallory\\u202egnp.exe", "Trusted Bot\\u200b", "Trusted Bot", "a\\", "a"]
    names += ["".join(p) for p in itertools.product("\\u\u202e ", repeat=4)]
    shown = [readable(n) for n in names]
    assert len(set(shown)) == len(set(names))


def test_a_long_name_is_cut_with_a_mark_that_says_how_much_is_left_out():
    long = "a" * (SHOWN_CHARS + 50)
    shown = readable(long)
    assert shown == "a" * SHOWN_CHARS + "\u2026 (50 more characters)"
    assert readable("a" * SHOWN_CHARS) == "a" * SHOWN_CHARS
    # Escapes count at their length: the cut never splits one.
    hidden = readable("\u200b" * 100, most=20)
    assert hidden == "\\u200b" * 3 + "\u2026 (97 more characters)"
    assert readable("abcdef", most=3) == "abc\u2026 (3 more characters)"


@pytest.mark.parametrize("name", [n for n in HIDDEN if n.strip() == n])
def test_a_name_people_will_read_cannot_be_created_with_what_does_not_show(name):
    with pytest.raises(ValueError, match="printable characters"):
        check_name(name, "a username")
