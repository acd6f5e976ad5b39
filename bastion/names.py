"""Names that people give and read back on a line of their own: a username, an API key's name;
whether a token's claim may name a user at all, and the prefix that keeps one source's users
apart from another's; and `readable`, the one way every page, chat text and command line shows a
name that someone else chose. Look-alikes are found as Unicode Technical Standard #39 (Security
Mechanisms) describes: mixed-script and whole-script confusables, compatibility forms (NFKC),
spellings not in NFC, stacked combining marks."""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable, Mapping
from typing import Any

from bastion.turns import Turns

# The longest name (characters): a username or a key's name.
MAX_NAME_LENGTH = 128
# A name is shown whole up to this many characters (escapes counted at their length); past it,
# the rest is cut and a mark says how much.
SHOWN_CHARS = 160
# Letters and marks to Unicode (so ``str.isprintable`` lets them through) that show as nothing or
# as a blank: Hangul fillers, the combining grapheme joiner, Khmer inherent vowels, Mongolian and
# other variation selectors (Unicode's Default_Ignorable_Code_Point beyond the format
# characters), and the Braille blank.
_BLANK = frozenset(
    [0x115F, 0x1160, 0x3164, 0xFFA0, 0x034F, 0x17B4, 0x17B5, 0x180B, 0x180C, 0x180D, 0x180F]
    + [0x2800, *range(0xFE00, 0xFE10), *range(0xE0100, 0xE01F0)]
)

# Scripts one word may mix: UTS #39's "highly restrictive" level (§5.2) lets Latin go with the
# scripts of Japanese, of Chinese with Bopomofo, or of Korean, and no other two scripts together.
_MIXES = (
    frozenset({"LATIN", "CJK", "HIRAGANA", "KATAKANA"}),
    frozenset({"LATIN", "CJK", "BOPOMOFO"}),
    frozenset({"LATIN", "CJK", "HANGUL"}),
)
# A script is the first word of a character's Unicode name (`script`); these first words are
# not a script's name: 々 and 〆 are Han, the extended Arabic-Indic digits Arabic (Persian).
_SCRIPT_OF = {"IDEOGRAPHIC": "CJK", "EXTENDED": "ARABIC"}
# Cyrillic and Greek letters that read as Latin ones (after the lists browsers use to show such
# a domain name in punycode): a word of them alone reads as a Latin word, ``раураӏ`` as paypal
# (UTS #39 calls it a whole-script confusable).
_LATIN_LOOKING = frozenset(
    "\u0430\u044b\u0441\u0501\u0435\u050d\u04bb\u0456\u044e\u0458\u04cf\u043e\u0440\u0517"
    "\u051b\u0455\u051d\u0445\u0443\u044a\u044c\u04bd\u043f\u0433\u0475\u0461"  # аысԁе...
    "\u0410\u0412\u0415\u0405\u0406\u0408\u041a\u041c\u041d\u041e\u0420\u0421\u0422"
    "\u0425\u0423\u04ae\u051a\u051c\u042c"  # АВЕЅІЈКМНОРСТХУҮԚԜЬ
    "\u03b1\u03b9\u03ba\u03bd\u03bf\u03c1\u03c5\u03c7\u03c9"  # αικνορυχω
    "\u0391\u0392\u0395\u0396\u0397\u0399\u039a\u039c\u039d\u039f\u03a1\u03a4\u03a5"
    "\u03a7"  # ΑΒΕΖΗΙΚΜΝΟΡΤΥΧ
)
# UTS #39 §5.4: more nonspacing marks than this on one letter is refused and shown escaped.
_MOST_MARKS = 4

# The longest ``user_prefix`` (characters): the user id is the prefix then a claim's value.
MAX_USER_PREFIX = 64
# Why a token's ``user_claim`` of ``email`` cannot name a user (`vouched_for`).
UNVERIFIED_EMAIL = (
    "The issuer does not vouch for the email address (email_verified is not true): it cannot"
    " name the user."
)


def visible(char: str) -> bool:
    """Whether ``char`` shows as itself: not a control, format (bidirectional, zero-width),
    separator other than the space, surrogate, private-use or unassigned character, nor one of
    the letters and marks that show blank."""
    return char.isprintable() and ord(char) not in _BLANK


def plain(name: str) -> bool:
    """Whether `readable` shows ``name`` as it is (backslashes aside): every character visible,
    and no space at either end or next to another (a page shows two spaces as one)."""
    return all(map(visible, name)) and name.strip(" ") == name and "  " not in name


def script(char: str) -> str | None:
    """The script of a letter or digit, or None (a mark, which takes its letter's, punctuation,
    a symbol, an ASCII digit). Approximated by the first word of the character's Unicode name
    (``CYRILLIC SMALL LETTER A``, ``CJK UNIFIED IDEOGRAPH-7530``, ``ARABIC-INDIC DIGIT ONE``):
    Python's standard library has no Script property. Scripts whose names share a first word
    (Old Italic and Old Persian, the Tai scripts) count as one."""
    if char.isascii():
        return "LATIN" if char.isalpha() else None
    if unicodedata.category(char)[0] not in "LN":
        return None
    first = unicodedata.name(char, "").split(" ", 1)[0].split("-", 1)[0]
    return _SCRIPT_OF.get(first, first) or None


