"""Where bastion's requests to the endpoints a peer's own metadata names may go.

The operator writes an identity provider's, a trusted issuer's or an ID-JAG provider's issuer, and
a Shared Signals transmitter's configuration URL; the document found there names the key set, the
token, UserInfo and introspection endpoints, the stream management endpoints, and the stream the
poll endpoint. A hostile or compromised peer chooses every one of them: fetched as given, they led
bastion to its own loopback services, the cloud's metadata service and the operator's private
network (SSRF), with the provider's client secret, the person's code or token, a token to
introspect or the transmitter's bearer credential. They are now reached as a `per_user`
upstream's endpoints are (`bastion.egress.metadata_allowance`, `bastion.egress.pinned`): public
addresses only, unless the configured URL is itself on a loopback or private address, or the
peer's ``allow_private_addresses`` allows more.

Here 127.0.0.2 stands for the internet: ``peer.test`` (the peer, over TLS) resolves to it and is
treated as public; ``internal.test`` resolves to the loopback, where an internal service records
whatever reaches it (`tests.connections.test_upstream_egress.Internal`).
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx
import pytest
from joserfc import jws, jwt
from joserfc.jwk import ECKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bastion.db import Database
from bastion.facts.store import FactStore
from bastion.identity.oidc_login import compose
from bastion.identity.trusted_issuers import (
    IssuerUnavailable,
    TrustedIssuers,
    parse_trusted_issuers,
)
from bastion.oauth import AuthorizationServer
from bastion.oauth.jwt_bearer import JWT_BEARER_GRANT_TYPE
from bastion.oauth.store import OAuthStore
from bastion.oauth.users import create_user
from bastion.signals.set_tokens import SetRefused
from bastion.signals.settings import SsfSettings
from bastion.signals.ssf import SsfReceiver
from tests.connections.test_upstream_egress import PUBLIC, Internal, pretend_internet
from tests.oauth.support import (
    ANY_KID,
    Clock,
    hidden_fields,
    make_settings,
    serve,
)

KEY = ECKey.generate_key("P-256", parameters={"kid": "k1"})


class Peer:
    """A provider, issuer or transmitter on ``host``: each path answers the JSON set for it in
    ``answers`` (a callable makes it from the request's form), and every request is recorded."""

    def __init__(self, host: str = str(PUBLIC), name: str = "peer.test", scheme: str = "https"):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.base = f"{scheme}://{name}:{self.sock.getsockname()[1]}"
        self.answers: dict[str, Any] = {}
        self.got: list[str] = []

        async def answer(request: Request):
            self.got.append(request.url.path)
            found = self.answers.get(request.url.path)
            if found is None:
                return JSONResponse({"error": "nothing here"}, status_code=404)
            if callable(found):
                found = found(dict(await request.form()))
            return JSONResponse(found)

        self.app = Starlette(routes=[Route("/{path:path}", answer, methods=["GET", "POST"])])


@pytest.fixture
def internet(tmp_path, monkeypatch):
    """peer.test on 127.0.0.2 (public, TLS) and the internal service on the loopback."""
    cert, key = pretend_internet(tmp_path, monkeypatch, "peer.test")
    peer, internal = Peer(), Internal()
    with (
        serve(peer.app, peer.sock, ssl_certfile=cert, ssl_keyfile=key),
        serve(internal.app(), internal.sock),
    ):
        yield peer, internal


def _inside(internal: Internal, path: str) -> list[str]:
    """The internal service as a peer's metadata may name it."""
    return [
        f"http://127.0.0.1:{internal.port}{path}",
        f"http://localhost:{internal.port}{path}",
        f"https://internal.test:{internal.port}{path}",
    ]


def _public_keys() -> dict:
    return {"keys": [KEY.as_dict(private=False)]}


def _signed(claims: dict[str, Any], typ: str = "JWT") -> str:
    return jwt.encode({"alg": "ES256", "kid": "k1", "typ": typ}, claims, KEY, registry=ANY_KID)


def _refusal_of(message: str, setting: str) -> None:
    """``message`` says the endpoint was refused, why, and which setting would allow it."""
    assert "non-public address" in message and "refused" in message, message
    assert setting in message, message
    assert "nothing here" not in message, message  # nothing fetched, nothing told


# -- identity providers -----------------------------------------------------------------------------


def _provider_documents(peer: Peer, endpoints: dict[str, str]) -> None:
    """peer.test as an OpenID provider whose discovery document names ``endpoints`` (the rest on
    peer.test itself), and whose token endpoint answers a valid ID token for the login's nonce."""
    base = peer.base
    peer.answers["/.well-known/openid-configuration"] = {
        "issuer": base,
        "authorization_endpoint": f"{base}/authorize",
        "token_endpoint": f"{base}/token",
        "jwks_uri": f"{base}/jwks",
        "userinfo_endpoint": f"{base}/userinfo",
        "id_token_signing_alg_values_supported": ["ES256"],  # as _signed signs them
        **endpoints,
    }
    peer.answers["/jwks"] = _public_keys()
    peer.answers["/userinfo"] = {"sub": "sam"}


@contextlib.asynccontextmanager
async def _authorization_server(tmp_path, identity: dict | None = None, **oauth: Any):
    """bastion's authorization server (with ``identity`` providers, ``oauth`` settings), driven
    in this event loop through its ASGI app: the peers' names resolve as the test says
    (uvicorn's uvloop would resolve them itself)."""
    n = len(list(tmp_path.iterdir()))
    url = "http://127.0.0.1:9"
    settings = make_settings(url, f"{url}/mcp", f"{url}/other", str(tmp_path / "keys"), **oauth)
    db = Database(str(tmp_path / f"b{n}.db"))
    server = AuthorizationServer(settings, db, clock=Clock())
    create_user(server.store, "alice", "a long password for alice", time.time(), actor="test")
    if identity is not None:
        compose(server, identity, {})
    app = Starlette(routes=server.routes())
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url=url) as http:
            yield server, http
    finally:
        db.close()


