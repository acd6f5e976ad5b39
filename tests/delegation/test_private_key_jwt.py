"""Autonomous agents without shared secrets: ``client_credentials`` with ``private_key_jwt``
(RFC 7523 client assertions), registered by the admin CLI with a JWKS file or a jwks_uri, used
by the official MCP SDK's client to call the gateway; every way of breaking an assertion is
refused with ``invalid_client``, and an assertion is used once."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from functools import partial

import anyio
import httpx2
import pytest
from joserfc import jwt as jose_jwt
from joserfc.jwk import RSAKey
from mcp.client.auth.extensions.client_credentials import (
    PrivateKeyJWTOAuthProvider,
    SignedJWTParameters,
)
from mcp.client.client import Client as McpClient
from mcp.client.streamable_http import streamable_http_client
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

from bastion.db import Database
from bastion.facts.model import Entity
from bastion.oauth.client_assertion import ClientAssertions
from bastion.oauth.settings import ClientAssertionSettings
from bastion.oauth.store import Client
from tests.delegation.agent_support import (
    ASSERTION_TYPE,
    assertion,
    cli,
    cli_config,
    new_key,
    public_jwks,
)
from tests.gateway.streams import call_tool, modern_headers, modern_request
from tests.gateway.support import start
from tests.oauth.support import MemoryStorage, free_socket, serve, signed_text
from tests.waits import PATIENCE

SCOPE = "customers:read"
INITIAL_TOKEN = "initial-access-token-of-the-tests"


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    # A rotated key is fetched again after 1 s (the default waits 30 s between fetches). A key
    # set's fetch is bounded against a hang only: with 1 s, a machine that did not run the
    # jwks_uri's server for a second refused a client whose keys were fine.
    with start(
        tmp_path_factory.mktemp("pkjwt"),
        oauth={
            "client_assertion": {
                "jwks_refetch_seconds": 1,
                "jwks_timeout_seconds": int(PATIENCE),
            },
            "initial_access_tokens": [INITIAL_TOKEN],
        },
    ) as running:
        yield running


@pytest.fixture(scope="module")
def config(bastion, tmp_path_factory):
    return cli_config(bastion, tmp_path_factory.mktemp("pkjwt-cli"))


class Keys:
    """A jwks_uri served by a real HTTP server: its key set can change (a rotation), be
    replaced by a body too big to read, or be held back until `held` is set."""

    def __init__(self) -> None:
        self.body = b""
        self.fetches = 0
        self.held: threading.Event | None = None

    def app(self) -> Starlette:
        async def jwks(request):
            self.fetches += 1
            if self.held is not None:
                await anyio.to_thread.run_sync(self.held.wait, PATIENCE)
            return Response(self.body, media_type="application/json")

        return Starlette(routes=[Route("/jwks.json", jwks)])


@pytest.fixture(scope="module")
def published():
    keys = Keys()
    with serve(keys.app(), free_socket()) as url:
        yield keys, f"{url}/jwks.json"


def register(capsys, config, tmp_path, key=None, jwks_uri=None, name="nightly agent") -> str:
    args = ["clients", "create", "--name", name, "--scope", SCOPE, "--config", config]
    if jwks_uri:
        args += ["--jwks-uri", jwks_uri]
    else:
        path = tmp_path / f"{key.kid}.jwks.json"
        path.write_text(json.dumps(public_jwks(key)))
        args += ["--jwks-file", str(path)]
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    created = json.loads(out)
    assert created["token_endpoint_auth_method"] == "private_key_jwt"
    assert "client_secret" not in created and created["grant_types"] == ["client_credentials"]
    return created["client_id"]


def token_request(bastion, client_assertion: str, **extra) -> httpx2.Response:
    return bastion.http.post(
        f"{bastion.url}/token",
        data={
            "grant_type": "client_credentials",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": client_assertion,
            "resource": bastion.mcp_url("deskhttp"),
            "scope": SCOPE,
            **extra,
        },
    )


def refused(response, words: str) -> None:
    assert response.status_code == 401, response.text
    body = response.json()
    assert body["error"] == "invalid_client", body
    assert words in body["error_description"], body


def act_as_support(bastion, client_id: str) -> None:
    """A client acting as itself is its own subject: let it be on the support team."""
    bastion.apply(
        inserts=[("has_role", Entity("User", client_id), "member", Entity("Team", "support"))]
    )


def test_the_metadata_offers_private_key_jwt_with_asymmetric_algorithms(bastion):
    metadata = bastion.http.get(f"{bastion.url}/.well-known/oauth-authorization-server").json()
    assert metadata["token_endpoint_auth_methods_supported"][0] == "private_key_jwt"
    algorithms = metadata["token_endpoint_auth_signing_alg_values_supported"]
    assert "ES256" in algorithms and "none" not in algorithms and "HS256" not in algorithms


def test_an_agent_with_a_key_calls_the_gateway_through_the_mcp_sdk(
    bastion, config, capsys, tmp_path
):
    key = new_key("agent-1")
    client_id = register(capsys, config, tmp_path, key)
    act_as_support(bastion, client_id)
    storage = MemoryStorage()
    provider = PrivateKeyJWTOAuthProvider(
        server_url=bastion.mcp_url("deskhttp"),
        storage=storage,
        client_id=client_id,
        assertion_provider=SignedJWTParameters(
            issuer=client_id,
            subject=client_id,
            signing_key=key.as_pem(private=True).decode(),
            signing_algorithm="ES256",
        ).create_assertion_provider(),
        scope=SCOPE,
        issuer=bastion.url,
    )
    seen = {}

    async def main() -> None:
        async with (
            httpx2.AsyncClient(auth=provider, timeout=20) as http,
            McpClient(streamable_http_client(bastion.mcp_url("deskhttp"), http_client=http)) as mcp,
        ):
            result = await mcp.call_tool("search_customers", {"query": "a"})
            seen["result"] = result

    anyio.run(main)
    assert not seen["result"].is_error, seen["result"]
    # The token is the agent's own (no person behind it), and never refreshable.
    assert storage.tokens is not None and storage.tokens.refresh_token is None
    payload = storage.tokens.access_token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["sub"] == client_id and claims["client_id"] == client_id


def test_a_replayed_assertion_is_refused(bastion, config, capsys, tmp_path):
    key = new_key("replay")
    client_id = register(capsys, config, tmp_path, key)
    signed = assertion(key, client_id, bastion.url)
    first = token_request(bastion, signed)
    assert first.status_code == 200, first.text
    refused(token_request(bastion, signed), "already used")


@pytest.mark.parametrize(
    "change, words",
    [
        ({"audience": "https://elsewhere.example.com"}, "aud"),
        ({"audience": ["https://elsewhere.example.com", "ISSUER"]}, "aud"),
        ({"issued": time.time() - 3600}, "expired"),
        ({"lifetime": 3600}, "longer than"),
        ({"issued": time.time() + 3600}, "future"),
        ({"sub": "someone-else"}, "sub must equal"),
        ({"jti": None}, "jti"),
        ({"jti": "x" * 300}, "jti"),
        ({"exp": "tomorrow"}, "exp"),
        ({"nbf": 120}, "not valid yet (nbf)"),
        # Not numbers, though Python's own reader would take them as such: NaN is neither
        # before nor after any time (an assertion forever, its jti never spent), true is 1.
        ({"exp": float("nan")}, "NaN"),
        ({"exp": float("inf")}, "Infinity"),
        ({"iat": float("-inf")}, "Infinity"),
        ({"exp": True}, "exp"),
        ({"nbf": True}, "nbf"),
        ({"nbf": float("nan")}, "NaN"),
    ],
)
def test_an_assertion_out_of_bounds_is_refused(bastion, config, capsys, tmp_path, change, words):
    key = new_key("bounds")
    client_id = register(capsys, config, tmp_path, key)
    now = int(change.get("issued", time.time()))
    claims = {
        "iss": client_id,
        "sub": change.get("sub", client_id),
        "aud": change.get("audience", bastion.url),
        "iat": change.get("iat", now),
        "exp": change.get("exp", now + change.get("lifetime", 60)),
        "jti": change.get("jti", f"j-{time.monotonic_ns()}"),
    }
    if isinstance(claims["aud"], list):
        claims["aud"] = [bastion.url if a == "ISSUER" else a for a in claims["aud"]]
    if claims["jti"] is None:
        del claims["jti"]
    if "nbf" in change:  # seconds after now, or a value as it is
        nbf = change["nbf"]
        claims["nbf"] = now + nbf if type(nbf) is int else nbf
    signed = jose_jwt.encode({"alg": "ES256", "kid": key.kid}, claims, key)
    refused(token_request(bastion, signed), words)


def test_the_token_endpoint_url_is_an_accepted_audience(bastion, config, capsys, tmp_path):
    key = new_key("endpoint-aud")
    client_id = register(capsys, config, tmp_path, key)
    answer = token_request(bastion, assertion(key, client_id, f"{bastion.url}/token"))
    assert answer.status_code == 200, answer.text


def test_an_assertion_signed_with_another_key_is_refused(bastion, config, capsys, tmp_path):
    registered = new_key("same-kid")
    client_id = register(capsys, config, tmp_path, registered)
    impostor = new_key("same-kid")
    refused(token_request(bastion, assertion(impostor, client_id, bastion.url)), "does not verify")
    refused(
        token_request(bastion, assertion(new_key("unknown"), client_id, bastion.url)),
        "is not a key of the client",
    )


def test_a_revoked_key_client_cannot_authenticate(bastion, config, capsys, tmp_path):
    key = new_key("revoked")
    client_id = register(capsys, config, tmp_path, key)
    assert token_request(bastion, assertion(key, client_id, bastion.url)).status_code == 200
    code, _, err = cli(capsys, "clients", "revoke", client_id, "--config", config)
    assert code == 0, err
    # Its key still signs a fresh, well-formed assertion: only the revocation refuses it.
    refused(token_request(bastion, assertion(key, client_id, bastion.url)), "revoked")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(client_id: str, audience: str) -> dict:
    now = int(time.time())
    return {
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "iat": now,
        "exp": now + 60,
        "jti": f"j-{time.monotonic_ns()}",
    }


def test_alg_none_and_hmac_with_the_public_key_are_refused(bastion, config, capsys, tmp_path):
    key = RSAKey.generate_key(2048, {"kid": "rsa"}, private=True)
    path = tmp_path / "rsa.json"
    path.write_text(json.dumps({"keys": [key.as_dict(private=False)]}))
    code, out, err = cli(
        capsys,
        "clients", "create", "--name", "rsa agent", "--scope", SCOPE,
        "--jwks-file", str(path), "--config", config,
    )  # fmt: skip
    assert code == 0, err
    client_id = json.loads(out)["client_id"]
    payload = _b64(json.dumps(_claims(client_id, bastion.url)).encode())
    unsigned = f"{_b64(json.dumps({'alg': 'none', 'kid': 'rsa'}).encode())}.{payload}."
    refused(token_request(bastion, unsigned), "alg 'none'")
    # The classic confusion: HS256 keyed with the public key the server holds.
    for secret in (key.as_pem(private=False), json.dumps(key.as_dict(private=False)).encode()):
        head = _b64(json.dumps({"alg": "HS256", "kid": "rsa", "typ": "JWT"}).encode())
        signing_input = f"{head}.{payload}".encode()
        mac = _b64(hmac.new(secret, signing_input, hashlib.sha256).digest())
        refused(token_request(bastion, f"{head}.{payload}.{mac}"), "alg 'HS256'")
    # A header that is JSON but not an object (joserfc takes any that holds "alg"): refused as
    # not a signed JWT (it was a 500).
    for header in (["alg"], "alg", ["alg", "RS256"]):
        odd = f"{_b64(json.dumps(header).encode())}.{payload}.{_b64(b'x' * 256)}"
        refused(token_request(bastion, odd), "not a signed JWT")
    # Its own algorithm works.
    good = assertion(key, client_id, bastion.url, header={"alg": "RS256", "kid": "rsa"})
    assert token_request(bastion, good).status_code == 200


@pytest.mark.parametrize("member", ["sub", "aud", "kid"])
def test_an_assertion_that_names_a_member_twice_is_refused_and_spends_nothing(
    bastion, config, capsys, tmp_path, member
):
    """A client assertion signed by the client whose ``sub`` or ``aud`` (or header ``kid``) is
    given twice: a reader that keeps the first value sees one refused (another subject,
    another server, a key the client lacks), one that keeps the last (Python's json, joserfc)
    one taken. RFC 7515 §5.2 and RFC 7519 §4 let a reader refuse it: invalid_client naming the
    member, nothing issued, and its jti not spent."""
    key = new_key(f"twice-{member}")
    client_id = register(capsys, config, tmp_path, key)
    claims = _claims(client_id, bastion.url)
    header = f'{{"alg": "ES256", "kid": "{key.kid}"}}'
    if member == "kid":
        header = f'{{"alg": "ES256", "kid": "not-a-key-of-the-client", "kid": "{key.kid}"}}'
        text = json.dumps(claims)
    else:
        first = {"sub": "someone-else", "aud": "https://elsewhere.example.com"}[member]
        text = json.dumps({**claims, member: first})[:-1] + f", {json.dumps(member)}: "
        text += json.dumps(claims[member]) + "}"
    issued = len(bastion.app.state.oauth.audit.events("token.issued"))
    refused(token_request(bastion, signed_text(key, header, text)), f"member '{member}' twice")
    assert len(bastion.app.state.oauth.audit.events("token.issued")) == issued
    # Its jti was not spent: an assertion of the same jti, each member once, is taken.
    again = assertion(key, client_id, bastion.url, jti=claims["jti"])
    assert token_request(bastion, again).status_code == 200


def test_a_key_client_cannot_authenticate_another_way(bastion, config, capsys, tmp_path):
    key = new_key("only-keys")
    client_id = register(capsys, config, tmp_path, key)
    bare = bastion.http.post(
        f"{bastion.url}/token",
        data={
            "grant_type": "client_credentials",
            "client_id": client_id,
            "resource": bastion.mcp_url("deskhttp"),
        },
    )
    refused(bare, "registered for 'private_key_jwt'")
    mixed = token_request(bastion, assertion(key, client_id, bastion.url), client_secret="x")
    assert mixed.status_code == 400 and mixed.json()["error"] == "invalid_request"
    other = token_request(bastion, assertion(key, client_id, bastion.url), client_id="someone")
    assert other.status_code == 400 and "client_id differs" in other.json()["error_description"]
    wrong_type = token_request(
        bastion, assertion(key, client_id, bastion.url), client_assertion_type="urn:other"
    )
    refused(wrong_type, "client_assertion_type")


def test_a_jwks_uri_is_fetched_cached_and_fetched_again_for_a_new_kid(
    bastion, config, capsys, tmp_path, published
):
    keys, url = published
    first, second = new_key("rot-1"), new_key("rot-2")
    keys.body = json.dumps(public_jwks(first)).encode()
    client_id = register(capsys, config, tmp_path, jwks_uri=url)
    before = keys.fetches
    assert token_request(bastion, assertion(first, client_id, bastion.url)).status_code == 200
    assert token_request(bastion, assertion(first, client_id, bastion.url)).status_code == 200
    assert keys.fetches == before + 1  # the key set is cached
    # Rotation: the client publishes a new key and drops the old one.
    keys.body = json.dumps(public_jwks(second)).encode()
    time.sleep(1.1)
    answer = token_request(bastion, assertion(second, client_id, bastion.url))
    assert answer.status_code == 200, answer.text
    assert keys.fetches == before + 2
    time.sleep(1.1)
    refused(
        token_request(bastion, assertion(first, client_id, bastion.url)),
        "is not a key of the client",
    )


def test_a_jwks_uri_that_sends_too_much_is_refused(bastion, config, capsys, tmp_path, published):
    keys, url = published
    key = new_key("big")
    keys.body = json.dumps({**public_jwks(key), "pad": "x" * 70_000}).encode()
    client_id = register(capsys, config, tmp_path, jwks_uri=url + "?big")
    refused(
        token_request(bastion, assertion(key, client_id, bastion.url)),
        "more than 65536 bytes ([oauth.client_assertion] jwks_max_bytes)",
    )


def test_a_jwks_uri_that_answers_too_slowly_is_refused(capsys, tmp_path, published):
    keys, url = published
    key = new_key("slow")
    keys.body = json.dumps(public_jwks(key)).encode()
    # A bastion of its own that waits 1 s for a key set (the module's waits out a hang only).
    slow = {"client_assertion": {"jwks_timeout_seconds": 1}}
    (tmp_path / "cli").mkdir()
    with start(tmp_path, oauth=slow) as own:
        client_id = register(capsys, cli_config(own, tmp_path / "cli"), tmp_path, jwks_uri=url)
        # The key set is held back until bastion has refused, however slow the machine: had
        # bastion waited for it, it would have had the key that signed the assertion, and
        # issued a token. Refused for the time it took, not for its keys.
        keys.held = threading.Event()
        try:
            refused(
                token_request(own, assertion(key, client_id, own.url)),
                "within 1 s ([oauth.client_assertion] jwks_timeout_seconds)",
            )
        finally:
            keys.held.set()
            keys.held = None


def test_the_same_assertion_rule_authenticates_the_client_at_revocation(
    bastion, config, capsys, tmp_path
):
    key = new_key("revoker")
    client_id = register(capsys, config, tmp_path, key)
    act_as_support(bastion, client_id)
    token = token_request(bastion, assertion(key, client_id, bastion.url)).json()["access_token"]
    assert "result" in call_tool(bastion, token, "deskhttp", "search_customers", {"query": "a"})
    signed = assertion(key, client_id, bastion.url)
    form = {"token": token, "client_assertion_type": ASSERTION_TYPE, "client_assertion": signed}
    assert bastion.http.post(f"{bastion.url}/revoke", data=form).status_code == 200
    refused(bastion.http.post(f"{bastion.url}/revoke", data=form), "already used")
    # The gateway refuses the revoked token (401), as for any revoked token.
    call = modern_request(
        1, "tools/call", {"name": "search_customers", "arguments": {"query": "a"}}
    )
    answer = bastion.http.post(
        bastion.mcp_url("deskhttp"),
        json=call,
        headers=modern_headers(token, "tools/call", "search_customers"),
    )
    assert answer.status_code == 401, answer.text


def test_a_key_client_registered_with_an_initial_access_token_gets_tokens(bastion):
    key = new_key("dynamic")
    answer = bastion.http.post(
        f"{bastion.url}/register",
        headers={"Authorization": f"Bearer {INITIAL_TOKEN}"},
        json={
            "client_name": "dynamically registered agent",
            "token_endpoint_auth_method": "private_key_jwt",
            "grant_types": ["client_credentials"],
            "scope": SCOPE,
            "jwks": public_jwks(key),
        },
    )
    assert answer.status_code == 201, answer.text
    registered = answer.json()
    assert "client_secret" not in registered and registered["jwks"] == public_jwks(key)
    signed = assertion(key, registered["client_id"], bastion.url)
    assert token_request(bastion, signed).status_code == 200


def register_jwks_uri(bastion, jwks_uri: str) -> str:
    """A key client registered at /register with an initial access token, naming its jwks_uri."""
    answer = bastion.http.post(
        f"{bastion.url}/register",
        headers={"Authorization": f"Bearer {INITIAL_TOKEN}"},
        json={
            "client_name": "agent naming its own key url",
            "token_endpoint_auth_method": "private_key_jwt",
            "grant_types": ["client_credentials"],
            "scope": SCOPE,
            "jwks_uri": jwks_uri,
        },
    )
    assert answer.status_code == 201, answer.text
    return answer.json()["client_id"]


@pytest.mark.parametrize(
    "origin", ["http://127.0.0.1", "http://localhost", "https://[::ffff:127.0.0.1]"]
)
def test_a_jwks_uri_registered_at_register_is_not_fetched_from_a_private_address(
    bastion, published, origin
):
    """SSRF: a holder of an initial access token names its client's jwks_uri, and anyone who
    knows the client_id makes bastion fetch it (an assertion naming the client). It was fetched
    as given, so it reached the loopback and the operator's private network, and the refusal
    said what was there ("answered HTTP 404", "connection refused"). As with client ID metadata
    documents, the name is resolved and every address must be public, unless
    [oauth.client_assertion] allow_private_addresses; an administrator's client is exempt."""
    keys, url = published
    key = new_key("inside")
    keys.body = json.dumps(public_jwks(key)).encode()
    port = url.split(":")[2].split("/")[0]
    client_id = register_jwks_uri(bastion, f"{origin}:{port}/jwks.json?{origin}")
    before = keys.fetches
    answer = token_request(bastion, assertion(key, client_id, bastion.url))
    refused(answer, "resolves to a non-public address")
    # Whoever registered the jwks_uri learns nothing of the network behind bastion.
    assert "127.0.0.1" not in answer.json()["error_description"].partition("resolves")[2]
    assert "[oauth.client_assertion] allow_private_addresses" in answer.json()["error_description"]
    assert keys.fetches == before  # nothing was asked of it


def test_a_registered_jwks_uri_on_a_private_address_is_fetched_where_allowed(published, sqlite_url):
    """With allow_private_addresses (a deployment whose agents publish keys inside its
    network, or these tests), a registered client's loopback jwks_uri is fetched."""
    keys, url = published
    key = new_key("allowed")
    keys.body = json.dumps(public_jwks(key)).encode()
    settings = ClientAssertionSettings(allow_private_addresses=True)
    checked = ClientAssertions(settings, Database(sqlite_url), ("https://a",), 30)
    client = dynamic_key_client("allowed-agent", f"{url}?allowed")
    signed = assertion(key, client.client_id, "https://a")
    found = anyio.run(checked.authenticate, signed, None, partial(_found, client))
    assert found.client_id == client.client_id


async def _found(client, client_id: str):
    return client if client_id == client.client_id else None


def dynamic_key_client(client_id: str, jwks_uri: str) -> Client:
    return Client(
        client_id=client_id,
        client_name=client_id,
        redirect_uris=(),
        grant_types=("client_credentials",),
        token_endpoint_auth_method="private_key_jwt",
        scope=SCOPE,
        source="dynamic",
        metadata={"jwks_uri": jwks_uri},
        created_at=time.time(),
        revoked_at=None,
    )


def test_registration_refuses_private_keys_and_plain_http_key_urls(config, capsys, tmp_path):
    key = new_key("leaky")
    path = tmp_path / "private.json"
    path.write_text(json.dumps({"keys": [key.as_dict(private=True)]}))
    code, _, err = cli(
        capsys, "clients", "create", "--name", "x", "--jwks-file", str(path), "--config", config
    )
    assert code == 2 and "private key material" in err
    code, _, err = cli(
        capsys,
        "clients", "create", "--name", "x", "--jwks-uri", "http://keys.example.com/jwks.json",
        "--config", config,
    )  # fmt: skip
    assert code == 2 and "https" in err


def test_a_key_set_whose_kid_is_not_text_is_refused_before_anything_else(bastion):
    """A ``kid`` that is a list or an object (RFC 7517: a string) was put in a set to check the
    kids are distinct: unhashable, a 500 to anyone registering (before the registration policy),
    at a token request whose client's jwks_uri served it, and wherever a trusted party's key set
    is read. It is refused as the key set's problem."""
    for kid in (["a"], {"x": 1}, 7):
        first = {**public_jwks(new_key("one"))["keys"][0], "kid": kid}
        keys = {"keys": [first, public_jwks(new_key("two"))["keys"][0]]}
        answer = self_register(bastion, keys)
        assert answer.status_code == 400, answer.text
        body = answer.json()
        assert body["error"] == "invalid_client_metadata", body
        assert "kid must be text" in body["error_description"], body


def self_register(bastion, jwks: dict | None = None, **metadata):
    """A key client registering itself at /register (no initial access token)."""
    return bastion.http.post(
        f"{bastion.url}/register",
        json={
            "client_name": "self-registered",
            "token_endpoint_auth_method": "private_key_jwt",
            "grant_types": ["client_credentials"],
            **({"jwks": jwks} if jwks is not None else {}),
            **metadata,
        },
    )


def test_keys_and_urls_no_reader_takes_are_refused_at_registration(bastion):
    """A key on a curve joserfc does not know (a KeyError), a URL urlsplit refuses ("https://[x":
    a ValueError) as a jwks_uri or a descriptive URI: each was a 500 at /register to anyone, and
    in the same readers of providers' documents; each is refused as the metadata's problem."""
    unknown_curve = {**public_jwks(new_key("curve"))["keys"][0], "crv": "P-999"}
    for metadata, words in (
        ({"jwks": {"keys": [unknown_curve]}}, "cannot be read as keys"),
        ({"jwks_uri": "https://[x/jwks.json"}, "valid URL"),
        ({"jwks": public_jwks(new_key("uri")), "client_uri": "https://[x"}, "http(s) URL"),
    ):
        answer = self_register(bastion, **metadata)
        assert answer.status_code == 400, answer.text
        body = answer.json()
        assert body["error"] == "invalid_client_metadata", body
        assert words in body["error_description"], body


def test_open_registration_of_a_key_client_needs_an_initial_access_token(bastion):
    answer = self_register(bastion, public_jwks(new_key("self")))
    assert answer.status_code == 401 and answer.json()["error"] == "invalid_token"


def test_a_jti_is_spent_once_across_every_process_on_the_database(database_url):
    """The replay store is the database: two servers on it (two replicas) accept a jti once."""
    settings = ClientAssertionSettings()
    one = ClientAssertions(settings, Database(database_url), ("https://a",), 30)
    two = ClientAssertions(settings, Database(database_url), ("https://a",), 30)
    jti = f"shared-{time.time_ns()}"
    assert one.spent.use_once("c", jti, time.time() + 60)
    assert not two.spent.use_once("c", jti, time.time() + 60)
    assert two.spent.use_once("other-client", jti, time.time() + 60)
    two.forget_expired(time.time() + 120)
    assert one.spent.use_once(
        "c", jti, time.time() + 60
    )  # forgotten once it could not be used anyway
