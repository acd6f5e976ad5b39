"""bastion authenticating at a company identity provider's token endpoint with its own private
key (``private_key_jwt``: OpenID Connect Core 1.0 §9, RFC 7523 §2.2): the certified npm
oidc-provider, run with Node, registers bastion's client with only the public keys; a person
signs in there in Debian's chromium. A key the provider does not know signs nobody in, with a
page that says what to fix; a key file that is no usable private key stops the start, naming it
and never showing it. The assertion's claims, and the methods and algorithms a provider
announces, are in test_oidc_login_refusals.py (a provider written for the tests)."""

from __future__ import annotations

import json
from urllib.parse import urlencode

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc.jwk import ECKey, OctKey, OKPKey, RSAKey

from bastion.cli import main
from bastion.facts.model import Entity
from bastion.identity.providers import IdentityConfigError, IdentitySettings
from tests.browser import browser_fixture, tab_fixture  # noqa: F401 (fixtures)
from tests.oauth.support import free_socket, pkce_pair

from .oidc_provider import oidc_provider
from .oidc_support import (
    bastion_with_providers,
    log_in_at_the_provider,
    sign_in_at_the_provider,
)

PASSWORD = "ada-at-the-provider"
CLIENT_SECRET = "a-client-secret-oidc-provider-never-checks-here"


