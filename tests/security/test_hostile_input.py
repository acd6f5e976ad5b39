"""Hostile text in what the OAuth server's forms, pages and headers are sent: no request makes a
served bastion answer 5xx, log a traceback, or change its database when it refuses. Every form
endpoint and page (``/token`` with each grant type, ``/revoke``, ``/introspect``, ``/register``,
the ``/authorize`` query, its login and consent forms, ``/sign-in``, ``/sign-out``,
``/bc-authorize``, ``/bc-approve/<id>``, the approval, alert and connection pages, the forms
past a session and its CSRF token (a fresh held call's approve and deny form, a fresh alert's
acknowledgement, a succeeding sign-out: each field, and the id in the path), and the
gateway's ``/mcp/<server>``) is sent, one place at a time, values drawn by hypothesis from text
beyond ASCII, Latin-1 bytes, ``%``-escapes of invalid UTF-8 (``%ff``, ``%c3%28``, a lone
surrogate's ``%ed%a0%80``), ``+`` and ``%2B``, Unicode digits, whitespace, URL-shaped values,
repeated parameters and values as long as the body limit lets through; and odd ``Authorization``
(Basic with bad base64 or no ``:``, Bearer and DPoP with odd bytes), ``DPoP``, ``Cookie``,
``Origin`` and ``Content-Type`` headers. The 500s it keeps out: ``hmac.compare_digest`` raising
TypeError on text beyond ASCII (`bastion.constant_time.same`), and ``Authorization: Basic \x80``
at every endpoint that authenticates a client (b64decode's ValueError on text beyond ASCII, where
binascii.Error was caught), and ``int`` of thousands of digits after ``str.isdigit()`` alone
(``max_age``, a policy version: `bastion.whole_numbers`). After each refusal every row of every
table is compared with what it was, column for column, but for what `MOVING` and `GROWING` allow
(`tests.security.rows`, each with its reason). Derandomized, so a run in CI draws what a run here
drew."""

from __future__ import annotations

import json
import socket
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import quote

import httpx
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from bastion import Authorizer, Entity
from bastion.approvals.service import BINDING_KEY, SEALING_KEY, Approvals, Call
from bastion.approvals.settings import ApprovalSettings
from bastion.approvals.store import ApprovalStore
from bastion.audit.log import AuditLog
from bastion.db import Database
from bastion.facts.store import FactStore
from bastion.oauth.ciba import CIBA_GRANT_TYPE
from bastion.oauth.keys import deployment_secret
from bastion.oauth.store import OAuthStore
from bastion.oauth.users import create_user
from bastion.signals.alerts import Alerts, AlertSettings, AlertStore
from tests.draws import fuzzed
from tests.gateway import support as gateway_support
from tests.gateway.streams import modern_headers, modern_request
from tests.gateway.support import PASSWORD, QUICKSTART, REDIRECT_URI, Running
from tests.oauth.support import hidden_fields, pkce_pair
from tests.security.conftest import GATEWAY, logged_since
from tests.security.hostile_headers import AUTHORIZATION, CONTENT_TYPE, HEADER_BYTES, basic
from tests.security.rows import snapshot, unexpected_changes
from tests.server.conftest import ADMIN_KEY

INITIAL_ACCESS_TOKEN = "initial-access-token-of-the-fuzz-test"
# The name under which a hostile value takes the place of the id at the end of the path.
PATH_ID = "<the path's id>"
# What the held calls' policy adds: sam confirms his agent's calls of desk/held, for up to 30
# minutes at a time.
HELD_POLICY = """
requires_approval(_user: User, "call", Tool{"desk/held"});
approval_window(_user: User, "call", Tool{"desk/held"}, 30);
"""
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
FORM = "application/x-www-form-urlencoded"
# A per-user upstream, for the connections pages (it is never reached: nobody connects).
PERSONAL = """
[[gateway.upstreams]]
name = "personal"
url = "http://127.0.0.1:9/mcp"
auth = "per_user"

[[oauth.resources]]
uri = "{url}/mcp/personal"
scopes = ["customers:read"]

[oauth.ciba]
max_pending_per_client = 100000
"""

