"""DPoP (RFC 9449) against a running bastion over real HTTP: a client written here makes real
proofs with joserfc, gets tokens bound to its key at ``/token`` and calls the gateway with them;
every way of breaking a proof, or of using a bound token without one, is refused. The official
MCP SDK client, which does not use DPoP, keeps getting and using Bearer tokens."""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from joserfc import jws
from joserfc import jwt as jose_jwt
from joserfc.jwk import ECKey, OctKey, RSAKey

from bastion.db import Database
from bastion.oauth import registration
from bastion.oauth.dpop import DPoPProofs, InvalidDPoPProof
from bastion.oauth.settings import DPoPSettings, OAuthSettings, SettingsError
from tests.delegation.support import ACCESS_TOKEN, EXCHANGE, start_studio
from tests.delegation.support import PASSWORD as STUDIO_PASSWORD
from tests.delegation.support import REDIRECT_URI as STUDIO_REDIRECT
from tests.gateway.streams import messages, modern_headers, modern_request
from tests.gateway.support import PASSWORD, REDIRECT_URI, start
from tests.oauth.support import log_in_and_consent, pkce_pair, signed_text

SERVER = "deskhttp"
TOOL = "search_customers"


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    # One more replica on the same database: a jti spent on one is spent on both.
    with start(tmp_path_factory.mktemp("dpop"), replicas=1) as running:
        yield running


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims_of(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


class Holder:
    """A DPoP client's key pair, and the proofs it makes (RFC 9449 §4.2)."""

    def __init__(self, key=None, alg: str = "ES256") -> None:
        self.key = key or ECKey.generate_key("P-256")
        self.alg = alg

    @property
    def jkt(self) -> str:
        return self.key.thumbprint()

    def proof(
        self,
        method: str,
        url: str,
        token: str | None = None,
        header: dict | None = None,
        drop: tuple[str, ...] = (),
        **claims,
    ) -> str:
        values = {
            "jti": uuid.uuid4().hex,
            "htm": method,
            "htu": url,
            "iat": int(time.time()),
        }
        if token is not None:
            values["ath"] = b64(hashlib.sha256(token.encode()).digest())
        values.update(claims)
        for name in drop:
            values.pop(name, None)
        head = {"typ": "dpop+jwt", "alg": self.alg, "jwk": self.key.as_dict(private=False)}
        head.update(header or {})
        return jose_jwt.encode(head, values, self.key, algorithms=[head["alg"]])


def token_url(bastion) -> str:
    return f"{bastion.url}/token"


def register(bastion, **extra) -> dict:
    response = bastion.http.post(
        f"{bastion.url}/register",
        json={
            "client_name": "dpop test agent",
            "redirect_uris": [REDIRECT_URI],
            "token_endpoint_auth_method": "none",
            "grant_types": ["authorization_code", "refresh_token"],
            **extra,
        },
    )
    assert response.status_code == 201, response.text
    return response.json()


def code_request(bastion, holder: Holder | None, client: dict | None = None, proofs=None):
    """The authorization code flow as sam, the code exchanged with ``holder``'s proof (or the
    ``proofs`` given, or none). Returns the client and the token endpoint's response."""
    client = client or register(bastion)
    verifier, challenge = pkce_pair()
    params = {
        "response_type": "code",
        "client_id": client["client_id"],
        "redirect_uri": REDIRECT_URI,
        "state": "s",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "resource": bastion.mcp_url(SERVER),
        "scope": "customers:read",
    }
    redirect = log_in_and_consent(
        bastion.url, f"{bastion.url}/authorize?{urlencode(params)}", "sam", PASSWORD
    )
    code = parse_qs(urlsplit(redirect.headers["location"]).query)["code"][0]
    if proofs is None:
        proofs = [holder.proof("POST", token_url(bastion))] if holder else []
    response = bastion.http.post(
        token_url(bastion),
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "code_verifier": verifier,
            "client_id": client["client_id"],
        },
        headers=[("DPoP", p) for p in proofs],
    )
    return client, response


