"""The ``mask`` obligation on MCP results: every spelling of a path redacts, and every place of a
result that can carry data is masked field by field or withheld whole: none fails open."""

from __future__ import annotations

import base64
import copy
import json

import pytest

from bastion.gateway.masks import (
    MASKED,
    WITHHELD,
    WITHHELD_CONTENT,
    WITHHELD_URI,
    compile_paths,
    mask_notification,
    mask_result,
)

EMAIL = "ada@example.com"
PATHS = compile_paths(("customers.*.email",))


def result() -> dict:
    customers = [{"name": "Ada", "email": EMAIL}, {"name": "Alan", "email": "a@x"}]
    return {
        "content": [{"type": "text", "text": json.dumps({"customers": customers}, indent=2)}],
        "structuredContent": {"customers": [dict(c) for c in customers]},
    }


@pytest.mark.parametrize(
    "path", ["customers.*.email", "$.customers.*.email", "$.customers[*].email"]
)
def test_each_spelling_of_a_path_masks_the_field_in_structured_content_and_text(path):
    masked, count = mask_result(result(), compile_paths((path,)))
    assert count == 4
    assert {c["email"] for c in masked["structuredContent"]["customers"]} == {MASKED}
    text = json.loads(masked["content"][0]["text"])
    assert {c["email"] for c in text["customers"]} == {MASKED}
    assert "example.com" not in json.dumps(masked)


def test_an_index_masks_one_element():
    masked, count = mask_result(result(), compile_paths(("customers[0].email",)))
    assert count == 2
    assert [c["email"] for c in masked["structuredContent"]["customers"]] == [MASKED, "a@x"]


def test_without_masks_the_result_is_left_as_it_came():
    untouched = {**result(), "_meta": {"x": EMAIL}, "anything": EMAIL}
    same, count = mask_result(untouched, compile_paths(()))
    assert count == 0 and same is untouched


def test_text_that_is_not_json_is_withheld_whole_when_a_mask_applies():
    masked, count = mask_result({"content": [{"type": "text", "text": f"Ada <{EMAIL}>"}]}, PATHS)
    assert count == 1
    assert masked["content"][0] == {"type": "text", "text": WITHHELD}


def test_text_nested_past_pythons_stack_is_withheld_whole():
    deep = "[" * 100_000 + "]" * 100_000
    masked, count = mask_result({"content": [{"type": "text", "text": deep}]}, PATHS)
    assert (masked["content"][0]["text"], count) == (WITHHELD, 1)


def leaky_blocks() -> list:
    """One content block of every kind MCP defines (and one it does not), each carrying the
    address where a mask cannot reach it."""
    blob = base64.b64encode(EMAIL.encode()).decode()
    meta = {"_meta": {"com.example/raw": EMAIL}}
    return [
        {"type": "text", "text": json.dumps({"customers": [{"email": EMAIL}]}), **meta},
        {"type": "text", "text": json.dumps(EMAIL)},  # JSON, but a string: not maskable
        {"type": "image", "data": blob, "mimeType": "image/png"},
        {"type": "audio", "data": blob, "mimeType": "audio/wav"},
        {"type": "resource_link", "uri": f"mailto:{EMAIL}", "name": "x", "description": EMAIL},
        {"type": "resource", "resource": {"uri": f"customers://{EMAIL}", "text": EMAIL}},
        {"type": "resource", "resource": {"uri": "customers://1", "blob": blob}},
        {
            "type": "resource",
            "resource": {
                "uri": "customers://2",
                "mimeType": "application/json",
                "text": json.dumps({"customers": [{"email": EMAIL}]}),
                **meta,
            },
            "annotations": {"audience": ["user"], "priority": 0.5, "lastModified": EMAIL},
        },
        {"type": "tool_use", "id": "1", "name": "x", "input": {"email": EMAIL}},
        {"type": "something_new", "text": EMAIL},
        EMAIL,
    ]


