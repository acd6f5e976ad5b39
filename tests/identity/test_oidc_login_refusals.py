"""Logging in through an OpenID provider: every way the login must be refused. The provider is a
real HTTP server written for these tests (discovery, JWKS, a token endpoint that checks the
client, PKCE and the redirect URI, and answers with ID tokens made as each test asks), so that ID
tokens no certified provider would send can be tried; the person's browser is an httpx client
with its own cookies. The happy path with a certified provider, a real browser and the MCP SDK
client is in test_oidc_login.py."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
import time
import uuid
from urllib.parse import parse_qs, urlencode, urlsplit

import anyio
import httpx
import pytest
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import OctKey, RSAKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bastion.facts.model import Entity
from bastion.identity.providers import IdentityConfigError, IdentitySettings
from bastion.oauth.pkce import s256
from bastion.oauth.users import create_user
from tests.oauth.support import free_socket, hidden_fields, serve, signed_text
from tests.waits import PATIENCE, eventually

from .oidc_support import Person, bastion_with_providers, buttons

SECRETS = {
    "bastion-a": "secret-of-a",
    "bastion-b": "secret-of-b",
    "bastion-u": "secret-of-u",
    "bastion-e": "secret-of-e",
    "bastion-n": "secret-of-n",
    "bastion-r": "secret-of-r",
    "bastion-s": "secret-of-s",
    "bastion-p": "secret-of-p",
    "bastion-m": "secret-of-m",
    "bastion-c": "secret-of-c",
}


def by_email(idp) -> dict:
    """An ``[identity]`` table of one provider, ``e``, naming its users by their email."""
    return {
        "providers": [
            {
                "id": "e",
                "issuer": idp.issuer("e"),
                "client_id": "bastion-e",
                "client_secret": SECRETS["bastion-e"],
                "user_claim": "email",
            }
        ]
    }


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _again(document: dict, members: dict) -> bytes:
    """The JSON text of ``document`` with ``members`` written again after its own: an object
    naming a member twice, which no JSON encoder writes."""
    text = json.dumps(document)[:-1]
    for name, value in members.items():
        text += f", {json.dumps(name)}: {json.dumps(value)}"
    return (text + "}").encode()


class TestProvider:
    """Two issuers on one server: ``a`` says it sends RFC 9207 ``iss`` in its answers, ``b``
    does not. Codes are made by the tests (`issue`), each with the ID token it redeems for."""

    __test__ = False

    def __init__(self) -> None:
        self.key = RSAKey.generate_key(2048, parameters={"kid": "k1"})
        self.stranger = RSAKey.generate_key(2048, parameters={"kid": "k1"})
        self.codes: dict[str, dict] = {}
        # Per issuer: the keys its JWKS publishes (default: ``key``), how often it was fetched,
        # and its discovery document's id_token_signing_alg_values_supported (left out when
        # not named here).
        self.published: dict[str, list] = {}
        self.jwks_fetches: dict[str, int] = {}
        self.announced: dict[str, object] = {}
        # Per issuer: more members of its discovery document; the public key its client
        # authenticates with (private_key_jwt); and each token request's client authentication
        # (the method and the form).
        self.metadata: dict[str, dict] = {}
        self.client_keys: dict[str, object] = {}
        self.authenticated: list[tuple[str, dict]] = []
        self.redeemed: list[str] = []
        self.token_status = 200
        self.userinfo_claims = {"sub": "ada", "groups": ["from-userinfo"]}
        self.userinfo_text: bytes | None = None  # sent as it is instead, when set
        # Per issuer: the status its discovery document answers with (200 when not named) and
        # the headers it adds; the paths asked for, and those that answer 404 (an endpoint the
        # provider moved away from: its metadata names ``/<issuer>/moved/token`` and ``/jwks``).
        self.discovery_status: dict[str, int] = {}
        self.discovery_headers: dict[str, dict[str, str]] = {}
        self.asked: list[str] = []
        self.retired: set[str] = set()
        # Issuers whose discovery document hangs (answers only once taken out of the set), and
        # how many discovery requests are hanging now.
        self.hung: set[str] = set()
        self.hanging = 0
        self.url = ""
        routes = Starlette(
            routes=[
                Route("/{name}/.well-known/openid-configuration", self.discovery),
                Route("/{name}/token", self.token, methods=["POST"]),
                Route("/{name}/moved/token", self.token, methods=["POST"]),
                Route("/{name}/userinfo", self.userinfo),
                Route("/{name}/jwks", self.jwks),
                Route("/{name}/moved/jwks", self.jwks),
            ]
        )

        async def app(scope, receive, send) -> None:
            if scope["type"] == "http":
                self.asked.append(scope["path"])
                if scope["path"] in self.retired:
                    await Response("moved away", status_code=404)(scope, receive, send)
                    return
            await routes(scope, receive, send)

        self.app = app

    def issuer(self, name: str) -> str:
        return f"{self.url}/{name}"

    async def discovery(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name in self.hung:
            self.hanging += 1
            try:
                while name in self.hung:
                    await anyio.sleep(0.01)
            finally:
                self.hanging -= 1
        status = self.discovery_status.get(name, 200)
        if status != 200:
            return JSONResponse({"error": "temporarily_unavailable"}, status_code=status)
        return JSONResponse(
            headers=self.discovery_headers.get(name),
            content={
                "issuer": self.issuer(name),
                "authorization_endpoint": f"{self.issuer(name)}/authorize",
                "token_endpoint": f"{self.issuer(name)}/token",
                "jwks_uri": f"{self.issuer(name)}/jwks",
                "code_challenge_methods_supported": ["S256"],
                "authorization_response_iss_parameter_supported": name == "a",
                "userinfo_endpoint": f"{self.issuer(name)}/userinfo",
                **(
                    {"id_token_signing_alg_values_supported": self.announced[name]}
                    if name in self.announced
                    else {}
                ),
                **self.metadata.get(name, {}),
            },
        )

    async def userinfo(self, request: Request) -> Response:
        if request.headers.get("authorization") != "Bearer opaque":
            return JSONResponse({"error": "invalid_token"}, status_code=401)
        if self.userinfo_text is not None:
            return Response(self.userinfo_text, media_type="application/json")
        return JSONResponse(self.userinfo_claims)

    async def jwks(self, request: Request) -> Response:
        name = request.path_params["name"]
        if "/moved/" in request.url.path:
            name = f"{name}/moved"
        self.jwks_fetches[name] = self.jwks_fetches.get(name, 0) + 1
        keys = self.published.get(name, [self.key])
        return JSONResponse({"keys": [k.as_dict(private=False) for k in keys]})

    async def token(self, request: Request) -> Response:
        if self.token_status != 200:
            return Response("down for maintenance", status_code=self.token_status)
        name = request.path_params["name"]
        client_id = f"bastion-{name}"
        form = await request.form()
        method = self._client_authentication(request, name, client_id, form)
        self.authenticated.append((method, dict(form)))
        if method == "refused":
            return JSONResponse(
                {"error": "invalid_client", "error_description": "who are you?\u202e"},
                status_code=401,
            )
        recipe = self.codes.pop(str(form.get("code")), None)  # a code is good once
        if recipe is None or recipe["issuer"] != name:
            return JSONResponse({"error": "invalid_grant"}, status_code=400)
        if s256(str(form.get("code_verifier"))) != recipe["challenge"]:
            return JSONResponse({"error": "invalid_grant"}, status_code=400)
        if form.get("redirect_uri") != recipe["redirect_uri"]:
            return JSONResponse({"error": "invalid_grant"}, status_code=400)
        self.redeemed.append(str(form.get("code")))
        answer = {"access_token": "opaque", "token_type": "Bearer", "id_token": recipe["id_token"]}
        if recipe["answer_again"]:
            return Response(_again(answer, recipe["answer_again"]), media_type="application/json")
        return JSONResponse(answer)

    def _client_authentication(self, request: Request, name: str, client_id: str, form) -> str:
        """The method the token request authenticated with, or ``refused``."""
        basic = base64.b64encode(f"{client_id}:{SECRETS.get(client_id, '')}".encode()).decode()
        if request.headers.get("authorization") == f"Basic {basic}":
            return "client_secret_basic"
        if "client_secret" in form:
            return (
                "client_secret_post" if form["client_secret"] == SECRETS[client_id] else "refused"
            )
        if "client_assertion" in form and name in self.client_keys:
            try:
                jws.deserialize_compact(
                    str(form["client_assertion"]), self.client_keys[name], algorithms=["PS256"]
                )
            except JoseError:
                return "refused"
            return "private_key_jwt"
        return "refused"

    def issue(
        self,
        name: str,
        query: dict[str, str],
        *,
        sign: str = "k1",
        signer: tuple[dict, object] | None = None,
        again: dict | None = None,
        answer_again: dict | None = None,
        header: str | None = None,
        **claims,
    ) -> str:
        """A code for the login bastion started with ``query``: its ID token says ``claims``
        over the right ones (None drops a claim), then the claims of ``again`` a second time,
        signed as ``sign`` says, or with the (header, key) of ``signer``, or with ``key`` under
        the JSON text ``header`` as it is; the token endpoint's answer names the members of
        ``answer_again`` a second time."""
        now = int(time.time())
        body = {
            "iss": self.issuer(name),
            "sub": "ada",
            "aud": f"bastion-{name}",
            "iat": now,
            "exp": now + 300,
            "nonce": query["nonce"],
            "groups": ["admins", "devs"],
            # As a provider must when asked for max_age (OpenID Connect Core 1.0 §2).
            "auth_time": now if "max_age" in query else None,
            **claims,
        }
        body = {k: v for k, v in body.items() if v is not None}
        # The claims as JSON text escaped to ASCII: a lone surrogate can be sent too.
        payload = _again(body, again) if again else json.dumps(body).encode()
        if header is not None:
            token = signed_text(self.key, header, payload.decode(), "RS256")
        elif signer is not None:
            token = jws.serialize_compact(signer[0], payload, signer[1])
        elif sign == "k1":
            token = jws.serialize_compact({"alg": "RS256", "kid": "k1"}, payload, self.key)
        elif sign == "stranger":
            token = jws.serialize_compact({"alg": "RS256", "kid": "k1"}, payload, self.stranger)
        elif sign == "none":
            header = _b64(json.dumps({"alg": "none"}).encode())
            token = f"{header}.{_b64(json.dumps(body).encode())}."
        elif sign == "HS256":
            # Keyed with the provider's public key, the classic confusion.
            secret = OctKey.import_key(json.dumps(self.key.as_dict(private=False)).encode())
            token = jwt.encode({"alg": "HS256", "kid": "k1"}, body, secret)
        else:
            raise AssertionError(sign)
        code = uuid.uuid4().hex
        self.codes[code] = {
            "issuer": name,
            "challenge": query["code_challenge"],
            "redirect_uri": query["redirect_uri"],
            "id_token": token,
            "answer_again": answer_again,
        }
        return code


@pytest.fixture(scope="module")
def idp():
    provider = TestProvider()
    with serve(provider.app, free_socket()) as url:
        provider.url = url
        yield provider


@pytest.fixture(scope="module")
def bastion(tmp_path_factory, idp):
    dead = free_socket()  # bound, never listening: a provider that is down
    directory = tmp_path_factory.mktemp("oidc-refusals")
    identity = {
        "fact_seconds": 3600,
        "providers": [
            {
                "id": "a",
                "name": "Provider A",
                "issuer": idp.issuer("a"),
                "client_id": "bastion-a",
                "client_secret": "${SECRET_A}",
                "scopes": ["openid", "groups"],
                "facts": [
                    {
                        "claim": "groups",
                        "predicate": "has_role",
                        "name": "{value}",
                        "resource": "Org:acme",
                        "values": ["admins", "devs", "support", "auditor"],
                    },
                    {
                        "claim": "groups",
                        "predicate": "has_relation",
                        "name": "member",
                        "resource": "Team:{value}",
                    },
                ],
            },
            {
                "id": "b",
                "issuer": idp.issuer("b"),
                "client_id": "bastion-b",
                "client_secret": SECRETS["bastion-b"],
            },
            {
                "id": "u",
                "issuer": idp.issuer("u"),
                "client_id": "bastion-u",
                "client_secret": SECRETS["bastion-u"],
                "userinfo": True,
                "facts": [{"claim": "groups", "name": "{value}", "resource": "Org:acme"}],
            },
            {
                "id": "e",
                "issuer": idp.issuer("e"),
                "client_id": "bastion-e",
                "client_secret": SECRETS["bastion-e"],
                "user_claim": "email",
            },
            {
                "id": "n",
                "issuer": idp.issuer("n"),
                "client_id": "bastion-n",
                "client_secret": SECRETS["bastion-n"],
                "user_prefix": "",  # its users are bastion's users of the same name
            },
            {
                "id": "down",
                "name": "Down Provider",
                "issuer": f"http://127.0.0.1:{dead.getsockname()[1]}/x",
                "client_id": "bastion-down",
                "client_secret": "unused",
                "timeout_seconds": 2,
            },
        ],
    }
    env = {"SECRET_A": SECRETS["bastion-a"]}
    with bastion_with_providers(
        str(directory / "bastion.db"), str(directory / "keys"), free_socket(), identity, env=env
    ) as b:
        yield b
    dead.close()


@pytest.fixture
def person(bastion):
    p = Person(bastion)
    yield p
    p.close()


@pytest.fixture(scope="module")
def client(bastion):
    return bastion.register()


def sessions(bastion) -> int:
    return bastion.db.execute("SELECT COUNT(*) FROM oauth_sessions")[0][0]


def users(bastion) -> list[str]:
    return [u[0] for u in bastion.server.store.users()]


def linked(bastion) -> list:
    """Every provider's account bound to a user of bastion (`bastion.identity.accounts`)."""
    return bastion.db.execute(
        "SELECT provider, subject, username FROM identity_accounts UNION ALL"
        " SELECT provider, subject, username FROM identity_user_bindings ORDER BY 1, 2, 3"
    )


