"""How the person signed in, as the policy sees it: the ``acr`` (authentication context class) and
``amr`` (authentication methods, RFC 8176) of the sign-in behind a token, in
``context.token.acr`` and ``context.token.amr``.

A company provider's ID token carries them (OpenID Connect Core 1.0 §2); bastion keeps them with
the browser session and the grant, puts them in the access tokens it issues (RFC 9068 §2.2.1),
keeps the original sign-in's across refreshes, and reads them, with the same checks, from a
trusted issuer's access token and from an ID-JAG. A password typed at bastion is ``amr``
``["pwd"]`` with no ``acr``. A malformed value signs nobody in and is refused in a token.

One bastion (gateway and authorization server over real HTTP) with the test provider of
test_oidc_login_refusals.py (provider ``r``), a trusted issuer (test_trusted_issuers.py) and an
ID-JAG issuer (test_id_jag.py), each a real HTTP server signing real JWTs. The policy refuses
every call to ``deskhttp`` whose sign-in was not multi-factor."""

from __future__ import annotations

import base64
import json
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest

from bastion.oauth.sign_in_context import MAX_ACR_CHARS, MAX_AMR_CHARS, MAX_AMR_VALUES
from bastion.policy.parser import parse_fact
from tests import clients
from tests.gateway.streams import call_tool, modern_headers, modern_request
from tests.gateway.support import REDIRECT_URI, public_client, start
from tests.oauth.support import free_socket, hidden_fields, pkce_pair, serve

from .test_id_jag import INITIAL_TOKEN, EnterpriseIdp, present, register
from .test_oidc_id_token_keys import log_in, provider_login
from .test_oidc_login_refusals import SECRETS, TestProvider, refused
from .test_trusted_issuers import TestIssuer

RULES = """
deny(_user: User, "call", tool: Tool) if
  has_relation(tool, "server", McpServer{"deskhttp"}) and
  not "mfa" in context.token.amr;
"""
SCOPES = "customers:read customers:write"


@pytest.fixture(scope="module")
def provider():
    idp = TestProvider()
    with serve(idp.app, free_socket()) as url:
        idp.url = url
        yield idp


@pytest.fixture(scope="module")
def issuer():
    idp = TestIssuer()
    with serve(idp.app, free_socket()) as url:
        idp.url = url
        yield idp


@pytest.fixture(scope="module")
def enterprise():
    idp = EnterpriseIdp()
    with serve(idp.app, free_socket()) as url:
        idp.url = url
        yield idp


@pytest.fixture(scope="module")
def bastion(tmp_path_factory, provider, issuer, enterprise):
    identity = {
        "local_passwords": True,
        "providers": [
            {
                "id": "r",
                "issuer": provider.issuer("r"),
                "client_id": "bastion-r",
                "client_secret": SECRETS["bastion-r"],
            }
        ],
    }
    trusted = [{"issuer": issuer.issuer("a"), "audiences": {"deskhttp": "api://desk-a"}}]
    oauth = {
        "initial_access_tokens": [INITIAL_TOKEN],
        "id_jag": {"issuers": [{"issuer": enterprise.issuer("acme")}]},
    }
    with start(
        tmp_path_factory.mktemp("sign-in-methods"),
        identity=identity,
        gateway={"trusted_issuers": trusted},
        oauth=oauth,
        policy_extra=RULES,
    ) as b:
        b.apply([parse_fact('has_role(User{"r:ada"}, "member", Team{"support"})')])
        yield b


