"""Names that people give and read back on a line of their own: a username, an API key's name;
whether a token's claim may name a user at all, and the prefix that keeps one source's users
apart from another's; and `readable`, the one way every page, chat text and command line shows a
name that someone else chose."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

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


def readable(
    name: str, most: int | None = SHOWN_CHARS, shows: Callable[[str], bool] = visible
) -> str:
    """``name`` (an id or a name someone else chose) as people read it on a page, in a chat
    message or on a terminal: every character that does not show as itself (a right-to-left
    override, a zero-width or other invisible character, a line break, a space at either end or
    next to another) as its escape, ``\\u202e`` (``\\U000e0041`` past U+FFFF), and a backslash
    doubled; nothing dropped, so two different names never read the same. Past ``most``
    characters the rest is cut, and the mark says how many characters it leaves out (None: text
    that is bounded where it is taken in, such as a reason, is shown whole). ``shows``
    narrows what a medium shows as it is (a chat tool's markup is escaped too); HTML escapes the
    result as any text."""
    shown: list[str] = []
    length = 0
    last = len(name) - 1
    for i, char in enumerate(name):
        if char == "\\":
            piece = "\\\\"
        elif (
            visible(char)
            and shows(char)
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
    if (
        not isinstance(value, str)
        or not value
        or len(value) > most
        or not plain(value)
        or value.strip() != value
    ):
        raise error(f"{what} is 1 to {most} printable characters without surrounding spaces")
    return value


def user_prefix_problem(value: object) -> str | None:
    """Why ``value`` cannot be a ``user_prefix``, or None. The prefix puts one identity source's
    users (a provider's at sign-in, a trusted issuer's, an ID-JAG issuer's) in a namespace of
    their own, so that its ``sub`` "alice" is not bastion's local user "alice"."""
    if not isinstance(value, str) or len(value) > MAX_USER_PREFIX or not value.isprintable():
        return f"a string of at most {MAX_USER_PREFIX} printable characters"
    return None
