"""OAuth Client ID Metadata Documents (draft-ietf-oauth-client-id-metadata-document, adopted by the
MCP authorization specification): a ``client_id`` that is an https URL names a JSON document of
client metadata, which the authorization server fetches and validates.

Fetches are bounded (one deadline for all of a fetch, size, no redirects, fetches in progress
and documents per host) and never reach private, loopback or link-local addresses but those
``allow_private_addresses`` allows (all of them, or the networks it lists,
`bastion.egress.may_connect`): the name is resolved once, its addresses checked, and
the connection made to a checked address (a name resolved again could lead elsewhere: DNS
rebinding), with TLS still verifying the certificate for the name. Valid documents are cached
as long as their ``Cache-Control`` or ``Expires`` says (the draft: "respecting HTTP cache
headers"), within ``min_cache_seconds`` and ``cache_seconds`` (`bastion.http_caching`), so a
redirect URI the client removed is not honoured past that, and a ``no-store`` does not make
every request a fetch; failures are cached for a short while, so a failing URL is not fetched
again on every request that names it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import anyio
import httpx

from bastion import untrusted_json
from bastion.egress import AddressRefused, pinned, url_syntax_problem
from bastion.http_caching import freshness_lifetime, kept_seconds
from bastion.http_fields import is_json_media
from bastion.oauth.errors import OAuthError
from bastion.oauth.jwks import RemoteDocumentError, read_body
from bastion.oauth.redirect_uris import redirect_uri_problem, uri_syntax_problem
from bastion.oauth.registration import client_name_problem
from bastion.oauth.settings import ClientMetadataDocumentSettings
from bastion.oauth.store import Client
from bastion.tls import fetching_client, file_context

_FORBIDDEN_MEMBERS = ("client_secret", "client_secret_expires_at")
# The setting that allows non-public addresses, named in a refusal.
PRIVATE_SETTING = "[oauth.client_metadata] allow_private_addresses"
_GRANT_TYPES = ("authorization_code", "refresh_token")


class ClientMetadataDocumentError(OAuthError):
    """The document cannot be used; answered as ``invalid_client``."""

    def __init__(self, url: str, description: str) -> None:
        super().__init__("invalid_client", f"client metadata document {url}: {description}", 401)


# The most characters of a client_id that is a metadata document's URL. It is stored in indexed
# columns (the client, its consents, its Agent facts and alerts), and PostgreSQL indexes no
# entry over 2,704 bytes: a URL of 3,000 characters was a 500 at /authorize there.
MAX_CLIENT_ID_URL = 1024


def is_client_id_url(client_id: str) -> bool:
    """Whether a client_id names a metadata document rather than a registered client."""
    return client_id.startswith("https://")


def client_id_url_problem(url: str) -> str | None:
    """Why a URL cannot be a client_id (the draft's §3 rules), or None. It must be an RFC 3986
    URI, ASCII only: its host is shown on the consent page as who the client is, and a Unicode
    host could pass for another (a Cyrillic "а" in "аpple.com"); in punycode it cannot. And at
    most `MAX_CLIENT_ID_URL` characters."""
    if len(url) > MAX_CLIENT_ID_URL:
        return f"longer than {MAX_CLIENT_ID_URL} characters"
    syntax = uri_syntax_problem(url)
    if syntax:
        return syntax
    if url_syntax_problem(url):
        return "not a valid URL"
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        return "must be an https URL"
    if parts.hostname.endswith("."):
        # "example.com." is "example.com" (RFC 1034 §3.1): one document, two client_ids, each
        # with limits of its own per host.
        return "must name its host without a trailing dot"
    if parts.path in ("", "/"):
        return "must have a path"
    if parts.fragment or "#" in url:
        return "must not have a fragment"
    if "@" in parts.netloc:  # even an empty one, "https://@host/": user information all the same
        return "must not carry user information"
    if _has_dot_segment(parts.path):
        return "must not have dot segments, in any spelling (%2e, ..%2f, ..%5c, ..;)"
    return None


def _has_dot_segment(path: str) -> bool:
    """Whether ``path`` has a ``.`` or ``..`` segment as a server may read it: percent-decoded
    (``%2e%2e`` is ``..``, RFC 3986 §6.2.2.2; decoded again while that changes it, for a server
    that decodes twice), split at ``/`` and at ``\\`` (``%2f``, ``%5c``: some servers split
    there), and without a segment's ``;`` parameters (``..;x`` is ``..`` to some). Such a URL
    names a document at another path of the host than the one it shows: under
    ``/official/%2e%2e/users/evil/``, what any user of the host may have written."""
    previous = None
    while path != previous:
        previous, path = path, unquote(path)
    return any(segment.partition(";")[0] in (".", "..") for segment in re.split(r"[/\\]", path))


@dataclass(frozen=True)
class _Remembered:
    """A document's client, or why it could not be used, until ``expires_at``."""

    expires_at: float
    client: Client | None = None
    error: ClientMetadataDocumentError | None = None


class ClientMetadataDocuments:
    """Fetches, validates and caches client ID metadata documents.

    Every limit here is per process: the caches, the documents remembered per host and the
    fetches in progress (per host and in all) live in memory.
    """

    def __init__(
        self, settings: ClientMetadataDocumentSettings, clock: Callable[[], float]
    ) -> None:
        self.settings = settings
        self.clock = clock
        self._documents: dict[str, _Remembered] = {}
        self._failures: dict[str, _Remembered] = {}
        self._fetching: dict[str, int] = {}  # host -> fetches in progress
        self._per_host: dict[str, dict[str, float]] = {}  # host -> {document URL: expires_at}

    async def client(self, url: str) -> Client:
        """The client a document URL describes, from cache or a fresh fetch. A failure is
        remembered for ``failure_cache_seconds``: the URL is not fetched again meanwhile."""
        now = self.clock()
        for remembered in (self._documents.get(url), self._failures.get(url)):
            if remembered is not None and remembered.expires_at > now:
                if remembered.client is not None:
                    return remembered.client
                assert remembered.error is not None
                raise remembered.error
        problem = client_id_url_problem(url)
        if problem:
            raise ClientMetadataDocumentError(url, problem)
        host = (urlsplit(url).hostname or "").lower()
        self._check_host_limits(url, host, now)
        self._fetching[host] = self._fetching.get(host, 0) + 1
        try:
            document, lifetime = await self._fetch(url)
            client = self._validate(url, document)
        except ClientMetadataDocumentError as error:
            self._remember(
                self._failures,
                url,
                _Remembered(now + self.settings.failure_cache_seconds, error=error),
            )
            raise
        finally:
            self._fetching[host] -= 1
            if not self._fetching[host]:
                del self._fetching[host]
        self._failures.pop(url, None)
        settings = self.settings
        kept = kept_seconds(lifetime, settings.min_cache_seconds, settings.cache_seconds)
        expires_at = self.clock() + kept
        self._remember(self._documents, url, _Remembered(expires_at, client))
        if host not in self._per_host and len(self._per_host) >= self.settings.max_cached_documents:
            now = self.clock()
            for stale in [
                h for h, urls in self._per_host.items() if all(e <= now for e in urls.values())
            ]:
                del self._per_host[stale]
        self._per_host.setdefault(host, {})[url] = expires_at
        return client

    def _check_host_limits(self, url: str, host: str, now: float) -> None:
        """Refuse (without remembering it against the URL) a fetch that would exceed the host's
        share (its fetches in progress, or the documents remembered from it) or all hosts' fetches
        in progress together."""
        settings = self.settings
        if sum(self._fetching.values()) >= settings.max_concurrent_fetches:
            raise ClientMetadataDocumentError(
                url,
                f"this server already has {settings.max_concurrent_fetches} client metadata"
                " document fetch(es) in progress; try again shortly",
            )
        if self._fetching.get(host, 0) >= settings.max_concurrent_fetches_per_host:
            raise ClientMetadataDocumentError(
                url,
                f"{host} already has {settings.max_concurrent_fetches_per_host} document"
                " fetch(es) in progress; try again shortly",
            )
        known = self._per_host.get(host, {})
        for expired in [u for u, expires_at in known.items() if expires_at <= now]:
            del known[expired]
        if url not in known and len(known) >= settings.max_documents_per_host:
            raise ClientMetadataDocumentError(
                url,
                f"{host} already serves {len(known)} client documents known to this server"
                f" (at most {settings.max_documents_per_host} per host); try again later",
            )

    def _remember(self, table: dict[str, _Remembered], url: str, entry: _Remembered) -> None:
        """Keep ``entry``, dropping expired entries and then the oldest when the table is full."""
        table.pop(url, None)
        if len(table) >= self.settings.max_cached_documents:
            now = self.clock()
            for key in [k for k, v in table.items() if v.expires_at <= now]:
                del table[key]
            while len(table) >= self.settings.max_cached_documents:
                del table[next(iter(table))]
        table[url] = entry

    async def _fetch(self, url: str) -> tuple[dict[str, Any], float | None]:
        """The document and how long its headers say it may be reused (None: they say nothing),
        fetched within one deadline for all of it: httpx's own timeouts bound each read, so a
        server that trickles its headers or body could hold a fetch for ever."""
        seconds = self.settings.timeout_seconds
        try:
            with anyio.fail_after(seconds):
                body, lifetime = await self._download(url)
        except TimeoutError as exc:
            raise ClientMetadataDocumentError(
                url, f"could not be fetched within {seconds} s (resolving, connecting and reading)"
            ) from exc
        try:
            # Anyone's JSON: nesting is bounded (JsonRefused is a ValueError), never recursed on.
            document = untrusted_json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ClientMetadataDocumentError(url, f"is not JSON ({exc})") from exc
        if not isinstance(document, dict):
            raise ClientMetadataDocumentError(url, "is not a JSON object")
        return document, lifetime

    async def _download(self, url: str) -> tuple[bytes, float | None]:
        target = httpx.URL(url)
        headers = {"Accept": "application/json"}
        extensions: dict[str, Any] = {}
        private = self.settings.allow_private_addresses
        if private is not True:
            # To the address checked, by the name: Host and TLS (SNI, the certificate's name)
            # are the document's; only where the connection goes is fixed.
            try:
                target, named, extensions = await pinned(target, private)
            except AddressRefused as exc:
                raise ClientMetadataDocumentError(url, exc.naming(PRIVATE_SETTING)) from None
            headers.update(named)
        ca_file = self.settings.ca_file
        verify = file_context(ca_file) if ca_file else None
        limit = self.settings.max_bytes
        try:
            async with (
                fetching_client(verify=verify, timeout=self.settings.timeout_seconds) as http,
                http.stream("GET", target, headers=headers, extensions=extensions) as response,
            ):
                if response.status_code != 200:
                    raise ClientMetadataDocumentError(
                        url, f"answered HTTP {response.status_code}, expected 200"
                    )
                content_type = response.headers.get("content-type", "")
                # The draft's §4: JSON (`is_json_media`). Any other type is an error: a file
                # that users of a host may upload (a paste, an attachment) is served as text or
                # bytes, and would otherwise pass for a client of that host, whose name is what
                # the consent page shows.
                if not is_json_media(content_type):
                    raise ClientMetadataDocumentError(
                        url,
                        f"was served with content type {content_type!r}; a client metadata"
                        " document is application/json (or application/<type>+json)",
                    )
                lifetime = freshness_lifetime(response.headers, time.time())
                body = await read_body(response, limit)
        except RemoteDocumentError:
            raise ClientMetadataDocumentError(url, f"is larger than {limit} bytes") from None
        except httpx.HTTPError as exc:
            raise ClientMetadataDocumentError(url, f"could not be fetched ({exc!r})") from exc
        return body, lifetime

    def _validate(self, url: str, document: dict[str, Any]) -> Client:
        if document.get("client_id") != url:
            raise ClientMetadataDocumentError(url, "its client_id must equal the document URL")
        for member in _FORBIDDEN_MEMBERS:
            if member in document:
                raise ClientMetadataDocumentError(url, f"must not contain {member}")
        method = document.get("token_endpoint_auth_method", "none")
        if method != "none":
            raise ClientMetadataDocumentError(
                url, f"token_endpoint_auth_method {method!r} is not supported; use 'none'"
            )
        redirect_uris = document.get("redirect_uris")
        if not isinstance(redirect_uris, list) or not redirect_uris or len(redirect_uris) > 10:
            raise ClientMetadataDocumentError(url, "redirect_uris must list 1 to 10 URIs")
        for uri in redirect_uris:
            problem = redirect_uri_problem(uri)
            if problem:
                raise ClientMetadataDocumentError(url, problem)
        grant_types = document.get("grant_types", ["authorization_code"])
        if not isinstance(grant_types, list) or not all(g in _GRANT_TYPES for g in grant_types):
            raise ClientMetadataDocumentError(
                url, f"grant_types must be among {list(_GRANT_TYPES)}"
            )
        name = document.get("client_name")
        if not isinstance(name, str) or not name.strip():
            # MCP's required members (client_id, client_name, redirect_uris): the consent page
            # names the client by it, beside the host it is sent back to.
            raise ClientMetadataDocumentError(
                url, "client_name is required: the name the consent page shows"
            )
        if problem := client_name_problem(name):
            raise ClientMetadataDocumentError(url, problem)
        scope = document.get("scope")
        if scope is not None and not isinstance(scope, str):
            raise ClientMetadataDocumentError(url, "scope must be a string")
        return Client(
            client_id=url,
            client_name=name.strip(),
            redirect_uris=tuple(redirect_uris),
            grant_types=tuple(dict.fromkeys(grant_types)),
            token_endpoint_auth_method="none",
            scope=scope,
            source="metadata_document",
            metadata={},
            created_at=self.clock(),
            revoked_at=None,
        )