def claims(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def through_the_provider(bastion, provider, **id_token) -> dict:
    """A person signs in through provider ``r`` (its ID token saying ``id_token`` over the
    usual claims) for an MCP client that asks for ``deskhttp``; the token endpoint's answer."""
    client = public_client(bastion.http, bastion.url, "sign-in methods agent")
    verifier, challenge = pkce_pair()
    with clients.client(follow_redirects=False, timeout=20) as browser:
        params = {
            "response_type": "code",
            "client_id": client["client_id"],
            "redirect_uri": REDIRECT_URI,
            "state": "s",
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "resource": bastion.mcp_url("deskhttp"),
            "scope": SCOPES,
        }
        page = browser.get(f"{bastion.url}/authorize?{urlencode(params)}")
        assert page.status_code == 200, page.text
        started = browser.post(f"{bastion.url}/login/r", data=hidden_fields(page.text))
        assert started.status_code == 303, started.text
        query = {k: v[0] for k, v in parse_qs(urlsplit(started.headers["location"]).query).items()}
        code = provider.issue("r", query, **id_token)
        back = browser.get(
            f"{bastion.url}/login/r/callback?{urlencode({'code': code, 'state': query['state']})}"
        )
        assert "Allow access?" in back.text, back.text
        done = browser.post(
            f"{bastion.url}/authorize/consent",
            data={**hidden_fields(back.text), "decision": "allow"},
        )
        assert done.status_code == 303, done.text
        code = parse_qs(urlsplit(done.headers["location"]).query)["code"][0]
    tokens = bastion.http.post(
        f"{bastion.url}/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "code_verifier": verifier,
            "client_id": client["client_id"],
        },
    )
    assert tokens.status_code == 200, tokens.text
    return {**tokens.json(), "client_id": client["client_id"]}


def search(bastion, token: str) -> dict:
    return call_tool(bastion, token, "deskhttp", "search_customers", {"query": "a"})


def allowed(answer: dict) -> bool:
    return "result" in answer and not answer["result"].get("isError")


def decided_with(bastion, answer: dict) -> dict:
    """The ``context.token`` the decision of a refused call saw."""
    bastion.flush()
    return bastion.records.get(answer["error"]["data"]["decision_id"]).context["token"]


# -- a company sign-in's acr and amr reach the policy ----------------------------------------------


def test_a_multi_factor_sign_in_calls_what_the_policy_keeps_for_it(bastion, provider):
    tokens = through_the_provider(bastion, provider, acr="phr", amr=["pwd", "mfa", "hwk"])
    carried = claims(tokens["access_token"])
    assert (carried["acr"], carried["amr"]) == ("phr", ["pwd", "mfa", "hwk"])
    assert allowed(search(bastion, tokens["access_token"]))


def test_a_password_only_sign_in_at_the_provider_is_refused_by_that_policy(bastion, provider):
    tokens = through_the_provider(bastion, provider, acr="urn:acme:silver", amr=["pwd"])
    answer = search(bastion, tokens["access_token"])
    assert not allowed(answer), answer
    assert decided_with(bastion, answer)["amr"] == ["pwd"]
    assert decided_with(bastion, answer)["acr"] == "urn:acme:silver"


def test_a_sign_in_that_says_nothing_of_its_methods_is_refused_by_that_policy(bastion, provider):
    tokens = through_the_provider(bastion, provider)
    carried = claims(tokens["access_token"])
    assert "acr" not in carried and "amr" not in carried
    answer = search(bastion, tokens["access_token"])
    assert not allowed(answer), answer
    assert "amr" not in decided_with(bastion, answer)


def test_a_refresh_keeps_the_sign_ins_methods_never_more(bastion, provider):
    tokens = through_the_provider(bastion, provider, acr="phr", amr=["hwk", "mfa"])
    refreshed = bastion.http.post(
        f"{bastion.url}/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": tokens["refresh_token"],
            "client_id": tokens["client_id"],
        },
    )
    assert refreshed.status_code == 200, refreshed.text
    carried = claims(refreshed.json()["access_token"])
    assert (carried["acr"], carried["amr"]) == ("phr", ["hwk", "mfa"])
    assert allowed(search(bastion, refreshed.json()["access_token"]))


def test_a_password_typed_at_bastion_is_amr_pwd_and_no_acr(bastion):
    token = bastion.token("sam", "deskhttp")
    carried = claims(token)
    assert carried["amr"] == ["pwd"] and "acr" not in carried
    answer = search(bastion, token)
    assert not allowed(answer), answer
    assert decided_with(bastion, answer)["amr"] == ["pwd"]


