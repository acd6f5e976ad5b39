"""Settings that could only fail when used (at the first call, by a user) are refused where they
are read, at start, naming the setting and never the secret value they hold: a header HTTP
cannot carry, a credential with a control character, a URL no request can be sent to, a stdio
upstream's command line no program can be given."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bastion.connections.settings import ConnectionSettingsError, UpstreamOAuth
from bastion.gateway.config import GatewayConfig
from bastion.gateway.http1 import Http1Client, HttpClientError
from bastion.identity.providers import IdentityConfigError, IdentitySettings
from bastion.server.config import ConfigError, ServerConfig
from bastion.signals.settings import SignalsConfigError, SsfSettings

SECRET = "s3cret-value-0123456789"
# A secret as the environment may hold it: a line break that would start another header, a
# NUL, a control character, a character Latin-1 cannot encode.
BAD_SECRETS = [
    SECRET + "\n",
    SECRET + "\r\nx-injected: 1",
    SECRET + "\0",
    SECRET + "\x01",
    "€" + SECRET,
]


def _upstream(**keys) -> dict:
    return {"upstreams": [{"name": "files", "url": "https://files.example.com/mcp", **keys}]}


@pytest.mark.parametrize("secret", BAD_SECRETS)
def test_an_upstream_header_from_the_environment_that_http_cannot_carry_is_refused_at_load(secret):
    table = _upstream(headers={"X-Files-Key": "Bearer ${FILES_KEY}"})
    with pytest.raises(ConfigError) as refused:
        GatewayConfig.from_mapping(table, env={"FILES_KEY": secret})
    message = str(refused.value)
    assert "gateway.upstreams[0].headers.X-Files-Key (files)" in message
    assert "control character" in message
    assert SECRET not in message


@pytest.mark.parametrize("name", ["X Key", "X-Key:", "", "Ключ", "X\nKey"])
def test_an_upstream_header_name_that_is_not_an_http_token_is_refused_at_load(name):
    with pytest.raises(ConfigError, match="is not an HTTP field name"):
        GatewayConfig.from_mapping(_upstream(headers={name: "v"}), env={})


@pytest.mark.parametrize(
    ("table", "setting"),
    [
        ({"upstreams": [{"name": "files\n", "url": "https://files.example.com/mcp"}]}, "name"),
        ({**_upstream(), "redis_prefix": "bastion\n"}, "gateway.redis_prefix"),
    ],
)
def test_a_name_with_a_line_break_at_its_end_is_refused_at_load(table, setting):
    """A name is matched whole: a pattern's "$" also matches before a final line break."""
    with pytest.raises(ConfigError, match=setting):
        GatewayConfig.from_mapping(table, env={})


def test_an_upstream_header_value_is_stripped_of_surrounding_spaces_and_keeps_inner_ones():
    config = GatewayConfig.from_mapping(
        _upstream(headers={"Authorization": " Bearer ${KEY}\t", "X-Note": "café au lait"}),
        env={"KEY": SECRET + " "},
    )
    assert dict(config.upstreams[0].headers) == {
        "Authorization": f"Bearer {SECRET}",
        "X-Note": "café au lait",
    }


@pytest.mark.parametrize("value", ["a\x01b", "a\x7fb", "€"])
def test_the_gateway_never_sends_a_header_http_does_not_allow(value):
    """The check where a request's head is encoded is the one settings are read with: a
    control character passed it, and a character beyond Latin-1 raised UnicodeEncodeError."""
    client = Http1Client("http://127.0.0.1:9/mcp")
    with pytest.raises(HttpClientError, match="HTTP does not allow in a header value"):
        client.head("POST", {"authorization": value})
    with pytest.raises(HttpClientError, match="is not an HTTP field name"):
        client.head("POST", {"x key": "v"})


@pytest.mark.parametrize("key", ["bearer_env", "push_token_env"])
@pytest.mark.parametrize("secret", BAD_SECRETS[:2])
def test_a_shared_signals_token_http_cannot_carry_is_refused_at_load(key, secret):
    transmitter = {
        "name": "idp",
        "issuer": "https://idp.example.com",
        "audience": "https://bastion.example.com",
        "push_token_env": "PUSH",
        key: "TOKEN",
    }
    with pytest.raises(SignalsConfigError) as refused:
        SsfSettings.from_table(
            {"transmitters": [transmitter]},
            issuer="https://bastion.example.com",
            env={"TOKEN": secret, "PUSH": "p" * 20},
        )
    message = str(refused.value)
    assert f"#1.{key}: the environment variable TOKEN holds a character" in message
    assert SECRET not in message


@pytest.mark.parametrize("secret", BAD_SECRETS[:2])
def test_an_oauth_client_secret_with_a_control_character_is_refused_at_load(secret):
    env = {"SECRET": secret}
    provider = {
        "id": "corp",
        "issuer": "https://login.example.com",
        "client_id": "bastion",
        "client_secret": "${SECRET}",
    }
    with pytest.raises(IdentityConfigError) as refused:
        IdentitySettings.from_mapping({"providers": [provider]}, env)
    assert "identity.providers[0].client_secret holds a character" in str(refused.value)
    assert SECRET not in str(refused.value)

    upstream = {"auth": "per_user", "oauth": {"client_id": "b", "client_secret": "${SECRET}"}}
    with pytest.raises(ConfigError) as refused:
        GatewayConfig.from_mapping(_upstream(**upstream), env=env)
    assert "gateway.upstreams[0].oauth.client_secret holds a character" in str(refused.value)
    assert SECRET not in str(refused.value)

    issuer = {
        "issuer": "https://login.example.com",
        "audiences": {"files": "api://files"},
        "introspection_client_id": "bastion",
        "introspection_client_secret": "${SECRET}",
    }
    with pytest.raises(ConfigError) as refused:
        GatewayConfig.from_mapping({**_upstream(), "trusted_issuers": [issuer]}, env=env)
    message = str(refused.value)
    assert "gateway.trusted_issuers[0].introspection_client_secret holds a character" in message
    assert SECRET not in message