def _pieces(name: str) -> list[tuple[int, int]]:
    """Where the words of ``name`` are (runs of letters, digits and marks), and each other
    character with the marks that follow it: the spans the look-alike rules judge."""
    spans: list[tuple[int, int]] = []
    start, in_word = 0, False
    for i, char in enumerate(name):
        kind = unicodedata.category(char)[0]
        if i and (kind == "M" or (kind in "LN" and in_word)):
            continue
        if i:
            spans.append((start, i))
        start, in_word = i, kind in "LMN"
    if name:
        spans.append((start, len(name)))
    return spans


def _escaped(text: str) -> str:
    return "".join(
        c if c.isascii() else f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}"
        for c in text
    )


def _piece_problem(piece: str) -> str | None:
    """Why a word (or another character and its marks) could read as another name, or None:
    the rules of UTS #39 that bastion applies where names are made."""
    if not unicodedata.is_normalized("NFC", piece):
        nfc = unicodedata.normalize("NFC", piece)
        return f"is not in Unicode's normal form NFC (write {_escaped(piece)} as {_escaped(nfc)})"
    if not unicodedata.is_normalized("NFKC", piece):
        nfkc = unicodedata.normalize("NFKC", piece)
        return (
            "has compatibility characters that Unicode's NFKC changes"
            f" ({_escaped(piece)} is {_escaped(nfkc)})"
        )
    scripts = {found for char in piece if (found := script(char))}
    if len(scripts) > 1 and not any(scripts <= mix for mix in _MIXES):
        named = [s.title() if s != "CJK" else "Han" for s in sorted(scripts - {"LATIN"})]
        if "LATIN" in scripts:
            named.insert(0, "Latin")
        return (
            f"mixes scripts in one word ({', '.join(named[:-1])} and {named[-1]}:"
            f" {_escaped(piece)})"
        )
    marks, previous = 0, ""
    for char in unicodedata.normalize("NFD", piece):
        if unicodedata.category(char) != "Mn":
            marks, previous = 0, ""
            continue
        if char == previous:
            return "stacks a combining mark on itself"
        marks, previous = marks + 1, char
        if marks > _MOST_MARKS:
            return f"stacks more than {_MOST_MARKS} combining marks on one letter"
    return None


def _reads_as_latin(piece: str) -> bool:
    """Whether a word of Cyrillic or Greek letters alone reads as a Latin word."""
    letters = [char for char in piece if char.isalpha()]
    return (
        bool(letters)
        and {script(char) for char in letters} in ({"CYRILLIC"}, {"GREEK"})
        and all(char in _LATIN_LOOKING for char in letters)
    )


def lookalike_problem(name: str) -> str | None:
    """Why ``name``, made here (a username, an API key's name, a client's name), could read as
    another, or None: a word that mixes scripts as UTS #39 "highly restrictive" does not allow
    (``\\u0430very``: Latin with a Cyrillic а), a character Unicode's NFKC changes (fullwidth
    ``\\uff53am``, the ligature ``\\ufb01``), a spelling not in NFC (``e`` and a combining accent
    for ``é``: two names that look the same), a combining mark stacked on itself or more than
    four on one letter. A word in one script (``Борис``, ``田中``) passes, even one that reads as
    Latin: `readable` shows that one escaped."""
    if name.isascii():
        return None
    for start, end in _pieces(name):
        if problem := _piece_problem(name[start:end]):
            return problem
    return None


def _lookalikes(name: str) -> set[int]:
    """Where the non-ASCII characters are of the words of ``name`` that could read as another
    name: those `lookalike_problem` finds, and the Cyrillic or Greek words that read as Latin."""
    found: set[int] = set()
    if name.isascii():
        return found
    for start, end in _pieces(name):
        piece = name[start:end]
        if piece.isascii() or not (_piece_problem(piece) or _reads_as_latin(piece)):
            continue
        found.update(i for i in range(start, end) if not name[i].isascii())
    return found


