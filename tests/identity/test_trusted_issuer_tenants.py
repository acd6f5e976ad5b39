"""Trusted issuers of many tenants (Entra ID's ``/organizations/v2.0``): a ``[[gateway.trusted_issuers]]``
table whose ``issuer`` is a multi-tenant endpoint, whose metadata names the issuer template
(``https://login.microsoftonline.com/{tenantid}/v2.0``), and whose access tokens name their tenant
(``tid``) and that tenant's own issuer (``iss``): taken only for the ``tenants`` the table lists,
each tenant's ``sub`` a person of that tenant only. The issuer is a real HTTP server in this file
(discovery documents and a key set), its tokens sent to bastion's gateway as the trusted issuers'
tests do (test_trusted_issuers.py), and to `TrustedIssuers` alone where the gateway adds nothing."""

from __future__ import annotations

import json
import re
import time
import uuid

import anyio
import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import ECKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bastion.audit.log import AuditLog
from bastion.audit.refusals import RefusalLog
from bastion.db import Database
from bastion.identity.accounts import MIGRATIONS as IDENTITY_MIGRATIONS
from bastion.identity.accounts import bound_elsewhere
from bastion.identity.trusted_issuers import (
    IssuerUnavailable,
    TrustedIssuers,
    parse_trusted_issuers,
)
from bastion.oauth.errors import InvalidToken
from bastion.server.config import ConfigError
from tests.gateway.support import start
from tests.oauth.support import ANY_KID, free_socket, serve

from .test_trusted_issuers import CALL, HEADERS, users_command

TENANT_A = "6f1d3b0e-0c55-4a8e-9a57-3f0b5e2c4a0a"
TENANT_B = "6f1d3b0e-0c55-4a8e-9a57-3f0b5e2c4a0b"
STRANGER = "6f1d3b0e-0c55-4a8e-9a57-3f0b5e2c4a0f"


class MultiTenantIssuer:
    """Entra ID as its access tokens reach a resource: ``/organizations/v2.0`` and
    ``/common/v2.0`` publish discovery documents whose ``issuer`` is the template
    ``<url>/{tenantid}/v2.0``; ``/corp/v2.0`` the template ``<url>/corp/{tenantid}/v2.0`` (a
    second multi-tenant table at the same origin); ``/<tenant>/v2.0`` one tenant's own issuer.
    One key set signs every tenant's tokens, as Entra's does."""

    __test__ = False

    def __init__(self) -> None:
        self.keys = {"k1": ECKey.generate_key("P-256", parameters={"kid": "k1"})}
        self.stranger_key = ECKey.generate_key("P-256", parameters={"kid": "k1"})
        self.url = ""
        self.app = Starlette(
            routes=[
                Route("/{alias}/v2.0/.well-known/openid-configuration", self.discovery),
                Route("/jwks", self.jwks),
            ]
        )

    def template(self, alias: str = "organizations") -> str:
        if alias == "corp":
            return f"{self.url}/corp/{{tenantid}}/v2.0"
        return f"{self.url}/{{tenantid}}/v2.0"

    def issuer(self, alias: str) -> str:
        """The URL a table's ``issuer`` names: its discovery document is read there."""
        return f"{self.url}/{alias}/v2.0"

    def tenant_issuer(self, tenant: str, alias: str = "organizations") -> str:
        return self.template(alias).replace("{tenantid}", tenant)

    async def discovery(self, request: Request) -> Response:
        alias = request.path_params["alias"]
        many = alias in ("organizations", "common", "corp")
        issuer = self.template(alias) if many else self.issuer(alias)
        return JSONResponse({"issuer": issuer, "jwks_uri": f"{self.url}/jwks"})

    async def jwks(self, request: Request) -> Response:
        return JSONResponse({"keys": [k.as_dict(private=False) for k in self.keys.values()]})

    def token(self, tenant: str | None = TENANT_A, *, key=None, **claims) -> str:
        """An Entra v2 access token of ``tenant`` (its ``tid`` and its own ``iss``); ``claims``
        over those, None drops one."""
        now = int(time.time())
        body = {
            "iss": self.tenant_issuer(tenant if isinstance(tenant, str) and tenant else TENANT_A),
            "tid": tenant,
            "sub": "ada",
            "oid": "oid-ada",
            "aud": "api://desk-m",
            "azp": "helpdesk-agent",
            "scp": "customers:read",
            "iat": now,
            "exp": now + 300,
            "jti": uuid.uuid4().hex,
            **claims,
        }
        body = {k: v for k, v in body.items() if v is not None}
        header = {"alg": "ES256", "kid": "k1", "typ": "at+jwt"}
        return jwt.encode(header, body, key or self.keys["k1"], registry=ANY_KID)


