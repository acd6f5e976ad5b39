"""OAuth 2.0 Token Exchange (RFC 8693) for delegation between agents: §2.1 the request, §2.2 the
response (§2.2.1) and its errors (§2.2.2), §4.1 the ``act`` claim, §4.4 ``may_act``.

The agent a token was issued to (its ``client_id``: the *current agent*) authenticates at the
token endpoint and presents that token as ``subject_token`` and, as ``actor_token``, an access
token bastion issued to the sub-agent by ``client_credentials`` (proof that the sub-agent is a
live, registered client). The policy decides whether the current agent may delegate to the
sub-agent on the MCP server the token is for (``may_delegate``) and which scopes survive
(``delegated_scope``), now, with the request's posture and the facts in force
(`bastion.decide.contract.decide_exchange`, which `bastion audit replay` asks again of the
record). The result is a short-lived access token whose
``act`` claim nests the chain, under a grant that is a child of the subject token's grant:
revoking any grant above it, or the subject token itself, revokes it. It never has a refresh token and never outlives the
subject token.

Refusals use §2.2.2's codes: ``invalid_request`` for a malformed request and for a subject or actor
token that is invalid or unacceptable (another client's, expired, revoked, the wrong kind, a
``may_act`` that names someone else, a chain past ``max_delegation_depth``, a delegation the policy
refuses, a user or agent of the chain that is suspended), ``invalid_target`` for a resource or
audience other than the subject token's, ``invalid_scope`` for scopes beyond what the subject token,
the sub-agent's registration and the resource allow (or when the policy lets none through),
``unauthorized_client`` for a client not registered for this grant type (`bastion.oauth.tokens`).

Every exchange whose subject token is good is decided on record, as the gateway's calls are: a
decision record (`bastion.audit.decisions`, written by the gateway's record writer) with the
chain asked for, ``delegate`` on the MCP server, the result and its reason, what passed and the
rules that proved it; and an audit event naming it (``decision_id``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from bastion.audit.decisions import DecisionRecord, DecisionRecords, new_decision_id
from bastion.decide.contract import DELEGATION_ACTION, DELEGATION_METHOD, decide_exchange
from bastion.facts.model import Entity
from bastion.oauth.errors import (
    InvalidGrant,
    InvalidRequest,
    InvalidScope,
    InvalidTarget,
    InvalidToken,
    OAuthError,
)
from bastion.oauth.settings import same_resource
from bastion.oauth.store import Client, ClientRevoked, Grant, GrantRefused
from bastion.oauth.verifier import VerifiedToken

if TYPE_CHECKING:
    from bastion.decide import Authorizer
    from bastion.oauth.server import AuthorizationServer

TOKEN_EXCHANGE_GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
# What no claim of an actor equals: a may_act member bastion cannot check.
_UNMATCHED = object()
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"


class TaskBinder(Protocol):
    """Tasks that delegated tokens may be bound to (the ``task`` parameter)."""

    def bind(
        self, task_id: str, user: str, agent: str, grant_id: str, *, chain: Iterable[str] = ()
    ) -> float:
        """Bind the grant to the task and return when the task expires; raise ValueError with
        a reason when the task is not open or not for that user and agent (``chain``: the
        agents the grant acts through). Called inside the transaction that saves the grant, on
        the authorization server's `Database`: write through that one."""

    def bound_task(self, grant_id: str) -> tuple[str, float] | None:
        """The task a grant is bound to and when it stops granting (0 once ended), if any."""


@dataclass(frozen=True)
class RequestOrigin:
    """Where a token request came from: the client's address and its (lower-case) headers, the
    last copy of each, and the names of those it holds more than once."""

    address: str
    headers: Mapping[str, str] = field(default_factory=dict)
    repeated: frozenset[str] = frozenset()