def bound_tokens(bastion, holder: Holder) -> tuple[dict, dict]:
    client, response = code_request(bastion, holder)
    assert response.status_code == 200, response.text
    return client, response.json()


def call(bastion, token: str, proofs=(), scheme: str = "DPoP", url: str | None = None):
    headers = modern_headers(token, "tools/call", TOOL)
    headers["authorization"] = f"{scheme} {token}"
    return bastion.http.post(
        url or bastion.mcp_url(SERVER),
        json=modern_request(1, "tools/call", {"name": TOOL, "arguments": {"query": "a"}}),
        headers=[*headers.items(), *(("DPoP", p) for p in proofs)],
    )


def refused(response, error: str, words: str) -> None:
    assert response.status_code == 401, response.text
    body = response.json()
    assert body["error"] == error, body
    assert words in body["error_description"], body
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("DPoP ") and f'error="{error}"' in challenge, challenge
    assert 'algs="ES256' in challenge, challenge


def refused_at_token(response, words: str) -> None:
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"] == "invalid_dpop_proof", body
    assert words in body["error_description"], body


# -- metadata ------------------------------------------------------------------------------


def test_metadata_advertises_dpop(bastion):
    server = bastion.http.get(f"{bastion.url}/.well-known/oauth-authorization-server").json()
    assert server["dpop_signing_alg_values_supported"] == ["ES256", "RS256", "PS256", "EdDSA"]
    resource = bastion.http.get(
        f"{bastion.url}/.well-known/oauth-protected-resource/mcp/{SERVER}"
    ).json()
    assert resource["dpop_bound_access_tokens_required"] is False
    assert resource["dpop_signing_alg_values_supported"] == ["ES256", "RS256", "PS256", "EdDSA"]


# -- the token endpoint ----------------------------------------------------------------------


def test_a_proof_at_the_token_endpoint_binds_the_token_to_its_key(bastion):
    holder = Holder()
    _, tokens = bound_tokens(bastion, holder)
    assert tokens["token_type"] == "DPoP"
    assert claims_of(tokens["access_token"])["cnf"] == {"jkt": holder.jkt}
    token = tokens["access_token"]
    response = call(bastion, token, [holder.proof("POST", bastion.mcp_url(SERVER), token)])
    assert response.status_code == 200, response.text
    assert "result" in messages(response)[-1]


def test_an_rsa_key_binds_a_token_too(bastion):
    holder = Holder(RSAKey.generate_key(2048), "PS256")
    _, tokens = bound_tokens(bastion, holder)
    token = tokens["access_token"]
    response = call(bastion, token, [holder.proof("POST", bastion.mcp_url(SERVER), token)])
    assert response.status_code == 200, response.text


def test_bearer_stays_the_default_without_a_proof(bastion):
    _, response = code_request(bastion, None)
    assert response.status_code == 200, response.text
    tokens = response.json()
    assert tokens["token_type"] == "Bearer" and "cnf" not in claims_of(tokens["access_token"])
    ok = call(bastion, tokens["access_token"], scheme="Bearer")
    assert ok.status_code == 200, ok.text
    # The DPoP scheme is for bound tokens only.
    holder = Holder()
    proof = holder.proof("POST", bastion.mcp_url(SERVER), tokens["access_token"])
    refused(call(bastion, tokens["access_token"], [proof]), "invalid_token", "not DPoP-bound")


def test_the_official_sdk_client_keeps_using_bearer_tokens(bastion):
    async def script(client, seen):
        seen["tools"] = sorted(t.name for t in (await client.list_tools()).tools)

    seen = bastion.sdk("sam", SERVER, "auto", script)
    assert TOOL in seen["tools"]
    assert seen["tokens"].token_type.lower() == "bearer"