def test_every_content_block_is_masked_or_withheld():
    leaky = {
        "content": leaky_blocks(),
        "structuredContent": {"customers": [{"email": EMAIL}], "note": "kept: not masked"},
        "isError": False,
        "_meta": {"com.example/raw": EMAIL},
        "task": {"taskId": "t", "statusMessage": EMAIL},
        "somethingNew": EMAIL,
    }
    masked, count = mask_result(leaky, PATHS)
    dumped = json.dumps(masked)
    assert EMAIL not in dumped
    assert base64.b64encode(EMAIL.encode()).decode() not in dumped
    assert set(masked) == {"content", "structuredContent", "isError"}
    assert masked["structuredContent"]["note"] == "kept: not masked"
    blocks = masked["content"]
    assert len(blocks) == len(leaky_blocks())  # the result keeps its shape
    assert json.loads(blocks[0]["text"]) == {"customers": [{"email": MASKED}]}
    assert "_meta" not in blocks[0]
    assert blocks[1] == {"type": "text", "text": WITHHELD}
    for withheld in (2, 3, 4, 6, 8, 9, 10):
        assert blocks[withheld] == {"type": "text", "text": WITHHELD_CONTENT}
    assert blocks[5]["resource"] == {"uri": WITHHELD_URI, "text": WITHHELD}
    embedded = blocks[7]
    assert embedded["resource"]["mimeType"] == "application/json"
    assert json.loads(embedded["resource"]["text"]) == {"customers": [{"email": MASKED}]}
    assert embedded["annotations"] == {"audience": ["user"], "priority": 0.5}
    assert count >= 15


def test_resource_contents_keep_only_the_uri_that_was_asked_for():
    read = {
        "contents": [
            {"uri": "customers://all", "mimeType": "text/plain", "text": EMAIL},
            {"uri": "customers://all", "blob": base64.b64encode(EMAIL.encode()).decode()},
            {"uri": f"customers://{EMAIL}", "text": "{}"},
        ],
        "_meta": {"x": EMAIL},
        "ttlMs": 5,
    }
    masked, _ = mask_result(read, PATHS, "customers://all")
    assert masked == {
        "contents": [
            {"uri": "customers://all", "mimeType": "text/plain", "text": WITHHELD},
            {"uri": "customers://all", "text": WITHHELD_CONTENT},
            {"uri": WITHHELD_URI, "text": "{}"},
        ]
    }


def test_prompt_messages_are_masked_and_their_description_withheld():
    got = {
        "description": EMAIL,
        "messages": [
            {"role": "user", "content": {"type": "text", "text": f"write to {EMAIL}"}},
            {"role": "assistant", "content": {"type": "image", "data": "eA==", "mimeType": "a/b"}},
            {"role": EMAIL, "content": {"type": "text", "text": "{}"}},
        ],
    }
    masked, _ = mask_result(got, PATHS)
    assert masked == {
        "messages": [
            {"role": "user", "content": {"type": "text", "text": WITHHELD}},
            {"role": "assistant", "content": {"type": "text", "text": WITHHELD_CONTENT}},
        ]
    }


def test_completions_under_a_mask_give_no_values():
    masked, count = mask_result({"completion": {"values": [EMAIL], "total": 1}}, PATHS)
    assert masked == {"completion": {"values": [], "hasMore": False}} and count == 1


def test_notifications_during_a_masked_call_keep_no_free_text():
    progress = {"progressToken": 1, "progress": 1, "total": 2, "message": EMAIL, "_meta": {"a": 1}}
    assert mask_notification("notifications/progress", progress, PATHS) == {
        "progressToken": 1,
        "progress": 1,
        "total": 2,
    }
    assert mask_notification("notifications/progress", {"progress": EMAIL}, PATHS) is None
    log = {"level": "info", "logger": EMAIL, "data": {"customers": [{"email": EMAIL}]}}
    assert mask_notification("notifications/message", log, PATHS) == {
        "level": "info",
        "data": {"customers": [{"email": MASKED}]},
    }
    text = {"level": "info", "data": f"found {EMAIL}"}
    assert mask_notification("notifications/message", text, PATHS) == {
        "level": "info",
        "data": WITHHELD,
    }
    assert mask_notification("notifications/message", {"level": EMAIL, "data": 1}, PATHS) is None
    assert mask_notification("notifications/other", {"x": EMAIL}, PATHS) is None


def sdk_list_result() -> dict:
    """What the official SDK answers for a tool returning ``list[Customer]``: its structured
    output wrapped in ``{"result": ...}``, its content one text block per item, unwrapped."""
    customers = [{"name": "Ada", "email": EMAIL}, {"name": "Alan", "email": "alan@example.com"}]
    return {
        "content": [{"type": "text", "text": json.dumps(c, indent=2)} for c in customers],
        "structuredContent": {"result": [dict(c) for c in customers]},
    }