def refused(response: httpx.Response, status: int, words: str) -> None:
    text = html.unescape(response.text)
    assert response.status_code == status, text
    assert words in text, text
    assert "bastion_session" not in response.headers.get("set-cookie", "")


# -- the way it works ------------------------------------------------------------------------


def test_login_page_offers_each_provider_and_no_password_form(person, client):
    page = person.open_authorization(client)
    actions = [action for action, _ in buttons(page.text)]
    assert actions == [
        "/login/a",
        "/login/b",
        "/login/u",
        "/login/e",
        "/login/n",
        "/login/down",
    ]
    assert "Sign in with Provider A" in page.text
    assert "name=password" not in page.text


def test_password_login_is_refused_when_local_passwords_are_off(bastion, person, client):
    page = person.open_authorization(client)
    response = person.http.post(
        f"{bastion.url}/authorize/login",
        data={**hidden_fields(page.text), "username": "alice", "password": "x" * 12},
    )
    refused(response, 403, "password is turned off")


def test_provider_login_resumes_the_authorization_request_as_a_namespaced_user(
    bastion, idp, person, client
):
    before = sessions(bastion)
    query = person.sent_to_provider(client, "a")
    assert query["client_id"] == "bastion-a"
    assert query["redirect_uri"] == f"{bastion.url}/login/a/callback"
    assert query["code_challenge_method"] == "S256" and query["scope"] == "openid groups"
    code = idp.issue("a", query)
    page = person.back_from_provider("a", code=code, state=query["state"], iss=idp.issuer("a"))
    assert page.status_code == 200, page.text
    assert "Signed in as <strong>a:ada</strong>" in page.text
    assert sessions(bastion) == before + 1
    answer = person.consent(page)
    assert answer["state"] == "xyz-state" and answer["iss"] == bastion.url
    tokens = person.redeem(answer["code"])
    claims = bastion.server.verifier.verify(tokens["access_token"], bastion.resource).claims
    assert claims["sub"] == "a:ada"
    assert idp.redeemed.count(code) == 1
    assert "a:ada" in users(bastion)


def test_groups_become_facts_kept_in_step_at_each_login_and_expiring(bastion, idp, person, client):
    facts = bastion.server.facts
    ada = Entity("User", "a:ada")
    facts.apply([("has_role", ada, "auditor", Entity("Org", "acme"))], actor="admin")

    def login(groups: list[str]) -> None:
        # Each login anew (prompt=login), as when the session has ended.
        response = person.choose(person.open_authorization(client, prompt="login"), "a")
        query = dict(httpx.URL(response.headers["location"]).params)
        code = idp.issue("a", query, groups=groups)
        page = person.back_from_provider("a", code=code, state=query["state"], iss=idp.issuer("a"))
        assert page.status_code in (200, 303), page.text

    def roles() -> dict[str, float | None]:
        return {f.fact[2]: f.expires_at for f in facts.get(("has_role", ada, None, None))}

    login(["admins", "devs", "auditor", "unknown-group"])
    first = roles()
    assert set(first) == {"admins", "devs", "auditor"}
    assert first["auditor"] is None  # the administrator's fact is not the provider's to expire
    assert 0 < first["admins"] - time.time() <= 3600
    teams = facts.get(("has_relation", None, "member", ada))
    assert {f.fact[1] for f in teams} == {
        Entity("Team", "admins"),
        Entity("Team", "devs"),
        Entity("Team", "unknown-group"),
        Entity("Team", "auditor"),
    }

    login(["devs"])
    assert set(roles()) == {"devs", "auditor"}  # nor to remove
    assert roles()["auditor"] is None
    assert {f.fact[1] for f in facts.get(("has_relation", None, "member", ada))} == {
        Entity("Team", "devs")
    }


