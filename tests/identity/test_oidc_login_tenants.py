"""Signing in through a multi-tenant OpenID provider (Entra ID's ``/organizations/v2.0``), whose
discovery document's ``issuer`` is a template (``https://login.microsoftonline.com/{tenantid}/v2.0``)
and whose ID tokens name their tenant (``tid``) and that tenant's own issuer: taken only for the
tenants a provider lists (``tenants``), and a ``sub`` is a person only within its tenant. The
provider is the test-written one of test_oidc_login_refusals.py (its ID tokens are made as each
test asks, so that tokens no real provider would send can be tried); the happy path with the
certified oidc-provider, one instance per tenant behind Entra's alias, is in
test_oidc_login_tenants_certified.py."""

from __future__ import annotations

import html
import json

import httpx
import pytest

from bastion.identity.providers import IdentityConfigError, IdentitySettings
from tests.oauth.support import free_socket, serve

from .oidc_support import Person, bastion_with_providers
from .test_oidc_login_refusals import SECRETS, TestProvider

TENANT_A = "6f1d3b0e-0c55-4a8e-9a57-3f0b5e2c4a0a"
TENANT_B = "6f1d3b0e-0c55-4a8e-9a57-3f0b5e2c4a0b"
STRANGER = "6f1d3b0e-0c55-4a8e-9a57-3f0b5e2c4a0f"


def template(idp) -> str:
    return f"{idp.url}/{{tenantid}}/v2.0"


def tenant_issuer(idp, tenant: str) -> str:
    return f"{idp.url}/{tenant}/v2.0"


@pytest.fixture(scope="module")
def idp():
    provider = TestProvider()
    with serve(provider.app, free_socket()) as url:
        provider.url = url
        # Its "m" and "c" answer as Entra's /organizations/v2.0 does; "s" is one tenant's own.
        for name in ("m", "c"):
            provider.metadata[name] = {"issuer": template(provider)}
        yield provider


def identity(idp) -> dict:
    return {
        "providers": [
            {
                "id": "m",
                "name": "Many Tenants",
                "issuer": idp.issuer("m"),
                "client_id": "bastion-m",
                "client_secret": SECRETS["bastion-m"],
                "tenants": [TENANT_A, TENANT_B],
            },
            {
                "id": "s",
                "issuer": idp.issuer("s"),
                "client_id": "bastion-s",
                "client_secret": SECRETS["bastion-s"],
            },
            {
                # Configured as a one-tenant provider, answering with a template.
                "id": "c",
                "issuer": idp.issuer("c"),
                "client_id": "bastion-c",
                "client_secret": SECRETS["bastion-c"],
            },
        ],
    }


@pytest.fixture(scope="module")
def bastion(tmp_path_factory, idp):
    directory = tmp_path_factory.mktemp("oidc-tenants")
    with bastion_with_providers(
        str(directory / "bastion.db"), str(directory / "keys"), free_socket(), identity(idp)
    ) as b:
        yield b


@pytest.fixture
def person(bastion):
    p = Person(bastion)
    yield p
    p.close()


@pytest.fixture(scope="module")
def client(bastion):
    return bastion.register()


@pytest.fixture
def alone(tmp_path, idp):
    """A bastion of its own, for a test that reads its refusal's audit record (the refusals of
    one kind, address and reason are written once a window: `bastion.audit.refusals`); with a
    person and a client of it."""
    with bastion_with_providers(
        str(tmp_path / "bastion.db"), str(tmp_path / "keys"), free_socket(), identity(idp)
    ) as b:
        p = Person(b)
        try:
            yield b, p, b.register()
        finally:
            p.close()


def users(bastion) -> list[str]:
    return [u[0] for u in bastion.server.store.users()]


def refused(response: httpx.Response, status: int, words: str) -> str:
    text = html.unescape(response.text)
    assert response.status_code == status, text
    assert words in text, text
    assert "bastion_session" not in response.headers.get("set-cookie", "")
    return text


def last_event(bastion, kind: str) -> dict:
    return bastion.server.audit.events(kind, limit=1)[0].detail


def sign_in(idp, person, client, provider: str = "m", iss_param: str | None = None, **claims):
    """A login at ``provider`` whose ID token says ``claims``: (the response, the ID token)."""
    query = person.sent_to_provider(client, provider)
    code = idp.issue(provider, query, **claims)
    id_token = idp.codes[code]["id_token"]
    params = {"code": code, "state": query["state"]}
    if iss_param is not None:
        params["iss"] = iss_param
    return person.back_from_provider(provider, **params), id_token


# -- the way it works ------------------------------------------------------------------------


def test_a_person_of_a_listed_tenant_signs_in_and_the_tenant_is_recorded(bastion, idp, client):
    person = Person(bastion)
    try:
        response, _ = sign_in(
            idp, person, client, iss=tenant_issuer(idp, TENANT_A), tid=TENANT_A, sub="ada"
        )
        assert response.status_code == 200, response.text
        assert f"Signed in as <strong>m:{TENANT_A}:ada</strong>" in response.text
    finally:
        person.close()
    event = last_event(bastion, "login.succeeded")
    assert (event["provider"], event["tenant"]) == ("m", TENANT_A)


