"""Polar source text to tokens, each with its line and column."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from bastion.policy.errors import Diagnostic, Location, PolicyError

# Words that are never names. Block words (actor, resource, roles, test, ...) are recognised by
# position instead, so that ``resource`` and ``actor`` stay usable as variable names.
KEYWORDS = {"if", "and", "or", "not", "in", "on", "true", "false", "matches"}

_TOKEN = re.compile(
    r"""
    (?P<ws>[ \t\r]+)
  | (?P<nl>\n)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*")
  | (?P<badstring>"[^\n]*)
  | (?P<number>-?\d+(?:\.\d+)?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<constant>@[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>==|!=|<=|>=|[<>=(){}\[\],;:.+\-*/])
    """,
    re.VERBOSE,
)

_ESCAPES = {"n": "\n", "t": "\t", '"': '"', "\\": "\\"}


@dataclass(frozen=True, slots=True)
class Token:
    kind: str  # "string", "number", "name", "keyword", "constant" (@name), "op", "eof"
    value: object
    location: Location
    offset: int = 0  # where the token starts in the source text

    def describe(self) -> str:
        if self.kind == "eof":
            return "end of input"
        if self.kind == "string":
            return f"string {_quote(self.value)}"
        return f"'{self.value}'"


def _quote(s: object) -> str:
    return '"' + str(s).replace('"', '\\"') + '"'


def _unescape(raw: str, location: Location) -> str:
    out, i = [], 0
    while i < len(raw):
        c = raw[i]
        if c == "\\":
            nxt = raw[i + 1]
            if nxt not in _ESCAPES:
                raise PolicyError([Diagnostic(location, f"unknown escape \\{nxt} in string")])
            out.append(_ESCAPES[nxt])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


# Integers are 64-bit, as in Oso Cloud and as stored facts and request numbers are: a literal
# past them could equal nothing, and past 4300 digits Python does not read it at all.
_MIN_INTEGER, _MAX_INTEGER = -(2**63), 2**63 - 1
_MAX_DIGITS = 20  # more digits than any 64-bit integer has: not read, refused as it is


def _number(text: str, location: Location) -> int | float:
    """A number literal's value; one outside 64 bits, or a float too large to be finite (the
    generated code would read it as ``inf``), is refused where it is written."""
    if "." in text:
        value = float(text)
        if not math.isfinite(value):
            raise PolicyError(
                [Diagnostic(location, f"{_shown(text)} is too large: numbers must be finite")]
            )
        return value
    digits = len(text) - (text[0] == "-")
    if digits <= _MAX_DIGITS and _MIN_INTEGER <= (value := int(text)) <= _MAX_INTEGER:
        return value
    raise PolicyError(
        [
            Diagnostic(
                location,
                f"{_shown(text)} is out of range: integers are 64-bit, from {_MIN_INTEGER} to"
                f" {_MAX_INTEGER}",
            )
        ]
    )


def _shown(text: str) -> str:
    return text if len(text) <= 24 else f"{text[:20]}... ({len(text)} characters)"


def tokenize(text: str, source: str) -> list[Token]:
    nul = text.find("\x00")
    if nul >= 0:
        # Anywhere, a comment too: PostgreSQL stores no NUL in the policy's text, and in a
        # string Python's compiler refuses it (a rule then "could not be compiled").
        line_start = text.rfind("\n", 0, nul) + 1
        where = Location(source, text.count("\n", 0, nul) + 1, nul - line_start + 1)
        raise PolicyError([Diagnostic(where, "the character U+0000 (NUL) cannot be in a policy")])
    tokens: list[Token] = []
    line, line_start, pos = 1, 0, 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        loc = Location(source, line, pos - line_start + 1)
        if m is None:
            raise PolicyError([Diagnostic(loc, f"unexpected character {text[pos]!r}")])
        kind = m.lastgroup
        value = m.group()
        pos = m.end()
        if kind == "nl":
            line, line_start = line + 1, pos
        elif kind in ("ws", "comment"):
            continue
        elif kind == "badstring":
            raise PolicyError(
                [Diagnostic(loc, "unterminated string (strings end on the same line)")]
            )
        elif kind == "string":
            tokens.append(Token("string", _unescape(value[1:-1], loc), loc, m.start()))
        elif kind == "number":
            tokens.append(Token("number", _number(value, loc), loc, m.start()))
        elif kind == "constant":
            tokens.append(Token("constant", value[1:], loc, m.start()))
        elif kind == "name":
            tokens.append(Token("keyword" if value in KEYWORDS else "name", value, loc, m.start()))
        else:
            tokens.append(Token("op", value, loc, m.start()))
    tokens.append(Token("eof", None, Location(source, line, pos - line_start + 1), pos))
    return tokens
