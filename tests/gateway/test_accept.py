"""The client's ``Accept`` is read as RFC 9110 §12.5.1's list of media ranges, through the
running gateway: a GET stream (2025-11-25) and a ``subscriptions/listen`` request (2026-07-28)
open only for a client that accepts ``text/event-stream`` (else 406), and a slow POST is
answered as an event stream only where the client names it (else as JSON: ``*/*`` alone reads
JSON there). ``q=0`` refuses it, ``*/*`` and ``text/*`` accept it, names are compared in any case, and a longer name is not it; before, the
gateway looked for the text ``text/event-stream`` in the field."""

from __future__ import annotations

import uuid

import httpx
import pytest

from .streams import legacy_session, messages, modern_headers, modern_request

# (Accept, whether it takes text/event-stream)
ACCEPTS = [
    ("text/event-stream;q=0", False),
    ("application/json, text/event-stream; q=0", False),
    ("*/*, text/event-stream;q=0", False),
    ("application/json, text/event-streamx", False),
    ("application/json", False),
    ("Text/Event-Stream", True),
    ("application/json, TEXT/EVENT-STREAM", True),
    ("*/*", True),
    ("application/json, text/*", True),
]


def _without_accept(request: httpx.Request) -> httpx.Request:
    del request.headers["accept"]  # httpx sends */* unless told otherwise
    return request


def _check_opened(response: httpx.Response, opens: bool) -> None:
    """An event stream opened (its body never read: it does not end), or a 406."""
    if response.status_code == 200:
        assert opens, "the event stream opened"
        assert response.headers["content-type"].startswith("text/event-stream")
    else:
        response.read()
        assert (response.status_code, opens) == (406, False), response.text
        assert response.json()["error"]["code"] == -32600


@pytest.mark.parametrize(("accept", "opens"), ACCEPTS)
def test_a_get_stream_opens_only_for_an_accept_that_takes_event_streams(bastion, accept, opens):
    session = legacy_session(bastion, bastion.token("sam", "lab"), "lab")
    get = {k: v for k, v in session.items() if k != "content-type"}
    with bastion.http.stream("GET", bastion.mcp_url("lab"), headers={**get, "accept": accept}) as r:
        _check_opened(r, opens)


@pytest.mark.parametrize(
    ("lines", "opens"),
    [
        # Several Accept lines are one list (RFC 9110 §5.3), not their last line.
        (["text/event-stream", "application/json"], True),
        (["application/json", "text/event-stream"], True),
        (["text/event-stream;q=0", "application/json"], False),
    ],
)
def test_accept_sent_on_several_lines_is_read_as_one_list(bastion, lines, opens):
    session = legacy_session(bastion, bastion.token("sam", "lab"), "lab")
    get = [(k, v) for k, v in session.items() if k not in ("content-type", "accept")]
    headers = get + [("accept", line) for line in lines]
    with bastion.http.stream("GET", bastion.mcp_url("lab"), headers=headers) as r:
        _check_opened(r, opens)


def test_a_get_stream_without_accept_is_refused(bastion):
    session = legacy_session(bastion, bastion.token("sam", "lab"), "lab")
    get = {k: v for k, v in session.items() if k not in ("content-type", "accept")}
    request = bastion.http.build_request("GET", bastion.mcp_url("lab"), headers=get)
    response = bastion.http.send(_without_accept(request))
    assert response.status_code == 406, response.text


# A POST's answer is one of two types: an event stream only where the client names it (or
# text/*), so */*, an HTTP library's default, reads JSON.
POST_ACCEPTS = [(a, takes and a != "*/*") for a, takes in ACCEPTS]


@pytest.mark.parametrize(
    ("accept", "streamed"), [*POST_ACCEPTS, ("*/*, text/event-stream", True), (None, False)]
)
def test_a_slow_call_is_answered_as_events_only_to_a_client_that_names_them(
    bastion, accept, streamed
):
    """A call still running after 0.1 s begins its answer as an event stream where the client
    names one; otherwise (an Accept without it, `*/*` alone, or none) the answer is JSON."""
    token = bastion.token("sam", "lab")
    headers = modern_headers(token, "tools/call", "wait")
    arguments = {"seconds": 0.5, "tag": uuid.uuid4().hex}
    request = bastion.http.build_request(
        "POST",
        bastion.mcp_url("lab"),
        json=modern_request(1, "tools/call", {"name": "wait", "arguments": arguments}),
        headers={**headers, "accept": accept or ""},
    )
    response = bastion.http.send(_without_accept(request) if accept is None else request)
    assert response.status_code == 200, response.text
    kind = response.headers["content-type"]
    assert kind.startswith("text/event-stream" if streamed else "application/json"), kind
    assert messages(response)[-1]["result"]["content"][0]["text"] == "waited 0.5s"


@pytest.mark.parametrize(("accept", "opens"), ACCEPTS)
def test_a_listen_request_opens_only_for_an_accept_that_takes_event_streams(bastion, accept, opens):
    token = bastion.token("sam", "labhttp")
    listen = modern_request(
        "watch-1", "subscriptions/listen", {"notifications": {"toolsListChanged": True}}
    )
    headers = {**modern_headers(token, "subscriptions/listen"), "accept": accept}
    with bastion.http.stream("POST", bastion.mcp_url("labhttp"), json=listen, headers=headers) as r:
        _check_opened(r, opens)
