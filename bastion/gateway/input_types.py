"""Tool arguments of the JSON types their tool declares (its ``inputSchema``), or refused.

An MCP server converts an argument to the type its schema declares before acting on it: the
official SDK validates with pydantic in lax mode, which reads ``"5000"``, ``" 5000 "``,
``"5_000"`` and ``true`` as the integer asked for and ``"yes"`` or ``1`` as ``true``, and the SDK
itself reads a list or an object given as JSON text as that list or object. bastion decides on
the arguments as JSON reads them, so a rule on the number, the boolean or the list would not see
what ran. An argument of a JSON type its schema does not allow is therefore refused before it is
decided: what is decided is what the tool acts on.
"""

from __future__ import annotations

from typing import Any

from bastion.untrusted_json import place

_NAMES = {str: "string", bool: "boolean", dict: "object", list: "array", type(None): "null"}


def type_refused(schema: Any, arguments: dict[str, Any], most: int) -> str | None:
    """Why ``arguments`` do not have the JSON types ``schema`` (a tool's ``inputSchema``)
    declares, naming the first that does not, or None. Only types are checked (``type``, through
    ``properties``, ``additionalProperties``, ``items``, ``prefixItems``, ``$ref`` to the
    schema's own definitions, ``allOf``, ``anyOf``, ``oneOf``): a value the tool would convert.
    A check that would take more than ``most`` steps (a schema and a value each visited, ``anyOf``
    branches each tried: many arguments, or a schema that refers to itself in a loop) refuses
    them: what goes unchecked could be what runs otherwise than decided."""
    if not isinstance(schema, dict):
        return None
    steps = [most]
    try:
        why = _refused(schema, arguments, schema, ("params", "arguments"), steps, ())
    except RecursionError:
        return "params.arguments: the tool's inputSchema nests too deeply to check them against"
    if steps[0] < 0:
        return (
            f"params.arguments: more than {most} steps to check against the tool's inputSchema"
            " ([gateway] max_argument_checks)"
        )
    return why


def _json_type(value: Any) -> str:
    cls = value.__class__
    if cls is int:
        return "integer"
    if cls is float:
        return "number"
    return _NAMES.get(cls, "unknown")


def _admits(types: Any, value: Any) -> bool:
    kind = _json_type(value)
    if types.__class__ is str:
        if types == kind:  # the usual case: one type, the one sent
            return True
        types = (types,)
    elif not isinstance(types, list) or not all(isinstance(t, str) for t in types):
        return True  # no type this can read: nothing said
    if kind in types:
        return True
    if kind == "integer":
        return "number" in types
    # JSON Schema's integer is a number with no fraction: 1000.0 is one (the SDK reads 1000).
    return kind == "number" and "integer" in types and value.is_integer()


def _refused(
    schema: Any, value: Any, root: dict, path: tuple, steps: list[int], refs: tuple
) -> str | None:
    """``refs``: the references followed to ``schema`` at this value; one met again is a loop,
    which says nothing more than it did the first time."""
    steps[0] -= 1
    if steps[0] < 0:
        return "too many steps"  # `type_refused` says so
    if schema.__class__ is not dict:
        return None
    if "$ref" in schema:
        ref = schema["$ref"]
        target = _definition(root, ref) if isinstance(ref, str) and ref not in refs else None
        if target is not None and (why := _refused(target, value, root, path, steps, (*refs, ref))):
            return why
    types = schema.get("type")
    if types is not None and not _admits(types, value):
        said = " or ".join(types) if isinstance(types, list) else types
        return f"{place(path)}: the tool's inputSchema says {said}, not {_json_type(value)}"
    if "allOf" in schema:
        for branch in _branches(schema, "allOf"):
            if why := _refused(branch, value, root, path, steps, refs):
                return why
    for key in ("anyOf", "oneOf"):
        branches = _branches(schema, key) if key in schema else None
        if branches:
            whys = [_refused(branch, value, root, path, steps, refs) for branch in branches]
            if all(whys):
                return whys[0]
    cls = value.__class__
    if cls is dict:
        properties = schema.get("properties")
        if properties.__class__ is not dict:
            properties = {}
        other = schema.get("additionalProperties")
        for key, item in value.items():
            below = properties.get(key, other)
            if below.__class__ is dict and (
                why := _refused(below, item, root, (*path, key), steps, ())
            ):
                return why
    elif cls is list:
        first = schema.get("prefixItems")
        first = first if isinstance(first, list) else []
        rest = schema.get("items")
        for i, item in enumerate(value):
            below = first[i] if i < len(first) else rest
            if below.__class__ is dict and (
                why := _refused(below, item, root, (*path, i), steps, ())
            ):
                return why
    return None


def _branches(schema: dict, key: str) -> list:
    branches = schema.get(key)
    return branches if isinstance(branches, list) else []


def _definition(root: dict, ref: str) -> Any:
    """The schema ``ref`` names within ``root`` (``#/$defs/Name``, ``#/definitions/Name``),
    or None: a reference elsewhere is not fetched, and says nothing here."""
    if not ref.startswith("#/"):
        return None
    found: Any = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(found, dict) or part not in found:
            return None
        found = found[part]
    return found
