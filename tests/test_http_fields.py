"""`bastion.http_fields.media_type`: the one reading of a Content-Type, for every body bastion
takes (the gateway's JSON-RPC, the token endpoint's form, AuthZEN, SSF pushes, client metadata
documents, the body limits in front of them all)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from python_multipart.multipart import parse_options_header

from bastion.http_fields import media_type


@pytest.mark.parametrize(
    ("value", "media"),
    [
        ("application/json", "application/json"),
        ("Application/JSON", "application/json"),
        ("application/json; charset=utf-8", "application/json"),
        ("application/json ;charset=UTF-8", "application/json"),
        ("\tapplication/json\t", "application/json"),
        ("application/secevent+jwt", "application/secevent+jwt"),
        # Compared whole: none of these is application/json.
        ("application/jsonp", "application/jsonp"),
        ("application/json-seq", "application/json-seq"),
        ("text/plain; x=application/json", "text/plain"),
        # No type/subtype of two tokens: no media type at all.
        ("application/json garbage", ""),
        ("application/json/x", ""),
        ("application", ""),
        ("/json", ""),
        ("", ""),
        ("\x85application/json", ""),
        # KELVIN SIGN lowercases to an ASCII k: checked before lowercasing.
        ("application/\u212aey", ""),
    ],
)
def test_a_content_type_is_read_as_its_whole_type_and_subtype(value, media):
    assert media_type(value) == media


_FORMS = ("multipart/form-data", "application/x-www-form-urlencoded")


@given(
    st.sampled_from(_FORMS),
    st.lists(
        st.sampled_from([" ", "\t", "\x0b", "\x85", "\xa0", "\x1c", "", ";", '"']), max_size=3
    ),
    st.lists(st.sampled_from([" ", "\t", "", "; boundary=x", ";", '"', "\x0c"]), max_size=3),
    st.booleans(),
)
def test_what_the_form_parser_takes_for_a_form_is_named_so(form, before, after, upper):
    """The body limits refuse multipart and watch forms by `media_type` while Starlette's form
    parser reads the same header: what the parser takes for a form, `media_type` must too."""
    value = "".join(before) + (form.upper() if upper else form) + "".join(after)
    parsed = parse_options_header(value)[0].decode("latin-1")
    if parsed in _FORMS:
        assert media_type(value) == parsed