def test_a_client_registered_for_dpop_gets_nothing_without_a_proof(bastion):
    client = register(bastion, dpop_bound_access_tokens=True)
    assert client["dpop_bound_access_tokens"] is True
    _, response = code_request(bastion, None, client)
    refused_at_token(response, "dpop_bound_access_tokens")
    holder = Holder()
    _, response = code_request(bastion, holder, client)
    assert response.status_code == 200, response.text
    assert response.json()["token_type"] == "DPoP"


def test_dpop_bound_access_tokens_must_be_a_boolean(bastion):
    response = bastion.http.post(
        f"{bastion.url}/register",
        json={
            "client_name": "x",
            "redirect_uris": [REDIRECT_URI],
            "token_endpoint_auth_method": "none",
            "dpop_bound_access_tokens": "yes",
        },
    )
    assert response.status_code == 400 and response.json()["error"] == "invalid_client_metadata"


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda h, url: h.proof("POST", url, header={"typ": "JWT"}), "typ"),
        (lambda h, url: h.proof("GET", url), "htm"),
        (lambda h, url: h.proof("POST", url + "x"), "htu"),
        (lambda h, url: h.proof("POST", url, iat=int(time.time()) - 600), "older than"),
        (lambda h, url: h.proof("POST", url, iat=int(time.time()) + 600), "future"),
        (lambda h, url: h.proof("POST", url, iat=float("nan")), "NaN"),
        (lambda h, url: h.proof("POST", url, drop=("jti",)), "jti"),
        (lambda h, url: h.proof("POST", url, jti="j" * 257), "1 to 256 characters"),
        (lambda h, url: h.proof("POST", url, header={"jwk": Holder().key.as_dict(False)}), "sig"),
    ],
    ids=[
        "typ",
        "htm",
        "htu",
        "old-iat",
        "future-iat",
        "nan-iat",
        "no-jti",
        "overlong-jti",
        "another-jwk",
    ],
)
def test_a_bad_proof_at_the_token_endpoint_is_refused(bastion, make, words):
    holder = Holder()
    _, response = code_request(bastion, holder, proofs=[make(holder, token_url(bastion))])
    refused_at_token(response, words)


def test_two_proofs_are_refused(bastion):
    holder = Holder()
    url = token_url(bastion)
    _, response = code_request(bastion, holder, proofs=[holder.proof("POST", url)] * 2)
    refused_at_token(response, "exactly one")


def test_a_refresh_with_another_key_is_refused(bastion):
    holder = Holder()
    client, tokens = bound_tokens(bastion, holder)

    def refresh(proofs):
        return bastion.http.post(
            token_url(bastion),
            data={
                "grant_type": "refresh_token",
                "refresh_token": tokens["refresh_token"],
                "client_id": client["client_id"],
            },
            headers=[("DPoP", p) for p in proofs],
        )

    refused_at_token(refresh([Holder().proof("POST", token_url(bastion))]), "bound to a DPoP key")
    refused_at_token(refresh([]), "bound to a DPoP key")
    # Refused, the refresh token is still unused: its own key refreshes it, bound again.
    again = refresh([holder.proof("POST", token_url(bastion))])
    assert again.status_code == 200, again.text
    assert again.json()["token_type"] == "DPoP"
    assert claims_of(again.json()["access_token"])["cnf"] == {"jkt": holder.jkt}


# -- the gateway -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bound(bastion):
    holder = Holder()
    _, tokens = bound_tokens(bastion, holder)
    return holder, tokens["access_token"]


def test_a_bound_token_sent_as_bearer_is_refused(bastion, bound):
    holder, token = bound
    refused(call(bastion, token, scheme="Bearer"), "invalid_token", "bound to a DPoP key")
    # Not even with a good proof alongside.
    proof = holder.proof("POST", bastion.mcp_url(SERVER), token)
    refused(call(bastion, token, [proof], scheme="Bearer"), "invalid_token", "bound")


def test_a_bound_token_without_a_proof_is_refused(bastion, bound):
    _, token = bound
    refused(call(bastion, token), "invalid_dpop_proof", "DPoP header")


