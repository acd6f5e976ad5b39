"""Remote JSON Web Key Sets (RFC 7517 §5) and the JSON documents that point to them (RFC 8414,
OpenID Connect Discovery): fetched off the event loop with one deadline, a size cap and no
redirects, then kept in a bounded cache as long as its ``Cache-Control`` (or ``Expires``) says,
within ``refetch_seconds`` and ``cache_seconds`` (`bastion.http_caching`): a key the issuer
withdrew is not trusted past that. A ``kid`` the cached set lacks (or none, while it holds
several keys) is a key rotation: the set is fetched again. Either way a URI is fetched at most
once every ``refetch_seconds``, so neither made-up kids nor a ``no-store`` turn into a stream of
fetches.

Used by ``private_key_jwt`` client authentication (`bastion.oauth.client_assertion`), the
verification of trusted issuers' access tokens (`bastion.identity.trusted_issuers`), ID-JAGs
(`bastion.oauth.jwt_bearer`) and Shared Signals transmitters' SETs (`bastion.signals.ssf`).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar
from urllib.parse import urlsplit

import anyio
import httpx
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import Key, KeySet
from joserfc.jws import CompactSignature

from bastion import untrusted_json
from bastion.egress import (
    AddressRefused,
    CleartextRefused,
    PrivateAllowance,
    metadata_allowance,
    pinned,
)
from bastion.http_caching import (
    KeptAnswer,
    KeptAnswers,
    freshness_lifetime,
    kept_seconds,
    validators,
)
from bastion.http_fields import media_type
from bastion.tls import fetching_client

_T = TypeVar("_T")

log = logging.getLogger("bastion.oauth.jwks")


class RemoteDocumentError(Exception):
    """A remote key set or metadata document could not be had: the message says why (the URI is
    the caller's to name)."""


@dataclass(frozen=True)
class FetchLimits:
    """How a remote document is fetched and kept. ``time_setting``, ``bytes_setting`` and
    ``refetch_setting`` name the settings of the time, size and refetch limits, for errors
    (none: fixed)."""

    timeout_seconds: float = 5
    max_bytes: int = 65536
    # A key set is kept as long as its Cache-Control or Expires says, but no longer than
    # cache_seconds nor shorter than refetch_seconds (`bastion.http_caching.kept_seconds`).
    cache_seconds: float = 300
    refetch_seconds: float = 30
    max_cached: int = 1000
    time_setting: str = ""
    bytes_setting: str = ""
    refetch_setting: str = ""
    # The non-public addresses the fetch may connect to (`bastion.egress.PrivateAllowance`):
    # every one (a URI the deployment chose, fetched as given), or, for a URI that is someone
    # else's choice, none or the networks a setting lists, each name resolved once and the
    # connection made to the address checked (`bastion.egress.pinned`). ``private_setting``
    # names that setting.
    private_addresses: PrivateAllowance = True
    private_setting: str = ""
    # Plain http beyond the loopback too (`bastion.egress.cleartext_problem`): only where a
    # setting says so, named by ``private_setting``.
    allow_http: bool = False

    @classmethod
    def of_issuer(cls, settings: Any, table: str) -> FetchLimits:
        """The limits an issuer's settings in ``table`` name (``timeout_seconds``,
        ``max_document_bytes``, ``jwks_cache_seconds``, ``jwks_refetch_seconds``: trusted
        issuers, ID-JAG providers and OpenID providers all have them), keeping a few key sets."""
        return cls(
            timeout_seconds=settings.timeout_seconds,
            max_bytes=settings.max_document_bytes,
            cache_seconds=settings.jwks_cache_seconds,
            refetch_seconds=settings.jwks_refetch_seconds,
            max_cached=4,
            time_setting=f"{table} timeout_seconds",
            bytes_setting=f"{table} max_document_bytes",
            refetch_setting=f"{table} jwks_refetch_seconds",
        )

    @classmethod
    def of_issuer_metadata(cls, settings: Any, table: str) -> FetchLimits:
        """`of_issuer`'s limits for the endpoints the issuer's own metadata names (its key set,
        token, UserInfo and introspection endpoints: the issuer's choice, not the operator's):
        reached only at the addresses `bastion.egress.metadata_allowance` allows for its
        ``issuer`` and ``allow_private_addresses``, each name resolved once and the connection
        made to the address checked (`bastion.egress.pinned`)."""
        return replace(
            cls.of_issuer(settings, table),
            private_addresses=metadata_allowance(settings.issuer, settings.allow_private_addresses),
            private_setting=f"{table} allow_private_addresses",
        )


def _named(setting: str) -> str:
    return f" ({setting})" if setting else ""


async def read_body(response: httpx.Response, max_bytes: int, setting: str = "") -> bytes:
    """The body of a streamed ``response``, read no further than ``max_bytes``
    (`RemoteDocumentError` past them; ``setting`` names their setting)."""
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > max_bytes:
            raise RemoteDocumentError(f"sent more than {max_bytes} bytes" + _named(setting))
    return bytes(body)


@dataclass(frozen=True)
class Answer:
    """What another party answered: its status, its body (empty when the status was not among
    those read), how long its headers say it may be reused (`bastion.http_caching`: None
    when they say nothing), and the validators they give to ask for it again conditionally
    (`bastion.http_caching.validators`: "" when none)."""

    status: int
    body: bytes
    lifetime: float | None
    etag: str = ""
    last_modified: str = ""


async def fetch_answer(
    method: str,
    uri: str,
    limits: FetchLimits,
    transport: httpx.AsyncBaseTransport | None = None,
    *,
    only: tuple[int, ...] | None = None,
    **request: Any,
) -> Answer:
    """One request to another party (`bastion.tls.fetching_client`: no redirect followed, https
    or the loopback), its whole answer within ``limits``; the body left unread, empty, when the
    status is not among ``only``. `RemoteDocumentError` when it does not answer in time, sends
    more than the limit, cannot be reached, is plain http beyond the loopback, or its host
    resolves to a non-public address ``limits.private_addresses`` does not allow. ``request``:
    httpx's (data, json, params, headers)."""
    extensions: dict[str, Any] = {}
    try:
        target = httpx.URL(uri)
        with anyio.fail_after(limits.timeout_seconds):
            if limits.private_addresses is not True:
                target, named, extensions = await pinned(target, limits.private_addresses)
                request["headers"] = {**request.get("headers", {}), **named}
            async with (
                fetching_client(
                    transport, allow_http=limits.allow_http, timeout=limits.timeout_seconds
                ) as http,
                http.stream(method, target, extensions=extensions, **request) as response,
            ):
                status = response.status_code
                lifetime = freshness_lifetime(response.headers, time.time())
                etag, last_modified = validators(response.headers)
                if only is not None and status not in only:
                    return Answer(status, b"", lifetime, etag, last_modified)
                body = await read_body(response, limits.max_bytes, limits.bytes_setting)
                return Answer(status, body, lifetime, etag, last_modified)
    except TimeoutError:
        raise RemoteDocumentError(
            f"did not answer within {limits.timeout_seconds} s" + _named(limits.time_setting)
        ) from None
    except AddressRefused as exc:
        raise RemoteDocumentError(exc.naming(limits.private_setting)) from None
    except CleartextRefused as exc:
        raise RemoteDocumentError(f"{exc}" + _named(limits.private_setting)) from None
    except httpx.HTTPError as exc:
        raise RemoteDocumentError(f"cannot be fetched: {exc}") from None


async def fetch(
    method: str,
    uri: str,
    limits: FetchLimits,
    transport: httpx.AsyncBaseTransport | None = None,
    *,
    only: tuple[int, ...] | None = None,
    **request: Any,
) -> tuple[int, bytes]:
    """`fetch_answer`'s status and body, for a caller that keeps nothing of the answer."""
    answer = await fetch_answer(method, uri, limits, transport, only=only, **request)
    return answer.status, answer.body


async def fetch_json_answer(
    uri: str,
    limits: FetchLimits,
    transport: httpx.AsyncBaseTransport | None = None,
    answers: KeptAnswers | None = None,
) -> tuple[Any, float | None]:
    """GET ``uri`` and read its body as untrusted JSON, within ``limits``: (the JSON, how long
    its headers say it may be reused or None). `RemoteDocumentError` on any failure (timeout,
    HTTP status other than 200, too large, not JSON). With ``answers``, asked for
    conditionally when an answer of ``uri`` is kept there (RFC 9111 §4.3.1): a ``304`` is that
    answer again, renewed (§4.3.4), read afresh as it was; a 200 is kept there for the next
    time."""
    headers = {"Accept": "application/json"}
    kept = answers.get(uri) if answers is not None else None
    if answers is not None:
        headers.update(answers.conditions(uri))
    answer = await fetch_answer("GET", uri, limits, transport, only=(200,), headers=headers)
    if answer.status == 304 and kept is not None:
        body = kept.body
        lifetime = kept.lifetime if answer.lifetime is None else answer.lifetime
        # §4.3.4: the 304's validators, where it gives them, describe the kept answer now.
        answer = Answer(
            200,
            body,
            lifetime,
            answer.etag or kept.etag,
            answer.last_modified or kept.last_modified,
        )
    elif answer.status != 200:
        raise RemoteDocumentError(f"answered HTTP {answer.status}")
    try:
        document = untrusted_json.loads(answer.body)
    except untrusted_json.JsonRefused as exc:
        raise RemoteDocumentError(f"sent no JSON: {exc}") from None
    if answers is not None:
        answers.keep(
            uri, KeptAnswer(answer.body, answer.etag, answer.last_modified, answer.lifetime)
        )
    return document, answer.lifetime


async def fetch_json(
    uri: str, limits: FetchLimits, transport: httpx.AsyncBaseTransport | None = None
) -> Any:
    """`fetch_json_answer`'s JSON, for a caller that keeps nothing of the answer."""
    return (await fetch_json_answer(uri, limits, transport))[0]


@dataclass
class _Fetched:
    keys: KeySet
    fetched_at: float
    # How long it is used (`bastion.http_caching.kept_seconds`): its Cache-Control or Expires,
    # at least ``refetch_seconds`` and at most ``cache_seconds``.
    kept_seconds: float


class HeaderRefused(ValueError):
    """A JOSE header that is JSON no reader may take (`bastion.untrusted_json`): a member named
    twice, a NUL... The message begins "JOSE header", for a caller to name the token before it
    ("the DPoP proof's JOSE header ...")."""


def protected_header(compact: CompactSignature) -> dict[str, Any]:
    """The protected header of a compact JWS, before anything is verified, read as all JSON from
    elsewhere is (`bastion.untrusted_json`): `HeaderRefused` for a member named twice
    (``{"kid": "a", "kid": "b"}``: joserfc keeps the last, as Python's json does, so its reading
    and bastion's, or another reader's, could differ; RFC 7515 §5.2 lets a parser refuse it);
    `ValueError` unless it is a JSON object (joserfc takes any JSON that holds "alg": a list or
    a string did, and made a 500 wherever it was read as an object). Every JWS bastion takes
    from another party has its header read here (or, a SET's and an access token's, by
    `bastion.untrusted_json` as strictly) before joserfc reads it again to verify it."""
    segment = compact.segments["header"]
    try:
        header = untrusted_json.loads(
            base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))
        )
    except untrusted_json.JsonRefused as exc:
        raise HeaderRefused(f"JOSE header is refused: {exc}") from None
    if not isinstance(header, dict):
        raise ValueError("the JWS header is not a JSON object")
    return header


