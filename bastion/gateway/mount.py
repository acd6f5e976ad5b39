"""Builds the gateway from bastion.toml for `bastion.server.app.create_app`, and the ASGI branch
that sends the gateway's paths to it ahead of the API's routing."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from bastion.audit.decisions import DecisionRecords
from bastion.db import Database
from bastion.decide import Authorizer
from bastion.gateway.config import GatewayConfig
from bastion.gateway.gateway import Gateway
from bastion.gateway.tool_pins import ToolPins
from bastion.identity.accounts import MIGRATIONS as IDENTITY_MIGRATIONS
from bastion.identity.accounts import bound_elsewhere
from bastion.identity.trusted_issuers import TrustedIssuers
from bastion.oauth.keys import ARGUMENT_DIGEST_KEY, deployment_secret
from bastion.oauth.verifier import VerifiedTokens
from bastion.route_paths import route_path
from bastion.server.config import ConfigError, ServerConfig
from bastion.signals.posture import PostureSettings


class GatewayFirst:
    """ASGI middleware: HTTP requests under `Gateway.PREFIXES` go straight to the gateway,
    everything else to ``app``.

    The gateway's per-message path needs none of what the API's routes and middleware do (its
    own authentication and error answers are in `transport`; its body limit is enforced by
    `bastion.server.request_limits` outside it), and walking the API's
    routes cost it more than its token check. Placed inside Starlette's ServerErrorMiddleware,
    so an unexpected exception still gets a 500 and is logged.
    """

    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway
        self.prefixes = gateway.PREFIXES

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and route_path(scope).startswith(self.prefixes):
            await self.gateway(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def gateway_from_config(
    config: ServerConfig,
    oauth,
    authorizer: Callable[[], Authorizer],
    facts_stale: Callable[[], bool] = lambda: False,
    facts_heard: Callable[[], Awaitable[bool] | None] = lambda: None,
    approvals=None,
    suspensions=None,
    facts_in_force: Callable[[], Awaitable[None] | None] = lambda: None,
    position: Callable[[], tuple[int | None, int | None]] = lambda: (None, None),
) -> Gateway:
    """The gateway of the ``[gateway]`` table; it checks tokens with the ``[oauth]`` server.
    While ``facts_stale()`` the facts are too old to decide on, and every decision refuses;
    ``facts_heard()`` is awaited first when it gives an awaitable (a fact change heard of and not
    applied yet), and a decision refuses if it says False; ``facts_in_force()`` gives an awaitable
    while a fact change is being put in force (`Replica.in_force`), awaited before a decision
    taken after the message waited for something else; ``position()`` gives the policy version
    in force and the change-log sequence applied, named in each decision record."""
    if oauth is None:
        raise ConfigError(
            f"{config.named} has a [gateway] table but no [oauth] table: the gateway accepts"
            " bastion's access tokens only (see docs/gateway.md)"
        )
    with config.reading("gateway"):
        gateway_config = GatewayConfig.from_mapping(config.gateway)
    settings = oauth.settings
    for trusted in gateway_config.trusted_issuers:
        if trusted.issuer.rstrip("/") == settings.issuer.rstrip("/"):
            raise ConfigError(
                f"gateway.trusted_issuers names {trusted.issuer}, bastion's own issuer: its"
                " tokens are checked by bastion's own keys and revocation state only"
            )
        if trusted.tenants and urlsplit(trusted.issuer)[:2] == urlsplit(settings.issuer)[:2]:
            # A token of an iss at its origin is taken as one of its tenants' (their issuers
            # are its template's): bastion's own would all be refused.
            raise ConfigError(
                f"gateway.trusted_issuers names {trusted.issuer}, with tenants, at the origin of"
                " bastion's own issuer: its tenants' issuers would be taken for bastion's"
            )
    try:
        digest_key = deployment_secret(settings.key_dir, ARGUMENT_DIGEST_KEY)
    except (OSError, ValueError) as e:
        raise ConfigError(f"oauth.key_dir: {e}") from None
    records = DecisionRecords(
        Database(config.database, role="bastion-records"), config.decision_records_buffer
    )
    journal_dir = config.usable_decision_journal_directory("the gateway")
    tokens = VerifiedTokens(oauth.verifier, config.database)
    # Only where an upstream pins its tools or prompts: a connection of its own, used off the event loop.
    pins = (
        ToolPins(Database(config.database, role="bastion-tool-pins"))
        if any(u.pin_tools != "off" or u.pin_prompts != "off" for u in gateway_config.upstreams)
        else None
    )
    gateway = Gateway(
        gateway_config,
        tokens=tokens,
        dpop=oauth.dpop,
        issuer=settings.issuer,
        authorizer=authorizer,
        facts_stale=facts_stale,
        facts_heard=facts_heard,
        facts_in_force=facts_in_force,
        position=position,
        records=records,
        resource_scopes=lambda uri: r.scopes if (r := settings.resource(uri)) else (),
        digest_key=digest_key,
        max_json_depth=config.max_json_depth,
        approvals=approvals,
        suspensions=suspensions,
        posture=posture_settings(config),
        refusals=oauth.verifier.refusals,
        tool_pins=pins,
        journal_dir=journal_dir,
        journal_fsync=config.decision_journal_fsync,
        trusted=TrustedIssuers(
            gateway_config.trusted_issuers,
            refusals=oauth.verifier.refusals,
            user_standing=tokens.user_standing,
            owners=None if suspensions is None else suspensions.owner_names,
            bound_elsewhere=subject_bindings(tokens.db, gateway_config),
        )
        if gateway_config.trusted_issuers
        else None,
    )
    for name in gateway.upstreams:
        uri = gateway.resource(name)
        resource = settings.resource(uri)
        if resource is None:
            raise ConfigError(
                f"gateway upstream {name!r} is served at {uri}, but [oauth] has no resource with"
                f' that uri; add [[oauth.resources]] uri = "{uri}"'
                + ("" if gateway_config.public_url else " (or set gateway.public_url)")
            )
        # The 401 challenge's scopes are what MCP clients ask for first: one the resource
        # does not offer is invalid_scope at /authorize, for every client. (With trusted
        # issuers for this server, a client may take its token from one of them, whose scopes
        # bastion does not know.)
        upstream = gateway_config.upstream(name)
        configured = upstream.scopes if upstream is not None else ()
        foreign = [s for s in configured if s not in resource.scopes]
        if foreign and not (gateway.trusted is not None and gateway.trusted.issuers_for(name)):
            raise ConfigError(
                f"gateway upstream {name!r} asks clients for scopes {foreign} in its 401"
                f" challenge (gateway.upstreams scopes), which the [[oauth.resources]] entry"
                f" {uri} does not offer {list(resource.scopes)}: every authorization would be"
                " refused with invalid_scope; add them to that resource's scopes"
            )
    return gateway


def subject_bindings(
    db: Database, gateway_config: GatewayConfig
) -> Callable[[str, str, str], str | None] | None:
    """(provider, user, account) -> the account another person bound the user to, or None, for
    trusted issuers that name users by a claim other than their account_claim, or of many
    tenants (`bastion.identity.accounts`), on ``db``
    (the tokens' connection, which also reads users' standing off the event loop, and is closed
    with them), once per token verified. None where no issuer names users so."""
    if not any(i.binds_accounts for i in gateway_config.trusted_issuers):
        return None
    db.migrate("identity", IDENTITY_MIGRATIONS)

    def bound(provider: str, username: str, subject: str) -> str | None:
        return bound_elsewhere(db, provider, username, subject, time.time())

    return bound


def posture_settings(config: ServerConfig) -> PostureSettings:
    """The [signals.posture] table (docs/signals.md)."""
    with config.reading("signals.posture"):
        posture = PostureSettings.from_mapping(config.signals.get("posture"))
    if posture.uses_proxy_headers and config.proxy_headers:
        # uvicorn then replaces the connection's address with the forwarded one, so the
        # proxy that sent the headers could not be told from the client it speaks for.
        raise ConfigError(
            "[signals.posture].device_header and posture_header need [server].proxy_headers ="
            " false: bastion must see the proxy's own address to trust its headers"
            " (docs/signals.md)"
        )
    return posture