def test_a_proof_of_another_key_is_refused(bastion, bound):
    _, token = bound
    proof = Holder().proof("POST", bastion.mcp_url(SERVER), token)
    refused(call(bastion, token, [proof]), "invalid_dpop_proof", "another key")


@pytest.mark.parametrize(
    "change, words",
    [
        ({"htm": "GET"}, "htm"),
        ({"htu": "SERVER:desk"}, "htu"),
        ({"iat": -600}, "older than"),
        ({"drop": ("ath",)}, "ath"),
        ({"ath": b64(hashlib.sha256(b"another token").digest())}, "ath"),
        ({"header": {"typ": "at+jwt"}}, "typ"),
    ],
    ids=["htm", "htu", "old-iat", "missing-ath", "wrong-ath", "typ"],
)
def test_a_proof_not_for_this_request_is_refused(bastion, bound, change, words):
    holder, token = bound
    url = bastion.mcp_url(SERVER)
    options = dict(change)
    if options.get("htu") == "SERVER:desk":
        options["htu"] = bastion.mcp_url("desk")
    if "iat" in options:
        options["iat"] = int(time.time()) + options["iat"]
    method = options.pop("htm", "POST")
    proof = holder.proof(method, url, token, **options)
    refused(call(bastion, token, [proof]), "invalid_dpop_proof", words)


def test_htu_is_compared_without_query_and_with_default_port_and_case_normalised(bastion, bound):
    holder, token = bound
    parts = urlsplit(bastion.mcp_url(SERVER))
    url = f"HTTP://{parts.netloc.upper()}{parts.path}?ignored=1"
    response = call(bastion, token, [holder.proof("POST", url, token)])
    assert response.status_code == 200, response.text


def test_a_replayed_proof_is_refused_on_every_replica(bastion, bound):
    holder, token = bound
    proof = holder.proof("POST", bastion.mcp_url(SERVER), token)
    first = call(bastion, token, [proof])
    assert first.status_code == 200, first.text
    refused(call(bastion, token, [proof]), "invalid_dpop_proof", "already used")
    replica = f"{bastion.replicas[0]}/mcp/{SERVER}"
    refused(call(bastion, token, [proof], url=replica), "invalid_dpop_proof", "already used")
    # The replica takes a fresh proof (its htu is the public URL of the resource).
    fresh = call(
        bastion, token, [holder.proof("POST", bastion.mcp_url(SERVER), token)], url=replica
    )
    assert fresh.status_code == 200, fresh.text


def unsigned(header: dict, claims: dict) -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}."


def test_alg_none_hmac_and_private_keys_are_refused(bastion, bound):
    holder, token = bound
    url = bastion.mcp_url(SERVER)
    claims = {"jti": uuid.uuid4().hex, "htm": "POST", "htu": url, "iat": int(time.time())}
    claims["ath"] = b64(hashlib.sha256(token.encode()).digest())
    public = holder.key.as_dict(private=False)
    none = unsigned({"typ": "dpop+jwt", "alg": "none", "jwk": public}, claims)
    refused(call(bastion, token, [none]), "invalid_dpop_proof", "alg 'none'")
    secret = OctKey.generate_key(256)
    hmac = jose_jwt.encode(
        {"typ": "dpop+jwt", "alg": "HS256", "jwk": secret.as_dict(private=True)},
        claims,
        secret,
        algorithms=["HS256"],
    )
    refused(call(bastion, token, [hmac]), "invalid_dpop_proof", "alg 'HS256'")
    private = holder.proof("POST", url, token, header={"jwk": holder.key.as_dict(private=True)})
    refused(call(bastion, token, [private]), "invalid_dpop_proof", "private key material")
    # A key on a curve no reader knows (joserfc raised KeyError: a 500 to anyone before).
    odd = holder.proof("POST", url, token, header={"jwk": {**public, "crv": "P-999"}})
    refused(call(bastion, token, [odd]), "invalid_dpop_proof", "cannot be read as a key")
    # At the token endpoint: alg none, and an asymmetric alg left out of [oauth.dpop].algorithms.
    at_token = {**claims, "htu": token_url(bastion)}
    at_token.pop("ath")
    none = unsigned({"typ": "dpop+jwt", "alg": "none", "jwk": public}, at_token)
    _, response = code_request(bastion, holder, proofs=[none])
    refused_at_token(response, "alg 'none'")
    p384 = Holder(ECKey.generate_key("P-384"), "ES384")
    _, response = code_request(bastion, p384, proofs=[p384.proof("POST", token_url(bastion))])
    refused_at_token(response, "alg 'ES384'")