def typ_is(typ: Any, expected: str) -> bool:
    """Whether a JOSE header's ``typ`` is the media type ``expected`` (``"secevent+jwt"``):
    RFC 7515 §4.1.9, a media type, so compared without case and with ``application/`` written
    or left out; no parameters, nothing around it."""
    if typ == expected:  # as nearly every issuer writes it: no parsing on the call path
        return True
    if not isinstance(typ, str) or typ != typ.strip(" \t"):
        return False
    full = typ if "/" in typ else f"application/{typ}"
    return ";" not in full and media_type(full) == f"application/{expected}"


def signing_key(keys: KeySet, kid: str | None) -> Key | None:
    """The one key a JWS header's ``kid`` names, or the set's only key when it names none; None
    when there is no such single key (the caller refuses the JWS with its own words)."""
    if kid is not None:
        candidates = [k for k in keys.keys if k.kid == kid]
    else:
        candidates = list(keys.keys) if len(keys.keys) == 1 else []
    return candidates[0] if len(candidates) == 1 else None


class SignatureRefused(Exception):
    """A compact JWS `verified_claims` does not take. ``reason``: ``"kid"`` (no single key of
    the set is named), ``"signature"`` (that key does not verify it with the ``alg``) or
    ``"claims"`` (its payload is not a JSON object bastion reads, ``detail`` says why); each
    caller refuses it with its own error, in the words of `said_of`."""

    def __init__(self, reason: str, detail: str, kid: str | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.kid = kid

    def said_of(self, token: str, signer: str) -> str:
        """The refusal in words, naming the ``token`` ("the ID-JAG") and whose keys should
        have signed it ("the identity provider")."""
        if self.reason == "kid":
            if self.kid is None:
                return f"{signer} has several keys: {token}'s header must name one (kid)"
            return f"kid {self.kid!r} is not a key of {signer}"
        if self.reason == "signature":
            return f"{token}'s signature does not verify: {self.detail}"
        return f"{token}'s claims cannot be taken: {self.detail}"


def verified_claims(token: str, keys: KeySet, kid: str | None, alg: str) -> dict[str, Any]:
    """In a worker thread: the claims of the compact JWS ``token`` once its signature is checked
    with the key `signing_key` chooses and the ``alg`` the caller accepted from its header;
    the payload read as every JSON from elsewhere is (`bastion.untrusted_json`: no NUL, no
    lone surrogate, no number past 64 bits). One way for every JWT bastion takes from another
    party: ID tokens, trusted issuers' access tokens, ID-JAGs, SETs, client assertions. The
    caller read ``kid`` and ``alg`` with `protected_header` (a SET's with
    `bastion.signals.set_tokens`), so a header that names a member twice never gets here."""
    key = signing_key(keys, kid)
    if key is None:
        raise SignatureRefused(
            "kid",
            f"kid {kid!r} is not in the key set"
            if kid is not None
            else "the key set holds several keys and the header names none (kid)",
            kid,
        )
    try:
        payload = jws.deserialize_compact(token, key, algorithms=[alg]).payload
    except (JoseError, ValueError) as exc:
        raise SignatureRefused("signature", f"the signature does not verify: {exc}") from None
    try:
        claims = untrusted_json.loads(payload)
    except untrusted_json.JsonRefused as exc:
        raise SignatureRefused("claims", str(exc)) from None
    if not isinstance(claims, dict):
        raise SignatureRefused("claims", "the payload is not a JSON object")
    return claims


async def issuer_metadata(
    issuer: str,
    limits: FetchLimits,
    transport: httpx.AsyncBaseTransport | None = None,
    answers: KeptAnswers | None = None,
    names_issuer: Callable[[str, Any], object] | None = None,
) -> tuple[dict[str, Any], float | None]:
    """An issuer's OpenID Connect Discovery document, else its RFC 8414 metadata (§3.1: the
    well-known prefix before the issuer's path), and the lifetime its headers give (None: they
    say nothing); the document must name ``issuer`` exactly (OpenID Connect Discovery §4.3,
    RFC 8414 §3.3), or, given ``names_issuer(uri, its issuer)``, be what that takes (it raises
    `RemoteDocumentError` for any other: a multi-tenant issuer's template,
    `bastion.identity.tenants.issuer_template`). `RemoteDocumentError` saying what each place
    answered. ``answers``: as `fetch_json_answer`'s."""
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")
    origin = f"{parts.scheme}://{parts.netloc}"
    candidates = (
        f"{issuer.rstrip('/')}/.well-known/openid-configuration",
        f"{origin}/.well-known/oauth-authorization-server{path}",
    )
    problems = []
    for uri in candidates:
        try:
            document, lifetime = await fetch_json_answer(uri, limits, transport, answers)
        except RemoteDocumentError as exc:
            problems.append(f"{uri} {exc}")
            continue
        if not isinstance(document, dict) or (
            names_issuer is None and document.get("issuer") != issuer
        ):
            problems.append(f"{uri} is not the metadata of {issuer}")
            continue
        if names_issuer is not None:
            try:
                names_issuer(uri, document.get("issuer"))
            except RemoteDocumentError as exc:
                problems.append(str(exc))
                continue
        return document, lifetime
    raise RemoteDocumentError("; ".join(problems))


class CoalescedFetches:
    """Fetches of one kind, per key (a URI, an issuer): one at a time, and a failure remembered.

    The requests that need a key while it is being fetched wait for that fetch, instead of each
    starting its own; a fetch that failed is not tried again for ``refetch_seconds``: the
    requests that need the key meanwhile are refused at once with its reason. Anyone can make
    bastion need a remote document (a token naming a trusted issuer, a login button, a client
    assertion), so without this an issuer that is down or slow was asked once per request, each
    held up to ``timeout_seconds``. What a fetch found is the caller's to keep.

    A caller that still holds a usable document starts the fetch in the background instead
    (`in_background`): the request is answered at once, and the fetch is the same single one.
    """

    def __init__(self, limits: FetchLimits, clock: Callable[[], float] = time.time) -> None:
        self.limits = limits
        self.clock = clock
        self._fetching: dict[str, asyncio.Lock] = {}
        # key -> (when its last fetch failed, why)
        self._failed: dict[str, tuple[float, str]] = {}
        # key -> the fetch under way in the background (`in_background`)
        self._background: dict[str, asyncio.Task[None]] = {}

    async def once(
        self, key: str, fetch: Callable[[], Awaitable[_T]], kept: Callable[[], _T | None]
    ) -> _T:
        """``fetch()``'s answer for ``key``, or what ``kept()`` holds by the time no other fetch
        of it is under way (another request's fetch found it meanwhile). `RemoteDocumentError`
        when the fetch fails, or failed less than ``refetch_seconds`` ago."""
        lock = self._fetching.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                found = kept()
                if found is not None:
                    return found
                self._refuse_if_failed_lately(key)
                try:
                    value = await fetch()
                except RemoteDocumentError as e:
                    _remember(self._failed, key, (self.clock(), str(e)), self.limits.max_cached)
                    raise
                self._failed.pop(key, None)
                return value
        finally:
            # A lock is kept only while a fetch of its key is under way: the keys may be as
            # many as clients register, and one asked once would otherwise hold its lock for good.
            if not lock.locked() and self._fetching.get(key) is lock:
                del self._fetching[key]

    def in_background(
        self, key: str, fetch: Callable[[], Awaitable[object]], kept: Callable[[], object]
    ) -> None:
        """Start ``once(key, fetch, kept)`` as a task of the running loop and return at once:
        not when one is under way for ``key`` already, nor within ``refetch_seconds`` of a
        failed fetch of it (a fetch that fails is not tried again on every request). Its failure
        is remembered as `once`'s is, and ``fetch`` may log it; nobody waits for it."""
        loop = asyncio.get_running_loop()
        task = self._background.get(key)
        # A task of a loop that has ended (a command's run) is not under way any more.
        if task is not None and not task.done() and task.get_loop() is loop:
            return
        self._background.pop(key, None)
        failed = self._failed.get(key)
        if failed is not None and self.clock() - failed[0] < self.limits.refetch_seconds:
            return

        async def run() -> None:
            try:
                await self.once(key, fetch, kept)
            except RemoteDocumentError:
                pass  # remembered by `once`; the caller's ``fetch`` said why
            except Exception:
                # Nobody awaits this task: a fault of bastion's own is logged, not lost.
                log.exception("the background fetch of %s failed", key)
            finally:
                if self._background.get(key) is asyncio.current_task():
                    del self._background[key]

        self._background[key] = loop.create_task(run(), name=f"fetch {key}")

    def under_way(self, key: str) -> bool:
        """Whether a fetch of ``key`` started by `in_background` is under way."""
        task = self._background.get(key)
        return task is not None and not task.done()

    def _refuse_if_failed_lately(self, key: str) -> None:
        failed = self._failed.get(key)
        if failed is None:
            return
        age = self.clock() - failed[0]
        if age < self.limits.refetch_seconds:
            raise RemoteDocumentError(
                f"{failed[1]} ({age:.0f} s ago; fetched again {self.limits.refetch_seconds:g} s"
                " after a failure" + _named(self.limits.refetch_setting) + ")"
            )


class RemoteKeySets(CoalescedFetches):
    """Key sets fetched from ``jwks_uri``s, cached per URI (one implementation for every caller).

    ``check(document)`` returns why a fetched document is not an acceptable key set, or None.
    Fetches are coalesced and failures remembered (`CoalescedFetches`): a poll's batch of SETs,
    or every token of an issuer that is down, waits on one fetch or is refused with its reason.
    A set in use is fetched again in the background once past half its lifetime, so nobody
    waits for it while the issuer answers; never used past its lifetime (a withdrawn key is
    not trusted longer than its headers said), and asked for conditionally (`KeptAnswers`).
    """

    def __init__(
        self,
        limits: FetchLimits,
        check: Callable[[Any], str | None],
        clock: Callable[[], float] = time.time,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(limits, clock)
        self.check = check
        self.transport = transport
        self._fetched: dict[str, _Fetched] = {}
        self._answers = KeptAnswers(limits.max_cached)

    async def keys(self, uri: str, kid: str | None) -> KeySet:
        """The key set at ``uri``: cached while young (as its headers said, within
        ``refetch_seconds`` and ``cache_seconds``) and holding the key a header with ``kid``
        names (`signing_key`); fetched again when it lacks it (a ``kid`` it does not hold, or
        none while it holds several keys: the issuer rotated its keys) and the last fetch is
        older than ``refetch_seconds``, so made-up kids cost one fetch per that interval. Past
        half its lifetime (and ``refetch_seconds``), a set that holds the key is the answer and
        is fetched again in the background (`CoalescedFetches.in_background`); past its
        lifetime, the request waits for the fetch."""
        now = self.clock()
        cached = self._fetched.get(uri)

        def fetched_meanwhile() -> KeySet | None:
            again = self._fetched.get(uri)
            return again.keys if again is not None and again is not cached else None

        if cached is not None:
            age = now - cached.fetched_at
            young = age < cached.kept_seconds
            known = signing_key(cached.keys, kid) is not None
            may_refetch = age >= self.limits.refetch_seconds
            if young and (known or not may_refetch):
                if known and may_refetch and age >= cached.kept_seconds / 2:
                    self.in_background(uri, lambda: self._fetch(uri), fetched_meanwhile)
                return cached.keys

        return await self.once(uri, lambda: self._fetch(uri), fetched_meanwhile)

    async def _fetch(self, uri: str) -> KeySet:
        document, lifetime = await fetch_json_answer(
            uri, self.limits, self.transport, self._answers
        )
        # Checking the set reads every key in it, as reading it does: CPU work for as many keys
        # as the caller's bound allows, in a worker thread, never on the event loop.
        keys = await anyio.to_thread.run_sync(self._read, document)
        limits = self.limits
        kept = kept_seconds(lifetime, least=limits.refetch_seconds, most=limits.cache_seconds)
        _remember(self._fetched, uri, _Fetched(keys, self.clock(), kept), limits.max_cached)
        return keys

    def _read(self, document: Any) -> KeySet:
        problem = self.check(document)
        if problem:
            raise RemoteDocumentError(f"sent no acceptable key set: {problem}")
        return KeySet.import_key_set(document)


def _remember(kept: dict[str, Any], uri: str, value: Any, most: int) -> None:
    """Keep ``value`` for ``uri``, the oldest entry making room beyond ``most``."""
    kept.pop(uri, None)
    if len(kept) >= most:
        kept.pop(next(iter(kept)))
    kept[uri] = value