def test_a_claim_value_too_large_to_store_refuses_the_login_and_writes_nothing(
    bastion, idp, person, client
):
    """A group of 2,600 characters makes facts past the store's bound on a fact's key
    (PostgreSQL indexes no more): the login is refused before anything is written."""
    before = (sessions(bastion), users(bastion), bastion.server.facts.head())
    query = person.sent_to_provider(client, "a")
    code = idp.issue("a", query, groups=["devs", "g" * 2600])
    response = person.back_from_provider("a", code=code, state=query["state"], iss=idp.issuer("a"))
    refused(response, 400, "makes no usable fact")
    assert (sessions(bastion), users(bastion), bastion.server.facts.head()) == before


@pytest.mark.parametrize(
    "claims",
    [
        {"groups": ["devs", "a\u0000b"]},
        {"groups": ["\ud800"]},
        {"sub": "ada\u0000"},
        {"profile": {"\udc00": 1}},
        {"custom": 2**64},
    ],
    ids=["nul-group", "surrogate-group", "nul-sub", "surrogate-key", "huge-number"],
)
def test_claims_no_store_can_hold_refuse_the_login_and_write_nothing(
    bastion, idp, person, client, claims
):
    """Claims are read as every JSON from elsewhere is: a NUL or half of a surrogate pair in any
    string or key, or a number past 64 bits, refuses the login before anything is written (a
    group with a surrogate was a 500 on both databases, a NUL one on PostgreSQL)."""
    before = (sessions(bastion), users(bastion), bastion.server.facts.head())
    query = person.sent_to_provider(client, "a")
    code = idp.issue("a", query, **claims)
    response = person.back_from_provider("a", code=code, state=query["state"], iss=idp.issuer("a"))
    refused(response, 400, "The ID token's claims cannot be taken")
    assert (sessions(bastion), users(bastion), bastion.server.facts.head()) == before


@pytest.mark.parametrize("where", ["id token", "token endpoint"])
def test_a_provider_naming_a_member_twice_signs_nobody_in_and_links_nothing(
    bastion, idp, person, client, where
):
    """An ID token signed by the provider that names ``sub`` twice, or a token endpoint
    answer that names ``id_token`` twice (ada's, then mallory's): a reader that keeps the first
    value signs ada in, one that keeps the last (Python's json) mallory. RFC 7519 §4 and
    I-JSON (RFC 7493 §2.3) let a reader refuse it: the login is refused naming the member,
    nobody is signed in, no user made and no account linked."""
    before = (sessions(bastion), users(bastion), linked(bastion), bastion.server.facts.head())
    query = person.sent_to_provider(client, "a")
    if where == "id token":
        code = idp.issue("a", query, again={"sub": "mallory"})
        status, words = 400, "The ID token's claims cannot be taken"
    else:
        other = idp.codes.pop(idp.issue("a", query, sub="mallory"))["id_token"]
        code = idp.issue("a", query, answer_again={"id_token": other})
        status, words = 503, "its token endpoint sent no JSON"
    member = "sub" if where == "id token" else "id_token"
    response = person.back_from_provider("a", code=code, state=query["state"], iss=idp.issuer("a"))
    refused(response, status, words)
    refused(response, status, f"member '{member}' twice")
    after = (sessions(bastion), users(bastion), linked(bastion), bastion.server.facts.head())
    assert after == before
    assert "a:mallory" not in users(bastion)


@pytest.mark.parametrize(
    ("header", "member"),
    [
        ('{"alg": "none", "kid": "k1", "alg": "RS256"}', "alg"),
        ('{"alg": "RS256", "kid": "k-unpublished", "kid": "k1"}', "kid"),
    ],
)
def test_an_id_token_whose_header_names_a_member_twice_signs_nobody_in(
    bastion, idp, person, client, header, member
):
    """An ID token signed by the provider whose JOSE header names ``alg`` or ``kid`` twice: a
    reader that keeps the first value sees an alg or a key bastion refuses, one that keeps the
    last (Python's json, joserfc) a token it takes. RFC 7515 §5.2 lets a reader refuse it: the
    login is refused naming the member, before any key is looked up; nobody is signed in, no
    user made and no account linked."""
    before = (sessions(bastion), users(bastion), linked(bastion), bastion.server.facts.head())
    fetches = idp.jwks_fetches.get("a", 0)
    query = person.sent_to_provider(client, "a")
    code = idp.issue("a", query, header=header, sub="mallory")
    response = person.back_from_provider("a", code=code, state=query["state"], iss=idp.issuer("a"))
    refused(response, 400, "The ID token's JOSE header is refused")
    refused(response, 400, f"member '{member}' twice")
    after = (sessions(bastion), users(bastion), linked(bastion), bastion.server.facts.head())
    assert after == before
    assert "a:mallory" not in users(bastion)
    assert idp.jwks_fetches.get("a", 0) == fetches


def test_sign_in_page_offers_providers_and_goes_back_to_the_local_page(bastion, idp, person):
    page = person.http.get(f"{bastion.url}/sign-in?next=/approvals")
    assert "name=password" not in page.text
    response = person.http.post(f"{bastion.url}/login/b", data=hidden_fields(page.text))
    assert response.status_code == 303
    query = dict(httpx.URL(response.headers["location"]).params)
    code = idp.issue("b", query)
    back = person.back_from_provider("b", code=code, state=query["state"])
    assert back.status_code == 303 and back.headers["location"] == "/approvals"
    assert "bastion_session" in back.headers["set-cookie"]


def test_a_provider_login_ends_the_session_the_browser_held_before(bastion, idp, person):
    """Signed in through a provider, the browser's earlier session (another person's on a
    shared browser, or a value planted in it) is ended on the server, not only replaced in the
    cookie jar (`bastion.oauth.sign_in.start_session`, as for a password)."""
    if "pat" not in users(bastion):
        create_user(bastion.server.store, "pat", "pat-password", bastion.clock(), actor="test")
    earlier = bastion.server.store.create_session("pat", bastion.clock(), 3600)
    assert bastion.server.store.session_login(earlier, bastion.clock()) is not None
    page = person.http.get(f"{bastion.url}/sign-in?next=/approvals")
    response = person.http.post(f"{bastion.url}/login/b", data=hidden_fields(page.text))
    query = dict(httpx.URL(response.headers["location"]).params)
    person.http.cookies.set("bastion_session", earlier)
    back = person.back_from_provider("b", code=idp.issue("b", query), state=query["state"])
    assert back.status_code == 303 and back.headers["location"] == "/approvals"
    now = bastion.clock()
    assert bastion.server.store.session_login(earlier, now) is None
    assert bastion.server.store.session_login(back.cookies["bastion_session"], now)


def test_userinfo_completes_the_id_tokens_claims(bastion, idp, person, client):
    query = person.sent_to_provider(client, "u")
    code = idp.issue("u", query, sub="lin", groups=None)
    idp.userinfo_claims = {"sub": "lin", "groups": ["from-userinfo"], "iss": "ignored"}
    page = person.back_from_provider("u", code=code, state=query["state"])
    assert page.status_code == 200, page.text
    roles = bastion.server.facts.get(("has_role", Entity("User", "u:lin"), None, None))
    assert [f.fact[2] for f in roles] == ["from-userinfo"]


def test_userinfo_about_someone_else_is_refused(bastion, idp, person, client):
    query = person.sent_to_provider(client, "u")
    code = idp.issue("u", query, sub="kim")
    idp.userinfo_claims = {"sub": "mallory", "groups": ["admins"]}
    response = person.back_from_provider("u", code=code, state=query["state"])
    refused(response, 400, "about someone else")
    assert "u:kim" not in users(bastion) and "u:mallory" not in users(bastion)


