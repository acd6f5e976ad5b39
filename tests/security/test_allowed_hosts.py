"""``[server] allowed_hosts``: the host names bastion answers to, on a real `bastion serve` (the
quickstart's, its upstream `held_desk.py`), on the paths its HTTP protocol answers itself (a
decision, a gateway call) and on routes the application answers (the OAuth endpoints and
metadata, AuthZEN's metadata, a page).

A request whose ``Host`` (an absolute target's authority, which must agree with it) is none of
the names listed is refused ``421 Misdirected Request`` (RFC 9110 §15.5.20) and its connection
closed, before anything is decided, recorded or sent upstream: a page that reached a bastion on
a loopback or private address by DNS rebinding names its own host there. Each spelling of a
listed name is served (case, a trailing dot, the port where the entry gives none, no port for
an entry of a default port); a request without ``Host`` (HTTP/1.0) names no host and is served;
``/healthz`` and ``/readyz`` answer whatever the ``Host``, for probes that use the address.
Without the setting every host is served, as before (tests/security/test_request_authority.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from bastion.server.config import ConfigError, ServerConfig
from tests.gateway.streams import modern_headers, modern_request
from tests.security.test_request_authority import HELD_DESK, Held
from tests.security.test_request_framing import ADMIN_KEY, Answer, exchange, serving

# The names this bastion answers to, each written as an operator might.
ALLOWED = [
    "127.0.0.1",  # any port: how the tests reach it
    "Bastion.Example.COM.",  # any port, whatever the case, with or without the final dot
    "ports.example.com:8443",  # that port only
    "tls.example.com:443",  # that port, or none (the default port of https)
    "[::1]:8000",
]
SERVED = [
    "127.0.0.1",
    "bastion.example.com",
    "BASTION.EXAMPLE.COM",
    "bastion.example.com.",
    "bastion.example.com:8000",
    "Bastion.Example.Com.:443",
    "ports.example.com:8443",
    "PORTS.example.com.:8443",
    "tls.example.com",
    "tls.example.com.",
    "tls.example.com:443",
    "[::1]:8000",
    "[0:0::1]:8000",
]
REFUSED = [
    "other.example",
    "other.example:8000",
    "127.0.0.2",
    "localhost",
    "bastion.example.com.evil.example",
    "evil-bastion.example.com",
    "www.bastion.example.com",
    "bastion.example.com..",
    "ports.example.com",  # 8443 is no default port
    "ports.example.com:9443",
    "ports.example.com:08443",
    "tls.example.com:80",
    "[::1]",
    "[::1]:8001",
    "[::2]:8000",
    "%62astion.example.com",
]


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Held]:
    tmp = tmp_path_factory.mktemp("hosts")
    trace = tmp / "upstream.jsonl"
    args = f"args = [{json.dumps(str(HELD_DESK))}, {json.dumps(str(trace))}]"
    listed = f"[server]\nallowed_hosts = {json.dumps(ALLOWED)}\n"
    pages = f"[gateway]\nallowed_origins = {json.dumps([PAGE])}\n"
    replace = {
        'args = ["examples/quickstart/server.py"]': args,
        "[server]\n": listed,
        "[gateway]\n": pages,
    }
    with serving(tmp, replace=replace) as running:
        yield Held(**vars(running), trace=trace)


# Each route: its method and target; the routes of bastion's own protocol and of each family of
# the application's.
ROUTES = {
    "decision": ("POST", "/v1/authorize"),
    "ordinary decision": ("POST", "/v1/authorize?through=application"),
    "gateway": ("POST", "/mcp/desk"),
    "ordinary gateway": ("POST", "/mcp/desk?through=application"),
    "OAuth metadata": ("GET", "/.well-known/oauth-authorization-server"),
    "resource metadata": ("GET", "/.well-known/oauth-protected-resource/mcp/desk"),
    "token endpoint": ("POST", "/token"),
    "AuthZEN metadata": ("GET", "/.well-known/authzen-configuration"),
    "sign-in page": ("GET", "/sign-in"),
    "metrics": ("GET", "/metrics"),
}
# A page bastion's CORS answers ([gateway] allowed_origins).
PAGE = "http://localhost:6274"
# After each refused request, on its connection: never answered.
AFTER = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


def request(
    served: Held,
    route: str,
    tag: str,
    host: str | None,
    target: str | None = None,
    version: str = "HTTP/1.1",
    close: bool = False,
) -> bytes:
    """A request of ``route`` told apart by ``tag`` (a decision's actor, a search's query), with
    ``host`` as its Host (None: none) and ``target`` for the route's."""
    method, path = ROUTES[route]
    if route.endswith("gateway"):
        headers = modern_headers(served.token, "tools/call", "search_customers")
        asked = {"name": "search_customers", "arguments": {"query": tag}}
        body = json.dumps(modern_request(tag, "tools/call", asked)).encode()
    elif route.endswith("decision"):
        headers = {"authorization": f"Bearer {ADMIN_KEY}", "content-type": "application/json"}
        body = json.dumps(
            {"actor": f"User:{tag}", "action": "connect", "resource": "McpServer:desk"}
        ).encode()
    elif route == "token endpoint":
        headers = {"content-type": "application/x-www-form-urlencoded"}
        body = b"grant_type=refresh_token&refresh_token=" + tag.encode()
    else:
        headers, body = {}, b""
    lines = f"Host: {host}\r\n" if host is not None else ""
    lines += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    if method == "POST":
        lines += f"Content-Length: {len(body)}\r\n"
    if close:
        lines += "Connection: close\r\n"
    return f"{method} {target or path} {version}\r\n{lines}\r\n".encode() + body


