"""JSON sent by someone else: the one reader for request bodies of the `/v1` API, OAuth dynamic
registration and the MCP gateway, and for what other parties sign or answer (JWTs and their JOSE
headers, DPoP proofs, SETs, discovery documents, key sets, token endpoints' answers), with a limit
on nesting and on what numbers may be, and no member named twice.

`json.loads` recurses once per level (a body of ten thousand ``[`` is a `RecursionError`, a
500), turns ``1e999`` into infinity and accepts ``NaN`` and ``Infinity``, which are not JSON and
which no JSON encoder writes back. Here they are a `JsonRefused` that names the limit and the place.
So is a string holding half of a UTF-16 surrogate pair (``"\\ud800"``, which JSON's grammar allows
and `json.loads` keeps): it is not Unicode text, and fails wherever it is written as UTF-8 (a
database, a log, an answer), long after it was taken in. And so is a string holding U+0000
(``"\\u0000"``): PostgreSQL stores no NUL in text, and in a name or an identifier it is the
classic way to make two programs read one string as two (one of them stops at the NUL). And so
is an object that names a member twice (``{"sub": "alice", "sub": "admin"}``), which parsers read
differently (the first, the last, an error): I-JSON (RFC 7493 §2.3) forbids it, and JWS and JWT
(RFC 7515 §5.2, RFC 7519 §4) let a reader refuse it, the safe choice.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import orjson

from bastion.json_encoding import NOT_READ, decoder, nests_within, read

DEFAULT_MAX_DEPTH = 64
# The range of a 64-bit signed integer: what SQLite and PostgreSQL's bigint store.
MIN_INTEGER = -(2**63)
MAX_INTEGER = 2**63 - 1
_SHORT = 18  # an integer literal of at most this many digits is always in range
_BINARY = bytes | bytearray  # made once: ``bytes | bytearray`` in a call makes it each time
_RANGE = f"numbers must be between {MIN_INTEGER} and {MAX_INTEGER} (64-bit)"
# A surrogate written as an escape; in a text given as str, one written as it is.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_LONE_SURROGATE = "a string holds half of a UTF-16 surrogate pair, which is not Unicode text"
_NUL = "a string holds the character U+0000 (NUL), which no string here may hold"


class JsonRefused(ValueError):
    """A body that is not JSON, or JSON past a limit; the message says which and where."""

    def __init__(self, reason: str, *, path: str = "") -> None:
        super().__init__(f"{path}: {reason}" if path else reason)
        self.reason = reason
        self.path = path


class _Refused:
    """Stands for a number that was read but may not be used, until its place is known."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class _RefusedNumber(Exception):  # noqa: N818 - internal signal, never leaves this module
    """Raised from inside the decoder: the first pass stops at the first refused number."""


class _RepeatedKey(Exception):  # noqa: N818 - internal signal, never leaves this module
    """Raised from inside the decoder (with ``unique_keys``): an object names a member twice."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_object(pairs: list[tuple[str, Any]]) -> dict:
    """An object's members as a dict, or `_RepeatedKey` for the first name it holds twice."""
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _RepeatedKey(key)
            seen.add(key)
    return value


# How much of a refused value a message quotes: enough to recognise it, never a whole body.
QUOTED_CHARS = 80


def quoted(value: Any) -> str:
    """``value`` as JSON, cut to `QUOTED_CHARS` characters (``...`` says it was cut), for a
    message that shows a client what it sent."""
    text = json.dumps(value, default=str)
    return text if len(text) <= QUOTED_CHARS else text[:QUOTED_CHARS] + "..."


def _shown(literal: str) -> str:
    return literal if len(literal) <= 24 else f"{literal[:20]}... ({len(literal)} characters)"


def _constant_reason(literal: str) -> str:
    return f"{literal} is not a JSON number (NaN and Infinity are not allowed)"


def _float_reason(literal: str, bounded: bool) -> str | None:
    value = float(literal)
    if not math.isfinite(value):
        return f"{_shown(literal)} is too large: numbers must be finite"
    if bounded and not MIN_INTEGER <= value <= MAX_INTEGER:
        return f"{_shown(literal)} is out of range: {_RANGE}"
    return None