@dataclass
class DelegationPolicy:
    """What the authorization server needs to let the policy decide delegations; composed by
    `bastion.server.app` from the gateway (which knows which MCP server a resource is)."""

    authorizer: Callable[[], Authorizer]
    # The resource URI's MCP server as the gateway maps it (McpServer{"<server>"}), or None.
    server_of: Callable[[str], Entity | None]
    # [signals.posture] (`bastion.signals.posture.PostureSettings`): the request's posture.
    posture: Any = None
    # Whether the facts are past the staleness bound: then no delegation is decided (503).
    # (A change heard of and not applied yet is waited for before every token request:
    # `AuthorizationServer.facts_current`.)
    facts_stale: Callable[[], bool] = lambda: False
    # Where each exchange's decision record goes: the gateway's (None: none is kept).
    records: DecisionRecords | None = None
    # The policy version in force and the change-log sequence applied, read with the
    # `Authorizer` that decides (as the gateway's records name them).
    position: Callable[[], tuple[int | None, int | None]] = lambda: (None, None)


@dataclass
class _Asked:
    """What one exchange asked, as far as it got, for its decision record."""

    started: float = field(default_factory=time.perf_counter)
    user: str = ""
    # The chain of agents asked for: the subject token's, then the actor once it is known.
    agents: list[str] = field(default_factory=list)
    resource: str = ""
    # The task the new token would be bound to; once issued, its grant.
    task: str = ""
    grant_id: str = ""
    server: Entity | None = None
    context: dict[str, Any] = field(default_factory=dict)
    position: tuple[int | None, int | None] = (None, None)
    # Set once the policy was asked: its refusal's reason, or the rules that let it through.
    decided: bool = False
    reason: str = ""
    rules: tuple[str, ...] = ()

    def principals(self) -> tuple[Entity, ...]:
        """The chain asked for, as the policy is asked it and the record names it: the user,
        each agent, the sub-agent last."""
        return (Entity("User", self.user), *(Entity("Agent", agent) for agent in self.agents))