def _provider(provider_id: str, issuer: str, **settings) -> dict:
    return {
        "id": provider_id,
        "name": f"SSO {provider_id}",
        "issuer": issuer,
        "client_id": "bastion",
        **settings,
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """oidc-provider knowing bastion's client by two public keys (RSA, EC P-256), and bastion
    with four providers at it: ``rsa`` (a PEM key, aud the token endpoint), ``ec`` (a JWK
    file, aud the issuer), ``stranger`` (an RSA key the provider does not know, under a kid it
    knows) and ``secret`` (a client secret, which the provider does not take from it)."""
    directory = tmp_path_factory.mktemp("pkjwt")
    people = directory / "people.json"
    people.write_text(
        json.dumps({"ada": {"password": PASSWORD, "email": "ada@acme.test", "groups": ["ops"]}})
    )
    rsa_key = RSAKey.generate_key(2048, parameters={"kid": "bastion-rsa"})
    ec_key = ECKey.generate_key("P-256", parameters={"kid": "bastion-ec"})
    stranger = RSAKey.generate_key(2048)
    (directory / "rsa.pem").write_bytes(rsa_key.as_pem(private=True))
    (directory / "ec.jwk").write_text(json.dumps(ec_key.as_dict(private=True)))
    (directory / "stranger.pem").write_bytes(stranger.as_pem(private=True))
    bastion_sock, provider_sock = free_socket(), free_socket()
    bastion_url = f"http://127.0.0.1:{bastion_sock.getsockname()[1]}"
    port = provider_sock.getsockname()[1]
    provider_sock.close()  # Node binds it
    ids = ("rsa", "ec", "stranger", "secret")
    registered = {
        "token_endpoint_auth_method": "private_key_jwt",
        "jwks": {"keys": [rsa_key.as_dict(private=False), ec_key.as_dict(private=False)]},
    }
    with oidc_provider(
        port,
        client_id="bastion",
        client_secret=CLIENT_SECRET,
        redirect_uris=[f"{bastion_url}/login/{i}/callback" for i in ids],
        users_file=people,
        client_metadata=registered,
    ) as issuer:
        pkjwt = {
            "token_endpoint_auth_method": "private_key_jwt",
            "userinfo": True,
            "scopes": ["openid", "groups"],
        }
        facts = [{"claim": "groups", "name": "{value}", "resource": "Org:acme"}]
        identity = {
            "providers": [
                _provider(
                    "rsa",
                    issuer,
                    client_key_file=str(directory / "rsa.pem"),
                    client_key_id="bastion-rsa",
                    facts=facts,
                    **pkjwt,
                ),
                _provider(
                    "ec",
                    issuer,
                    client_key_file=str(directory / "ec.jwk"),
                    client_assertion_audience="issuer",
                    **pkjwt,
                ),
                _provider(
                    "stranger",
                    issuer,
                    client_key_file=str(directory / "stranger.pem"),
                    client_key_id="bastion-rsa",
                    **pkjwt,
                ),
                _provider("secret", issuer, client_secret=CLIENT_SECRET),
            ]
        }
        with bastion_with_providers(
            str(directory / "bastion.db"), str(directory / "keys"), bastion_sock, identity
        ) as bastion:
            yield {"bastion": bastion, "directory": directory, "rsa": rsa_key, "ec": ec_key}


def _authorize_url(bastion) -> str:
    client = bastion.register(redirect_uris=["http://127.0.0.1:9/callback"])
    _, challenge = pkce_pair()
    params = bastion.authorize_params(client, challenge, resource=bastion.resource)
    return f"{bastion.url}/authorize?{urlencode(params)}"


def _sessions(bastion) -> int:
    return bastion.db.execute("SELECT COUNT(*) FROM oauth_sessions")[0][0]


@pytest.mark.parametrize("provider", ["rsa", "ec"])
def test_a_person_signs_in_through_a_provider_that_knows_bastion_by_its_public_key(
    world, tab, provider
):
    bastion = world["bastion"]
    query = log_in_at_the_provider(
        tab, _authorize_url(bastion), f"SSO {provider}", "ada", PASSWORD, f"{provider}:ada"
    )
    assert "code" in query and "error" not in query
    assert f"{provider}:ada" in [u[0] for u in bastion.server.store.users()]
    if provider == "rsa":
        roles = bastion.server.facts.get(("has_role", Entity("User", "rsa:ada"), None, None))
        assert [f.fact[2] for f in roles] == ["ops"]


@pytest.mark.parametrize(
    ("provider", "fix"),
    [
        ("stranger", "client_key_file, or the public key registered for bastion"),
        ("secret", "client_id and client_secret (client_secret_basic)"),
    ],
)
def test_credentials_the_provider_refuses_sign_nobody_in_and_say_what_to_fix(
    world, tab, provider, fix
):
    bastion = world["bastion"]
    before = _sessions(bastion)
    arrived = sign_in_at_the_provider(
        tab, _authorize_url(bastion), f"SSO {provider}", "ada", PASSWORD
    )
    page = tab.page
    page.wait_for_selector("text=Cannot sign in")
    text = page.inner_text("body")
    assert "Cannot sign in" in text, text
    assert f"SSO {provider} refused bastion's own credentials at its token endpoint" in text
    assert "invalid_client" in text and fix in text, text
    assert arrived == []
    assert f"{provider}:ada" not in [u[0] for u in bastion.server.store.users()]
    assert _sessions(bastion) == before
    recorded = [
        json.loads(detail)
        for (detail,) in bastion.db.execute(
            "SELECT detail FROM audit_events WHERE kind = 'login.refused'"
        )
    ]
    # Refusals are recorded once per reason and address a window (docs/oauth.md): this one, or
    # the other provider's before it.
    assert "client_auth" in [r["reason"] for r in recorded]


def test_client_jwks_prints_the_public_keys_to_register_at_the_provider(world, capsys, tmp_path):
    directory = world["directory"]
    config = tmp_path / "bastion.toml"
    config.write_text(
        "[[identity.providers]]\n"
        'id = "rsa"\nissuer = "https://login.acme.example"\nclient_id = "bastion"\n'
        'token_endpoint_auth_method = "private_key_jwt"\n'
        f'client_key_file = "{directory / "rsa.pem"}"\n'
        'client_key_id = "bastion-2026"\n'
        "[[identity.providers]]\n"
        'id = "ec"\nissuer = "https://login.acme.example"\nclient_id = "bastion"\n'
        'token_endpoint_auth_method = "private_key_jwt"\n'
        f'client_key_file = "{directory / "ec.jwk"}"\n'
    )
    assert main(["identity", "client-jwks", "--config", str(config)]) == 0
    printed = json.loads(capsys.readouterr().out)
    rsa_public = world["rsa"].as_dict(private=False)
    ec_public = world["ec"].as_dict(private=False)
    assert printed == {
        "keys": [
            {**rsa_public, "kid": "bastion-2026", "use": "sig", "alg": "RS256"},
            {**ec_public, "kid": "bastion-ec", "use": "sig", "alg": "ES256"},
        ]
    }
    assert main(["identity", "client-jwks", "ec", "--config", str(config)]) == 0
    assert [k["kid"] for k in json.loads(capsys.readouterr().out)["keys"]] == ["bastion-ec"]
    assert main(["identity", "client-jwks", "nobody", "--config", str(config)]) == 2
    assert "no provider 'nobody'" in capsys.readouterr().err


# -- a key file that cannot be used stops the start ------------------------------------------


def _pem_of(private_key, password: bytes | None = None) -> bytes:
    encryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def _key_files() -> dict[str, tuple[bytes | None, str]]:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    good = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    secretish = b"-----BEGIN PRIVATE KEY-----\nTOP-SECRET-MATERIAL\n-----END PRIVATE KEY-----\n"
    return {
        "missing": (None, "cannot be read: No such file or directory"),
        "garbage": (secretish, "cannot be read as a PEM private key"),
        "text": (b"hello", "is neither a PEM private key nor a JWK"),
        "public-pem": (
            good.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            "give the private key",
        ),
        "public-jwk": (
            json.dumps(RSAKey.generate_key(2048).as_dict(private=False)).encode(),
            "holds a public key",
        ),
        "hmac-jwk": (json.dumps(OctKey.generate_key(256).as_dict()).encode(), "a JWK of kty 'oct'"),
        "small-rsa": (_pem_of(small), "RSA key of 1024 bits: at least 2048"),
        "encrypted": (_pem_of(good, b"pass-phrase"), "is encrypted"),
        "x25519": (
            json.dumps(OKPKey.generate_key("X25519").as_dict(private=True)).encode(),
            "on the curve 'X25519'",
        ),
        "large": (b"{" + b" " * 70_000 + b"}", "larger than 65536 bytes"),
    }


def _corp(**settings) -> dict:
    """The provider table of the settings tests: bastion's client at a provider, by key."""
    return {
        "id": "corp",
        "issuer": "https://login.acme.example",
        "client_id": "bastion",
        "token_endpoint_auth_method": "private_key_jwt",
        **settings,
    }


@pytest.mark.parametrize("case", sorted(_key_files()))
def test_a_client_key_file_that_is_no_usable_private_key_stops_the_start_naming_it(tmp_path, case):
    content, words = _key_files()[case]
    path = tmp_path / f"{case}.key"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(IdentityConfigError) as error:
        IdentitySettings.from_mapping(
            {"providers": [_corp(client_key_file=str(path))]}, {}
        ).with_keys()
    message = str(error.value)
    assert message.startswith(f"identity.providers[0].client_key_file: {path}"), message
    assert words in message, message
    assert "TOP-SECRET" not in message


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({}, "client_key_file must be a non-empty string"),
        ({"client_key_file": "${CORP_KEY}"}, "the environment has no CORP_KEY"),
        ({"client_secret": "s3cret", "client_key_file": "k"}, "client_secret is not used"),
        ({"client_key_file": "KEY", "client_assertion_alg": "ES256"}, "not one the key of"),
        ({"client_key_file": "KEY", "client_assertion_audience": "aud"}, "token_endpoint or"),
        (
            {
                "token_endpoint_auth_method": "client_secret_post",
                "client_secret": "s3cret",
                "client_key_file": "KEY",
            },
            "client_key_file is used only with",
        ),
        ({"token_endpoint_auth_method": "client_secret_jwt"}, "one of client_secret_basic"),
    ],
    ids=lambda v: str(v)[:40],
)
def test_private_key_jwt_settings_are_checked_at_start(tmp_path, settings, words):
    key = tmp_path / "bastion.pem"
    key.write_bytes(RSAKey.generate_key(2048).as_pem(private=True))
    provider = _corp(**{k: str(key) if v == "KEY" else v for k, v in settings.items()})
    with pytest.raises(IdentityConfigError) as error:
        IdentitySettings.from_mapping({"providers": [provider]}, {}).with_keys()
    assert words in str(error.value)