def _int_reason(literal: str) -> str | None:
    digits = len(literal) - (literal[0] == "-")
    if digits <= _SHORT or (digits <= 19 and MIN_INTEGER <= int(literal) <= MAX_INTEGER):
        return None
    return f"{_shown(literal)} is out of range: {_RANGE}"


def _raise(reason: str | None, value: Any) -> Any:
    if reason is None:
        return value
    raise _RefusedNumber(reason)


def _mark(reason: str | None, value: Any) -> Any:
    return value if reason is None else _Refused(reason)


def _decoder(bounded_numbers: bool, unique_keys: bool, answer) -> json.JSONDecoder:
    """A decoder whose number hooks ``answer(reason, value)`` for each number it reads, and
    which, with ``unique_keys``, raises `_RepeatedKey` for an object that names a member twice."""

    def constant(literal: str) -> Any:
        return answer(_constant_reason(literal), None)

    def floating(literal: str) -> Any:
        reason = _float_reason(literal, bounded_numbers)
        return answer(reason, float(literal) if reason is None else None)

    def integer(literal: str) -> Any:
        reason = _int_reason(literal)
        return answer(reason, int(literal) if reason is None else None)

    return json.JSONDecoder(
        parse_float=floating,
        parse_constant=constant,
        parse_int=integer if bounded_numbers else None,
        object_pairs_hook=_unique_object if unique_keys else None,
    )


# The first pass stops at the first refused number; only then a second pass finds its place.
# Keyed by (bounded_numbers, unique_keys).
_MODES = [(bounded, unique) for bounded in (True, False) for unique in (True, False)]
_FAST = {mode: decoder(_decoder(*mode, _raise)) for mode in _MODES}
_MARKING = {mode: _decoder(*mode, _mark) for mode in _MODES}


def loads(
    data: bytes | str,
    *,
    max_depth: int = DEFAULT_MAX_DEPTH,
    bounded_numbers: bool = True,
    unique_keys: bool = True,
) -> Any:
    """``data`` as JSON, or `JsonRefused`.

    Refused: text that is not JSON (or not UTF-8), objects and arrays nested deeper than
    ``max_depth``, ``NaN``, ``Infinity``, a number too large to be finite, (with
    ``bounded_numbers``) a number outside the range of a 64-bit signed integer, a string
    (or key) holding a lone surrogate or a NUL, and (with ``unique_keys``, the default) an
    object that names a member twice, which JSON parsers read differently (the first, the last,
    an error; I-JSON, RFC 7493 §2.3, asks for unique names).
    """
    # The usual body: read by orjson where it reads what json does (`read`), and where none of
    # the checks below can refuse it (no ``\\u`` escape, so no NUL, no surrogate and no escaped
    # colon); anything else is read by json as it always was, for its value or its refusal.
    # Nested past ``max_depth`` (or past what `read` takes), it is json's to refuse or read.
    if data.__class__ is bytes and data.find(b"\\u") == -1:
        value = read(data, exponents=not bounded_numbers, levels=max_depth)
        if value is not NOT_READ and (not unique_keys or _no_member_twice(value, data)):
            return value
    try:
        text = data.decode("utf-8") if isinstance(data, _BINARY) else data
    except UnicodeDecodeError as e:
        raise JsonRefused(f"not valid JSON: not UTF-8 ({e})") from None
    mode = (bounded_numbers, unique_keys)
    try:
        value = _FAST[mode](text)
    except RecursionError:
        raise _too_deep(max_depth) from None
    except _RepeatedKey as e:
        raise _repeated(e.key) from None
    except _RefusedNumber as refused:
        # Decoded again, with the refused numbers kept in place, to say where the first one is.
        try:
            value = _MARKING[mode].decode(text)
        except _RepeatedKey as e:
            raise _repeated(e.key) from None
        _walk(value, max_depth)
        # Not found: it was the value of a member named again (without ``unique_keys``), which
        # the later one replaced. Refused all the same, without a place.
        raise JsonRefused(refused.args[0]) from None
    except ValueError as e:  # JSONDecodeError, or an integer of more digits than Python reads
        raise JsonRefused(f"not valid JSON: {e}") from None
    # Fewer brackets than the limit cannot nest deeper: most bodies skip the depth check.
    if text.count("[") + text.count("{") > max_depth and not nests_within(value, max_depth):
        _walk(value, max_depth)  # refuses it, as the walk counts
    # Surrogates come only from escapes (UTF-8 has none) or from a str given with them; a pair
    # (an emoji, escaped by an ASCII-only encoder) is one character once decoded. A NUL comes
    # only from its escape: JSON allows no control character in a string as it is.
    if ("\\u" in text and (_SURROGATE_ESCAPE.search(text) or "\\u0000" in text)) or (
        not text.isascii() and _SURROGATE.search(text)
    ):
        _refuse_untext(value)
    return value


