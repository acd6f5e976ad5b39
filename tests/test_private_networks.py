"""``allow_private_addresses`` as a list of networks: a fetch whose URL is someone else's choice
(a client ID metadata document, a registered client's ``jwks_uri``, an upstream's authorization
server and its endpoints, the endpoints an identity provider's, a trusted issuer's, an ID-JAG
provider's or a transmitter's metadata names: `tests/test_metadata_egress.py`) may reach the non-public addresses of the networks listed, and no other
non-public address. ``true`` opened every one (the loopback, the cloud's metadata service, every
private network) for an operator whose identity provider lives at one private address.

Here 127.0.0.1 stands for the network allowed (``127.0.0.1/32``) and 127.0.0.2, the loopback too,
for a network that is not: a real server listens on each, and records what reaches it. One
function decides for every fetch (`bastion.egress.may_connect`), and one reads every setting
(`bastion.egress.private_allowance`)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import socket
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path

import anyio
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bastion.connections.settings import UpstreamOAuth
from bastion.connections.upstream_oauth import UpstreamOAuthClient, UpstreamOAuthError
from bastion.db import Database
from bastion.egress import may_connect, private_allowance
from bastion.oauth.client_assertion import ClientAssertions
from bastion.oauth.client_metadata_document import ClientMetadataDocuments
from bastion.oauth.errors import OAuthError
from bastion.oauth.settings import ClientAssertionSettings, ClientMetadataDocumentSettings
from bastion.server.app import create_app
from bastion.server.config import ConfigError, ServerConfig
from tests.delegation.agent_support import assertion, new_key, public_jwks
from tests.delegation.test_private_key_jwt import _found, dynamic_key_client
from tests.oauth.support import Clock, self_signed_certificate, serve
from tests.oauth.test_client_metadata_documents import REDIRECT, _forms

ALLOWED, OTHER = "127.0.0.1", "127.0.0.2"
LISTED = private_allowance([f"{ALLOWED}/32"], "the tests' setting")


class Site:
    """A real HTTP(S) server on ``host``: answers each path with the JSON set for it, and
    records every request (path and body)."""

    def __init__(self, host: str, port: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.answers: dict[str, object] = {}
        self.got: list[tuple[str, str]] = []

        async def answer(request: Request):
            self.got.append((request.url.path, (await request.body()).decode()))
            if request.url.path not in self.answers:
                return JSONResponse({"error": "nothing here"}, status_code=404)
            return JSONResponse(self.answers[request.url.path])

        self.app = Starlette(routes=[Route("/{path:path}", answer, methods=["GET", "POST"])])

    def url(self, path: str, scheme: str = "http", host: str | None = None) -> str:
        return f"{scheme}://{host or self.host}:{self.port}{path}"


@contextmanager
def sites(tmp_path: Path, *, tls: bool = False):
    """A `Site` on 127.0.0.1 and one on 127.0.0.2; over https with ``tls``, under one
    certificate for both addresses (its file the first value)."""
    certificate: dict[str, str] = {}
    ca_file = ""
    if tls:
        ca_file, key = self_signed_certificate(tmp_path, addresses=(ALLOWED, OTHER))
        certificate = {"ssl_certfile": ca_file, "ssl_keyfile": key}
    allowed, other = Site(ALLOWED), Site(OTHER)
    with ExitStack() as stack:
        for site in (allowed, other):
            stack.enter_context(serve(site.app, site.sock, **certificate))
        yield ca_file, allowed, other


# -- the one decision -----------------------------------------------------------------------------


@pytest.mark.parametrize("inner", ["169.254.169.254", "127.0.0.1", "10.2.0.1", "192.168.1.1"])
@pytest.mark.parametrize(
    "form", ["ipv4-mapped", "ipv4-compatible", "nat64", "6to4", "teredo-server", "teredo-client"]
)
def test_an_allowed_network_lets_no_ipv6_form_of_another_address_through(inner, form):
    """An IPv6 address that carries an IPv4 one is judged by the IPv4 address: an allowed
    10.1.0.0/16 lets no ``::ffff:169.254.169.254`` through, and neither does an allowed IPv6
    network that holds the IPv6 form (every IPv6 address, here)."""
    allowed = private_allowance(["10.1.0.0/16", "::/0"], "allow_private_addresses")
    address = _forms(inner)[form]
    assert not may_connect(address, allowed), address
    assert may_connect(_forms("10.1.2.3")[form], allowed)
    # and true still allows every one, false none
    assert may_connect(address, True) and not may_connect(address, False)


def test_an_allowed_network_opens_its_own_addresses_and_no_other_non_public_one():
    allowed = private_allowance(["10.1.0.0/16", "fd00:1::/64"], "allow_private_addresses")
    for address in ("10.1.2.3", "10.1.255.255", "fd00:1::5", "8.8.8.8", "2606:4700::1111"):
        assert may_connect(ipaddress.ip_address(address), allowed), address
    refused = ("10.2.0.1", "127.0.0.1", "169.254.169.254", "::1", "fe80::1", "fd00:2::5")
    for address in (*refused, "100.64.0.1", "64:ff9b:1::a01:203"):
        assert not may_connect(ipaddress.ip_address(address), allowed), address


# -- the settings ---------------------------------------------------------------------------------

SETTINGS = {
    "client metadata documents": ("oauth", "client_metadata", "allow_private_addresses"),
    "registered jwks_uri": ("oauth", "client_assertion", "allow_private_addresses"),
}


# The peers whose own metadata names the endpoints bastion then reaches: the table that
# configures one (its allow_private_addresses appended), and where errors name it.
PEERS = {
    "identity provider": (
        '[identity]\n[[identity.providers]]\nid = "corp"\nissuer = "https://idp.example"\n'
        'client_id = "bastion"\ntoken_endpoint_auth_method = "none"\n',
        "identity.providers[0]",
    ),
    "trusted issuer": (
        '[gateway]\npublic_url = "http://127.0.0.1:9"\n[[gateway.upstreams]]\nname = "crm"\n'
        'url = "https://crm.example/mcp"\n[[gateway.trusted_issuers]]\n'
        'issuer = "https://idp.example"\naudiences = { crm = "api://crm" }\n',
        "gateway.trusted_issuers[0]",
    ),
    "id-jag provider": (
        '[[oauth.id_jag.issuers]]\nissuer = "https://idp.example"\n',
        "oauth.id_jag.issuers[0]",
    ),
    "transmitter": (
        '[signals.ssf]\n[[signals.ssf.transmitters]]\nname = "idp"\n'
        'issuer = "https://idp.example"\naudience = "http://127.0.0.1:9"\ndelivery = "poll"\n',
        "[[signals.ssf.transmitters]] #1",
    ),
}


def _read_peer(config: ServerConfig, setting: str) -> object:
    """The allow_private_addresses of the peer ``setting`` names, as bastion reads it."""
    if setting == "identity provider":
        from bastion.identity.providers import IdentitySettings

        return IdentitySettings.from_mapping(config.identity, {}).providers[0]
    if setting == "trusted issuer":
        from bastion.gateway.config import GatewayConfig

        return GatewayConfig.from_mapping(config.gateway, env={}).trusted_issuers[0]
    if setting == "id-jag provider":
        from bastion.oauth.settings import OAuthSettings

        return OAuthSettings.from_mapping(config.oauth).id_jag.issuers[0]
    from bastion.signals.settings import SsfSettings

    return SsfSettings.from_table(config.signals["ssf"], env={}).transmitters[0]


def _config(tmp_path: Path, setting: str, value: object) -> ServerConfig:
    """A bastion.toml whose setting (one of `SETTINGS`, `PEERS`, or an upstream's) is ``value``,
    read as `bastion serve` reads it."""
    lines = [f'[server]\ndatabase = "{tmp_path / "b.db"}"\n']
    lines.append(
        f'[oauth]\nissuer = "http://127.0.0.1:9"\nkey_dir = "{tmp_path / "keys"}"\n'
        '[[oauth.resources]]\nuri = "http://127.0.0.1:9/mcp/crm"\nscopes = ["a"]\n'
    )
    if setting in PEERS:
        lines.append(f"{PEERS[setting][0]}allow_private_addresses = {json.dumps(value)}\n")
    elif setting == "upstream":
        lines.append(
            '[gateway]\npublic_url = "http://127.0.0.1:9"\n[[gateway.upstreams]]\nname = "crm"\n'
            'url = "https://crm.example/mcp"\nauth = "per_user"\n'
            f"[gateway.upstreams.oauth]\nallow_private_addresses = {json.dumps(value)}\n"
        )
    else:
        table, key = SETTINGS[setting][1:]
        lines.append(f"[oauth.{table}]\n{key} = {json.dumps(value)}\n")
    path = tmp_path / "bastion.toml"
    path.write_text("".join(lines))
    return ServerConfig.load(path, env={})


@pytest.mark.parametrize("setting", [*SETTINGS, "upstream", *PEERS])
@pytest.mark.parametrize(
    ("value", "words"),
    [
        (["10.1.2.3/16"], "'10.1.2.3/16' is not a network (10.1.2.3/16 has host bits set); did"),
        (["10.1.0.0/33"], "'10.1.0.0/33' is not a network"),
        (["intranet"], "'intranet' is not a network"),
        ([10], "each network is a string in CIDR notation, got 10"),
        ("10.1.0.0/16", "true, false or a list of networks"),
        (1, "true, false or a list of networks"),
        (["::ffff:10.1.0.0/112"], "list the IPv4 network instead"),
    ],
)
def test_a_wrong_network_list_is_refused_at_start_naming_the_setting(
    tmp_path, setting, value, words
):
    with pytest.raises(ConfigError) as refused:
        create_app(_config(tmp_path, setting, value))
    message = str(refused.value)
    assert words in message, message
    if setting in PEERS:
        named = PEERS[setting][1]
    elif setting == "upstream":
        named = "upstreams[0].oauth"
    else:
        named = ".".join(SETTINGS[setting][:2])
    assert f"{named}.allow_private_addresses" in message, message


@pytest.mark.parametrize("setting", [*SETTINGS, "upstream", *PEERS])
def test_a_network_list_is_read_as_the_networks_it_names(tmp_path, setting):
    config = _config(tmp_path, setting, ["10.1.0.0/16", "fd00:1::/64", "10.1.0.0/16"])
    if setting in PEERS:
        read = _read_peer(config, setting).allow_private_addresses
    elif setting == "upstream":
        from bastion.gateway.config import GatewayConfig

        gateway = GatewayConfig.from_mapping(config.gateway, env={})
        read = gateway.upstreams[0].oauth.allow_private_addresses
    else:
        from bastion.oauth.settings import OAuthSettings

        oauth = OAuthSettings.from_mapping(config.oauth)
        read = getattr(oauth, SETTINGS[setting][1]).allow_private_addresses
    assert read == (ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("fd00:1::/64"))


@pytest.mark.parametrize("setting", PEERS)
def test_a_peer_without_the_setting_leaves_it_to_where_the_operator_put_the_peer(tmp_path, setting):
    """Unset (None), not false: `bastion.egress.metadata_allowance` decides from the issuer or
    configuration URL the operator wrote; true and false are read as they are."""
    assert _read_peer(_config(tmp_path, setting, True), setting).allow_private_addresses is True
    assert _read_peer(_config(tmp_path, setting, False), setting).allow_private_addresses is False
    table = PEERS[setting][0]
    (tmp_path / "bastion.toml").write_text(
        f'[server]\ndatabase = "{tmp_path / "b.db"}"\n[oauth]\nissuer = "http://127.0.0.1:9"\n'
        f'key_dir = "{tmp_path / "keys"}"\n[[oauth.resources]]\n'
        f'uri = "http://127.0.0.1:9/mcp/crm"\nscopes = ["a"]\n{table}'
    )
    config = ServerConfig.load(tmp_path / "bastion.toml", env={})
    assert _read_peer(config, setting).allow_private_addresses is None


# -- client ID metadata documents -----------------------------------------------------------------


def _document(site: Site, path: str) -> str:
    url = site.url(path, "https")
    site.answers[path] = {"client_id": url, "client_name": "Doc agent", "redirect_uris": [REDIRECT]}
    return url


def _fetched(ca_file: str, url: str, private: object) -> object:
    settings = ClientMetadataDocumentSettings(allow_private_addresses=private, ca_file=ca_file)
    return anyio.run(ClientMetadataDocuments(settings, Clock()).client, url)


def test_a_metadata_document_is_fetched_from_a_listed_network_only(tmp_path):
    with sites(tmp_path, tls=True) as (ca_file, allowed, other):
        inside, elsewhere = _document(allowed, "/agent.json"), _document(other, "/agent.json")
        assert _fetched(ca_file, inside, LISTED).client_name == "Doc agent"
        with pytest.raises(OAuthError) as refused:
            _fetched(ca_file, elsewhere, LISTED)
        assert "resolves to a non-public address outside the networks allowed" in str(
            refused.value.description
        )
        # The document is anyone's: its refusal does not map the networks behind bastion.
        assert "127.0.0.2" not in refused.value.description.partition("resolves")[2]
        assert "[oauth.client_metadata] allow_private_addresses" in refused.value.description
        # nor through an IPv6 form of it
        mapped = other.url("/agent.json", "https", "[::ffff:127.0.0.2]")
        with pytest.raises(OAuthError, match="outside the networks allowed"):
            _fetched(ca_file, mapped, LISTED)
        assert other.got == []
        assert len(allowed.got) == 1
        # The server refused is a real one: true reaches it.
        assert _fetched(ca_file, elsewhere, True).client_name == "Doc agent"
        assert len(other.got) == 1


def test_a_name_with_one_address_outside_the_listed_networks_is_refused(
    tmp_path, monkeypatch, caplog
):
    """Every address a name resolves to must be allowed; and the one checked is the one
    connected to, so a name that resolves elsewhere the second time (DNS rebinding) cannot
    lead the fetch out of the listed network."""
    answers: list[list[str]] = []
    real = socket.getaddrinfo

    def resolving(host, port, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if name != "doc.test":
            return real(host, port, *args, **kwargs)
        addresses = answers.pop(0) if len(answers) > 1 else answers[0]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in addresses]

    monkeypatch.setattr(socket, "getaddrinfo", resolving)
    ca_file, key = self_signed_certificate(tmp_path, dns_name="doc.test")
    allowed = Site(ALLOWED)
    other = Site(OTHER, allowed.port)
    url = f"https://doc.test:{allowed.port}/agent.json"
    for site in (allowed, other):
        site.answers["/agent.json"] = {
            "client_id": url,
            "client_name": f"agent at {site.host}",
            "redirect_uris": [REDIRECT],
        }
    with (
        serve(allowed.app, allowed.sock, ssl_certfile=ca_file, ssl_keyfile=key),
        serve(other.app, other.sock, ssl_certfile=ca_file, ssl_keyfile=key),
    ):
        answers[:] = [[ALLOWED, OTHER]]
        with (
            caplog.at_level(logging.INFO, logger="bastion.egress"),
            pytest.raises(OAuthError, match="doc.test resolves to a non-public address outside"),
        ):
            _fetched(ca_file, url, LISTED)
        # The address refused is named in bastion's log, never to the document's author.
        assert "doc.test resolves to non-public address 127.0.0.2" in caplog.text
        answers[:] = [[ALLOWED], [OTHER]]  # the second resolution, were there one, leads out
        assert _fetched(ca_file, url, LISTED).client_name == "agent at 127.0.0.1"
    assert other.got == []


# -- a registered client's jwks_uri ---------------------------------------------------------------


def test_a_registered_jwks_uri_is_fetched_from_a_listed_network_only(tmp_path, sqlite_url):
    key = new_key("inside")
    db = Database(sqlite_url)

    def authenticate(private: object, jwks_uri: str):
        settings = ClientAssertionSettings(allow_private_addresses=private)
        checked = ClientAssertions(settings, db, ("https://a",), 30)
        client = dynamic_key_client("agent publishing its keys", jwks_uri)
        signed = assertion(key, client.client_id, "https://a")
        return anyio.run(checked.authenticate, signed, None, partial(_found, client))

    with sites(tmp_path) as (_, allowed, other), contextlib.closing(db):
        for site in (allowed, other):
            site.answers["/jwks.json"] = public_jwks(key)
        assert authenticate(LISTED, allowed.url("/jwks.json")).client_name
        with pytest.raises(OAuthError) as refused:
            authenticate(LISTED, other.url("/jwks.json"))
        assert refused.value.error == "invalid_client"
        assert "a non-public address outside the networks allowed" in refused.value.description
        assert "[oauth.client_assertion] allow_private_addresses" in refused.value.description
        with pytest.raises(OAuthError, match="outside the networks allowed"):
            authenticate(LISTED, other.url("/jwks.json", "https", "[::ffff:127.0.0.2]"))
        assert other.got == []
        assert authenticate(True, other.url("/jwks.json")).client_name
        assert len(other.got) == 1


# -- an upstream's authorization server -----------------------------------------------------------


def test_an_upstream_allowed_a_network_sends_its_secrets_there_and_nowhere_else(tmp_path):
    """An upstream on 127.0.0.1 whose authorization server names a token endpoint: on the
    listed network it gets the refresh token, on 127.0.0.2 nothing is sent (true sends it)."""

    def refresh(private: object, upstream: Site, token_endpoint: str) -> None:
        upstream.answers["/.well-known/oauth-protected-resource/mcp"] = {
            "resource": upstream.url("/mcp"),
            "authorization_servers": [upstream.url("")],
        }
        upstream.answers["/.well-known/oauth-authorization-server"] = {
            "issuer": upstream.url(""),
            "authorization_endpoint": upstream.url("/authorize"),
            "token_endpoint": token_endpoint,
            "code_challenge_methods_supported": ["S256"],
        }
        settings = UpstreamOAuth(
            client_id="bastion", client_secret="s3cret", allow_private_addresses=private
        )
        client = UpstreamOAuthClient(upstream.url("/mcp"), settings, "crm")
        secret = {"client_id": "bastion", "client_secret": "s3cret"}

        async def refreshed() -> None:
            # A refresh token the upstream's authorization server issued (the only one it goes
            # to), as bastion refreshes: its metadata read, then the token sent where it says.
            meta = await client.metadata_of(upstream.url(""))
            await client.refresh(meta, secret, "refresh-secret", 0.0)

        anyio.run(refreshed)

    with sites(tmp_path) as (_, allowed, other):
        for site in (allowed, other):
            site.answers["/token"] = {"access_token": "a", "token_type": "Bearer"}
        refresh(LISTED, allowed, allowed.url("/token"))
        assert any("refresh-secret" in body for path, body in allowed.got if path == "/token")
        with pytest.raises(UpstreamOAuthError) as refused:
            refresh(LISTED, allowed, other.url("/token"))
        assert "a non-public address outside the networks allowed" in str(refused.value)
        assert "upstream crm's oauth.allow_private_addresses" in str(refused.value)
        assert other.got == []
        # Nor the upstream's own address, if it is not listed: the list is all there is.
        only_other = private_allowance([f"{OTHER}/32"], "oauth.allow_private_addresses")
        with pytest.raises(
            UpstreamOAuthError,
            match="127.0.0.1 resolves to a non-public address outside the networks allowed",
        ):
            refresh(only_other, allowed, other.url("/token"))
        assert other.got == []
        refresh(True, allowed, other.url("/token"))
        assert any("refresh-secret" in body for _, body in other.got)