# -- hostile values ----------------------------------------------------------------------------

TEXT = [
    "é",
    "\u00ff",
    "日本",
    "\U0001f600",
    "\ud800",  # a lone surrogate: its UTF-8 (%ed%a0%80) is no UTF-8 at all
    "\udcff",
    "\u0663\u0664",  # Arabic-Indic digits: str.isdigit() takes them, int() reads them
    "\U0001d7d9",  # a mathematical digit one
    "\uff11",  # a fullwidth digit one
    "",
    " ",
    "\t",
    "\u00a0",
    "\u2028",
    "\r\n",
    "\x7f",
    "\x01",
    "+",
    "a b",
    "-1",
    "1e999",
    "9" * 5000,  # past the digits Python's int() reads
    "null",
    "[]",
    "{}",
    "\\",
    "'\"<>",
    "../x",
    "%",
    "http://[::1",
    "http://a:99999/",
    "http://a:-1/",
    "http://é.example/",
    "http://\u0663:\u0664\u0664/",
    "http://" + "a" * 64 + ".example/",  # a label too long for IDNA
    "http://xn--a/",
    "http://a..b/",
    "http://%zz/",
    "http://[fe80::1%25eth0]/",
    "https://[v1.x]/",
    "http://a\u3002b/",
    "//x",
    "http:/x",
    "http://a:b@c:d/",
    f"{REDIRECT_URI}\u2028",
    f"{REDIRECT_URI}#\ud800",
    f"{REDIRECT_URI}?é=%ff",
]
# As they are sent, not escaped again.
RAW = [b"%ff", b"%c3%28", b"%ed%a0%80", b"\xff", b"\xc3\x28", b"\xe9", b"%zz", b"%", b"%2B", b"+"]
RAW += [b"%u00e9", b"%25ff", b"%e9", b"%C0%AF", b"%f4%90%80%80"]


def escaped(text: str) -> bytes:
    """``text`` as a form writes it: %-escapes of its UTF-8 (a lone surrogate's as such)."""
    return quote(text.encode("utf-8", "surrogatepass"), safe="").encode()


# A value in a form body or a query string, as bytes sent.
VALUES = st.one_of(
    st.sampled_from(TEXT).map(escaped),
    st.sampled_from(RAW),
    st.text(max_size=24).map(escaped),
    st.binary(max_size=16).map(lambda b: quote(b, safe="").encode()),
    st.binary(max_size=16).filter(lambda b: not set(b) & set(b"&=#\x00")),
    st.integers(1_000, 60_000).map(lambda n: b"\xe9" * n),  # long, within the body limit
)


DPOP = [
    b"\xe9",
    b"a.b.c",
    b"e30.e30.e30",
    # A JOSE header with a lone surrogate in its jwk.
    b"eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2IiwiandrIjp7Imt0eSI6IlxcdWQ4MDAifX0.e30.e30",
    b"x" * 9000,
]
ORIGIN = [b"\xe9", "http://é".encode(), b"null", b"http://[::1", b"http://a:99999", b"%ff"]
ORIGIN += [b"http://" + b"a" * 3000, b"file://", b"http://127.0.0.1:x"]
HEADERS = {
    "authorization": st.one_of(st.sampled_from(AUTHORIZATION), HEADER_BYTES.map(b"Basic ".__add__)),
    "dpop": st.one_of(st.sampled_from(DPOP), HEADER_BYTES),
    "origin": st.one_of(st.sampled_from(ORIGIN), HEADER_BYTES),
    "content-type": st.one_of(st.sampled_from(CONTENT_TYPE), HEADER_BYTES),
    "cookie": st.one_of(
        st.sampled_from([b"\xe9", "é".encode(), b"%ff", b'"', b"a;b", b"x" * 5000, b'"\\\xe9"']),
        HEADER_BYTES,
    ),
}
COOKIES = ("bastion_session", "bastion_browser")


# -- the requests ------------------------------------------------------------------------------