def test_a_client_key_file_naming_d_twice_stops_the_start_naming_the_member_not_the_key(tmp_path):
    """A JWK file whose private ``d`` is given twice (a key pasted over another): which key
    bastion would sign with depends on the parser, and a message quoting either would publish
    it. The start stops naming the file and the member, never a value of the key."""
    key = ECKey.generate_key("P-256", private=True).as_dict(private=True)
    pasted = ECKey.generate_key("P-256", private=True).as_dict(private=True)["d"]
    text = json.dumps({**key, "d": pasted})[:-1] + f', "d": {json.dumps(key["d"])}}}'
    path = tmp_path / "twice.jwk"
    path.write_text(text)
    with pytest.raises(IdentityConfigError) as error:
        IdentitySettings.from_mapping(
            {"providers": [_corp(client_key_file=str(path))]}, {}
        ).with_keys()
    message = str(error.value)
    assert message.startswith(f"identity.providers[0].client_key_file: {path}"), message
    assert "member 'd' twice" in message, message
    for value in (key["d"], pasted, key["x"], key["y"]):
        assert value not in message


def test_the_private_key_is_kept_out_of_every_repr(tmp_path):
    key = RSAKey.generate_key(2048)
    path = tmp_path / "bastion.pem"
    path.write_bytes(key.as_pem(private=True))
    settings = IdentitySettings.from_mapping(
        {"providers": [_corp(client_key_file=str(path), client_assertion_alg="PS256")]},
        {},
    ).with_keys()
    provider = settings.providers[0]
    assert provider.client_key.algorithms == ("PS256",)
    assert provider.client_key.kid == key.thumbprint()
    private = key.as_dict(private=True)
    for shown in (repr(settings), repr(provider), repr(provider.client_key)):
        for member in ("d", "p", "q"):
            assert private[member] not in shown
    assert "d" not in provider.client_key.public_jwk()


