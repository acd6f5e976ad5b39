"""The [oauth] table: defaults, and a clear error naming the key for each wrong value."""

from __future__ import annotations

import pytest

from bastion.oauth import OAuthSettings, SettingsError

BASE = {
    "issuer": "https://auth.example.com",
    "key_dir": "/var/lib/bastion/keys",
    "resources": [{"uri": "https://mcp.example.com/mcp", "scopes": ["tools:read"]}],
}


def test_defaults_are_safe():
    settings = OAuthSettings.from_mapping(BASE)
    assert settings.registration == "open"
    assert settings.access_token_seconds == 300
    assert settings.client_metadata.allow_private_addresses is False
    assert settings.client_assertion.allow_private_addresses is False
    assert settings.client_metadata.max_bytes == 5120
    assert settings.client_metadata.timeout_seconds == 5.0
    assert settings.client_metadata.failure_cache_seconds == 30
    assert settings.client_metadata.min_cache_seconds == 5
    assert settings.client_metadata.max_concurrent_fetches_per_host == 2
    assert settings.client_metadata.max_concurrent_fetches == 16
    assert settings.client_metadata.max_documents_per_host == 20
    assert settings.login.max_failures_per_user == 5
    assert settings.login.max_failures_per_address == 20
    assert settings.login.max_failures_per_request == 3
    assert settings.login.max_concurrent_password_checks == 4
    assert settings.open_registration.max_per_address == 20
    assert settings.refusal_audit.window_seconds == 60
    assert settings.scopes_supported == ["tools:read"]


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"issuer": "http://auth.example.com"}, "oauth.issuer"),
        (
            {"client_assertion": {"allow_private_addresses": 1}},
            "oauth.client_assertion.allow_private_addresses",
        ),
        ({"issuer": "https://auth.example.com?x=1"}, "oauth.issuer"),
        ({"issuer": None}, "oauth.issuer"),
        ({"resources": []}, "oauth.resources"),
        ({"resources": [{"uri": "mcp"}]}, "oauth.resources[0].uri"),
        ({"resources": [{"uri": "https://a/mcp", "scopes": ["a b"]}]}, "oauth.resources[0].scopes"),
        (
            {
                "resources": [
                    {"uri": "https://a/mcp", "scopes": ["a"], "scope_descriptions": {"b": "B"}}
                ]
            },
            "oauth.resources[0].scope_descriptions",
        ),
        (
            {
                "resources": [
                    {"uri": "https://a/mcp", "scopes": ["a"], "scope_descriptions": {"a": ""}}
                ]
            },
            "oauth.resources[0].scope_descriptions.a",
        ),
        (
            {"resources": [{"uri": "https://a/mcp", "scopes": ["a"], "scope_description": {}}]},
            r"oauth.resources[0]: unknown keys",
        ),
        (
            {"resources": [{"uri": "https://a/mcp", "scopes": ["a"], "name": 7}]},
            "oauth.resources[0].name",
        ),
        ({"key_dir": ""}, "oauth.key_dir"),
        ({"registration": "anyone"}, "oauth.registration"),
        ({"registration": "initial_access_token"}, "oauth.initial_access_tokens"),
        ({"initial_access_tokens": ["short"]}, "oauth.initial_access_tokens"),
        ({"access_token_seconds": -1}, "oauth.access_token_seconds"),
        ({"access_token_seconds": "300"}, "oauth.access_token_seconds"),
        ({"client_metadata": {"allow_everything": True}}, "oauth.client_metadata"),
        ({"client_metadata": {"timeout_seconds": 0}}, "oauth.client_metadata.timeout_seconds"),
        (
            {"client_metadata": {"max_concurrent_fetches_per_host": 0}},
            "oauth.client_metadata.max_concurrent_fetches_per_host",
        ),
        (
            {"client_metadata": {"max_concurrent_fetches": 0}},
            "oauth.client_metadata.max_concurrent_fetches",
        ),
        (
            {"client_metadata": {"failure_cache_seconds": "30"}},
            "oauth.client_metadata.failure_cache_seconds",
        ),
        # 0 would let a document served with no-store be fetched for every request naming it.
        ({"client_metadata": {"min_cache_seconds": 0}}, "oauth.client_metadata.min_cache_seconds"),
        (
            {"client_metadata": {"max_documents_per_host": 1e9}},
            "oauth.client_metadata.max_documents_per_host",
        ),
        ({"client_metadata": {"enabled": "yes"}}, "oauth.client_metadata.enabled"),
        ({"login": {"max_failures_per_user": 0}}, "oauth.login.max_failures_per_user"),
        ({"login": {"backoff_seconds": 1.5}}, "oauth.login.backoff_seconds"),
        ({"login": {"lockout": True}}, "oauth.login: unknown keys"),
        ({"login": []}, "oauth.login: a table"),
        ({"open_registration": {"max_per_address": -1}}, "oauth.open_registration.max_per_address"),
        ({"refusal_audit": {"window_seconds": "60"}}, "oauth.refusal_audit.window_seconds"),
        (
            {"refusal_audit": {"repeat_write_seconds": 0}},
            "oauth.refusal_audit.repeat_write_seconds",
        ),
        ({"issuer_url": "https://x"}, "unknown keys"),
    ],
)
def test_wrong_values_name_their_key(change, key):
    table = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    with pytest.raises(SettingsError, match=key.replace("[", r"\[").replace("]", r"\]")):
        OAuthSettings.from_mapping(table)


def test_http_issuer_is_allowed_on_loopback_only():
    settings = OAuthSettings.from_mapping({**BASE, "issuer": "http://127.0.0.1:8000/"})
    assert settings.issuer == "http://127.0.0.1:8000"


def test_a_resource_has_a_name_and_describes_its_scopes():
    resource = {
        "uri": "https://mcp.example.com/mcp",
        "scopes": ["customers:read", "customers:write"],
        "name": "Customer desk",
        "scope_descriptions": {"customers:read": "Read customer records"},
    }
    settings = OAuthSettings.from_mapping({**BASE, "resources": [resource]})
    desk = settings.resource("https://mcp.example.com/mcp")
    assert desk.name == "Customer desk"
    assert desk.describe("customers:read") == "Read customer records"
    assert desk.describe("customers:write") is None