@dataclass
class Sent:
    """One request as it will be sent: a form or query of byte values, headers, cookies."""

    method: str
    path: str
    params: dict[str, bytes]
    headers: dict[str, bytes] = field(default_factory=dict)
    cookies: dict[str, str] = field(default_factory=dict)
    in_query: bool = False
    json: bool = False  # params are a JSON object's members (each value JSON text)

    def body(self, repeated: str | None) -> bytes:
        pairs = [quote(k).encode() + b"=" + v for k, v in self.params.items()]
        if repeated is not None:
            pairs.append(quote(repeated).encode() + b"=" + self.params.get(repeated, b"x"))
        return b"&".join(pairs)


@dataclass
class Bastion:
    """A served bastion and what the requests need: tokens, clients, a signed-in browser."""

    server: object
    http: httpx.Client
    db: Database
    token: str
    client_id: str
    secret: str
    public_client: str
    browser: dict[str, str]
    csrf: str
    approvals: Approvals
    alerts: Alerts

    @property
    def url(self) -> str:
        return self.server.url

    def basic(self) -> bytes:
        return basic(self.client_id.encode(), self.secret.encode())

    def token_form(self, grant_type: str, **extra: str) -> Sent:
        params = {"grant_type": grant_type, "scope": "customers:read", **extra}
        return Sent("POST", "/token", _bytes(params), {"authorization": self.basic()})

    def pending_authorization(self, cookies: dict[str, str]) -> dict[str, str]:
        """The hidden fields of a fresh authorization request's page (login, or consent when
        ``cookies`` are a signed-in browser's)."""
        _verifier, challenge = pkce_pair()
        cookie = "; ".join(f"{k}={v}" for k, v in cookies.items())
        page = self.http.get(
            "/authorize", params=self.authorize_query(challenge), headers={"cookie": cookie}
        )
        assert page.status_code == 200, page.text
        return hidden_fields(page.text)

    def authorize_query(self, challenge: str = "c" * 43) -> dict[str, str]:
        return {
            "response_type": "code",
            "client_id": self.public_client,
            "redirect_uri": REDIRECT_URI,
            "state": "s",
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "resource": f"{self.url}/mcp/desk",
            "scope": "customers:read",
        }

    def backchannel_answer(self) -> Sent:
        """The answer form of a fresh CIBA request to sam, on its page."""
        answer = self.http.post(
            "/bc-authorize",
            data={
                "scope": "customers:read",
                "login_hint": "sam",
                "resource": f"{self.url}/mcp/desk",
            },
            headers={"authorization": self.basic().decode()},
        )
        assert answer.status_code == 200, answer.text
        rows = self.db.execute(
            "SELECT request_id FROM oauth_backchannel_requests WHERE status = 'pending'"
        )
        path = f"/bc-approve/{rows[-1][0]}"
        page = self.http.get(path, headers={"cookie": self.cookie()})
        assert page.status_code == 200, page.text
        fields = {**hidden_fields(page.text), "decision": "deny"}
        return Sent("POST", path, _bytes(fields), cookies=self.browser)

    def cookie(self) -> str:
        return "; ".join(f"{k}={v}" for k, v in self.browser.items())

    def page_form(self, path: str, cookies: dict[str, str], **fields: str) -> Sent:
        """The form of the page at ``path`` as ``cookies``' browser gets it (its CSRF token and
        other hidden fields), with ``fields``, posted back to ``path``."""
        cookie = "; ".join(f"{k}={v}" for k, v in cookies.items())
        page = self.http.get(path, headers={"cookie": cookie})
        assert page.status_code == 200, (path, page.status_code, page.text[-500:])
        return Sent("POST", path, _bytes({**hidden_fields(page.text), **fields}), cookies=cookies)

    def approval_answer(self, **fields: str) -> Sent:
        """The answer form of a fresh held call of sam's (sam confirms it: the policy names
        nobody else), on its page."""
        arguments = {"n": uuid.uuid4().hex}
        call = Call(
            "approval", "sam", self.public_client, "desk", "tools/call", "call",
            Entity("Tool", "desk/held"), arguments, uuid.uuid4().hex, (),
        )  # fmt: skip
        held = self.approvals.hold(call, uuid.uuid4().hex, ("requires_approval(...)",), {})
        return self.page_form(f"/approvals/{held.id}", self.browser, **fields)

    def alert_form(self) -> Sent:
        """The acknowledgement form of a fresh alert told to sam, on its page."""
        alert = self.alerts.raise_alert(f"fuzz-{uuid.uuid4().hex}", "high", Entity("Agent", "x"))
        return self.page_form(f"/alerts/{alert.id}", self.browser)

    def sign_out_form(self) -> Sent:
        """The sign-out form of a session of sam's of its own (the form succeeds; a session made
        as the sign-in page makes it: the fuzz's wrong passwords throttle that page)."""
        session = OAuthStore(self.db).create_session("sam", time.time(), 3600)
        return self.page_form("/sign-out", {**self.browser, COOKIES[0]: session})


