"""bastion as an OAuth 2.1 client of an upstream MCP server's authorization server.

Discovery: the upstream's protected-resource metadata (RFC 9728) names its authorization server,
whose metadata (RFC 8414) gives the endpoints. Registration: a configured client, or dynamic
registration (RFC 7591) as a public client. The authorization code flow with PKCE S256 (RFC
7636), ``state``, and ``resource`` = the upstream's URL (RFC 8707); refresh (RFC 6749 §6);
revocation (RFC 7009) when the server offers it. Every request has a deadline, a size cap and
follows no redirect; every refusal is an `UpstreamOAuthError` carrying the server's ``error``.
Both documents are read again when their lifetime ends, the last good reading kept through a
short outage or a refused document (`bastion.oauth.remote_metadata.RemoteMetadata`). A grant (a
code and its PKCE verifier, a refresh token, a token to revoke) is sent only to the server that
issued it (`IssuerChanged`): the metadata read by another process, or later, may name another
server. A grant of a server other than the one this process read makes it read the upstream's
metadata again at once (at most once per `REREAD_SECONDS`): the upstream may have moved since.
Tokens of a server the upstream no longer names are revoked at that server, found from its own
metadata (`former_server`).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from bastion import untrusted_json
from bastion.connections.settings import UpstreamOAuth
from bastion.egress import PrivateAllowance, cleartext_problem, metadata_allowance
from bastion.http_caching import KeptAnswers
from bastion.names import readable
from bastion.oauth.jwks import (
    CoalescedFetches,
    FetchLimits,
    RemoteDocumentError,
    fetch,
    fetch_json_answer,
)
from bastion.oauth.remote_metadata import RemoteMetadata

_MAX_BYTES = 65536


class UpstreamOAuthError(Exception):
    """The upstream's authorization server refused, or could not be reached. ``error`` is its
    OAuth error code (``invalid_grant``: the grant is gone) or ``unavailable``; what the server
    wrote in it, and in ``description``, as `bastion.names.readable` shows it."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description


class IssuerChanged(UpstreamOAuthError):
    """A grant of one authorization server that the upstream no longer names: it is not sent to
    the server it names now, which could redeem it at the first one (a code with its PKCE
    verifier, a refresh token; RFC 9700 §4.4)."""

    def __init__(self, issued_by: str, current: str) -> None:
        super().__init__(
            "issuer_changed",
            f"issued by {readable(issued_by)}, and the upstream's authorization server is now"
            f" {readable(current)}: not sent there",
        )
        self.issued_by = issued_by


@dataclass(frozen=True)
class ServerMetadata:
    """What bastion uses of an authorization server's metadata (RFC 8414)."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    registration_endpoint: str = ""
    revocation_endpoint: str = ""
    # authorization_response_iss_parameter_supported (RFC 9207 §3): every answer carries iss.
    sends_iss: bool = False


@dataclass(frozen=True)
class TokenSet:
    access_token: str
    refresh_token: str
    expires_at: float
    scope: str
    issuer: str  # the authorization server that issued them: the only one they go back to


def pkce_pair() -> tuple[str, str]:
    """A code verifier and its S256 challenge (RFC 7636 §4.1-4.2)."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def well_known(url: str, name: str) -> str:
    """``url`` with ``/.well-known/<name>`` inserted before its path (RFC 8414 §3, RFC 9728 §3)."""
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    return urlunsplit((parts.scheme, parts.netloc, f"/.well-known/{name}{path}", "", ""))


# The most characters of an authorization server's URL named by an upstream's metadata: it is
# stored in an indexed column (the client bastion registered there), and PostgreSQL indexes no
# entry over 2,704 bytes (one of 3,000 characters was a 500, after registering a client).
MAX_ISSUER = 1024
# The longest an upstream's access token is taken to live, whatever its expires_in says.
MAX_EXPIRES_IN = 365 * 86_400.0
# A grant naming another server than the one read makes the upstream's metadata be read again at
# most this often (per upstream, per process): a row naming a server the upstream never named
# cannot make every call fetch.
REREAD_SECONDS = 30.0
# The former authorization servers whose metadata a process keeps (to revoke their tokens).
_MAX_FORMER = 16