class TokenExchange:
    """The token-exchange grant of the token endpoint (`bastion.oauth.tokens.TokenEndpoint`)."""

    def __init__(self, server: AuthorizationServer) -> None:
        self.server = server
        self.settings = server.settings
        self.store = server.store
        self.audit = server.audit

    def exchange(
        self, client: Client, form: Mapping[str, str], origin: RequestOrigin | None = None
    ) -> dict[str, Any]:
        """Answer one token-exchange request of the authenticated ``client``, or raise the
        RFC's error. Once the subject token is known good, every answer is a decision record
        (`_record`) and an audit event with the chain that names it (``token.exchanged`` or
        ``token.exchange_refused``)."""
        seen: dict[str, Any] = {}
        asked = _Asked()
        try:
            return self._exchange(client, form, origin or RequestOrigin(""), seen, asked)
        except OAuthError as error:
            if "chain" in seen:
                reason = asked.reason or f"{error.error}: {error.description}"
                result = "unavailable" if reason == "facts_stale" else "deny"
                error.decision_id = self._record(asked, result, reason, seen)
                self.audit.record(
                    "token.exchange_refused",
                    subject=seen.get("user"),
                    client_id=client.client_id,
                    error=error.error,
                    description=error.description,
                    decision_id=error.decision_id,
                    **{k: v for k, v in seen.items() if k != "user"},
                )
                error.audited = True  # type: ignore[attr-defined]
            raise

    def _record(
        self, asked: _Asked, result: str, reason: str, seen: Mapping[str, Any]
    ) -> str | None:
        """Write the decision record of an exchange (`_Asked`: what it asked, as far as it
        got); its id, or None where no records are kept (no gateway). A refusal made before
        the policy was asked names no deciding principal, as the gateway's do."""
        delegation = self.server.delegation
        records = delegation.records if delegation is not None else None
        if records is None:
            return None
        principals = tuple(map(repr, asked.principals()))
        obligations: dict[str, Any] = {}
        if asked.decided and "requested_scope" in seen:
            # What the policy let through of what was asked (none: refused), and what it kept.
            wanted = seen["requested_scope"].split()
            passed = seen.get("scope", "").split()
            obligations = {"scopes": passed, "trimmed": [s for s in wanted if s not in passed]}
        if asked.grant_id:
            obligations["delegated_grant_id"] = asked.grant_id
        policy_version, sequence = asked.position
        fields = {
            "id": new_decision_id(),
            "at": self.server.clock(),
            "server": asked.server.id if asked.server is not None else "",
            "method": DELEGATION_METHOD,
            "target": repr(asked.server) if asked.server is not None else asked.resource,
            "principals": principals,
            "result": result,
            "arguments_digest": "",  # an exchange has no arguments
            "context": asked.context,
            "deciding_principal": principals[-1] if asked.decided else "",
            "rules": asked.rules,
            "obligations": obligations,
            "reason": reason,
            "latency_us": int((time.perf_counter() - asked.started) * 1e6),
            "policy_version": policy_version,
            "sequence": sequence,
            "grant_id": seen.get("parent_grant_id") or "",
            "task": asked.task,
            "session": "",
            "action": DELEGATION_ACTION,
        }
        # Journalled as the gateway's are (`bastion.audit.journal`): a process killed before
        # the writer's next flush still leaves the record of a token it issued.
        if records.journal is not None:
            records.journal.append(fields)
        records.add(DecisionRecord.of(fields))
        return fields["id"]

    def _exchange(
        self,
        client: Client,
        form: Mapping[str, str],
        origin: RequestOrigin,
        seen: dict[str, Any],
        asked: _Asked,
    ) -> dict[str, Any]:
        now = self.server.clock()
        subject_token, actor_token = _parameters(form)
        # Who asked, from where: the context of a refusal made before the policy is asked.
        client_context = {"ip": origin.address, "id": client.client_id}
        asked.context = {"method": DELEGATION_METHOD, "client": client_context}
        task = form.get("task")
        if task is not None and self.server.tasks is None:
            raise InvalidRequest("task is not supported: this server binds no tokens to tasks")
        if task == "":
            raise InvalidRequest("task must name a task")

        subject = self._token(subject_token, "subject_token")
        chain = subject.agents or (subject.client_id,)
        seen.update(user=subject.subject, chain=list(chain), parent_grant_id=subject.grant_id)
        asked.user, asked.agents = subject.subject, list(chain)
        asked.task = subject.task or ""
        if subject.client_id != client.client_id:
            raise InvalidRequest(
                "subject_token was issued to another client; only the agent a token was issued"
                " to may exchange it"
            )
        if subject.expires_at <= now:
            raise InvalidRequest("subject_token has expired")
        target = self._target(form, subject)
        seen["resource"] = asked.resource = target

        actor = self._token(actor_token, "actor_token", target)
        actor_client = self._actor_client(actor)
        seen["actor"] = actor_client.client_id
        asked.agents = [*chain, actor_client.client_id]
        if actor_client.client_id in chain:
            raise InvalidRequest(
                f"agent {actor_client.client_id!r} is already in the chain {list(chain)}"
            )
        _check_may_act(subject.claims.get("may_act"), actor_client.client_id, self.settings.issuer)
        new_chain = (*chain, actor_client.client_id)
        seen["chain"] = list(new_chain)
        depth = len(new_chain) - 1
        if depth > self.settings.max_delegation_depth:
            raise InvalidRequest(
                f"the chain would hold {depth} delegations; oauth.max_delegation_depth allows"
                f" {self.settings.max_delegation_depth}"
            )
        if subject.task is not None and task is not None and task != subject.task:
            raise InvalidRequest(
                f"subject_token is bound to task {subject.task!r}; a delegation stays in it"
            )

        resource = self.settings.resource(target)
        assert resource is not None  # `_target` checked it
        registered = set((actor_client.scope or "").split())
        available = [s for s in resource.scopes if s in subject.scopes and s in registered]
        if form.get("scope"):
            wanted = list(dict.fromkeys(form["scope"].split()))
            wider = [s for s in wanted if s not in available]
            if wider:
                raise InvalidScope(
                    f"scopes {wider} are more than the subject token's scopes, the actor's"
                    f" registered scopes and the resource allow together: {available}"
                )
        else:
            wanted = available
        seen["requested_scope"] = " ".join(wanted)

        scopes = self._policy(
            subject, chain[-1], actor_client.client_id, target, wanted, origin, asked
        )
        seen["scope"] = " ".join(scopes)
        bound = task if task is not None else subject.task
        asked.task = bound or ""

        seconds = min(self.settings.exchanged_token_seconds, subject.expires_at - int(now))
        parent = self.store.grant(subject.grant_id)
        if parent is None or parent.revoked_at is not None:
            raise InvalidRequest("the grant of subject_token has been revoked")
        grant = Grant(
            grant_id=uuid.uuid4().hex,
            client_id=actor_client.client_id,
            username=parent.username,
            resource=target,
            scope=" ".join(scopes),
            created_at=now,
            expires_at=int(now) + seconds,
            revoked_at=None,
            auth_time=parent.auth_time,
            sign_in=parent.sign_in,  # the subject token's sign-in, never another
            parent_grant_id=parent.grant_id,
            parent_jti=subject.jti,
        )
        extra: dict[str, Any] = {"act": _act(new_chain)}
        if bound is not None:
            extra["task"] = bound
        # The chain keeps the session labels of the token it was exchanged from: a delegation
        # bound to a task its subject was not in reads and records its subject's set, not the
        # task's empty one (what the parent read goes with it into the task, and back).
        if subject.label_set_task != (bound or ""):
            extra["labels_task"] = subject.label_set_task
        extra.update(self._device_claims(subject))
        with self.store.db.transaction():
            try:
                # Its user is checked too: disabled, or every grant revoked since the parent.
                self.store.create_grant(grant, authorized_at=parent.created_at, strangers=True)
            except GrantRefused as refused:
                # The grant is the actor's client's: its revocation is the actor token's fault.
                which = "actor_token" if isinstance(refused, ClientRevoked) else "subject_token"
                raise InvalidRequest(f"{which}: {refused}") from None
            if task is not None:
                try:
                    task_expires = self.server.tasks.bind(
                        task,
                        parent.username or subject.subject,
                        actor_client.client_id,
                        grant.grant_id,
                        chain=new_chain,
                    )
                except ValueError as e:
                    raise InvalidRequest(f"task {task!r} cannot be bound: {e}") from None
                seconds = min(seconds, int(task_expires - now))
            try:
                # The kill switch: any agent of the new chain, or the user, suspended.
                access = self.server.issue_access_token(
                    grant,
                    subject=subject.subject,
                    agents=new_chain,
                    scope=grant.scope,
                    now=now,
                    seconds=seconds,
                    extra=extra,
                )
            except InvalidGrant as refused:
                suspended = getattr(refused, "suspended", None)  # the kill switch's
                if suspended is not None:
                    asked.reason = "suspended"
                    asked.context = {**asked.context, "suspended": repr(suspended)}
                # §2.2.2: an unacceptable subject or actor token is invalid_request.
                raise InvalidRequest(refused.description) from None
        asked.grant_id = grant.grant_id
        decision_id = self._record(asked, "allow", "", seen)
        self.audit.record(
            "token.exchanged",
            subject=subject.subject,
            client_id=actor_client.client_id,
            grant_id=grant.grant_id,
            parent_grant_id=parent.grant_id,
            chain=list(new_chain),
            resource=target,
            requested_scope=" ".join(wanted),
            scope=grant.scope,
            trimmed=[s for s in wanted if s not in scopes],
            task=bound,
            decision_id=decision_id,
        )
        answer = {
            "access_token": access.token,
            "issued_token_type": ACCESS_TOKEN_TYPE,
            "token_type": "Bearer",
            "expires_in": seconds,
            "scope": grant.scope,
        }
        if decision_id is not None:
            answer["decision_id"] = decision_id  # RFC 6749 §5.1 lets a response add members
        return answer

    def _token(self, token: str, name: str, resource: str | None = None) -> VerifiedToken:
        """A token this server issued, checked in full (signature, issuer, audience when
        ``resource`` is given, expiry, revocation); else ``invalid_request`` (§2.2.2)."""
        try:
            verified = self.server.verifier.verify(token, resource, audit=False)
        except InvalidToken as e:
            raise InvalidRequest(f"{name} is not acceptable: {e.reason}") from None
        if verified.jkt is not None:
            # Exchanging it would turn a stolen DPoP-bound token into a Bearer one.
            raise InvalidRequest(f"{name} is bound to a DPoP key: it cannot be exchanged")
        return verified

    def _target(self, form: Mapping[str, str], subject: VerifiedToken) -> str:
        """The resource the new token is for: the subject token's own (a delegation never
        reaches a resource the person did not grant); ``resource`` and ``audience`` (§2.1) may
        name it, nothing else."""
        if len(subject.audience) != 1 or not isinstance(subject.audience[0], str):
            raise InvalidRequest("subject_token must be for exactly one resource")
        own = subject.audience[0]
        for name in ("resource", "audience"):
            value = form.get(name)
            if value is not None and not same_resource(value, own):
                raise InvalidTarget(
                    f"{name} {value!r} is not {own!r}, the resource of subject_token; a"
                    " delegation is for the same resource"
                )
        if self.settings.resource(own) is None:
            raise InvalidTarget(f"{own!r} is no longer a protected resource of this server")
        return own

    def _actor_client(self, actor: VerifiedToken) -> Client:
        """The sub-agent an actor token proves: a token it got for itself by
        ``client_credentials`` (not a person's token, not a delegated one), of a live client."""
        grant = self.store.grant(actor.grant_id)
        if (
            actor.agents
            or actor.subject != actor.client_id
            or grant is None
            or grant.username is not None
            or grant.parent_grant_id is not None
        ):
            raise InvalidRequest(
                "actor_token must be an access token the actor got for itself by client_credentials"
            )
        client = self.store.client(actor.client_id)
        if client is None or client.revoked_at is not None:
            raise InvalidRequest(f"the client of actor_token {actor.client_id!r} is revoked")
        return client

    def _policy(
        self,
        subject: VerifiedToken,
        current: str,
        actor: str,
        target: str,
        wanted: list[str],
        origin: RequestOrigin,
        asked: _Asked,
    ) -> tuple[str, ...]:
        """The scopes of ``wanted`` the policy lets pass from ``current`` to ``actor`` on the
        MCP server at ``target``; refuse when it does not let it delegate at all, or lets none
        pass. What it was asked and answered goes in ``asked``, for the record."""
        delegation = self.server.delegation
        server = delegation.server_of(target) if delegation is not None else None
        if delegation is None or server is None:
            raise InvalidTarget(
                f"no MCP server behind bastion's gateway is served at {target!r}: delegation"
                " is decided per MCP server, and there is none to decide it for"
            )
        asked.server = server
        if delegation.facts_stale():
            asked.reason = "facts_stale"
            raise OAuthError(
                "temporarily_unavailable", "the facts are too old to decide on; retry", 503
            )
        now = self.server.clock()
        context: dict[str, Any] = {
            "server": server.id,
            "method": DELEGATION_METHOD,
            "scopes": sorted(subject.scopes),
            "requested_scopes": list(wanted),
            "client": {"ip": origin.address, "id": current},
            "actor": actor,
            "time": datetime.fromtimestamp(now, UTC),
        }
        if delegation.posture is not None:
            twice = origin.repeated & delegation.posture.proxy_headers
            if twice:
                # Which copy is the trusted proxy's cannot be told: the device is not guessed.
                raise InvalidRequest(
                    f"the {min(twice)} header is sent twice: a device header is read as one"
                    " value, set by the trusted proxy"
                )
            posture = delegation.posture.read(
                origin.address,
                origin.headers,
                subject.claims,
                subject.sign_in.acr,
                subject.sign_in.amr,
            )
            context.update(posture.context(now))
        asked.context = context
        authz = delegation.authorizer()
        asked.position = delegation.position()  # of the policy and facts ``authz`` decides on
        decision = decide_exchange(
            authz,
            asked.principals(),
            server,
            wanted,
            context,
            explained=delegation.records is not None,
        )
        asked.decided, asked.rules = True, decision.rules
        refusal = decision.refusal
        if refusal is not None:
            asked.reason = refusal
        if refusal == "no_scope_delegated":
            raise InvalidScope(f"the policy lets none of the scopes {wanted} pass to {actor!r} now")
        if refusal is not None:
            why = (
                f"may_delegate does not hold for {current!r} to {actor!r} on {server!r}"
                if refusal == "not_permitted"
                else "its evaluation spent its budget"
            )
            raise InvalidRequest(f"the policy refuses this delegation: {why}")
        return decision.scopes

    def _device_claims(self, subject: VerifiedToken) -> dict[str, Any]:
        """The device claims the gateway reads ([signals.posture] device_claim,
        posture_claim), carried over from the subject token so the sub-agent's calls are
        decided with the same device."""
        delegation = self.server.delegation
        posture = delegation.posture if delegation is not None else None
        names = (posture.device_claim, posture.posture_claim) if posture is not None else ()
        reserved = {"iss", "sub", "aud", "client_id", "scope", "jti", "iat", "exp", "act"}
        return {
            n: subject.claims[n] for n in names if n and n not in reserved and n in subject.claims
        }