def test_userinfo_naming_a_member_twice_signs_nobody_in_and_links_nothing(
    bastion, idp, person, client
):
    """UserInfo answering ``groups`` twice (support, then admins): which roles the person gets
    may not depend on the parser. Refused whole, naming the member: nobody signed in, no user,
    no fact, no account linked."""
    before = (sessions(bastion), users(bastion), linked(bastion), bastion.server.facts.head())
    query = person.sent_to_provider(client, "u")
    code = idp.issue("u", query, sub="noor", groups=None)
    idp.userinfo_text = _again({"sub": "noor", "groups": ["support"]}, {"groups": ["admins"]})
    try:
        response = person.back_from_provider("u", code=code, state=query["state"])
    finally:
        idp.userinfo_text = None
    refused(response, 503, "its userinfo endpoint sent no JSON")
    refused(response, 503, "member 'groups' twice")
    after = (sessions(bastion), users(bastion), linked(bastion), bastion.server.facts.head())
    assert after == before
    assert "u:noor" not in users(bastion)


# -- what must be refused -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("recipe", "words"),
    [
        ({"sign": "stranger"}, "signature is not the provider"),
        ({"sign": "none"}, "alg 'none'"),
        ({"sign": "HS256"}, "alg 'HS256'"),
        ({"iss": "https://evil.example"}, "is from 'https://evil.example'"),
        ({"aud": "someone-else"}, "not for bastion"),
        ({"aud": ["bastion-a", "someone-else"]}, "azp is not bastion"),
        ({"aud": ["bastion-a", "x"], "azp": "x"}, "azp is not bastion"),
        # Core §3.1.3.7 step 3: "The ID Token MUST be rejected if [...] it contains additional
        # audiences not trusted by the Client", whatever azp says.
        ({"aud": ["bastion-a", "x"], "azp": "bastion-a"}, "also for 'x'"),
        ({"nonce": "n\u00e9"}, "nonce is not this login"),
        ({"exp": int(time.time()) - 3600}, "has expired"),
        ({"exp": None}, "'exp' is missing"),
        ({"iat": int(time.time()) + 3600}, "not issued during this login"),
        ({"iat": int(time.time()) - 3600}, "not issued during this login"),
        ({"nonce": "another-login"}, "nonce is not this login"),
        ({"nonce": None}, "nonce is not this login"),
        ({"sub": None}, "no usable sub"),
        ({"sub": "s" * 256}, "no usable sub"),
        # RFC 7519 §4.1.5: a JWT "MUST NOT be accepted for processing" before its nbf, as a
        # trusted issuer's access token and an ID-JAG are not.
        ({"nbf": int(time.time()) + 3600}, "not valid yet (nbf)"),
        ({"nbf": "soon"}, "'nbf' is missing or not a number"),
    ],
    # Names that do not hold the times: every process of a parallel run collects the same tests.
    ids=lambda v: ",".join(sorted(v)) if isinstance(v, dict) else str(v)[:40],
)
def test_a_bad_id_token_signs_nobody_in(bastion, idp, person, client, recipe, words):
    before = (sessions(bastion), users(bastion))
    query = person.sent_to_provider(client, "a")
    code = idp.issue("a", query, **recipe)
    response = person.back_from_provider("a", code=code, state=query["state"], iss=idp.issuer("a"))
    refused(response, 400, words)
    assert (sessions(bastion), users(bastion)) == before


def test_missing_or_unknown_state_is_refused(person, idp, client):
    query = person.sent_to_provider(client, "a")
    code = idp.issue("a", query)
    refused(person.back_from_provider("a", code=code, iss=idp.issuer("a")), 400, "no state")
    response = person.back_from_provider("a", code=code, state="made-up", iss=idp.issuer("a"))
    refused(response, 400, "unknown, expired or already used")
    assert code not in idp.redeemed


def test_a_replayed_answer_is_refused_and_its_code_never_redeemed_twice(
    bastion, idp, person, client
):
    query = person.sent_to_provider(client, "a")
    code = idp.issue("a", query)
    first = person.back_from_provider("a", code=code, state=query["state"], iss=idp.issuer("a"))
    assert first.status_code in (200, 303), first.text  # consent, or the code when given before
    again = person.back_from_provider("a", code=code, state=query["state"], iss=idp.issuer("a"))
    refused(again, 400, "unknown, expired or already used")
    assert idp.redeemed.count(code) == 1


def test_an_answer_repeating_its_code_or_state_is_refused_and_spends_nothing(
    bastion, idp, person, client
):
    query = person.sent_to_provider(client, "a")
    code = idp.issue("a", query)
    answer = [("code", code), ("state", query["state"]), ("iss", idp.issuer("a"))]
    for twice in (("code", "another-code"), ("state", "another-state")):
        url = f"{bastion.url}/login/a/callback?{urlencode([*answer, twice])}"
        refused(person.http.get(url), 400, "The answer repeats")
    assert code not in idp.redeemed
    # The login was not spent: its answer, given once, is taken.
    taken = person.back_from_provider("a", code=code, state=query["state"], iss=idp.issuer("a"))
    assert taken.status_code in (200, 303), taken.text


def test_a_login_for_an_application_revoked_meanwhile_resumes_nothing(bastion, idp, person):
    client = bastion.register()  # its own: it is revoked
    query = person.sent_to_provider(client, "a")
    code = idp.issue("a", query)
    assert bastion.server.store.revoke_client(client["client_id"], time.time(), actor="test")
    before = sessions(bastion)
    response = person.back_from_provider("a", code=code, state=query["state"], iss=idp.issuer("a"))
    refused(response, 403, "The application is unknown or revoked.")
    assert sessions(bastion) == before


def test_an_answer_delivered_to_another_browser_is_refused(bastion, idp, person, client):
    query = person.sent_to_provider(client, "a")
    code = idp.issue("a", query)
    attacker = Person(bastion)
    try:
        attacker.open_authorization(client)  # a browser cookie of its own
        response = attacker.back_from_provider(
            "a", code=code, state=query["state"], iss=idp.issuer("a")
        )
    finally:
        attacker.close()
    refused(response, 403, "started in another browser")
    assert code not in idp.redeemed


def test_a_login_resumes_no_authorization_request_of_another_browser(bastion, idp, person, client):
    # Login CSRF: the person's sign-in must not complete a request started in the attacker's
    # browser (the code would go to the attacker's session). Starting the login checks the
    # request's browser, so no login state over HTTP names another's; this holds at the
    # resumption too, for a state written by any other way: here, one changed in place.
    fields = hidden_fields(person.open_authorization(client).text)
    started = person.http.post(f"{bastion.url}/login/a", data=fields)
    assert started.status_code == 303, started.text
    query = {k: v[0] for k, v in parse_qs(urlsplit(started.headers["location"]).query).items()}
    attacker = Person(bastion)
    try:
        theirs = hidden_fields(attacker.open_authorization(client).text)["request_id"]
    finally:
        attacker.close()
    bastion.db.execute(
        "UPDATE identity_login_states SET request_id = ? WHERE request_id = ?",
        (theirs, fields["request_id"]),
    )
    before = sessions(bastion)
    code = idp.issue("a", query)
    response = person.back_from_provider("a", code=code, state=query["state"], iss=idp.issuer("a"))
    refused(response, 400, "request expired while you signed in")
    assert sessions(bastion) == before


def test_mix_up_an_answer_for_one_provider_at_another_is_refused(idp, person, client):
    query = person.sent_to_provider(client, "a")
    code = idp.issue("a", query)
    response = person.back_from_provider("b", code=code, state=query["state"])
    refused(response, 403, "another provider")
    assert code not in idp.redeemed


@pytest.mark.parametrize("iss", ["https://evil.example", None])
def test_mix_up_the_rfc_9207_iss_must_name_the_provider(idp, person, client, iss):
    query = person.sent_to_provider(client, "a")
    code = idp.issue("a", query)
    params = {"code": code, "state": query["state"]}
    if iss is not None:
        params["iss"] = iss
    response = person.back_from_provider("a", **params)
    refused(response, 400, "https://evil.example" if iss else "lacks the iss")
    assert code not in idp.redeemed


def test_a_provider_that_sends_an_error_signs_nobody_in(idp, person, client):
    query = person.sent_to_provider(client, "b")
    response = person.back_from_provider("b", error="access_denied", state=query["state"])
    refused(response, 403, "The provider refused: access_denied")


