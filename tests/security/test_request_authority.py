"""The authority of a request (RFC 9112 §3.2, §3.2.2), and bytes that are no request behind one,
on a real `bastion serve` (the quickstart's, its upstream `held_desk.py`), directly and through
HAProxy, on the paths its HTTP protocol answers itself (a decision, a gateway call) and on
routes the application answers.

A request without one valid ``Host`` (none in HTTP/1.1, two, an invalid value), or whose
absolute target names another authority than its ``Host``, is refused ``400`` and its connection
closed, before anything is decided, recorded or sent upstream; what bastion builds from the
request's authority names the one the client sent; a DPoP proof (RFC 9449) must name the URL
bastion is configured with for what the target's path reaches, whatever authority the target
names. Bytes that are no request behind requests still being answered wait for their answers,
then are refused ``400``.
"""

from __future__ import annotations

import json
import select
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest

from tests.gateway.streams import modern_headers, modern_request
from tests.gateway.support import REDIRECT_URI, register_public_client
from tests.identity.test_dpop import Holder
from tests.oauth.support import log_in_and_consent, pkce_pair
from tests.security.test_request_framing import (
    ADMIN_KEY,
    HANG,
    PASSWORD,
    Answer,
    Served,
    answers_in,
    exchange,
    serving,
)
from tests.waits import PATIENCE, eventually

HELD_DESK = Path(__file__).resolve().parent / "held_desk.py"
OTHER = "other.example"


@dataclass
class Held(Served):
    trace: Path = Path()  # what reached the upstream (held_desk.py)

    def queries(self) -> list[str]:
        if not self.trace.exists():
            return []
        lines = self.trace.read_text().splitlines()
        return [entry["query"] for line in lines if (entry := json.loads(line))["kind"] == "search"]

    def release(self, query: str) -> None:
        with self.trace.open("a") as out:
            out.write(json.dumps({"kind": "release", "query": query}) + "\n")

    def decisions(self) -> float:
        """Decisions made so far, of every kind (each is recorded)."""
        lines = self.http.get(f"{self.url}/metrics").text.splitlines()
        return sum(
            float(line.split()[-1]) for line in lines if line.startswith("bastion_decisions_total")
        )


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Held]:
    tmp = tmp_path_factory.mktemp("authority")
    trace = tmp / "upstream.jsonl"
    args = f"args = [{json.dumps(str(HELD_DESK))}, {json.dumps(str(trace))}]"
    with serving(tmp, replace={'args = ["examples/quickstart/server.py"]': args}) as running:
        yield Held(**vars(running), trace=trace)


# -- requests ----------------------------------------------------------------------------------

# Each route: its method and target, and whether it takes a body.
ROUTES = {
    "decision": ("POST", "/v1/authorize"),
    "gateway": ("POST", "/mcp/desk"),
    "ordinary decision": ("POST", "/v1/authorize?through=application"),
    "ordinary gateway": ("POST", "/mcp/desk?through=application"),
    "metadata": ("GET", "/.well-known/authzen-configuration"),
}


def request(
    served: Served,
    route: str,
    tag: str,
    host: str | None = "",
    target: str | None = None,
    version: str = "HTTP/1.1",
) -> bytes:
    """A request of ``route`` told apart by ``tag`` (a decision's actor, a search's query), with
    ``host`` as its Host lines ("": the server's own; None: none) and ``target`` for the
    route's."""
    method, path = ROUTES[route]
    own = urlsplit(served.url).netloc
    lines = f"Host: {own}\r\n" if host == "" else (host or "")
    if route in ("gateway", "ordinary gateway"):
        headers = modern_headers(served.token, "tools/call", "search_customers")
        asked = {"name": "search_customers", "arguments": {"query": tag}}
        body = json.dumps(modern_request(tag, "tools/call", asked)).encode()
    elif method == "POST":
        headers = {"authorization": f"Bearer {ADMIN_KEY}", "content-type": "application/json"}
        body = json.dumps(
            {"actor": f"User:{tag}", "action": "connect", "resource": "McpServer:desk"}
        ).encode()
    else:
        headers, body = {}, b""
    lines += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    if method == "POST":
        lines += f"Content-Length: {len(body)}\r\n"
    return f"{method} {target or path} {version}\r\n{lines}\r\n".encode() + body