# -- server nonces (RFC 9449 §8, §9) ---------------------------------------------------------


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    """A bastion that requires a server nonce in every proof, with one more replica."""
    with start(
        tmp_path_factory.mktemp("dpop-nonce"),
        replicas=1,
        oauth={"dpop": {"require_nonce": True, "nonce_seconds": 60}},
    ) as running:
        yield running


def test_a_proof_without_the_server_nonce_gets_one_to_retry_with(strict):
    holder = Holder()
    _, response = code_request(strict, holder)
    refused_at = response.json()
    assert response.status_code == 400 and refused_at["error"] == "use_dpop_nonce", refused_at
    nonce = response.headers["dpop-nonce"]
    # A new code, exchanged with a proof that carries the nonce.
    _, again = code_request(
        strict, holder, proofs=[holder.proof("POST", token_url(strict), nonce=nonce)]
    )
    assert again.status_code == 200, again.text
    token = again.json()["access_token"]
    url = strict.mcp_url(SERVER)
    first = call(strict, token, [holder.proof("POST", url, token)])
    assert first.status_code == 401 and first.json()["error"] == "use_dpop_nonce", first.text
    assert 'error="use_dpop_nonce"' in first.headers["www-authenticate"]
    nonce = first.headers["dpop-nonce"]
    ok = call(strict, token, [holder.proof("POST", url, token, nonce=nonce)])
    assert ok.status_code == 200, ok.text
    # Every replica sharing key_dir makes and takes the same nonces.
    replica = f"{strict.replicas[0]}/mcp/{SERVER}"
    ok = call(strict, token, [holder.proof("POST", url, token, nonce=nonce)], url=replica)
    assert ok.status_code == 200, ok.text