def readable(
    name: str,
    most: int | None = SHOWN_CHARS,
    shows: Callable[[str], bool] = visible,
    doubles: bool = True,
) -> str:
    """``name`` (an id or a name someone else chose) as people read it on a page, in a chat
    message or on a terminal: every character that does not show as itself (a right-to-left
    override, a zero-width or other invisible character, a line break, a space at either end or
    next to another) as its escape, ``\\u202e`` (``\\U000e0041`` past U+FFFF), and a backslash
    doubled; nothing dropped, so two different names never read the same. So is every non-ASCII
    character of a word that could read as another name (`lookalike_problem`, or a word of
    Cyrillic or Greek letters that all look Latin), as browsers show such a domain name in
    punycode: ``\\u0430very``, not ``аvery``. Past ``most``
    characters the rest is cut, and the mark says how many characters it leaves out (None: text
    that is bounded where it is taken in, such as a reason, is shown whole). ``shows``
    narrows what a medium shows as it is (a chat tool's markup is escaped too); HTML escapes the
    result as any text. ``doubles`` False keeps a backslash as it is, for text that may be
    this function's own output already (a record that kept what it took in as shown here): an
    escape it holds is then shown once, not as ``\\\\u001b``, and a raw character is escaped
    all the same; the price is that a literal ``\\u001b`` reads as the escape."""
    shown: list[str] = []
    length = 0
    last = len(name) - 1
    lookalikes = _lookalikes(name)
    for i, char in enumerate(name):
        if char == "\\":
            piece = "\\\\" if doubles else char
        elif (
            visible(char)
            and shows(char)
            and i not in lookalikes
            and (char != " " or (0 < i < last and name[i - 1] != " " and name[i + 1] != " "))
        ):
            piece = char
        else:
            code = ord(char)
            piece = f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"
        if most is not None and length + len(piece) > most:
            return "".join(shown) + f"\u2026 ({len(name) - i} more characters)"
        shown.append(piece)
        length += len(piece)
    return "".join(shown)


def readable_json(value: Any, turns: Turns | None = None) -> str:
    """``value`` (a held call's arguments, a held result) as indented JSON for people to read,
    with every character `readable` would escape in a name written as its JSON escape: one
    that does not show as itself (a right-to-left override, a zero-width or line separator, a
    Hangul filler, half of a surrogate pair) and the non-ASCII letters of a word that could
    read as another (``p\\u0430ypal.com``). Other text beyond ASCII reads as it is. The text is
    JSON that reads back as ``value``, so what a person approves is what runs. With ``turns``
    (a large held result, on a worker thread), written in them: the same text."""
    if turns is None:
        text = _READABLE.encode(value)
    else:
        # Joined a chunk at a time: a million pieces are one join of tens of milliseconds.
        text = "".join(["".join(part) for part in turns.chunks(_READABLE.iterencode(value))])
    if text.isascii():
        return text
    lookalikes = _lookalikes(text)
    # json.dumps escapes every control character inside a string: a line break left in the
    # text is the indentation's.
    return "".join(
        char if char == "\n" or (visible(char) and i not in lookalikes) else _json_escape(char)
        for i, char in enumerate(text)
    )


# json.dumps(value, indent=2, ...): indented, json writes in Python (its C writer does not
# indent), between whose values `readable_json` may tick.
_READABLE = json.JSONEncoder(indent=2, ensure_ascii=False, sort_keys=True, default=str)


def _json_escape(char: str) -> str:
    code = ord(char)
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def vouched_for(claims: Mapping[str, Any], user_claim: str) -> bool:
    """Whether the issuer vouches for the claim that names the user. An email address names a
    person only with ``email_verified`` true (OpenID Connect Core §5.1): one the provider did not
    verify is what somebody typed, which may be another person's. One rule for every token that
    names a user (an ID token at sign-in, a trusted issuer's access token, an ID-JAG)."""
    return user_claim != "email" or claims.get("email_verified") is True


def check_name(
    value: object, what: str, error: type[Exception] = ValueError, most: int = MAX_NAME_LENGTH
) -> str:
    """``value`` if it is 1 to ``most`` printable characters without surrounding spaces, else
    ``error`` saying so of ``what``. Printable: `plain`, no newline or other control character,
    which would forge a line of `bastion keys list` or `users list`, or of a log, and nothing
    that shows blank (a zero-width or bidirectional character, a Hangul filler, a second space),
    which would let one name read as another."""
    if not is_name(value, most):
        raise error(f"{what} is 1 to {most} printable characters without surrounding spaces")
    return value


def is_name(value: object, most: int = MAX_NAME_LENGTH) -> bool:
    """Whether `check_name` takes ``value``: whether a user (or a key) can have it as a name."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= most
        and plain(value)
        and value.strip() == value
    )


def check_new_name(
    value: object, what: str, error: type[Exception] = ValueError, most: int = MAX_NAME_LENGTH
) -> str:
    """`check_name`, and for a name being made here (a username, an API key's name) that it
    cannot read as another (`lookalike_problem`): ``error`` saying why of ``what``."""
    name = check_name(value, what, error, most)
    if problem := lookalike_problem(name):
        raise error(f"{what} {problem}")
    return name


def user_prefix_problem(value: object) -> str | None:
    """Why ``value`` cannot be a ``user_prefix``, or None. The prefix puts one identity source's
    users (a provider's at sign-in, a trusted issuer's, an ID-JAG issuer's) in a namespace of
    their own, so that its ``sub`` "alice" is not bastion's local user "alice". The administrator
    writes it, so it must not read as another prefix (`lookalike_problem`)."""
    if not isinstance(value, str) or len(value) > MAX_USER_PREFIX or not value.isprintable():
        return f"a string of at most {MAX_USER_PREFIX} printable characters"
    if problem := lookalike_problem(value):
        return f"a prefix that reads as itself: this one {problem}"
    return None