@pytest.fixture(scope="module")
def idp():
    issuer = MultiTenantIssuer()
    with serve(issuer.app, free_socket()) as url:
        issuer.url = url
        yield issuer


def tables(idp) -> list[dict]:
    return [
        {
            "issuer": idp.issuer("organizations"),
            "audiences": {"deskhttp": "api://desk-m"},
            "tenants": [TENANT_A, TENANT_B],
        },
        {
            # A user_prefix without {tenant}: one claim value of two tenants names one user,
            # held by the first account (tenant, sub) to use it.
            "issuer": idp.issuer("corp"),
            "audiences": {"deskhttp": "api://desk-corp"},
            "tenants": [TENANT_A, TENANT_B],
            "user_prefix": "corp:",
        },
    ]


@pytest.fixture(scope="module")
def bastion(tmp_path_factory, idp):
    with start(tmp_path_factory.mktemp("tenants"), gateway={"trusted_issuers": tables(idp)}) as b:
        yield b


def call(bastion, token: str, server: str = "deskhttp") -> httpx.Response:
    return bastion.http.post(
        bastion.mcp_url(server), json=CALL, headers={**HEADERS, "authorization": f"Bearer {token}"}
    )


def decided_as(bastion, token: str) -> str:
    """The user the call of ``token`` was decided for (the call is taken; the policy decides)."""
    response = call(bastion, token)
    assert response.status_code == 200, response.text
    body = response.json()
    bastion.flush()
    return bastion.records.get(body["error"]["data"]["decision_id"]).principals[0]


def refused(response: httpx.Response) -> str:
    assert response.status_code == 401, response.text
    assert response.json()["error"] == "invalid_token"
    assert "invalid_token" in response.headers["www-authenticate"]
    assert "resource_metadata=" in response.headers["www-authenticate"]
    return response.json()["error_description"]


# -- taken ---------------------------------------------------------------------------------------


def test_a_listed_tenants_token_is_decided_as_that_tenants_user(bastion, idp):
    token = idp.token(TENANT_A, sub="ada")
    for _ in range(2):  # the second call is of the token remembered
        assert decided_as(bastion, token) == f'User{{"{TENANT_A}:ada"}}'
    assert decided_as(bastion, idp.token(TENANT_B, sub="bo")) == f'User{{"{TENANT_B}:bo"}}'


def test_the_same_sub_in_two_tenants_is_two_users(bastion, idp):
    """A ``sub`` (or ``oid``) is unique only within its tenant: another company's person of the
    same id is another person, never the same user."""
    a = decided_as(bastion, idp.token(TENANT_A, sub="kim"))
    b = decided_as(bastion, idp.token(TENANT_B, sub="kim"))
    assert (a, b) == (f'User{{"{TENANT_A}:kim"}}', f'User{{"{TENANT_B}:kim"}}')
    assert decided_as(bastion, idp.token(TENANT_A, sub="kim")) == a


def test_a_prefix_without_the_tenant_keeps_one_user_to_the_tenant_that_first_used_it(bastion, idp):
    """``user_prefix = "corp:"``: the same ``sub`` of two tenants names one user name, which is
    the first account's (tenant, sub); the other tenant's person is refused on every call until
    an administrator releases it (``bastion users unlink``), never served as that user."""

    def token(tenant: str) -> str:
        return idp.token(
            tenant, sub="lee", iss=idp.tenant_issuer(tenant, "corp"), aud="api://desk-corp"
        )

    assert decided_as(bastion, token(TENANT_A)) == 'User{"corp:lee"}'
    for _ in range(2):  # a refused token is not remembered
        said = refused(call(bastion, token(TENANT_B)))
        assert "belongs to another account" in said, said
    assert decided_as(bastion, token(TENANT_A)) == 'User{"corp:lee"}'
    users_command(bastion, "unlink", "corp:lee")
    assert decided_as(bastion, token(TENANT_B)) == 'User{"corp:lee"}'
    assert "belongs to another account" in refused(call(bastion, token(TENANT_A)))


def test_the_resource_metadata_names_the_configured_issuer_not_the_tenants(bastion, idp):
    """The tenant list is the operator's customers: never published."""
    servers = bastion.http.get(f"{bastion.url}/.well-known/oauth-protected-resource/mcp/deskhttp")
    listed = servers.json()["authorization_servers"]
    assert listed == [bastion.url, idp.issuer("organizations"), idp.issuer("corp")]
    assert TENANT_A not in servers.text


