"""A client for a remote bastion server, with the method names of `bastion.Authorizer`.

    client = Client("http://127.0.0.1:8000", api_key)
    seq = client.facts.insert(("has_role", Entity("User", "alice"), "admin", Entity("Org", "acme")))
    client.authorize(Entity("User", "alice"), "read", Entity("Repo", "anvil"))

`AsyncClient` has the same methods, awaited. A client remembers the sequence of its last write
and asks every decision to be at least that fresh, so it reads its own writes on any replica.

A policy enforcement point calls it on every request, so it fails closed: anything but bastion's
well-formed answer (an error status, a redirect, a body that is not JSON or not of the shape,
``"allowed": "true"``, an answer older than the client's own write, a body past
``max_answer_bytes``, no whole answer within ``timeout``) is a `RemoteError`, never a decision.
"""

from __future__ import annotations

import functools
import json
import os
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import quote, urlsplit

import httpx

from bastion.egress import cleartext_problem
from bastion.facts.model import Entity, arg_from_json, arg_to_json, fact_from_json, fact_to_json
from bastion.facts.store import StoredFact, epoch
from bastion.names import readable
from bastion.whole_numbers import capped


class RemoteError(Exception):
    """A problem reported by the server (``application/problem+json``)."""

    def __init__(self, status: int, title: str, detail: str, body: dict | None = None) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status = status
        self.title = title
        self.detail = detail
        self.body = body or {}


class MalformedAnswer(RemoteError):
    """A success status whose body is not bastion's answer: not JSON, not an object, a field
    missing or of another shape (``"allowed": "true"``), a batch with another number of results
    than checks, a decision older than the client's own write. Never read as a decision."""

    def __init__(self, detail: str, status: int = 200) -> None:
        super().__init__(status, "Not bastion's answer", detail)


class Unanswered(RemoteError):
    """No whole answer (``status`` 0): the server could not be reached (refused, TLS not
    verified, connection lost), or its answer did not arrive within the client's timeout."""

    def __init__(self, detail: str) -> None:
        super().__init__(0, "No answer", detail)


# The most an answer may hold (bytes, decoded): a page of facts or a large query fits; past it
# the client stops reading and refuses the answer.
MAX_ANSWER_BYTES = 64 * 1024 * 1024
_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")


