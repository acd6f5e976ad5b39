"""The ``mask`` obligation: redact JSON paths of what a call sends back before it leaves bastion.

A path is dot-separated keys; ``*`` stands for every element of a list or every key of an
object: ``customers.*.email``. The JSONPath spellings ``$.customers[*].email`` and ``items[0]``
mean the same.

A mask never fails open. Under a mask, what goes back to the client is rebuilt from what MCP
defines (schema 2025-11-25 and 2026-07-28), place by place, and each place is either masked
field by field, because it holds JSON, or withheld whole:

- masked field by field: ``structuredContent`` (an object or a list), the ``text`` of a text
  block, of an embedded resource and of ``resources/read`` contents when it holds a JSON object
  or list, and the ``data`` of a log message when it is one, where a path reaches into it
  (`_mask_json`: a JSON value no path reaches into, or under a path that cannot be read, is
  withheld whole; a value a path cannot look into is masked whole);
- kept as they are, since they hold no free text: a block's ``type``, ``isError``,
  ``resultType``, a message's ``role``, a MIME type, the ``annotations`` that are well formed
  (``audience``, ``priority``, ``lastModified``), a progress notification's numbers, a log
  message's level, and a resource's ``uri`` when it is the one the client asked for;
- withheld whole: text that is not a JSON object or list, images, audio, blobs, resource links
  (their URI, name and description are free text), any other URI, ``_meta`` at every level,
  descriptions, a progress message, a logger's name, and anything MCP does not define (an
  unknown content type, an unknown field).

A content block that is withheld becomes a text block saying so, so the result keeps its shape.
A call that no mask applies to is not touched (`mask_result` returns at once).
"""

from __future__ import annotations

import copy
import functools
import logging
import re
from collections.abc import Callable
from typing import Any

from bastion import large_json
from bastion.decide.contract import path_keys
from bastion.gateway.jsonrpc import LOG_LEVELS
from bastion.json_encoding import decode, encoder
from bastion.large_json import OFF_LOOP_BYTES

log = logging.getLogger("bastion.gateway.masks")

MASKED = "[masked]"
WITHHELD = "[withheld by bastion: a field of this result is masked and this text is not JSON]"
WITHHELD_CONTENT = (
    "[withheld by bastion: a field of this result is masked and this content cannot be masked"
    " field by field]"
)
# Stands for a URI that cannot be shown (it could name what is masked); a valid URI.
WITHHELD_URI = "bastion:withheld"

Paths = tuple[tuple[str, ...], ...]

# Tuples, not sets: what they are asked about is the upstream's JSON, and a list or an object
# asked of a set is a TypeError (unhashable); a tuple compares it.
_ROLES = ("user", "assistant")
_RESULT_TYPES = ("complete", "input_required", "incomplete")
_MIME_TYPE = re.compile(r"[A-Za-z0-9][\w.+-]{0,63}/[A-Za-z0-9][\w.+-]{0,63}")
_TIMESTAMP = re.compile(
    r"\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}:\d{2})?)?"
)
# Returned by a field's masker for a field to leave out.
_DROP = object()
# json.dumps(value) with its encoder made once.
_dumps = encoder()


# The compiled path that stands for a whole value.
WHOLE: tuple[str, ...] = ()


@functools.lru_cache(maxsize=1024)
def compile_paths(paths: tuple[str, ...]) -> Paths:
    """Each path as its keys; compiled once per set of paths, as the policy names them. A path
    that cannot be read (empty, ``$``, ``$..x``, a quoted key, an empty key) compiles to ``()``,
    which stands for the whole value: a mask that names nothing bastion can find fails closed."""
    compiled = []
    for path in paths:
        keys = path_keys(path)
        if keys is None:
            log.warning("mask path %r cannot be read: every JSON value under it is withheld", path)
            keys = WHOLE
        compiled.append(keys)
    return tuple(compiled)


def _mask_json(data: dict | list, paths: Paths) -> int | None:
    """Mask ``paths`` in ``data`` in place; how many places changed, or None if ``data`` must be
    withheld whole: a path stands for the whole value, or none reaches into it (no path's first
    key is in it), so the data, if there, is where no path says (another shape of the same
    records): passing it as it came would fail open. Empty, it hides nothing."""
    if not data:
        return 0
    count, reached = 0, False
    for path in paths:
        if not path:
            return None
        head = path[0]
        if head == "*" or (head in data if isinstance(data, dict) else head.isdecimal()):
            reached = True
            count += _redact(data, path)
    return count if reached else None