def test_the_same_sub_in_two_tenants_is_two_users(bastion, idp, client):
    for tenant in (TENANT_A, TENANT_B, TENANT_A):
        person = Person(bastion)
        try:
            response, _ = sign_in(
                idp, person, client, iss=tenant_issuer(idp, tenant), tid=tenant, sub="kim"
            )
            assert response.status_code == 200, response.text
            assert f"Signed in as <strong>m:{tenant}:kim</strong>" in response.text
        finally:
            person.close()
    assert {f"m:{TENANT_A}:kim", f"m:{TENANT_B}:kim"} <= set(users(bastion))
    accounts = bastion.db.execute(
        "SELECT subject, username FROM identity_accounts WHERE provider = 'm' AND username LIKE ?"
        " ORDER BY username",
        ("%:kim",),
    )
    assert accounts == [
        (json.dumps([TENANT_A, "kim"]), f"m:{TENANT_A}:kim"),
        (json.dumps([TENANT_B, "kim"]), f"m:{TENANT_B}:kim"),
    ]


def test_the_rfc_9207_iss_of_the_answer_is_the_tenants_own(bastion, idp, person, client):
    response, _ = sign_in(
        idp,
        person,
        client,
        iss_param=tenant_issuer(idp, TENANT_B),
        iss=tenant_issuer(idp, TENANT_B),
        tid=TENANT_B,
        sub="lee",
    )
    assert response.status_code == 200, response.text


# -- what must be refused -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("iss", "tid", "reason", "words"),
    [
        # A tenant the operator did not list: another company at the same provider.
        (f"URL/{STRANGER}/v2.0", STRANGER, "tenant", f"tenant '{STRANGER}', which is not one"),
        (f"URL/{TENANT_A}/v2.0", None, "tenant", "names no tenant (tid)"),
        (f"URL/{TENANT_A}/v2.0", [TENANT_A], "tenant", "names no tenant (tid)"),
        (f"URL/{TENANT_A}/v2.0", "", "tenant", "names no tenant (tid)"),
        # The issuer of another tenant than the one it names.
        (f"URL/{TENANT_B}/v2.0", TENANT_A, "iss", f"is from 'URL/{TENANT_B}/v2.0'"),
        (f"URL/{STRANGER}/v2.0", TENANT_A, "iss", f"is from 'URL/{STRANGER}/v2.0'"),
        # The template itself, its alias, or more than the tenant's issuer: no other match.
        ("URL/{tenantid}/v2.0", TENANT_A, "iss", "is from 'URL/{tenantid}/v2.0'"),
        ("URL/m", TENANT_A, "iss", "is from 'URL/m'"),
        (f"URL/{TENANT_A}/v2.0/x", TENANT_A, "iss", f"is from 'URL/{TENANT_A}/v2.0/x'"),
        (f"URL/{TENANT_A}/v2", TENANT_A, "iss", f"is from 'URL/{TENANT_A}/v2'"),
        (f"URL/{TENANT_A.upper()}/v2.0", TENANT_A, "iss", "is from"),
    ],
    ids=lambda v: str(v).replace("URL/", "")[:24],
)
def test_an_id_token_outside_the_listed_tenants_signs_nobody_in(
    alone, idp, iss, tid, reason, words
):
    bastion, person, client = alone
    before = users(bastion)
    response, id_token = sign_in(
        idp, person, client, iss=iss.replace("URL", idp.url), tid=tid, sub="mallory"
    )
    words = words.replace("URL", idp.url)
    text = refused(response, 403 if reason == "tenant" else 400, words)
    assert users(bastion) == before
    event = last_event(bastion, "login.refused")
    assert (event["provider"], event["reason"]) == ("m", reason)
    assert words in event["description"]
    for part in id_token.split("."):  # no part of the token is shown or recorded
        assert part not in text and part not in json.dumps(event)


def test_the_answers_iss_naming_another_tenant_than_the_id_token_is_a_mix_up(alone, idp):
    bastion, person, client = alone
    response, _ = sign_in(
        idp,
        person,
        client,
        iss_param=tenant_issuer(idp, TENANT_B),
        iss=tenant_issuer(idp, TENANT_A),
        tid=TENANT_A,
        sub="mallory",
    )
    refused(response, 400, f"The answer comes from {tenant_issuer(idp, TENANT_B)}")
    assert last_event(bastion, "login.refused")["reason"] == "mix_up"