# After each hostile request: a request that must not be answered once it was refused.
AFTER = b"GET /healthz HTTP/1.1\r\nHost: bastion\r\nConnection: close\r\n\r\n"

# How the hostile request names its authority: its Host lines (None: none), and its target
# (a format of {own}, the server's host and port, and {path}, the route's).
HOSTILE = {
    "no Host": (None, None),
    "Host twice, the same": ("Host: {own}\r\nHost: {own}\r\n", None),
    "Host twice, another": ("Host: {own}\r\nHost: " + OTHER + "\r\n", None),
    "Host empty": ("Host: \r\n", None),
    "Host with a space": ("Host: {own} x\r\n", None),
    "Host as a list": ("Host: {own}, " + OTHER + "\r\n", None),
    "Host with userinfo": ("Host: user@{own}\r\n", None),
    "Host with a path": ("Host: {own}/v1\r\n", None),
    "Host with a bad IP literal": ("Host: [bastion]\r\n", None),
    "absolute target of another authority": ("Host: {own}\r\n", "http://" + OTHER + "{path}"),
    "absolute target, Host of another authority": ("Host: " + OTHER + "\r\n", "http://{own}{path}"),
    "absolute target, no Host": (None, "http://{own}{path}"),
    "absolute target of another scheme": ("Host: {own}\r\n", "ftp://{own}{path}"),
}
# What HAProxy forwards as a request of one valid Host (it merges two of the same value).
NORMALISED_BY_HAPROXY = {"Host twice, the same"}


def hostile(served: Served, route: str, case: str, tag: str) -> bytes:
    own = urlsplit(served.url).netloc
    lines, target = HOSTILE[case]
    path = ROUTES[route][1]
    return request(
        served,
        route,
        tag,
        host=None if lines is None else lines.format(own=own),
        target=None if target is None else target.format(own=own, path=path),
    )


@pytest.mark.parametrize("case", HOSTILE)
def test_a_request_without_one_host_of_its_own_is_refused_on_every_route(served, case):
    """Directly: 400 in a problem's words, the connection closed (the request behind it never
    answered). Through HAProxy: refused (by HAProxy or by bastion), or, where HAProxy makes it
    a request of one valid Host, served. Whatever was refused was not decided, recorded or sent
    upstream."""
    normalised = case in NORMALISED_BY_HAPROXY
    faults, tags = {}, []
    for route in ROUTES:
        for via, port in (("bastion", served.bastion), ("haproxy", served.haproxy)):
            tag = f"host-{list(HOSTILE).index(case)}-{route}-{via}".replace(" ", "-")
            refused = via == "bastion" or not normalised
            if refused:
                tags.append(tag)
            decided = served.decisions()
            answers, left, ending = exchange(
                port, hostile(served, route, case, tag) + AFTER, proxy=via == "haproxy"
            )
            if refused and served.decisions() != decided:
                faults[f"{route} via {via}, decided"] = _shown(answers)
            statuses = [a.status for a in answers]
            if via == "bastion":
                if statuses != [400] or not answers[0].closes or ending != "closed":
                    faults[f"{route} via {via}"] = (statuses, ending, _shown(answers))
                elif not _names_the_authority(answers[0]):
                    faults[f"{route} via {via}"] = ("no reason given", _shown(answers))
            elif not statuses or not (400 <= statuses[0] < 500 or normalised):
                faults[f"{route} via {via}"] = (statuses, ending, _shown(answers))
    assert not faults, faults
    reached = [tag for tag in tags if tag in served.queries()]
    assert not reached, f"sent upstream: {reached}"


def _names_the_authority(answer: Answer) -> bool:
    return b"Host" in answer.body or b"target" in answer.body


def _shown(answers: list[Answer]) -> list:
    return [(a.status, a.body[:300]) for a in answers]