def _no_member_twice(value: Any, data: bytes) -> bool:
    """Whether no object in ``data`` (JSON without a ``\\u`` escape) names a member twice, given
    orjson's ``value`` of it. Each member has one colon outside the strings, and every colon in
    a string is written as it is, in ``data`` and in orjson's text of ``value`` alike; a member
    named again replaces the first (and whatever it held), so its text has fewer colons."""
    try:
        return orjson.dumps(value).count(b":") == data.count(b":")
    except orjson.JSONEncodeError:  # nested past what orjson writes (254 levels)
        return False


def _refuse_untext(value: Any) -> None:
    """`JsonRefused`, naming its place, for the first string or key of ``value`` that holds a
    lone surrogate or a NUL (the escapes looked for may also be a backslash's, and mean none)."""
    stack: list[tuple[Any, tuple]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if isinstance(item, dict):
            for k, v in item.items():
                if (reason := _untext(k)) is not None:
                    raise JsonRefused(f"{reason} (in a key)", path=place(path))
                stack.append((v, (*path, k)))
        elif isinstance(item, list):
            stack.extend((v, (*path, i)) for i, v in enumerate(item))
        elif isinstance(item, str) and (reason := _untext(item)) is not None:
            raise JsonRefused(reason, path=place(path))


def is_text(text: str) -> bool:
    """Whether ``text`` could have come in through `loads`: no lone surrogate, no NUL."""
    return _untext(text) is None


def writable(text: str) -> str:
    """``text`` with what no database, log or UTF-8 answer can hold written as its escape: a NUL
    as ``\\x00``, half of a surrogate pair as ``\\udXXX``. For a message that quotes text
    someone else sent (a key, a name, an error of theirs)."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode("utf-8")


def _untext(text: str) -> str | None:
    """Why ``text`` may not be taken in, or None."""
    if "\x00" in text:
        return _NUL
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _LONE_SURROGATE
    return None


def _repeated(key: str) -> JsonRefused:
    return JsonRefused(
        f"an object names the member {writable(key)[:QUOTED_CHARS]!r} twice, which JSON parsers"
        " read differently: send each name once"
    )


def _too_deep(max_depth: int) -> JsonRefused:
    return JsonRefused(
        f"JSON nested deeper than {max_depth} levels of objects and arrays (max_json_depth)"
    )


def _walk(value: Any, max_depth: int) -> None:
    """Refuse ``value`` if it nests deeper than ``max_depth`` or holds a refused number."""
    stack: list[tuple[Any, int, tuple]] = [(value, 0, ())]
    while stack:
        item, depth, path = stack.pop()
        if isinstance(item, dict):
            depth += 1
            if depth > max_depth:
                raise _too_deep(max_depth)
            stack.extend((v, depth, (*path, k)) for k, v in item.items())
        elif isinstance(item, list):
            depth += 1
            if depth > max_depth:
                raise _too_deep(max_depth)
            stack.extend((v, depth, (*path, i)) for i, v in enumerate(item))
        elif isinstance(item, _Refused):
            raise JsonRefused(item.reason, path=place(path))


def place(path: tuple) -> str:
    """``("facts", 0, "args", 2)`` as ``facts[0].args[2]`` (a key as `writable` writes it)."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{writable(part)}" if out else writable(str(part))
    return out