# -- malformed values sign nobody in ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("id_token", "words"),
    [
        ({"amr": "mfa"}, "amr must be a list of strings"),
        ({"amr": ["pwd", 2]}, "amr must be a list of strings"),
        ({"amr": ["mfa"] * (MAX_AMR_VALUES + 1)}, f"at most {MAX_AMR_VALUES}"),
        ({"amr": ["x" * (MAX_AMR_CHARS + 1)]}, f"1 to {MAX_AMR_CHARS} printable"),
        ({"amr": [""]}, f"1 to {MAX_AMR_CHARS} printable"),
        ({"amr": ["mf\na"]}, f"1 to {MAX_AMR_CHARS} printable"),
        ({"acr": 2}, "acr must be a string"),
        ({"acr": "x" * (MAX_ACR_CHARS + 1)}, f"1 to {MAX_ACR_CHARS} printable"),
    ],
    ids=[
        "string",
        "not-strings",
        "too-many",
        "too-long",
        "empty",
        "control",
        "acr-int",
        "acr-long",
    ],
)
def test_a_malformed_acr_or_amr_signs_nobody_in(tmp_path, provider, id_token, words):
    with provider_login(tmp_path, provider, "r") as (b, client, person):
        response = log_in(provider, person, client, "r", **id_token)
        refused(response, 400, words)
        assert b.db.execute("SELECT COUNT(*) FROM oauth_sessions")[0][0] == 0
        assert not b.db.execute("SELECT 1 FROM audit_events WHERE kind = 'login.succeeded'")


# -- a trusted issuer's token and an ID-JAG ------------------------------------------------------


def test_a_trusted_issuers_amr_reaches_the_policy(bastion, issuer):
    assert allowed(search(bastion, issuer.token("a", amr=["mfa", "otp"], acr="2")))
    answer = search(bastion, issuer.token("a", amr=["pwd"]))
    assert not allowed(answer), answer
    assert decided_with(bastion, answer)["amr"] == ["pwd"]


@pytest.mark.parametrize(
    ("claim", "words"),
    [
        ({"amr": "mfa"}, "amr must be a list of strings"),
        ({"amr": ["mfa"] * (MAX_AMR_VALUES + 1)}, f"at most {MAX_AMR_VALUES}"),
        ({"acr": ["phr"]}, "acr must be a string"),
    ],
    ids=["amr-string", "amr-too-many", "acr-list"],
)
def test_a_trusted_issuers_token_with_a_malformed_acr_or_amr_is_refused(
    bastion, issuer, claim, words
):
    response = bastion.http.post(
        bastion.mcp_url("deskhttp"),
        json=modern_request(1, "tools/call", {"name": "search_customers", "arguments": {}}),
        headers=modern_headers(issuer.token("a", **claim), "tools/call", "search_customers"),
    )
    assert response.status_code == 401, response.text
    assert words in response.json()["error_description"]


def test_an_id_jags_acr_and_amr_are_carried_into_the_token_and_the_policy(bastion, enterprise):
    agent = register(bastion)
    jag = enterprise.id_jag(bastion, agent["client_id"], acr="phr", amr=["mfa", "hwk"])
    issued = present(bastion, agent, jag)
    assert issued.status_code == 200, issued.text
    carried = claims(issued.json()["access_token"])
    assert (carried["acr"], carried["amr"]) == ("phr", ["mfa", "hwk"])
    assert allowed(search(bastion, issued.json()["access_token"]))
    without = present(bastion, agent, enterprise.id_jag(bastion, agent["client_id"]))
    assert not allowed(search(bastion, without.json()["access_token"]))


def test_an_id_jag_with_a_malformed_amr_is_refused(bastion, enterprise):
    agent = register(bastion)
    response = present(bastion, agent, enterprise.id_jag(bastion, agent["client_id"], amr="mfa"))
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_grant"
    assert "amr must be a list of strings" in response.json()["error_description"]
