"""Request framing (RFC 9112 §6.1, §6.3, §11.2) on a real `bastion serve` (the quickstart's), on
both paths its HTTP protocol answers itself (a decision, a gateway call) and on an ordinary
route, directly and through HAProxy: a hostile framing is refused (a 4xx, and the connection
closed where the framing is in doubt) or answered as exactly one request, never two; no answer
is another request's, none is a 5xx, and nothing waits past ``body_timeout``.

Every request sent is told apart by its answer: a decision by its record (the actor it asked
about), a gateway call by its JSON-RPC id. Each hostile request is followed on its connection by
a sentinel request of another actor (and another key) or id, asking the server to close after
it; where the two framings of the hostile request disagree, the bytes of a third, smuggled
request sit where one reading sees a request and the other a body.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import pytest

from tests.conftest import require_program
from tests.gateway.streams import modern_headers, modern_request
from tests.gateway.support import access_token, serve_quickstart
from tests.gateway.support import stop as stop_bastion
from tests.ports import free_port
from tests.scale.balancer import HAPROXY
from tests.waits import PATIENCE, eventually

PASSWORD = "quickstart-password"  # examples/quickstart/setup.py
ADMIN_KEY = "framing-admin-key-" + "x" * 32
BODY_TIMEOUT = 2.0
KEEP_ALIVE_TIMEOUT = 0.5
# How long a connection may stay silent before it is taken as hung: a body that stops coming is
# answered 408 at body_timeout (by the protocol's own timer or by the middleware's sweep once a
# second after it), well within it; no passing exchange waits for it, so it is generous: on a
# loaded machine an answer can take seconds (6 s was seen cut short under load, with every
# framing's connection open at once).
HANG = BODY_TIMEOUT + 28

HAPROXY_CONFIG = """\
global
    maxconn 200

defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-request 10s
    # One connection to bastion serves every client whenever it can: where the two read a
    # request's length differently, another client's request would meet what was left over.
    http-reuse always

frontend framing
    bind 127.0.0.1:{port}
    default_backend bastion

backend bastion
    server one 127.0.0.1:{bastion}
