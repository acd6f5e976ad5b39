"""A client for a remote bastion server, with the method names of `bastion.Authorizer`.

    client = Client("http://127.0.0.1:8000", api_key)
    seq = client.facts.insert(("has_role", Entity("User", "alice"), "admin", Entity("Org", "acme")))
    client.authorize(Entity("User", "alice"), "read", Entity("Repo", "anvil"))

`AsyncClient` has the same methods, awaited. A client remembers the sequence of its last write
and asks every decision to be at least that fresh, so it reads its own writes on any replica.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import quote

import httpx

from bastion.facts.model import Entity, arg_from_json, arg_to_json, fact_from_json, fact_to_json
from bastion.facts.store import StoredFact, epoch
from bastion.names import readable


class RemoteError(Exception):
    """A problem reported by the server (``application/problem+json``)."""

    def __init__(self, status: int, title: str, detail: str, body: dict | None = None) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status = status
        self.title = title
        self.detail = detail
        self.body = body or {}


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

    def _wrote(self, response: dict) -> dict:
        self.sequence = max(self.sequence, response.get("sequence", 0))
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
        r = yield _Call(
            "POST", "/v1/authorize", self._fresh(self._check(actor, action, resource, context))
        )
        return r["allowed"]

    def decide(self, actor, action: str, resource, context: dict | None = None) -> Op:
        body = self._fresh({**self._check(actor, action, resource, context), "explain": True})
        r = yield _Call("POST", "/v1/authorize", body)
        return RemoteDecision(r["allowed"], r["decision_id"], r.get("explanation"))

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
        r = yield _Call("POST", "/v1/authorize", body)
        refused = r.get("refused_by")
        return RemoteChainDecision(
            allowed=r["allowed"],
            decision_id=r["decision_id"],
            principals=tuple(Entity(p["type"], p["id"]) for p in body["principals"]),
            refused_by=Entity(refused["type"], refused["id"]) if refused else None,
            reason=r.get("reason"),
            missing_scopes=tuple(r.get("missing_scopes", ())),
            obligations=r.get("obligations"),
        )

    def authorize_many(self, checks: Iterable[tuple], context: dict | None = None) -> Op:
        """``checks`` are (actor, action, resource) tuples, where an actor may be a list of
        principals (a chain: allowed only if every one is); returns one bool each, in order."""
        body = self._fresh({"checks": [self._check(*c, None) for c in checks]})
        if context is not None:
            body["context"] = context
        r = yield _Call("POST", "/v1/authorize/batch", body)
        return [x["allowed"] for x in r["results"]]

    def list(self, actor, action: str, resource_type: str, context: dict | None = None) -> Op:
        ids: list[str] = []
        cursor = None
        while True:
            body = self._fresh({"actor": _entity(actor), "action": action})
            body |= {"resource_type": resource_type, "limit": 1000}
            if context is not None:
                body["context"] = context
            if cursor:
                body["cursor"] = cursor
            r = yield _Call("POST", "/v1/list", body)
            ids += r["ids"]
            cursor = r["next_cursor"]
            if not cursor:
                return ids

    def actions(self, actor, resource, context: dict | None = None) -> Op:
        body = self._fresh({"actor": _entity(actor), "resource": _entity(resource)})
        if context is not None:
            body["context"] = context
        r = yield _Call("POST", "/v1/actions", body)
        return set(r["actions"])

    def query(self, predicate: str, *args: Any, context: dict | None = None) -> Op:
        body = self._fresh({"predicate": predicate, "args": [_arg(a) for a in args]})
        if context is not None:
            body["context"] = context
        r = yield _Call("POST", "/v1/query", body)
        return [tuple(arg_from_json(v) for v in row) for row in r["results"]]

    def explain(self, decision_id: str) -> Op:
        return (yield _Call("GET", f"/v1/decisions/{decision_id}/explanation"))

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
        return self._wrote(r)["deleted"]

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
        while True:
            params = {"limit": "1000"}
            if pattern is not None:
                params["pattern"] = json.dumps(fact_to_json(pattern))
            if cursor:
                params["cursor"] = cursor
            r = yield _Call("GET", "/v1/facts", params=params)
            out += [fact_from_json(f, also=("expires_at",)) for f in r["facts"]]
            cursor = r["next_cursor"]
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
        return (yield from self.put_policy(text, source, note, strict))["version"]

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
        return r["warnings"]

    def policy(self) -> Op:
        return (yield _Call("GET", "/v1/policy"))

    def policy_versions(self) -> Op:
        return (yield _Call("GET", "/v1/policy/versions"))["versions"]

    def rollback_policy(self, version: int) -> Op:
        r = yield _Call("POST", "/v1/policy/rollback", {"version": version})
        return self._wrote(r)["version"]

    # -- keys ------------------------------------------------------------------------------

    def create_key(self, name: str, scopes: list[str], expires_in: float | None = None) -> Op:
        return (
            yield _Call(
                "POST", "/v1/keys", {"name": name, "scopes": scopes, "expires_in": expires_in}
            )
        )

    def list_keys(self) -> Op:
        return (yield _Call("GET", "/v1/keys"))["keys"]

    def revoke_key(self, key_id: str) -> Op:
        return (yield _Call("DELETE", f"/v1/keys/{key_id}"))

    # -- approvals (a key of scope approvals; docs/approvals.md) ---------------------------

    def list_approvals(
        self, status: str | None = None, approver: str | None = None, limit: int | None = None
    ) -> Op:
        """Held calls and results, newest first, as ``GET /v1/approvals`` describes them."""
        params = {"status": status, "approver": approver, "limit": limit}
        params = {k: v for k, v in params.items() if v is not None}
        return (yield _Call("GET", "/v1/approvals", params=params))["approvals"]

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


def _check_response(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        try:
            body = response.json()
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}  # JSON, but not a problem object (a list, a string, null): not bastion's
        raise RemoteError(
            response.status_code,
            body.get("title", response.reason_phrase),
            # Not bastion's answer (a proxy's page, say): its start, to say what answered,
            # escaped, so it cannot forge a line of a log or drive a terminal.
            body.get("detail", readable(response.text, 200)),
            body,
        )
    return response.json()


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


class Client:
    """A synchronous client; use as a context manager or call `close()`."""

    def __init__(
        self, url: str, api_key: str, *, timeout: float = 30.0, read_your_writes: bool = True
    ) -> None:
        self._http = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"authorization": f"Bearer {api_key}"},
            timeout=timeout,
        )
        self._ops = _Ops()
        self._ops.read_your_writes = read_your_writes
        self.facts = _FactsOf(self)

    @property
    def sequence(self) -> int:
        """The sequence of this client's latest write (0 before any)."""
        return self._ops.sequence

    def _send(self, call: _Call) -> Any:
        r = self._http.request(
            call.method,
            call.path,
            json=call.json,
            params=call.params,
            content=call.content,
            headers=call.headers,
        )
        return _check_response(r)

    def _facts_export(self) -> Iterator[StoredFact]:
        """Every live fact, streamed."""
        with self._http.stream("GET", "/v1/facts/export") as r:
            if r.status_code >= 400:
                r.read()
                _check_response(r)
            for line in r.iter_lines():
                if line.strip():
                    yield StoredFact.from_json(json.loads(line))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """The same methods as `Client`, awaited."""

    def __init__(
        self, url: str, api_key: str, *, timeout: float = 30.0, read_your_writes: bool = True
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=url.rstrip("/"),
            headers={"authorization": f"Bearer {api_key}"},
            timeout=timeout,
        )
        self._ops = _Ops()
        self._ops.read_your_writes = read_your_writes
        self.facts = _FactsOf(self)

    @property
    def sequence(self) -> int:
        return self._ops.sequence

    async def _send(self, call: _Call) -> Any:
        r = await self._http.request(
            call.method,
            call.path,
            json=call.json,
            params=call.params,
            content=call.content,
            headers=call.headers,
        )
        return _check_response(r)

    async def _facts_export(self) -> AsyncIterator[StoredFact]:
        async with self._http.stream("GET", "/v1/facts/export") as r:
            if r.status_code >= 400:
                await r.aread()
                _check_response(r)
            async for line in r.aiter_lines():
                if line.strip():
                    yield StoredFact.from_json(json.loads(line))

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