class Accounts:
    """Which account each user is bound to, in a real SQLite file, as the gateway keeps it."""

    def __init__(self, path: str) -> None:
        self.db = Database(path)
        self.db.migrate("identity", IDENTITY_MIGRATIONS)

    def __call__(self, provider: str, username: str, account: str) -> str | None:
        return bound_elsewhere(self.db, provider, username, account, time.time())


@pytest.fixture
def accounts(tmp_path):
    kept = Accounts(str(tmp_path / "accounts.db"))
    yield kept
    kept.db.close()


def verifier(accounts: Accounts, refusals: RefusalLog | None = None, **table) -> TrustedIssuers:
    """One table (``table`` over the usual settings; None drops one), verified alone."""
    settings = {"audiences": {"desk": "api://desk-m"}, "tenants": [TENANT_A, TENANT_B], **table}
    settings = {k: v for k, v in settings.items() if v is not None}
    issuers = parse_trusted_issuers([settings], {"desk"}, {})
    return TrustedIssuers(issuers, bound_elsewhere=accounts, refusals=refusals)


# -- refused -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("iss", "tid", "reason", "words"),
    [
        # A tenant the operator did not list: another company at the same provider.
        (f"URL/{STRANGER}/v2.0", STRANGER, "tenant", f"tenant '{STRANGER}', which is not one"),
        (f"URL/{TENANT_A}/v2.0", None, "tenant", "names no tenant (tid)"),
        (f"URL/{TENANT_A}/v2.0", [TENANT_A], "tenant", "names no tenant (tid)"),
        (f"URL/{TENANT_A}/v2.0", "", "tenant", "names no tenant (tid)"),
        # The issuer of another tenant than the one it names.
        (f"URL/{TENANT_B}/v2.0", TENANT_A, "iss", f"'URL/{TENANT_B}/v2.0' is not"),
        (f"URL/{STRANGER}/v2.0", TENANT_A, "iss", f"'URL/{STRANGER}/v2.0' is not"),
        # The template itself, the multi-tenant endpoint, or more than the tenant's issuer.
        ("URL/{tenantid}/v2.0", TENANT_A, "iss", "'URL/{tenantid}/v2.0' is not"),
        ("URL/organizations/v2.0", TENANT_A, "iss", "'URL/organizations/v2.0' is not"),
        (f"URL/{TENANT_A}/v2.0/x", TENANT_A, "iss", f"'URL/{TENANT_A}/v2.0/x' is not"),
        (f"URL/{TENANT_A}/v2", TENANT_A, "iss", f"'URL/{TENANT_A}/v2' is not"),
        (f"URL/{TENANT_A.upper()}/v2.0", TENANT_A, "iss", "is not the issuer of tenant"),
    ],
    ids=lambda v: str(v).replace("URL/", "")[:24],
)
def test_a_token_outside_the_listed_tenants_is_refused_naming_why(
    bastion, idp, accounts, iss, tid, reason, words
):
    token = idp.token(tid, iss=iss.replace("URL", idp.url))
    words = words.replace("URL", idp.url)
    said = refused(call(bastion, token))
    assert words in said, said
    # Recorded (token.refused), its reason and why: a verifier of its own, whose refusal log
    # has not written this reason in its window yet (it writes the first of a window only).
    refusals = RefusalLog(AuditLog(accounts.db))
    trusted = verifier(accounts, refusals=refusals, issuer=idp.issuer("organizations"))
    with pytest.raises(InvalidToken, match=re.escape(words)):
        anyio.run(trusted.verify, token, "desk", "192.0.2.7")
    [event] = refusals.audit.events("token.refused")
    assert (event.detail["reason"], event.detail["resource"]) == (reason, "desk")
    assert words in event.detail["description"]
    for part in token.split("."):  # no part of the token is shown or recorded
        assert part not in said and part not in json.dumps(event.detail)


def test_a_listed_tenants_token_is_otherwise_checked_as_any(bastion, idp):
    """The tenant opens no other door: the issuer's key set, the audience, the expiry."""
    assert "signature" in refused(call(bastion, idp.token(TENANT_A, key=idp.stranger_key)))
    assert "not for 'api://desk-m'" in refused(call(bastion, idp.token(TENANT_A, aud="api://x")))
    now = int(time.time())
    expired = idp.token(TENANT_A, iat=now - 900, exp=now - 600)
    assert "expired" in refused(call(bastion, expired))
    # Another table's tenant issuer, for this table's audience: that table's audience only.
    corp = idp.token(TENANT_A, iss=idp.tenant_issuer(TENANT_A, "corp"))
    assert "not for 'api://desk-corp'" in refused(call(bastion, corp))