def test_a_forged_or_stale_nonce_is_refused(strict, monkeypatch):
    holder = Holder()
    dpop = strict.app.state.oauth.dpop
    # The nonces' clock held still: one period ahead must stay ahead while the test runs (it
    # became the current one, and was accepted, when a period ended during the test).
    now = time.time()
    monkeypatch.setattr(dpop, "clock", lambda: now)
    period = int(now // dpop.settings.nonce_seconds)
    # Digits of other scripts: '²' is a digit to str.isdigit() that int() refuses, '٣' one it
    # reads as 3; a nonce's period is written in ASCII digits or it is no nonce of bastion's.
    # And a period of this deployment's with a MAC beyond ASCII (a 500 before: compare_digest on
    # text).
    others = ("\u00b2.forged", "\u0663" + dpop._nonce_of(3)[1:], f"{period}.forg\u00e9d")
    forged = (f"{period}.forged", dpop._nonce_of(period - 2), dpop._nonce_of(period + 1), 7)
    for nonce in (*forged, *others):
        proof = holder.proof("POST", token_url(strict), nonce=nonce)
        _, response = code_request(strict, holder, proofs=[proof])
        assert response.status_code == 400, response.text
        assert response.json()["error"] == "use_dpop_nonce", (nonce, response.text)


@pytest.mark.parametrize(
    "table, words",
    [
        ({"algorithms": ["HS256"]}, "asymmetric only"),
        ({"algorithms": []}, "non-empty"),
        ({"max_age_seconds": 0}, "max_age_seconds"),
        ({"require_nonce": "yes"}, "require_nonce"),
        ({"nonces": True}, "unknown keys"),
    ],
)
def test_dpop_settings_are_checked(table, words):
    with pytest.raises(SettingsError, match=words):
        OAuthSettings.from_mapping(
            {
                "issuer": "https://as.example",
                "key_dir": "/var/lib/bastion/keys",
                "resources": [{"uri": "https://mcp.example/mcp", "scopes": ["read"]}],
                "dpop": table,
            }
        )


# -- token exchange (RFC 8693) never unbinds a token ------------------------------------------


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    with start_studio(tmp_path_factory.mktemp("dpop-studio")) as running:
        yield running


def studio_user_token(studio, agent, holder: Holder | None) -> str:
    """sam signs in and consents; ``agent`` redeems the code, with ``holder``'s proof if any."""
    verifier, challenge = pkce_pair()
    params = {
        "response_type": "code",
        "client_id": agent.client_id,
        "redirect_uri": STUDIO_REDIRECT,
        "state": "s",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "resource": studio.mcp_url,
        "scope": "files:read",
    }
    redirect = log_in_and_consent(
        studio.url, f"{studio.url}/authorize?{urlencode(params)}", "sam", STUDIO_PASSWORD
    )
    code = parse_qs(urlsplit(redirect.headers["location"]).query)["code"][0]
    url = f"{studio.url}/token"
    answer = studio.http.post(
        url,
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": STUDIO_REDIRECT,
            "code_verifier": verifier,
            "client_id": agent.client_id,
        },
        headers={"DPoP": holder.proof("POST", url)} if holder else {},
    )
    assert answer.status_code == 200, answer.text
    return answer.json()["access_token"]


def test_a_bound_token_is_never_exchanged_for_a_bearer_one(studio):
    coder, sub = studio.coding_agent("dpop-coder"), studio.sub_agent("dpop-sub")
    studio.facts(
        ("has_role", f"Agent:{coder.client_id}", "coder", "McpServer:studio"),
        ("has_role", f"Agent:{sub.client_id}", "illustrator", "McpServer:studio"),
        ("may_use_folder", f"Agent:{sub.client_id}", "icons"),
    )
    # The same exchange with an unbound subject token is allowed: the binding alone refuses.
    plain = studio.exchange(coder, studio_user_token(studio, coder, None), studio.own_token(sub))
    assert plain.status_code == 200, plain.text
    holder = Holder()
    bound = studio_user_token(studio, coder, holder)
    assert "cnf" in claims_of(bound)
    refused = studio.exchange(coder, bound, studio.own_token(sub))
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"] == "invalid_request"
    assert "bound to a DPoP key" in refused.json()["error_description"]
    # A bound actor token is refused the same way.
    url = f"{studio.url}/token"
    own = studio.http.post(
        url,
        data={"grant_type": "client_credentials", "resource": studio.mcp_url},
        auth=sub.auth,
        headers={"DPoP": holder.proof("POST", url)},
    )
    assert own.status_code == 200 and own.json()["token_type"] == "DPoP", own.text
    subject = studio_user_token(studio, coder, None)
    refused = studio.exchange(coder, subject, own.json()["access_token"])
    assert refused.status_code == 400 and "actor_token" in refused.json()["error_description"]
    # And an exchange asked for with a proof: token exchange issues Bearer tokens only.
    asked = studio.http.post(
        url,
        data={
            "grant_type": EXCHANGE,
            "subject_token": studio_user_token(studio, coder, None),
            "subject_token_type": ACCESS_TOKEN,
            "actor_token": studio.own_token(sub),
            "actor_token_type": ACCESS_TOKEN,
            "client_id": coder.client_id,
        },
        headers={"DPoP": holder.proof("POST", url)},
    )
    assert asked.status_code == 400 and "Bearer tokens only" in asked.text, asked.text