def test_a_providers_error_text_is_shown_and_recorded_escaped_and_bounded(
    bastion, idp, person, client
):
    """``error`` and ``error_description`` come in the callback's query, which anyone can send a
    browser to: markup, a line break, an ANSI escape or a right-to-left override in them must
    neither render, nor forge a line of a log or of ``bastion audit``, nor reverse the page's
    text, and 10 KB of them is not shown nor kept whole."""
    bastion.clock.advance(bastion.server.refusals.window_seconds + 1)  # a window of its own
    query = person.sent_to_provider(client, "b")
    description = "<script>alert(1)</script>\nforged line \x1b[31mred\u202eevil" + "x" * 10_000
    response = person.back_from_provider(
        "b", error="access_denied\u202e\n", error_description=description, state=query["state"]
    )
    assert response.status_code == 403, response.text
    assert "<script>" not in response.text
    shown = html.unescape(response.text)
    assert "The provider refused: access_denied\\u202e\\u000a (<script>alert(1)</script>" in shown
    assert "\\u000aforged line \\u001b[31mred\\u202eevil" in shown
    for raw in ("\n", "\x1b", "\u202e"):
        assert raw not in shown
    assert "more characters)" in shown and "x" * 1000 not in shown
    [(detail,)] = bastion.db.execute(
        "SELECT detail FROM audit_events WHERE kind = 'login.refused' AND detail LIKE ?",
        ("%forged line%",),
    )
    recorded = json.loads(detail)
    assert recorded["reason"] == "provider_error"
    assert recorded["description"].startswith(
        "The provider refused: access_denied\\u202e\\u000a (<script>alert(1)</script>"
        "\\u000aforged line \\u001b[31mred\\u202eevil"
    )
    for raw in ("\n", "\x1b", "\u202e"):
        assert raw not in recorded["description"]
    assert len(recorded["description"]) < 300


def test_a_provider_that_is_down_shows_a_clear_page_and_no_login(bastion, person, client):
    before = sessions(bastion)
    response = person.choose(person.open_authorization(client), "down")
    refused(response, 503, "Down Provider cannot be reached now")
    assert response.headers["retry-after"]
    assert sessions(bastion) == before


def test_a_token_endpoint_that_fails_signs_nobody_in(bastion, idp, person, client):
    query = person.sent_to_provider(client, "a")
    code = idp.issue("a", query)
    idp.token_status = 500
    try:
        response = person.back_from_provider(
            "a", code=code, state=query["state"], iss=idp.issuer("a")
        )
    finally:
        idp.token_status = 200
    refused(response, 503, "answered HTTP 500")


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/x", "/\\evil.example"])
def test_open_redirect_the_page_to_resume_must_be_local(bastion, person, target):
    page = person.http.get(f"{bastion.url}/sign-in?next=/approvals")
    form = {**hidden_fields(page.text), "next": target}
    refused(person.http.post(f"{bastion.url}/login/a", data=form), 400, "page of this server")


def test_open_redirect_the_resumed_request_goes_only_to_the_clients_registered_uri(
    idp, person, client
):
    query = person.sent_to_provider(client, "a")
    code = idp.issue("a", query)
    done = person.back_from_provider(
        "a",
        code=code,
        state=query["state"],
        iss=idp.issuer("a"),
        redirect_uri="https://evil.example/cb",
        next="//evil.example/",
    )
    assert "evil.example" not in done.text
    if done.status_code == 200:  # the consent page, unless ada consented to this client before
        done = person.http.post(
            f"{person.bastion.url}/authorize/consent",
            data={**hidden_fields(done.text), "decision": "allow"},
        )
    assert done.status_code == 303
    assert done.headers["location"].startswith(f"{client['redirect_uris'][0]}?code=")


def test_a_login_cannot_start_without_the_forms_csrf_token(bastion, person, client):
    page = person.open_authorization(client)
    form = {**hidden_fields(page.text), "csrf_token": "forged"}
    refused(person.http.post(f"{bastion.url}/login/a", data=form), 403, "CSRF")
    page = person.http.get(f"{bastion.url}/sign-in?next=/approvals")
    form = {**hidden_fields(page.text), "csrf_token": "1.forged"}
    refused(person.http.post(f"{bastion.url}/login/a", data=form), 403, "expired or came from")


def test_a_provider_login_started_from_another_site_is_refused(bastion, person, client):
    page = person.open_authorization(client)
    started = person.http.post(
        f"{bastion.url}/login/a",
        data=hidden_fields(page.text),
        headers={"Origin": "https://evil.example"},
    )
    refused(started, 403, "sent from another site")
    assert "location" not in started.headers


def test_a_disabled_user_cannot_log_in_through_the_provider(bastion, idp, person, client):
    query = person.sent_to_provider(client, "a")
    first = person.back_from_provider(
        "a", code=idp.issue("a", query, sub="grace"), state=query["state"], iss=idp.issuer("a")
    )
    assert first.status_code == 200, first.text
    assert bastion.server.store.disable_user("a:grace", bastion.clock(), actor="test")
    query = person.sent_to_provider(client, "a")
    again = person.back_from_provider(
        "a", code=idp.issue("a", query, sub="grace"), state=query["state"], iss=idp.issuer("a")
    )
    refused(again, 403, "disabled")


def test_another_person_of_the_provider_with_the_same_user_claim_cannot_take_the_account(
    bastion, idp, person, client
):
    """With a ``user_claim`` other than ``sub`` (here ``email``), the value can pass from one
    person of the provider to another (an address given again, a name edited): the account is
    bound to the ``sub`` that first signed in, and another ``sub`` is refused until an
    administrator releases the account (`bastion users unlink`)."""
    email = "lin@corp.example"

    def login(sub: str) -> httpx.Response:
        query = person.sent_to_provider(client, "e")
        code = idp.issue("e", query, sub=sub, email=email, email_verified=True)
        return person.back_from_provider("e", code=code, state=query["state"])

    assert login("lin-1").status_code == 200
    before = sessions(bastion)
    refused(login("someone-else-7"), 403, "belongs to another account")
    assert sessions(bastion) == before
    assert login("lin-1").status_code == 200  # the person it is bound to still signs in
    refusals = bastion.db.execute(
        "SELECT detail FROM audit_events WHERE kind = 'login.refused' AND detail LIKE ?",
        ("%account_taken%",),
    )
    assert len(refusals) == 1

    from bastion.cli import main

    database = ["--database", bastion.db.url]
    assert main(["users", "unlink", f"e:{email}", *database]) == 0
    assert main(["users", "unlink", f"e:{email}", *database]) != 0  # nothing bound any more
    unlinked = bastion.db.execute("SELECT detail FROM audit_events WHERE kind = 'user.unlinked'")
    assert [json.loads(d)["accounts"] for (d,) in unlinked] == [[{"provider": "e", "sub": "lin-1"}]]
    assert login("someone-else-7").status_code == 200  # released: bound to the new sub now
    refused(login("lin-1"), 403, "belongs to another account")


def test_a_providers_user_id_is_kept_as_written_and_shown_escaped_where_it_reads_as_another(
    bastion, idp, client
):
    """The provider vouches for its ids: ``аda`` (a Cyrillic а) signs in, and ``José`` in NFC
    and in NFD are two users, as at the provider (one in NFC, the second person would be held
    out of the first's account, or, with a ``user_claim`` other than ``sub``, be them). The
    page says whom it signed in, escaped where the id would read as another."""
    shown = {}
    for sub in ("\u0430da", "Jos\u00e9", "Jose\u0301"):
        person = Person(bastion)
        try:
            query = person.sent_to_provider(client, "a")
            code = idp.issue("a", query, sub=sub)
            page = person.back_from_provider(
                "a", code=code, state=query["state"], iss=idp.issuer("a")
            )
            assert page.status_code == 200, page.text
            shown[sub] = re.search("Signed in as <strong>(.*?)</strong>", page.text)[1]
        finally:
            person.close()
    assert shown == {
        "\u0430da": "a:\\u0430da",
        "Jos\u00e9": "a:Jos\u00e9",
        "Jose\u0301": "a:Jose\\u0301",
    }
    assert {"a:\u0430da", "a:Jos\u00e9", "a:Jose\u0301"} <= set(users(bastion))