def _shown(answers: list[Answer]) -> list:
    return [(a.status, a.body[:300]) for a in answers]


def _refused(answers: list[Answer], ending: str) -> bool:
    """Refused as a host bastion does not answer to: 421 alone, naming the setting, the
    connection closed."""
    return (
        [a.status for a in answers] == [421]
        and answers[0].closes
        and b"allowed_hosts" in answers[0].body
        and ending == "closed"
    )


def test_a_request_for_a_host_not_allowed_is_refused_on_every_route(served):
    """421 in the route family's form, naming ``allowed_hosts``; the connection closed (the
    request behind it never answered); nothing decided or sent upstream. Through HAProxy,
    which passes ``Host`` on, the same."""
    faults, tags = {}, []
    for route in ROUTES:
        for number, host in enumerate(REFUSED):
            tag = f"refused-{number}-{route}".replace(" ", "-")
            tags.append(tag)
            decided = served.decisions()
            answers, _, ending = exchange(served.bastion, request(served, route, tag, host) + AFTER)
            if served.decisions() != decided:
                faults[f"{route} for {host}, decided"] = _shown(answers)
            if not _refused(answers, ending):
                faults[f"{route} for {host}"] = (ending, _shown(answers))
        tag = f"refused-haproxy-{route}".replace(" ", "-")
        tags.append(tag)
        answers, _, _ = exchange(
            served.haproxy, request(served, route, tag, "other.example", close=True)
        )
        if [a.status for a in answers] != [421] or b"allowed_hosts" not in answers[0].body:
            faults[f"{route} via haproxy"] = _shown(answers)
    assert not faults, faults
    reached = [tag for tag in tags if tag in served.queries()]
    assert not reached, f"sent upstream: {reached}"