def test_an_upstream_authorization_server_over_plain_http_is_refused_at_load():
    """It was refused at the first user's connection only (`UpstreamOAuth._unusable`)."""
    with pytest.raises(ConnectionSettingsError, match="oauth.issuer must be an https URL"):
        UpstreamOAuth.from_mapping({"issuer": "http://login.example.com"}, "oauth")


def test_an_admin_key_a_client_cannot_send_is_refused_at_load(tmp_path):
    env = {"BASTION_ADMIN_KEY": SECRET * 2 + "\n", "BASTION_CONFIG": str(tmp_path / "none")}
    with pytest.raises(ConfigError) as refused:
        ServerConfig.load(None, env=env)
    assert str(refused.value).startswith("BASTION_ADMIN_KEY: admin_key holds a character")
    assert SECRET not in str(refused.value)


@pytest.mark.parametrize(
    "url",
    [
        "https://files.example.com/m cp",
        "https://files.example.com/mcp\n",
        "https://files.exa\tmple.com/mcp",
        "https://files.example.com:99999/mcp",
        "http://127.0.0.1:70000/mcp",
    ],
)
def test_an_upstream_url_no_request_can_be_sent_to_is_refused_at_load(url):
    with pytest.raises(ConfigError, match=r"gateway.upstreams\[0\].url is not a valid URL"):
        GatewayConfig.from_mapping(
            {"upstreams": [{"name": "files", "url": url, "allow_http": True}]}, env={}
        )


def test_a_shared_signals_issuer_no_request_can_be_sent_to_is_refused_at_load():
    transmitter = {
        "name": "idp",
        "issuer": "https://idp.example.com/\x01",
        "audience": "a",
        "delivery": "poll",
    }
    with pytest.raises(SignalsConfigError, match=r"#1.issuer is not a valid URL"):
        SsfSettings.from_table({"transmitters": [transmitter]}, env={})


@pytest.mark.parametrize(
    ("keys", "named"),
    [
        ({"args": ["server.py", "a\0b"]}, r"gateway.upstreams\[0\].args\[1\] holds a NUL"),
        ({"command": "py\0thon"}, r"gateway.upstreams\[0\].command holds a NUL"),
        ({"cwd": "dir\0"}, r"gateway.upstreams\[0\].cwd holds a NUL"),
        ({"env": {"A=B": "x"}}, r"gateway.upstreams\[0\].env: 'A=B' is not an environment"),
        ({"env": {"": "x"}}, r"gateway.upstreams\[0\].env: '' is not an environment"),
        ({"env": {"A": "x\0y"}}, r"gateway.upstreams\[0\].env.A holds a NUL"),
    ],
)
def test_a_stdio_command_line_no_program_can_be_given_is_refused_at_load(keys, named):
    """The operating system takes no NUL and no variable named with '=': the process failed to
    start at the first call (ValueError, not even the upstream's own error)."""
    upstream = {"name": "desk", "command": "python", **keys}
    with pytest.raises(ConfigError, match=named):
        GatewayConfig.from_mapping({"upstreams": [upstream]}, env={})


def test_bastion_serve_refuses_an_upstream_header_from_the_environment_http_cannot_carry(tmp_path):
    config = tmp_path / "bastion.toml"
    config.write_text(
        f"""\
[server]
database = "{tmp_path}/bastion.db"

[oauth]
issuer = "http://127.0.0.1:8000"
key_dir = "{tmp_path}/keys"

[[oauth.resources]]
uri = "http://127.0.0.1:8000/mcp/files"
scopes = ["mcp"]

[[gateway.upstreams]]
name = "files"
url = "https://files.example.com/mcp"
headers = {{ Authorization = "Bearer ${{FILES_KEY}}" }}
"""
    )
    bastion = shutil.which("bastion", path=str(Path(sys.executable).parent))
    env = {**os.environ, "FILES_KEY": SECRET + "\r\nx-injected: 1"}
    ran = subprocess.run(
        [bastion or "bastion", "serve", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode != 0
    assert "gateway.upstreams[0].headers.Authorization (files) holds a character" in ran.stderr
    assert SECRET not in ran.stderr + ran.stdout


@pytest.mark.parametrize(
    ("table", "named"),
    [
        (
            "[oauth]\nissuer = 'https://auth.example.com/a b'\nkey_dir = 'keys'\n"
            "[[oauth.resources]]\nuri = 'https://mcp.example.com/mcp'\nscopes = ['mcp']\n",
            "oauth.issuer is not a valid URL",
        ),
        ('[server]\npublic_url = "https://pdp.example.com\\u0001"\n', "public_url is not a valid"),
        (
            "[gateway]\npublic_url = 'https://mcp.example.com:70000'\n",
            "gateway.public_url is not a valid URL",
        ),
    ],
)
def test_bastions_own_url_that_no_header_or_link_can_carry_is_refused_at_load(
    tmp_path, table, named
):
    """bastion's issuer and public URLs are in the headers (WWW-Authenticate) and links it
    sends: one with a space or a control character failed there, at the first request."""
    from bastion.gateway.config import GatewayConfig
    from bastion.oauth.settings import OAuthSettings

    file = tmp_path / "bastion.toml"
    file.write_text(table)
    with pytest.raises(ValueError, match=named):
        config = ServerConfig.load(file, env={})
        if config.oauth:
            OAuthSettings.from_mapping(config.oauth)
        GatewayConfig.from_mapping(config.gateway, env={})