def _log_in(tmp_path, peer: Peer, **provider: Any) -> httpx.Response:
    """A person presses the provider's button and comes back with a code: bastion's answer."""
    identity = {
        "local_passwords": True,
        "providers": [
            {
                "id": "peer",
                "issuer": peer.base,
                "client_id": "bastion",
                "client_secret": "secret-of-bastion-at-peer",
                **provider,
            }
        ],
    }

    async def log_in() -> httpx.Response:
        async with _authorization_server(tmp_path, identity) as (_, http):
            form = hidden_fields((await http.get("/sign-in?next=/approvals")).text)
            started = await http.post("/login/peer", data=form)
            assert started.status_code == 303, started.text
            query = parse_qs(urlsplit(started.headers["location"]).query)
            now = int(time.time())
            claims = {
                "iss": peer.base,
                "sub": "sam",
                "aud": "bastion",
                "iat": now,
                "exp": now + 300,
                "nonce": query["nonce"][0],
            }
            token = {"access_token": "at", "token_type": "Bearer", "id_token": _signed(claims)}
            peer.answers["/token"] = token
            return await http.get(
                "/login/peer/callback", params={"state": query["state"][0], "code": "the-code"}
            )

    return anyio.run(log_in)


@pytest.mark.parametrize(
    ("endpoint", "what"),
    [
        ("token_endpoint", "token endpoint"),
        ("jwks_uri", "key set"),
        ("userinfo_endpoint", "userinfo endpoint"),
    ],
)
def test_a_providers_metadata_cannot_lead_bastion_inside(internet, tmp_path, endpoint, what):
    peer, internal = internet
    for url in _inside(internal, "/steal"):
        _provider_documents(peer, {endpoint: url})
        answer = _log_in(tmp_path, peer, userinfo=True)
        assert answer.status_code == 503, answer.text
        page = answer.text.replace("&#x27;", "'")
        assert f"its {what} " in page, page
        _refusal_of(page, "[[identity.providers]] allow_private_addresses")
    assert internal.got == []
    assert "/.well-known/openid-configuration" in peer.got  # the provider itself was asked