class UpstreamOAuthClient:
    """The client side of one upstream's authorization server.

    The upstream's own metadata chooses every URL bastion then sends its client secret and
    users' refresh tokens to. Unless the upstream is itself on a loopback or private address or
    ``allow_private_addresses`` says so (`bastion.egress.metadata_allowance`, the rule of every
    peer's metadata), they must be https URLs whose names resolve to public addresses only, and
    each request connects to the address checked (`bastion.egress.pinned`): a hostile upstream cannot make bastion post them to its
    own loopback services, the cloud's metadata service or the internal network. A list of
    networks in ``allow_private_addresses`` opens those alone (https, or http to the loopback
    if it is listed); ``true`` opens every non-public address, and plain http to them."""

    def __init__(
        self,
        resource: str,
        settings: UpstreamOAuth,
        name: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.resource = resource  # the upstream's URL: the token's audience
        self.settings = settings
        self.private: PrivateAllowance = metadata_allowance(
            resource, settings.allow_private_addresses
        )
        self.private_setting = f"upstream {name or resource}'s oauth.allow_private_addresses"
        self._limits = FetchLimits(
            timeout_seconds=settings.timeout_seconds,
            max_bytes=_MAX_BYTES,
            # A failed fetch of the metadata is tried again after this long; the calls that
            # need it meanwhile are refused at once with its reason (`CoalescedFetches`).
            refetch_seconds=settings.timeout_seconds,
            time_setting="oauth.timeout_seconds",
            private_addresses=self.private,
            private_setting=self.private_setting,
            # An upstream on the operator's own network may answer over plain http there; one
            # allowed only some networks, over https (or http to the loopback, if listed).
            allow_http=self.private is True,
        )
        self.clock = clock
        # The upstream's metadata and its server's, read again when their lifetime ends.
        self._metadata = RemoteMetadata.of(
            settings,
            self._limits,
            self._read_metadata,
            table="[[gateway.upstreams]] oauth",
            peer=name or resource,
            clock=clock,
        )
        # Reads of the former servers' metadata (`former_server`).
        self._fetches = CoalescedFetches(self._limits, clock)
        # issuer -> its metadata: servers the upstream named before (`former_server`).
        self._former: dict[str, ServerMetadata] = {}

    async def _discovered_issuer(self, answers: KeptAnswers) -> tuple[str, float | None]:
        """The first authorization server the upstream's protected-resource metadata names, and
        the lifetime its headers give."""
        try:
            found, lifetime = await fetch_json_answer(
                well_known(self.resource, "oauth-protected-resource"), self._limits, None, answers
            )
        except RemoteDocumentError as e:
            raise RemoteDocumentError(f"metadata of {self.resource}: {e}") from None
        servers = found.get("authorization_servers") if isinstance(found, dict) else None
        named = servers[0] if isinstance(servers, list) and servers else None
        why = self._unusable(named)
        if why or not isinstance(named, str) or not named.isascii() or len(named) > MAX_ISSUER:
            raise RemoteDocumentError(
                f"{self.resource}'s protected-resource metadata names no usable authorization"
                f" server (an https URL of at most {MAX_ISSUER} ASCII characters)"
                f"{': ' + why if why else ''}; set oauth.issuer"
            )
        return named.rstrip("/"), lifetime

    def _unusable(self, url: Any) -> str:
        """Why bastion may not send requests to ``url``, or "" if it may (its host's addresses
        are checked as the request is made): https, or plain http to the loopback
        (`egress.cleartext_problem`), and the loopback only for an upstream that may lead
        bastion to private addresses."""
        problem = cleartext_problem(url)
        if problem is not None:
            return f"{url} {problem}" if isinstance(url, str) else "not a URL"
        if urlsplit(url).scheme == "http" and not self.private:
            return (
                f"{url} is on the loopback, and an upstream on a public address leads bastion to"
                f" public addresses only ({self.private_setting})"
            )
        return ""

    async def metadata(self) -> ServerMetadata:
        """The authorization server's metadata: read again when its lifetime ends, the last
        good one kept through a short outage or a refused document for
        ``metadata_stale_seconds`` (`RemoteMetadata`: one read at a time; a failure is tried
        again after ``timeout_seconds``). `UpstreamOAuthError` ``unavailable`` when none can
        be used."""
        try:
            return await self._metadata.get()
        except RemoteDocumentError as e:
            raise UpstreamOAuthError("unavailable", str(e)) from None

    async def _read_metadata(self, answers: KeptAnswers) -> tuple[ServerMetadata, float | None]:
        """The server's metadata (the configured issuer's, or the one the upstream's
        protected-resource metadata names), each check passed, and the shorter lifetime the two
        documents' headers give; `RemoteDocumentError` when either cannot be had or fails a
        check (it never replaces a good one)."""
        named_for = None
        if self.settings.issuer:
            issuer = self.settings.issuer
        else:
            issuer, named_for = await self._discovered_issuer(answers)
        meta, lifetime = await self._server_metadata(issuer, answers)
        lifetimes = [t for t in (named_for, lifetime) if t is not None]
        return meta, min(lifetimes) if lifetimes else None

    async def _server_metadata(
        self, issuer: str, answers: KeptAnswers | None = None
    ) -> tuple[ServerMetadata, float | None]:
        """``issuer``'s metadata, at its RFC 8414 well-known URL, naming ``issuer`` as its
        issuer (§3.3), with usable endpoints and PKCE S256; and the lifetime its headers give."""
        try:
            document, lifetime = await fetch_json_answer(
                well_known(issuer, "oauth-authorization-server"), self._limits, None, answers
            )
        except RemoteDocumentError as e:
            raise RemoteDocumentError(f"metadata of {issuer}: {e}") from None
        named = document.get("issuer") if isinstance(document, dict) else None
        if not isinstance(named, str) or named.rstrip("/") != issuer:
            raise RemoteDocumentError(f"the metadata of {issuer} does not name it as its issuer")
        endpoints = {}
        for name in ("authorization_endpoint", "token_endpoint"):
            why = self._unusable(document.get(name))
            if why:
                raise RemoteDocumentError(f"{issuer} gives no usable {name}: {why}")
            endpoints[name] = document[name]
        for name in ("registration_endpoint", "revocation_endpoint"):
            value = document.get(name)
            endpoints[name] = "" if self._unusable(value) else value
        methods = document.get("code_challenge_methods_supported")
        if not isinstance(methods, list) or "S256" not in methods:
            # OAuth 2.1 and MCP: no PKCE S256 advertised, no authorization.
            raise RemoteDocumentError(f"{issuer} does not advertise PKCE S256")
        sends_iss = document.get("authorization_response_iss_parameter_supported") is True
        return ServerMetadata(issuer=issuer, sends_iss=sends_iss, **endpoints), lifetime

    async def metadata_of(self, issuer: str | None) -> ServerMetadata:
        """The metadata of the server that issued a grant (``issuer``), to send the grant to;
        `IssuerChanged` if the upstream names another server, read again (`_reread`) if this
        process read another than ``issuer``. None: a grant kept before bastion recorded its
        issuer, taken as the current server's."""
        meta = await self.metadata()
        if issuer is not None and issuer != meta.issuer:
            meta = await self._reread(meta)
            if issuer != meta.issuer:
                raise IssuerChanged(issuer, meta.issuer)
        return meta

    async def _reread(self, known: ServerMetadata) -> ServerMetadata:
        """The upstream's metadata read again, in place of ``known`` for every use after (the
        upstream may have moved since this process read it: another replica, or this one
        later, made the grant at the server it names now). One read at a time, and at most one
        per `REREAD_SECONDS`: until then what was read last decides, or the calls are refused
        with why the read failed (`UpstreamOAuthError` ``unavailable``; a grant is neither sent
        nor dropped on a read that failed, and never on the stale metadata's word)."""
        try:
            return await self._metadata.read_again(known, REREAD_SECONDS)
        except RemoteDocumentError as e:
            raise UpstreamOAuthError("unavailable", str(e)) from None

    async def former_server(self, issuer: str) -> ServerMetadata:
        """The metadata of ``issuer``, a server the upstream no longer names, read from its own
        RFC 8414 well-known URL under the rules of every other (egress, deadline, size, issuer
        named in it): the only server its tokens may be revoked at. Kept per process."""
        kept = self._former.get(issuer)
        if kept is not None:
            return kept
        why = self._unusable(issuer)
        if not why and (not issuer.isascii() or len(issuer) > MAX_ISSUER):
            why = f"{readable(issuer)} is no URL of at most {MAX_ISSUER} ASCII characters"
        if why:
            raise UpstreamOAuthError("unavailable", why)

        async def read() -> ServerMetadata:
            meta, _ = await self._server_metadata(issuer)
            if len(self._former) >= _MAX_FORMER:
                del self._former[next(iter(self._former))]  # the oldest
            self._former[issuer] = meta
            return meta

        try:
            return await self._fetches.once(
                f"former {issuer}", read, lambda: self._former.get(issuer)
            )
        except RemoteDocumentError as e:
            raise UpstreamOAuthError("unavailable", str(e)) from None

    async def register(
        self, meta: ServerMetadata, redirect_uri: str, client_name: str
    ) -> dict[str, str]:
        """A dynamic registration (RFC 7591) as a public client at ``meta``'s server:
        ``{"client_id": ...}``."""
        if not meta.registration_endpoint:
            raise UpstreamOAuthError(
                "unavailable",
                f"{meta.issuer} has no dynamic registration: set oauth.client_id (and"
                " client_secret) to a client registered there",
            )
        body = {
            "client_name": client_name,
            "redirect_uris": [redirect_uri],
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "token_endpoint_auth_method": "none",
        }
        if self.settings.scopes:
            body["scope"] = " ".join(self.settings.scopes)
        answer = await self._post(meta.registration_endpoint, json_body=body, expect=(200, 201))
        client_id = answer.get("client_id")
        if not isinstance(client_id, str) or not client_id:
            raise UpstreamOAuthError("unavailable", f"{meta.issuer} registered no client_id")
        secret = answer.get("client_secret")
        return {"client_id": client_id, "client_secret": secret if isinstance(secret, str) else ""}

    def authorization_url(
        self, meta: ServerMetadata, client_id: str, redirect_uri: str, state: str, challenge: str
    ) -> str:
        params = {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": redirect_uri,
            "state": state,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "resource": self.resource,
        }
        if self.settings.scopes:
            params["scope"] = " ".join(self.settings.scopes)
        separator = "&" if urlsplit(meta.authorization_endpoint).query else "?"
        return f"{meta.authorization_endpoint}{separator}{urlencode(params)}"

    async def exchange_code(
        self,
        client: dict[str, str],
        code: str,
        verifier: str,
        redirect_uri: str,
        now: float,
        issuer: str | None,
    ) -> TokenSet:
        """Redeem ``code`` of a flow started with ``issuer``'s authorization server."""
        meta = await self.metadata_of(issuer)
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": verifier,
            "resource": self.resource,
        }
        return self._tokens(await self._token_request(meta, client, form), now, "", meta)

    async def refresh(
        self, meta: ServerMetadata, client: dict[str, str], refresh_token: str, now: float
    ) -> TokenSet:
        """Refresh with ``refresh_token`` at ``meta``'s server, the one that issued it
        (`metadata_of`)."""
        form = {
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "resource": self.resource,
        }
        return self._tokens(await self._token_request(meta, client, form), now, refresh_token, meta)

    async def revoke(
        self, meta: ServerMetadata, client: dict[str, str], token: str, hint: str
    ) -> bool:
        """RFC 7009 revocation of ``token`` at ``meta``'s server, the one that issued it, by
        bastion's ``client`` there; False if the server offers none."""
        if not meta.revocation_endpoint:
            return False
        form = {"token": token, "token_type_hint": hint}
        await self._post(meta.revocation_endpoint, form=self._authenticated(client, form))
        return True

    # -- HTTP ------------------------------------------------------------------------------------

    def _authenticated(self, client: dict[str, str], form: dict[str, str]) -> dict[str, str]:
        """Client authentication in the body (client_secret_post), or the public client's id."""
        form = {**form, "client_id": client["client_id"]}
        if client.get("client_secret"):
            form["client_secret"] = client["client_secret"]
        return form

    async def _token_request(
        self, meta: ServerMetadata, client: dict[str, str], form: dict[str, str]
    ) -> dict[str, Any]:
        return await self._post(meta.token_endpoint, form=self._authenticated(client, form))

    def _tokens(
        self, answer: dict[str, Any], now: float, old_refresh: str, meta: ServerMetadata
    ) -> TokenSet:
        access = answer.get("access_token")
        kind = str(answer.get("token_type", "")).lower()
        if not isinstance(access, str) or not access or kind != "bearer":
            raise UpstreamOAuthError("unavailable", "the token endpoint sent no bearer token")
        expires_in = answer.get("expires_in")
        if isinstance(expires_in, bool) or not isinstance(expires_in, int | float):
            expires_in = 3600  # RFC 6749 §5.1 makes it optional; assume an hour
        # At most a year: a time past the calendar (9e18 s) broke what shows or compares it.
        expires_in = min(float(expires_in), MAX_EXPIRES_IN)
        refresh = answer.get("refresh_token")
        scope = answer.get("scope")
        return TokenSet(
            access_token=access,
            # A server that does not rotate refresh tokens sends none back on refresh.
            refresh_token=refresh if isinstance(refresh, str) else old_refresh,
            expires_at=now + max(0.0, expires_in),
            scope=scope if isinstance(scope, str) else " ".join(self.settings.scopes),
            issuer=meta.issuer,
        )

    async def _post(
        self,
        url: str,
        *,
        form: dict[str, str] | None = None,
        json_body: dict[str, Any] | None = None,
        expect: tuple[int, ...] = (200,),
    ) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        shown = readable(url)  # the server's own metadata chose it
        try:
            status, body = await fetch(
                "POST", url, self._limits, data=form, json=json_body, headers=headers
            )
        except RemoteDocumentError as e:
            raise UpstreamOAuthError("unavailable", f"{shown} {e}") from None
        refused: untrusted_json.JsonRefused | None = None
        try:
            answer = untrusted_json.loads(body) if body else {}
        except untrusted_json.JsonRefused as e:
            answer, refused = None, e
        if status not in expect:
            error = answer.get("error") if isinstance(answer, dict) else None
            description = answer.get("error_description") if isinstance(answer, dict) else None
            # The server writes both: they reach logs, pages, audit records and the agent's
            # error as `readable` shows them (a line break, an ANSI escape, U+202E escaped, and
            # cut), so an error here can neither forge a line nor flood one.
            raise UpstreamOAuthError(
                readable(error) if isinstance(error, str) and status < 500 else "unavailable",
                readable(str(description)) if description else f"{shown} answered HTTP {status}",
            )
        if refused is not None:
            raise UpstreamOAuthError(
                "unavailable", f"{shown} sent no JSON: {readable(str(refused))}"
            )
        if not isinstance(answer, dict):
            raise UpstreamOAuthError("unavailable", f"{shown} sent no JSON object")
        return answer