def _redact(value: Any, path: tuple[str, ...]) -> int:
    """Redact ``path`` in ``value`` (an object or list that the path's first key fits) in place;
    return how many fields were redacted. Where the path goes on into a value it cannot look
    into (text, a number, a list where it names a key), that value is masked whole: the field
    could be inside it (JSON in a string). An absent key, ``null`` and an empty list or object
    hold nothing, and are left as they are."""
    head, rest = path[0], path[1:]
    slots: Any
    if isinstance(value, dict):
        slots = list(value) if head == "*" else ([head] if head in value else [])
    elif head == "*":
        slots = range(len(value))
    else:
        slots = [int(head)] if int(head) < len(value) else []
    if not rest:
        for slot in slots:
            value[slot] = MASKED
        return len(slots)
    # Whether the rest of the path can look into a list (an object it always can).
    into_lists = rest[0] == "*" or rest[0].isdecimal()
    count = 0
    for slot in slots:
        child = value[slot]
        if isinstance(child, dict) or (into_lists and isinstance(child, list)):
            count += _redact(child, rest)
        elif child is not None and child != [] and child != {}:
            value[slot] = MASKED
            count += 1
    return count


def json_values(result: Any) -> list[dict | list]:
    """The JSON objects and lists of an MCP result that `mask_result` masks field by field:
    ``structuredContent``, and the JSON in the ``text`` of a text block, of an embedded
    resource, of ``resources/read`` contents and of a prompt's messages. Nothing else of a
    result is reached by a path (it is kept as it is, or withheld whole)."""
    if not isinstance(result, dict):
        return []
    found: list[dict | list] = []

    def text(value: Any) -> None:
        if isinstance(value, str):
            try:
                data = decode(value)
            except (ValueError, RecursionError):
                return
            if isinstance(data, dict | list):
                found.append(data)

    def block(value: Any) -> None:
        if not isinstance(value, dict):
            return
        if value.get("type") == "text":
            text(value.get("text"))
        elif value.get("type") == "resource" and isinstance(value.get("resource"), dict):
            text(value["resource"].get("text"))

    def each(key: str) -> list:
        value = result.get(key)
        return value if isinstance(value, list) else []

    if isinstance(result.get("structuredContent"), dict | list):
        found.append(result["structuredContent"])
    for item in each("content"):
        block(item)
    for item in each("contents"):
        if isinstance(item, dict):
            text(item.get("text"))
    for message in each("messages"):
        if isinstance(message, dict) and message.get("role") in _ROLES:
            block(message.get("content"))
    return found


def reaches(data: dict | list, path: tuple[str, ...]) -> bool:
    """Whether the compiled ``path`` names something in ``data`` as `_redact` walks it: a field
    it masks, or a value it masks whole because the path goes on into what it cannot look into,
    or an empty list or object, or ``null``, where every key before it is there (nothing to
    mask there in this value, but the path is right). A key absent where the path names it, an
    index past the end of a list, or a path that cannot be read (`WHOLE`) reaches nothing."""
    if not path:
        return False
    head, rest = path[0], path[1:]
    children: list[Any]
    if isinstance(data, dict):
        if head == "*":
            children = list(data.values())
        elif head in data:
            children = [data[head]]
        else:
            return False
    elif head == "*":
        children = list(data)
    elif head.isdecimal() and int(head) < len(data):
        children = [data[int(head)]]
    else:
        return False
    if not rest or not children:
        return True
    into_lists = rest[0] == "*" or rest[0].isdecimal()
    for child in children:
        if isinstance(child, dict) or (into_lists and isinstance(child, list)):
            if reaches(child, rest):
                return True
        else:  # masked whole (text, a number, a list a key names), or holds nothing
            return True
    return False


# A masker takes a field's value, the mask's paths and the URI the client asked for; it returns
# the value to send (or ``_DROP`` to leave the field out) and how many places it changed.
Masker = Callable[[Any, Paths, "str | None"], tuple[Any, int]]


def _json(value: Any, paths: Paths, uri: str | None = None) -> tuple[Any, int]:
    """A JSON object or list, masked in place; anything else, or one the paths do not describe,
    is withheld (``_DROP``)."""
    if isinstance(value, dict | list):
        count = _mask_json(value, paths)
        if count is not None:
            return value, count
    return _DROP, 1