def test_the_answers_iss_naming_an_unlisted_tenant_is_refused_before_the_code_is_redeemed(
    bastion, idp, person, client
):
    query = person.sent_to_provider(client, "m")
    code = idp.issue("m", query, iss=tenant_issuer(idp, STRANGER), tid=STRANGER)
    response = person.back_from_provider(
        "m", code=code, state=query["state"], iss=tenant_issuer(idp, STRANGER)
    )
    refused(
        response,
        400,
        f"The answer comes from {tenant_issuer(idp, STRANGER)}, the issuer of none of the"
        " tenants taken",
    )
    assert code not in idp.redeemed


def test_a_one_tenant_provider_takes_no_token_of_a_tenants_issuer(bastion, idp, person, client):
    """A provider configured with a tenant's own issuer (no template): an ID token naming another
    issuer, even with a ``tid``, is refused as before."""
    response, _ = sign_in(
        idp, person, client, "s", iss=tenant_issuer(idp, TENANT_A), tid=TENANT_A, sub="ada"
    )
    refused(response, 400, f"is from '{tenant_issuer(idp, TENANT_A)}', not the provider")
    response, _ = sign_in(idp, person, client, "s", tid=STRANGER, sub="ada")
    assert response.status_code == 200, response.text  # its own iss: tid is not read
    assert "Signed in as <strong>s:ada</strong>" in response.text


def test_a_template_issuer_is_refused_for_a_provider_that_lists_no_tenants(
    bastion, idp, person, client
):
    response = person.choose(person.open_authorization(client), "c")
    text = refused(response, 503, "{tenantid}")
    assert "tenants" in text and "[[identity.providers]]" in text
    event = last_event(bastion, "login.refused")
    assert (event["provider"], event["reason"]) == ("c", "provider_unavailable")
    assert "{tenantid}" in event["description"]


def test_a_provider_listing_tenants_whose_metadata_names_one_issuer_is_refused(tmp_path, idp):
    """``tenants`` on a provider whose discovery document names its own issuer (no template): a
    mistake of the configuration, told as such rather than ignored."""
    identity = {
        "providers": [
            {
                "id": "a",
                "issuer": idp.issuer("a"),
                "client_id": "bastion-a",
                "client_secret": SECRETS["bastion-a"],
                "tenants": [TENANT_A],
            }
        ]
    }
    with bastion_with_providers(
        str(tmp_path / "b.db"), str(tmp_path / "keys"), free_socket(), identity
    ) as b:
        person = Person(b)
        try:
            response = person.choose(person.open_authorization(b.register()), "a")
            text = refused(response, 503, "names one issuer")
            assert "remove tenants" in text
        finally:
            person.close()


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"tenants": []}, "tenants: a list of 1 to"),
        ({"tenants": TENANT_A}, "tenants: a list of 1 to"),
        ({"tenants": [TENANT_A, TENANT_A]}, "tenants: a tenant appears more than once"),
        ({"tenants": ["a/b"]}, "tenants: a list of 1 to"),
        ({"tenants": ["a b"]}, "tenants: a list of 1 to"),
        ({"tenants": ["{tenantid}"]}, "tenants: a list of 1 to"),
        ({"tenants": ["x" * 129]}, "tenants: a list of 1 to"),
        ({"tenants": ["*"]}, "tenants: a list of 1 to"),
        (
            {"issuer": "https://login.example/{tenantid}/v2.0", "tenants": [TENANT_A]},
            "issuer: the URL its discovery document is read from",
        ),
        (
            {"user_prefix": "corp:{tenant}:"},
            "user_prefix: {tenant} is only for a table with tenants",
        ),
        (
            {"tenants": [TENANT_A], "user_prefix": "{tenant}{tenant}"},
            "user_prefix: {tenant} at most once",
        ),
    ],
    ids=lambda v: json.dumps(v)[:50],
)
def test_a_wrong_tenants_setting_is_refused_at_start_naming_its_key(changes, words):
    table = {
        "id": "entra",
        "issuer": "https://login.example/organizations/v2.0",
        "client_id": "c",
        "client_secret": "s3cr3t-value",
        **changes,
    }
    with pytest.raises(IdentityConfigError) as error:
        IdentitySettings.from_mapping({"providers": [table]}, {})
    assert words in str(error.value)
    assert str(error.value).startswith("identity.providers[0].")


def test_a_provider_with_tenants_names_its_users_per_tenant_by_default():
    table = {
        "id": "entra",
        "issuer": "https://login.microsoftonline.com/organizations/v2.0",
        "client_id": "c",
        "client_secret": "s3cr3t-value",
        "tenants": [TENANT_A, TENANT_B],
    }
    [provider] = IdentitySettings.from_mapping({"providers": [table]}, {}).providers
    assert provider.tenants == (TENANT_A, TENANT_B)
    assert provider.user_prefix == "entra:{tenant}:"
    # Without tenants, as before: a configuration that started before still starts (one with a
    # multi-tenant issuer is refused at its metadata's first read, as it always was).
    plain = {k: v for k, v in table.items() if k != "tenants"}
    [provider] = IdentitySettings.from_mapping({"providers": [plain]}, {}).providers
    assert (provider.tenants, provider.user_prefix) == ((), "entra:")
