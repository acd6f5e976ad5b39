"""A name someone else chose (a user or agent id, a client's name, a tool, a target) is shown to
people by one function, `bastion.names.readable`, on pages, in chat text and on a terminal: what
does not show as itself is shown escaped, never dropped, so two different names never read the
same (unless both are cut, which the mark says), and a long name cannot push the rest away."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.names import (
    SHOWN_CHARS,
    check_name,
    check_new_name,
    lookalike_problem,
    readable,
    visible,
)

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


# -- look-alikes: mixed scripts, compatibility forms, other normal forms (UTS #39) -------------

# Each reads as a Latin name where shown as it is; after it, how `readable` shows it.
LOOKALIKES = [
    ("\u0430very", "\\u0430very"),  # a Cyrillic а
    ("s\u0430m.smith", "s\\u0430m.smith"),  # one word of two is mixed
    ("\u0391very", "\\u0391very"),  # a Greek capital alpha
    ("\u0440\u0430\u0443\u0440\u0430\u04cf", "\\u0440\\u0430\\u0443\\u0440\\u0430\\u04cf"),
    # ^ "раураӏ": Cyrillic only, every letter a Latin look-alike (a whole-script confusable)
    ("\uff53am", "\\uff53am"),  # fullwidth ｓ: Unicode's NFKC makes it s
    ("\ufb01les", "\\ufb01les"),  # the ligature ﬁ
    ("acme\uff0favery", "acme\\uff0favery"),  # a fullwidth solidus between two ASCII words
    ("Jose\u0301", "Jose\\u0301"),  # é as e and a combining accent (not NFC): José is another name
    ("e\u0301\u0301", "e\\u0301\\u0301"),  # a mark stacked on itself (UTS #39 §5.4)
    ("\u00e9\u0301", "\\u00e9\\u0301"),  # the same in NFC
    (
        "x\u0300\u0301\u0302\u0303\u0304",
        "x\\u0300\\u0301\\u0302\\u0303\\u0304",
    ),  # five marks on one letter
]


@pytest.mark.parametrize(("name", "shown"), LOOKALIKES)
def test_a_word_that_would_read_as_another_has_its_non_ascii_characters_escaped(name, shown):
    assert readable(name) == shown


def test_the_nfc_and_nfd_spellings_of_one_name_read_differently():
    composed, decomposed = "Jos\u00e9", "Jose\u0301"
    assert readable(composed) == composed
    assert readable(decomposed) != readable(composed)


def test_names_in_one_script_other_than_latin_are_shown_as_they_are():
    for name in (
        "Борис",
        "Борис Smith",
        "田中",
        "田中taro",
        "たなか",
        "김민준",
        "Γιώργος",
        "דוד",
        "محمد",
        "۱۲۳محمد",
        "José",
        "Ærøskøbing",
        "straße",
        "İstanbul",
    ):
        assert readable(name) == name, name


ASCII_WORD = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="\\"),
    min_size=1,
    max_size=20,
)
# Letters of each script that no Latin letter looks like: a word with one of them is not a
# whole-script confusable.
SCRIPTS = {
    "Cyrillic": ("абвгдежзийклмнопрстуфхцчшщъыьэюяАБВГДЕЖЗИЙКЛМНОПРСТУФХЦЧШЩЪЫЬЭЮЯ", "бдлжфшщэя"),
    "Greek": ("αβγδεζηθικλμνξοπρστυφχψωάέήίόύώΑΒΓΔΕΖΗΘΙΚΛΜΝΞΟΠΡΣΤΥΦΧΨΩ", "γδζθλξπσφψ"),
    "Han": ("田中東京山川日本語漢字", "田"),
    "Hangul": ("김민준가나다라마바사", "김"),
    "Hebrew": ("אבגדהוזחטיכלמנסעפצקרשת", "א"),
}


@settings(max_examples=300)
@given(st.data())
def test_ascii_and_single_script_names_are_unchanged(data):
    script = data.draw(st.sampled_from(sorted(SCRIPTS)))
    letters, own = SCRIPTS[script]
    word = data.draw(st.text(alphabet=letters, min_size=0, max_size=12))
    word += data.draw(st.sampled_from(own))
    ascii_word = data.draw(ASCII_WORD)
    assert readable(ascii_word) == ascii_word
    assert readable(word) == word
    assert readable(f"{word} {ascii_word}") == f"{word} {ascii_word}"


CONFUSABLE = "\u0430\u0435\u043e\u0440\u0441\u0443\u0445\u0456\u0455\u0391\u0392\u039f\u03bf\u03bd"


@settings(max_examples=300)
@given(ASCII_WORD.filter(lambda w: any(c.isalpha() for c in w)), st.data())
def test_a_latin_word_with_a_cyrillic_or_greek_letter_is_shown_escaped(word, data):
    at = data.draw(st.integers(min_value=0, max_value=len(word)))
    letter = data.draw(st.sampled_from(CONFUSABLE))
    name = word[:at] + letter + word[at:]
    shown = readable(name)
    assert shown.isascii() and f"\\u{ord(letter):04x}" in shown
    assert shown.replace(f"\\u{ord(letter):04x}", letter) == name


def test_lookalikes_read_unlike_the_names_they_pass_for():
    names = [n for n, _ in LOOKALIKES] + ["avery", "sam.smith", "sam", "files", "José", "paypal"]
    names += ["acme/avery", "Avery", "\\u0430very"]
    assert len({readable(n) for n in names}) == len(names)


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("\u0430very", "mixes scripts in one word (Latin and Cyrillic: \\u0430very)"),
        ("sam \u0391lpha", "mixes scripts in one word (Latin and Greek: \\u0391lpha)"),
        ("\uff53am", "has compatibility characters that Unicode's NFKC changes (\\uff53am is sam)"),
        ("Jose\u0301", "is not in Unicode's normal form NFC (write Jose\\u0301 as Jos\\u00e9)"),
        ("\u00e9\u0301", "stacks a combining mark on itself"),
        ("x\u0300\u0301\u0302\u0303\u0304", "stacks more than 4 combining marks on one letter"),
    ],
)
def test_a_name_made_here_that_would_read_as_another_is_refused_saying_why(name, problem):
    assert lookalike_problem(name) == problem
    with pytest.raises(ValueError) as refused:
        check_new_name(name, "a username")
    assert str(refused.value) == f"a username {problem}"


@pytest.mark.parametrize(
    "name", ["avery", "Борис", "田中", "田中taro", "José", "Γιώργος", "a.b-c_d"]
)
def test_a_name_in_one_script_can_be_made(name):
    assert lookalike_problem(name) is None
    assert check_new_name(name, "a username") == name