"""


@dataclass
class Served:
    bastion: int  # bastion's own port
    haproxy: int
    url: str
    token: str  # sam's access token for /mcp/desk
    other_key: str  # a second API key, with the decide scope only
    http: httpx.Client

    def warm(self) -> None:
        """Both keys verified by the application just now, so that the protocol may answer a
        decision asked with either (it remembers a verified key for a second)."""
        for key in (ADMIN_KEY, self.other_key):
            answer = self.http.post(
                f"{self.url}/v1/authorize?warm",
                json={"actor": "User:sam", "action": "connect", "resource": "McpServer:desk"},
                headers={"authorization": f"Bearer {key}"},
            )
            assert answer.status_code == 200, answer.text

    def metric(self, name: str) -> float:
        for line in self.http.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"no {name} in /metrics")

    def actor_of(self, decision: dict) -> str:
        record = self.http.get(
            f"{self.url}/v1/decisions/{decision['decision_id']}",
            headers={"authorization": f"Bearer {ADMIN_KEY}"},
        )
        assert record.status_code == 200, record.text
        return record.json()["request"]["actor"]["id"]


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    with serving(tmp_path_factory.mktemp("framing")) as running:
        yield running


@contextmanager
def serving(tmp: Path, replace: dict[str, str] | None = None) -> Iterator[Served]:
    """The quickstart's `bastion serve` (its configuration's text changed by ``replace``), and
    HAProxy in front of it."""
    require_program("HAProxy (Debian package haproxy)", HAPROXY)
    env = {
        "BASTION_ADMIN_KEY": ADMIN_KEY,
        "BASTION_BODY_TIMEOUT": str(BODY_TIMEOUT),
        "BASTION_KEEP_ALIVE_TIMEOUT": str(KEEP_ALIVE_TIMEOUT),
    }
    with ExitStack() as stack:
        server, url = serve_quickstart(tmp, env=env, replace=replace)
        stack.callback(stop_bastion, server)
        bastion = int(url.rsplit(":", 1)[1])
        port = free_port()
        config = tmp / "haproxy.cfg"
        config.write_text(HAPROXY_CONFIG.format(port=port, bastion=bastion))
        log = stack.enter_context(open(tmp / "haproxy.log", "wb"))
        haproxy = subprocess.Popen([HAPROXY, "-db", "-f", str(config)], stdout=log, stderr=log)
        stack.callback(_stop, haproxy)
        http = stack.enter_context(httpx.Client(timeout=20))
        token = access_token(http, url, f"{url}/mcp/desk", "sam", PASSWORD, "customers:read")
        created = http.post(
            f"{url}/v1/keys",
            json={"name": "framing", "scopes": ["decide"]},
            headers={"authorization": f"Bearer {ADMIN_KEY}"},
        )
        assert created.status_code == 201, created.text

        def through_haproxy() -> bool:
            try:
                return http.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
            except httpx.HTTPError:
                return haproxy.poll() is not None

        eventually(through_haproxy, every=0.05)
        assert haproxy.poll() is None, (tmp / "haproxy.log").read_text()
        yield Served(bastion, port, url, token, created.json()["key"], http)


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(PATIENCE)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# -- requests, each told apart by its answer ---------------------------------------------------


@dataclass(frozen=True)
class Route:
    """One kind of request: its target, its head lines but the framing, and its body, for each
    of the three parts a case sends (hostile, sentinel, smuggled)."""

    name: str
    target: str
    # Whose requests these are: each connection's own, so that an answer that reaches another
    # connection is told apart from that connection's own (through HAProxy, many clients share
    # one connection to bastion).
    tag: str = "t"

    def on(self, tag: str) -> Route:
        return replace(self, tag=tag)

    def head(self, served: Served, part: str) -> str:
        if self.name == "gateway":
            rpc = modern_headers(served.token, "tools/call", "search_customers")
            return "".join(f"{k}: {v}\r\n" for k, v in rpc.items())
        key = served.other_key if part == "sentinel" else ADMIN_KEY
        return f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"

    def body(self, part: str) -> bytes:
        if self.name == "gateway":
            asked = {"name": "search_customers", "arguments": {"query": "alan"}}
            return json.dumps(modern_request(f"{part}.{self.tag}", "tools/call", asked)).encode()
        return json.dumps({"actor": f"User:{ACTORS[part]}.{self.tag}", **CONNECT}).encode()

    def request(self, served: Served, part: str, close: bool = False) -> bytes:
        body = self.body(part)
        head = f"POST {self.target} HTTP/1.1\r\nHost: bastion\r\n{self.head(served, part)}"
        head += f"Content-Length: {len(body)}\r\n" + ("Connection: close\r\n" if close else "")
        return (head + "\r\n").encode() + body

    def whose(self, served: Served, answer: Answer) -> str | None:
        """Which part's request ``answer`` answers (None: none's, a refusal; "foreign": a
        request sent on another connection)."""
        if answer.status != 200:
            return None
        if self.name == "gateway":
            asked = answer.messages()[-1]["id"]
        else:
            by_actor = {actor: part for part, actor in ACTORS.items()}
            actor, _, tag = served.actor_of(json.loads(answer.body)).partition(".")
            asked = f"{by_actor[actor]}.{tag}"
        part, _, tag = asked.partition(".")
        return part if tag == self.tag else "foreign"


ACTORS = {"hostile": "sam", "sentinel": "avery", "smuggled": "mallory"}
CONNECT = {"action": "connect", "resource": "McpServer:desk"}
ROUTES = [
    Route("decision", "/v1/authorize"),
    Route("gateway", "/mcp/desk"),
    # The decision route the long way: a target with a query is never answered in the protocol.
    Route("ordinary", "/v1/authorize?through=application"),
]


@dataclass
class Answer:
    status: int
    head: str  # lowercased
    body: bytes

    @property
    def closes(self) -> bool:
        return "\r\nconnection: close" in self.head

    def messages(self) -> list[dict]:
        if "content-type: text/event-stream" in self.head:
            return [
                json.loads(line[6:])
                for line in self.body.decode().splitlines()
                if line.startswith("data: ") and line[6:].strip()
            ]
        return [json.loads(self.body)]


def answers_in(data: bytes) -> tuple[list[Answer], bytes]:
    """The whole answers in what a connection brought so far, interim (1xx) answers left out,
    and what is left of an answer not yet whole."""
    answers = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            break
        status = int(head.split(b" ", 2)[1])
        lowered = head.decode("latin-1").lower()
        if 100 <= status < 200:
            data = rest
            continue
        if "\r\ncontent-length: " in lowered:
            length = int(lowered.split("\r\ncontent-length: ")[1].split("\r\n")[0])
            if len(rest) < length:
                break
            body, data = rest[:length], rest[length:]
        elif "\r\ntransfer-encoding: chunked" in lowered:
            body, last = b"", False
            while not last:
                size_line, sep, after = rest.partition(b"\r\n")
                size = int(size_line, 16) if sep else -1
                if size < 0 or len(after) < size + 2:
                    break
                body, rest, last = body + after[:size], after[size + 2 :], size == 0
            if not last:
                break
            data = rest
        else:
            break  # to the end of the connection: whole only when it closes
        answers.append(Answer(status, lowered, body))
    return answers, data


def exchange(port: int, *sends: bytes, pause: float = 0, proxy: bool = False):
    """Send each of ``sends`` on one connection (``pause`` seconds apart), then read until the
    server closes it: the whole answers, what was left of one cut short, and how the connection
    ended ("closed", or "hung" past `HANG`). Through a ``proxy``, reading also stops a second
    after a refusal (4xx) with nothing more: HAProxy keeps reading a body it has refused, as
    its client still owes it, where bastion closes the connection."""
    deadline = time.monotonic() + HANG
    with socket.create_connection(("127.0.0.1", port), timeout=HANG) as s:
        for i, data in enumerate(sends):
            if i:
                time.sleep(pause)
            s.sendall(data)
        received, ending = b"", "closed"
        while True:
            answers, partial = answers_in(received)
            wait = deadline - time.monotonic()
            # Quiet only with nothing of another answer begun (under load, the rest of an answer
            # whose head came may take more than a second).
            if proxy and answers and not partial and 400 <= answers[-1].status < 500:
                wait = min(wait, 1.0)
                ending = "quiet"
            s.settimeout(max(wait, 0.01))
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                ending = "closed"
                break
            except TimeoutError:
                ending = "hung" if ending != "quiet" else ending
                break
            if not data:
                ending = "closed"
                break
            received += data
    answers, left = answers_in(received)
    if left and ending == "closed" and b"\r\n\r\n" in left:
        head, _, body = left.partition(b"\r\n\r\n")
        answers.append(Answer(int(head.split(b" ", 2)[1]), head.decode("latin-1").lower(), body))
        left = b""
    return answers, left, ending


# -- hostile framings --------------------------------------------------------------------------


@dataclass(frozen=True)
class Framing:
    """How the hostile request frames its body: the framing lines of its head, then what follows
    the head on the connection, made from the body, the smuggled request and the sentinel."""

    lines: str
    # A format of {body}, {smuggled}, {sentinel} and sizes: {n} the body's, {m} the body's and
    # the smuggled request's, {t} the body's and the sentinel's (in hex as {n:x}).
    rest: str
    version: str = "HTTP/1.1"
    bare_lf: bool = False  # every line of the head ends in LF alone


SMUGGLED_AS_BODY = "Content-Length: {n}\r\nContent-Length: {m}\r\n"
CHUNKED_BODY = "{n:x}\r\n{body}\r\n0\r\n\r\n{sentinel}"
FRAMINGS = {
    "content-length twice, same value": Framing(
        "Content-Length: {n}\r\nContent-Length: {n}\r\n", "{body}{sentinel}"
    ),
    "content-length twice, different values": Framing(
        SMUGGLED_AS_BODY, "{body}{smuggled}{sentinel}"
    ),
    "content-length with a sign": Framing("Content-Length: +{n}\r\n", "{body}{sentinel}"),
    "content-length with spaces around": Framing("Content-Length:  {n} \t\r\n", "{body}{sentinel}"),
    "content-length with leading zeros": Framing("Content-Length: 000{n}\r\n", "{body}{sentinel}"),
    "content-length in hex": Framing("Content-Length: 0x{n:x}\r\n", "{body}{sentinel}"),
    "content-length as a list": Framing("Content-Length: {n}, {n}\r\n", "{body}{sentinel}"),
    "content-length as a list of two values": Framing(
        "Content-Length: {n}, {m}\r\n", "{body}{smuggled}{sentinel}"
    ),
    "content-length past 64 bits": Framing(
        "Content-Length: 184467440737095516160{n}\r\n", "{body}{sentinel}"
    ),
    "content-length huge": Framing("Content-Length: 99999999999\r\n", "{body}{sentinel}"),
    "chunked and content-length": Framing(
        "Content-Length: {m}\r\nTransfer-Encoding: chunked\r\n",
        "{n:x}\r\n{body}\r\n0\r\n\r\n{smuggled}{sentinel}",
    ),
    "content-length and chunked": Framing(
        "Transfer-Encoding: chunked\r\nContent-Length: {n}\r\n", "{body}{smuggled}{sentinel}"
    ),
    "chunked, identity": Framing(
        "Transfer-Encoding: chunked, identity\r\nContent-Length: {n}\r\n", "{body}{sentinel}"
    ),
    "identity, no length": Framing("Transfer-Encoding: identity\r\n", "{body}{sentinel}"),
    "xchunked": Framing(
        "Transfer-Encoding: xchunked\r\nContent-Length: {n}\r\n", "{body}{sentinel}"
    ),
    "Chunked": Framing("Transfer-Encoding: Chunked\r\n", CHUNKED_BODY),
    "chunked in two headers": Framing(
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n", CHUNKED_BODY
    ),
    "chunked twice": Framing(
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", CHUNKED_BODY
    ),
    "obsolete line folding before the length": Framing(
        "X-Folded: a\r\n b\r\nContent-Length: {n}\r\n", "{body}{sentinel}"
    ),
    "chunked folded onto a line": Framing(
        "Content-Length: {n}\r\nTransfer-Encoding:\r\n chunked\r\n", "{body}{smuggled}{sentinel}"
    ),
    "bare LF line ends": Framing("Content-Length: {n}\r\n", "{body}{sentinel}", bare_lf=True),
    "space before the colon of content-length": Framing(
        "Content-Length : {n}\r\n", "{body}{sentinel}"
    ),
    "space before the colon of transfer-encoding": Framing(
        "Content-Length: {n}\r\nTransfer-Encoding : chunked\r\n", "{body}{smuggled}{sentinel}"
    ),
    "chunk size with an extension": Framing(
        "Transfer-Encoding: chunked\r\n", "{n:x};name=value\r\n{body}\r\n0\r\n\r\n{sentinel}"
    ),
    "chunk size past 64 bits": Framing(
        "Transfer-Encoding: chunked\r\n", "1{n:016x}\r\n{body}\r\n0\r\n\r\n{smuggled}{sentinel}"
    ),
    "chunk without its last chunk": Framing(
        "Transfer-Encoding: chunked\r\n", "{n:x}\r\n{body}\r\n"
    ),
    "chunked with trailers": Framing(
        "Transfer-Encoding: chunked\r\n", "{n:x}\r\n{body}\r\n0\r\nX-Trailer: t\r\n\r\n{sentinel}"
    ),
    "body shorter than its length": Framing("Content-Length: {m}\r\n", "{body}"),
    "body longer than its length": Framing("Content-Length: {n}\r\n", "{body}extra{sentinel}"),
    "body longer by an empty line": Framing("Content-Length: {n}\r\n", "{body}\r\n{sentinel}"),
    # The sentinel's bytes make up the length the hostile request declared.
    "body shorter, the next request its rest": Framing(
        "Content-Length: {t}\r\n", "{body}{sentinel}"
    ),
    "expect 100-continue": Framing(
        "Content-Length: {n}\r\nExpect: 100-continue\r\n", "{body}{sentinel}"
    ),
    "HTTP/1.0 kept alive": Framing(
        "Content-Length: {n}\r\nConnection: keep-alive\r\n", "{body}{sentinel}", "HTTP/1.0"
    ),
}


def hostile(served: Served, route: Route, framing: Framing) -> bytes:
    body = route.body("hostile")
    smuggled = route.request(served, "smuggled")
    head = f"POST {route.target} {framing.version}\r\nHost: bastion\r\n"
    head += route.head(served, "hostile") + framing.lines + "\r\n"
    if framing.bare_lf:
        head = head.replace("\r\n", "\n")
    sentinel = route.request(served, "sentinel", close=True)
    sizes = {"n": len(body), "m": len(body) + len(smuggled), "t": len(body) + len(sentinel)}
    parts = {"{body}": body, "{smuggled}": smuggled, "{sentinel}": sentinel}
    out = head.format(**sizes).encode()
    for piece in re.split(r"(\{body\}|\{smuggled\}|\{sentinel\})", framing.rest):
        out += parts[piece] if piece in parts else piece.format(**sizes).encode()
    return out


def judge(
    served: Served, route: Route, answers: list[Answer], left: bytes, ending: str
) -> list[str]:
    """What is wrong with how a hostile request and its sentinel were answered (nothing: []).
    Exactly one request answered per request sent, in order, each answer its own; a refusal
    that closes the connection is the last answer; no 5xx; no wait past `HANG`."""
    faults = []
    if ending == "hung":
        faults.append(f"the connection was still open {HANG} s after the request")
    if not answers:
        faults.append("closed without an answer")
    if left:
        faults.append(f"an answer cut short: {left[:300]!r}")
    whose = [route.whose(served, a) for a in answers]
    for answer, part in zip(answers, whose, strict=True):
        if answer.status >= 500:
            faults.append(f"a {answer.status}: {answer.body[:200]!r}")
        if part == "smuggled":
            faults.append("the smuggled request was answered")
        if part == "foreign":
            faults.append("another connection's request was answered here")
    if len(answers) > 2:
        faults.append(f"{len(answers)} answers to two requests: {[a.status for a in answers]}")
    asked = [part for part in whose if part is not None]
    if asked not in ([], ["hostile"], ["sentinel"], ["hostile", "sentinel"]):
        faults.append(f"answers out of turn: {whose}")
    if whose[:1] == ["sentinel"]:
        faults.append("the hostile request went unanswered and the sentinel was answered")
    for answer in answers[:-1]:
        if answer.closes:
            faults.append(f"an answer after a {answer.status} that closed the connection")
    return faults


# Framings whose body never ends: each waits for body_timeout, so they are sent together.
UNFINISHED = ("body shorter than its length", "chunk without its last chunk")


def faults_of(served: Served, framings: list[Framing]) -> dict:
    """Each framing sent on each route, directly and through HAProxy, all at once; the faults
    found (see `judge`) by where they were found."""
    asked = [
        (framing, route, port)
        for framing in framings
        for route in ROUTES
        for port in (served.bastion, served.haproxy)
    ]
    asked = [
        (framing, route.on(f"c{i}"), port, hostile(served, route.on(f"c{i}"), framing))
        for i, (framing, route, port) in enumerate(asked)
    ]
    results: dict[int, tuple[list[Answer], bytes, str]] = {}

    def run(i: int, port: int, data: bytes) -> None:
        results[i] = exchange(port, data, proxy=port == served.haproxy)

    served.warm()
    threads = [
        threading.Thread(target=run, args=(i, port, data))
        for i, (_, _, port, data) in enumerate(asked)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    faults = {}
    for i, (framing, route, port, _) in enumerate(asked):
        answers, left, ending = results[i]
        found = judge(served, route, answers, left, ending)
        if found:
            via = "haproxy" if port == served.haproxy else "bastion"
            where = f"{route.name} via {via}" + (f", {framing}" if len(framings) > 1 else "")
            faults[where] = (found, [a.status for a in answers])
    return faults


@pytest.mark.parametrize(
    "framing",
    [f for name, f in FRAMINGS.items() if name not in UNFINISHED],
    ids=[name for name in FRAMINGS if name not in UNFINISHED],
)
def test_a_hostile_framing_is_refused_or_answered_once_on_every_path(served, framing):
    faults = faults_of(served, [framing])
    assert not faults, faults


def test_a_body_that_never_ends_is_refused_at_its_deadline_on_every_path(served):
    faults = faults_of(served, [FRAMINGS[name] for name in UNFINISHED])
    assert not faults, faults


def test_a_plain_framing_is_answered_in_the_protocol_on_both_fast_paths(served):
    """The cases above reach the paths they are about: a request framed plainly is answered
    in the protocol, directly and through HAProxy."""
    plain = Framing("Content-Length: {n}\r\n", "{body}{sentinel}")
    for port in (served.bastion, served.haproxy):
        for route in ROUTES[:2]:
            counter = f"bastion_direct_{'answers' if route.name == 'decision' else 'gateway_requests'}_total"
            served.warm()
            before = served.metric(counter)
            answers, left, ending = exchange(port, hostile(served, route, plain))
            assert judge(served, route, answers, left, ending) == []
            assert [route.whose(served, a) for a in answers] == ["hostile", "sentinel"]
            assert served.metric(counter) > before, (route.name, port)


def together(*calls) -> list:
    """Each of ``calls`` (no arguments) run in a thread of its own, all at once; their results."""
    results: list = [None] * len(calls)

    def run(i: int) -> None:
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_a_request_behind_one_answered_in_the_protocol_is_not_cut_off_while_it_comes(served):
    """The answer to a request answered in the protocol started the connection's keep-alive
    timer while the request behind it, in the same read, was still arriving: the connection
    was closed keep_alive_timeout later, that request unanswered."""
    served.warm()
    cases = [(first, second) for first in ROUTES[:2] for second in ROUTES]

    def case(first: Route, second: Route):
        behind = second.request(served, "sentinel", close=True)
        return exchange(
            served.bastion,
            first.request(served, "hostile") + behind[:-10],
            behind[-10:],
            pause=KEEP_ALIVE_TIMEOUT * 2,  # idle longer than keep-alive, well within body_timeout
        )

    results = together(*(lambda f=f, s=s: case(f, s) for f, s in cases))
    faults = {}
    for (first, second), (answers, left, ending) in zip(cases, results, strict=True):
        whose = [first.whose(served, answers[0])] if answers else []
        whose += [second.whose(served, a) for a in answers[1:]]
        if (whose, left, ending) != (["hostile", "sentinel"], b"", "closed"):
            faults[f"{second.name} behind {first.name}"] = (whose, ending)
    assert not faults, faults


@pytest.mark.parametrize("space", ["", " ", "\t "], ids=["plain", "space after", "tab after"])
def test_expect_100_continue_is_answered_on_every_path(served, space):
    """A client that waits for 100 Continue before it sends its body gets it, whatever the
    whitespace after the value (not part of it, RFC 9110 §5.5), as uvicorn answers it."""
    served.warm()

    def case(route: Route, port: int):
        whole = route.request(served, "hostile", close=True)
        head, body = whole.split(b"\r\n\r\n", 1)
        with socket.create_connection(("127.0.0.1", port), timeout=HANG) as s:
            s.sendall(head + f"\r\nExpect: 100-continue{space}\r\n\r\n".encode())
            interim = s.recv(65536)
            if not interim.startswith(b"HTTP/1.1 100 "):
                return interim
            s.sendall(body)
            received = b""
            while data := s.recv(65536):
                received += data
        return answers_in(received)

    asked = [(route, port) for route in ROUTES for port in (served.bastion, served.haproxy)]
    results = together(*(lambda r=r, p=p: case(r, p) for r, p in asked))
    faults = {}
    for (route, port), result in zip(asked, results, strict=True):
        where = f"{route.name} via {'haproxy' if port == served.haproxy else 'bastion'}"
        if not isinstance(result, tuple):
            faults[where] = f"no 100 Continue, but {result[:40]!r}"
            continue
        answers, left = result
        if left or [route.whose(served, a) for a in answers] != ["hostile"]:
            faults[where] = [a.status for a in answers]
    assert not faults, faults


def test_pipelined_requests_on_every_path_each_get_their_own_answer(served):
    """Decisions (two keys, two actors), gateway calls and the ordinary route pipelined on one
    connection, directly and through HAProxy, several such connections at once (through
    HAProxy, sharing its connections to bastion): each answer is its own request's, in turn."""
    decision, gateway, ordinary = ROUTES
    order = [
        (decision, "hostile"),
        (gateway, "hostile"),
        (decision, "sentinel"),
        (ordinary, "hostile"),
        (gateway, "sentinel"),
        (decision, "hostile"),
        (decision, "sentinel"),
    ]

    def pipeline(connection: int, port: int):
        routes = [route.on(f"p{connection}-{k}") for k, (route, _) in enumerate(order)]
        sent = b"".join(
            route.request(served, part, close=k == len(order) - 1)
            for k, (route, (_, part)) in enumerate(zip(routes, order, strict=True))
        )
        answers, left, ending = exchange(port, sent)
        return [r.whose(served, a) for r, a in zip(routes, answers, strict=False)], left, ending

    served.warm()
    ports = [served.bastion, served.haproxy] * 3
    results = together(*(lambda i=i, p=p: pipeline(i, p) for i, p in enumerate(ports)))
    expected = ([part for _, part in order], b"", "closed")
    faults = {i: r for i, r in enumerate(results) if r != expected}
    assert not faults, faults