def _bytes(params: dict[str, str]) -> dict[str, bytes]:
    return {k: escaped(v) for k, v in params.items()}


# Each target: (names of its parameters the fuzz may change, how to build the request).
Target = tuple[tuple[str, ...], Callable[[Bastion], Sent]]
TOKEN_PARAMETERS = (
    "grant_type", "code", "redirect_uri", "code_verifier", "client_id", "client_secret",
    "refresh_token", "scope", "resource", "audience", "subject_token", "subject_token_type",
    "actor_token", "actor_token_type", "requested_token_type", "assertion", "client_assertion",
    "client_assertion_type", "auth_req_id", "task",
)  # fmt: skip
TARGETS: dict[str, Target] = {
    "token, authorization_code": (
        TOKEN_PARAMETERS,
        lambda b: b.token_form(
            "authorization_code", code="c", redirect_uri=REDIRECT_URI, code_verifier="v" * 43
        ),
    ),
    "token, refresh_token": (TOKEN_PARAMETERS, lambda b: b.token_form("refresh_token", refresh_token="r")),
    "token, client_credentials": (
        TOKEN_PARAMETERS,
        lambda b: b.token_form("client_credentials", resource=f"{b.url}/mcp/desk"),
    ),
    "token, token exchange": (
        TOKEN_PARAMETERS,
        lambda b: b.token_form(
            TOKEN_EXCHANGE, subject_token=b.token, subject_token_type=ACCESS_TOKEN_TYPE,
            resource=f"{b.url}/mcp/desk",
        ),
    ),
    "token, jwt bearer": (
        TOKEN_PARAMETERS,
        lambda b: b.token_form("urn:ietf:params:oauth:grant-type:jwt-bearer", assertion="a.b.c"),
    ),
    "token, ciba": (TOKEN_PARAMETERS, lambda b: b.token_form(CIBA_GRANT_TYPE, auth_req_id="x")),
    "revoke": (
        ("token", "token_type_hint", "client_id", "client_secret"),
        lambda b: Sent("POST", "/revoke", _bytes({"token": "t", "token_type_hint": "refresh_token"}),
                       {"authorization": b.basic()}),
    ),
    "introspect": (
        ("token", "token_type_hint"),
        lambda b: Sent("POST", "/introspect", _bytes({"token": b.token}), {"authorization": b.basic()}),
    ),
    "bc-authorize": (
        ("scope", "client_id", "client_secret", "login_hint", "binding_message",
         "requested_expiry", "resource", "client_assertion", "client_assertion_type"),
        lambda b: Sent("POST", "/bc-authorize",
                       _bytes({"scope": "customers:read", "login_hint": "nobody",
                               "binding_message": "m", "requested_expiry": "60",
                               "resource": f"{b.url}/mcp/desk"}),
                       {"authorization": b.basic()}),
    ),
    "register": (
        ("client_name", "redirect_uris", "client_uri", "logo_uri", "jwks_uri", "jwks", "contacts",
         "scope", "grant_types", "token_endpoint_auth_method", "software_id", "resource"),
        lambda b: Sent("POST", "/register",
                       {"client_name": b'"x"', "redirect_uris": b'["http://127.0.0.1:9/cb"]',
                        "token_endpoint_auth_method": b'"none"'},
                       {"authorization": f"Bearer {INITIAL_ACCESS_TOKEN}".encode()}, json=True),
    ),
    "authorize": (
        ("client_id", "response_type", "redirect_uri", "state", "code_challenge",
         "code_challenge_method", "scope", "resource", "prompt", "max_age", "login_hint",
         "nonce", "request_uri"),
        lambda b: Sent("GET", "/authorize", _bytes(b.authorize_query()), cookies=b.browser, in_query=True),
    ),
    "authorization login": (
        ("request_id", "username", "password", "csrf_token"),
        lambda b: Sent("POST", "/authorize/login",
                       _bytes({**b.pending_authorization({}), "username": "sam", "password": "wrong"})),
    ),
    "authorization consent": (
        ("request_id", "decision", "csrf_token"),
        lambda b: Sent("POST", "/authorize/consent",
                       _bytes({**b.pending_authorization(b.browser), "decision": "deny"}),
                       cookies=b.browser),
    ),
    "sign-in page": (("next",), lambda b: Sent("GET", "/sign-in", _bytes({"next": "/approvals"}), in_query=True)),
    "sign-in": (
        ("username", "password", "csrf_token", "next"),
        lambda b: Sent("POST", "/sign-in",
                       _bytes({"username": "nobody", "password": "x", "csrf_token": b.csrf, "next": "/approvals"}),
                       cookies=b.browser),
    ),
    "sign-out": (("csrf_token", "next"), lambda b: Sent("GET", "/sign-out", {}, cookies=b.browser, in_query=True)),
    "backchannel approval": (
        ("decision", "csrf_token"),
        lambda b: b.backchannel_answer(),
    ),
    "approvals": (
        ("status", "limit", "server", "user", "pending", "reviewer"),
        lambda b: Sent("GET", "/approvals", {}, cookies=b.browser, in_query=True),
    ),
    "an approval": (
        ("answer", "duration", "minutes", "reason", "withheld", "csrf_token"),
        lambda b: Sent("POST", "/approvals/a1", _bytes({"answer": "approve", "csrf_token": b.csrf}),
                       cookies=b.browser),
    ),
    "an alert": (
        ("action", "csrf_token"),
        lambda b: Sent("POST", "/alerts/a1", _bytes({"csrf_token": b.csrf}), cookies=b.browser),
    ),
    # Past the session and the CSRF token: a held call's own form, an alert's, sign-out's.
    "a held call, approved once": (
        ("answer", "duration", "minutes", "reason", "withheld", "csrf_token", PATH_ID),
        lambda b: b.approval_answer(answer="approve", duration="once", reason="r"),
    ),
    "a held call, approved for minutes": (
        ("answer", "duration", "minutes", "reason", "withheld", "csrf_token", PATH_ID),
        lambda b: b.approval_answer(answer="approve", duration="minutes", minutes="5"),
    ),
    "a held call, denied": (
        ("answer", "reason", "csrf_token", PATH_ID),
        lambda b: b.approval_answer(answer="deny", reason="no"),
    ),
    "an alert told to sam": (("csrf_token", "action", PATH_ID), lambda b: b.alert_form()),
    "sign-out, signed in": (("csrf_token", "next"), lambda b: b.sign_out_form()),
    "connections": (
        ("upstream", "code", "state", "error", "iss"),
        lambda b: Sent("GET", "/connections", {}, cookies=b.browser, in_query=True),
    ),
}  # fmt: skip
GATEWAY_HEADERS = ("mcp-session-id", "mcp-protocol-version", "mcp-method", "mcp-name", "accept")


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, str, bytes]:
    """(target, where: "param", "repeated" or "header", the name there, the value)."""
    target = draw(st.sampled_from(sorted(TARGETS)))
    names = TARGETS[target][0]
    where = draw(st.sampled_from(["param", "param", "param", "repeated", "header"]))
    if where == "header":
        name = draw(st.sampled_from(sorted(HEADERS)))
        return target, where, name, draw(HEADERS[name])
    return target, where, draw(st.sampled_from(names)), draw(VALUES)


