"""The two token-exchange settings of ``[oauth]``: defaults, and values refused with the key
that holds them."""

from __future__ import annotations

import pytest

from bastion.oauth.settings import OAuthSettings, SettingsError

BASE = {
    "issuer": "http://127.0.0.1:8000",
    "key_dir": "/tmp/keys",
    "resources": [{"uri": "http://127.0.0.1:8000/mcp/studio", "scopes": ["files:read"]}],
}


def test_the_defaults_are_five_minutes_and_four_delegations():
    settings = OAuthSettings.from_mapping(BASE)
    assert settings.exchanged_token_seconds == 300
    assert settings.max_delegation_depth == 4


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("exchanged_token_seconds", 0, "oauth.exchanged_token_seconds"),
        ("exchanged_token_seconds", -5, "oauth.exchanged_token_seconds"),
        ("exchanged_token_seconds", "300", "oauth.exchanged_token_seconds"),
        ("max_delegation_depth", 17, "oauth.max_delegation_depth"),
        ("max_delegation_depth", True, "oauth.max_delegation_depth"),
        ("max_delegation_depth", -1, "oauth.max_delegation_depth"),
    ],
)
def test_a_bad_value_is_refused_with_its_key(key, value, named):
    with pytest.raises(SettingsError, match=named):
        OAuthSettings.from_mapping({**BASE, key: value})


def test_zero_delegations_is_allowed_and_turns_exchange_off():
    assert OAuthSettings.from_mapping({**BASE, "max_delegation_depth": 0}).max_delegation_depth == 0