def _parameters(form: Mapping[str, str]) -> tuple[str, str]:
    """The subject and actor tokens of a well-formed request (§2.1), or ``invalid_request``."""
    subject = form.get("subject_token")
    if not subject:
        raise InvalidRequest("subject_token is required")
    if form.get("subject_token_type") != ACCESS_TOKEN_TYPE:
        raise InvalidRequest(f"subject_token_type must be {ACCESS_TOKEN_TYPE}")
    actor = form.get("actor_token")
    if not actor:
        raise InvalidRequest(
            "actor_token is required: the sub-agent's own access token (client_credentials)"
        )
    if form.get("actor_token_type") != ACCESS_TOKEN_TYPE:
        raise InvalidRequest(f"actor_token_type must be {ACCESS_TOKEN_TYPE}")
    requested = form.get("requested_token_type")
    if requested is not None and requested != ACCESS_TOKEN_TYPE:
        raise InvalidRequest(
            f"requested_token_type {requested!r} is not issued: a delegation gets a short-lived"
            f" access token ({ACCESS_TOKEN_TYPE}), never a refresh token"
        )
    return subject, actor


def _check_may_act(may_act: Any, actor: str, issuer: str) -> None:
    """§4.4: when the subject token says who may act for its subject, the actor must be it.
    Its members are claims that identify that party; each must be the actor's (a bastion
    client of ``issuer``: ``sub``, ``client_id``, ``iss``), and one bastion cannot check (an
    ``email``) refuses, as a party it does not know is not the actor."""
    if may_act is None:
        return
    if not isinstance(may_act, dict) or not isinstance(may_act.get("sub"), str):
        raise InvalidRequest("the may_act claim of subject_token is malformed")
    actors = {"sub": actor, "client_id": actor, "iss": issuer}
    if any(actors.get(name, _UNMATCHED) != value for name, value in may_act.items()):
        raise InvalidRequest(
            f"subject_token may be acted on only by the party its may_act claim names"
            f" ({may_act!r}), not by {actor!r} of {issuer!r}; bastion matches sub, client_id"
            " and iss"
        )


def _act(chain: tuple[str, ...]) -> dict[str, Any]:
    """The ``act`` claim of §4.1 for ``chain`` (oldest agent first): the current actor at the
    top, each earlier one nested inside."""
    act: dict[str, Any] | None = None
    for agent in chain:
        act = {"sub": agent} if act is None else {"sub": agent, "act": act}
    assert act is not None
    return act