def test_a_listed_pages_request_for_a_host_not_allowed_is_refused_with_cors(served):
    """The 421 is made by bastion's HTTP protocol, before the application and its CORS: a page
    of an origin listed reads it (the OAuth endpoints' CORS, and on /mcp/, the direct path's
    and the application's, the gateway's), with one Access-Control-Allow-Origin, and its
    preflight is refused as well, never answered 204; another page's gets no CORS."""
    faults = {}
    routes = ("OAuth metadata", "resource metadata", "token endpoint")
    for route in (*routes, "gateway", "ordinary gateway"):
        method, path = ROUTES[route]
        for origin in (PAGE, "http://evil.example"):
            sent = request(served, route, f"page-{route}".replace(" ", "-"), "other.example")
            sent = sent.replace(b"\r\n", f"\r\nOrigin: {origin}\r\n".encode(), 1)
            answers, _, ending = exchange(served.bastion, sent)
            cors = [
                line
                for line in answers[0].head.split("\r\n")
                if line.startswith("access-control-allow-origin")
            ]
            expected = [f"access-control-allow-origin: {origin}"] if origin == PAGE else []
            if not _refused(answers, ending) or cors != expected:
                faults[f"{route} from {origin}"] = (ending, answers[0].head)
            elif origin == PAGE and "\r\nvary: origin" not in answers[0].head:
                faults[f"{route} from {origin}, Vary"] = answers[0].head
        preflight = (
            f"OPTIONS {path} HTTP/1.1\r\nHost: other.example\r\nOrigin: {PAGE}\r\n"
            f"Access-Control-Request-Method: {method}\r\n\r\n"
        )
        answers, _, ending = exchange(served.bastion, preflight.encode())
        if not _refused(answers, ending):
            faults[f"{route} preflight"] = (ending, _shown(answers))
    assert not faults, faults


def test_every_spelling_of_an_allowed_host_is_served(served):
    """Each route answers a listed name's every spelling as it answers its own address."""
    own = urlsplit(served.url).netloc
    faults = {}
    for route in ROUTES:
        sent = request(served, route, f"own-{route}".replace(" ", "-"), own, close=True)
        expected = [a.status for a in exchange(served.bastion, sent)[0]]
        assert expected and expected[0] != 421, (route, expected)
        for number, host in enumerate(SERVED):
            tag = f"served-{number}-{route}".replace(" ", "-")
            answers, _, _ = exchange(served.bastion, request(served, route, tag, host, close=True))
            if [a.status for a in answers] != expected:
                faults[f"{route} for {host}"] = (expected, _shown(answers))
            elif route.endswith("gateway") and tag not in served.queries():
                faults[f"{route} for {host}"] = "the call did not reach the upstream"
    assert not faults, faults


def test_an_absolute_target_is_judged_by_its_authority(served):
    """RFC 9112 §3.2.2: the target's authority is the request's (and must agree with Host):
    one not listed is refused, one listed is served."""
    faults = {}
    for route in ("decision", "ordinary decision", "gateway", "AuthZEN metadata"):
        path = ROUTES[route][1]
        for authority, allowed in (
            ("other.example", False),
            ("OTHER.example:8000", False),
            ("tls.example.com:80", False),
            ("bastion.example.com", True),
            ("Tls.Example.Com", True),
            ("ports.example.com:8443", True),
        ):
            tag = f"absolute-{route}-{authority}".replace(" ", "-").replace(":", "-")
            sent = request(served, route, tag, authority, target=f"http://{authority}{path}")
            answers, _, ending = exchange(served.bastion, sent + (b"" if allowed else AFTER))
            where = f"{route} as http://{authority}{path}"
            if allowed and [a.status for a in answers] != [200]:
                faults[where] = _shown(answers)
            if not allowed and not _refused(answers, ending):
                faults[where] = (ending, _shown(answers))
            if not allowed and tag in served.queries():
                faults[where] = "sent upstream"
    assert not faults, faults


def test_a_request_without_host_names_no_host_and_is_served(served):
    """HTTP/1.0 has no Host: bastion builds from its own address, which no page chose; an
    HTTP/1.0 request that names a host not listed is refused as any other."""
    faults = {}
    for route in ("decision", "gateway", "AuthZEN metadata"):
        tag = f"old-{route}".replace(" ", "-")
        answers, _, _ = exchange(
            served.bastion, request(served, route, tag, None, version="HTTP/1.0")
        )
        if [a.status for a in answers] != [200]:
            faults[f"{route} without Host"] = _shown(answers)
        tag = f"old-refused-{route}".replace(" ", "-")
        sent = request(served, route, tag, "other.example", version="HTTP/1.0")
        answers, _, ending = exchange(served.bastion, sent)
        if not _refused(answers, ending) or tag in served.queries():
            faults[f"{route} for other.example"] = (ending, _shown(answers))
    assert not faults, faults


