"""`bastion.http_fields`: `media_type`, the one reading of a Content-Type, for every body bastion
takes (the gateway's JSON-RPC, the token endpoint's form, AuthZEN, SSF pushes, client metadata
documents, the body limits in front of them all); and `accepts`, the one reading of an Accept
field (the gateway's event streams)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from python_multipart.multipart import parse_options_header

from bastion.http_fields import accepts, media_type


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


EVENTS = "text/event-stream"


@pytest.mark.parametrize(
    ("accept", "accepted"),
    [
        ("text/event-stream", True),
        ("application/json, text/event-stream", True),
        ("application/json,text/event-stream;q=0.5", True),
        # Media types are case-insensitive (RFC 9110 §8.3.1), and so is the q parameter.
        ("Text/Event-Stream", True),
        ("TEXT/EVENT-STREAM;Q=1", True),
        ("text/event-stream ; charset=utf-8", True),
        # Ranges count, the most specific one deciding.
        ("*/*", True),
        ("text/*", True),
        ("*/*;q=0, text/event-stream", True),
        ("text/*;q=0, text/event-stream;q=0.001", True),
        ("text/event-stream;q=1.000", True),
        ("text/event-stream;q=0.", False),
        # q=0 is "not acceptable" (RFC 9110 §12.5.1), whatever broader range says otherwise.
        ("text/event-stream;q=0", False),
        ("text/event-stream; q=0.000", False),
        ("*/*, text/event-stream;q=0", False),
        ("text/event-stream;q=0, */*", False),
        ("text/*;q=0, */*", False),
        ("*/*;q=0", False),
        # Equally specific ranges that disagree: the highest weight.
        ("text/event-stream;q=0, text/event-stream;q=0.2", True),
        # A range is its whole type/subtype, never a part of it.
        ("application/json, text/event-streamx", False),
        ("text/event-stream-x", False),
        ("xtext/event-stream", False),
        ("text/event-stream/x", False),
        ("application/json", False),
        ("application/*", False),
        ("*/event-stream", False),
        ("", False),
        # Malformed elements are skipped and the rest read.
        ("text/event-stream;q=2", False),
        ("text/event-stream;q=0.5.5", False),
        ("text/event-stream;q=-1", False),
        ("text/event-stream;q=0.1234", False),
        ("text/event-stream;q=", False),
        ("text/event-stream;q=\u0661", False),  # an Arabic-Indic one is no digit here
        ("text/event-stream;q=zero, application/json", False),
        ("*/*, text/event-stream;q=high", True),
        ("text/event-stream;q=oops, text/event-stream", True),
        (",,; ;,text/event-stream", True),
        ("\u212aext/event-stream", False),
        ("text/event-stream\u0130", False),
        # A quoted-string's commas and semicolons split nothing; an unterminated one runs on.
        ('text/event-stream;x="a, b;q=0"', True),
        ('text/event-stream;x="a\\", b;q=0"', True),
        ('text/event-stream;x="a\\"";q=0', False),
        ('application/json;x="a, text/event-stream"', False),
        ('application/json;x="a\\", text/event-stream', False),
        ('text/event-stream;x="never ends, */*;q=0', True),
    ],
)
def test_accept_is_read_as_media_ranges_with_weights(accept, accepted):
    assert accepts(accept, EVENTS) is accepted


@pytest.mark.parametrize(
    ("accept", "accepted"),
    [
        ("*/*", False),
        ("*/*, text/event-stream", True),
        ("application/json, text/*", True),
        ("*/*, text/*;q=0", False),
        ("text/event-stream;q=0, */*", False),
    ],
)
def test_accept_without_anything_takes_only_a_range_that_names_the_type(accept, accepted):
    """``anything=False`` (the gateway's POST, whose answer may be JSON): ``*/*`` takes nothing."""
    assert accepts(accept, EVENTS, anything=False) is accepted


@given(
    st.lists(
        st.sampled_from(
            [
                "text/event-stream",
                "TEXT/Event-Stream",
                "text/*",
                "*/*",
                "application/json",
                "text/event-streamx",
                "text/plain",
                "garbage",
                "",
            ]
        ),
        max_size=5,
    ),
    st.lists(st.sampled_from(["", ";q=0", ";q=0.5", ";q=1", ";q=bad", ';x="a,b"']), max_size=5),
)
def test_accept_matches_a_reading_by_specificity(ranges, weights):
    """Compared with the rule stated plainly: of the ranges that cover the type, those of the
    highest specificity with a readable weight decide, by their highest weight."""
    elements = [r + (weights[i] if i < len(weights) else "") for i, r in enumerate(ranges)]
    covering: dict[int, list[float]] = {}
    for element in elements:
        name, _, parameter = element.partition(";")
        specific = {"text/event-stream": 2, "text/*": 1, "*/*": 0}.get(name.lower())
        q = {"": 1.0, "q=0": 0.0, "q=0.5": 0.5, "q=1": 1.0, 'x="a,b"': 1.0}.get(parameter)
        if specific is not None and q is not None:
            covering.setdefault(specific, []).append(q)
    expected = bool(covering) and max(covering[max(covering)]) > 0
    assert accepts(", ".join(elements), EVENTS) is expected