@pytest.mark.parametrize("version", ["HTTP/1.0"])
def test_http_1_0_without_host_is_served(served, version):
    """HTTP/1.0 had no Host: such a request is answered, a decision decided, a call made."""
    faults = {}
    for route in ("decision", "gateway", "metadata"):
        for via, port in (("bastion", served.bastion), ("haproxy", served.haproxy)):
            tag = f"old-{route}-{via}"
            sent = request(served, route, tag, host=None, version=version)
            answers, _, _ = exchange(port, sent)
            if [a.status for a in answers] != [200]:
                faults[f"{route} via {via}"] = _shown(answers)
            elif route == "gateway" and tag not in served.queries():
                faults[f"{route} via {via}"] = "the call did not reach the upstream"
    assert not faults, faults


def test_without_allowed_hosts_a_request_for_any_host_is_served(served):
    """The quickstart leaves ``[server] allowed_hosts`` empty (its default): a valid Host of any
    name is served on every route, as before the setting (tests/security/test_allowed_hosts.py
    has it set)."""
    faults = {}
    for route in ROUTES:
        for host in (OTHER, "10.9.8.7:1234", "[::2]"):
            tag = f"any-{route}-{host}".replace(" ", "-").replace(":", "-")
            # Connection: close, so the exchange ends with the answer, not when bastion closes
            # the connection kept alive after it.
            sent = request(served, route, tag, f"Host: {host}\r\nConnection: close\r\n")
            answers, _, _ = exchange(served.bastion, sent)
            if [a.status for a in answers] != [200]:
                faults[f"{route} for {host}"] = _shown(answers)
            elif "gateway" in route and tag not in served.queries():
                faults[f"{route} for {host}"] = "the call did not reach the upstream"
    assert not faults, faults


def test_an_absolute_target_cannot_make_bastion_advertise_another_authority(served):
    """AuthZEN's metadata (no ``[server] public_url`` in the quickstart) is built from the
    request's authority: a document that names another authority than the target's, which
    RFC 9112 §3.2.2 makes the request's, is a fault; so is a refusal of a target that agrees."""
    own = urlsplit(served.url).netloc
    path = ROUTES["metadata"][1]
    faults = {}
    for via, port in (("bastion", served.bastion), ("haproxy", served.haproxy)):
        for authority, host in ((OTHER, own), (own, OTHER), (own, own), (OTHER, OTHER)):
            target = f"http://{authority}{path}"
            # Connection: close, so the exchange ends with the answer: HAProxy keeps a client's
            # connection open 10 s after an answer (its timeout http-request), which each of
            # the answers through it waited out.
            sent = request(
                served, "metadata", "", host=f"Host: {host}\r\nConnection: close\r\n", target=target
            )
            answers, _, _ = exchange(port, sent, proxy=via == "haproxy")
            where = f"{target} with Host {host} via {via}"
            if not answers:
                faults[where] = "no answer"
            elif answers[0].status == 200:
                named = urlsplit(json.loads(answers[0].body)["policy_decision_point"]).netloc
                if named != authority:
                    faults[where] = f"the document names {named}"
            elif authority == host or answers[0].status != 400:
                faults[where] = _shown(answers)
    assert not faults, faults


