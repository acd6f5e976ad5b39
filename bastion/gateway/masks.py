"""The ``mask`` obligation: redact JSON paths of a result before it leaves bastion.

A path is dot-separated keys; ``*`` stands for every element of a list or every key of an
object: ``customers.*.email``. The JSONPath spellings ``$.customers[*].email`` and ``items[0]``
mean the same. Masks apply to a tool's ``structuredContent`` and to every text item that holds
JSON (tool content, resource contents, prompt messages). Text that is not JSON cannot be masked
field by field, so it is withheld whole: a mask never fails open.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

MASKED = "[masked]"
WITHHELD = "[withheld by bastion: a field of this result is masked and this text is not JSON]"

_INDEX = re.compile(r"\[(\*|\d+)\]")


@functools.lru_cache(maxsize=1024)
def compile_paths(paths: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    """Each path as its keys; compiled once per set of paths, as the policy names them."""
    return tuple(
        tuple(_INDEX.sub(r".\1", p.removeprefix("$").removeprefix(".")).split("."))
        for p in paths
        if p
    )


def _redact(value: Any, path: tuple[str, ...]) -> int:
    """Redact ``path`` in ``value`` in place; return how many fields were redacted."""
    if not path:
        return 0
    head, rest = path[0], path[1:]
    slots: Any
    if isinstance(value, dict):
        slots = list(value) if head == "*" else ([head] if head in value else [])
    elif isinstance(value, list):
        if head == "*":
            slots = range(len(value))
        elif head.isdigit() and int(head) < len(value):
            slots = [int(head)]
        else:
            return 0
    else:
        return 0
    count = 0
    for slot in slots:
        if rest:
            count += _redact(value[slot], rest)
        else:
            value[slot] = MASKED
            count += 1
    return count


def _mask_text(item: dict[str, Any], paths: tuple[tuple[str, ...], ...]) -> int:
    text = item.get("text")
    if not isinstance(text, str):
        return 0
    try:
        data = json.loads(text)
    except ValueError:
        item["text"] = WITHHELD
        return 1
    if not isinstance(data, dict | list):
        item["text"] = WITHHELD
        return 1
    count = sum(_redact(data, p) for p in paths)
    if count:
        # Without indent: json's C encoder, not its pure-Python indenting one (10x slower).
        item["text"] = json.dumps(data)
    return count


def mask_result(result: dict[str, Any], paths: tuple[tuple[str, ...], ...]) -> int:
    """Apply ``paths`` to an MCP result in place; return how many fields were changed."""
    if not paths:
        return 0
    count = 0
    structured = result.get("structuredContent")
    if isinstance(structured, dict | list):
        count += sum(_redact(structured, p) for p in paths)
    for item in result.get("content") or ():
        if isinstance(item, dict):
            count += _mask_text(item, paths)
    for item in result.get("contents") or ():  # resources/read
        if isinstance(item, dict):
            count += _mask_text(item, paths)
    for message in result.get("messages") or ():  # prompts/get
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, dict):
            count += _mask_text(content, paths)
    return count
