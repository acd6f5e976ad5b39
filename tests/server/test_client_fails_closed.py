"""The client a policy enforcement point calls on every request fails closed: whatever answers
in bastion's place (a proxy, a broken or hostile server, a redirect, nothing at all), a decision
is never taken for an allow unless it is bastion's well-formed yes. Each answer comes from a real
HTTP server written here; the real `bastion serve` is in test_client_cli.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from bastion import Entity
from bastion.client import AsyncClient, Client, RemoteError
from tests.oauth.support import Servers, free_socket, self_signed_certificate
from tests.waits import PATIENCE

KEY = "pep-key-" + "k" * 32
SAM, DOC = Entity("User", "sam"), Entity("Doc", "plan")
YES = {"allowed": True, "decision_id": "d-1", "sequence": 1}


@dataclass
class Impostor:
    """An HTTP server that answers whatever ``answer`` returns, and keeps what it was asked."""

    url: str = ""
    answer: Callable[[Request], Any] = lambda request: Response("{}")
    seen: list[dict] = field(default_factory=list)

    async def handle(self, request: Request) -> Response:
        body = await request.body()
        self.seen.append(
            {
                "method": request.method,
                "raw_path": request.scope["raw_path"].decode(),
                "headers": dict(request.headers),
                "body": body,
            }
        )
        answer = self.answer(request)
        if asyncio.iscoroutine(answer):
            answer = await answer
        return answer


def _app(impostor: Impostor) -> Starlette:
    methods = ["GET", "POST", "PUT", "DELETE"]
    return Starlette(routes=[Route("/{path:path}", impostor.handle, methods=methods)])


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[Impostor, Impostor]]:
    """Two impostors: the one the client is given, and another host a redirect may name."""
    with Servers() as running:
        first, other = Impostor(), Impostor()
        first.url = running.serve(_app(first), free_socket())
        other.url = running.serve(_app(other), free_socket())
        yield first, other


@pytest.fixture
def impostor(servers) -> Impostor:
    first, other = servers
    for one in (first, other):
        one.seen.clear()
        one.answer = lambda request: Response("{}")
    return first


def json_answer(body: Any, status: int = 200, **headers: str) -> Callable[[Request], Response]:
    text = body if isinstance(body, str) else json.dumps(body)
    return lambda request: Response(
        text, status_code=status, media_type="application/json", headers=headers
    )


def both_clients(url: str, call: Callable[[Any], Any], **options: Any) -> list[Any]:
    """``call(client)`` with a `Client` and with an `AsyncClient`; each outcome (a value, or the
    exception raised)."""
    outcomes: list[Any] = []
    try:
        with Client(url, KEY, **options) as client:
            outcomes.append(call(client))
    except Exception as e:
        outcomes.append(e)

    async def remotely() -> Any:
        async with AsyncClient(url, KEY, **options) as client:
            return await call(client)

    try:
        outcomes.append(asyncio.run(remotely()))
    except Exception as e:
        outcomes.append(e)
    return outcomes


def refused(outcomes: list[Any]) -> list[RemoteError]:
    for outcome in outcomes:
        assert isinstance(outcome, RemoteError), f"not refused: {outcome!r}"
        assert KEY not in str(outcome) and KEY not in repr(outcome)
    return outcomes


DECISIONS = {
    "authorize": lambda c: c.authorize(SAM, "read", DOC),
    "decide": lambda c: c.decide(SAM, "read", DOC),
    "authorize_chain": lambda c: c.authorize_chain([SAM, Entity("Agent", "a")], "read", DOC),
    "actions": lambda c: c.actions(SAM, DOC),
    "list": lambda c: c.list(SAM, "read", "Doc"),
    "authorize_many": lambda c: c.authorize_many([(SAM, "read", DOC)]),
    "query": lambda c: c.query("has_role", SAM, "reader", DOC),
}

NOT_BASTIONS = {
    "not JSON": "<html>welcome to the hotel wifi</html>",
    "empty": "",
    "allowed missing": {"decision_id": "d-1", "sequence": 1},
    "allowed a string": {**YES, "allowed": "true"},
    "allowed 1": {**YES, "allowed": 1},
    "allowed null": {**YES, "allowed": None},
    "allowed a list": {**YES, "allowed": [True]},
    "a list": [YES],
    "a string": '"allowed"',
    "true": "true",
    "no decision_id": {"allowed": True, "sequence": 1},
    "sequence a string": {**YES, "sequence": "1"},
    "sequence true": {**YES, "sequence": True},
    "deeply nested": "[" * 100_000 + "]" * 100_000,
}


@pytest.mark.parametrize("call", DECISIONS, ids=list(DECISIONS))
@pytest.mark.parametrize("body", NOT_BASTIONS.values(), ids=list(NOT_BASTIONS))
def test_an_answer_that_is_not_bastions_well_formed_yes_is_refused(impostor, call, body):
    impostor.answer = json_answer(body)
    for error in refused(both_clients(impostor.url, DECISIONS[call])):
        assert error.status == 200


@pytest.mark.parametrize("call", [c for c in DECISIONS if c not in ("authorize", "decide")])
def test_the_fields_of_other_answers_in_another_shape_are_refused(impostor, call):
    """An allowing ``allowed`` beside the call's own field in a wrong shape: refused, not read
    as something else (a string of actions as a set of letters)."""
    impostor.answer = json_answer(
        {
            **YES,
            "actions": "read",
            "ids": "plan",
            "next_cursor": None,
            "results": {"allowed": True},
            "refused_by": "nobody",
        }
    )
    refused(both_clients(impostor.url, DECISIONS[call]))


@pytest.mark.parametrize("status", [500, 502, 503, 429, 404, 401, 301, 302, 307, 308])
def test_an_allowing_body_under_any_status_but_success_is_refused(impostor, servers, status):
    """A redirect is never followed (the key would go to the host it names) and its body is not
    an answer; an error status is refused whatever its body says."""
    other = servers[1]
    allowing = {**YES, "actions": ["read"], "ids": ["plan"], "next_cursor": None}
    location = f"{other.url}/v1/authorize"
    impostor.answer = json_answer(allowing, status, location=location)
    for call in DECISIONS.values():
        for error in refused(both_clients(impostor.url, call)):
            assert error.status == status
    assert other.seen == []


def test_the_answers_to_a_batch_must_be_one_for_each_check_in_bastions_shape(impostor):
    checks = [(SAM, "read", DOC), (SAM, "write", DOC)]
    one = {"allowed": True, "decision_id": "d"}
    for results in ([one], [one, one, one], [one, {"allowed": "false", "decision_id": "d"}]):
        impostor.answer = json_answer({"results": results, "sequence": 1})
        for error in refused(both_clients(impostor.url, lambda c: c.authorize_many(checks))):
            assert "results" in error.detail


def test_an_allowed_chain_that_names_who_refused_it_is_refused(impostor):
    impostor.answer = json_answer({**YES, "refused_by": {"type": "Agent", "id": "a"}})
    chain = [SAM, Entity("Agent", "a")]
    refused(both_clients(impostor.url, lambda c: c.authorize_chain(chain, "read", DOC)))


def test_a_huge_answer_is_refused_once_past_the_bound_not_read_whole(impostor):
    """The answer allows, padded to 8 MiB: past ``max_answer_bytes`` the client stops reading
    and refuses it, with or without a content-length."""
    pad = 8 * 1024 * 1024

    def padded(request: Request) -> Response:
        head = json.dumps(YES)[:-1] + ', "pad": "'

        def chunks() -> Iterator[bytes]:
            yield head.encode()
            for _ in range(pad // 65536):
                yield b"x" * 65536
            yield b'"}'

        return StreamingResponse(chunks(), media_type="application/json")

    impostor.answer = padded
    for error in refused(
        both_clients(impostor.url, DECISIONS["authorize"], max_answer_bytes=2**20)
    ):
        assert "1048576 bytes" in error.detail, error.detail
    impostor.answer = json_answer({**YES, "pad": "x" * pad})
    refused(both_clients(impostor.url, DECISIONS["authorize"], max_answer_bytes=2**20))
    # under the bound, the same answer is read
    assert both_clients(impostor.url, DECISIONS["authorize"], max_answer_bytes=2**24) == [True] * 2


def test_an_answer_dripped_out_slower_than_the_timeout_is_refused(impostor):
    """Each byte comes within the timeout, the whole answer does not: refused as unanswered.
    The drip goes on until both clients have refused, however slow the machine (a drip of 3 s
    was a margin a late deadline could overrun): a client that waited for the whole is given
    a yes, after PATIENCE."""
    refusals_seen = threading.Event()

    async def dripped(request: Request) -> Response:
        async def drip():
            deadline = asyncio.get_running_loop().time() + PATIENCE
            while not refusals_seen.is_set() and asyncio.get_running_loop().time() < deadline:
                yield b" "
                await asyncio.sleep(0.25)
            yield json.dumps(YES).encode()

        return StreamingResponse(drip(), media_type="application/json")

    impostor.answer = dripped
    try:
        outcomes = both_clients(impostor.url, DECISIONS["authorize"], timeout=1)
    finally:
        refusals_seen.set()
    for error in refused(outcomes):
        assert error.status == 0 and "within 1 s" in error.detail, error.detail


def test_no_answer_or_no_server_is_a_remote_error_naming_the_server(impostor):
    # The answer is held back until both clients have refused, not for 5 s, which a late
    # timeout could overrun: a client that waited for it is given a yes, after PATIENCE.
    refusals_seen = threading.Event()

    async def silent(request: Request) -> Response:
        await asyncio.to_thread(refusals_seen.wait, PATIENCE)
        return json_answer(YES)(request)

    impostor.answer = silent
    try:
        outcomes = both_clients(impostor.url, DECISIONS["authorize"], timeout=0.5)
    finally:
        refusals_seen.set()
    for error in refused(outcomes):
        assert error.status == 0 and impostor.url in error.detail, error.detail
    closed = free_socket()
    nobody = f"http://127.0.0.1:{closed.getsockname()[1]}"
    closed.close()
    for error in refused(both_clients(nobody, DECISIONS["authorize"])):
        assert error.status == 0 and nobody in error.detail, error.detail


def test_a_decision_older_than_the_clients_own_write_is_refused_as_stale(impostor):
    """The client wrote at sequence 7; an answer decided at 5 (a replica or a cache that ignored
    ``at_least``) is not taken as fresh."""

    def answer(request: Request) -> Response:
        if request.url.path == "/v1/facts":
            return json_answer({"sequence": 7, "inserted": 1, "deleted": 0})(request)
        return json_answer(
            {
                **YES,
                "sequence": 5,
                "actions": ["read"],
                "ids": ["plan"],
                "next_cursor": None,
                "results": [YES],
            }
        )(request)

    impostor.answer = answer
    fact = ("has_role", SAM, "reader", DOC)

    def write_then_decide(call: Callable) -> Callable:
        def both(client):
            inserted = client.facts.insert(fact)
            if asyncio.iscoroutine(inserted):

                async def then():
                    await inserted
                    return await call(client)

                return then()
            return call(client)

        return both

    for name, call in DECISIONS.items():
        for error in refused(both_clients(impostor.url, write_then_decide(call))):
            assert "sequence 5" in error.detail and "7" in error.detail, (name, error.detail)


@pytest.mark.parametrize("sequence", ["9", True, -1, None, 1.5])
def test_a_write_answered_with_a_sequence_of_another_shape_is_refused(impostor, sequence):
    impostor.answer = json_answer({"sequence": sequence, "inserted": 1, "deleted": 0})
    fact = ("has_role", SAM, "reader", DOC)
    refused(both_clients(impostor.url, lambda c: c.facts.insert(fact)))


def test_a_list_whose_pages_never_end_is_refused(impostor):
    pages = []

    def same_cursor(request: Request) -> Response:
        pages.append(1)
        if len(pages) > 50:
            return json_answer({"title": "enough"}, 500)(request)
        return json_answer({**YES, "ids": ["plan"], "next_cursor": "again"})(request)

    impostor.answer = same_cursor
    for error in refused(both_clients(impostor.url, DECISIONS["list"])):
        assert "cursor" in error.detail, error.detail


def test_the_key_goes_only_to_the_configured_server_in_its_bearer_header(impostor):
    impostor.answer = json_answer(YES)
    assert both_clients(impostor.url, DECISIONS["authorize"]) == [True, True]
    for request in impostor.seen:
        assert request["headers"]["authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize(
    "url",
    [
        "http://sam:pw@127.0.0.1:9",
        "http://127.0.0.1:9@evil.example",
        "ftp://127.0.0.1:9",
        "127.0.0.1:9",
        "http://127.0.0.1:9/?x=1",
        "http://127.0.0.1:9/#f",
        "http:///v1",
    ],
)
def test_a_server_url_with_userinfo_a_query_or_another_scheme_is_refused(url):
    for make in (Client, AsyncClient):
        with pytest.raises(ValueError) as error:
            make(url, KEY)
        assert KEY not in str(error.value)


@pytest.mark.parametrize(
    "url", ["http://bastion.example.com", "http://10.0.0.5:8000", "http://[fd00::1]:8000"]
)
def test_a_server_across_the_network_in_the_clear_is_refused_unless_allowed(url):
    """Every request carries the key, and every decision comes back: over plain http beyond the
    loopback, whoever is on the way reads the one and may change the other."""
    for make in (Client, AsyncClient):
        with pytest.raises(ValueError, match="in the clear.*allow_http=True"):
            make(url, KEY)
        client = make(url, KEY, allow_http=True)  # a network trusted with both, said so
        assert client._url == url


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8000", "http://localhost:8000", "http://[::1]:8000", "https://b.example"],
)
def test_a_server_on_the_loopback_or_over_https_needs_no_allowance(url):
    for make in (Client, AsyncClient):
        assert make(url, KEY)._url == url


@pytest.mark.parametrize("key", [KEY + "\n", " " + KEY, KEY[:8] + "\r\nX-Evil: 1", "", "ké" + KEY])
def test_a_key_a_header_cannot_carry_is_refused_without_showing_it(impostor, key):
    """A key read from a file with its line break: refused at once, the key not in the message
    (before, the HTTP library's error quoted the whole header)."""
    for make in (Client, AsyncClient):
        with pytest.raises(ValueError) as error:
            make(impostor.url, key)
        if key.strip():
            assert key.strip()[:20] not in str(error.value)
    assert impostor.seen == []


def test_the_key_is_in_no_log_line_nor_repr(impostor, caplog):
    impostor.answer = json_answer(YES)
    with caplog.at_level(logging.DEBUG):
        both_clients(impostor.url, DECISIONS["authorize"])
        impostor.answer = json_answer({"title": "Unauthorized", "detail": "no"}, 401)
        both_clients(impostor.url, DECISIONS["authorize"])
    assert caplog.records
    assert KEY not in caplog.text
    with Client(impostor.url, KEY) as client:
        assert KEY not in repr(client) and KEY not in repr(vars(client))


def test_tls_is_verified_and_no_environment_variable_turns_it_off(tmp_path, monkeypatch):
    cert, key = self_signed_certificate(tmp_path)
    for name, value in {
        "PYTHONHTTPSVERIFY": "0",
        "CURL_CA_BUNDLE": "",
        "REQUESTS_CA_BUNDLE": "",
        "SSL_CERT_FILE": "",
        "HTTPX_SSL_VERIFY": "0",
    }.items():
        monkeypatch.setenv(name, value)
    answered = Impostor(answer=json_answer(YES))
    with Servers() as running:
        url = running.serve(_app(answered), free_socket(), ssl_certfile=cert, ssl_keyfile=key)
        for error in refused(both_clients(url, DECISIONS["authorize"])):
            assert "certificate" in error.detail.lower(), error.detail
    assert answered.seen == []


def test_a_ca_named_by_ssl_cert_file_is_trusted_and_a_change_of_the_variable_is_seen(
    tmp_path, monkeypatch
):
    """The trust store is read once, not once for good: a client made after ``SSL_CERT_FILE``
    changes trusts what it names now."""
    cert, key = self_signed_certificate(tmp_path)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    answered = Impostor(answer=json_answer(YES))
    with Servers() as running:
        url = running.serve(_app(answered), free_socket(), ssl_certfile=cert, ssl_keyfile=key)
        monkeypatch.setenv("SSL_CERT_FILE", cert)
        assert both_clients(url, DECISIONS["authorize"]) == [True, True]
        monkeypatch.setenv("SSL_CERT_FILE", "")
        for error in refused(both_clients(url, DECISIONS["authorize"])):
            assert "certificate" in error.detail.lower(), error.detail
        monkeypatch.setenv("SSL_CERT_FILE", cert)
        assert both_clients(url, DECISIONS["authorize"]) == [True, True]


def test_clients_made_one_after_another_read_the_trust_store_once(impostor, monkeypatch):
    """A PEP that makes a client for each request does not read the CA bundle each time (about
    15 ms of CPU a reading)."""
    monkeypatch.setenv("SSL_CERT_FILE", "")
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    import ssl

    readings = []
    read = ssl.SSLContext.load_verify_locations

    def counted(self, *args, **kwargs):
        readings.append(args or kwargs)
        return read(self, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations", counted)
    impostor.answer = json_answer(YES)
    for _ in range(3):
        assert both_clients(impostor.url, DECISIONS["authorize"]) == [True, True]
    assert len(readings) <= 1, readings


def test_ids_with_any_character_stay_in_their_own_field_and_path_segment(impostor):
    impostor.answer = json_answer({**YES, "id": "k", "revoked": True})
    odd = Entity("User", 'sam", "type": "Admin\u0000\n../')
    with Client(impostor.url, KEY) as client:
        client.authorize(odd, "read", "Doc:a:b")
        client.revoke_key("../policy")
        client.explain("x/../../keys?all=1#")
    sent = json.loads(impostor.seen[0]["body"])
    assert sent["actor"] == {"type": "User", "id": odd.id}
    assert sent["resource"] == {"type": "Doc", "id": "a:b"}
    assert impostor.seen[1]["raw_path"] == "/v1/keys/..%2Fpolicy"
    assert (
        impostor.seen[2]["raw_path"] == "/v1/decisions/x%2F..%2F..%2Fkeys%3Fall%3D1%23/explanation"
    )


def test_a_well_formed_answer_is_read(impostor):
    """The checks above refuse only what is wrong: bastion's own shapes pass."""
    impostor.answer = json_answer(
        {**YES, "actions": ["read"], "ids": ["plan"], "next_cursor": None, "results": [YES]}
    )
    assert both_clients(impostor.url, DECISIONS["authorize"]) == [True, True]
    assert both_clients(impostor.url, DECISIONS["actions"]) == [{"read"}] * 2
    assert both_clients(impostor.url, DECISIONS["list"]) == [["plan"]] * 2
    assert both_clients(impostor.url, DECISIONS["authorize_many"]) == [[True]] * 2
