"""A tool call is decided on the arguments the upstream acts on: the same bytes, read by bastion
and then by a real MCP server (the official SDK's, pydantic behind it), may not mean two things.

The policy denies transfers above 1000, to mallory, copied to mallory, or confirmed; each attempt
here sends what the upstream would take for one of those in a spelling bastion reads otherwise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from .streams import ENVELOPE, messages, modern_headers
from .support import start

TYPED = Path(__file__).resolve().parent / "typed_server.py"
POLICY = """
allow(_actor, _action: String, _it: McpServer) if context.server = "typed";
allow(_actor, _action: String, _it: Tool) if context.server = "typed";
deny(_user: User, "call", Tool{"typed/transfer"}) if context.arguments.amount > 1000;
deny(_user: User, "call", Tool{"typed/transfer"}) if context.arguments.to = "mallory";
deny(_user: User, "call", Tool{"typed/transfer"}) if "mallory" in context.arguments.cc;
deny(_user: User, "call", Tool{"typed/transfer"}) if context.arguments.confirm = true;
"""


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    folder = tmp_path_factory.mktemp("meaning")
    trace = folder / "typed-trace.jsonl"
    typed = {
        "name": "typed",
        "command": sys.executable,
        "args": [str(TYPED)],
        "env": {"TYPED_TRACE": str(trace)},
    }
    with start(folder, policy_extra=POLICY, more_upstreams=(typed,)) as running:
        running.typed_trace = trace
        yield running


@pytest.fixture(scope="module")
def token(bastion):
    return bastion.token("sam", "typed")


def received(bastion) -> list[dict]:
    """The arguments each call that ran got, as the tool's Python function read them."""
    if not bastion.typed_trace.exists():
        return []
    return [json.loads(line) for line in bastion.typed_trace.read_text().splitlines()]


def post(bastion, token, arguments_text: str):
    """tools/call of ``transfer`` whose ``arguments`` are ``arguments_text``, as it is."""
    envelope = json.dumps(ENVELOPE)
    body = (
        '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"transfer",'
        f'"arguments":{arguments_text},"_meta":{{"io.modelcontextprotocol/protocolVersion":'
        f'"2026-07-28","io.modelcontextprotocol/clientCapabilities":{{}}}}}}}}'
    )
    assert json.loads(body)["params"]["_meta"] == json.loads(envelope)
    return bastion.http.post(
        bastion.mcp_url("typed"),
        content=body.encode(),
        headers=modern_headers(token, "tools/call", "transfer"),
    )


def outcome(response) -> str:
    """``ran``, ``denied`` (by the policy), ``refused`` (before any decision) or ``unreadable``
    (not read as JSON: the parse error)."""
    message = messages(response)[-1]
    if "result" in message and not message["result"].get("isError"):
        return "ran"
    code = message["error"]["code"]
    kinds = {-32003: "denied", -32602: "refused", -32700: "unreadable"}
    return kinds.get(code, f"error {code}: {message}")


def test_a_key_given_twice_is_refused_before_any_decision(bastion, token):
    """A proxy or log that keeps the first value would read another call than one that keeps
    the last, as bastion and the upstream do: refused whole, never decided (before 2026-12-07 it
    was decided and run on its last value)."""
    before = len(received(bastion))
    for arguments in (
        '{"to":"alice","to":"mallory","amount":5}',
        '{"to":"mallory","to":"alice","amount":5}',
        '{"to":"bob","amount":5,"amount":5000}',
        # The whole arguments object given twice.
        '{"to":"bob","amount":5},"arguments":{"to":"mallory","amount":5}',
    ):
        assert outcome(post(bastion, token, arguments)) == "unreadable", arguments
    assert received(bastion)[before:] == []


def test_numbers_are_read_as_the_upstream_reads_them(bastion, token):
    before = len(received(bastion))
    for text, expected in (("1000.0", "ran"), ("1e3", "ran"), ("-0", "ran"), ("1001.0", "denied")):
        assert outcome(post(bastion, token, f'{{"to":"bob","amount":{text}}}')) == expected, text
    huge = '{"to":"bob","amount":10000000000000000000001}'
    assert outcome(post(bastion, token, huge)) == "denied"
    assert [r["amount"] for r in received(bastion)[before:]] == [1000, 1000, 0]


@pytest.mark.parametrize(
    "arguments",
    [
        '{"to":"bob","amount":"5000"}',
        '{"to":"bob","amount":" 5000 "}',
        '{"to":"bob","amount":"5_000"}',
        '{"to":"bob","amount":true}',
        '{"to":"bob","amount":5,"confirm":"yes"}',
        '{"to":"bob","amount":5,"confirm":1}',
        '{"to":"bob","amount":5,"cc":"[\\"mallory\\"]"}',
    ],
)
def test_an_argument_of_another_type_than_the_tool_declares_is_refused(bastion, token, arguments):
    """The upstream converts it to the declared type (pydantic's lax mode; the SDK reads a list
    given as JSON text), after bastion decided on the text: a rule on the number, the boolean or
    the list never saw what ran."""
    before = len(received(bastion))
    response = post(bastion, token, arguments)
    assert outcome(response) == "refused", received(bastion)[before:]
    assert "inputSchema" in messages(response)[-1]["error"]["message"]
    assert received(bastion)[before:] == []