def test_bastion_serve_does_not_start_with_a_damaged_client_key_file(tmp_path):
    """`create_app` (what `bastion serve` runs before its event loop) reads the key: a damaged
    one stops the start with the file's name, the [identity] table's and the key's."""
    from bastion.server.app import create_app
    from bastion.server.config import ConfigError, ServerConfig

    key = tmp_path / "corp-client.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\ncut short\n")
    policy = tmp_path / "policy.polar"
    policy.write_text("actor User {}\n")
    config = ServerConfig(
        database=str(tmp_path / "bastion.db"),
        policy_file=str(policy),
        oauth={
            "issuer": "http://127.0.0.1:9",
            "key_dir": str(tmp_path / "keys"),
            "resources": [{"uri": "http://127.0.0.1:9/mcp/desk", "scopes": ["tools:read"]}],
        },
        identity={
            "providers": [
                {
                    "id": "corp",
                    "issuer": "https://login.acme.example",
                    "client_id": "bastion",
                    "token_endpoint_auth_method": "private_key_jwt",
                    "client_key_file": str(key),
                }
            ]
        },
    )
    with pytest.raises(ConfigError) as error:
        create_app(config)
    message = str(error.value)
    assert "[identity]: identity.providers[0].client_key_file:" in message, message
    assert f"{key} cannot be read as a PEM private key" in message and "cut short" not in message