def test_what_bastion_checks_and_advertises_is_its_configured_authority_whatever_the_request_names(
    served,
):
    """The OAuth metadata's issuer, the gateway's protected resource metadata and its 401's
    ``resource_metadata`` come from the configuration: a request that names another authority
    (in Host, or in an absolute target that agrees with it) finds it nowhere in the answer."""
    own = urlsplit(served.url).netloc
    asked = [
        ("GET", "/.well-known/oauth-authorization-server", 200),
        ("GET", "/.well-known/oauth-protected-resource/mcp/desk", 200),
        ("POST", "/mcp/desk", 401),
    ]
    faults = {}
    for via, port in (("bastion", served.bastion), ("haproxy", served.haproxy)):
        for method, path, status in asked:
            for target in (path, f"http://{OTHER}{path}"):
                body = b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}' if method == "POST" else b""
                sent = (
                    f"{method} {target} HTTP/1.1\r\nHost: {OTHER}\r\nContent-Type: application/json\r\n"
                    f"Accept: application/json, text/event-stream\r\nMcp-Protocol-Version: 2026-07-28\r\n"
                    f"Mcp-Method: ping\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                ).encode() + body
                answers, _, _ = exchange(port, sent)
                where = f"{method} {target} via {via}"
                if [a.status for a in answers] != [status]:
                    faults[where] = _shown(answers)
                elif OTHER in answers[0].head or OTHER.encode() in answers[0].body:
                    faults[where] = f"names {OTHER}: {answers[0].head} {answers[0].body[:300]!r}"
                elif own not in answers[0].head + answers[0].body.decode():
                    faults[where] = f"names not {own}: {answers[0].head} {answers[0].body[:300]!r}"
    assert not faults, faults


def _dpop_request(method: str, target: str, host: str, headers: dict, body: bytes) -> bytes:
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (
        f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n{lines}"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


def test_a_dpop_proof_must_name_the_resource_an_absolute_target_is_for(served):
    """RFC 9449 §4.3: a proof names the URL of the request it goes with (``htu``). A request in
    absolute form (``POST http://host/mcp/desk HTTP/1.1``, RFC 9112 §3.2.2) is for what bastion
    serves at that path, at its configured URL: at the token endpoint and at the gateway (in
    bastion's protocol and in the application), a proof made for the URL the request line names
    when that is another authority, or for another path, is refused, nothing sent upstream; a
    proof for the configured URL is taken, whatever authority the target names."""
    own = urlsplit(served.url).netloc
    holder = Holder()
    token_url = f"{served.url}/token"
    client_id = register_public_client(served.http, served.url)
    verifier, challenge = pkce_pair()
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": REDIRECT_URI,
        "state": "s",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "resource": f"{served.url}/mcp/desk",
        "scope": "customers:read",
    }
    redirect = log_in_and_consent(
        served.url, f"{served.url}/authorize?{urlencode(params)}", "sam", PASSWORD
    )
    form = urlencode(
        {
            "grant_type": "authorization_code",
            "code": parse_qs(urlsplit(redirect.headers["location"]).query)["code"][0],
            "redirect_uri": REDIRECT_URI,
            "code_verifier": verifier,
            "client_id": client_id,
        }
    ).encode()

    def at_token(target: str, host: str, htu: str) -> Answer:
        headers = {
            "content-type": "application/x-www-form-urlencoded",
            "dpop": holder.proof("POST", htu),
        }
        answers, _, _ = exchange(served.bastion, _dpop_request("POST", target, host, headers, form))
        assert len(answers) == 1, _shown(answers)
        return answers[0]

    # The target names another authority (Host agreeing), the proof the URL it names: refused
    # before the code is redeemed; the configured URL's proof redeems it, bound to the key.
    refused = at_token(f"http://{OTHER}/token", OTHER, f"http://{OTHER}/token")
    assert refused.status == 400, _shown([refused])
    assert json.loads(refused.body)["error"] == "invalid_dpop_proof", refused.body
    assert "htu" in json.loads(refused.body)["error_description"], refused.body
    issued = at_token(f"http://{OTHER}/token", OTHER, token_url)
    assert issued.status == 200, _shown([issued])
    token = json.loads(issued.body)["access_token"]
    assert json.loads(issued.body)["token_type"] == "DPoP"

    resource = f"{served.url}/mcp/desk"
    faults = {}
    for path in ("/mcp/desk", "/mcp/desk?through=application"):
        for authority, htu, allowed in (
            (own, resource, True),
            (OTHER, resource, True),
            (OTHER, f"http://{OTHER}/mcp/desk", False),
            (own, f"{served.url}/mcp/other", False),
            (own, token_url, False),
        ):
            query = f"dpop-{uuid.uuid4().hex[:12]}"
            headers = modern_headers(token, "tools/call", "search_customers")
            headers["authorization"] = f"DPoP {token}"
            headers["dpop"] = holder.proof("POST", htu, token)
            asked = {"name": "search_customers", "arguments": {"query": query}}
            body = json.dumps(modern_request(query, "tools/call", asked)).encode()
            sent = _dpop_request("POST", f"http://{authority}{path}", authority, headers, body)
            answers, _, _ = exchange(served.bastion, sent)
            where = f"{path} as http://{authority}, proof for {htu}"
            reached = query in served.queries()
            if allowed:
                answered = [a.status for a in answers] == [200] and reached
            else:
                answered = (
                    [a.status for a in answers] != [401]
                    or b"invalid_dpop_proof" not in answers[0].body
                    or b"htu" not in answers[0].body
                    or reached
                )
            if answered != allowed:
                faults[where] = _shown(answers)
    assert not faults, faults


# -- bytes that are no request, behind requests still being answered ---------------------------

GARBAGE = b"this is not a request\r\n\r\n"


def _read_to_the_end(s: socket.socket) -> tuple[list[Answer], bytes, str]:
    received, ending = b"", "closed"
    s.settimeout(HANG)
    while True:
        try:
            data = s.recv(65536)
        except ConnectionResetError:
            break
        except TimeoutError:
            ending = "hung"
            break
        if not data:
            break
        received += data
    answers, left = answers_in(received)
    return answers, left, ending


@pytest.mark.parametrize("route", ["gateway", "ordinary gateway"])
def test_garbage_behind_a_call_at_its_upstream_waits_for_the_call_s_answer(served, route):
    """A call still at its upstream when bytes that are no request arrive behind it on its
    connection: its answer is written, then the 400, then the connection is closed (before,
    the connection was closed at once, and the answer of a call that ran was lost)."""
    faults = {}
    for via, port in (("bastion", served.bastion), ("haproxy", served.haproxy)):
        query = f"hold:{route}-{via}"
        with socket.create_connection(("127.0.0.1", port), timeout=HANG) as s:
            s.sendall(request(served, route, query) + GARBAGE)
            # Until the call is at its upstream, or the connection answers before it is.
            assert eventually(
                lambda q=query: q in served.queries() or select.select([s], [], [], 0)[0],
                within=PATIENCE,
            )
            # The call is at its upstream, and the garbage read with it (one write, one read).
            served.release(query)
            answers, left, ending = _read_to_the_end(s)
        statuses = [a.status for a in answers]
        ids = [a.messages()[-1].get("id") for a in answers if a.status == 200]
        if statuses != [200, 400] or ids != [query] or left or ending != "closed":
            faults[via] = (statuses, ids, ending, _shown(answers))
    assert not faults, faults


@pytest.mark.parametrize("route", ["decision", "ordinary decision"])
def test_garbage_behind_a_decision_is_refused_after_its_answer(served, route):
    faults = {}
    for via, port in (("bastion", served.bastion), ("haproxy", served.haproxy)):
        served.warm()
        answers, left, ending = exchange(port, request(served, route, f"garbage-{via}") + GARBAGE)
        statuses = [a.status for a in answers]
        if statuses != [200, 400] or left or ending != "closed":
            faults[via] = (statuses, ending, _shown(answers))
    assert not faults, faults


def test_requests_pipelined_before_garbage_are_each_answered_in_turn(served):
    """A call at its upstream, then a decision the long way, a decision answered in the
    protocol and a request whose chunked body breaks off in bytes that are no chunk: the three
    answered in order, then the 400 for the broken one (never run), then the close."""
    served.warm()
    faults = {}
    for via, port in (("bastion", served.bastion), ("haproxy", served.haproxy)):
        query = f"hold:pipelined-{via}"
        own = urlsplit(served.url).netloc
        broken = (
            f"POST /v1/authorize?broken HTTP/1.1\r\nHost: {own}\r\n"
            f"Authorization: Bearer {ADMIN_KEY}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\nnot a chunk\r\n\r\n"
        ).encode()
        sent = (
            request(served, "gateway", query)
            + request(served, "ordinary decision", f"long-{via}")
            + request(served, "decision", f"direct-{via}")
            + broken
        )
        with socket.create_connection(("127.0.0.1", port), timeout=HANG) as s:
            s.sendall(sent)
            assert eventually(
                lambda q=query: q in served.queries() or select.select([s], [], [], 0)[0],
                within=PATIENCE,
            )
            served.release(query)
            answers, left, ending = _read_to_the_end(s)
        statuses = [a.status for a in answers]
        actors = [served.actor_of(json.loads(a.body)) for a in answers[1:3] if a.status == 200]
        if (
            statuses != [200, 200, 200, 400]
            or answers[0].messages()[-1].get("id") != query
            or actors != [f"long-{via}", f"direct-{via}"]
            or left
            or ending != "closed"
        ):
            faults[via] = (statuses, ending, _shown(answers))
    assert not faults, faults