@pytest.mark.parametrize("endpoint", ["token_endpoint", "jwks_uri", "userinfo_endpoint"])
def test_a_providers_metadata_naming_a_url_no_request_can_go_to_is_refused(
    internet, tmp_path, endpoint
):
    # httpx cannot parse the host (a leading zero): it raised InvalidURL out of the fetch.
    peer, _ = internet
    _provider_documents(peer, {endpoint: "https://0177.0.0.1/steal"})
    provider = {"id": "peer", "issuer": peer.base, "client_id": "bastion", "client_secret": "s"}
    provider["userinfo"] = True

    async def press_the_button() -> httpx.Response:
        async with _authorization_server(tmp_path, {"providers": [provider]}) as (_, http):
            form = hidden_fields((await http.get("/sign-in?next=/approvals")).text)
            return await http.post("/login/peer", data=form)

    answer = anyio.run(press_the_button)
    assert answer.status_code == 503, answer.text
    assert f"no usable {endpoint}: " in answer.text
    assert "not a valid URL" in answer.text or "0177.0.0.1" in answer.text


def test_a_providers_allow_private_addresses_lets_its_metadata_lead_inside(internet, tmp_path):
    # The setting is the operator's word that the provider's endpoints live inside: the same
    # token endpoint is then reached (the internal service answers 404: the login fails).
    peer, internal = internet
    _provider_documents(peer, {"token_endpoint": f"http://127.0.0.1:{internal.port}/steal"})
    answer = _log_in(tmp_path, peer, allow_private_addresses=["127.0.0.1/32"])
    assert answer.status_code == 503
    assert [path for path, _ in internal.got] == ["/steal"]
    assert "code=the-code" in internal.got[0][1]  # the person's code, for a token
    # a list that holds another network does not
    internal.got.clear()
    answer = _log_in(tmp_path, peer, allow_private_addresses=["10.0.0.0/8"])
    _refusal_of(answer.text, "outside the networks allowed")
    assert internal.got == []


# -- trusted issuers (gateway) ----------------------------------------------------------------------


def _issuer_documents(peer: Peer, endpoints: dict[str, str]) -> None:
    peer.answers["/.well-known/openid-configuration"] = {
        "issuer": peer.base,
        "jwks_uri": f"{peer.base}/jwks",
        "introspection_endpoint": f"{peer.base}/introspect",
        **endpoints,
    }
    peer.answers["/jwks"] = _public_keys()
    peer.answers["/introspect"] = {"active": True}


def _present(issuer: str, **table: Any) -> Any:
    """A token of ``issuer`` presented at the gateway's server desk: what verifying it found."""
    settings = {"issuer": issuer, "audiences": {"desk": "api://desk"}, **table}
    trusted = TrustedIssuers(parse_trusted_issuers([settings], {"desk"}, {}))
    now = int(time.time())
    claims = {"iss": issuer, "sub": "sam", "client_id": "agent", "aud": "api://desk"}
    return anyio.run(trusted.verify, _signed({**claims, "iat": now, "exp": now + 300}), "desk")


INTROSPECTING = {"introspection_client_id": "bastion", "introspection_client_secret": "s3cret"}


@pytest.mark.parametrize(
    ("endpoint", "what"),
    [("jwks_uri", "the key set of"), ("introspection_endpoint", "the introspection endpoint of")],
)
def test_a_trusted_issuers_metadata_cannot_lead_bastion_inside(internet, endpoint, what):
    peer, internal = internet
    for url in _inside(internal, "/steal"):
        _issuer_documents(peer, {endpoint: url})
        with pytest.raises(IssuerUnavailable) as refused:
            _present(peer.base, **INTROSPECTING)
        assert str(refused.value).startswith(f"{what} {peer.base} "), refused.value
        _refusal_of(str(refused.value), "[[gateway.trusted_issuers]] allow_private_addresses")
    assert internal.got == []
    assert "/.well-known/openid-configuration" in peer.got


def test_a_trusted_issuers_metadata_naming_a_url_no_request_can_go_to_is_refused(internet):
    # httpx cannot parse the host (a leading zero): it raised InvalidURL out of the fetch.
    peer, _ = internet
    _issuer_documents(peer, {"jwks_uri": "https://0177.0.0.1/keys"})
    with pytest.raises(IssuerUnavailable, match="no usable jwks_uri"):
        _present(peer.base)


def test_a_trusted_issuers_allow_private_addresses_lets_its_metadata_lead_inside(internet):
    peer, internal = internet
    _issuer_documents(peer, {"jwks_uri": f"http://127.0.0.1:{internal.port}/keys"})
    with pytest.raises(IssuerUnavailable, match="HTTP 404"):
        _present(peer.base, allow_private_addresses=True)
    assert [path for path, _ in internal.got] == ["/keys"]