def test_introspection_reports_the_binding(bastion, bound):
    holder, token = bound
    oauth = bastion.app.state.oauth
    values = registration.validate_client_metadata(
        {
            "client_name": "resource server",
            "token_endpoint_auth_method": "client_secret_basic",
            "grant_types": ["client_credentials"],
        },
        oauth.settings,
    )
    made = registration.new_client(
        values, source="admin", now=time.time(), introspection_resources=("*",)
    )
    oauth.store.save_client(made.client)
    auth = (made.client.client_id, made.client_secret)
    answer = bastion.http.post(f"{bastion.url}/introspect", data={"token": token}, auth=auth)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["active"] is True and body["token_type"] == "DPoP", body
    assert body["cnf"] == {"jkt": holder.jkt}
    _, plain = code_request(bastion, None)
    body = bastion.http.post(
        f"{bastion.url}/introspect", data={"token": plain.json()["access_token"]}, auth=auth
    ).json()
    assert body["token_type"] == "Bearer" and "cnf" not in body, body


def test_proofs_and_bindings_are_shared_through_either_database(database_url):
    """Two replicas' checkers on one database (SQLite or PostgreSQL): a proof is used once
    across both, and a grant keeps the first key it was bound to."""
    one = DPoPProofs(DPoPSettings(), Database(database_url), leeway_seconds=30)
    two = DPoPProofs(DPoPSettings(), Database(database_url), leeway_seconds=30)
    holder, url = Holder(), "https://bastion.example/mcp/desk"
    proof = holder.proof("POST", url, "the-token")
    assert one.use(proof, "POST", url, "the-token").jkt == holder.jkt
    with pytest.raises(InvalidDPoPProof, match="already used"):
        two.use(proof, "POST", url, "the-token")
    grant = uuid.uuid4().hex
    one.bind_grant(grant, "first", time.time() + 60)
    two.bind_grant(grant, "second", time.time() + 60)
    assert two.grant_key(grant) == "first" and one.grant_key(uuid.uuid4().hex) is None