def _text(text: Any, paths: Paths, uri: str | None = None) -> tuple[str, int]:
    """Text that holds a JSON object or list, masked; any other text withheld."""
    if not isinstance(text, str):
        return WITHHELD, 1
    # A large text is in a large message, masked on a worker thread: read and written in
    # turns there (`bastion.large_json`), the same value and text, so that the loop is not
    # held for all of it.
    large = len(text) >= OFF_LOOP_BYTES
    try:
        data = large_json.loads(text) if large else decode(text)
    except (ValueError, RecursionError):  # not JSON, or nested past Python's stack
        return WITHHELD, 1
    if not isinstance(data, dict | list):
        return WITHHELD, 1
    count = _mask_json(data, paths)
    if count is None:
        return WITHHELD, 1
    # Written back as bastion read it, changed or not: the text as it came can say more than
    # its value (a key given twice, of which the parser keeps the last while a model reads both).
    return large_json.dumps(data) if large else _dumps(data), count


def _rebuild(
    item: dict[str, Any], fields: dict[str, Masker], paths: Paths, uri: str | None
) -> tuple[dict[str, Any], int]:
    """``item`` with only the ``fields`` MCP defines, each passed through its masker; every
    other field (``_meta``, free text, anything unknown) is left out and counted."""
    kept: dict[str, Any] = {}
    count = 0
    for key, value in item.items():
        masker = fields.get(key)
        if masker is None:
            count += 1
            continue
        value, changed = masker(value, paths, uri)
        count += changed
        if value is not _DROP:
            kept[key] = value
    return kept, count


def _as_is(value: Any, paths: Paths, uri: str | None) -> tuple[Any, int]:
    return value, 0


def _keep(check: Callable[[Any], bool]) -> Masker:
    """A field kept as it is when ``check`` accepts it (it holds no free text), else left out."""
    return lambda value, paths, uri: (value, 0) if check(value) else (_DROP, 1)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_ANNOTATIONS: dict[str, Masker] = {
    "audience": _keep(lambda a: isinstance(a, list) and all(r in _ROLES for r in a)),
    "priority": _keep(lambda p: _is_number(p) and 0 <= p <= 1),
    "lastModified": _keep(lambda t: isinstance(t, str) and _TIMESTAMP.fullmatch(t) is not None),
}


def _annotations(value: Any, paths: Paths, uri: str | None) -> tuple[Any, int]:
    if not isinstance(value, dict):
        return _DROP, 1
    return _rebuild(value, _ANNOTATIONS, paths, uri)


def _uri(value: Any, paths: Paths, uri: str | None) -> tuple[Any, int]:
    """Only the URI the client asked for is shown; any other could name what is masked."""
    return (value, 0) if uri is not None and value == uri else (WITHHELD_URI, 1)


_MIME = _keep(lambda m: isinstance(m, str) and _MIME_TYPE.fullmatch(m) is not None)
_TEXT_CONTENTS: dict[str, Masker] = {"uri": _uri, "mimeType": _MIME, "text": _text}
_BLOB_CONTENTS: dict[str, Masker] = {"uri": _uri}


def _resource_contents(item: Any, paths: Paths, uri: str | None) -> tuple[dict[str, Any], int]:
    """Text or blob resource contents (``resources/read``, an embedded resource)."""
    if not isinstance(item, dict):
        return {"uri": WITHHELD_URI, "text": WITHHELD_CONTENT}, 1
    if "text" in item:
        kept, count = _rebuild(item, _TEXT_CONTENTS, paths, uri)
    else:
        # A blob (or no content MCP defines) cannot be masked field by field.
        kept, count = _rebuild(item, _BLOB_CONTENTS, paths, uri)
        kept["text"] = WITHHELD_CONTENT
    kept.setdefault("uri", WITHHELD_URI)
    return kept, count


def _withheld_block() -> dict[str, Any]:
    return {"type": "text", "text": WITHHELD_CONTENT}


_TEXT_BLOCK: dict[str, Masker] = {"type": _as_is, "text": _text, "annotations": _annotations}
_EMBEDDED_BLOCK: dict[str, Masker] = {
    "type": _as_is,
    "resource": _resource_contents,
    "annotations": _annotations,
}


def _block(block: Any, paths: Paths, uri: str | None) -> tuple[dict[str, Any], int]:
    """A content block: JSON text and embedded text resources are masked; every other block
    (image, audio, resource link, a blob, a type MCP does not define) is withheld."""
    if isinstance(block, dict):
        kind = block.get("type")
        if kind == "text" and "text" in block:
            return _rebuild(block, _TEXT_BLOCK, paths, uri)
        resource = block.get("resource")
        if kind == "resource" and isinstance(resource, dict) and "text" in resource:
            return _rebuild(block, _EMBEDDED_BLOCK, paths, uri)
    return _withheld_block(), 1