def test_the_endpoints_the_operator_configured_are_fetched_as_given(internet):
    """A ``jwks_uri`` written in the configuration is the operator's choice, not the peer's."""
    peer, internal = internet
    _issuer_documents(peer, {})
    with pytest.raises(IssuerUnavailable, match="HTTP 404"):
        _present(peer.base, jwks_uri=f"http://127.0.0.1:{internal.port}/keys")
    assert [path for path, _ in internal.got] == ["/keys"]


def test_an_issuer_the_operator_put_on_the_loopback_may_lead_there_unless_told_not_to(
    internet,
):
    _, internal = internet
    local = Peer("127.0.0.1", "127.0.0.1", "http")
    with serve(local.app, local.sock):
        _issuer_documents(local, {"jwks_uri": f"http://localhost:{internal.port}/keys"})
        with pytest.raises(IssuerUnavailable, match="HTTP 404"):
            _present(local.base)
        assert [path for path, _ in internal.got] == ["/keys"]
        with pytest.raises(IssuerUnavailable) as refused:
            _present(local.base, allow_private_addresses=False)
        _refusal_of(str(refused.value), "allow_private_addresses")
        assert len(internal.got) == 1


# -- ID-JAG providers (the jwt-bearer grant) --------------------------------------------------------


def _exchange(tmp_path, peer: Peer, **provider: Any) -> httpx.Response:
    """An ID-JAG of peer.test presented at bastion's /token by a confidential client."""

    async def exchange() -> httpx.Response:
        id_jag = {"issuers": [{"issuer": peer.base, **provider}]}
        async with _authorization_server(tmp_path, id_jag=id_jag) as (server, http):
            registered = await http.post(
                "/register",
                json={
                    "client_name": "enterprise agent",
                    "grant_types": [JWT_BEARER_GRANT_TYPE],
                    "token_endpoint_auth_method": "client_secret_basic",
                    "scope": "tools:read",
                },
                headers={"authorization": "Bearer initial-access-token-for-tests"},
            )
            assert registered.status_code == 201, registered.text
            client = registered.json()
            now = int(time.time())
            claims = {
                "iss": peer.base,
                "sub": "alice",
                "aud": server.settings.issuer,
                "client_id": client["client_id"],
                "jti": f"jti-{now}-{len(peer.got)}",
                "iat": now,
                "exp": now + 60,
                "scope": "tools:read",
                "resource": server.settings.resources[0].uri,
            }
            assertion = _signed(claims, "oauth-id-jag+jwt")
            return await http.post(
                "/token",
                data={"grant_type": JWT_BEARER_GRANT_TYPE, "assertion": assertion},
                auth=(client["client_id"], client["client_secret"]),
            )

    return anyio.run(exchange)


def test_an_id_jag_providers_metadata_cannot_lead_bastion_inside(internet, tmp_path):
    peer, internal = internet
    for url in _inside(internal, "/steal"):
        _issuer_documents(peer, {"jwks_uri": url})
        answer = _exchange(tmp_path, peer)
        assert answer.status_code == 503, answer.text
        description = answer.json()["error_description"]
        assert description.startswith(f"the key set of {peer.base} cannot be had now"), description
        _refusal_of(description, "[[oauth.id_jag.issuers]] allow_private_addresses")
    assert internal.got == []
    # The provider's own key set, on a public address, is taken.
    _issuer_documents(peer, {})
    answer = _exchange(tmp_path, peer)
    assert answer.status_code == 200, answer.text
    # and allow_private_addresses leads it inside
    _issuer_documents(peer, {"jwks_uri": f"http://127.0.0.1:{internal.port}/keys"})
    assert _exchange(tmp_path, peer, allow_private_addresses=True).status_code == 503
    assert [path for path, _ in internal.got] == ["/keys"]


# -- Shared Signals transmitters --------------------------------------------------------------------

POLL = "urn:ietf:rfc:8936"