def send(bastion: Bastion, sent: Sent, where: str, name: str, value: bytes) -> httpx.Response:
    """``sent``, with ``value`` put ``where`` (`requests`) under ``name``."""
    headers = dict(sent.headers)
    cookies = dict(sent.cookies)
    repeated = None
    path = sent.path
    if where == "param" and name == PATH_ID:
        path = sent.path.rsplit("/", 1)[0] + "/" + value.decode("latin-1")
    elif where == "param":
        if sent.json:
            # A JSON member: the text as a JSON string, written with its escapes.
            text = value.decode("utf-8", "surrogateescape")
            value = json.dumps(text).encode()
        sent.params[name] = value
    elif where == "repeated":
        repeated = None if name == PATH_ID else name
    elif name == "cookie":
        cookie = COOKIES[len(value) % 2]
        cookies.pop(cookie, None)
        headers["cookie"] = b"; ".join(
            [f"{k}={v}".encode() for k, v in cookies.items()] + [cookie.encode() + b"=" + value]
        )
        cookies = {}
    else:
        headers[name] = value
    if cookies:
        headers["cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items()).encode()
    if sent.json:
        members = [json.dumps(k).encode() + b":" + v for k, v in sent.params.items()]
        if repeated is not None:
            members.append(json.dumps(repeated).encode() + b":" + sent.params.get(repeated, b"1"))
        body = b"{" + b",".join(members) + b"}"
        headers.setdefault("content-type", b"application/json")
    else:
        body = sent.body(repeated)
    try:
        if sent.in_query:
            return bastion.http.request(sent.method, httpx.URL(path, query=body), headers=headers)
        headers.setdefault("content-type", FORM.encode())
        return bastion.http.request(sent.method, path, content=body, headers=headers)
    except (httpx.LocalProtocolError, httpx.InvalidURL, UnicodeDecodeError):
        # What this client will not send (a header it finds invalid, a query not ASCII)
        # tells nothing of the server.
        assume(False)
        raise


@pytest.fixture
def bastion(database_url, tmp_path, served):
    policy = tmp_path / "policy.polar"
    policy.write_text(gateway_support.test_policy() + HELD_POLICY)
    config = GATEWAY % (tmp_path / "keys", sys.executable, QUICKSTART / "server.py") + PERSONAL
    config = config.replace(
        "[oauth]\n", f'[oauth]\ninitial_access_tokens = ["{INITIAL_ACCESS_TOKEN}"]\n', 1
    )
    server = served(database_url, config)
    db = Database(database_url)
    create_user(OAuthStore(db), "sam", PASSWORD, time.time(), actor="test")
    FactStore(db).apply(gateway_support.facts())
    with httpx.Client(base_url=server.url, timeout=30) as http:
        running = Running(server.url, None, None, None, http, None)
        token = running.token("sam", "desk")
        registered = http.post(
            "/register",
            headers={"authorization": f"Bearer {INITIAL_ACCESS_TOKEN}"},
            json={
                "client_name": "fuzzed agent",
                "redirect_uris": [REDIRECT_URI],
                "token_endpoint_auth_method": "client_secret_basic",
                "grant_types": ["client_credentials", TOKEN_EXCHANGE, CIBA_GRANT_TYPE],
                "backchannel_token_delivery_mode": "poll",
                "scope": "customers:read",
            },
        )
        assert registered.status_code == 201, registered.text
        public = gateway_support.register_public_client(http, server.url)
        browser = httpx.Client(base_url=server.url, timeout=30)
        page = browser.get("/sign-in")
        fields = hidden_fields(page.text)
        signed_in = browser.post(
            "/sign-in", data={**fields, "username": "sam", "password": PASSWORD}
        )
        assert signed_in.status_code == 303, signed_in.text
        # Held calls and alerts, made as the gateway and the signals make them, on the
        # served bastion's database, keys and policy.
        keys = tmp_path / "keys"
        authz = Authorizer(policy.read_text())
        authz.facts.apply(gateway_support.facts(), [])
        approvals = Approvals(
            ApprovalStore(db, deployment_secret(keys, SEALING_KEY)), FactStore(db),
            lambda: authz, lambda: 1, ApprovalSettings(max_pending_per_agent=100_000),
            server.url, deployment_secret(keys, BINDING_KEY), AuditLog(db),
            user_state=OAuthStore(db).user_state,
        )  # fmt: skip
        alerts = Alerts(
            AlertStore(db), AlertSettings(fallback_recipients=('User{"sam"}',)), lambda: authz,
            server.url,
        )  # fmt: skip
        yield Bastion(
            server, http, db, token, registered.json()["client_id"],
            registered.json()["client_secret"], public, dict(browser.cookies),
            fields["csrf_token"], approvals, alerts,
        )  # fmt: skip
        browser.close()
    db.close()


def test_no_hostile_value_makes_a_page_or_form_answer_5xx_or_change_anything(bastion, database_url):
    log = bastion.server.log
    examples = 300 if database_url.startswith("postgres") else 1200

    @fuzzed(examples)
    @given(request=requests())
    def probe(request: tuple[str, str, str, bytes]) -> None:
        target, *placed = request
        sent = TARGETS[target][1](bastion)
        before = snapshot(bastion.db)
        seen = log.stat().st_size
        answer = send(bastion, sent, *placed)
        assert answer.status_code < 500, (request, answer.status_code, answer.text[:500])
        written = logged_since(log, seen)
        assert "Traceback" not in written, (request, written[-3000:])
        if answer.status_code >= 400:
            changed = unexpected_changes(before, snapshot(bastion.db))
            assert not changed, (request, answer.status_code, answer.text[:300], changed)

    probe()
    assert "Traceback" not in log.read_text()


def test_no_hostile_header_makes_the_gateway_answer_5xx(bastion, database_url):
    log = bastion.server.log
    call = json.dumps(modern_request(1, "tools/list", {})).encode()

    @fuzzed(100 if database_url.startswith("postgres") else 400)
    @given(
        name=st.sampled_from(sorted({*HEADERS, *GATEWAY_HEADERS})),
        value=st.one_of(*HEADERS.values(), VALUES.filter(lambda b: len(b) < 200)),
    )
    def probe(name: str, value: bytes) -> None:
        headers = {
            k.lower(): v.encode() if isinstance(v, str) else v
            for k, v in modern_headers(bastion.token, "tools/list", None).items()
        }
        headers[name] = value
        try:
            answer = bastion.http.post("/mcp/desk", content=call, headers=headers)
        except httpx.LocalProtocolError:
            assume(False)
            raise
        assert answer.status_code < 500, (name, value, answer.status_code, answer.text[:500])

    probe()
    assert "Traceback" not in log.read_text()


def test_a_number_of_thousands_of_digits_is_refused_as_any_bad_number(bastion):
    """`int` refuses more than 4,300 digits (ValueError): a number read after `str.isdigit()`
    alone was a 500. Each place a request's number is read (`bastion.whole_numbers`)."""
    long = "9" * 5000
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    answer = bastion.http.get("/authorize", params={**bastion.authorize_query(), "max_age": long})
    # The error for the client, as a link to its redirect URI (a loopback one is not followed).
    assert answer.status_code == 400, (answer.status_code, answer.text[-800:])
    assert "error=invalid_request" in answer.text, answer.text[-800:]
    answer = bastion.http.get(f"/v1/policy/versions/{long}", headers=admin)
    assert answer.status_code == 404, (answer.status_code, answer.text[:300])
    sent = bastion.approval_answer(answer="approve", duration="minutes")
    answer = send(bastion, sent, "param", "minutes", long.encode())
    assert answer.status_code == 400 and "whole number of minutes" in answer.text, answer.text
    # A declared body size of thousands of digits is a body too large, before any is read.
    with socket.create_connection(("127.0.0.1", bastion.server.port), timeout=10) as sock:
        sock.sendall(
            f"POST /v1/decide HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"content-length: {long}\r\nauthorization: Bearer {ADMIN_KEY}\r\n\r\n{{}}".encode()
        )
        head = sock.recv(4096)
    assert head.startswith((b"HTTP/1.1 413", b"HTTP/1.1 400")), head[:300]
    assert "Traceback" not in bastion.server.log.read_text()
