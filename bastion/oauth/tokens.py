"""The token endpoint (RFC 6749 §3.2 as profiled by OAuth 2.1): the ``authorization_code`` grant
with PKCE (§4.1.3), ``refresh_token`` with rotation on every use (§6, RFC 9700 §4.14.2) and
``client_credentials`` (§4.4) for an agent acting as itself; the OpenID CIBA grant is answered by
`bastion.oauth.ciba`, token exchange (RFC 8693) by `bastion.oauth.token_exchange`, the JWT bearer
grant of enterprise-managed authorization (RFC 7523, ID-JAG) by `bastion.oauth.jwt_bearer`.

A ``task`` parameter (bastion's extension, docs/delegation.md) at the ``authorization_code`` and
``client_credentials`` grants binds the new grant to a just-in-time task: ending the task revokes
it. A binding only ever takes access away sooner, so the client may ask for it itself.

A ``DPoP`` proof (RFC 9449, `bastion.oauth.dpop`) binds the access token to the proof's key
(``cnf.jkt``, ``token_type: DPoP``) and a public client's refresh tokens to that key; a client
registered with ``dpop_bound_access_tokens`` gets nothing without one.

While the kill switch (`bastion.signals.suspensions`) holds the user or the client, every grant
is refused with ``invalid_grant`` and nothing is spent: one check where every token is minted
(`AuthorizationServer.issue_access_token`), so a token made during a suspension cannot outlive it.

A code is single use: a second use revokes the grant the first one started. A refresh token is
single use: presenting a rotated one revokes the whole grant (it was stolen, or the client is
broken; either way no token of that grant may live on).
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from bastion.audit.actor import SERVER
from bastion.oauth import pkce
from bastion.oauth.ciba import CIBA_GRANT_TYPE
from bastion.oauth.dpop import CLIENT_METADATA as DPOP_REQUIRED
from bastion.oauth.dpop import InvalidDPoPProof, one_proof
from bastion.oauth.errors import (
    InvalidGrant,
    InvalidRequest,
    InvalidScope,
    InvalidTarget,
    UnauthorizedClient,
    UnsupportedGrantType,
)
from bastion.oauth.jwt_bearer import JWT_BEARER_GRANT_TYPE, IdentityAssertionGrant
from bastion.oauth.redirect_uris import redirect_uri_allowed
from bastion.oauth.settings import same_resource
from bastion.oauth.store import Client, Grant, GrantRefused, new_secret
from bastion.oauth.token_exchange import (
    TOKEN_EXCHANGE_GRANT_TYPE,
    RequestOrigin,
    TokenExchange,
)

if TYPE_CHECKING:
    from bastion.oauth.server import AuthorizationServer


class TokenEndpoint:
    def __init__(self, server: AuthorizationServer) -> None:
        self.server = server
        self.settings = server.settings
        self.store = server.store
        self.audit = server.audit
        self.token_exchange = TokenExchange(server)
        self.identity_assertions = IdentityAssertionGrant(server)

    def exchange(
        self,
        client: Client,
        form: Mapping[str, str],
        origin: RequestOrigin | None = None,
        dpop_proofs: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        """Answer one token request from an authenticated client, or raise the RFC's error.
        ``origin`` (the client's address and headers) is the context of a token exchange;
        ``dpop_proofs`` are the request's ``DPoP`` headers (RFC 9449 §5)."""
        grant_type = form.get("grant_type")
        if not grant_type:
            raise InvalidRequest("grant_type is required")
        handler = {
            "authorization_code": self._authorization_code,
            "refresh_token": self._refresh_token,
            "client_credentials": self._client_credentials,
            CIBA_GRANT_TYPE: self._ciba,
            TOKEN_EXCHANGE_GRANT_TYPE: functools.partial(self._token_exchange, origin=origin),
            JWT_BEARER_GRANT_TYPE: self._jwt_bearer,
        }.get(grant_type)
        if grant_type == JWT_BEARER_GRANT_TYPE and not self.settings.id_jag.enabled:
            handler = None
        if handler is None:
            raise UnsupportedGrantType(f"grant_type {grant_type!r} is not supported")
        if grant_type not in client.grant_types:
            raise UnauthorizedClient(f"this client is not registered for the {grant_type} grant")
        return handler(client, form, self._dpop_key(client, dpop_proofs))

    def _dpop_key(self, client: Client, proofs: tuple[str, ...]) -> str | None:
        """The thumbprint of the key the request's DPoP proof proves (its jti now spent), or
        None without a proof; `InvalidDPoPProof` for a bad one, or none from a client that
        registered ``dpop_bound_access_tokens``."""
        proof = one_proof(proofs)
        if proof is None:
            if client.metadata.get(DPOP_REQUIRED) is True:
                raise InvalidDPoPProof(
                    f"this client registered {DPOP_REQUIRED}: send a DPoP proof (RFC 9449 §5)"
                )
            return None
        return self.server.dpop.use(proof, "POST", self.settings.endpoint("token")).jkt

    def _token_exchange(
        self,
        client: Client,
        form: Mapping[str, str],
        jkt: str | None,
        origin: RequestOrigin | None,
    ) -> dict[str, Any]:
        if jkt is not None:
            raise InvalidRequest("token exchange issues Bearer tokens only: send no DPoP proof")
        return self.token_exchange.exchange(client, form, origin)

    def _jwt_bearer(
        self, client: Client, form: Mapping[str, str], jkt: str | None
    ) -> dict[str, Any]:
        return self.identity_assertions.exchange(
            client,
            form,
            functools.partial(self._issue_new_grant, client=client, form=form, jkt=jkt),
            jkt,
        )

    def _issue_new_grant(
        self,
        grant: Grant,
        client: Client,
        form: Mapping[str, str],
        jkt: str | None,
        *,
        authorized_at: float | None = None,
        strangers: bool = False,
    ) -> dict[str, Any]:
        """Save a grant that starts with this request and mint its access token (no refresh
        token), bound to the request's task if it names one: all or nothing. A user's grant is
        checked as `OAuthStore.create_grant` says (``authorized_at``, ``strangers``)."""
        with self.store.db.transaction():
            try:
                self.store.create_grant(grant, authorized_at=authorized_at, strangers=strangers)
            except GrantRefused as refused:
                raise InvalidGrant(str(refused)) from None
            self._bind_task(form, grant, client)
            return self._issue(grant, client, grant.scope, refresh=False, jkt=jkt)

    def _authorization_code(
        self, client: Client, form: Mapping[str, str], jkt: str | None
    ) -> dict[str, Any]:
        code = form.get("code")
        if not code:
            raise InvalidRequest("code is required")
        if not form.get("redirect_uri"):
            raise InvalidRequest("redirect_uri is required")
        if not form.get("code_verifier"):
            raise InvalidRequest("code_verifier is required (PKCE)")
        found = self.store.code(code)
        if found is None:
            raise InvalidGrant("the authorization code is unknown")
        grant_id, redirect_uri, challenge, expires_at, used_at = found
        grant = self.store.grant(grant_id)
        if grant is None or grant.client_id != client.client_id:
            raise InvalidGrant("the authorization code was issued to another client")
        if used_at is not None:
            return self._revoke_on_reuse(grant, "authorization code replayed", "authorization code")
        now = self.server.clock()
        if expires_at <= now:
            raise InvalidGrant("the authorization code has expired")
        if grant.revoked_at is not None:
            raise InvalidGrant("the grant of this code has been revoked")
        self._refuse_disabled_user(grant)
        # The very URI of the authorization request (RFC 6749 §4.1.3), still one the client has.
        if form["redirect_uri"] != redirect_uri or not redirect_uri_allowed(
            client.redirect_uris, form["redirect_uri"]
        ):
            raise InvalidGrant("redirect_uri differs from the one of the authorization request")
        pkce.check_verifier(form.get("code_verifier"), challenge)
        self._check_resource(form, grant)
        with self.store.db.transaction():
            if not self.store.use_code(code, now):
                replayed = True
            else:
                replayed = False
                self._bind_task(form, grant, client)
                response = self._issue(grant, client, grant.scope, refresh=True, jkt=jkt)
        if replayed:
            return self._revoke_on_reuse(grant, "authorization code replayed", "authorization code")
        self.audit.record(
            "token.issued",
            subject=grant.username,
            client_id=client.client_id,
            grant_id=grant.grant_id,
            grant_type="authorization_code",
            **({"task": form["task"]} if form.get("task") else {}),
            resource=grant.resource,
            scope=grant.scope,
        )
        return response

    def _revoke_on_reuse(self, grant: Grant, reason: str, what: str) -> dict[str, Any]:
        """A single-use credential came back: revoke everything its grant issued (RFC 9700)."""
        self.server.revoke_grant(grant, reason, actor=SERVER)
        raise InvalidGrant(f"the {what} was already used; its grant is now revoked")

    def _refuse_disabled_user(self, grant: Grant) -> None:
        """A grant of a disabled user issues nothing, and is revoked if it is somehow still
        live: disabling a user revokes their grants, and no grant is made for a disabled user
        (`OAuthStore.create_grant`), so this only backs those up."""
        if grant.username is None or self.store.user_state(grant.username) != "disabled":
            return
        self.server.revoke_grant(grant, "user disabled", actor=SERVER)
        raise InvalidGrant(f"user {grant.username!r} is disabled: this grant is revoked")

    def _refresh_token(
        self, client: Client, form: Mapping[str, str], jkt: str | None
    ) -> dict[str, Any]:
        token = form.get("refresh_token")
        if not token:
            raise InvalidRequest("refresh_token is required")
        found = self.store.refresh_token(token)
        if found is None:
            raise InvalidGrant("the refresh token is unknown")
        grant_id, expires_at, used_at = found
        grant = self.store.grant(grant_id)
        if grant is None or grant.client_id != client.client_id:
            raise InvalidGrant("the refresh token was issued to another client")
        if grant.revoked_at is not None:
            raise InvalidGrant("the grant of this refresh token has been revoked")
        self._refuse_disabled_user(grant)
        if used_at is not None:
            return self._revoke_on_reuse(grant, "refresh token reused", "refresh token")
        now = self.server.clock()
        if expires_at <= now:
            raise InvalidGrant("the refresh token has expired")
        bound = self.server.dpop.grant_key(grant.grant_id)
        if bound is not None and bound != jkt:
            raise InvalidDPoPProof(
                "this refresh token is bound to a DPoP key: send a proof made with that key"
                " (RFC 9449 §5)"
            )
        scope = grant.scope
        if form.get("scope"):
            wider = sorted(set(form["scope"].split()) - set(grant.scope.split()))
            if wider:
                raise InvalidScope(f"scopes {wider} were not granted; a refresh may only narrow")
            scope = " ".join(dict.fromkeys(form["scope"].split()))
        self._check_resource(form, grant)
        with self.store.db.transaction():
            if not self.store.use_refresh_token(token, now):
                reused = True
            else:
                reused = False
                response = self._issue(grant, client, scope, refresh=True, jkt=jkt)
        if reused:
            return self._revoke_on_reuse(grant, "refresh token reused", "refresh token")
        self.audit.record(
            "token.refreshed",
            subject=grant.username,
            client_id=client.client_id,
            grant_id=grant.grant_id,
            resource=grant.resource,
            scope=scope,
        )
        return response

    def _client_credentials(
        self, client: Client, form: Mapping[str, str], jkt: str | None
    ) -> dict[str, Any]:
        if client.is_public:
            raise UnauthorizedClient("client_credentials needs a confidential client")
        resource = self.settings.requested_resource(form)
        allowed = set(resource.scopes) & set((client.scope or "").split())
        if form.get("scope"):
            wanted = list(dict.fromkeys(form["scope"].split()))
            refused = [s for s in wanted if s not in allowed]
            if refused:
                raise InvalidScope(
                    f"scopes {refused} are not registered for this client on this resource;"
                    f" available: {sorted(allowed)}"
                )
        else:
            wanted = [s for s in resource.scopes if s in allowed]
        now = self.server.clock()
        grant = Grant(
            grant_id=uuid.uuid4().hex,
            client_id=client.client_id,
            username=None,
            resource=resource.uri,
            scope=" ".join(wanted),
            created_at=now,
            expires_at=now + self.settings.access_token_seconds,
            revoked_at=None,
        )
        response = self._issue_new_grant(grant, client, form, jkt)
        self.audit.record(
            "token.issued",
            subject=client.client_id,
            client_id=client.client_id,
            grant_id=grant.grant_id,
            grant_type="client_credentials",
            **({"task": form["task"]} if form.get("task") else {}),
            resource=grant.resource,
            scope=grant.scope,
        )
        return response

    def _ciba(self, client: Client, form: Mapping[str, str], jkt: str | None) -> dict[str, Any]:
        """OpenID CIBA poll mode: the rules are in `bastion.oauth.ciba`, the tokens are ours."""
        return self.server.ciba.exchange(client, form, functools.partial(self._issue, jkt=jkt))

    def _bind_task(self, form: Mapping[str, str], grant: Grant, client: Client) -> None:
        """Bind the grant to the task the ``task`` parameter names, inside the transaction that
        issues its first token: refused, nothing is issued (and a code stays unused)."""
        task = form.get("task")
        if task is None:
            return
        if self.server.tasks is None:
            raise InvalidRequest("this server has no tasks: leave the task parameter out")
        user = grant.username or client.client_id
        try:
            self.server.tasks.bind(task, user, client.client_id, grant.grant_id)
        except ValueError as e:
            raise InvalidRequest(f"task: {e}") from None

    def _check_resource(self, form: Mapping[str, str], grant: Grant) -> None:
        resource = form.get("resource")
        if resource is not None and not same_resource(resource, grant.resource):
            raise InvalidTarget(
                f"resource {resource!r} differs from {grant.resource!r}, the resource of this grant"
            )

    def _issue(
        self, grant: Grant, client: Client, scope: str, refresh: bool, jkt: str | None = None
    ) -> dict[str, Any]:
        """Mint the grant's next tokens; ``jkt`` binds them to a DPoP key (RFC 9449 §5, §6.1).
        Refused (`InvalidGrant`) while the kill switch holds the user or the client
        (`AuthorizationServer.issue_access_token`): every grant but token exchange ends here."""
        now = self.server.clock()
        seconds, last = self.settings.access_token_seconds, grant.expires_at
        extra: dict[str, Any] = {} if jkt is None else {"cnf": {"jkt": jkt}}
        bound = None if self.server.tasks is None else self.server.tasks.bound_task(grant.grant_id)
        if bound is not None:
            # A grant bound to a task: its tokens name the task and do not outlive it.
            task, last = bound[0], min(last, bound[1])
            if last <= now:
                raise InvalidGrant(f"task {task} has ended: its grants issue no more tokens")
            seconds, extra["task"] = min(seconds, int(last - now)), task
        access = self.server.issue_access_token(
            grant,
            subject=grant.username or client.client_id,
            agents=(client.client_id,),
            scope=scope,
            now=now,
            seconds=seconds,
            extra=extra or None,
        )
        response: dict[str, Any] = {
            "access_token": access.token,
            "token_type": "Bearer" if jkt is None else "DPoP",
            "expires_in": seconds,
            "scope": scope,
        }
        if (
            refresh
            and "refresh_token" in client.grant_types
            and self.settings.refresh_token_seconds
        ):
            token = new_secret()
            expires_at = min(now + self.settings.refresh_token_seconds, last)
            self.store.save_refresh_token(token, grant.grant_id, now, expires_at)
            if jkt is not None and client.is_public:
                # A public client's refresh token is bound to the key too (RFC 9449 §5).
                self.server.dpop.bind_grant(grant.grant_id, jkt, grant.expires_at)
            response["refresh_token"] = token
        return response