CALL = (
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"transfer","arguments":'
    b'{"to":"mallory","amount":5000},"_meta":{"io.modelcontextprotocol/protocolVersion":'
    b'"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}'
)


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"\xef\xbb\xbf" + CALL, "application/json"),  # a byte order mark first
        (CALL + CALL, "application/json"),  # a second message after the first
        (CALL + b" garbage", "application/json"),
        (CALL.replace(b'"mallory"', b'"mall\xc1\xafory"'), "application/json"),  # overlong "/"
        (CALL.decode().encode("utf-16-le"), "application/json; charset=utf-16"),
    ],
    ids=["BOM", "two values", "garbage after", "overlong UTF-8", "UTF-16"],
)
def test_a_body_a_parser_could_read_otherwise_is_refused_unread(bastion, token, body, content_type):
    before = len(received(bastion))
    headers = {**modern_headers(token, "tools/call", "transfer"), "content-type": content_type}
    response = bastion.http.post(bastion.mcp_url("typed"), content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == -32700
    assert received(bastion)[before:] == []


def test_a_call_without_an_id_is_not_forwarded(bastion, token):
    """A notification carrying a call: acknowledged, and nothing runs."""
    before = len(received(bastion))
    body = CALL.replace(b'"id":1,', b"").replace(b"5000", b"5").replace(b"mallory", b"bob")
    response = bastion.http.post(
        bastion.mcp_url("typed"),
        content=body,
        headers=modern_headers(token, "tools/call", "transfer"),
    )
    assert response.status_code == 202, response.text
    assert received(bastion)[before:] == []


def test_text_reaches_a_stdio_upstream_as_it_was_decided(bastion, token):
    """Newlines as escapes, line and paragraph separators, and a message longer than a pipe's
    buffer (64 KiB as bastion writes it, each character escaped): one message, read whole."""
    before = len(received(bastion))
    to = "a\nb\r\nc\u2028d\u2029e" + "\u2028" * 20_000
    arguments = json.dumps({"to": to, "amount": 5}, ensure_ascii=False)
    assert outcome(post(bastion, token, arguments)) == "ran"
    assert [r["to"] for r in received(bastion)[before:]] == [to]


# -- the check's bound: what it cannot finish checking is refused, not let through ------------

TRANSFER_SCHEMA = {
    "type": "object",
    "properties": {
        "to": {"type": "string"},
        "amount": {"type": "integer"},
        "cc": {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}]},
    },
}


def test_arguments_the_check_cannot_finish_within_its_bound_are_refused():
    from bastion.gateway.input_types import type_refused

    # Past the bound, the number in the last place would go unchecked (and "5000" run as 5000).
    for arguments in ({"cc": ["ok"] * 40 + [5]}, {"cc": ["ok"] * 40, "amount": "5000"}):
        why = type_refused(TRANSFER_SCHEMA, arguments, 30)
        assert why is not None and "max_argument_checks" in why, why
    # Within it, they are checked as ever.
    assert type_refused(TRANSFER_SCHEMA, {"cc": ["ok"] * 40}, 100) is None
    assert "not string" in type_refused(TRANSFER_SCHEMA, {"cc": ["ok"] * 40, "amount": "5"}, 100)
    assert "not integer" in type_refused(TRANSFER_SCHEMA, {"cc": ["ok"] * 40 + [5]}, 100)


def test_a_schema_that_refers_to_itself_in_a_loop_is_checked_once_round_it():
    """A loop of references (no value read on the way) says nothing more the second time round:
    it neither overflows the stack nor stops the types it does say from being checked."""
    from bastion.gateway.input_types import type_refused

    empty = {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}
    assert type_refused(empty, {"amount": "5000"}, 100_000) is None
    typed = {
        "$ref": "#/$defs/a",
        "$defs": {
            "a": {
                "type": "object",
                "properties": {"amount": {"type": "integer"}, "next": {"$ref": "#/$defs/a"}},
                "allOf": [{"$ref": "#/$defs/b"}],
            },
            "b": {"$ref": "#/$defs/a"},
        },
    }
    assert "not string" in type_refused(typed, {"amount": "5000"}, 100_000)
    nested = {"next": {"next": {"amount": "5000"}}}
    assert "next.next.amount" in type_refused(typed, nested, 100_000)


def test_a_schema_nested_past_the_stack_refuses_the_call():
    from bastion.gateway.input_types import type_refused

    deep: dict = {"type": "object"}
    for _ in range(5000):
        deep = {"allOf": [deep]}
    why = type_refused(deep, {"amount": 1}, 100_000)
    assert why is not None and "nests too deeply" in why, why


def test_the_bound_is_a_setting_of_at_least_one():
    from bastion.gateway.config import GatewayConfig

    assert GatewayConfig.from_mapping({}).max_argument_checks == 100_000
    assert GatewayConfig.from_mapping({"max_argument_checks": 7}).max_argument_checks == 7
    with pytest.raises(ValueError, match="max_argument_checks"):
        GatewayConfig.from_mapping({"max_argument_checks": 0})
