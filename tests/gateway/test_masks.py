"""The ``mask`` obligation on MCP results: every spelling of a path redacts, none fails open."""

from __future__ import annotations

import json

import pytest

from bastion.gateway.masks import MASKED, WITHHELD, compile_paths, mask_result


def result() -> dict:
    customers = [{"name": "Ada", "email": "ada@example.com"}, {"name": "Alan", "email": "a@x"}]
    return {
        "content": [{"type": "text", "text": json.dumps({"customers": customers}, indent=2)}],
        "structuredContent": {"customers": [dict(c) for c in customers]},
    }


@pytest.mark.parametrize(
    "path", ["customers.*.email", "$.customers.*.email", "$.customers[*].email"]
)
def test_each_spelling_of_a_path_masks_the_field_in_structured_content_and_text(path):
    masked = result()
    assert mask_result(masked, compile_paths((path,))) == 4
    assert {c["email"] for c in masked["structuredContent"]["customers"]} == {MASKED}
    text = json.loads(masked["content"][0]["text"])
    assert {c["email"] for c in text["customers"]} == {MASKED}
    assert "example.com" not in json.dumps(masked)


def test_an_index_masks_one_element():
    masked = result()
    assert mask_result(masked, compile_paths(("customers[0].email",))) == 2
    assert [c["email"] for c in masked["structuredContent"]["customers"]] == [MASKED, "a@x"]


def test_without_masks_the_result_is_left_as_it_came():
    untouched = result()
    assert mask_result(untouched, compile_paths(())) == 0
    assert untouched == result()


def test_text_that_is_not_json_is_withheld_whole_when_a_mask_applies():
    masked = {"content": [{"type": "text", "text": "Ada <ada@example.com>"}]}
    assert mask_result(masked, compile_paths(("customers.*.email",))) == 1
    assert masked["content"][0]["text"] == WITHHELD
