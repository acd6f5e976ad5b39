"""The authentication context class a provider login asks for and requires (OpenID Connect Core
1.0 §3.1.2.1 ``acr_values``; §3.1.3.7 step 11: "the Client SHOULD check that the asserted acr
Claim Value is appropriate"): ``acr_values`` is sent with the authorization request, and with
``required_acr`` the ID token's ``acr`` must be one of it, or nobody is signed in. The provider
is the real HTTP server of test_oidc_login_refusals.py, each test with a bastion of its own."""

from __future__ import annotations

import json

import pytest

from bastion.identity.providers import IdentityConfigError, IdentitySettings
from tests.oauth.support import free_socket, serve

from .test_oidc_id_token_keys import provider_login, signed_in
from .test_oidc_login_refusals import TestProvider, refused

REQUIRED = {"acr_values": ["urn:acme:mfa", "phr"], "required_acr": ["urn:acme:mfa", "phr"]}


@pytest.fixture(scope="module")
def idp():
    provider = TestProvider()
    with serve(provider.app, free_socket()) as url:
        provider.url = url
        yield provider


def _log_in(idp, person, client, **issue):
    query = person.sent_to_provider(client, "c")
    code = idp.issue("c", query, **issue)
    return query, person.back_from_provider("c", code=code, state=query["state"])


def test_the_acr_values_asked_for_are_sent_and_an_acr_among_them_signs_in(tmp_path, idp):
    with provider_login(tmp_path, idp, "c", **REQUIRED) as (b, client, person):
        query, response = _log_in(idp, person, client, acr="phr")
        assert query["acr_values"] == "urn:acme:mfa phr"
        assert signed_in(response), response.text


def test_no_acr_values_are_sent_unless_configured(tmp_path, idp):
    with provider_login(tmp_path, idp, "c") as (b, client, person):
        query, response = _log_in(idp, person, client, acr="anything")
        assert "acr_values" not in query
        assert signed_in(response), response.text


@pytest.mark.parametrize(
    ("acr", "shown"),
    [
        ("urn:acme:password", "'urn:acme:password'"),
        (None, "none"),  # the provider left it out: nothing asserted is not enough
        (["phr"], "'['phr']'"),  # not a string
        ("PHR", "'PHR'"),  # compared exactly
    ],
    ids=["another", "missing", "a-list", "other-case"],
)
def test_an_acr_not_required_signs_nobody_in_and_is_recorded(tmp_path, idp, acr, shown):
    with provider_login(tmp_path, idp, "c", **REQUIRED) as (b, client, person):
        sessions = b.db.execute("SELECT COUNT(*) FROM oauth_sessions")[0][0]
        _, response = _log_in(idp, person, client, acr=acr)
        refused(
            response,
            403,
            f"authentication context (acr) {shown}, and this server requires one of"
            " ['urn:acme:mfa', 'phr']",
        )
        assert b.db.execute("SELECT COUNT(*) FROM oauth_sessions")[0][0] == sessions
        assert "c:ada" not in [u[0] for u in b.server.store.users()]
        [(detail,)] = b.db.execute("SELECT detail FROM audit_events WHERE kind = 'login.refused'")
        recorded = json.loads(detail)
        assert recorded["reason"] == "acr" and recorded["provider"] == "c"
        assert not b.db.execute("SELECT 1 FROM audit_events WHERE kind = 'login.succeeded'")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("acr_values", "urn:acme:mfa"),  # a string, not a list
        ("acr_values", []),
        ("acr_values", [""]),
        ("acr_values", ["urn:acme:mfa phr"]),  # would send two values
        ("required_acr", "phr"),
        ("required_acr", []),
        ("required_acr", ["phr", 2]),
        ("required_acr", ["line\nbreak"]),
    ],
)
def test_a_wrong_acr_setting_is_refused_at_start(key, value):
    table = {
        "providers": [
            {
                "id": "x",
                "issuer": "https://i.example",
                "client_id": "c",
                "token_endpoint_auth_method": "none",
                key: value,
            }
        ]
    }
    with pytest.raises(IdentityConfigError) as error:
        IdentitySettings.from_mapping(table, {})
    assert f"identity.providers[0].{key}: a list of acr values without spaces" in str(error.value)