def _list_of(item: Masker) -> Masker:
    def masked(value: Any, paths: Paths, uri: str | None) -> tuple[Any, int]:
        if not isinstance(value, list):
            return _DROP, 1
        kept, count = [], 0
        for element in value:
            element, changed = item(element, paths, uri)
            count += changed
            if element is not _DROP:
                kept.append(element)
        return kept, count

    return masked


_PROMPT_MESSAGE: dict[str, Masker] = {"role": _as_is, "content": _block}


def _prompt_message(message: Any, paths: Paths, uri: str | None) -> tuple[Any, int]:
    if not isinstance(message, dict) or message.get("role") not in _ROLES:
        return _DROP, 1
    return _rebuild(message, _PROMPT_MESSAGE, paths, uri)


def _no_completions(value: Any, paths: Paths, uri: str | None) -> tuple[Any, int]:
    # completion/complete: the values complete what is masked, so none are given.
    return {"values": [], "hasMore": False}, 1


_RESULT: dict[str, Masker] = {
    "content": _list_of(_block),
    "structuredContent": _json,
    "isError": _keep(lambda value: isinstance(value, bool)),
    "contents": _list_of(_resource_contents),
    "messages": _list_of(_prompt_message),
    "resultType": _keep(lambda value: value in _RESULT_TYPES),
    "completion": _no_completions,
}


def mask_result(
    result: dict[str, Any], paths: Paths, uri: str | None = None
) -> tuple[dict[str, Any], int]:
    """The result of a ``tools/call``, ``resources/read``, ``prompts/get`` or
    ``completion/complete`` under ``paths``, and how many places were masked or withheld.
    ``uri``: the resource the client asked to read (shown where the result names it). Without
    paths, ``result`` itself, untouched."""
    if not paths:
        return result, 0
    return _rebuild(result, _RESULT, paths, uri)


def _log_data(value: Any, paths: Paths, uri: str | None) -> tuple[Any, int]:
    data, count = _json(value, paths)
    return (WITHHELD, 1) if data is _DROP else (data, count)


_NOTIFICATIONS: dict[str, dict[str, Masker]] = {
    "notifications/progress": {
        "progressToken": _as_is,
        "progress": _keep(_is_number),
        "total": _keep(_is_number),
    },
    "notifications/message": {
        "level": _keep(lambda level: level in LOG_LEVELS),
        "data": _log_data,
    },
}
# Without these, a notification says nothing: it is withheld whole.
_REQUIRED = {"notifications/progress": "progress", "notifications/message": "level"}


def mask_notification(method: str, params: dict[str, Any], paths: Paths) -> dict[str, Any] | None:
    """The params of a notification relayed during a call under ``paths`` (a progress
    notification, a log message), or None to withhold it whole (anything else)."""
    fields = _NOTIFICATIONS.get(method)
    if fields is None:
        return None
    kept, _ = _rebuild(params, fields, paths, None)
    return kept if _REQUIRED[method] in kept else None


# The members MCP defines for a client's answer to each request an upstream may send it.
_ANSWER_MEMBERS = {
    "elicitation/create": ("action", "content"),
    "sampling/createMessage": ("role", "content", "model", "stopReason"),
    "roots/list": ("roots",),
}
_ROOT_MEMBERS = ("uri", "name")


def mask_answer(answer: dict[str, Any], paths: Paths, method: str) -> dict[str, Any] | None:
    """A client's answer to ``method``, a request an upstream sent it (sampling, elicitation,
    roots), under ``paths``: a copy with the fields they name masked, wherever in it they lead,
    and, as a result is rebuilt, only the members MCP defines for that answer (no ``_meta``, at
    its top, in a root or in a sampled content block); None when no path reaches into it
    (withheld whole: fail closed, as for a result). Without paths, ``answer`` itself."""
    if not paths:
        return answer
    copied = copy.deepcopy(answer)
    if _mask_json(copied, paths) is None:
        return None
    kept = {k: v for k, v in copied.items() if k in _ANSWER_MEMBERS.get(method, ())}
    if method == "roots/list" and isinstance(kept.get("roots"), list):
        kept["roots"] = [_members(root, _ROOT_MEMBERS) for root in kept["roots"]]
    elif method == "sampling/createMessage" and "content" in kept:
        content = kept["content"]
        blocks = content if isinstance(content, list) else [content]
        blocks = [
            {k: v for k, v in b.items() if k != "_meta"} if isinstance(b, dict) else b
            for b in blocks
        ]
        kept["content"] = blocks if isinstance(content, list) else blocks[0]
    return kept


def _members(value: Any, members: tuple[str, ...]) -> Any:
    """An object with only ``members``; anything else as it is."""
    return {k: v for k, v in value.items() if k in members} if isinstance(value, dict) else value