def test_a_provider_user_cannot_take_the_name_of_a_client(bastion, idp, person, client):
    """With ``user_prefix = ""`` the provider names bastion's users; a name that is a client's
    id would make the person the ``User{<client id>}`` of that agent acting as itself (client
    credentials), sharing its roles and state: refused, nothing written."""
    agent = bastion.register_as_admin(
        token_endpoint_auth_method="client_secret_basic",
        grant_types=["client_credentials"],
        redirect_uris=[],
    )
    before = sessions(bastion)
    query = person.sent_to_provider(client, "n")
    code = idp.issue("n", query, sub=agent["client_id"])
    refused(person.back_from_provider("n", code=code, state=query["state"]), 400, "is the id of")
    assert agent["client_id"] not in users(bastion) and sessions(bastion) == before
    assert not bastion.db.execute("SELECT 1 FROM identity_accounts WHERE provider = 'n'")


def test_a_user_stays_bound_to_its_sub_after_that_person_signs_in_under_another_name(
    bastion, idp, person, client
):
    """A person whose email changes at the provider (``jo.doe@`` to ``jo.roe@``) signs in to
    a new user; the user of the old address keeps its grants, facts, approvals and upstream
    connections, and stays theirs: when the provider gives the old address to someone else,
    that person is refused (``account_taken``) until an administrator releases the user."""
    old, new = "jo.doe@corp.example", "jo.roe@corp.example"

    def login(sub: str, email: str) -> httpx.Response:
        query = person.sent_to_provider(client, "e")
        code = idp.issue("e", query, sub=sub, email=email, email_verified=True)
        return person.back_from_provider("e", code=code, state=query["state"])

    assert login("jo-1", old).status_code == 200
    assert login("jo-1", new).status_code == 200  # the same person, renamed
    before = sessions(bastion)
    refused(login("new-hire-9", old), 403, "belongs to another account")
    assert sessions(bastion) == before
    assert login("jo-1", old).status_code == 200  # still theirs

    from bastion.cli import main

    database = ["--database", bastion.db.url]
    assert main(["users", "unlink", f"e:{old}", *database]) == 0
    unlinked = bastion.db.execute(
        "SELECT detail FROM audit_events WHERE kind = 'user.unlinked' AND subject = ?",
        (f"e:{old}",),
    )
    assert [json.loads(d)["accounts"] for (d,) in unlinked] == [[{"provider": "e", "sub": "jo-1"}]]
    assert login("new-hire-9", old).status_code == 200  # released: the new person's now
    assert login("jo-1", new).status_code == 200  # the other user stays bound to jo-1
    refused(login("new-hire-9", new), 403, "belongs to another account")


def test_accounts_bound_before_an_upgrade_stay_bound_on_either_database(
    database_url, tmp_path, idp
):
    """A database from before the bindings were kept (identity schema 2): the user a sub signed
    in to stays its own, and a user two subs signed in to refuses both until it is released."""
    from bastion.db import Database
    from bastion.identity.accounts import MIGRATIONS as _MIGRATIONS

    old = Database(database_url)
    try:
        assert old.migrate("identity", _MIGRATIONS[:2]) == 2
        for sub, user in (("jo-1", "e:jo@corp.example"), ("x-1", "e:x@c"), ("x-2", "e:x@c")):
            old.execute(
                "INSERT INTO identity_accounts (provider, subject, username, facts,"
                " last_login_at) VALUES ('e', ?, ?, '[]', 1)",
                (sub, user),
            )
    finally:
        old.close()
    identity = by_email(idp)
    with bastion_with_providers(
        database_url, str(tmp_path / "keys"), free_socket(), identity
    ) as bastion:
        person = Person(bastion)
        client = bastion.register()

        def login(sub: str, email: str) -> httpx.Response:
            query = person.sent_to_provider(client, "e")
            code = idp.issue("e", query, sub=sub, email=email, email_verified=True)
            return person.back_from_provider("e", code=code, state=query["state"])

        try:
            assert login("jo-1", "jo.roe@corp.example").status_code == 200  # renamed
            refused(login("new-hire-9", "jo@corp.example"), 403, "belongs to another account")
            for sub in ("x-1", "x-2"):
                refused(login(sub, "x@c"), 403, "belongs to another account")
        finally:
            person.close()


def _blocked_by(conn, pid: int) -> int:
    """How many backends wait, directly or through another waiter, on the backend ``pid``."""
    waiting = conn.execute(
        "SELECT pid, pg_blocking_pids(pid) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
    ).fetchall()
    blocked, grew = {pid}, True
    while grew:
        before = len(blocked)
        blocked |= {waiter for waiter, blockers in waiting if blocked & set(blockers)}
        grew = len(blocked) > before
    return len(blocked) - 1


def test_two_first_logins_at_once_on_two_replicas_bind_the_user_to_one_sub(
    postgres_url, tmp_path, idp
):
    """Two people whose ``user_claim`` names one user sign in for the first time at the same
    moment, each through a replica of its own: one gets the user, the other ``account_taken``.
    Both logins are held at the user's row (another connection locks the users' table) until
    both wait, then let go together."""
    import threading

    import psycopg

    identity = by_email(idp)
    email = "shared@corp.example"
    with (
        bastion_with_providers(postgres_url, str(tmp_path / "k1"), free_socket(), identity) as one,
        bastion_with_providers(postgres_url, str(tmp_path / "k2"), free_socket(), identity) as two,
    ):
        people = [Person(one), Person(two)]
        answers: dict[str, httpx.Response] = {}
        try:
            queries = [
                p.sent_to_provider(b.register(), "e")
                for p, b in zip(people, (one, two), strict=True)
            ]
            codes = [
                idp.issue("e", q, sub=sub, email=email, email_verified=True)
                for q, sub in zip(queries, ("first-1", "second-2"), strict=True)
            ]

            def back(i: int) -> None:
                answers[f"s{i}"] = people[i].back_from_provider(
                    "e", code=codes[i], state=queries[i]["state"]
                )

            threads = [threading.Thread(target=back, args=(i,)) for i in (0, 1)]
            with psycopg.connect(postgres_url) as locker:
                locker.execute("LOCK TABLE oauth_users IN SHARE MODE")
                for t in threads:
                    t.start()
                with psycopg.connect(postgres_url, autocommit=True) as watcher:
                    me = locker.info.backend_pid
                    eventually(lambda: _blocked_by(watcher, me) >= 2, every=0.05)
                    assert _blocked_by(watcher, me) == 2
                locker.rollback()
            for t in threads:
                t.join(timeout=PATIENCE)
        finally:
            for p in people:
                p.close()
        statuses = sorted(a.status_code for a in answers.values())
        assert statuses == [200, 403], {k: a.text[-300:] for k, a in answers.items()}
        bound = one.db.execute(
            "SELECT subject FROM identity_user_bindings WHERE username = ?", (f"e:{email}",)
        )
        assert len(bound) == 1


@pytest.mark.parametrize("verified", [False, "true", None])
def test_an_email_the_provider_does_not_vouch_for_names_no_user(
    bastion, idp, person, client, verified
):
    """With ``user_claim = "email"``, the address must be one the provider verified
    (``email_verified`` true): many providers let a person type any address, someone else's."""
    query = person.sent_to_provider(client, "e")
    code = idp.issue("e", query, sub="typed-7", email="ceo@corp.example", email_verified=verified)
    refused(person.back_from_provider("e", code=code, state=query["state"]), 400, "email_verified")
    assert "e:ceo@corp.example" not in users(bastion)