@pytest.mark.parametrize("iat", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_a_proof_whose_iat_is_not_a_number_is_refused_and_spends_nothing(database_url, iat):
    """A proof's claims are JSON, and ``NaN`` is not JSON: read as a number, an ``iat`` of NaN
    is neither in the future nor too old (every comparison with it is false), so the proof would
    never expire; its jti would be kept until NaN (never purged on PostgreSQL, a NOT NULL
    failure on SQLite). Refused as the claims are read, whatever the clock says."""
    proofs = DPoPProofs(DPoPSettings(), Database(database_url), leeway_seconds=30)
    holder, url, jti = Holder(), "https://bastion.example/token", uuid.uuid4().hex
    head = {"typ": "dpop+jwt", "alg": "ES256", "jwk": holder.key.as_dict(private=False)}
    claims = f'{{"jti": "{jti}", "htm": "POST", "htu": "{url}", "iat": {iat}}}'
    # Signed as it is: the holder's own key signs whatever claims it likes.
    proof = jws.serialize_compact(head, claims.encode(), holder.key, algorithms=["ES256"])
    with pytest.raises(InvalidDPoPProof, match=r"claims are refused: iat"):
        proofs.use(proof, "POST", url)
    # Nothing was spent: the same jti in a good proof is still new.
    assert proofs.use(holder.proof("POST", url, jti=jti), "POST", url).jti == jti


@pytest.mark.parametrize("where", ["claims", "header"])
def test_a_proof_that_names_a_member_twice_is_refused_and_spends_nothing(database_url, where):
    """A proof whose ``htu`` (or header ``jwk``) is given twice, signed by its holder: one
    reader takes the first value, another the last (the key and URL a proxy or a log saw are
    not those checked). RFC 7515 §5.2 and RFC 7519 §4 let a parser refuse it: refused as it
    is read, naming the member, before a key is taken from it or a jti is spent."""
    proofs = DPoPProofs(DPoPSettings(), Database(database_url), leeway_seconds=30)
    holder, url, jti = Holder(), "https://bastion.example/token", uuid.uuid4().hex
    jwk = json.dumps(holder.key.as_dict(private=False))
    other = json.dumps(Holder().key.as_dict(private=False))
    claims = f'{{"jti": "{jti}", "htm": "POST", "htu": "{url}", "iat": {int(time.time())}'
    if where == "claims":
        header = f'{{"typ": "dpop+jwt", "alg": "ES256", "jwk": {jwk}}}'
        claims += ', "htu": "https://elsewhere.example/token"}'
        member = "htu"
    else:
        header = f'{{"typ": "dpop+jwt", "alg": "ES256", "jwk": {other}, "jwk": {jwk}}}'
        claims += "}"
        member = "jwk"
    proof = signed_text(holder.key, header, claims)
    with pytest.raises(InvalidDPoPProof, match=f"'{member}' twice"):
        proofs.use(proof, "POST", url)
    # Nothing was spent: the same jti in a good proof is still new.
    assert proofs.use(holder.proof("POST", url, jti=jti), "POST", url).jti == jti


def test_a_bound_token_used_without_its_key_at_the_gateway_is_audited(bastion):
    """A token bound to a key (RFC 9449), verified, but sent as Bearer, without a proof or with
    a proof of another key — how a stolen token is tried — leaves an ``mcp.refused`` row naming
    its user and agent, aggregated per agent, address and reason, as other refused requests."""
    holder = Holder()
    client, tokens = bound_tokens(bastion, holder)
    token = tokens["access_token"]
    refused(call(bastion, token, scheme="Bearer"), "invalid_token", "bound to a DPoP key")
    refused(call(bastion, token), "invalid_dpop_proof", "DPoP header")
    other = Holder().proof("POST", bastion.mcp_url(SERVER), token)
    refused(call(bastion, token, [other]), "invalid_dpop_proof", "another key")
    oauth = bastion.app.state.oauth
    rows = [e for e in oauth.audit.events("mcp.refused") if e.client_id == client["client_id"]]
    assert sorted(e.detail["reason"] for e in rows) == ["invalid_dpop_proof", "invalid_token"]
    assert {(e.subject, e.detail["server"]) for e in rows} == {(claims_of(token)["sub"], SERVER)}
    assert all(token not in str(e.detail) for e in rows)
    oauth.refusals.flush(everything=True)
    rows = [e for e in oauth.audit.events("mcp.refused") if e.client_id == client["client_id"]]
    assert sum(e.detail.get("repeats", 1) for e in rows) == 3


@pytest.mark.parametrize(
    "htu",
    ["https://bastion.\u212aelvin.test/token", "https://bastion.kelv\u0130n.test/token"],
    ids=["kelvin-sign", "capital-i-with-dot"],
)
def test_a_proof_for_a_host_spelt_with_a_letter_that_is_not_ascii_is_for_another_url(
    database_url, htu
):
    """``htu`` is compared with the scheme and host without case (§4.3, RFC 3986 §6.2.2.1), and
    case is ASCII's alone: a URI is ASCII. Python's ``str.lower`` (and so ``urlsplit``'s
    ``hostname``) makes the Kelvin sign (U+212A) a ``k``, so a proof its holder made for
    another host would be taken for this one's. Refused, naming what is wrong, spending
    nothing."""
    proofs = DPoPProofs(DPoPSettings(), Database(database_url), leeway_seconds=30)
    holder, url, jti = Holder(), "https://bastion.kelvin.test/token", uuid.uuid4().hex
    with pytest.raises(InvalidDPoPProof, match="htu must be a URL in ASCII"):
        proofs.use(holder.proof("POST", htu, jti=jti), "POST", url)
    # ASCII case is still no difference, and the refused proof spent nothing.
    same_url = "HTTPS://BASTION.KELVIN.TEST/token"
    assert proofs.use(holder.proof("POST", same_url, jti=jti), "POST", url).jti == jti
