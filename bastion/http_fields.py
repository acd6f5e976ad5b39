"""HTTP field (header) names and values as RFC 9110 §5 allows them: the one check for a header
bastion sends, used where a setting is read (so a bad one stops the start) and where the gateway
encodes a request's head.

A field name is a token (§5.1, §5.6.2). A field value (§5.5) is visible ASCII and obs-text
(the bytes 0x80-0xFF, here the characters U+0080-U+00FF that encode to them in Latin-1), with
spaces and horizontal tabs between them: no CR, LF, NUL or other control character, which
would end the header early or start another one. Leading and trailing spaces and tabs are not
part of a value (a recipient strips them); `field_value_problem` allows them, so that what the
gateway relays is checked as it is, and a setting is stripped of them where it is read.
"""

from __future__ import annotations

import re

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
# RFC 9110 §8.3.1: type "/" subtype, each a token.
_MEDIA_TYPE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+/[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# application/json, or a more specific application/<name>+json (RFC 6839 §3.1).
_JSON_MEDIA_TYPE = re.compile(r"application/(?:json|[a-z0-9!#$&^_.+-]+\+json)")


def field_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be an HTTP field name, or None."""
    if _TOKEN.fullmatch(name):
        return None
    return "is not an HTTP field name (letters, digits and !#$%&'*+-.^_`|~ only, RFC 9110 §5.1)"


def field_value_problem(value: str) -> str | None:
    """Why ``value`` cannot be an HTTP field value, or None. The message does not hold the value
    (it is often a credential)."""
    if _VALUE.fullmatch(value):
        return None
    return (
        "holds a character HTTP does not allow in a header value: a line break, NUL or other"
        " control character, or one beyond Latin-1 (RFC 9110 §5.5)"
    )


def media_type(content_type: str) -> str:
    """The media type of a ``Content-Type`` value (RFC 9110 §8.3.1): its ``type/subtype``,
    lowercased (the names are case-insensitive), without the parameters after ``;`` or the
    spaces around it; ``""`` when that is no type/subtype of two tokens. Compared whole, never
    by its start: ``application/jsonp`` is not ``application/json``."""
    media = content_type.partition(";")[0].strip(" \t")
    # Checked before it is lowercased: str.lower maps some letters beyond ASCII into it.
    return media.lower() if _MEDIA_TYPE.fullmatch(media) else ""


def is_json_media(content_type: str) -> bool:
    """Whether a ``Content-Type`` names JSON: ``application/json`` or ``application/<name>+json``,
    its parameters (``charset``) aside."""
    return _JSON_MEDIA_TYPE.fullmatch(media_type(content_type)) is not None