# -- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ({"providers": [], "local_passwords": False}, "nobody could log in"),
        ({"provider": []}, "unknown key identity.provider"),
        (
            {"providers": [{"id": "Bad Id", "issuer": "https://i.example", "client_id": "c"}]},
            "providers[0].id",
        ),
        (
            {"providers": [{"id": "x", "issuer": "http://idp.example", "client_id": "c"}]},
            "must be an https URL",
        ),
        (
            {"providers": [{"id": "x", "issuer": "https://i.example", "client_id": "c"}]},
            "client_secret is required",
        ),
        (
            {
                "providers": [
                    {
                        "id": "x",
                        "issuer": "https://i.example",
                        "client_id": "c",
                        "client_secret": "${NOT_SET}",
                    }
                ]
            },
            "the environment has no NOT_SET",
        ),
        (
            {
                "providers": [
                    {
                        "id": "x",
                        "issuer": "https://i.example",
                        "client_id": "c",
                        "token_endpoint_auth_method": "none",
                        "algorithms": ["HS256"],
                    }
                ]
            },
            "asymmetric only",
        ),
        (
            {
                "providers": [
                    {
                        "id": "x",
                        "issuer": "https://i.example",
                        "client_id": "c",
                        "token_endpoint_auth_method": "none",
                        "scopes": ["email"],
                    }
                ]
            },
            'holding "openid"',
        ),
        (
            {
                "providers": [
                    {
                        "id": "x",
                        "issuer": "https://i.example",
                        "client_id": "c",
                        "token_endpoint_auth_method": "none",
                        "facts": [{"claim": "groups", "name": "r", "resource": "acme"}],
                    }
                ]
            },
            '"Type:id"',
        ),
        (
            {
                "providers": [
                    {
                        "id": "x",
                        "issuer": "https://i.example",
                        "client_id": "c",
                        "token_endpoint_auth_method": "none",
                        "user_prefix": "corp\n",  # would forge a line of `users list`
                    }
                ]
            },
            "user_prefix: a string of at most 64 printable characters",
        ),
        (
            {
                "providers": [
                    {
                        "id": "x",
                        "issuer": "https://i.example",
                        "client_id": "c",
                        "token_endpoint_auth_method": "none",
                        "user_prefix": "\u0441orp:",  # a Cyrillic с: reads as corp:
                    }
                ]
            },
            "user_prefix: a prefix that reads as itself: this one mixes scripts in one word"
            " (Latin and Cyrillic: \\u0441orp)",
        ),
        (
            {
                "providers": [
                    {
                        "id": "x",
                        "issuer": "https://i.example",
                        "client_id": "c",
                        "token_endpoint_auth_method": "none",
                        "trusted_audiences": "project-apps",
                    }
                ]
            },
            "trusted_audiences: a list of audience values",
        ),
    ],
    ids=lambda v: str(v)[:30],
)
def test_a_wrong_identity_table_is_refused_at_start_naming_its_key(table, words):
    with pytest.raises(IdentityConfigError) as error:
        IdentitySettings.from_mapping(table, {})
    assert words in str(error.value)


def test_defaults_namespace_users_per_provider_and_turn_passwords_off():
    settings = IdentitySettings.from_mapping(
        {
            "providers": [
                {
                    "id": "corp",
                    "issuer": "https://i.example",
                    "client_id": "c",
                    "client_secret": "s3cr3t-value",
                }
            ]
        },
        {},
    )
    provider = settings.providers[0]
    assert (provider.user_claim, provider.user_prefix) == ("sub", "corp:")
    assert settings.local_passwords is False
    assert "s3cr3t-value" not in repr(provider)


def test_provider_login_and_its_facts_on_postgresql(postgres_url, tmp_path, idp):
    identity = {
        "providers": [
            {
                "id": "b",
                "issuer": idp.issuer("b"),
                "client_id": "bastion-b",
                "client_secret": SECRETS["bastion-b"],
                "facts": [{"claim": "groups", "name": "{value}", "resource": "Org:acme"}],
            }
        ]
    }
    with bastion_with_providers(
        postgres_url, str(tmp_path / "keys"), free_socket(), identity
    ) as bastion:
        person = Person(bastion)
        try:
            query = person.sent_to_provider(bastion.register(), "b")
            code = idp.issue("b", query, groups=["devs"])
            page = person.back_from_provider("b", code=code, state=query["state"])
            assert "Signed in as <strong>b:ada</strong>" in page.text, page.text
            again = person.back_from_provider("b", code=code, state=query["state"])
            refused(again, 400, "already used")
        finally:
            person.close()
        roles = bastion.server.facts.get(("has_role", Entity("User", "b:ada"), None, None))
        assert [f.fact[2] for f in roles] == ["devs"]


def test_password_sign_in_of_bastions_pages_is_refused_when_local_passwords_are_off(
    bastion, person
):
    page = person.http.get(f"{bastion.url}/sign-in?next=/approvals")
    form = {**hidden_fields(page.text), "username": "alice", "password": "x" * 12}
    refused(person.http.post(f"{bastion.url}/sign-in", data=form), 403, "password is turned off")


def test_local_passwords_can_be_kept_beside_the_providers(tmp_path, idp):
    from bastion.oauth.users import create_user

    identity = {
        "local_passwords": True,
        "providers": [
            {
                "id": "b",
                "issuer": idp.issuer("b"),
                "client_id": "bastion-b",
                "client_secret": SECRETS["bastion-b"],
            }
        ],
    }
    with bastion_with_providers(
        str(tmp_path / "bastion.db"), str(tmp_path / "keys"), free_socket(), identity
    ) as bastion:
        create_user(bastion.server.store, "alice", "alice-password", bastion.clock(), actor="test")
        person = Person(bastion)
        try:
            page = person.open_authorization(bastion.register())
            assert [action for action, _ in buttons(page.text)] == ["/login/b"]
            signed_in = person.http.post(
                f"{bastion.url}/authorize/login",
                data={
                    **hidden_fields(page.text),
                    "username": "alice",
                    "password": "alice-password",
                },
            )
            assert "Signed in as <strong>alice</strong>" in signed_in.text, signed_in.text
        finally:
            person.close()


def test_a_suspended_user_cannot_log_in_through_the_provider(bastion, idp, person, client):
    from bastion.facts.store import StoredFact
    from bastion.signals.suspensions import PREDICATE, Suspensions

    heidi = Entity("User", "a:heidi")
    view = Suspensions(bastion.clock)
    view.apply([StoredFact((PREDICATE, heidi))], ())
    before, bastion.server.suspensions = bastion.server.suspensions, view
    try:
        query = person.sent_to_provider(client, "a")
        answer = person.back_from_provider(
            "a", code=idp.issue("a", query, sub="heidi"), state=query["state"], iss=idp.issuer("a")
        )
    finally:
        bastion.server.suspensions = before
    refused(answer, 403, "suspended")


@pytest.mark.parametrize(
    ("auth_time", "words"),
    [
        (None, "did not say when you signed in"),
        (int(time.time()) - 3600, "used one from"),
        (int(time.time()) + 3600, "auth_time is in the future"),
        ("yesterday", "'auth_time' is not a number"),
    ],
    ids=["missing", "old", "future", "text"],
)
def test_a_recent_sign_in_asked_for_needs_the_providers_auth_time_to_show_it(
    bastion, idp, person, client, auth_time, words
):
    # OpenID Connect Core 1.0 §3.1.3.7 step 13: "If the max_age request parameter was used,
    # the Client SHOULD check the auth_time Claim value and request re-authentication if it
    # determines too much time has elapsed since the last End-User authentication."
    before = sessions(bastion)
    query = person.sent_to_provider(client, "a", max_age="0")
    assert (query["max_age"], query["prompt"]) == ("0", "login")
    code = idp.issue("a", query, auth_time=auth_time)
    response = person.back_from_provider("a", code=code, state=query["state"], iss=idp.issuer("a"))
    refused(response, 400, words)
    assert sessions(bastion) == before


def test_a_sign_in_made_for_max_age_at_the_provider_is_taken(bastion, idp, person, client):
    query = person.sent_to_provider(client, "a", max_age="300")
    assert query["max_age"] == "300" and "prompt" not in query
    code = idp.issue("a", query, auth_time=int(time.time()) - 200)
    response = person.back_from_provider("a", code=code, state=query["state"], iss=idp.issuer("a"))
    assert response.status_code in (200, 303), response.text
    # Without max_age asked, the provider is not asked for a recent sign-in, nor checked.
    query = person.sent_to_provider(client, "a")
    assert "max_age" not in query and "prompt" not in query


def test_an_audience_the_provider_always_adds_is_taken_when_trusted(tmp_path, idp):
    identity = {
        "providers": [
            {
                "id": "b",
                "issuer": idp.issuer("b"),
                "client_id": "bastion-b",
                "client_secret": SECRETS["bastion-b"],
                "trusted_audiences": ["project-apps"],
            }
        ]
    }
    with bastion_with_providers(
        str(tmp_path / "b.db"), str(tmp_path / "keys"), free_socket(), identity
    ) as b:
        person = Person(b)
        try:
            client = b.register()
            query = person.sent_to_provider(client, "b")
            code = idp.issue("b", query, aud=["bastion-b", "project-apps"], azp="bastion-b")
            taken = person.back_from_provider("b", code=code, state=query["state"])
            assert taken.status_code == 200 and "Allow access?" in taken.text, taken.text
            query = person.sent_to_provider(client, "b")
            code = idp.issue("b", query, aud=["bastion-b", "project-apps", "y"], azp="bastion-b")
            refused(person.back_from_provider("b", code=code, state=query["state"]), 400, "'y'")
        finally:
            person.close()


# -- the ID token's at_hash ----------------------------------------------------------------


def _at_hash(access_token: str) -> str:
    digest = hashlib.sha256(access_token.encode()).digest()
    return base64.urlsafe_b64encode(digest[:16]).rstrip(b"=").decode()