def test_tenants_on_an_issuer_whose_metadata_names_one_issuer_are_refused_at_its_first_read(
    idp, accounts
):
    """A tenant's own issuer (no template) with ``tenants``: a mistake of the configuration,
    told as such; its tokens are refused until it is mended (503, fail closed)."""
    trusted = verifier(accounts, issuer=idp.issuer(TENANT_A), tenants=[TENANT_A, TENANT_B])
    # Its own iss (the configured issuer), and another tenant's at its origin.
    for token in (idp.token(TENANT_A), idp.token(TENANT_B)):
        with pytest.raises(IssuerUnavailable, match="names one issuer") as caught:
            anyio.run(trusted.verify, token, "desk")
        assert "remove tenants" in str(caught.value)


def test_a_template_issuer_is_refused_for_a_table_without_tenants(idp, accounts):
    trusted = verifier(accounts, issuer=idp.issuer("common"), tenants=None)
    with pytest.raises(IssuerUnavailable, match=r"\{tenantid\}") as caught:
        anyio.run(trusted.verify, idp.token(TENANT_A, iss=idp.issuer("common")), "desk")
    assert "list the tenants" in str(caught.value)
    # Nor is a tenant's token taken by it: its iss is no configured issuer.
    with pytest.raises(InvalidToken, match="is not a trusted issuer"):
        anyio.run(trusted.verify, idp.token(TENANT_A), "desk")


def test_an_issuer_of_many_tenants_cannot_be_at_bastions_own_origin(tmp_path):
    """Each of its tenants' issuers is at its origin: bastion's own tokens would be taken for
    one of them, and refused."""
    table = {
        "issuer": "http://127.0.0.1:1/organizations/v2.0",
        "audiences": {"deskhttp": "x"},
        "tenants": [TENANT_A],
    }
    with (
        pytest.raises(ConfigError, match="at the origin of bastion's own issuer"),
        start(
            tmp_path, gateway={"trusted_issuers": [table]}, oauth={"issuer": "http://127.0.0.1:1"}
        ),
    ):
        pass


def test_a_configured_jwks_uri_still_reads_the_metadata_for_the_template(idp, accounts):
    trusted = verifier(accounts, issuer=idp.issuer("organizations"), jwks_uri=f"{idp.url}/jwks")
    assert anyio.run(trusted.verify, idp.token(TENANT_A), "desk").subject == f"{TENANT_A}:ada"


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"tenants": []}, "tenants: a list of 1 to"),
        ({"tenants": TENANT_A}, "tenants: a list of 1 to"),
        ({"tenants": [TENANT_A, TENANT_A]}, "tenants: a tenant appears more than once"),
        ({"tenants": ["a/b"]}, "tenants: a list of 1 to"),
        ({"tenants": ["{tenantid}"]}, "tenants: a list of 1 to"),
        ({"tenants": ["x" * 129]}, "tenants: a list of 1 to"),
        ({"tenants": ["*"]}, "tenants: a list of 1 to"),
        (
            {"issuer": "https://login.example/{tenantid}/v2.0", "tenants": [TENANT_A]},
            "issuer: the URL its discovery document is read from",
        ),
        ({"user_prefix": "corp:{tenant}:"}, "user_prefix: {tenant} is only for"),
        (
            {"tenants": [TENANT_A], "user_prefix": "{tenant}{tenant}"},
            "user_prefix: {tenant} at most once",
        ),
    ],
    ids=lambda v: json.dumps(v)[:50],
)
def test_a_wrong_tenants_setting_is_refused_at_start_naming_its_key(changes, words):
    table = {
        "issuer": "https://login.example/organizations/v2.0",
        "audiences": {"desk": "api://desk"},
        **changes,
    }
    with pytest.raises(ValueError) as error:
        parse_trusted_issuers([table], {"desk"}, {})
    assert words in str(error.value)
    assert str(error.value).startswith("gateway.trusted_issuers[0].")


def test_a_table_with_tenants_names_its_users_per_tenant_by_default():
    table = {
        "issuer": "https://login.microsoftonline.com/organizations/v2.0",
        "audiences": {"desk": "api://desk"},
        "tenants": [TENANT_A, TENANT_B],
    }
    [issuer] = parse_trusted_issuers([table], {"desk"}, {})
    assert (issuer.tenants, issuer.user_prefix) == ((TENANT_A, TENANT_B), "{tenant}:")
    # Without tenants, as before.
    plain = {k: v for k, v in table.items() if k != "tenants"}
    [issuer] = parse_trusted_issuers([plain], {"desk"}, {})
    assert (issuer.tenants, issuer.user_prefix) == ((), "")