def _server_url(url: str, allow_http: bool = False) -> str:
    """The base URL of a bastion server: https, or http to the loopback (``allow_http``: to any
    host), a host, no user name or password (the key is the credential, and
    ``https://bastion@evil.example`` names evil.example), no query or fragment (they would be
    lost or sent where not meant)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError as e:
        raise ValueError(f"the server URL cannot be read: {e}") from None
    if "@" in parts.netloc:
        raise ValueError(
            "the server URL holds a user name or password (before '@'); give the server's URL"
            " alone: the API key is the credential (the URL is not shown here)"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"the server URL must be http:// or https:// and name a host: {readable(url, 200)}"
        )
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise ValueError(f"the server URL has a query or fragment: {readable(url, 200)}")
    if not allow_http and (problem := cleartext_problem(url)) is not None:
        # Every request carries the API key, and a decision comes back: in the clear, whoever
        # is on the way reads the one and can change the other.
        raise ValueError(
            f"the server URL {readable(url, 200)} {problem}: the API key would cross the"
            " network in the clear, and the answers could be changed on the way; use https,"
            " or pass allow_http=True for a network you trust with both"
        )
    return url.rstrip("/")


def _bearer(api_key: str) -> dict[str, str]:
    """The authorization header. A key with a line break (a file's last line), a space or a
    letter outside ASCII is refused here without showing it: the HTTP library's own error
    would quote the whole header."""
    if not isinstance(api_key, str) or not _HEADER_SAFE.fullmatch(api_key):
        raise ValueError(
            "the API key is empty or holds a character a header cannot carry (a line break, a"
            " space, a letter outside ASCII): check how it was read (a file's final line break,"
            " say); the key is not shown here"
        )
    return {"authorization": f"Bearer {api_key}"}


def _shown(value: Any) -> str:
    if value is None or isinstance(value, str | int | float | bool):
        return readable(json.dumps(value), 60)
    return "a list" if isinstance(value, list) else "an object"


def _field(answer: dict, name: str, kind: type, what: str, *, optional: bool = False) -> Any:
    """``answer[name]``, of exactly ``kind`` (so ``true`` is not a number, nor ``1`` a
    boolean); absent or null only if ``optional``."""
    value = answer.get(name)
    if value is None and optional:
        return None
    if value.__class__ is not kind:
        raise MalformedAnswer(f"{name!r} is {_shown(value)}, not {what}")
    return value


def _strings(answer: dict, name: str) -> list[str]:
    values = _field(answer, name, list, "a list of strings")
    if not all(v.__class__ is str for v in values):
        raise MalformedAnswer(f"{name!r} holds something other than strings")
    return values


def _entity_of(value: Any, name: str) -> Entity:
    if not (
        isinstance(value, dict)
        and value.get("type").__class__ is str
        and value.get("id").__class__ is str
    ):
        raise MalformedAnswer(f"{name!r} is {_shown(value)}, not an entity")
    return Entity(value["type"], value["id"])


def _read_back(read: Callable[[Any], Any], value: Any, what: str) -> Any:
    try:
        return read(value)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise MalformedAnswer(f"{what} cannot be read: {readable(str(e), 120)}") from None


@dataclass(frozen=True)
class RemoteDecision:
    allowed: bool
    decision_id: str
    explanation: dict | None = None


@dataclass(frozen=True)
class RemoteChainDecision:
    """The answer for a chain of principals (`Authorizer.authorize_chain` remotely): allowed
    only if every principal is; ``refused_by`` is the first that is not; ``obligations`` (masks,
    rate limits, approval, review...) come with an allowed answer, as JSON."""

    allowed: bool
    decision_id: str
    principals: tuple[Entity, ...]
    refused_by: Entity | None = None
    reason: str | None = None
    missing_scopes: tuple[str, ...] = ()
    obligations: dict | None = None


class _Call(NamedTuple):
    method: str
    path: str
    json: Any = None
    params: dict | None = None
    content: bytes | Iterable[bytes] | None = None
    headers: dict | None = None


# An operation yields the calls it needs and receives each response's JSON.
Op = Generator[_Call, Any, Any]


def _entity(e: Entity | str) -> dict:
    if isinstance(e, str):
        e = Entity.parse(e)
    return {"type": e.type, "id": e.id}


def _arg(a: Any) -> Any:
    from bastion.decide import Variable

    if isinstance(a, Variable):
        return {"var": str(getattr(a, "name", a))}
    return arg_to_json(a)


class _Ops:
    """Every operation once, independent of how the calls are sent (sync or async)."""

    def __init__(self) -> None:
        self.sequence = 0
        self.read_your_writes = True

    def _fresh(self, body: dict) -> dict:
        if self.read_your_writes and self.sequence:
            body["at_least"] = self.sequence
        return body

    @staticmethod
    def _decided(answer: dict, asked: dict, *, one: bool = True) -> dict:
        """``answer`` if it is a decision at least as fresh as asked: its ``sequence`` at or past
        the ``at_least`` sent (an answer from a replica or a cache that ignored it is stale), and
        (``one``) its ``decision_id``."""
        sequence = _field(answer, "sequence", int, "a sequence (a whole number)")
        if sequence < asked.get("at_least", 0):
            raise MalformedAnswer(
                f"a stale answer: decided at sequence {sequence}, before this client's own"
                f" write at {asked['at_least']} (asked for with at_least)"
            )
        if one:
            _field(answer, "decision_id", str, "a string")
        return answer

    def _wrote(self, response: dict) -> dict:
        sequence = _field(response, "sequence", int, "a sequence (a whole number)")
        if sequence < 0:
            raise MalformedAnswer(f"'sequence' is {sequence}, not a sequence (0 or more)")
        self.sequence = max(self.sequence, sequence)
        return response

    def _check(self, actor, action, resource, context) -> dict:
        # A list or tuple of principals is a chain (the user, then each agent acting for them).
        who = (
            {"principals": [_entity(p) for p in actor]}
            if isinstance(actor, list | tuple) and not isinstance(actor, Entity)
            else {"actor": _entity(actor)}
        )
        body = {**who, "action": action, "resource": _entity(resource)}
        if context is not None:
            body["context"] = context
        return body

    # -- decisions -------------------------------------------------------------------------

    def authorize(self, actor, action: str, resource, context: dict | None = None) -> Op:
        body = self._fresh(self._check(actor, action, resource, context))
        r = self._decided((yield _Call("POST", "/v1/authorize", body)), body)
        return _field(r, "allowed", bool, "true or false")

    def decide(self, actor, action: str, resource, context: dict | None = None) -> Op:
        body = self._fresh({**self._check(actor, action, resource, context), "explain": True})
        r = self._decided((yield _Call("POST", "/v1/authorize", body)), body)
        return RemoteDecision(
            _field(r, "allowed", bool, "true or false"),
            r["decision_id"],
            _field(r, "explanation", dict, "an object", optional=True),
        )

    def authorize_chain(
        self,
        principals: Iterable[Any],
        action: str,
        resource,
        context: dict | None = None,
        scopes: Iterable[str] | None = None,
    ) -> Op:
        """Decide for a chain of principals: allowed only if every one is (``/v1/authorize``
        with ``principals``)."""
        body = self._fresh(self._check(list(principals), action, resource, context))
        if scopes is not None:
            body["scopes"] = list(scopes)
        r = self._decided((yield _Call("POST", "/v1/authorize", body)), body)
        allowed = _field(r, "allowed", bool, "true or false")
        refused = r.get("refused_by")
        if refused is not None:
            refused = _entity_of(refused, "refused_by")
            if allowed:
                raise MalformedAnswer("allowed, yet it names a principal that refused it")
        return RemoteChainDecision(
            allowed=allowed,
            decision_id=r["decision_id"],
            principals=tuple(Entity(p["type"], p["id"]) for p in body["principals"]),
            refused_by=refused,
            reason=_field(r, "reason", str, "a string", optional=True),
            missing_scopes=tuple(_strings(r, "missing_scopes") if "missing_scopes" in r else ()),
            obligations=_field(r, "obligations", dict, "an object", optional=True),
        )

    def authorize_many(self, checks: Iterable[tuple], context: dict | None = None) -> Op:
        """``checks`` are (actor, action, resource) tuples, where an actor may be a list of
        principals (a chain: allowed only if every one is); returns one bool each, in order."""
        body = self._fresh({"checks": [self._check(*c, None) for c in checks]})
        if context is not None:
            body["context"] = context
        r = self._decided((yield _Call("POST", "/v1/authorize/batch", body)), body, one=False)
        results = _field(r, "results", list, "a list")
        if len(results) != len(body["checks"]):
            raise MalformedAnswer(
                f"'results' has {len(results)} answers for {len(body['checks'])} checks"
            )
        if not all(isinstance(x, dict) and x.get("allowed").__class__ is bool for x in results):
            raise MalformedAnswer("'results' holds an answer whose 'allowed' is not true or false")
        return [x["allowed"] for x in results]

    def list(self, actor, action: str, resource_type: str, context: dict | None = None) -> Op:
        ids: list[str] = []
        cursor = None
        cursors: set[str] = set()
        while True:
            body = self._fresh({"actor": _entity(actor), "action": action})
            body |= {"resource_type": resource_type, "limit": 1000}
            if context is not None:
                body["context"] = context
            if cursor:
                body["cursor"] = cursor
            r = self._decided((yield _Call("POST", "/v1/list", body)), body)
            ids += _strings(r, "ids")
            cursor = _next_cursor(r, cursors)
            if not cursor:
                return ids

    def actions(self, actor, resource, context: dict | None = None) -> Op:
        body = self._fresh({"actor": _entity(actor), "resource": _entity(resource)})
        if context is not None:
            body["context"] = context
        r = self._decided((yield _Call("POST", "/v1/actions", body)), body)
        return set(_strings(r, "actions"))

    def query(self, predicate: str, *args: Any, context: dict | None = None) -> Op:
        body = self._fresh({"predicate": predicate, "args": [_arg(a) for a in args]})
        if context is not None:
            body["context"] = context
        r = self._decided((yield _Call("POST", "/v1/query", body)), body)
        rows = _field(r, "results", list, "a list")
        if not all(row.__class__ is list for row in rows):
            raise MalformedAnswer("'results' holds a row that is not a list")
        return _read_back(
            lambda rows: [tuple(map(arg_from_json, row)) for row in rows], rows, "a row"
        )

    def explain(self, decision_id: str) -> Op:
        return (yield _Call("GET", f"/v1/decisions/{quote(decision_id, safe='')}/explanation"))

    # -- facts -----------------------------------------------------------------------------

    def facts_insert(self, fact: tuple, expires_at: Any = None) -> Op:
        """Insert one fact; returns the write's sequence."""
        r = yield _Call(
            "POST", "/v1/facts", {"facts": [StoredFact(fact, epoch(expires_at)).to_json()]}
        )
        return self._wrote(r)["sequence"]

    def facts_insert_many(self, facts: Iterable[tuple], expires_at: Any = None) -> Op:
        """Insert facts in one write; returns the response (sequence and counts)."""
        body = {"facts": [StoredFact(f, epoch(expires_at)).to_json() for f in facts]}
        return self._wrote((yield _Call("POST", "/v1/facts", body)))

    def facts_delete_many(self, patterns: Iterable[tuple]) -> Op:
        """Delete what matches any pattern in one write; returns the response."""
        body = {"patterns": [fact_to_json(p) for p in patterns]}
        return self._wrote((yield _Call("POST", "/v1/facts/delete", body)))

    def facts_delete(self, pattern: tuple) -> Op:
        """Delete every fact matching the pattern (None is a wildcard); returns how many."""
        r = yield _Call("POST", "/v1/facts/delete", {"patterns": [fact_to_json(pattern)]})
        return _field(self._wrote(r), "deleted", int, "a count")

    def facts_apply(self, inserts: Iterable[tuple] = (), deletes: Iterable[tuple] = ()) -> Op:
        """Deletes (patterns) then inserts, all or nothing; returns the sequence."""
        body = {
            "insert": [fact_to_json(f) for f in inserts],
            "delete": [fact_to_json(p) for p in deletes],
        }
        r = yield _Call("POST", "/v1/facts/batch", body)
        return self._wrote(r)["sequence"]

    def facts_get(self, pattern: tuple | None = None) -> Op:
        """Every stored fact matching the pattern, all pages."""
        out: list[tuple] = []
        cursor = None
        cursors: set[str] = set()
        while True:
            params = {"limit": "1000"}
            if pattern is not None:
                params["pattern"] = json.dumps(fact_to_json(pattern))
            if cursor:
                params["cursor"] = cursor
            r = yield _Call("GET", "/v1/facts", params=params)
            facts = _field(r, "facts", list, "a list")
            out += _read_back(
                lambda facts: [fact_from_json(f, also=("expires_at",)) for f in facts],
                facts,
                "a fact",
            )
            cursor = _next_cursor(r, cursors)
            if not cursor:
                return out

    def facts_import(self, lines: bytes | Iterable[bytes]) -> Op:
        """Bulk import JSON lines in one transaction; returns the write's result."""
        r = yield _Call(
            "POST",
            "/v1/facts/import",
            content=lines,
            headers={"content-type": "application/x-ndjson"},
        )
        return self._wrote(r)

    # -- policy ----------------------------------------------------------------------------

    def load_policy(
        self, text: str, source: str = "policy.polar", note: str = "", strict: bool = False
    ) -> Op:
        """Validate and put a new policy in force; returns its version. With ``strict``, a
        policy with a warning is refused (`RemoteError` 422) and nothing changes."""
        answer = yield from self.put_policy(text, source, note, strict)
        return _field(answer, "version", int, "a version (a whole number)")

    def put_policy(
        self, text: str, source: str = "policy.polar", note: str = "", strict: bool = False
    ) -> Op:
        """As `load_policy`; returns the whole answer: ``version``, ``sequence`` and the
        policy's ``warnings``."""
        body = {"text": text, "source": source, "note": note, "strict": strict}
        r = yield _Call("PUT", "/v1/policy", body)
        return self._wrote(r)

    def check_policy(self, text: str, source: str = "policy.polar", strict: bool = False) -> Op:
        body = {"text": text, "source": source, "strict": strict}
        r = yield _Call("POST", "/v1/policy/validate", body)
        return _field(r, "warnings", list, "a list")

    def policy(self) -> Op:
        return (yield _Call("GET", "/v1/policy"))

    def policy_versions(self) -> Op:
        return _field((yield _Call("GET", "/v1/policy/versions")), "versions", list, "a list")

    def rollback_policy(self, version: int) -> Op:
        r = yield _Call("POST", "/v1/policy/rollback", {"version": version})
        return _field(self._wrote(r), "version", int, "a version (a whole number)")

    # -- keys ------------------------------------------------------------------------------

    def create_key(self, name: str, scopes: list[str], expires_in: float | None = None) -> Op:
        return (
            yield _Call(
                "POST", "/v1/keys", {"name": name, "scopes": scopes, "expires_in": expires_in}
            )
        )

    def list_keys(self) -> Op:
        return _field((yield _Call("GET", "/v1/keys")), "keys", list, "a list")

    def revoke_key(self, key_id: str) -> Op:
        return (yield _Call("DELETE", f"/v1/keys/{quote(key_id, safe='')}"))

    # -- approvals (a key of scope approvals; docs/approvals.md) ---------------------------

    def list_approvals(
        self, status: str | None = None, approver: str | None = None, limit: int | None = None
    ) -> Op:
        """Held calls and results, newest first, as ``GET /v1/approvals`` describes them."""
        params = {"status": status, "approver": approver, "limit": limit}
        params = {k: v for k, v in params.items() if v is not None}
        answer = yield _Call("GET", "/v1/approvals", params=params)
        return _field(answer, "approvals", list, "a list")

    def approval(self, request_id: str, reviewer: str | None = None) -> Op:
        """One request; with ``reviewer``, its held result as that person may see it."""
        params = {"reviewer": reviewer} if reviewer is not None else None
        return (yield _Call("GET", f"/v1/approvals/{quote(request_id, safe='')}", params=params))

    def approve(
        self,
        request_id: str,
        approver: str,
        *,
        minutes: int = 0,
        reason: str = "",
        withheld_fields: Iterable[str] = (),
    ) -> Op:
        """Approve (or, for a review, release) as ``approver``, whom the key vouches for; a
        `RemoteError` 403 says why the policy does not let them."""
        body = {"approver": approver, "minutes": minutes, "reason": reason}
        if withheld_fields:
            body["withheld_fields"] = list(withheld_fields)
        path = f"/v1/approvals/{quote(request_id, safe='')}/approve"
        return (yield _Call("POST", path, body))

    def deny(self, request_id: str, approver: str, *, reason: str = "") -> Op:
        path = f"/v1/approvals/{quote(request_id, safe='')}/deny"
        return (yield _Call("POST", path, {"approver": approver, "reason": reason}))


def _next_cursor(answer: dict, seen: set[str]) -> str | None:
    """The page's ``next_cursor``; one given before would list the same pages without end."""
    cursor = _field(answer, "next_cursor", str, "a string or null", optional=True)
    if cursor in seen:
        raise MalformedAnswer(
            f"the cursor {readable(cursor, 60)} was given before: pages without end"
        )
    if cursor:
        seen.add(cursor)
    return cursor


def _answer(status: int, reason: str, content: bytes, location: str | None = None) -> dict:
    """The JSON object of a success; anything else a `RemoteError`. A redirect is not followed
    (the key would go to the host it names) and its body is not an answer."""
    if 300 <= status < 400:
        to = readable(location or "nowhere", 200)
        raise RemoteError(status, reason, f"a redirect (to {to}), not followed", {})
    if not 200 <= status < 300:
        try:
            body = json.loads(content)
        except (ValueError, RecursionError):
            body = {}
        if not isinstance(body, dict):
            body = {}  # JSON, but not a problem object (a list, a string, null): not bastion's
        text = content.decode("utf-8", "replace")
        raise RemoteError(
            status,
            body.get("title", reason),
            # Not bastion's answer (a proxy's page, say): its start, to say what answered,
            # escaped, so it cannot forge a line of a log or drive a terminal.
            body.get("detail", readable(text, 200)),
            body,
        )
    try:
        answer = json.loads(content)
    except (ValueError, RecursionError):
        start = readable(content[:200].decode("utf-8", "replace"), 200)
        raise MalformedAnswer(f"not JSON: {start}", status) from None
    if not isinstance(answer, dict):
        raise MalformedAnswer(f"not a JSON object but {_shown(answer)}", status)
    return answer


class _Remote:
    """What `Client` and `AsyncClient` share: the server, the key's header, the bounds, and
    the making of their httpx client (`_HTTP`, each class's own)."""

    _HTTP: type[httpx.Client] | type[httpx.AsyncClient]

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        timeout: float | None = 30.0,
        read_your_writes: bool = True,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
        allow_http: bool = False,
    ) -> None:
        self._url = _server_url(url, allow_http)
        self._timeout = timeout
        self._max_answer_bytes = max_answer_bytes
        self._ops = _Ops()
        self._ops.read_your_writes = read_your_writes
        self.facts = _FactsOf(self)
        # Redirects are not followed (httpx's default, said here so it stays so); nothing in
        # the environment turns TLS verification off (SSL_CERT_FILE replaces the trusted CAs).
        self._http: Any = self._HTTP(
            base_url=self._url,
            headers=_bearer(api_key),
            timeout=timeout,
            follow_redirects=False,
            verify=_trust(),
        )

    @property
    def sequence(self) -> int:
        """The sequence of this client's latest write (0 before any)."""
        return self._ops.sequence

    def _request(self, http: httpx.Client | httpx.AsyncClient, call: _Call) -> httpx.Request:
        return http.build_request(
            call.method,
            call.path,
            json=call.json,
            params=call.params,
            content=call.content,
            headers=call.headers,
        )

    def _deadline(self) -> float | None:
        return None if self._timeout is None else time.monotonic() + self._timeout

    def _took(self, response: httpx.Response, size: int, deadline: float | None) -> None:
        """Refuse an answer past its bounds as it arrives: a body larger than
        ``max_answer_bytes``, or one still arriving at the deadline (each piece in time, the
        whole not: httpx's timeout is per read)."""
        if size > self._max_answer_bytes:
            raise MalformedAnswer(
                f"larger than {self._max_answer_bytes} bytes (max_answer_bytes): not read",
                response.status_code,
            )
        if deadline is not None and time.monotonic() > deadline:
            raise Unanswered(f"no whole answer from {self._url} within {self._timeout:g} s")

    def _declared_size(self, response: httpx.Response) -> None:
        declared = response.headers.get("content-length", "")
        size = capped(declared, self._max_answer_bytes)
        if size is not None and size > self._max_answer_bytes:
            raise MalformedAnswer(
                f"larger than {self._max_answer_bytes} bytes (max_answer_bytes): not read",
                response.status_code,
            )

    def _unanswered(self, e: httpx.TransportError) -> Unanswered:
        if isinstance(e, httpx.TimeoutException):
            return Unanswered(f"no answer from {self._url} within {self._timeout:g} s")
        return Unanswered(
            f"could not reach {self._url}: {readable(str(e) or type(e).__name__, 200)}"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._url!r})"