@pytest.mark.parametrize(
    ("at_hash", "words"),
    [
        (_at_hash("another access token"), "at_hash is not that of the access token"),
        (_at_hash("opaque")[:-1], "at_hash is not that of the access token"),
        (12, "at_hash is not that of the access token"),
    ],
    ids=["another-token", "cut", "number"],
)
def test_an_id_token_whose_at_hash_names_another_access_token_signs_nobody_in(
    bastion, idp, person, client, at_hash, words
):
    # OpenID Connect Core 1.0 §3.1.3.8: in the code flow the client MAY check at_hash; bastion
    # does whenever it is there (the access token goes on to UserInfo).
    before = (sessions(bastion), users(bastion))
    query = person.sent_to_provider(client, "a")
    code = idp.issue("a", query, sub="hashed", at_hash=at_hash)
    response = person.back_from_provider("a", code=code, state=query["state"], iss=idp.issuer("a"))
    refused(response, 400, words)
    assert (sessions(bastion), users(bastion)) == before


def test_an_id_token_whose_at_hash_is_the_access_tokens_is_taken(bastion, idp, person, client):
    query = person.sent_to_provider(client, "a")
    code = idp.issue("a", query, sub="hashed", at_hash=_at_hash("opaque"))
    response = person.back_from_provider("a", code=code, state=query["state"], iss=idp.issuer("a"))
    assert response.status_code == 200 and "Allow access?" in response.text, response.text


# -- bastion's client authentication at the token endpoint -----------------------------------


def _one_provider(tmp_path, **settings):
    """bastion with the one provider ``p`` of ``idp``, made with ``settings``."""
    identity = {"providers": [{"id": "p", "client_id": "bastion-p", **settings}]}
    return bastion_with_providers(
        str(tmp_path / "p.db"), str(tmp_path / "keys"), free_socket(), identity
    )


def _log_in_at_p(b, idp) -> httpx.Response:
    person = Person(b)
    try:
        query = person.sent_to_provider(b.register(), "p")
        return person.back_from_provider("p", code=idp.issue("p", query), state=query["state"])
    finally:
        person.close()


@pytest.fixture
def provider_p(idp):
    """``idp``'s issuer ``p``, with what a test announces and registers there reset after."""
    yield idp
    for table in (idp.metadata, idp.client_keys):
        table.pop("p", None)


def test_a_provider_that_takes_only_client_secret_post_gets_it(tmp_path, provider_p):
    # OpenID Connect Discovery 1.0 §3: token_endpoint_auth_methods_supported; bastion's default
    # (client_secret_basic) where the provider announces it, else client_secret_post.
    idp = provider_p
    idp.metadata["p"] = {"token_endpoint_auth_methods_supported": ["client_secret_post"]}
    with _one_provider(tmp_path, issuer=idp.issuer("p"), client_secret=SECRETS["bastion-p"]) as b:
        page = _log_in_at_p(b, idp)
        assert "Allow access?" in page.text, page.text
    method, form = idp.authenticated[-1]
    assert method == "client_secret_post" and form["client_id"] == "bastion-p"


@pytest.mark.parametrize(
    ("announced", "settings", "words"),
    [
        (
            ["client_secret_post", "private_key_jwt"],
            {"token_endpoint_auth_method": "client_secret_basic"},
            "its token endpoint does not take client_secret_basic"
            " (token_endpoint_auth_methods_supported: ['client_secret_post', 'private_key_jwt']",
        ),
        (
            ["private_key_jwt", "tls_client_auth"],
            {},
            "its token endpoint takes no client secret (token_endpoint_auth_methods_supported:"
            " ['private_key_jwt', 'tls_client_auth']): set token_endpoint_auth_method",
        ),
        ("client_secret_basic", {}, "is not a list of names"),
    ],
    ids=["basic-not-announced", "no-secret-method", "not-a-list"],
)
def test_a_method_the_provider_does_not_announce_is_refused_before_the_person_leaves(
    tmp_path, provider_p, announced, settings, words
):
    idp = provider_p
    idp.metadata["p"] = {"token_endpoint_auth_methods_supported": announced}
    before = len(idp.authenticated)
    with _one_provider(
        tmp_path, issuer=idp.issuer("p"), client_secret=SECRETS["bastion-p"], **settings
    ) as b:
        person = Person(b)
        try:
            response = person.choose(person.open_authorization(b.register()), "p")
        finally:
            person.close()
    refused(response, 503, words)
    assert len(idp.authenticated) == before


def _key_file(tmp_path, key) -> str:
    path = tmp_path / "bastion-p.pem"
    path.write_bytes(key.as_pem(private=True))
    return str(path)


@pytest.mark.parametrize("audience", ["token_endpoint", "issuer"])
def test_private_key_jwt_sends_a_short_lived_assertion_signed_by_bastions_key(
    tmp_path, provider_p, audience
):
    """OpenID Connect Core 1.0 §9 and RFC 7523 §3: iss and sub the client_id, aud the token
    endpoint (or the issuer), a jti of its own per request, exp a minute after iat; the alg the
    first of the key's the provider announces; no secret sent."""
    idp = provider_p
    key = RSAKey.generate_key(2048)
    idp.client_keys["p"] = key
    idp.metadata["p"] = {
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["HS256", "PS256", "ES256"],
    }
    settings = {
        "issuer": idp.issuer("p"),
        "token_endpoint_auth_method": "private_key_jwt",
        "client_key_file": _key_file(tmp_path, key),
        "client_assertion_audience": audience,
    }
    with _one_provider(tmp_path, **settings) as b:
        for _ in range(2):
            page = _log_in_at_p(b, idp)
            assert page.status_code == 200 and "Allow access?" in page.text, page.text
    (first_method, first), (method, form) = idp.authenticated[-2:]
    assert first_method == method == "private_key_jwt"
    assert form["client_assertion_type"] == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    assert form["client_id"] == "bastion-p" and "client_secret" not in form
    token = jws.deserialize_compact(form["client_assertion"], key, algorithms=["PS256"])
    # A PEM key has no kid: its RFC 7638 thumbprint names it (unless client_key_id does).
    assert token.protected == {"alg": "PS256", "kid": key.thumbprint(), "typ": "JWT"}
    claims = json.loads(token.payload)
    assert claims["iss"] == claims["sub"] == "bastion-p"
    aud = idp.issuer("p") if audience == "issuer" else f"{idp.issuer('p')}/token"
    assert claims["aud"] == aud
    assert claims["exp"] - claims["iat"] == 60
    earlier = jws.deserialize_compact(first["client_assertion"], key, algorithms=["PS256"])
    assert claims["jti"] != json.loads(earlier.payload)["jti"]


def test_a_key_whose_algorithms_the_provider_does_not_take_is_refused_before_the_login(
    tmp_path, provider_p
):
    idp = provider_p
    key = RSAKey.generate_key(2048)
    idp.metadata["p"] = {"token_endpoint_auth_signing_alg_values_supported": ["ES256", "EdDSA"]}
    settings = {
        "issuer": idp.issuer("p"),
        "token_endpoint_auth_method": "private_key_jwt",
        "client_key_file": _key_file(tmp_path, key),
    }
    with _one_provider(tmp_path, **settings) as b:
        person = Person(b)
        try:
            response = person.choose(person.open_authorization(b.register()), "p")
        finally:
            person.close()
    refused(response, 503, "it takes client assertions signed with ['ES256', 'EdDSA']")


def test_a_key_the_provider_refuses_signs_nobody_in_with_a_page_saying_what_to_fix(
    tmp_path, provider_p
):
    idp = provider_p
    idp.client_keys["p"] = RSAKey.generate_key(2048)  # registered there: not bastion's
    settings = {
        "issuer": idp.issuer("p"),
        "token_endpoint_auth_method": "private_key_jwt",
        "client_key_file": _key_file(tmp_path, RSAKey.generate_key(2048)),
    }
    with _one_provider(tmp_path, **settings) as b:
        response = _log_in_at_p(b, idp)
        refused(response, 502, "p refused bastion's own credentials at its token endpoint")
        text = html.unescape(response.text)
        assert "(invalid_client: who are you?\\u202e)" in text and "\u202e" not in text
        assert "`bastion identity client-jwks` prints it" in text
        assert b.db.execute("SELECT COUNT(*) FROM oauth_sessions")[0][0] == 0
        assert [u[0] for u in b.server.store.users()] == []
    assert idp.authenticated[-1][0] == "refused"