def test_health_and_readiness_answer_a_probe_that_names_the_address(served):
    """A load balancer's or Kubernetes' probe names the address it reaches (a pod's changes):
    ``/healthz`` and ``/readyz`` answer whatever the Host; nothing else does, not even
    with the probe's path as a prefix or a query."""
    faults = {}
    for target, status in (
        ("/healthz", 200),
        ("/readyz", 200),
        ("/healthz?probe=1", 421),
        ("/readyz/", 421),
        ("/metrics", 421),
        ("/v1/openapi.json", 421),
    ):
        sent = f"GET {target} HTTP/1.1\r\nHost: 10.1.2.3:8000\r\nConnection: close\r\n\r\n"
        answers, _, _ = exchange(served.bastion, sent.encode())
        if [a.status for a in answers] != [status]:
            faults[target] = _shown(answers)
    assert not faults, faults


# -- the setting, read at start ----------------------------------------------------------------


def _load(tmp_path: Path, server: str, env: dict[str, str] | None = None) -> ServerConfig:
    file = tmp_path / "bastion.toml"
    file.write_text(f"[server]\n{server}\n")
    return ServerConfig.load(file, env=env or {})


@pytest.mark.parametrize(
    "entry",
    [
        "*.example.com",
        "*",
        "https://bastion.example.com",
        "bastion.example.com/",
        "user@bastion.example.com",
        "::1",
        "[::1",
        "[bastion]:80",
        "bastion.example.com:0",
        "bastion.example.com:65536",
        "bastion.example.com:http",
        "bastion.example.com:",
        ":8000",
        "",
        "bastion example.com",
        "bücher.example",
        # The Kelvin sign (U+212A), which str.lower makes a "k": not kiosk.example.com.
        "\u212aiosk.example.com",
        "-bastion.example.com",
        "bastion..example.com",
        "300.1.1.1",
        "127.1",
    ],
)
def test_an_entry_that_is_no_host_is_refused_at_start_naming_it(tmp_path, entry):
    with pytest.raises(ConfigError, match="allowed_hosts") as refused:
        _load(tmp_path, f"allowed_hosts = {json.dumps(['127.0.0.1', entry])}")
    assert repr(entry) in str(refused.value)


def test_allowed_hosts_is_read_from_the_file_and_from_the_environment(tmp_path):
    assert _load(tmp_path, "").allowed_hosts == ()
    read = _load(tmp_path, 'allowed_hosts = ["bastion.example.com", "[::1]:8000"]')
    assert read.allowed_hosts == ("bastion.example.com", "[::1]:8000")
    env = {"BASTION_ALLOWED_HOSTS": "bastion.example.com, 127.0.0.1:8000"}
    assert _load(tmp_path, "", env).allowed_hosts == ("bastion.example.com", "127.0.0.1:8000")
    with pytest.raises(ConfigError, match="allowed_hosts"):
        _load(tmp_path, "allowed_hosts = [1]")


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ('[server]\npublic_url = "https://pdp.example.com"\n', "public_url"),
        ('[oauth]\nissuer = "https://auth.example.com"\n', "issuer"),
        ('[gateway]\npublic_url = "https://mcp.example.com:8443"\n', "public_url"),
    ],
)
def test_a_url_bastion_advertises_must_be_at_an_allowed_host(tmp_path, table, key):
    """With allowed_hosts, the URLs clients are given (public_url, the issuer, the gateway's
    public_url) must name a host in it: otherwise every request at them would be refused."""
    listed = '[server]\nallowed_hosts = ["bastion.example.com", "mcp.example.com:443"]\n'
    rest = table.removeprefix("[server]\n")
    file = tmp_path / "bastion.toml"
    file.write_text(listed + rest)
    with pytest.raises(ConfigError, match=f"{key}.*allowed_hosts"):
        ServerConfig.load(file, env={})
    # Without allowed_hosts, or with the host listed, the same is read.
    file.write_text(table)
    ServerConfig.load(file, env={})
    host = urlsplit(table.split('"')[1]).netloc
    file.write_text(f'[server]\nallowed_hosts = ["{host}"]\n' + rest)
    ServerConfig.load(file, env={})