def _sync(op: Callable[..., Op]) -> Callable[..., Any]:
    @functools.wraps(op)
    def run(self: Client, *args: Any, **kwargs: Any) -> Any:
        gen = op(self._ops, *args, **kwargs)
        call = next(gen)
        while True:
            try:
                call = gen.send(self._send(call))
            except StopIteration as stop:
                return stop.value

    return run


def _async(op: Callable[..., Op]) -> Callable[..., Any]:
    @functools.wraps(op)
    async def run(self: AsyncClient, *args: Any, **kwargs: Any) -> Any:
        gen = op(self._ops, *args, **kwargs)
        call = next(gen)
        while True:
            try:
                call = gen.send(await self._send(call))
            except StopIteration as stop:
                return stop.value

    return run


class _FactsOf:
    """``client.facts``: the fact methods, named as on ``Authorizer.facts``."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        if name in _FACT_OPS or name == "export":
            return getattr(self._client, f"_facts_{name}")
        raise AttributeError(name)


_OPS = [
    "authorize",
    "authorize_chain",
    "decide",
    "authorize_many",
    "list",
    "actions",
    "query",
    "explain",
    "load_policy",
    "put_policy",
    "check_policy",
    "policy",
    "policy_versions",
    "rollback_policy",
    "create_key",
    "list_keys",
    "revoke_key",
    "list_approvals",
    "approval",
    "approve",
    "deny",
]
_FACT_OPS = {"insert": "facts_insert", "delete": "facts_delete", "apply": "facts_apply"}
_FACT_OPS |= {"get": "facts_get", "import_lines": "facts_import"}
_FACT_OPS |= {"insert_many": "facts_insert_many", "delete_many": "facts_delete_many"}


def _trust() -> ssl.SSLContext:
    """httpx's trust store (``SSL_CERT_FILE``, else ``SSL_CERT_DIR``, else certifi's bundle),
    read once for each value of those variables: reading it costs about 15 ms of CPU, which a
    client made for each request (a PEP in a request handler) paid every time. One context
    serves any number of clients and connections."""
    return _trust_from(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))


@functools.cache
def _trust_from(cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    if cert_file:
        return ssl.create_default_context(cafile=cert_file)
    if cert_dir:
        return ssl.create_default_context(capath=cert_dir)
    return httpx.create_ssl_context(trust_env=False)  # certifi's bundle


class Client(_Remote):
    """A synchronous client; use as a context manager or call `close()`. ``timeout`` (seconds,
    None for none) bounds the connection, each read and the whole answer; ``max_answer_bytes``
    the answer's size. Nothing is retried: the caller decides whether to ask again."""

    _HTTP = httpx.Client

    def _send(self, call: _Call) -> Any:
        deadline = self._deadline()
        try:
            response = self._http.send(self._request(self._http, call), stream=True)
            try:
                self._declared_size(response)
                chunks: list[bytes] = []
                size = 0
                for chunk in response.iter_bytes():
                    chunks.append(chunk)
                    size += len(chunk)
                    self._took(response, size, deadline)
            finally:
                response.close()
        except httpx.TransportError as e:
            raise self._unanswered(e) from e
        location = response.headers.get("location")
        return _answer(response.status_code, response.reason_phrase, b"".join(chunks), location)

    def _facts_export(self) -> Iterator[StoredFact]:
        """Every live fact, streamed."""
        try:
            with self._http.stream("GET", "/v1/facts/export") as r:
                if not 200 <= r.status_code < 300:
                    r.read()
                    _answer(r.status_code, r.reason_phrase, r.content, r.headers.get("location"))
                for line in r.iter_lines():
                    if line.strip():
                        yield StoredFact.from_json(json.loads(line))
        except httpx.TransportError as e:
            raise self._unanswered(e) from e

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Remote):
    """The same methods as `Client`, awaited, with the same bounds."""

    _HTTP = httpx.AsyncClient

    async def _send(self, call: _Call) -> Any:
        deadline = self._deadline()
        try:
            response = await self._http.send(self._request(self._http, call), stream=True)
            try:
                self._declared_size(response)
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_bytes():
                    chunks.append(chunk)
                    size += len(chunk)
                    self._took(response, size, deadline)
            finally:
                await response.aclose()
        except httpx.TransportError as e:
            raise self._unanswered(e) from e
        location = response.headers.get("location")
        return _answer(response.status_code, response.reason_phrase, b"".join(chunks), location)

    async def _facts_export(self) -> AsyncIterator[StoredFact]:
        try:
            async with self._http.stream("GET", "/v1/facts/export") as r:
                if not 200 <= r.status_code < 300:
                    await r.aread()
                    _answer(r.status_code, r.reason_phrase, r.content, r.headers.get("location"))
                async for line in r.aiter_lines():
                    if line.strip():
                        yield StoredFact.from_json(json.loads(line))
        except httpx.TransportError as e:
            raise self._unanswered(e) from e

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


for _name in _OPS:
    setattr(Client, _name, _sync(getattr(_Ops, _name)))
    setattr(AsyncClient, _name, _async(getattr(_Ops, _name)))
for _short, _name in _FACT_OPS.items():
    setattr(Client, f"_facts_{_short}", _sync(getattr(_Ops, _name)))
    setattr(AsyncClient, f"_facts_{_short}", _async(getattr(_Ops, _name)))
