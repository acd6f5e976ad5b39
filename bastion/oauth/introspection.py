"""RFC 7662 OAuth 2.0 Token Introspection.

Only confidential clients an admin allowed to introspect (``bastion clients create
--introspection URI``, typically a resource server) may call it, each about the tokens of the
protected resources it was bound to (or of every one, ``*``): a token meant for none of them is
answered as an unknown one, so a resource server learns nothing of another's tokens (§4: the
server "MUST determine whether or not the token can be used at the resource server making the
introspection call"). Revoked, expired, unknown or malformed tokens are all simply
``{"active": false}``, and so is the token of a user or agent (any agent of its chain) the kill
switch holds, for as long as it holds them. An active access token is answered with exactly the
claims it carries (§2.2 allows any): when and how the person signed in (``auth_time``, ``acr``,
``amr``: RFC 9470 §3), a delegation's ``act`` (RFC 8693 §4.1), a binding's ``cnf`` (RFC 9449
§6.2); a refresh token with its grant's sign-in.

Every answer is an audit event, ``token.introspected``: who asked, which token (its kind, grant
and ``jti``, never its text), whose it is, the answer and, for an inactive one, why (§2.2 keeps
the reason from the client, not from the audit trail). Answers are counted per window as refusals
are (`bastion.audit.refusals`): the first of a key is written at once and its repeats as rows of
``repeats`` (every few seconds, and when the window closes). For a token this server issued the
key is the asker, the token and the answer, so each row names them and a changed answer (revoked,
suspended) is written at once; any other token (unknown, malformed, forged) proves nothing and
shares a key with its like per asker and reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bastion.oauth.access_token import sign_in_claims
from bastion.oauth.errors import InvalidRequest, InvalidToken, OAuthError
from bastion.oauth.settings import OAuthSettings, same_resource
from bastion.oauth.store import Client
from bastion.oauth.verifier import delegation_chain

if TYPE_CHECKING:
    from bastion.oauth.server import AuthorizationServer

INACTIVE = {"active": False}
EVENT = "token.introspected"
# An introspecting client bound to every protected resource, alone in its list.
ALL_RESOURCES = "*"


class IntrospectionResourcesRefused(ValueError):
    """Resources a client may not be bound to (nothing was changed): the message says why."""


def introspection_resources(given: Sequence[str], settings: OAuthSettings) -> tuple[str, ...]:
    """The resources a client is to introspect for, from what an administrator gave: each a
    protected resource of ``settings`` (kept as configured), or `ALL_RESOURCES` alone; at least
    one. Else `IntrospectionResourcesRefused`."""
    if not given:
        raise IntrospectionResourcesRefused(
            "name the resources whose tokens the client may introspect"
        )
    if ALL_RESOURCES in given:
        if any(uri != ALL_RESOURCES for uri in given):
            raise IntrospectionResourcesRefused(
                f"'{ALL_RESOURCES}' already means every protected resource: give it alone, or"
                " only resource URIs"
            )
        return (ALL_RESOURCES,)
    bound: dict[str, None] = {}
    for uri in given:
        resource = settings.resource(uri)
        if resource is None:
            configured = ", ".join(r.uri for r in settings.resources)
            raise IntrospectionResourcesRefused(
                f"{uri!r} is not a protected resource of this server ([[oauth.resources]]:"
                f" {configured}); or give '{ALL_RESOURCES}' for every one"
            )
        bound[resource.uri] = None
    return tuple(bound)


def introspects_for(client: Client, audience: object) -> bool:
    """Whether ``client`` may be told of a token for ``audience`` (its ``aud``, a grant's
    resource): one of them is a resource the client is bound to, or it is bound to every one."""
    resources = client.introspection_resources
    if ALL_RESOURCES in resources:
        return True
    audiences = audience if isinstance(audience, list) else [audience]
    return any(
        isinstance(aud, str) and same_resource(aud, uri) for aud in audiences for uri in resources
    )


def _not_its_resource(client: Client, audience: object) -> str:
    return (
        f"the token is for {audience!r}; this client introspects for"
        f" {list(client.introspection_resources)}"
    )


@dataclass(frozen=True)
class Answer:
    """An introspection answer and what its audit rows say of it.

    ``token`` names a token this server issued (``token_kind``, ``jti``, ``grant_id``,
    ``token_client_id``): with ``subject``, the answer and ``reason`` it is written in every row
    of its count. None: a token nobody can be tied to (unknown, malformed, forged), counted per
    asker, address and reason alone. ``detail`` goes into the first row of a count."""

    body: dict[str, Any]
    reason: str | None = None  # why it is inactive: a fixed word (docs/oauth.md), never a quote
    token: dict[str, str | None] | None = None
    subject: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


def introspect(
    server: AuthorizationServer,
    client: Client,
    form: Mapping[str, str],
    address: str | None = None,
) -> dict[str, Any]:
    """Answer ``client``'s question about ``form``'s token (asked from ``address``), and record
    the answer."""
    if client.is_public or not client.may_introspect:
        raise OAuthError(
            "unauthorized_client",
            "this client may not introspect tokens; an admin allows it with"
            " `bastion clients update <client_id> --introspection <resource URI>`",
            status=403,
        )
    token = form.get("token")
    if not token:
        raise InvalidRequest("token is required")
    answer = _answer(server, client, token)
    active = answer.body["active"]
    # A resource server asking about the same token on every request writes a row per window
    # and a count; a changed answer is another key, so its row is written at once.
    server.introspections.record(
        EVENT,
        address=address,
        reason=answer.reason,
        client_id=client.client_id,
        subject=answer.subject,
        counted=None if answer.token is None else {"active": active, **answer.token},
        **answer.detail,
    )
    return answer.body


def _answer(server: AuthorizationServer, client: Client, token: str) -> Answer:
    found = server.store.refresh_token(token)
    if found is not None:
        return _refresh_token_answer(server, client, *found)
    try:
        verified = server.verifier.verify(token, resource=None, audit=False)
    except InvalidToken as refused:
        return _refused_answer(server, refused)
    agents = verified.agents or (verified.client_id,)
    claims = verified.claims
    which = {
        "token_kind": "access_token",
        "jti": verified.jti,
        "grant_id": verified.grant_id,
        "token_client_id": verified.client_id,
    }
    detail = {
        "agents": list(agents),
        "task": verified.task,
        "aud": claims["aud"],
        "scope": claims.get("scope", ""),
        "exp": verified.expires_at,
    }
    # Not meant for the asker: the answer a token nobody issued gets, the row says why.
    if not introspects_for(client, claims["aud"]):
        detail["description"] = _not_its_resource(client, claims["aud"])
        return Answer(INACTIVE, "aud", which, verified.subject, detail)
    suspended = server.suspended(verified.subject, agents)
    if suspended is not None:
        detail["suspended"] = repr(suspended)
        return Answer(INACTIVE, "suspended", which, verified.subject, detail)
    body = {
        "active": True,
        "token_type": "Bearer",
        "client_id": verified.client_id,
        "sub": verified.subject,
        "aud": claims["aud"],
        "scope": claims.get("scope", ""),
        "iss": claims["iss"],
        "exp": verified.expires_at,
        "iat": verified.issued_at,
        "jti": verified.jti,
    }
    # When and how the person signed in, as the token carries them (RFC 9470 §3): a resource
    # server that introspects applies step-up (max_age, acr_values) and MFA rules as one that
    # verifies the JWT does. Read as the verifier checked them, from the token issued under its
    # jti (its digest), so from the grant it was minted from.
    body.update(sign_in_claims(verified.auth_time, verified.sign_in))
    # A delegated token's chain (RFC 8693 §4.1 allows ``act`` in the answer), its task and the
    # task whose session labels it keeps (docs/delegation.md).
    if verified.agents:
        body["act"] = claims["act"]
    if verified.task is not None:
        body["task"] = verified.task
    if verified.labels_task is not None:
        body["labels_task"] = verified.labels_task
    # A DPoP-bound token says so, with its key's thumbprint (RFC 9449 §6.2).
    if verified.jkt is not None:
        body["token_type"] = "DPoP"
        body["cnf"] = {"jkt": verified.jkt}
    return Answer(body, None, which, verified.subject, detail)


def _refresh_token_answer(
    server: AuthorizationServer,
    client: Client,
    grant_id: str,
    expires_at: float,
    used_at: float | None,
) -> Answer:
    grant = server.store.grant(grant_id)
    which: dict[str, str | None] = {
        "token_kind": "refresh_token",
        "jti": None,
        "grant_id": grant_id,
        "token_client_id": grant.client_id if grant is not None else None,
    }
    if grant is None:
        return Answer(INACTIVE, "unknown", which)
    subject = grant.username or grant.client_id
    detail: dict[str, Any] = {
        "agents": [grant.client_id],
        "aud": grant.resource,
        "scope": grant.scope,
        "exp": int(expires_at),
    }
    reason = None
    if grant.revoked_at is not None:
        reason = "revoked"
    elif used_at is not None:
        reason = "refresh_token_used"  # rotated out (RFC 9700 §4.14.2)
    elif expires_at <= server.clock():
        reason = "expired"
    elif not introspects_for(client, grant.resource):
        # Its grant is for a resource the asker does not introspect for.
        reason = "aud"
        detail["description"] = _not_its_resource(client, grant.resource)
    else:
        suspended = server.suspended(subject, (grant.client_id,))
        if suspended is not None:
            reason = "suspended"
            detail["suspended"] = repr(suspended)
    if reason is not None:
        return Answer(INACTIVE, reason, which, subject, detail)
    body = {
        "active": True,
        "token_type": "refresh_token",
        "client_id": grant.client_id,
        "sub": subject,
        "aud": grant.resource,
        "scope": grant.scope,
        "exp": int(expires_at),
        "iss": server.settings.issuer,
        # The grant's sign-in, which each access token it issues carries (RFC 9470 §3).
        **sign_in_claims(grant.auth_time, grant.sign_in),
    }
    return Answer(body, None, which, subject, detail)


def _refused_answer(server: AuthorizationServer, refused: InvalidToken) -> Answer:
    """An access token the verifier refused: one this server signed (its claims are known)
    names its user and agents; any other proves nothing, and is counted with its like.
    ``reason`` is the verifier's check (`InvalidToken.check`), as in ``token.refused``."""
    claims = refused.claims
    if claims is None:
        # The message may quote the token's header (cut to 200 characters), never the token.
        return Answer(
            INACTIVE, refused.check, detail={"active": False, "description": refused.reason}
        )
    text = {k: v if isinstance(v, str) else None for k, v in claims.items()}
    jti = text.get("jti")
    state = server.store.access_token_state(jti) if jti else None
    which = {
        "token_kind": "access_token",
        "jti": jti,
        "grant_id": state.grant_id if state is not None else None,
        "token_client_id": text.get("client_id"),
    }
    try:
        agents: list[str | None] | None = list(delegation_chain(claims) or (text.get("client_id"),))
    except InvalidToken:
        agents = None  # a malformed ``act``: the reason (``claims``) says so
    detail = {"agents": agents, "description": refused.reason}
    return Answer(INACTIVE, refused.check, which, text.get("sub"), detail)
