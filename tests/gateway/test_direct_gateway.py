"""The gateway's ``POST /mcp/<server>`` run from the HTTP protocol (`bastion.server.direct_gateway`),
past Starlette and the application's middleware: the same answers as through the application, on
connections kept alive, with requests pipelined, bodies limited and timed, clients that leave, event
streams, unexpected failures; and everything it does not take handed to the application.

The bastion here is the gateway tests' (tests/gateway/support.py), served by `bastion serve`'s own
HTTP protocol and options (`bastion.server.commands.connection_limits`). Whether a request took
the direct path is read from ``bastion_direct_gateway_requests_total``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import threading
import time
import uuid
from dataclasses import replace
from unittest import mock
from urllib.parse import urlsplit

import pytest
import uvicorn

from bastion.server.commands import connection_limits
from bastion.server.config import ServerConfig
from tests.oauth import support as oauth_support
from tests.security.test_edge import answers_on, head_and_body, status_of
from tests.waits import eventually

from . import support
from .streams import events, messages, modern_headers, modern_request, traced

# The gateway tests' gateway.max_body_bytes (tests/gateway/support.py).
BODY_LIMIT = 65536
BODY_TIMEOUT = 1


@contextlib.contextmanager
def uvicorn_serving(app, sock, **options):
    """uvicorn serving ``app`` on ``sock`` in a thread, with ``options``; yields its URL."""
    config = uvicorn.Config(app, log_level="warning", access_log=False, **options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    eventually(lambda: server.started or not thread.is_alive(), every=0.01)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


class ServedLikeBastionServe(oauth_support.Servers):
    """tests.oauth.support.Servers, with `bastion serve`'s protocol and options for bastion's
    own application."""

    def serve(self, app, sock, **options) -> str:
        state = getattr(app, "state", None)
        if state is not None and getattr(state, "gateway", None) is not None:
            options = {"access_log": False, **connection_limits(state.config, app), **options}
        return super().serve(app, sock, **options)


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    access = logging.getLogger("uvicorn.access")

    def config(**settings):
        return ServerConfig(**settings, body_timeout=BODY_TIMEOUT)

    try:
        with (
            mock.patch.object(support, "ServerConfig", config),
            mock.patch.object(support, "Servers", ServedLikeBastionServe),
            support.start(tmp_path_factory.mktemp("direct-gateway")) as running,
        ):
            # As `bastion serve` without access_log (whose lines the protocol leaves to the
            # application), whatever handlers pytest's log capture puts on the access logger.
            access.hasHandlers = lambda: False  # type: ignore[method-assign]
            yield running
    finally:
        vars(access).pop("hasHandlers", None)


def direct_requests(bastion) -> int:
    text = bastion.http.get(f"{bastion.url}/metrics").text
    found = re.search(r"^bastion_direct_gateway_requests_total (\S+)$", text, re.M)
    assert found, "no bastion_direct_gateway_requests_total in /metrics"
    return int(float(found[1]))


def call(request_id, tool: str, arguments: dict) -> dict:
    return modern_request(request_id, "tools/call", {"name": tool, "arguments": arguments})


def raw_post(bastion, server: str, token: str, body: bytes, tool: str, extra: str = "") -> bytes:
    url = urlsplit(bastion.mcp_url(server))
    headers = {**modern_headers(token, "tools/call", tool), "content-length": str(len(body))}
    head = f"POST {url.path} HTTP/1.1\r\nhost: {url.netloc}\r\n{extra}"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return head.encode() + body


def connect(bastion) -> socket.socket:
    url = urlsplit(bastion.url)
    return socket.create_connection((url.hostname, url.port), timeout=30)


def chunked(body: bytes):
    """A body sent chunked: framed so that only the application reads it."""
    yield body


def search(request_id=1, query: str = "alan") -> dict:
    return call(request_id, "search_customers", {"query": query})


def test_a_call_is_run_from_the_protocol_and_answered_as_through_the_application(bastion):
    token = bastion.token("sam", "desk")
    headers = modern_headers(token, "tools/call", "search_customers")
    before = direct_requests(bastion)
    direct = bastion.http.post(bastion.mcp_url("desk"), json=search(), headers=headers)
    assert direct_requests(bastion) == before + 1
    body = json.dumps(search()).encode()
    through_app = bastion.http.post(bastion.mcp_url("desk"), content=chunked(body), headers=headers)
    assert direct_requests(bastion) == before + 1
    assert direct.status_code == through_app.status_code == 200
    # JSON, or an event stream when the call took longer than a moment: the same messages.
    assert messages(direct) == messages(through_app)
    assert direct.headers["server"] == through_app.headers["server"] == "uvicorn"
    # Masked as through the application.
    assert "alan@example.com" not in direct.text and "[masked]" in direct.text


def test_refusals_are_the_applications(bastion):
    token = bastion.token("sam", "desk")
    url = bastion.mcp_url("desk")
    before = direct_requests(bastion)
    # No token: 401 with the challenge; a page of another origin: 403; a refused tool.
    unauthenticated = bastion.http.post(url, json=search(), headers={"accept": "application/json"})
    assert unauthenticated.status_code == 401
    assert "resource_metadata" in unauthenticated.headers["www-authenticate"]
    headers = {**modern_headers(token, "tools/call", "search_customers")}
    evil = bastion.http.post(
        url, json=search(), headers={**headers, "origin": "http://evil.example.com"}
    )
    assert evil.status_code == 403
    refused = bastion.http.post(
        url,
        json=call(2, "delete_customer", {"customer_id": "c-101"}),
        headers=modern_headers(token, "tools/call", "delete_customer"),
    )
    assert messages(refused)[-1]["error"]["data"]["reason"] == "not_permitted"
    assert direct_requests(bastion) == before + 3


def test_answers_to_an_allowed_page_carry_cors_as_through_the_application(bastion):
    # The gateway's own origin is allowed by default (docs/gateway.md, Origin).
    token = bastion.token("sam", "desk")
    url = bastion.mcp_url("desk")
    page = {"origin": bastion.url}
    before = direct_requests(bastion)
    unauthenticated = bastion.http.post(url, json=search(), headers=page)
    served = bastion.http.post(
        url,
        json=search(),
        headers={**modern_headers(token, "tools/call", "search_customers"), **page},
    )
    assert direct_requests(bastion) == before + 2
    assert (unauthenticated.status_code, served.status_code) == (401, 200)
    for answer in (unauthenticated, served):
        assert answer.headers["access-control-allow-origin"] == bastion.url
        assert "www-authenticate" in answer.headers["access-control-expose-headers"]
        assert answer.headers["vary"] == "Origin"
    plain = bastion.http.post(
        url, json=search(), headers=modern_headers(token, "tools/call", "search_customers")
    )
    assert plain.status_code == 200
    assert "access-control-allow-origin" not in plain.headers and "vary" not in plain.headers


def test_a_kept_alive_connection_carries_two_calls(bastion):
    token = bastion.token("sam", "desk")
    before = direct_requests(bastion)
    with connect(bastion) as s:
        for request_id in (1, 2):
            s.sendall(
                raw_post(
                    bastion,
                    "desk",
                    token,
                    json.dumps(search(request_id)).encode(),
                    "search_customers",
                )
            )
            (answer,) = answers_on(s, 1)
            assert status_of(answer) == 200 and b"connection: close" not in answer.lower()
            _, body = head_and_body(answer)
            assert body["id"] == request_id and "result" in body
    assert direct_requests(bastion) == before + 2


def test_pipelined_calls_are_answered_in_the_order_asked(bastion):
    token = bastion.token("sam", "desk")
    requests = b"".join(
        raw_post(bastion, "desk", token, json.dumps(search(i, q)).encode(), "search_customers")
        for i, q in ((1, "alan"), (2, "grace"), (3, "alan"))
    )
    healthz = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"
    with connect(bastion) as s:
        s.sendall(requests + healthz)
        answers = answers_on(s, 4)
    assert [status_of(a) for a in answers] == [200, 200, 200, 200]
    assert [head_and_body(a)[1]["id"] for a in answers[:3]] == [1, 2, 3]
    assert head_and_body(answers[3])[1] == {"status": "ok"}


def test_a_body_over_the_limit_is_refused_as_by_the_application(bastion):
    token = bastion.token("sam", "desk")
    before = direct_requests(bastion)
    big = json.dumps(search(1, "x" * BODY_LIMIT)).encode()
    with connect(bastion) as s:
        s.sendall(raw_post(bastion, "desk", token, big, "search_customers"))
        (answer,) = answers_on(s, 1)
    assert status_of(answer) == 413
    head, body = head_and_body(answer)
    assert "connection: close" in head
    assert body["error"]["code"] == -32600 and "gateway.max_body_bytes" in body["error"]["message"]
    # Exactly at the limit, it is taken (and refused by the tool's own rules, not the limit).
    empty = len(json.dumps(search(1, "")).encode())
    exact = json.dumps(search(1, "y" * (BODY_LIMIT - empty))).encode()
    assert len(exact) == BODY_LIMIT
    with connect(bastion) as s:
        s.sendall(raw_post(bastion, "desk", token, exact, "search_customers"))
        (answer,) = answers_on(s, 1)
    assert status_of(answer) == 200
    assert direct_requests(bastion) == before + 1


def test_a_body_that_stops_coming_is_refused_at_its_deadline(bastion):
    token = bastion.token("sam", "desk")
    before = direct_requests(bastion)
    whole = raw_post(bastion, "desk", token, json.dumps(search()).encode(), "search_customers")
    with connect(bastion) as s:
        s.sendall(whole[:-5])  # the head, and the body but for its last bytes
        (answer,) = answers_on(s, 1, wait=BODY_TIMEOUT + 10)
    assert status_of(answer) == 408
    head, body = head_and_body(answer)
    assert "connection: close" in head
    assert body["error"]["code"] == -32600 and "body_timeout" in body["error"]["message"]
    # Nothing was run.
    assert direct_requests(bastion) == before


def test_a_body_sent_in_pieces_is_answered(bastion):
    token = bastion.token("sam", "desk")
    before = direct_requests(bastion)
    whole = raw_post(bastion, "desk", token, json.dumps(search()).encode(), "search_customers")
    with connect(bastion) as s:
        for i in range(0, len(whole), 50):
            s.sendall(whole[i : i + 50])
            time.sleep(0.01)
        (answer,) = answers_on(s, 1)
    assert status_of(answer) == 200
    assert direct_requests(bastion) == before + 1


def test_a_client_that_goes_away_mid_call_cancels_it_upstream(bastion):
    token = bastion.token("sam", "labhttp")
    tag = uuid.uuid4().hex
    body = json.dumps(call(3, "wait", {"seconds": 30, "tag": tag})).encode()
    before = direct_requests(bastion)
    with connect(bastion) as s:
        s.sendall(raw_post(bastion, "labhttp", token, body, "wait"))
        assert traced(bastion, "wait-started", tag)
    assert direct_requests(bastion) == before + 1
    assert traced(bastion, "wait-cancelled", tag)
    assert not traced(bastion, "wait-finished", tag, seconds=0)


def test_an_answer_with_progress_is_an_event_stream(bastion):
    token = bastion.token("sam", "labhttp")
    before = direct_requests(bastion)
    request = modern_request(
        5,
        "tools/call",
        {"name": "chatter", "arguments": {}},
    )
    request["params"]["_meta"]["io.modelcontextprotocol/logLevel"] = "debug"
    request["params"]["_meta"]["progressToken"] = "p1"
    with bastion.http.stream(
        "POST",
        bastion.mcp_url("labhttp"),
        json=request,
        headers=modern_headers(token, "tools/call", "chatter"),
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        assert "content-length" not in response.headers
        assert response.headers["transfer-encoding"] == "chunked"
        seen = list(events(response))
    assert direct_requests(bastion) == before + 1
    assert seen[-1]["id"] == 5 and seen[-1]["result"]["content"][0]["text"] == "said it all"
    assert any(m.get("method") == "notifications/message" for m in seen[:-1])
    # The connection is still good for another call.
    again = bastion.http.post(
        bastion.mcp_url("desk"),
        json=search(),
        headers=modern_headers(bastion.token("sam", "desk"), "tools/call", "search_customers"),
    )
    assert again.status_code == 200


def test_an_unexpected_failure_is_a_500_that_names_no_internals_and_is_logged(bastion, caplog):
    token = bastion.token("sam", "desk")
    before = direct_requests(bastion)

    async def broken(*args, **kwargs):
        raise RuntimeError("sqlite internals")

    endpoint = type(bastion.app.state.gateway._endpoint)
    with (
        mock.patch.object(endpoint, "_authenticate", broken),
        caplog.at_level(logging.ERROR, logger="uvicorn.error"),
    ):
        with connect(bastion) as s:
            s.sendall(
                raw_post(bastion, "desk", token, json.dumps(search()).encode(), "search_customers")
            )
            (answer,) = answers_on(s, 1)
        # Logged once the answer is out.
        eventually(
            lambda: any("Exception in ASGI application" in r.message for r in caplog.records),
            every=0.05,
        )
    assert direct_requests(bastion) == before + 1
    assert status_of(answer) == 500
    head, body = head_and_body(answer)
    assert "connection: close" in head and "content-type: application/json" in head
    assert body["error"]["code"] == -32603 and "sqlite" not in json.dumps(body)
    logged = [r for r in caplog.records if "Exception in ASGI application" in r.message]
    assert logged and logged[-1].exc_info[0] is RuntimeError


@pytest.mark.parametrize(
    "method, target, extra",
    [
        ("POST", "/mcp/desk?x=1", ""),  # a query string
        ("POST", "/mcp/desk/", ""),  # another spelling
        ("POST", "/mcp/desk", "expect: 100-continue\r\n"),
        ("GET", "/mcp/desk", ""),
    ],
)
def test_what_the_protocol_does_not_take_goes_to_the_application(bastion, method, target, extra):
    token = bastion.token("sam", "desk")
    before = direct_requests(bastion)
    body = json.dumps(search()).encode() if method == "POST" else b""
    url = urlsplit(bastion.url)
    head = f"{method} {target} HTTP/1.1\r\nhost: {url.netloc}\r\n{extra}"
    headers = {**modern_headers(token, "tools/call", "search_customers")}
    if body:
        headers["content-length"] = str(len(body))
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    with connect(bastion) as s:
        s.sendall(head.encode())
        if extra:
            time.sleep(0.2)
        s.sendall(body)
        answer = s.recv(65536)
        if answer.startswith(b"HTTP/1.1 100"):
            answer = answer.partition(b"\r\n\r\n")[2] or s.recv(65536)
    assert status_of(answer) in (200, 404, 405, 406)
    assert direct_requests(bastion) == before


@pytest.mark.parametrize(
    "expect, continued",
    [
        ("Expect: 100-Continue\r\n", True),
        ("expect: 100-continue\r\nexpect: other\r\n", True),
        ("expect: other\r\nEXPECT: 100-CONTINUE\r\n", True),
        ("expect: other\r\n", False),
        ("x-expect: 100-continue\r\n", False),
    ],
)
def test_a_client_waiting_for_100_continue_gets_it_before_it_sends_the_body(
    bastion, expect, continued
):
    """As uvicorn answers it: any Expect header saying 100-continue, in any case."""
    token = bastion.token("sam", "desk")
    body = json.dumps(search()).encode()
    whole = raw_post(bastion, "desk", token, body, "search_customers", extra=expect)
    with connect(bastion) as s:
        s.sendall(whole[: -len(body)])
        s.settimeout(0.5)
        try:
            first = s.recv(65536)
        except TimeoutError:
            first = b""
        assert first.startswith(b"HTTP/1.1 100 Continue\r\n\r\n") is continued
        s.settimeout(30)
        s.sendall(body)
        answer = first.partition(b"\r\n\r\n")[2] if continued else first
        while b"\r\n\r\n" not in answer:
            answer += s.recv(65536)
    # JSON, or an event stream when the call took longer than a moment.
    assert status_of(answer) == 200


def test_it_is_off_with_direct_gateway_false(bastion):
    on = connection_limits(bastion.app.state.config, bastion.app)["http"]
    off = connection_limits(replace(bastion.app.state.config, direct_gateway=False), bastion.app)
    assert on.keywords["gateway"] is not None and off["http"].keywords["gateway"] is None


def test_with_the_access_log_every_call_goes_to_the_application(bastion):
    """uvicorn's access log writes a line per request: the application's path."""
    token = bastion.token("sam", "desk")
    options = connection_limits(bastion.app.state.config, bastion.app)
    before = direct_requests(bastion)
    # The same application (started already), served by a second uvicorn with the log on.
    with (
        mock.patch.object(logging.getLogger("uvicorn.access"), "hasHandlers", lambda: True),
        uvicorn_serving(bastion.app, support.free_socket(), lifespan="off", **options) as url,
    ):
        answer = bastion.http.post(
            f"{url}/mcp/desk",
            json=search(),
            headers=modern_headers(token, "tools/call", "search_customers"),
        )
    assert answer.status_code == 200 and "result" in messages(answer)[-1]
    assert direct_requests(bastion) == before


@pytest.mark.parametrize(
    ("trusted", "recorded"), [("127.0.0.1", "203.0.113.9"), ("10.9.9.9", "127.0.0.1")]
)
def test_with_proxy_headers_a_call_is_from_the_address_only_a_trusted_proxy_names(
    bastion, trusted, recorded
):
    """Behind a proxy (``proxy_headers``) calls are still answered from the protocol, by way of
    uvicorn's own proxy headers middleware: the client is the one a trusted proxy names in
    X-Forwarded-For; from any other peer that header is not read."""
    token = bastion.token("sam", "desk")
    options = connection_limits(bastion.app.state.config, bastion.app)
    options.update({"proxy_headers": True, "forwarded_allow_ips": trusted})
    before = direct_requests(bastion)
    bastion.flush()
    seen = max((seq for seq, _ in bastion.records.after(0, 100000)), default=0)
    # The same application (started already), served by a second uvicorn with proxy headers on.
    with uvicorn_serving(bastion.app, support.free_socket(), lifespan="off", **options) as url:
        answer = bastion.http.post(
            f"{url}/mcp/desk",
            json=search(),
            headers={
                **modern_headers(token, "tools/call", "search_customers"),
                "x-forwarded-for": "203.0.113.9",
            },
        )
    assert answer.status_code == 200 and "result" in messages(answer)[-1]
    assert direct_requests(bastion) == before + 1
    bastion.flush()
    mine = [r for _, r in bastion.records.after(seen, 100000) if r.method == "tools/call"]
    assert [r.context["client"]["ip"] for r in mine] == [recorded]