def test_json_the_path_does_not_describe_is_withheld_not_passed_whole():
    # The path fits structuredContent; the content blocks hold the same records in another
    # shape, where it finds nothing: they must not go out as they came.
    masked, count = mask_result(sdk_list_result(), compile_paths(("result.*.email",)))
    assert "example.com" not in json.dumps(masked)
    assert masked["structuredContent"] == {
        "result": [{"name": "Ada", "email": MASKED}, {"name": "Alan", "email": MASKED}]
    }
    assert masked["content"] == [{"type": "text", "text": WITHHELD}] * 2
    assert count == 4


def test_a_path_that_meets_a_value_it_cannot_look_into_masks_that_value():
    # "*.email" walks into {"result": [...]} and meets a list where it names a key; JSON in a
    # string under the path: neither can be masked field by field, so each is masked whole.
    masked, _ = mask_result(sdk_list_result(), compile_paths(("*.email",)))
    assert "example.com" not in json.dumps(masked)
    assert masked["structuredContent"] == {"result": MASKED}
    nested = {"customers": json.dumps([{"email": EMAIL}]), "total": 1}
    masked, _ = mask_result({"structuredContent": nested}, PATHS)
    assert masked["structuredContent"] == {"customers": MASKED, "total": 1}
    # Absent fields and empty lists hide nothing: left as they are.
    empty = {"customers": [], "total": 0}
    masked, count = mask_result({"structuredContent": empty}, PATHS)
    assert masked["structuredContent"] == empty and count == 0
    masked, _ = mask_result({"structuredContent": {"customers": [{"name": "Ada"}, None]}}, PATHS)
    assert masked["structuredContent"] == {"customers": [{"name": "Ada"}, None]}


@pytest.mark.parametrize(
    "path",
    ["$..email", "customers[*]['email']", "customers.[*].email", "customers[].email", "", "$"],
)
def test_a_path_that_cannot_be_read_withholds_every_json_value(path):
    leaky = {**result(), "isError": False}
    masked, count = mask_result(leaky, compile_paths((path, "customers.*.name")))
    assert "example.com" not in json.dumps(masked)
    assert "structuredContent" not in masked
    assert masked["content"] == [{"type": "text", "text": WITHHELD}]
    assert masked["isError"] is False and count == 2
    log = {"level": "info", "data": {"customers": [{"email": EMAIL}]}}
    assert mask_notification("notifications/message", log, compile_paths((path,))) == {
        "level": "info",
        "data": WITHHELD,
    }


def test_members_of_any_shape_where_mcp_names_a_value_are_left_out_not_a_failure():
    """An upstream's ``resultType``, a message's ``role`` and an annotation's ``audience`` are
    checked against the values MCP names; a list or an object there was a TypeError (asked of a
    set, it is unhashable), bastion's own failure. Now it is left out, as any other odd value."""
    odd = {
        "resultType": {"x": 1},
        "messages": [{"role": ["user"], "content": {"type": "text", "text": "{}"}}],
        "content": [{"type": "text", "text": "{}", "annotations": {"audience": [{"r": 1}]}}],
    }
    masked, count = mask_result(odd, PATHS)
    assert "resultType" not in masked and masked["messages"] == []
    assert masked["content"] == [{"type": "text", "text": "{}", "annotations": {}}]
    assert count == 3


@pytest.mark.parametrize(
    "text",
    [
        # The first "customers" holds the address; bastion's parser keeps the last, which is
        # empty, null or without the field: nothing to change, so the text went out as it came,
        # and a reader that keeps the first key (or a model reading the text) saw the address.
        '{"customers": [{"email": "EMAIL"}], "customers": []}',
        '{"customers": [{"email": "EMAIL"}], "customers": null}',
        '{"customers": [{"name": "Ada", "email": "EMAIL", "email": null}]}',
        '{"customers": [{"email": "EMAIL"}], "customers": [{"name": "Ada"}]}',
    ],
)
def test_json_text_goes_out_as_bastion_read_it_never_as_the_upstream_wrote_it(text):
    text = text.replace("EMAIL", EMAIL)
    contents = {"uri": "customers://all", "text": text}
    read = {"contents": [contents]}
    call = {"content": [{"type": "text", "text": text}, {"type": "resource", "resource": contents}]}
    for leaky in (read, call):
        masked, _ = mask_result(copy.deepcopy(leaky), PATHS, "customers://all")
        assert EMAIL not in json.dumps(masked)
