"""schemathesis hooks (SCHEMATHESIS_HOOKS) for bastion's JSON lines bodies: the OpenAPI document
describes a body of JSON lines as an array whose items are the lines."""

from __future__ import annotations

import json
from typing import Any

import schemathesis


@schemathesis.serializer("application/x-ndjson")
def json_lines(ctx: Any, value: Any) -> bytes:
    if isinstance(value, list):
        return "".join(json.dumps(item) + "\n" for item in value).encode()
    # What is not an array has no lines: sent as one line that holds it in an array, which is
    # not a fact (and so is refused, as the document says).
    return (json.dumps([value]) + "\n").encode()


@schemathesis.deserializer("application/x-ndjson")
def json_lines_answer(ctx: Any, response: Any) -> list:
    return [json.loads(line) for line in response.content.splitlines() if line.strip()]
