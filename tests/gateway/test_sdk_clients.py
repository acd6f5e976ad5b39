"""The official MCP Python SDK client, with OAuthClientProvider, through bastion's gateway to a
real upstream over stdio and over Streamable HTTP, in both protocol eras."""

from __future__ import annotations

import json
import logging

import pytest
from mcp.shared.exceptions import MCPError

ERAS = {"legacy": "2025-11-25", "auto": "2026-07-28"}


@pytest.mark.parametrize("server", ["desk", "deskhttp"])
@pytest.mark.parametrize("mode", ["legacy", "auto"])
def test_support_agent_searches_with_emails_masked_and_cannot_delete(bastion, server, mode):
    async def script(client, seen):
        seen["tools"] = sorted(t.name for t in (await client.list_tools()).tools)
        seen["resources"] = sorted(str(r.uri) for r in (await client.list_resources()).resources)
        result = await client.call_tool("search_customers", {"query": "a"})
        seen["search"] = result
        try:
            await client.call_tool("delete_customer", {"customer_id": "c-100"})
        except MCPError as e:
            seen["delete_error"] = e
        seen["prompt"] = await client.get_prompt("apology", {"customer_name": "Ada"})

    seen = bastion.sdk("sam", server, mode, script)
    assert seen["protocol_version"] == ERAS[mode]
    assert seen["tools"] == ["delete_customer", "search_customers", "send_email"]
    # The admin-only resource is filtered out of the list.
    assert seen["resources"] == ["customers://directory", "customers://plans"]
    text = seen["search"].content[0].text
    customers = json.loads(text)["customers"]
    assert [c["name"] for c in customers] == ["Ada Lovelace", "Alan Turing", "Grace Hopper"]
    assert {c["email"] for c in customers} == {"[masked]"}
    assert "@example.com" not in seen["search"].model_dump_json()
    error = seen["delete_error"]
    decision_id = error.error.data["decision_id"]
    assert error.error.data["reason"] == "not_permitted"
    assert "has_role" not in error.error.message and "allow" not in json.dumps(error.error.data)
    assert "Ada" in seen["prompt"].messages[0].content.text
    bastion.flush()
    record = bastion.records.get(decision_id)
    assert record.result == "deny"
    assert record.target == f'Tool{{"{server}/delete_customer"}}'
    assert record.principals[0] == 'User{"sam"}'
    assert record.arguments_digest.startswith("hmac-sha256:")
    assert "c-100" not in json.dumps(record.context)  # a digest, never the arguments


def test_upstream_never_sees_the_clients_token(bastion):
    async def script(client, seen):
        await client.call_tool("search_customers", {"query": "grace"})

    before = len(bastion.recorder.requests)
    seen = bastion.sdk("sam", "deskhttp", "auto", script)
    token = seen["tokens"].access_token
    assert len(bastion.recorder.requests) > before
    for request in bastion.recorder.requests:
        headers = {k.decode(): v.decode() for k, v in request["headers"].items()}
        assert "authorization" not in headers
        assert headers.get("x-desk-key") == "upstream-credential-of-bastion"
        assert token not in json.dumps(headers) and token.encode() not in request["body"]


def test_audit_tail_prints_the_latest_decisions(bastion, capsys):
    from bastion.cli import main

    async def script(client, seen):
        await client.call_tool("search_customers", {"query": "alan"})

    bastion.sdk("sam", "desk", "legacy", script)
    bastion.flush()
    database = bastion.app.state.config.database
    # The SDK opens its GET stream (recorded as a connect) beside the call, in either order.
    assert main(["audit", "tail", "-n", "3", "--database", database]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    lines = [line for line in lines if " GET " not in line][-2:]
    assert 'allow        initialize      McpServer{"desk"} by User{"sam"}' in lines[0]
    assert 'allow        tools/call      Tool{"desk/search_customers"} by User{"sam"}' in lines[-1]
    assert "masked=1" in lines[-1]  # one customer matches, one email masked
    assert main(["audit", "tail", "-n", "2", "--json", "--database", database]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    (record,) = [r for r in records if r["method"] == "tools/call"]
    assert record["rules"] and record["obligations"]["masks"] == ["customers.*.email"]
    assert record["context"]["annotations"] == {"readOnlyHint": True}


@pytest.mark.parametrize("server", ["labold", "labhttp"])
def test_an_sdk_upstreams_ordinary_calls_log_no_warning(bastion, server, caplog):
    # labold opens each of its event streams with a priming event (an id and empty data).
    async def script(client, seen):
        seen["text"] = (await client.call_tool("wait", {"seconds": 0, "tag": "quiet"})).content

    with caplog.at_level(logging.INFO, logger="bastion"):
        seen = bastion.sdk("sam", server, "legacy", script)
    assert seen["text"][0].text == "waited 0.0s"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