def _transmitter_documents(peer: Peer, endpoints: dict[str, str], poll: str = "") -> None:
    base = peer.base
    peer.answers["/.well-known/ssf-configuration"] = {
        "issuer": base,
        "jwks_uri": f"{base}/jwks",
        "configuration_endpoint": f"{base}/stream",
        "status_endpoint": f"{base}/status",
        "verification_endpoint": f"{base}/verify",
        **endpoints,
    }
    peer.answers["/jwks"] = _public_keys()
    peer.answers["/stream"] = {
        "stream_id": "s1",
        "iss": base,  # SSF 1.0 §8.1.1: required, and checked
        "aud": "https://bastion.test",
        "delivery": {"method": POLL, "endpoint_url": poll or f"{base}/poll"},
    }
    peer.answers["/status"] = {"status": "enabled"}
    peer.answers["/verify"] = {}
    peer.answers["/poll"] = {"sets": {}, "moreAvailable": False}


@contextlib.contextmanager
def _receiver(tmp_path, peer: Peer, **transmitter: Any):
    table = {
        "name": "peer",
        "issuer": peer.base,
        "audience": "https://bastion.test",
        "delivery": "poll",
        "bearer_env": "PEER_BEARER",
        **transmitter,
    }
    settings = SsfSettings.from_table(
        {"transmitters": [table]}, env={"PEER_BEARER": "bearer-credential-of-bastion"}
    )
    n = len(list(tmp_path.iterdir()))
    db = Database(str(tmp_path / f"ssf{n}.db"))
    try:
        receiver = SsfReceiver(settings, db, OAuthStore(db), FactStore(db), lambda: None)
        yield receiver, settings.transmitters[0]
    finally:
        db.close()


def _set_token(peer: Peer) -> str:
    payload = {"iss": peer.base, "aud": "https://bastion.test", "iat": int(time.time())}
    protected = {"alg": "ES256", "typ": "secevent+jwt", "kid": "k1"}
    return jws.serialize_compact(
        protected, json.dumps(payload).encode(), KEY, algorithms=["ES256"], registry=ANY_KID
    )


def _stream_steps(receiver: SsfReceiver, t) -> Callable[[], Any]:
    async def steps() -> None:
        stream = (await receiver.configure(t)).stream
        await receiver.poll_once(t, stream["delivery"]["endpoint_url"], [], {})

    return steps


@pytest.mark.parametrize(
    "endpoint",
    ["configuration_endpoint", "status_endpoint", "verification_endpoint", "poll endpoint_url"],
)
def test_a_transmitters_metadata_cannot_lead_bastion_inside(internet, tmp_path, endpoint):
    peer, internal = internet
    for url in _inside(internal, "/steal"):
        if endpoint == "poll endpoint_url":
            _transmitter_documents(peer, {}, poll=url)
        else:
            _transmitter_documents(peer, {endpoint: url})
        with _receiver(tmp_path, peer) as (receiver, t), pytest.raises(ValueError) as refused:
            anyio.run(_stream_steps(receiver, t))
        assert str(refused.value).startswith(f"{url} "), refused.value
        _refusal_of(str(refused.value), "[[signals.ssf.transmitters]] allow_private_addresses")
    assert internal.got == []
    assert "/.well-known/ssf-configuration" in peer.got


def test_a_transmitters_jwks_uri_cannot_lead_bastion_inside(internet, tmp_path):
    peer, internal = internet
    for url in _inside(internal, "/steal"):
        _transmitter_documents(peer, {"jwks_uri": url})
        with _receiver(tmp_path, peer) as (receiver, t), pytest.raises(SetRefused) as refused:
            anyio.run(receiver.keys, t, _set_token(peer))
        assert refused.value.err == "invalid_key"
        _refusal_of(
            refused.value.description, "[[signals.ssf.transmitters]] allow_private_addresses"
        )
    assert internal.got == []
    # its own, public, key set is taken
    _transmitter_documents(peer, {})
    with _receiver(tmp_path, peer) as (receiver, t):
        assert anyio.run(receiver.keys, t, _set_token(peer)).get_by_kid("k1")


def test_a_transmitters_allow_private_addresses_lets_its_metadata_lead_inside(internet, tmp_path):
    peer, internal = internet
    _transmitter_documents(peer, {"status_endpoint": f"http://127.0.0.1:{internal.port}/status"})
    with _receiver(tmp_path, peer, allow_private_addresses=["127.0.0.1/32"]) as (receiver, t):
        anyio.run(_stream_steps(receiver, t))
    assert [path for path, _ in internal.got] == ["/status"]
